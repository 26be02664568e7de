"""A policy's bias and spike counts of 0 on a run where their rules could judge no step are
said to be not judged (in the JSON summary's `unjudged` and under the replay table), not shown
as a clean bill: a one-step run showed every policy with bias 0 and risk 0."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app

runner = CliRunner()
DRIFT_AFTER = "the drift rule judges a step after 50 finite net_push values in a row, and "
SPIKE_AFTER = (
    "the spike rule judges a step after 5 finite, nonzero update norms of one kind, and the "
    "policy has "
)


def _run(path: Path, steps: int, *, overflow: bool = False) -> Path:
    """`steps` steps of 4 sequences of 6 tokens, ratios near 1; `overflow`: one token's new
    log-probability 200 above its old one, so an unclipped ratio is exp(200) (inf)."""
    rng = np.random.default_rng(0)
    with sd.Recorder(path, policy="grpo", unit="token") as recorder:
        for step in range(steps):
            old = -rng.random((4, 6)).astype(np.float32)
            new = old + 0.05 * rng.normal(size=(4, 6)).astype(np.float32)
            if overflow:
                new[0, 0] = old[0, 0] + 200.0
            recorder.log_step(
                step, logp_old=old, logp=new, mask=np.ones((4, 6), dtype=bool),
                group_id=np.arange(4) // 2, advantages=rng.normal(size=4).astype(np.float32),
                reward=rng.random(4).astype(np.float32),
            )  # fmt: skip
    return path


def _replay(run: Path, *args: str) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Each policy's `unjudged`, and the table's lines that say a rule did not judge."""
    as_json = runner.invoke(app, ["replay", str(run), *args, "--format", "json"])
    assert as_json.exit_code == 0, as_json.output
    policies = json.loads(as_json.stdout)["policies"]
    table = runner.invoke(app, ["replay", str(run), *args], env={"COLUMNS": "400"})
    assert table.exit_code == 0, table.output
    lines = [line for line in table.stdout.splitlines() if "not judged" in line and ":" in line]
    return {p["spec"]: p["summary"]["unjudged"] for p in policies}, [
        line for line in lines if line.startswith(("bias:", "risk:"))
    ]


def test_a_one_step_run_says_neither_bias_nor_spikes_were_judged(tmp_path: Path) -> None:
    unjudged, lines = _replay(_run(tmp_path / "run", 1), "-p", "grpo", "-p", "cispo")
    expected = {"drift": DRIFT_AFTER + "the run has 1 step", "spike": SPIKE_AFTER + "1"}
    assert unjudged == {"grpo": expected, "cispo": expected}
    assert lines == [
        f"bias: not judged ({expected['drift']}): its 0 says nothing",
        f"risk: spikes not judged ({expected['spike']}): it counts non-finite updates only",
    ]


def test_a_run_long_enough_for_both_rules_says_nothing_of_them(tmp_path: Path) -> None:
    unjudged, lines = _replay(_run(tmp_path / "run", 60), "-p", "grpo", "-p", "cispo")
    assert unjudged == {"grpo": {}, "cispo": {}}
    assert lines == []


def test_the_policies_a_rule_could_not_judge_are_named(tmp_path: Path) -> None:
    """exp(200) overflows: unclipped `is` has no finite update and grpo's unbounded A < 0
    side makes some updates non-finite, so their net_push has no finite window of 50;
    reinforce (no ratio) is judged by both rules."""
    run = _run(tmp_path / "run", 60, overflow=True)
    unjudged, lines = _replay(run, "-p", "grpo", "-p", "is", "-p", "reinforce")
    no_window = DRIFT_AFTER + "the policy's net_push has no such window"
    assert unjudged == {
        "grpo": {"drift": no_window},
        "is": {"drift": no_window, "spike": SPIKE_AFTER + "0"},
        "reinforce": {},
    }
    assert lines == [
        f"bias: not judged for grpo, is ({no_window}): its 0 says nothing",
        f"risk: spikes not judged for is ({SPIKE_AFTER}0): it counts non-finite updates only",
    ]
