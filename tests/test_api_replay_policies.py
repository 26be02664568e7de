"""`replay()`'s `policies` taken from any iterable of specs, as from a list: a generator that
filters the specs down to nothing is refused as an empty list is (UsageError), not a
ValueError from inside the replay; bytes are no spec, named as bytes."""

from __future__ import annotations

import pytest

import stabledrl_cli as sd
from stabledrl_cli.errors import UsageError


@pytest.mark.parametrize(
    "empty", [lambda: [], lambda: iter([]), lambda: (s for s in ["grpo"] if 0)]
)
def test_no_policy_in_any_iterable_is_refused(grpo_fixture, empty):
    with pytest.raises(UsageError, match=r"no policy to replay \(an empty list\)"):
        sd.replay(grpo_fixture, empty(), device="cpu")


def test_a_generator_of_specs_replays_as_their_list(grpo_fixture):
    given = sd.replay(grpo_fixture, (s for s in ["grpo", "dapo"]), device="cpu")
    listed = sd.replay(grpo_fixture, ["grpo", "dapo"], device="cpu")
    assert given.to_dict() == listed.to_dict()


def test_bytes_are_refused_as_bytes(grpo_fixture):
    with pytest.raises(UsageError, match="a list of them, not bytes"):
        sd.replay(grpo_fixture, b"grpo", device="cpu")


def test_a_policy_is_found_by_the_spec_it_was_replayed_from(grpo_fixture):
    """`result.policy("grpo:eps_low=0.2")` after replaying that spec raised KeyError ("no
    policy ... it has ['grpo']"): it looked up only the canonical spec. The spec given, or the
    Policy, is found by its canonical spec; one not replayed is still a KeyError listing them."""
    given = ["grpo:eps_low=0.2", "dapo:eps_high=0.300", sd.get_policy("cispo")]
    result = sd.replay(grpo_fixture, given, device="cpu", step_range=(0, 2))
    assert [p.spec for p in result.policies] == ["grpo", "dapo:eps_high=0.3", "cispo"]
    for spec, policy in zip(given, result.policies, strict=True):
        assert result.policy(spec) is policy
    assert result.policy("grpo") is result.policies[0]
    for missing in ("ppo", "nope:x=1"):
        with pytest.raises(KeyError, match=r"it has \['grpo', 'dapo:eps_high=0.3', 'cispo'\]"):
            result.policy(missing)


def test_a_policys_series_reads_as_the_columns_its_indexing_names(grpo_fixture):
    """`series[name]` and `name in series` read a policy's series as a mapping of columns, but
    `list(series)` raised KeyError 0 (iteration fell back to indexing by integers) and an
    unknown column a bare KeyError 'nope'. Iterating gives the column names, in their order,
    and an unknown column's KeyError names the columns there are."""
    series = sd.replay(grpo_fixture, "grpo", device="cpu").policies[0].series
    names = list(series)
    assert names == list(series.columns) and names[0] == "step" and "update_norm" in names
    assert dict(zip(names, (series[n] for n in names), strict=True)).keys() == series.columns.keys()
    with pytest.raises(KeyError, match=r"no column 'nope'; the series has \['step', 'tokens'"):
        series["nope"]


def test_a_replay_result_shows_itself_in_one_line(grpo_fixture):
    """A notebook cell ending in `result` printed the dataclass's repr: 22,368 characters for
    the fixture's 160 steps and 10 policies (every parameter, summary, flagged step and
    observed series). It is one line naming the run, its steps and the policies, own and best."""
    result = sd.replay(grpo_fixture, device="cpu")
    shown = repr(result)
    specs = [p.spec for p in result.policies]
    assert len(specs) == 10 and len(shown) < 400 and "\n" not in shown, shown
    assert shown == (
        f"ReplayResult(run={result.run!r}, steps=160, policies={specs}, own='grpo', "
        f"best={result.best.spec if result.best else None!r})"
    )


def test_a_series_shows_its_steps_and_columns(grpo_fixture):
    """`result.policies[0].series` showed 'StepSeries(given=None)', as if it held nothing (its
    columns are derived when read). It names its steps and columns."""
    series = sd.replay(grpo_fixture, "grpo", device="cpu").policies[0].series
    shown = repr(series)
    assert shown.startswith("StepSeries(160 steps; columns: step, tokens, discarded,"), shown
    assert shown.endswith(")") and "given" not in shown and len(shown) < 1000


def test_a_policys_result_shows_itself_in_one_short_line(grpo_fixture):
    """`result.policies` (or `result.best`) printed each policy's dataclass repr: its every
    parameter and summary figure, and the lists of flagged steps (22,000 characters for the
    fixture's 10 policies). Each is one line: its spec, own and best, and its headline figures."""
    result = sd.replay(grpo_fixture, device="cpu")
    grpo = result.policy("grpo")
    summary = grpo.summary
    assert repr(grpo) == (
        f"PolicyResult(spec='grpo', own=True, best=False, "
        f"discard_frac={summary.discard_frac:.4g}, collapsed_steps={len(summary.collapsed_steps)}, "
        f"first_collapse={summary.first_collapse}, drift_steps={len(summary.drift_steps)})"
    )
    assert len(repr(result.policies)) < 2000
