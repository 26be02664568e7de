"""`stabledrl record --force` replaces the run that was there, once: a command that records
twice in a row (`python a.py && python b.py`, each with its own optimizer steps) keeps the
steps the first recorded. Before: the second process replaced them too (it inherits
$STABLEDRL_FORCE from the shell), exit 0 and a run of the second's 5 steps only, where
without --force the second is refused and the first's steps stay."""

from __future__ import annotations

import subprocess
import sys

from _cli import TIMEOUT, cli_command, cli_environment

from stabledrl_cli.capture.bootstrap import HOOKS_SOURCE
from stabledrl_cli.dump import Recorder, open_run

TRAIN = """
import sys, torch
model = torch.nn.Linear(2, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(int(sys.argv[1])):
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
"""


def _record(tmp_path, *options, command):
    return subprocess.run(
        [*cli_command("record", "--out", "run", *options), "--", *command],
        cwd=tmp_path, env=cli_environment(), capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip


def test_a_second_process_of_the_command_does_not_replace_the_firsts_steps(tmp_path):
    # the run of 7 optimizer steps record's hooks wrote before, written in this process
    with Recorder(tmp_path / "run", policy=None, source=HOOKS_SOURCE) as recorder:
        for step in range(7):
            recorder.log_step(step, grad_norm=1.0, lr=0.1)
    (tmp_path / "train.py").write_text(TRAIN)
    python = f"{sys.executable} train.py"
    done = _record(tmp_path, "--force", command=["sh", "-c", f"{python} 3 && {python} 5"])
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "already exists and is not empty" in errors[0], done.stderr
    run = open_run(tmp_path / "run")
    assert run.step_numbers == [0, 1, 2]  # the first process's: the old run's 7 are gone
    assert run.manifest.get("recording_closed") is True
