"""Gates and baselines on policies with non-finite replayed updates: a tolerance that could
never trip is refused, and `--write-baseline` writes none."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app
from stabledrl_cli.replay import columns
from stabledrl_cli.replay.baseline import check_settings
from stabledrl_cli.replay.baseline_read import load_baseline
from stabledrl_cli.replay.baseline_write import baseline_dict, write_baseline
from stabledrl_cli.replay.engine import replay
from stabledrl_cli.replay.evaluation import evaluate
from stabledrl_cli.replay.gate import Gates
from stabledrl_cli.replay.gate import absolute as _absolute

runner = CliRunner()


def _run(path, nan_steps: range | list[int]):
    """12 steps of 4 sequences of 6 tokens, every new log-probability NaN at `nan_steps`."""
    rng = np.random.default_rng(0)
    shape, groups = (4, 6), np.arange(4) // 2
    with sd.Recorder(path, policy="grpo", unit="token") as recorder:
        for step in range(12):
            old = -rng.random(shape).astype(np.float32)
            new = np.full(shape, np.nan, np.float32) if step in nan_steps else old + 0.01
            recorder.log_step(step, logp_old=old, logp=new, mask=np.ones(shape, dtype=bool),
                              group_id=groups, advantages=rng.normal(size=4).astype(np.float32),
                              reward=rng.random(4).astype(np.float32))  # fmt: skip
    return path


def _check(*args: str):
    return runner.invoke(app, ["check", *args, "--format", "json"])


def test_a_null_tolerance_worse_when_higher_is_refused(tmp_path):
    """`update_norm_max: {"value": null}` (infinity, worse higher) passed any run, exit 0:
    no figure is above infinity. The baseline is now malformed, exit 3, naming the entry."""
    run = _run(tmp_path / "run", [])
    baseline = tmp_path / "b.json"
    assert _check(str(run), "-p", "grpo", "--write-baseline", str(baseline)).exit_code == 0
    data = json.loads(baseline.read_text())
    data["policies"]["grpo"]["update_norm_max"]["value"] = None
    baseline.write_text(json.dumps(data))
    result = _check(str(run), "-b", str(baseline))
    assert result.exit_code == 3, result.output
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {baseline}: policies.grpo.update_norm_max: a null value (infinity) with "
        "worse 'higher' passes any figure, a gate that could never trip: give a finite value, "
        "or leave the entry out"
    )


def test_write_baseline_leaves_out_what_a_policy_without_a_finite_update_cannot_gate(tmp_path):
    """It wrote update_norm_median/max as null (never trips) and discard_frac 0, drift_steps 0
    (which trip baseline.present on the very run they came from): now only collapsed_steps,
    and the run passes its own baseline."""
    run = _run(tmp_path / "nan", range(12))
    baseline = tmp_path / "b.json"
    result = _check(str(run), "-p", "grpo", "--write-baseline", str(baseline))
    assert result.exit_code == 0, result.output
    written = json.loads(baseline.read_text())["policies"]["grpo"]
    assert "collapsed_steps" in written
    for name in ("update_norm_median", "update_norm_max", "discard_frac", "drift_steps"):
        assert name not in written
    assert all(entry["value"] is not None for entry in written.values())
    result = _check(str(run), "-b", str(baseline))
    assert result.exit_code == 0, result.output


def _discard_gate(run, limit: str) -> tuple[int, dict[str, object]]:
    result = _check(str(run), "-p", "grpo", "--max-discard-frac", limit)
    (gate,) = json.loads(result.stdout)["gates"]
    return result.exit_code, gate


def test_max_discard_frac_counts_the_tokens_of_non_finite_steps_as_discarded(tmp_path):
    """Half the steps NaN: discard_frac 0 passed --max-discard-frac 0.1 (exit 0), the NaN
    steps' tokens in the denominator and none of them discarded. Now they count as discarded
    (the most the policy can have discarded): 0.5 trips; one NaN step in 12 still passes."""
    code, gate = _discard_gate(_run(tmp_path / "half", range(0, 12, 2)), "0.1")
    assert (code, gate["ok"], gate["figure"]) == (1, False, 0.5)
    assert gate["message"] == (
        "discard_frac at most 0.5, counting the 144 tokens of 6 steps with a non-finite "
        "update as discarded (0 without them), limit 0.1"
    )
    code, gate = _discard_gate(_run(tmp_path / "one", [5]), "0.1")
    assert (code, gate["ok"]) == (0, True)
    assert gate["figure"] == 24 / 288
    code, gate = _discard_gate(_run(tmp_path / "none", []), "0")
    assert (code, gate["ok"], gate["message"]) == (0, True, "discard_frac 0, limit 0")


def test_a_tolerance_whose_limit_overflows_is_refused(tmp_path):
    """update_norm_max 10 with rel_tol 1e308 made the limit inf: no figure, not even none
    (inf), was above it, so the gate passed any run (exit 0). Now the baseline is malformed,
    exit 3."""
    run = _run(tmp_path / "run", [])
    baseline = tmp_path / "b.json"
    assert _check(str(run), "-p", "grpo", "--write-baseline", str(baseline)).exit_code == 0
    data = json.loads(baseline.read_text())
    data["policies"]["grpo"]["update_norm_max"].update(value=10.0, rel_tol=1e308)
    baseline.write_text(json.dumps(data))
    result = _check(str(run), "-b", str(baseline))
    assert result.exit_code == 3, result.output
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "policies.grpo.update_norm_max: value 10 with abs_tol 0 and rel_tol 1e+308 puts the "
            "limit past the largest float, a gate that could never trip"
        )
    )


def _lower_column(derive):
    """A gated column worse when lower (none is built in; a project may declare one)."""
    return columns.Column(
        name="kept_norm",
        kind="float",
        meaning="a test column, worse when lower",
        derive=derive,
        gate=columns.ColumnGate(aggregate="max", worse="lower", rel_tol=0.1),
    )


def test_a_figure_worse_when_lower_with_no_finite_value_trips(tmp_path, monkeypatch):
    """No finite value of a figure worse when lower read as infinity, the best there is: the
    baseline gate passed. It now trips baseline.present, and --write-baseline leaves such a
    figure out rather than write null."""

    run = _run(tmp_path / "run", [])
    plain = columns.COLUMNS
    finite = _lower_column(lambda inputs: inputs.float("update_norm"))
    monkeypatch.setattr(columns, "COLUMNS", (*plain, finite))
    write_baseline(baseline_dict(replay(run, ["grpo"]), check_settings(None)), tmp_path / "b.json")
    baseline = load_baseline(tmp_path / "b.json")
    assert baseline.policies["grpo"]["kept_norm_max"].value is not None
    nan = _lower_column(lambda inputs: inputs.float("update_norm") * np.nan)
    monkeypatch.setattr(columns, "COLUMNS", (*plain, nan))
    today = replay(run, ["grpo"])
    tripped = [(g.gate, g.message) for g in evaluate(today, Gates(), baseline) if not g.ok]
    assert tripped == [
        (
            "baseline.present",
            "kept_norm_max is in the baseline, but 'grpo' has no finite value of it",
        )
    ]
    assert "kept_norm_max" not in baseline_dict(today, check_settings(None))["policies"]["grpo"]


def test_max_discard_frac_on_a_policy_without_tokens_is_zero_not_an_error():
    """A non-finite step among steps with no eligible token: 0 / 0 raised ZeroDivisionError
    (a traceback); with nothing to discard the figure is 0, as the summary's."""
    policy = SimpleNamespace(
        spec="grpo",
        summary=SimpleNamespace(discard_frac=0.0, collapsed_steps=[]),
        series={"nonfinite": [True, False], "tokens": [0, 0], "discarded": [0, 0]},
    )
    (gate,) = _absolute(policy, Gates(max_discard_frac=0.0))
    assert (gate.ok, gate.figure) == (True, 0.0)
