"""Steps the spike rule has not judged: a kind's first 5 finite, nonzero update norms.

Two example runs of other seeds part at step 0; `diff`'s table around it said `ok` for steps
0-3 (grad norms of 8e5 among them), and `replay --detail` showed no flag ('-') on them (update
norms of 6e4 against 0.03 later), though the spike rule judges a step only after 5 finite,
nonzero update norms before it: it had judged none of them. Such a step is `n/j` in both
tables, with a line saying why, `spike_judged` false in a replay's JSON step rows and, in
diff's, `risk` null with `risk_judged` false.
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


def test_replay_marks_the_steps_the_spike_rule_did_not_judge(tmp_path):
    run = _run(tmp_path / "a", parts_at=None)
    result = CliRunner().invoke(
        app, ["replay", str(run), "-p", "grpo", "--device", "cpu", "--format", "json"]
    )
    steps = json.loads(result.stdout)["policies"][0]["steps"]
    assert [row["spike_judged"] for row in steps] == [False] * 5 + [True] * (STEPS - 5)
    table = CliRunner().invoke(
        app, ["replay", str(run), "-p", "grpo", "--device", "cpu", "--detail"]
    )
    flags = {
        int(cells[0]): cells[-1]
        for line in table.stdout.splitlines()
        if len(cells := line.replace("│", " ").split()) > 1 and cells[0].isdigit()
    }
    assert flags == {n: "n/j" if n < 5 else "-" for n in range(STEPS)}
    assert "n/j: none, and the spike rule did not judge the step" in " ".join(table.stdout.split())
