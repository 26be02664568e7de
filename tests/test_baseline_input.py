"""A hostile baseline file is a malformed baseline (exit 3, one line naming it), never a
crash: JSON nested past the parser's depth, NaN, or a file far larger than any baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _cli import run_cli
from _corpus import baseline_data
from typer.testing import CliRunner

from stabledrl_cli._version import __version__
from stabledrl_cli.cli import check
from stabledrl_cli.cli.app import app
from stabledrl_cli.errors import InputError
from stabledrl_cli.policies import MAX_POLICIES
from stabledrl_cli.replay.baseline_read import load_baseline

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "grpo"


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("nested", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("nan", json.dumps({"schema": "stabledrl-baseline"})[:-1] + ', "x": NaN}', "NaN"),
        ("huge", " " * (17 * 1024 * 1024) + "{}", "larger than"),
        # a baseline a CI step truncated: it read 'not valid JSON (Expecting value: line 1
        # column 1 (char 0))'
        ("empty", "", "unreadable baseline: empty, no JSON"),
        ("blank", " \n", "unreadable baseline: empty, no JSON"),
    ],
)
def test_a_hostile_baseline_exits_3_in_one_line(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    baseline = tmp_path / f"{name}.json"
    baseline.write_text(text)
    result = CliRunner().invoke(app, ["check", str(FIXTURE), "--baseline", str(baseline)])
    assert result.exit_code == 3, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(baseline) in lines[0] and message in lines[0]


def _baseline_with(path: tuple[str, ...], value: object) -> dict[str, object]:
    """A minimal valid baseline whose field at `path` is `value`."""
    data: dict[str, object] = baseline_data()
    entry: dict[str, object] = data
    for key in path[:-1]:
        child = entry[key]
        assert isinstance(child, dict)
        entry = child
    entry[path[-1]] = value
    return data


@pytest.mark.parametrize(
    "path",
    [
        ("policies", "grpo", "discard_frac", "value"),
        ("policies", "grpo", "discard_frac", "abs_tol"),
        ("policies", "grpo", "discard_frac", "rel_tol"),
        ("recorded", "grad_norm", "max", "value"),
        ("observed", "spike_steps", "value"),
        ("replay", "spike_factor"),
        ("replay", "window"),
        ("replay", "drift_threshold"),
        ("replay", "collapse_window"),
    ],
    ids=lambda path: ".".join(path),
)
@pytest.mark.parametrize("sign", [1, -1])
def test_an_integer_past_a_double_exits_3_naming_the_field(
    tmp_path: Path, path: tuple[str, ...], sign: int
) -> None:
    """JSON integers have no bound: 10**400 is a malformed baseline, never an OverflowError."""
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(_baseline_with(path, sign * 10**400)))
    result = CliRunner().invoke(app, ["check", str(FIXTURE), "--baseline", str(baseline)])
    assert result.exit_code == 3, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert f"{'.'.join(path)} must be a finite number" in lines[0], lines[0]


@pytest.mark.parametrize(
    "path",
    [
        ("policies", "grpo", "discard_frac", "value"),
        ("policies", "grpo", "discard_frac", "abs_tol"),
        ("recorded", "grad_norm", "max", "value"),
        ("observed", "spike_steps", "value"),
        ("replay", "drift_threshold"),
    ],
    ids=lambda path: ".".join(path),
)
@pytest.mark.parametrize("text", ["1e-400", "-2.5E-999"])
def test_a_number_too_small_for_a_float_exits_3_naming_the_field(
    tmp_path: Path, path: tuple[str, ...], text: str
) -> None:
    """A baseline's 1e-400 read as 0.0 (float() underflows): abs_tol 1e-400 was checked as
    'abs_tol 0', a value 1e-400 as 0. It is refused as spec values are, naming the field."""
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(_baseline_with(path, "X")).replace('"X"', text))
    result = CliRunner().invoke(app, ["check", str(FIXTURE), "--baseline", str(baseline)])
    assert result.exit_code == 3, result.output
    assert result.stderr.strip().splitlines() == [
        f"error: {baseline}: {'.'.join(path)}: '{text}' is too small for a float: it reads as 0"
    ]


@pytest.mark.parametrize("value", [1, 0.5, -3])
def test_a_baseline_spike_factor_of_at_most_one_exits_3_naming_it(
    tmp_path: Path, value: float
) -> None:
    """A baseline's replay.spike_factor of 1 or less was taken for the user's own: the line
    said '--spike-factor must be a finite number > 1', exit 2, for an option never given."""
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(_baseline_with(("replay", "spike_factor"), value)))
    result = CliRunner().invoke(app, ["check", str(FIXTURE), "--baseline", str(baseline)])
    assert result.exit_code == 3, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(baseline) in lines[0], result.stderr
    assert "replay.spike_factor must be a finite number > 1" in lines[0], lines[0]
    assert "--spike-factor" not in lines[0]


def test_a_baseline_that_is_a_directory_exits_3_naming_it(tmp_path: Path) -> None:
    """open() of the directory's descriptor failed before its type was checked: the line read
    'error: 3: Is a directory', naming a file descriptor instead of the path."""
    folder = tmp_path / "baseline.json"
    folder.mkdir()
    result = CliRunner().invoke(app, ["check", str(FIXTURE), "--baseline", str(folder)])
    assert result.exit_code == 3, result.output
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: {folder}: the baseline is not a file or a pipe"], result.stderr


LONG = "x" * 100_000
"""A value pasted by mistake: an error line quotes its start, never all of it."""


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("policies", "grpo", "discard_frac", "value"), LONG),
        (("policies", "grpo", "discard_frac", "worse"), [LONG]),
        (("policies", "grpo", LONG), {}),
        (("policies", LONG), {}),
        (("observed", LONG), {}),
        (("recorded", "grad_norm", LONG), {}),
        (("recorded", LONG), []),
        (("recorded", "a\nb"), []),
        (("replay", "spike_factor"), {"x": LONG}),
        (("strict",), LONG),
        (("version",), LONG),
        (("version",), int("9" * 4000)),
    ],
    ids=[
        "value",
        "worse",
        "metric",
        "policy",
        "observed",
        "statistic",
        "series",
        "series-newline",
        "replay",
        "strict",
        "version",
        "version-digits",
    ],
)
def test_a_bad_value_or_key_is_named_in_one_short_line(
    tmp_path: Path, path: tuple[str, ...], value: object
) -> None:
    """Every malformed-baseline message quoted the bad value or key whole (a 100 KB value made
    a 100 KB error line; a key holding a newline split it in two)."""
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(_baseline_with(path, value)))
    result = CliRunner().invoke(app, ["check", str(FIXTURE), "--baseline", str(baseline)])
    assert result.exit_code == 3, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(baseline) in lines[0], result.stderr
    assert len(lines[0]) < 400, lines[0][:400]


@pytest.mark.parametrize("key", ["steps", "training_steps"])
@pytest.mark.parametrize("steps", ["160", "a\nb", [160], True, -1, 1.5])
def test_a_run_step_count_of_a_wrong_type_exits_3_naming_it(
    tmp_path: Path, steps: object, key: str
) -> None:
    """run.steps was printed as it was in the step-count note ('the baseline's run had a',
    then a second line 'b: step counts are compared as they are'; "160" said the counts
    differ when they are equal) and the check went on. run.training_steps (a verl
    recording's) is read as steps are."""
    run = {"path": "x", "steps": 160, key: steps}
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(_baseline_with(("run",), run)))
    result = CliRunner().invoke(app, ["check", str(FIXTURE), "--baseline", str(baseline)])
    assert result.exit_code == 3, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"run.{key} must be" in lines[0], result.stderr


def test_a_baseline_without_policies_is_refused_saying_it_is_missing(tmp_path: Path) -> None:
    """No 'policies' key was refused as "'policies' must be an object of spec -> metrics", a
    line about a key the file does not have. It is required (docs/ci.md's table says so): the
    line says it is missing and that {} gates no policy, which a check then takes."""
    data = _baseline_with(("observed", "spike_steps", "value"), 100)
    del data["policies"], data["recorded"]
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(data))
    command = ["check", str(FIXTURE), "--baseline", str(baseline), "-p", "grpo"]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 3, result.output
    assert result.stderr.strip().splitlines() == [
        f"error: {baseline}: 'policies' is missing (policy spec -> metrics; {{}} when it gates "
        "no policy)"
    ]
    baseline.write_text(json.dumps({**data, "policies": {}}))
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output


def test_a_run_step_count_that_is_null_or_absent_is_no_note(tmp_path: Path) -> None:
    for run in ({"path": "x", "steps": None}, {"path": "x"}):
        baseline = tmp_path / "baseline.json"
        baseline.write_text(json.dumps(_baseline_with(("run",), run)))
        result = CliRunner().invoke(app, ["check", str(FIXTURE), "--baseline", str(baseline)])
        assert result.exit_code in (0, 1), result.output
        assert "note:" not in result.stderr


def test_a_baseline_policy_the_run_cannot_replay_exits_3_naming_the_baseline(
    tmp_path: Path,
) -> None:
    """A baseline written on a run of token units may name stabledrl:level=token; checked
    against a run of sequence units (another run), the refusal was the usage error of a
    --policy never given (exit 2, 'use level=seq'). It is the input's: exit 3, naming the
    baseline; given as --policy, it stays a usage error."""
    baseline = tmp_path / "baseline.json"
    data = _baseline_with(("policies",), {"stabledrl:level=token": {}})
    baseline.write_text(json.dumps(data))
    result = CliRunner().invoke(app, ["check", str(FIXTURE), "--baseline", str(baseline)])
    assert result.exit_code == 3, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(baseline) in lines[0], result.stderr
    assert "level=token needs token units" in lines[0]
    given = ["check", str(FIXTURE), "--max-collapsed", "0", "-p", "stabledrl:level=token"]
    assert CliRunner().invoke(app, given).exit_code == 2


def test_a_setting_that_differs_from_the_baseline_is_shown_to_the_digit(tmp_path: Path) -> None:
    """The refusal printed both values with %g (6 digits): '--spike-factor 10 differs from
    the baseline's 10' for a baseline of 10.0000001."""
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(_baseline_with(("replay", "spike_factor"), 10.0000001)))
    args = ["check", str(FIXTURE), "--baseline", str(baseline), "--spike-factor", "10"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "--spike-factor 10.0 differs from the baseline's 10.0000001" in result.stderr


@pytest.mark.parametrize(
    ("path", "shown"),
    [
        (("recoded",), ": unknown key 'recoded' (known: schema, "),
        (
            ("replay", "colapse_window"),
            ": replay: unknown key 'colapse_window' (known: spike_factor, ",
        ),
    ],
    ids=["top-level", "replay"],
)
def test_a_misspelt_key_exits_3_naming_it(
    tmp_path: Path, path: tuple[str, ...], shown: str
) -> None:
    """A misspelt key ("recoded" for "recorded") was dropped without a word, and the gates
    under it with it: the check passed gating nothing it was meant to. It is a malformed
    baseline (exit 3, one line naming the key). A tolerance keeps notes of its own."""
    data = _baseline_with(path, {"grad_norm": {"max": {"value": 0.0}}})
    data["observed"] = {"spike_steps": {"value": 0, "worse": "higher", "first": None}}
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(data))
    result = CliRunner().invoke(app, ["check", str(FIXTURE), "--baseline", str(baseline)])
    assert result.exit_code == 3, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {baseline}{shown}"), lines


def _many_policies(count: int) -> dict[str, object]:
    """A baseline naming `count` distinct, valid grpo settings."""
    gate = {"discard_frac": {"value": 0.1}}
    return _baseline_with(("policies",), {f"grpo:eps_low={(i + 1) / 10**5}": gate
                                          for i in range(count)})  # fmt: skip


def test_a_baseline_naming_more_policies_than_tune_takes_exits_3_before_replaying(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check -b replayed every policy a baseline names, unbounded: a crafted 16 MiB baseline of
    ~300k policies kept it running for hours (200 took 36 s). More than tune's cap is refused
    (exit 3, one line), before any replay; the cap itself is read."""
    monkeypatch.setattr(check, "replay_with_progress", _no_replay)
    baseline = tmp_path / "many.json"
    baseline.write_text(json.dumps(_many_policies(MAX_POLICIES + 1)))
    result = CliRunner().invoke(app, ["check", str(FIXTURE), "--baseline", str(baseline)])
    assert result.exit_code == 3, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line == (
        f"error: {baseline}: the baseline names {MAX_POLICIES + 1} policies; a check replays "
        f"at most {MAX_POLICIES}"
    )
    done = run_cli("check", FIXTURE, "--baseline", baseline, "--device", "cpu", timeout=120)
    assert (done.returncode, done.stderr.strip()) == (3, line), done.stderr
    at_most = tmp_path / "cap.json"
    at_most.write_text(json.dumps(_many_policies(MAX_POLICIES)))
    assert len(load_baseline(at_most).policies) == MAX_POLICIES


def _no_replay(*args: object, **kwargs: object) -> None:
    raise AssertionError("replayed")


@pytest.mark.parametrize(
    ("written_by", "named"),
    [
        ("99.0.0", True),
        (__version__, False),
        ("99.0.0.dev1", True),
        ("0.0.9", False),
        (None, False),
    ],
)
def test_a_baseline_a_newer_stabledrl_wrote_names_it_when_a_key_is_unknown_here(
    tmp_path: Path, written_by: str | None, named: bool
) -> None:
    """A baseline that a newer release wrote with a gate this one does not know (releases add
    observed figures and statistics within baseline version 1) was refused as "unknown
    observed metric 'new_figure' (known: ...)", read as a damaged file; the line now names the
    newer stabledrl that wrote it and says to upgrade (exit 3 as before)."""
    data = _baseline_with(("observed", "new_figure"), {"value": 0, "worse": "higher"})
    if written_by is not None:
        data["tool_version"] = written_by
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(data))
    with pytest.raises(InputError) as raised:
        load_baseline(baseline)
    assert raised.value.exit_code == 3
    assert str(raised.value).startswith(f"{baseline}: unknown observed metric 'new_figure' (known")
    hint = f"; the baseline was written by stabledrl 99.0.0, newer than this one ({__version__}): "
    assert (hint in str(raised.value)) == named
