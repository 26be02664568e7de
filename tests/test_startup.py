"""Start-up: none of these imports torch. Importing the package; the root help, `policies`,
and the help of `replay`, `check`, `tune`, `inspect`, `diff` and `watch`; `import` and `pack`
(their help and their input checks), and `pack` of a run; a Recorder of numpy arrays and its
run read back, and its refusal of a step without a field its policy needs; `diff` of two
runs that never part; `replay`, `check` and `tune` refusing an unknown policy (on any
engine), or too many --workers or an empty (or blank) --ray-address; `tune` and `check`
(given a baseline naming a policy) refusing a missing run; `diff` of two scalar runs that
part; `check` and `inspect` of a scalar run (inspect of a run with a policy batch checks each
step with replay's own code, torch's), `replay` and `tune` refusing it, `check` its --plot
(nor matplotlib), `watch --once` a policy gate on it, and `watch` of it, live or `--once`
(torch is loaded when a step with a policy batch is first replayed); and the refusals of bad
input by these, `watch` and `branch`."""

from __future__ import annotations

import json
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
    "replay, check, tune, inspect, diff and watch: their help": """
        from typer.testing import CliRunner
        from stabledrl_cli.cli.app import app
        for command in ("replay", "check", "tune", "inspect", "diff", "watch"):
            result = CliRunner().invoke(app, [command, "--help"])
            assert result.exit_code == 0 and "Usage" in result.stdout, result.output
    """,
    "watch refusing a missing run and bad options": """
        from typer.testing import CliRunner
        from stabledrl_cli.cli.app import app
        assert CliRunner().invoke(app, ["watch", "/no/run", "--once"]).exit_code == 3
        assert CliRunner().invoke(app, ["watch", "/no/run", "--interval", "0"]).exit_code == 2
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
    "pack of a run, and the archive read back": """
        import tempfile
        import numpy as np
        import stabledrl_cli as sd
        from typer.testing import CliRunner
        from stabledrl_cli.cli.app import app
        home = tempfile.mkdtemp()
        with sd.Recorder(home + "/run", policy="grpo") as recorder:
            zeros = np.zeros(8, "float32")
            recorder.log_step(0, logp=zeros, logp_old=zeros - 0.1, advantages=zeros + 1,
                              seq_id=np.repeat(np.arange(4), 2).astype("int32"),
                              reward=np.ones(4, "float32"), loss=0.5)
        packed = CliRunner().invoke(app, ["pack", home + "/run", home + "/run.h5"])
        assert packed.exit_code == 0, packed.output
        step = sd.open_run(home + "/run.h5").step(0)
        assert step.array("logp").dtype == np.float32 and step.scalars["loss"] == 0.5
    """,
    "a Recorder of numpy arrays, its run's headers and arrays": """
        import tempfile
        import numpy as np
        import stabledrl_cli as sd
        path = tempfile.mkdtemp() + "/run"
        with sd.Recorder(path, policy="grpo") as recorder:
            zeros = np.zeros(8, "float32")
            recorder.log_step(0, logp=zeros, logp_old=zeros - 0.1, advantages=zeros + 1,
                              seq_id=np.repeat(np.arange(4), 2).astype("int32"), loss=0.5,
                              inner_step=0)
        run = sd.open_run(path)
        assert run.step_numbers == [0] and run.step(0).scalars["loss"] == 0.5
        assert run.step(0).array("logp").dtype == np.float32
    """,
    "a Recorder refusing a step without a field its policy needs": """
        import tempfile
        import numpy as np
        import stabledrl_cli as sd
        from stabledrl_cli.errors import UsageError
        ones = np.ones(4, "float32")
        with sd.Recorder(tempfile.mkdtemp() + "/run", policy="grpo:beta=0.04",
                         unit="sequence") as recorder:
            try:
                recorder.log_step(0, logp=-ones, logp_old=-ones, advantages=ones)
            except UsageError as exc:
                assert "'logp_ref'" in str(exc), exc
            else:
                raise AssertionError("a step without logp_ref was recorded")
            recorder.log_step(0, logp=-ones, logp_old=-ones, advantages=ones, logp_ref=-ones)
    """,
    "diff of two runs that never part, its refusals, and a bad policy to replay, check, tune": """
        import shutil, tempfile
        import numpy as np
        import stabledrl_cli as sd
        from typer.testing import CliRunner
        from stabledrl_cli.cli.app import app
        home = tempfile.mkdtemp()
        with sd.Recorder(home + "/a", policy="grpo") as recorder:
            for step in range(3):
                logp = np.linspace(-2, -1, 8, dtype="float32") + step
                recorder.log_step(step, logp=logp, logp_old=logp - 0.01,
                                  advantages=np.repeat([1.0, -1.0, 0.5, -0.5], 2),
                                  seq_id=np.repeat(np.arange(4), 2).astype("int32"))
        shutil.copytree(home + "/a", home + "/b")
        same = CliRunner().invoke(app, ["diff", home + "/a", home + "/b", "-f", "json"])
        assert same.exit_code == 0 and '"identical": true' in same.stdout, same.output
        assert CliRunner().invoke(app, ["diff", home + "/a", home + "/none"]).exit_code == 3
        bad = CliRunner().invoke(app, ["diff", home + "/a", home + "/b", "--atol", "-1"])
        assert bad.exit_code == 2, bad.output
        for command in (["replay"], ["check", "--max-spikes", "0"], ["tune"]):
            for engine in ("local", "processes"):  # an engine's module imports torch
                bad = CliRunner().invoke(
                    app, [*command, home + "/a", "-p", "nonsense", "--engine", engine]
                )
                assert bad.exit_code == 2 and "unknown policy 'nonsense'" in bad.stderr, bad.output
        for engine in (
            ["processes", "--workers", "1000"],
            ["ray", "--ray-address", ""],
            ["ray", "--ray-address", " "],
        ):
            for command in (["replay"], ["check", "--max-spikes", "0"], ["tune", "-p", "grpo"]):
                bad = CliRunner().invoke(app, [*command, home + "/a", "--engine", *engine])
                assert bad.exit_code == 2 and engine[1] in bad.stderr, bad.output
    """,
    "check and inspect of a scalar run, and check of a missing run": """
        import tempfile
        import stabledrl_cli as sd
        from typer.testing import CliRunner
        from stabledrl_cli.cli.app import app
        path = tempfile.mkdtemp() + "/run"
        with sd.Recorder(path, policy=None) as recorder:
            for step in range(20):
                recorder.log_step(step, reward_mean=0.5, grad_norm=1.0 + step % 2)
        gated = CliRunner().invoke(app, ["check", path, "--max-spikes", "0"])
        assert gated.exit_code == 0, gated.output
        shown = CliRunner().invoke(app, ["inspect", path, "-f", "json"])
        assert shown.exit_code == 0 and '"steps": 20' in shown.stdout, shown.output
        missing = CliRunner().invoke(app, ["check", path + "-none", "--max-spikes", "0"])
        assert missing.exit_code == 3, missing.output
    """,
    "replay and tune refusing a scalar run": """
        import tempfile
        import stabledrl_cli as sd
        from typer.testing import CliRunner
        from stabledrl_cli.cli.app import app
        path = tempfile.mkdtemp() + "/run"
        with sd.Recorder(path, policy="grpo") as recorder:
            for step in range(4):
                recorder.log_step(step, reward_mean=0.5, grad_norm=1.0)
        for args in (["replay", path], ["tune", path, "-p", "grpo"]):
            refused = CliRunner().invoke(app, args)
            assert refused.exit_code == 3 and "nothing to replay" in refused.stderr, refused.output
    """,
    "check --plot refusing a scalar run": """
        import tempfile
        import stabledrl_cli as sd
        from typer.testing import CliRunner
        from stabledrl_cli.cli.app import app
        home = tempfile.mkdtemp()
        with sd.Recorder(home + "/run", policy="grpo") as recorder:
            for step in range(4):
                recorder.log_step(step, reward_mean=0.5, grad_norm=1.0)
        args = ["check", home + "/run", "--max-spikes", "0", "--plot", home + "/plot.png"]
        refused = CliRunner().invoke(app, args)
        assert refused.exit_code == 2 and "--plot need(s)" in refused.stderr, refused.output
    """,
    "watch --once refusing a policy gate on a scalar run": """
        import tempfile
        import stabledrl_cli as sd
        from typer.testing import CliRunner
        from stabledrl_cli.cli.app import app
        path = tempfile.mkdtemp() + "/run"
        with sd.Recorder(path, policy="grpo") as recorder:
            for step in range(4):
                recorder.log_step(step, reward_mean=0.5, grad_norm=1.0)
        refused = CliRunner().invoke(app, ["watch", path, "--once", "--max-discard-frac", "0.1"])
        assert refused.exit_code == 2 and "a scalar run so far" in refused.stderr, refused.output
    """,
    "watch --once of a scalar run, and its live watch": """
        import tempfile
        import stabledrl_cli as sd
        from typer.testing import CliRunner
        from stabledrl_cli.cli.app import app
        path = tempfile.mkdtemp() + "/run"
        with sd.Recorder(path, policy="grpo") as recorder:
            for step in range(8):
                recorder.log_step(step, reward_mean=0.5, grad_norm=1.0 + 99 * (step == 7))
        gated = CliRunner().invoke(app, ["watch", path, "--once", "--max-spikes", "0"])
        assert gated.exit_code == 1 and "(step 7)" in gated.stderr, gated.output
        for args in (["--once", "--format", "json"], ["--once", "--device", "cpu"],
                     ["--interval", "0.1", "--until-idle", "1"]):  # the run ended: one poll
            watched = CliRunner().invoke(app, ["watch", path, *args])
            assert watched.exit_code == 0 and "step" in watched.output, watched.output
    """,
    "tune refusing a missing run": """
        from typer.testing import CliRunner
        from stabledrl_cli.cli.app import app
        for device in ("auto", "cpu"):  # cpu is no device torch could fail to see
            args = ["tune", "/no/run", "-p", "grpo", "--device", device]
            missing = CliRunner().invoke(app, args)
            assert missing.exit_code == 3 and "no such run" in missing.stderr, missing.output
    """,
    "check refusing a missing run, given a baseline naming a policy": """
        import json, tempfile
        from typer.testing import CliRunner
        from stabledrl_cli.cli.app import app
        baseline = tempfile.mkdtemp() + "/baseline.json"
        replay = {"spike_factor": 10.0, "window": 50, "drift_threshold": -0.15,
                  "collapse_window": 10}
        with open(baseline, "w") as fh:
            json.dump({"schema": "stabledrl-baseline", "version": 1, "replay": replay,
                       "policies": {"grpo": {"collapsed_steps": {"value": 0,
                                                                 "worse": "higher"}}}}, fh)
        missing = CliRunner().invoke(app, ["check", "/no/run", "-b", baseline])
        assert missing.exit_code == 3 and "no such run" in missing.stderr, missing.output
    """,
    "diff of two scalar runs that part": """
        import tempfile
        import stabledrl_cli as sd
        from typer.testing import CliRunner
        from stabledrl_cli.cli.app import app
        home = tempfile.mkdtemp()
        for name, late in (("a", 0.5), ("b", 0.6)):
            with sd.Recorder(f"{home}/{name}", policy="grpo") as recorder:
                for step in range(6):
                    recorder.log_step(step, reward_mean=0.5 if step < 3 else late, grad_norm=1.0)
        parted = CliRunner().invoke(app, ["diff", home + "/a", home + "/b"])
        assert parted.exit_code == 1 and "parted at step 3" in parted.stdout, parted.output
    """,
    "branch, its help and a missing run": """
        from typer.testing import CliRunner
        from stabledrl_cli.cli.app import app
        result = CliRunner().invoke(app, ["branch", "--help"])
        assert result.exit_code == 0 and "Usage" in result.stdout, result.output
        missing = CliRunner().invoke(app, ["branch", "/no/run", "--at", "4", "-p", "grpo"])
        assert missing.exit_code == 3 and "not a run directory" in missing.output, missing.output
    """,
    "policies": """
        from typer.testing import CliRunner
        from stabledrl_cli.cli.app import app
        for args in (["policies"], ["policies", "-f", "json"], ["policies", "-p", "dapo"]):
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 0 and "dapo" in result.stdout, result.output
    """,
}


IN_TURN = """
import json, sys, traceback
cases, modules = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for name, code in cases.items():
    try:
        exec(compile(code, name, "exec"), {"__name__": "__probe__"})
    except BaseException:
        print(json.dumps([name, traceback.format_exc()]), flush=True)
    else:
        print(json.dumps([name, [m for m in modules if m in sys.modules]]), flush=True)
"""


def imported_in_turn(cases: dict[str, str], modules: list[str]) -> dict[str, list[str] | str]:
    """Each case's code run in turn in one fresh interpreter: after each, which of `modules`
    were imported (by it or a case before it: imports stay), or the case's traceback."""
    dedented = {name: textwrap.dedent(code) for name, code in cases.items()}
    proc = subprocess.run(
        [sys.executable, "-c", IN_TURN, json.dumps(dedented), json.dumps(modules)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(line) for line in proc.stdout.splitlines() if line.startswith("["))


def first_to_import(outcomes: dict[str, list[str] | str], name: str, module: str) -> str:
    """`name`, or the case before it after which `module` was first seen imported."""
    return next(
        case
        for case, seen in outcomes.items()
        if case == name or (isinstance(seen, list) and module in seen)
    )


@pytest.fixture(scope="module")
def probed() -> dict[str, list[str] | str]:
    return imported_in_turn(PROBES, ["torch", "matplotlib"])


@pytest.mark.parametrize("name", list(PROBES))
def test_torch_is_not_imported(name, probed):
    outcome = probed[name]
    assert isinstance(outcome, list), outcome
    assert "torch" not in outcome, f"{first_to_import(probed, name, 'torch')} imported torch"


def test_a_plot_refused_with_its_run_does_not_import_matplotlib(probed):
    """matplotlib (0.3 s) is looked up, not imported, while the options are checked: it is
    imported once the run is found to hold something to replay."""
    name = "check --plot refusing a scalar run"
    outcome = probed[name]
    assert isinstance(outcome, list), outcome
    assert "matplotlib" not in outcome, (
        f"{first_to_import(probed, name, 'matplotlib')} imported matplotlib"
    )


def test_public_names_still_resolve():
    import stabledrl_cli as sd

    for name in sd.__all__:
        assert getattr(sd, name) is not None
    with pytest.raises(AttributeError):
        sd.no_such_name  # noqa: B018


READERS = {
    "a Recorder writing its steps": """
        import tempfile
        import numpy as np
        from stabledrl_cli.dump import Recorder
        with Recorder(tempfile.mkdtemp() + "/run", policy="grpo") as recorder:
            zeros = np.zeros(8, "float32")
            recorder.log_step(0, logp=zeros, logp_old=zeros - 0.1, advantages=zeros + 1,
                              seq_id=np.repeat(np.arange(4), 2).astype("int32"))
    """,
    **{
        " ".join(args): f"""
        from typer.testing import CliRunner
        from stabledrl_cli.cli.app import app
        result = CliRunner().invoke(app, {args!r})
        assert result.exit_code == 0, result.output
    """
        for args in (["--help"], ["policies"], ["policies", "-f", "json"])
    },
    "a missing run refused by replay, check, tune, inspect, diff, watch and pack": """
        from typer.testing import CliRunner
        from stabledrl_cli.cli.app import app
        for args in (["replay"], ["check", "--max-spikes", "0"], ["tune", "-p", "grpo"],
                     ["inspect"], ["diff", "/no/other"], ["watch", "--once"],
                     ["pack", "out.h5"]):
            missing = CliRunner().invoke(app, [args[0], "/no/run", *args[1:]])
            assert missing.exit_code == 3 and "no such run" in missing.stderr, missing.output
    """,
    "output files checked against the run: a missing run, check of a scalar run": """
        import tempfile
        import stabledrl_cli as sd
        from typer.testing import CliRunner
        from stabledrl_cli.cli.app import app
        home = tempfile.mkdtemp()
        for args in (["replay", "--out", home + "/r.h5"],
                     ["tune", "-p", "grpo", "--plot", home + "/t.png"],
                     ["check", "--max-spikes", "0", "--write-baseline", home + "/b.json"]):
            missing = CliRunner().invoke(app, [args[0], "/no/run", *args[1:]])
            assert missing.exit_code == 3 and "no such run" in missing.stderr, missing.output
        with sd.Recorder(home + "/run", policy=None) as recorder:
            for step in range(8):
                recorder.log_step(step, reward_mean=0.5, grad_norm=1.0 + step % 2)
        args = ["check", home + "/run", "--max-spikes", "0", "--junit", home + "/j.xml"]
        gated = CliRunner().invoke(app, args)
        assert gated.exit_code == 0, gated.output
    """,
}


@pytest.fixture(scope="module")
def readers() -> dict[str, list[str] | str]:
    return imported_in_turn(READERS, ["h5py", "stabledrl_cli.dump._open"])


def test_a_recorder_writes_its_steps_without_importing_the_readers(readers):
    """A recorded training process needs the Recorder only: h5py (the archive reader's) costs
    it start-up time and nothing else."""
    assert readers["a Recorder writing its steps"] == []


def test_a_missing_run_is_refused_without_the_archive_reader(readers) -> None:
    """The path is looked up before any archive is read: h5py (the archive reader's, and the
    replay report writer's) was a third of `stabledrl diff MISSING RUN`'s start."""
    name = "a missing run refused by replay, check, tune, inspect, diff, watch and pack"
    outcome = readers[name]
    assert isinstance(outcome, list), outcome
    assert "h5py" not in outcome, f"{first_to_import(readers, name, 'h5py')} imported h5py"


def test_output_files_are_checked_without_the_archive_reader(readers) -> None:
    """An output option's path is checked against the run (no report inside it) by a module
    of its own: the URL reader it lived in imports h5py, 0.13 s of CPU before the refusal of
    a missing run, or the whole of a scalar run's check that writes a JUnit report."""
    name = "output files checked against the run: a missing run, check of a scalar run"
    outcome = readers[name]
    assert isinstance(outcome, list), outcome
    assert "h5py" not in outcome, f"{first_to_import(readers, name, 'h5py')} imported h5py"


@pytest.mark.parametrize("args", [["--help"], ["policies"], ["policies", "-f", "json"]])
def test_help_and_policies_do_not_import_the_archive_reader(args: list[str], readers) -> None:
    """No run is read: h5py (the archive reader's), which the options' URL handling pulled in
    through the URL readers, was a tenth of a second of `stabledrl policies`' start."""
    name = " ".join(args)
    outcome = readers[name]
    assert isinstance(outcome, list), outcome
    assert "h5py" not in outcome, f"{first_to_import(readers, name, 'h5py')} imported h5py"


def test_watch_once_never_cuts_a_figure_on_a_narrow_terminal(tmp_path) -> None:
    """`watch --once` fitted its table of the last steps to the terminal: in 40 columns rich
    cut every step number and figure of the grpo fixture's ('1…' for step 150, '1.17e…' for a
    grad norm of 1.17e+07). Its table overflows the terminal instead, as replay's do."""
    import numpy as np
    from typer.testing import CliRunner

    import stabledrl_cli as sd
    from stabledrl_cli.cli.app import app

    with sd.Recorder(tmp_path / "run", policy="grpo") as recorder:
        for step in range(148, 151):
            logp = np.linspace(-2, -1, 8, dtype="float32")
            recorder.log_step(step, logp=logp, logp_old=logp - 0.01,
                              advantages=np.repeat([1.0, -1.0, 0.5, -0.5], 2),
                              seq_id=np.repeat(np.arange(4), 2).astype("int32"),
                              reward=np.full(4, 0.278, "float32"), grad_norm=1.17e7)  # fmt: skip
    shown = CliRunner().invoke(
        app, ["watch", str(tmp_path / "run"), "--once"], env={"COLUMNS": "30"}
    )
    assert shown.exit_code == 0, shown.output
    assert "…" not in shown.stdout, shown.stdout
    assert "150 │" in shown.stdout and "1.17e+07" in shown.stdout, shown.stdout
