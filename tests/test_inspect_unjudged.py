"""`inspect` says "not judged", with why, where a rule of the observed behaviour judged no
step, instead of "none" (which reads as a run that was judged and is fine): a run of one step,
a run whose every step is damaged."""

from __future__ import annotations

from _corpus import flip_bit, step_path, tiny_run
from _inspect import inspect_rows
from conftest import fixture_run

import stabledrl_cli as sd


def test_a_one_step_run_is_not_judged_collapse_free(tmp_path):
    rows = inspect_rows(tiny_run(tmp_path / "run", steps=1))
    assert rows["first reward collapse"].startswith(
        "not judged: the run's reward_mean has 1 finite value (one a rollout), no 10 in a row"
    )
    assert rows["collapse warning"].startswith(
        "not judged: the run has 1 own-sample likelihood (one a rollout"
    )
    assert rows["grad-norm spikes"].startswith("not judged: the run recorded 1 finite")
    assert rows["non-finite steps"] == "none"  # counted on its one step


def test_a_run_whose_every_step_is_damaged(tmp_path):
    run = tiny_run(tmp_path / "run", steps=3)
    for step in range(3):
        path = step_path(run, step)
        flip_bit(path, path.stat().st_size - 5)
    rows = inspect_rows(run)
    assert rows["steps"] == "0"
    assert rows["scored tokens / step"] == "n/a (no readable step)"
    for what in ("first reward collapse", "collapse warning", "grad-norm spikes",
                 "non-finite steps"):  # fmt: skip
        assert rows[what].startswith("not judged: "), (what, rows[what])


def test_a_judged_run_reads_as_before():
    rows = inspect_rows(fixture_run("grpo"))
    assert rows["first reward collapse"] == "step 132 (window 10)"
    assert rows["non-finite steps"] == "92, 93, 94, 95"
    assert rows["grad-norm spikes"].startswith("steps 29, 30, 31")


def test_a_run_without_steps_says_so(tmp_path):
    sd.Recorder(tmp_path / "run", policy="grpo").close()
    assert inspect_rows(tmp_path / "run")["scored tokens / step"] == "n/a (no step)"
