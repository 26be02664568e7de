"""Start-up: importing the package, the root help, `policies`, the help of `replay`, `check`,
`tune` and `inspect`, `import` and `pack` (their help and their input checks), and a Recorder
of numpy arrays never import torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

PROBES = {
    "import": "import stabledrl_cli",
    "face names": "import stabledrl_cli as sd; sd.__version__; dir(sd)",
    "root help": """
        from typer.testing import CliRunner
        from stabledrl_cli.cli.app import app
        result = CliRunner().invoke(app, ["--help"])
        assert result.exit_code == 0 and "replay" in result.stdout, result.output
    """,
    "replay, check, tune and inspect: their help": """
        from typer.testing import CliRunner
        from stabledrl_cli.cli.app import app
        for command in ("replay", "check", "tune", "inspect"):
            result = CliRunner().invoke(app, [command, "--help"])
            assert result.exit_code == 0 and "Usage" in result.stdout, result.output
    """,
    "import and pack, their help and a missing input": """
        from typer.testing import CliRunner
        from stabledrl_cli.cli.app import app
        missing = {"import": ["/no/log", "--out", "/no/run"], "pack": ["/no/run", "/no/out.h5"]}
        for command, args in missing.items():
            result = CliRunner().invoke(app, [command, "--help"])
            assert result.exit_code == 0 and "Usage" in result.stdout, result.output
            result = CliRunner().invoke(app, [command, *args])
            assert result.exit_code == 3, result.output
    """,
    "a Recorder of numpy arrays, and the headers of its run": """
        import tempfile
        import numpy as np
        import stabledrl_cli as sd
        path = tempfile.mkdtemp() + "/run"
        with sd.Recorder(path, policy="grpo") as recorder:
            zeros = np.zeros(8, "float32")
            recorder.log_step(0, logp=zeros, logp_old=zeros, advantages=zeros + 1,
                              seq_id=np.repeat(np.arange(4), 2).astype("int32"), loss=0.5)
        run = sd.open_run(path)
        assert run.step_numbers == [0] and run.step(0).scalars["loss"] == 0.5
    """,
    "policies": """
        from typer.testing import CliRunner
        from stabledrl_cli.cli.app import app
        for args in (["policies"], ["policies", "-f", "json"], ["policies", "-p", "dapo"]):
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 0 and "dapo" in result.stdout, result.output
    """,
}


@pytest.mark.parametrize("name", list(PROBES))
def test_torch_is_not_imported(name):
    code = textwrap.dedent(PROBES[name]) + "\nimport sys\nprint('torch' in sys.modules)\n"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False", f"{name} imported torch"


def test_public_names_still_resolve():
    import stabledrl_cli as sd

    for name in sd.__all__:
        assert getattr(sd, name) is not None
    with pytest.raises(AttributeError):
        sd.no_such_name  # noqa: B018
