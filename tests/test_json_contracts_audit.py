"""The contracts seen from outside: each command's `--format json` names the run as the
others do, so that the reports of one run can be joined on it; and its tables, read in a
narrow terminal, fit it without a figure cut."""

from __future__ import annotations

import json
import subprocess

import numpy as np
from _cli import TIMEOUT, cli_command, cli_environment
from _corpus import tiny_run
from rich.cells import cell_len
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app

runner = CliRunner()


def _json(*args: str) -> dict[str, object]:
    result = runner.invoke(app, [*args, "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_check_names_the_run_as_replay_and_inspect_do(tmp_path, monkeypatch):
    """`check ./run/ --format json` said "run": "./run/" where `replay`, `inspect`, `tune`,
    `watch`, `pack` and `diff` all say "run" (the path as Python writes it), and so did its
    table's title and its JUnit suite, while its own stderr notes said "run"."""
    tiny_run(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    given = "./run/"
    names = {
        _json("replay", given, "-p", "grpo")["run"],
        _json("inspect", given)["run"],
        _json("check", given, "-p", "grpo", "--max-discard-frac", "1", "--junit", "j.xml")["run"],
    }
    assert names == {"run"}
    assert 'name="stabledrl check run"' in (tmp_path / "j.xml").read_text()
    table = runner.invoke(app, ["check", given, "-p", "grpo", "--max-discard-frac", "1"])
    assert table.exit_code == 0, table.output
    assert "stabledrl check run\n" in table.stdout and "./run/" not in table.stdout


def _run_with_nan_logp(path):
    """4 steps of 4 sequences of 6 tokens, one new log-probability NaN a step: every step's
    replayed update is non-finite, so flagged, and `--detail` lists its top sequences."""
    rng = np.random.default_rng(0)
    shape = (4, 6)
    with sd.Recorder(path, policy="grpo", unit="token") as recorder:
        for step in range(4):
            old = -rng.random(shape).astype(np.float32) - 0.5
            new = old + rng.normal(scale=0.01, size=shape).astype(np.float32)
            new[0, 0] = np.nan
            recorder.log_step(step, logp_old=old, logp=new, mask=np.ones(shape, dtype=bool),
                              group_id=np.arange(4) // 2, reward=rng.random(4),
                              advantages=rng.normal(size=4).astype(np.float32))  # fmt: skip
    return path


def test_detail_top_sequences_fit_60_columns(tmp_path):
    """`replay --detail` in 60 columns drew each flagged step's top sequences as a table 66
    wide, which the terminal wraps into broken rows (every other table of the command fits):
    where the table does not fit, a block a sequence, its figures whole."""
    run = str(_run_with_nan_logp(tmp_path / "nan"))
    args = ["replay", run, "-p", "grpo", "--detail", "--steps", "0:2", "--no-legend"]
    result = runner.invoke(app, args, env={"COLUMNS": "60"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(map(cell_len, lines)) <= 60, [line for line in lines if cell_len(line) > 60]
    assert "…" not in result.stdout
    (policy,) = _json(*args)["policies"]
    for step, seqs in policy["summary"]["detail"].items():
        assert f"grpo step {step}: sequences contributing most" in lines
        for seq in seqs:
            assert f"seq id: {seq['seq_id']}" in lines


def test_a_guards_nonfinite_action_on_a_nan_loss_keeps_its_finite_grad_norm(tmp_path):
    """docs/replay-json.md said a `nonfinite` action of `guards[].acted` has `grad_norm` null;
    a step the guards drop for its non-finite loss has a finite recorded norm, which the
    JSON keeps (and the docs now say so): null only where the norm is the non-finite value."""
    rng = np.random.default_rng(0)
    shape = (4, 6)
    with sd.Recorder(tmp_path / "run", policy="grpo", unit="token") as recorder:
        for step, (norm, loss) in enumerate([(1.0, 0.5), (2.0, float("nan")), (np.inf, 0.5)]):
            old = -rng.random(shape).astype(np.float32) - 0.5
            recorder.log_step(step, logp_old=old, logp=old + 0.01,
                              mask=np.ones(shape, dtype=bool), group_id=np.arange(4) // 2,
                              advantages=rng.normal(size=4).astype(np.float32),
                              reward=rng.random(4), grad_norm=norm, loss=loss)  # fmt: skip
    guards = _json("replay", str(tmp_path / "run"), "-p", "grpo")["guards"]
    assert [g["guard"] for g in guards] == ["zclip", "skip-step"]
    for guard in guards:
        assert [(a["step"], a["action"], a["grad_norm"], a["z"]) for a in guard["acted"]] == [
            (1, "nonfinite", 2.0, None),
            (2, "nonfinite", None, None),
        ]


def _run_with_stderr_to(stderr, *args: object) -> subprocess.CompletedProcess[bytes]:
    """`stabledrl ARGS...` in a process of its own, its stderr written to the file `stderr`."""
    with stderr.open("wb") as sink:
        return subprocess.run(
            cli_command(*args), stdout=subprocess.DEVNULL, stderr=sink, env=cli_environment(),
            stdin=subprocess.DEVNULL, timeout=TIMEOUT,
        )  # fmt: skip


def test_a_binary_report_on_the_commands_own_stderr_is_refused(tmp_path):
    """`replay RUN --out /dev/stderr 2> r.h5` wrote the HDF5 report after the progress line
    into r.h5, exit 0: a file h5py cannot open ("file signature not found"). A binary report
    there is refused before the replay, exit 2, as one on stdout is."""
    run = tiny_run(tmp_path / "run")
    err = tmp_path / "r.h5"
    plot = tmp_path / "r.png"
    for args, flag, target in [
        (("replay", run, "-p", "grpo", "--out", "/dev/stderr"), "--out", "/dev/stderr"),
        (("replay", run, "-p", "grpo", "--out", err), "--out", err),
        (("check", run, "--max-discard-frac", "1", "--plot", plot), "--plot", plot),
    ]:  # fmt: skip
        done = _run_with_stderr_to(plot if flag == "--plot" else err, *args)
        assert done.returncode == 2, args
        written = (plot if flag == "--plot" else err).read_text()
        assert written == (
            f"error: {flag} {target} is the standard error, where progress and warnings are "
            "printed; give a file name\n"
        )


def test_pack_refuses_an_archive_on_its_own_stderr(tmp_path):
    """`pack RUN /dev/stderr --force 2> run.h5` wrote the archive between its progress lines
    and summary, exit 0: run.h5 was no run ("not a run"). Refused before any step is read,
    exit 2; `pack RUN /dev/stdout` still pipes the archive on."""
    run = tiny_run(tmp_path / "run")
    err = tmp_path / "run.h5"
    for target in ("/dev/stderr", err):
        done = _run_with_stderr_to(err, "pack", run, target, "--force")
        assert done.returncode == 2
        assert err.read_text() == (
            f"error: {target} is the standard error, where progress and warnings are printed; "
            "give a file name\n"
        )
