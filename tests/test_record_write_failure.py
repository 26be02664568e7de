"""A full disk under `stabledrl record -- CMD` never stops the training it records: the
child warns once and trains on, the finished steps stay readable, and `record` exits 4 with
the reason (the child itself exited 0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _cli import cli_command
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import open_run

CHILD = textwrap.dedent(
    """
    import errno, os
    import numpy as np
    import stabledrl_cli as sd

    real_writev = os.writev

    def full_disk(fd, buffers):
        raise OSError(errno.ENOSPC, "No space left on device")

    for step in range(8):
        if step == 3:
            os.writev = full_disk  # the disk fills up before step 3 is written
        logp = np.full((4, 3), -1.0, dtype=np.float32)
        sd.log_policy_batch(step, policy="grpo", logp=logp, logp_old=logp,
                            advantages=np.array([1.0, -1.0, 0.5, -0.5], dtype=np.float32),
                            mask=np.ones((4, 3), dtype=np.uint8), grad_norm=1.0, loss=0.0)
    os.writev = real_writev
    print("trained 8 steps")
    """
)


def _record(tmp_path: Path, child: str, run: Path, *args: str) -> subprocess.CompletedProcess:
    """`stabledrl record --out RUN ARGS -- python CHILD` in a process of its own."""
    script = tmp_path / "train.py"
    script.write_text(child)
    env = {**os.environ}
    env.pop("STABLEDRL_DEBUG", None)
    return subprocess.run(
        [*cli_command(), "record", "--out", str(run), *args, "--",
         sys.executable, str(script)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


def test_a_full_disk_stops_recording_not_training(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = _record(tmp_path, CHILD, run)
    assert "trained 8 steps" in result.stdout  # training went on to the end
    assert result.returncode == 4, result.stderr
    assert "no space left on device" in result.stderr.lower()
    assert result.stderr.count("recording stopped") >= 1
    assert open_run(run).step_numbers == [0, 1, 2]  # the finished steps are intact
    assert not [p for p in (run / "steps").iterdir() if ".tmp" in p.name]


HALVES_CHILD = textwrap.dedent(
    """
    import json, resource, signal, sys
    import numpy as np
    import torch
    import stabledrl_cli as sd
    from stabledrl_cli.capture import bootstrap

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file past the limit: EFBIG, not a kill
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(6):
        if step == 3:
            bootstrap.recording.recorder.flush()  # steps 0-2 are on disk, whole
            # a step's scalar half (< 1 KB) still fits; its batch (80 KB) no longer does
            resource.setrlimit(resource.RLIMIT_FSIZE, (30000, resource.RLIM_INFINITY))
        model(torch.ones(8, 4)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        logp = np.full((200, 50), -1.0, dtype=np.float32)
        sd.log_policy_batch(step, logp=logp, logp_old=logp, advantages=np.ones(200, np.float32))
    print("trained 6 steps")
    """
)


def test_a_step_whose_batch_half_fails_to_write_is_not_left_as_a_scalar_step(
    tmp_path: Path,
) -> None:
    """Under the optimizer hooks a step is written in two halves (the optimizer's scalars,
    then the same file again with the batch). When the second write fails the step is not
    recorded at all: its file is not left behind holding the scalar half alone, which every
    reader would take for a complete scalar step."""
    run = tmp_path / "run"
    result = _record(tmp_path, HALVES_CHILD, run, "-p", "grpo")
    assert "trained 6 steps" in result.stdout
    assert result.returncode == 4, result.stderr
    assert "step-00000003" in result.stderr
    recorded = open_run(run)
    assert recorded.step_numbers == [0, 1, 2]  # step 3 lost its batch: not recorded
    assert not [p for p in (run / "steps").iterdir() if p.name.startswith(".")]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["recording_stopped"]["step"] == 3
    # inspect says the recording stopped early: its integrity is fine, the run is short (in
    # this process: the record above is the real process, inspect's own are in test_inspect)
    shown = CliRunner().invoke(app, ["inspect", str(run), "--format", "json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["recording_stopped"]["step"] == 3
    table = CliRunner().invoke(app, ["inspect", str(run)], env={"COLUMNS": "300"})
    assert table.exit_code == 0, table.output
    assert "stopped at step 3 (rank 0):" in table.stdout


HOOKS_CHILD = textwrap.dedent(
    """
    import errno, os
    import torch
    from stabledrl_cli.capture import bootstrap

    def full_disk(fd, buffers):
        raise OSError(errno.ENOSPC, "No space left on device")

    real_writev = os.writev

    def full_steps(fd, buffers):  # the step files' writes fail, the manifest's note goes in
        if "/steps/" in os.readlink(f"/proc/self/fd/{fd}"):
            return full_disk(fd, buffers)
        return real_writev(fd, buffers)

    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(6):
        if step == 3:
            bootstrap.recording.recorder.flush()  # steps 0-2 are on disk, whole
            os.writev = full_steps  # step 3's write, in the background, fails
        model(torch.ones(8, 4)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    print("trained 6 steps")
    """
)


@pytest.fixture(scope="module")
def hooks_recorded(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess, Path]:
    """HOOKS_CHILD recorded once for the module (the tests below read the same run); its
    result and run."""
    tmp_path = tmp_path_factory.mktemp("hooks")
    run = tmp_path / "run"
    return _record(tmp_path, HOOKS_CHILD, run), run


def test_the_step_named_is_the_one_whose_write_failed(
    hooks_recorded: tuple[subprocess.CompletedProcess, Path],
) -> None:
    """The optimizer hooks write in the background, so step 3's failed write is noticed as a
    later step is logged, or as the run closes: record's line named that step ("recording
    stopped at step 4: ... step-00000003...") or "the end of the run", where the manifest's
    note says step 3. Both name step 3."""
    result, run = hooks_recorded
    assert "trained 6 steps" in result.stdout
    assert result.returncode == 4, result.stderr
    assert "recording stopped at step 3: " in result.stderr, result.stderr
    assert "recording stopped at step 4" not in result.stderr
    note = json.loads((run / "manifest.json").read_text())["recording_stopped"]
    assert note["step"] == 3
    assert open_run(run).step_numbers == [0, 1, 2]


def test_a_failed_write_in_the_background_is_said_once(
    hooks_recorded: tuple[subprocess.CompletedProcess, Path],
) -> None:
    """A step the Recorder's thread failed to write is told as a synchronous one is, its file
    first. Before: 'error: recording failed: recording stopped at step 3: recording failed:
    .../step-00000003.safetensors: cannot write it (no space left on device)', and the
    manifest's note (which inspect shows) began 'recording failed: ' as well."""
    result, run = hooks_recorded
    assert result.returncode == 4, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    file = run / "steps" / "step-00000003.safetensors"
    written = f"{file}: cannot write it (no space left on device)"
    assert errors == [f"error: recording failed: recording stopped at step 3: {written}"]
    reason = json.loads((run / "manifest.json").read_text())["recording_stopped"]["reason"]
    assert reason == written
