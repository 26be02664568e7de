"""A recording process killed with SIGKILL, and a run read while another process writes it."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

import stabledrl_cli as sd
from stabledrl_cli.dump import RunIntegrityWarning

WORKER = Path(__file__).with_name("_record_worker.py")
ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("_record_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

SEED = 1234
ARRAYS = ("logp", "logp_old", "advantages", "mask", "group_id", "reward")


def _start(out: Path, *args: str) -> subprocess.Popen:
    # The package from this checkout, however it is installed (or not).
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(out), "--seed", str(SEED), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _kill_after(proc: subprocess.Popen, completed: int) -> list[int]:
    """Reads printed step numbers until `completed` of them, then SIGKILLs the recorder."""
    printed = []
    while len(printed) < completed:
        line = proc.stdout.readline()
        assert line, f"worker ended early: {proc.stderr.read()}"
        printed.append(int(line))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    printed += [int(line) for line in proc.stdout.read().split()]  # printed before the kill
    assert proc.returncode == -signal.SIGKILL
    return printed


def _assert_bit_identical(run, step) -> None:
    expected = worker.make_step(SEED, step.step)
    for name in ARRAYS:
        want = np.asarray(expected[name])
        if name == "advantages":
            want = np.broadcast_to(want[:, None], expected["logp"].shape)
        got = step[name].numpy()
        assert got.dtype == want.dtype, name
        assert got.tobytes() == np.ascontiguousarray(want).reshape(-1).tobytes(), name
    batch, length = expected["logp"].shape
    want_ids = np.repeat(np.arange(batch, dtype=np.int32), length)
    assert step["seq_id"].numpy().tobytes() == want_ids.tobytes()
    assert step.scalars["grad_norm"] == expected["grad_norm"]
    assert step.scalars["loss"] == expected["loss"]


def _check_after_crash(path: Path, must_have: list[int]) -> list[int]:
    run = sd.open_run(path)
    readable = run.step_numbers
    assert set(must_have) <= set(readable)
    assert readable == list(range(len(readable)))  # steps are written in order
    for step in run:
        _assert_bit_identical(run, step)
    kinds = {f.kind for f in run.integrity.findings}
    assert kinds <= {"temporary"}  # at most the step in flight, under its temporary name
    return readable


def test_kill_9_sync_keeps_every_completed_step(tmp_path):
    path = tmp_path / "run"
    proc = _start(path, "--steps", "100000", "--sleep", "0.002")
    printed = _kill_after(proc, completed=6)
    readable = _check_after_crash(path, must_have=printed)
    # Synchronous: a step is durable when log_step returns; at most the one in flight beyond.
    assert len(readable) - len(printed) in (0, 1)


def test_kill_9_mid_write_keeps_completed_steps_and_reports_the_torn_one(tmp_path):
    """Killed half-way through writing step 5's data: steps 0..4 read back bit for bit, and
    step 5 is reported as the temporary file it was being written to, never read."""
    path = tmp_path / "run"
    proc = _start(path, "--steps", "100", "--stall-at", "5")
    lines = []
    while not lines or lines[-1] != "stalled":
        line = proc.stdout.readline()
        assert line, f"worker ended early: {proc.stderr.read()}"
        lines.append(line.strip())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert lines == ["0", "1", "2", "3", "4", "stalled"]
    assert _check_after_crash(path, must_have=[0, 1, 2, 3, 4]) == [0, 1, 2, 3, 4]
    findings = sd.open_run(path).integrity.findings
    assert [(f.kind, f.step) for f in findings] == [("temporary", 5)]
    torn = Path(findings[0].path)
    assert torn.name.startswith(".step-00000005.safetensors.tmp-")
    assert 0 < torn.stat().st_size < (path / "steps" / "step-00000004.safetensors").stat().st_size


def test_kill_9_async_loses_at_most_queue_size_plus_one(tmp_path):
    queue_size = 2
    path = tmp_path / "run"
    proc = _start(path, "--steps", "100000", "--async-writes", "--queue-size", str(queue_size))
    printed = _kill_after(proc, completed=12)
    # The documented bound: the queued steps and the one being written.
    _check_after_crash(path, must_have=printed[: len(printed) - (queue_size + 1)])


def test_clean_run_then_torn_leftovers_are_reported_and_skipped(tmp_path):
    """The worker run to its end (async) leaves a clean run; then a crash mid-write, simulated:
    a truncated temporary file and a truncated final file."""
    path = tmp_path / "run"
    proc = _start(path, "--steps", "5", "--async-writes")
    assert proc.wait() == 0, proc.stderr.read()
    run = sd.open_run(path)
    assert run.integrity.ok and run.step_numbers == [0, 1, 2, 3, 4]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RunIntegrityWarning)
        for step in run:
            _assert_bit_identical(run, step)

    steps = path / "steps"
    data = (steps / "step-00000004.safetensors").read_bytes()
    (steps / ".step-00000005.safetensors.tmp-4242").write_bytes(data[: len(data) // 3])
    (steps / "step-00000004.safetensors").write_bytes(data[: len(data) // 2])
    run = sd.open_run(path)
    findings = {(f.kind, f.step) for f in run.integrity.findings}
    assert findings == {("torn", 4), ("temporary", 5)}
    assert run.step_numbers == [0, 1, 2, 3]
    for step in run:
        _assert_bit_identical(run, step)


def test_read_while_another_process_writes(tmp_path):
    path = tmp_path / "run"
    total = 40
    proc = _start(path, "--steps", str(total), "--sleep", "0.02")
    seen_counts = []
    checked = set()
    try:
        assert proc.stdout.readline()  # the manifest and step 0 exist
        run = sd.open_run(path)
        while True:
            done = proc.poll() is not None
            numbers = run.step_numbers
            assert numbers == list(range(len(numbers)))  # a readable prefix, never a torn step
            seen_counts.append(len(numbers))
            for step in run.steps(start=min(set(numbers) - checked, default=total)):
                _assert_bit_identical(run, step)
                checked.add(step.step)
            if done:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == 0, proc.stderr.read()
    assert seen_counts == sorted(seen_counts)  # the run only grows under the reader
    assert any(0 < count < total for count in seen_counts)  # we did read it mid-run
    assert checked == set(range(total))
    assert sd.open_run(path).integrity.ok
