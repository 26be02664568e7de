"""`diff`'s side-by-side risk on steps the spike rule has not judged yet.

Two example runs of other seeds part at step 0; the table around it said `ok` for steps 0-3
(grad norms of 8e5 among them), though the spike rule judges a step only after 5 finite,
nonzero update norms before it: it had judged none of them. Such a step is `n/j` in the
table, with a line saying why, and `risk` null with `risk_judged` false in the JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app

STEPS = 12


def _run(path: Path, *, parts_at: int | None) -> Path:
    """A run of STEPS steps; from step `parts_at` on its log-probs are another draw's."""
    rng = np.random.default_rng(0)
    with sd.Recorder(path, policy="grpo") as rec:
        for step in range(STEPS):
            logp = -rng.random((4, 3)).astype(np.float32)
            if parts_at is not None and step >= parts_at:
                logp = logp - 0.5
            rec.log_step(
                step,
                logp=logp,
                logp_old=logp + 0.01,
                advantages=np.array([1.0, -1.0, 0.5, -0.5], dtype=np.float32),
                mask=np.ones((4, 3)),
                group_id=np.array([0, 0, 1, 1]),
                reward=np.array([1.0, 0.0, 1.0, 0.0], dtype=np.float32),
                grad_norm=1.0,
            )
    return path


def _diff(a: Path, b: Path, *extra: str):
    return CliRunner().invoke(app, ["diff", str(a), str(b), "--device", "cpu", *extra])


def test_steps_before_the_spike_rule_judges_are_not_called_ok(tmp_path):
    a = _run(tmp_path / "a", parts_at=None)
    b = _run(tmp_path / "b", parts_at=0)
    data = json.loads(_diff(a, b, "--format", "json").stdout)
    assert data["parted_at"] == 0
    assert [row["step"] for row in data["around"]] == [0, 1, 2, 3]
    for row in data["around"]:
        for side in (row["a"], row["b"]):
            assert (side["risk"], side["risk_judged"]) == (None, False)
    text = _diff(a, b)
    assert text.exit_code == 1, text.output
    rows = [line.split() for line in text.stdout.splitlines() if line.split()[:1] == ["0"]]
    assert rows and rows[0][-2:] == ["n/j", "n/j"]
    assert " ok" not in text.stdout
    assert "n/j: not judged, the spike rule judges a step after 5 finite" in " ".join(
        text.stdout.split()
    )


def test_steps_the_spike_rule_judged_show_their_risk(tmp_path):
    a = _run(tmp_path / "a", parts_at=None)
    b = _run(tmp_path / "b", parts_at=8)
    data = json.loads(_diff(a, b, "--format", "json").stdout)
    assert data["parted_at"] == 8
    assert [row["step"] for row in data["around"]] == [5, 6, 7, 8, 9, 10, 11]
    for row in data["around"]:
        for side in (row["a"], row["b"]):
            assert side["risk_judged"] is True and side["risk"] is False
    text = _diff(a, b)
    assert "n/j" not in text.stdout and " ok" in text.stdout
