"""A script that opens a Recorder of its own on `stabledrl record`'s --out, run with the
optimizer hooks on: one of the two Recorders of rank 0 is refused, and the line that says so
names the way out, `--no-optimizer-hooks`, rather than a Recorder the script never made."""

from __future__ import annotations

import pytest
from _record_here import record_python_here

from stabledrl_cli.dump import open_run

SCRIPT = """
import torch
import stabledrl_cli as sd

model = torch.nn.Linear(2, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

def train():
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()

for _ in range({warm_up}):
    train()
with sd.Recorder("run", unit="sequence") as rec:
    for step in range(3):
        rec.log_step(step, logp=[-1.0], logp_old=[-1.0], advantages=[1.0])
        train()
print("trained")
"""


@pytest.mark.parametrize(
    ("warm_up", "trained"),
    [(0, True), (2, False)],
    ids=["the script's Recorder first", "the hooks' run first"],
)
def test_the_refusal_names_no_optimizer_hooks(tmp_path, monkeypatch, capfd, warm_up, trained):
    """Before: 'run: rank 0 of this run is being recorded by another Recorder, still open in
    this process; close it first (a run takes one Recorder a rank), or record elsewhere', a
    Recorder the script cannot close (the hooks'), in the hooks' warning (the script's Recorder
    first) or as the script's own error (the hooks' run first, opened by the warm-up)."""
    script = SCRIPT.format(warm_up=warm_up)
    done, errors = record_python_here(monkeypatch, capfd, script, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert ("trained" in done.stdout) == trained
    assert len(errors) == 1 and errors[0].startswith("error: "), done.stderr
    assert errors[0].endswith(
        "still open in this process: `stabledrl record` records its --out with its optimizer "
        "hooks; a script that opens a Recorder of its own there runs under "
        "`stabledrl record --no-optimizer-hooks`"
    ), errors
    assert "close it first" not in done.stderr
    if warm_up:  # the way out, once: without the hooks a warm-up is plain torch (one rerun)
        rerun = tmp_path / "again"
        rerun.mkdir()
        done, errors = record_python_here(
            monkeypatch, capfd, script, "--no-optimizer-hooks", cwd=rerun
        )
        assert done.returncode == 0 and not errors, done.stderr
        assert open_run(rerun / "run").step_numbers == [0, 1, 2]
