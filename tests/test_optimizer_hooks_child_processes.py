"""`stabledrl record` of a training whose optimizer steps in a child process the script
starts (multiprocessing's fork, forkserver and spawn, a Pool's worker), while the script's
own process trains or not (docs/recording.md). Ranks: tests/test_optimizer_hooks_multi_rank.py;
one process's training: tests/test_optimizer_hooks_single_rank.py."""

from __future__ import annotations

import re
import sys
import textwrap

import pytest
from _record_here import record_done_here

from stabledrl_cli.dump import open_run

IN_A_CHILD = textwrap.dedent(
    """
    import multiprocessing, sys
    import torch

    def train():
        model = torch.nn.Linear(3, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(5):
            optimizer.zero_grad()
            model(torch.randn(2, 3)).sum().backward()
            optimizer.step()

    if __name__ == "__main__":
        child = multiprocessing.get_context(sys.argv[1]).Process(target=train)
        child.start()
        child.join()
        sys.exit(child.exitcode)
    """
)


@pytest.mark.parametrize("start_method", ["fork", "forkserver", "spawn"])
def test_training_in_a_multiprocessing_child_is_recorded_to_its_last_step(
    tmp_path, monkeypatch, capfd, start_method
):
    """A script that trains in a child process of `multiprocessing` (a notebook launcher's
    fork; Python 3.14's default forkserver): such a child ends with os._exit, which runs no
    atexit handler, so its last step (held until the next event) and the steps still queued
    were lost, and the run was never closed."""
    script = tmp_path / "train.py"
    script.write_text(IN_A_CHILD)
    command = [sys.executable, str(script), start_method]
    result = record_done_here(monkeypatch, capfd, "--out", str(tmp_path / "run"), "--", *command)
    assert result.returncode == 0, result.stderr
    run = open_run(tmp_path / "run")
    assert run.step_numbers == list(range(5))
    assert run.integrity.ok
    assert run.manifest.get("recording_closed") is not None


IN_A_POOL = textwrap.dedent(
    """
    import multiprocessing, sys
    import torch

    def train(steps):
        model = torch.nn.Linear(3, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(steps):
            optimizer.zero_grad()
            model(torch.randn(2, 3)).sum().backward()
            optimizer.step()
        return steps

    if __name__ == "__main__":
        with multiprocessing.get_context(sys.argv[1]).Pool(1) as pool:
            print(pool.apply(train, (40,)))
    """
)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_training_in_a_pool_worker_is_recorded_to_its_last_step(
    tmp_path, monkeypatch, capfd, start_method
):
    """A Pool's worker never returns from its target: leaving `with Pool()` terminates it
    (SIGTERM) once the results are in, and nothing of it runs then. Before, the steps its
    Recorder's thread had not written yet were lost (12 of 40 recorded), and `record` exited
    0. A pool worker writes each step before step() returns."""
    script = tmp_path / "train.py"
    script.write_text(IN_A_POOL)
    command = [sys.executable, str(script), start_method]
    result = record_done_here(monkeypatch, capfd, "--out", str(tmp_path / "run"), "--", *command)
    assert (result.stdout, result.returncode) == ("40\n", 0), result.stderr
    assert open_run(tmp_path / "run").step_numbers == list(range(40))


SPAWNS = textwrap.dedent(
    """
    import multiprocessing, torch

    def train(steps, value):
        model = torch.nn.Linear(2, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=value)
        for _ in range(steps):
            model(torch.randn(1, 2)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()

    if __name__ == "__main__":
        train(5, 0.1)
        child = multiprocessing.get_context("spawn").Process(target=train, args=(3, 0.5))
        child.start()
        child.join()
        train(2, 0.1)
        print("trained", flush=True)
    """
)


def test_force_replaces_the_run_once_not_again_from_a_process_the_command_starts(
    tmp_path, monkeypatch, capfd
):
    """--force is for the run the command finds: a worker the recording process spawns later
    (its own optimizer, rank 0 again) must not replace that process's finished steps. It
    cannot record beside them either (the parent's Recorder holds rank 0: `_writer_lock`): it
    warns, training goes on, and `record` says so: what happened and the ways out, where it
    said 'another Recorder, still open in another process; close it first' (a Recorder the
    user never made)."""
    script, out = tmp_path / "train.py", tmp_path / "run"
    script.write_text(SPAWNS)
    out.mkdir()
    (out / "old").write_text("a run that --force replaces")
    result = record_done_here(
        monkeypatch, capfd, "--out", str(out), "--force", "--", sys.executable, str(script)
    )
    assert "trained" in result.stdout
    assert result.returncode == 2, result.stderr
    _said_a_child_stepped(result.stderr)
    run = open_run(out)
    assert run.step_numbers == list(range(7))  # the parent's 5 + 2, none the worker's
    assert run.scalar_series("lr")[1].tolist() == [0.1] * 7


def _said_a_child_stepped(stderr: str) -> None:
    """`record`'s last line says that a child process of the command stepped an optimizer
    while the process it was started from records the run, and the ways out."""
    line = stderr.splitlines()[-1]
    assert line.startswith(
        "error: recording failed: an optimizer step in a child process: a child process of the "
        "command (pid "
    ), stderr
    assert re.search(
        r"started from pid (\d+)\) stepped an optimizer under `stabledrl record`'s optimizer "
        r"hooks while pid \1 records the run's optimizer: its steps are not recorded\. Record "
        r"with --no-optimizer-hooks, or have the workers not step optimizers, or record them "
        r"as ranks of their own \(Recorder\(path, world_size=N, rank=R\)\)$",
        line,
    ), stderr


CHILD_STEPS = textwrap.dedent(
    """
    import multiprocessing, sys, torch

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def train(steps, own):
        net = torch.nn.Linear(2, 1) if own else model
        opt = torch.optim.SGD(net.parameters(), lr=0.5) if own else optimizer
        for _ in range(steps):
            net(torch.randn(1, 2)).sum().backward()
            opt.step()
            opt.zero_grad()

    if __name__ == "__main__":
        first, own, start = int(sys.argv[1]), sys.argv[2] == "own", sys.argv[3]
        train(first, False)
        child = multiprocessing.get_context(start).Process(target=train, args=(3, own))
        child.start()
        child.join()
        train(2, False)
        print("trained", child.exitcode, flush=True)
    """
)


@pytest.mark.parametrize(
    ("start", "first", "optimizer"),
    [("fork", 5, "own"), ("fork", 5, "copy"), ("fork", 1, "copy"), ("spawn", 1, "own")],
)
def test_a_child_that_steps_records_nothing_and_says_so(
    tmp_path, monkeypatch, capfd, start, first, optimizer
):
    """A child started from the process whose optimizer is the run's records none of its
    steps. Before: forked, its own optimizer's steps were summarised into a run step it never
    takes (left out without a line, record exit 0); its copy of the run's optimizer wrote
    steps under the run's numbers. Started after the parent's first step (held, not written:
    the run not yet open), forked or spawned, it opened the run itself and recorded its 3
    steps as the run's (lr 0.5), the parent then refused (`already exists`) and its own steps
    lost. Now its first step turns recording off there, says why, record exits 2, and the
    run's steps are the parent's, all of them."""
    script, out = tmp_path / "train.py", tmp_path / "run"
    script.write_text(CHILD_STEPS)
    argv = [str(first), optimizer, start]
    result = record_done_here(
        monkeypatch, capfd, "--out", str(out), "--", sys.executable, str(script), *argv
    )
    assert "trained 0" in result.stdout
    assert result.returncode == 2, result.stderr
    _said_a_child_stepped(result.stderr)
    run = open_run(out)
    assert run.step_numbers == list(range(first + 2))
    assert run.scalar_series("lr")[1].tolist() == [0.1] * (first + 2)
