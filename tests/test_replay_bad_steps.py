"""A step whose data a replay cannot use (a seq_id past int32, float16 geometry without its
scale, an archive entry out of range) is skipped like an unreadable step, never the end of the
command: `replay`, `check` and `watch --once` replay every other step, name the skipped step
once on stderr, and the step adds nothing to the run's figures; a run whose every step is bad
is exit 3 with one line (docs/trust.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _corpus import (
    archive_bad_seq_id,
    bad_seq_id,
    edit_manifest,
    float16_sketch_without_scale,
    read_step,
    rewrite_step,
    step_path,
    tiny_run,
)
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import open_run, pack_run
from stabledrl_cli.errors import InputError
from stabledrl_cli.replay import stream
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.engine import resolve_policies
from stabledrl_cli.replay.engines import LocalEngine
from stabledrl_cli.replay.watch import follow

runner = CliRunner()
STEPS = 6
BAD = 2


def measured_run(path: Path, steps: int = STEPS) -> Path:
    """A run whose every step is a noise-floor and collapse-warning measurement (inner_step 0)."""
    rng = np.random.default_rng(3)
    with sd.Recorder(path, policy="grpo", reward_range=(0.0, 1.0)) as rec:
        for step in range(steps):
            logp = -rng.random((4, 3)).astype(np.float32)
            rec.log_step(
                step,
                logp=logp,
                logp_old=logp + rng.normal(scale=0.1, size=(4, 3)).astype(np.float32),
                advantages=rng.standard_normal(4).astype(np.float32),
                mask=np.ones((4, 3)),
                group_id=np.array([0, 0, 1, 1]),
                reward=rng.random(4).astype(np.float32),
                grad_norm=1.0 + step,
                inner_step=0,
            )
    return path


def sketch_without_columns(run: Path, step: int) -> Path:
    """Step `step` given a float32 unit_grad_sketch of shape [U, 0], checksums valid: it
    measures no update, and its norms read 0 whatever the coefficients."""
    path = step_path(run, step)
    header, data = read_step(path)
    header["unit_grad_sketch"] = {
        "dtype": "F32",
        "shape": [int(np.prod(header["logp"]["shape"])), 0],
        "data_offsets": [len(data), len(data)],
    }
    rewrite_step(path, header, data)
    return run


def _stderr_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not line.startswith("replaying:")]


def _names_the_step_once(stderr: str, step: int, why: str) -> None:
    lines = [line for line in _stderr_lines(stderr) if f"step {step}:" in line]
    assert len(lines) == 1 and why in lines[0], stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda run: bad_seq_id(run, BAD), "seq_id must index"),
        (lambda run: float16_sketch_without_scale(run, BAD), "float16 gradient geometry"),
        (lambda run: sketch_without_columns(run, BAD), "unit_grad_sketch has no columns"),
    ],
    ids=["seq_id_past_int32", "float16_sketch_without_scale", "sketch_without_columns"],
)
def test_replay_check_and_watch_skip_a_bad_step_and_name_it_once(tmp_path, make, why):
    run = make(tiny_run(tmp_path / "run", steps=STEPS))
    replayed = runner.invoke(app, ["replay", str(run), "--format", "json", "--device", "cpu"])
    assert replayed.exit_code == 0, replayed.stderr
    assert json.loads(replayed.stdout)["steps"] == STEPS - 1
    _names_the_step_once(replayed.stderr, BAD, why)
    assert f"replayed {STEPS - 1}" in replayed.stderr

    checked = runner.invoke(
        app, ["check", str(run), "--max-nonfinite", "100", "--format", "json", "--device", "cpu"]
    )
    assert checked.exit_code == 0, checked.stderr
    assert json.loads(checked.stdout)["steps"] == STEPS - 1
    _names_the_step_once(checked.stderr, BAD, why)

    watched = runner.invoke(app, ["watch", str(run), "--once", "--format", "json"])
    assert watched.exit_code == 0, watched.stderr
    state = json.loads(watched.stdout)
    assert state["replayed_steps"] == STEPS - 1 and state["steps"] == STEPS
    assert state["scalar_steps"] == 0
    _names_the_step_once(watched.stderr, BAD, why)


def test_a_gate_still_decides_the_exit_code_with_a_bad_step(tmp_path):
    run = bad_seq_id(tiny_run(tmp_path / "run", steps=STEPS), BAD)
    tripped = runner.invoke(app, ["check", str(run), "--max-discard-frac", "0", "--device", "cpu"])
    assert tripped.exit_code == 1, tripped.stderr
    _names_the_step_once(tripped.stderr, BAD, "seq_id must index")


def test_a_bad_step_in_an_archive_is_skipped(tmp_path):
    run = tiny_run(tmp_path / "run", steps=STEPS)
    archive = tmp_path / "run.h5"
    pack_run(open_run(run), archive)
    import h5py

    with h5py.File(archive, "r+") as handle:
        archive_bad_seq_id(BAD)(handle)
    result = runner.invoke(app, ["replay", str(archive), "--format", "json", "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == STEPS - 1
    _names_the_step_once(result.stderr, BAD, "seq_id must index")


def test_the_float16_sketch_refusal_names_the_step(tmp_path):
    run = float16_sketch_without_scale(tiny_run(tmp_path / "run", steps=STEPS), BAD)
    result = sd.replay(run, ["grpo"], device="cpu")
    assert result.skipped == [
        f"step {BAD}: float16 gradient geometry without its per-step scale: refusing to read it "
        "(float16 overflows on spike steps)"
    ]


@pytest.mark.parametrize("command", ["replay", "check", "watch"])
def test_a_run_whose_every_step_is_bad_exits_3_with_one_line(tmp_path, command):
    run = bad_seq_id(tiny_run(tmp_path / "run", steps=3))
    args = {
        "replay": ["replay", str(run), "--device", "cpu"],
        "check": ["check", str(run), "--max-nonfinite", "100", "--device", "cpu"],
        "watch": ["watch", str(run), "--once"],
    }[command]
    result = runner.invoke(app, args)
    assert result.exit_code == 3, result.stderr
    assert result.stdout == ""
    lines = _stderr_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "no step could be read (3 steps were skipped: step 0: seq_id" in lines[0]
    with pytest.raises(InputError, match="no step could be read"):
        sd.replay(run, ["grpo"], device="cpu")


def test_a_bad_step_adds_nothing_to_the_run_figures(tmp_path):
    """The bad step's measurements are taken on the host before it is prepared: none may reach
    the noise floor or the collapse warning, whose figures equal those of the run without it."""
    bad = bad_seq_id(measured_run(tmp_path / "bad"), BAD)
    gap = measured_run(tmp_path / "gap")
    step_path(gap, BAD).unlink()
    streams = []
    for path in (bad, gap):
        run = open_run(path)
        policies, own = resolve_policies(run, ["grpo", "stabledrl"])
        streams.append(LocalEngine().stream(run, policies, own, ReplayConfig(device="cpu"), None))
    streamed, without = streams
    assert streamed.likelihood.steps == without.likelihood.steps
    assert BAD not in streamed.likelihood.steps and len(streamed.likelihood.steps) == STEPS - 1
    assert streamed.likelihood.values == without.likelihood.values
    assert streamed.noise_floor.parts == without.noise_floor.parts
    assert streamed.step_numbers.tolist() == without.step_numbers.tolist()
    np.testing.assert_array_equal(streamed.metrics, without.metrics)
    assert [n for n, _ in streamed.rejected] == [BAD] and without.rejected == ()
    replayed = sd.replay(bad, ["grpo"], device="cpu")
    assert replayed.observed.noise_floor_logratio_std == (
        sd.replay(gap, ["grpo"], device="cpu").observed.noise_floor_logratio_std
    )


def test_watch_reads_a_rejected_step_once(tmp_path, monkeypatch):
    """The run's last step is bad: later polls neither read it again nor warn again."""
    run = bad_seq_id(tiny_run(tmp_path / "run", steps=STEPS), STEPS - 1)
    streamed: list[list[int]] = []
    real = stream.stream_run

    def spy(run, *args, **kwargs):
        streamed.append(list(run.step_numbers))
        return real(run, *args, **kwargs)

    monkeypatch.setattr(stream, "stream_run", spy)  # imported where it runs
    watcher = follow.RunWatcher(run, ReplayConfig(device="cpu"))
    watcher.poll()
    assert watcher.replay is not None
    assert [n for n, _ in watcher.replay.rejected] == [STEPS - 1]
    watcher.poll()
    watcher.poll()
    assert streamed == [list(range(STEPS))]
    state = watcher.state()
    assert state.steps == STEPS and state.replayed_steps == STEPS - 1 and state.scalar_steps == 0
    assert state.last_step == STEPS - 1


def test_a_live_watch_warns_of_a_bad_step_once(tmp_path):
    run = bad_seq_id(tiny_run(tmp_path / "run", steps=STEPS), BAD)
    result = runner.invoke(app, ["watch", str(run), "--until-idle", "0.2", "--interval", "0.05"])
    assert result.exit_code == 0, result.stderr
    _names_the_step_once(result.stderr, BAD, "seq_id must index")


def test_a_live_watch_names_a_bad_step_that_lands_late_once(tmp_path, monkeypatch):
    """Bad steps 2 and 4, step 2's file landing after step 5 was read (out of order): the run
    is read again with it, and each bad step is named once. The live watch counted the steps
    it had named, so it named step 4 again and never step 2."""
    run = bad_seq_id(tiny_run(tmp_path / "run", steps=STEPS), 2, 4)
    edit_manifest(run, lambda manifest: manifest.pop("recording_closed"))
    late = step_path(run, 2)
    aside = tmp_path / late.name
    late.rename(aside)
    polls = {"n": 0}

    def between_polls(seconds: float) -> None:
        polls["n"] += 1
        if polls["n"] == 1:
            aside.rename(late)

    monkeypatch.setattr("stabledrl_cli.cli._watch_loop.time.sleep", between_polls)
    result = runner.invoke(app, ["watch", str(run), "--until-idle", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    assert f"stopped ({STEPS} steps seen)" in result.stderr
    _names_the_step_once(result.stderr, 2, "seq_id must index")
    _names_the_step_once(result.stderr, 4, "seq_id must index")


def _inspected(path: Path) -> tuple[dict[str, object], str]:
    """`inspect --format json`'s object and the table's text of a run (each exit 0)."""
    as_json = runner.invoke(app, ["inspect", str(path), "--format", "json"])
    assert as_json.exit_code == 0, as_json.stderr
    table = runner.invoke(app, ["inspect", str(path)], terminal_width=400)
    assert table.exit_code == 0, table.stderr
    return json.loads(as_json.stdout), table.stdout


def _packed_with_bad_seq_id(run: Path) -> Path:
    archive = run.with_suffix(".h5")
    pack_run(open_run(run), archive)
    import h5py

    with h5py.File(archive, "r+") as handle:
        archive_bad_seq_id(BAD)(handle)
    return archive


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda run: bad_seq_id(run, BAD), "seq_id must index"),
        (lambda run: float16_sketch_without_scale(run, BAD), "float16 gradient geometry"),
        (_packed_with_bad_seq_id, "seq_id must index"),
    ],
    ids=["seq_id_past_int32", "float16_sketch_without_scale", "archive_seq_id"],
)
def test_inspect_names_a_step_replay_would_skip(tmp_path, make, why):
    """inspect exits 0 and lists the step as a finding of its own, with replay's reason, as
    it lists an unreadable step; the run's integrity is not ok."""
    path = make(tiny_run(tmp_path / "run", steps=STEPS))
    replayed = sd.replay(path, ["grpo"], device="cpu")
    summary, table = _inspected(path)
    integrity = summary["integrity"]
    assert isinstance(integrity, dict) and integrity["ok"] is False
    assert integrity["findings"] == [
        {"kind": "invalid", "step": BAD, "path": None, "message": replayed.skipped[0]}
    ]
    assert why in replayed.skipped[0]
    assert "Integrity: 1 finding(s)" in table and "invalid" in table and why in table


def test_inspect_measures_nothing_on_a_step_replay_would_skip(tmp_path):
    """inspect's noise floor and collapse-warning figures are replay's: the bad step adds
    nothing to them (its recorded scalars still count, as in a replay)."""
    bad = bad_seq_id(measured_run(tmp_path / "bad"), BAD)
    gap = measured_run(tmp_path / "gap")
    step_path(gap, BAD).unlink()
    measured = ("noise_floor_logratio_std", "noise_floor_units", "collapse_warning")
    observed = [_inspected(path)[0]["observed"] for path in (bad, gap)]
    assert [{k: o[k] for k in measured} for o in observed] == [
        {k: observed[1][k] for k in measured}
    ] * 2
    assert observed[0]["noise_floor_logratio_std"] == (
        sd.replay(bad, ["grpo"], device="cpu").observed.noise_floor_logratio_std
    )


@pytest.mark.parametrize(
    ("spec", "why"),
    [("my-own-loss", "unknown policy 'my-own-loss'"), ("grpo:eps_low=-5", "eps_low must be")],
)
def test_a_recorded_policy_the_catalogue_cannot_replay_is_noted(tmp_path, spec, why):
    """The run's own policy was dropped without a word when the catalogue could not replay
    it (a custom one, a parameter out of range): no policy marked as the run's own, no loss
    parity, nothing said. One note says so now; a run whose policy it replays has none."""
    run = tmp_path / "run"
    rng = np.random.default_rng(0)
    with sd.Recorder(run, policy="grpo") as rec:
        for step in range(3):
            logp_old = -rng.random(4).astype(np.float32)
            advantages = np.array([1, -1, 1, -1], np.float32)
            rec.log_step(
                step, logp=logp_old + 0.01, logp_old=logp_old, advantages=advantages,
                seq_id=np.arange(4),
            )  # fmt: skip
    plain = runner.invoke(app, ["replay", str(run), "-p", "grpo"])
    assert plain.exit_code == 0 and "note: the run's own policy" not in plain.stderr
    edit_manifest(run, lambda m: m["policy"].update(spec=spec))
    noted = runner.invoke(app, ["replay", str(run), "-p", "grpo"])
    assert noted.exit_code == 0, noted.output
    text = " ".join(noted.stderr.split())  # the note wraps to the terminal
    start = f"note: the run's own policy '{spec}' is none the catalogue replays ("
    assert start in text and why in text, noted.stderr
    assert "); no policy is marked as the run's own" in text, noted.stderr


def _counted_run(path: Path) -> Path:
    """A sequence run of summed log-probs that records each sequence's token_count, step BAD's
    second count crafted to -3 (checksums valid): no Recorder writes one."""
    rng = np.random.default_rng(5)
    with sd.Recorder(path, unit="sequence", policy="grpo", reward_range=(0.0, 1.0)) as rec:
        for step in range(STEPS):
            counts = rng.integers(3, 9, size=4)
            summed = -counts * rng.random(4)
            rec.log_step(
                step,
                logp=summed,
                logp_old=summed,
                advantages=rng.standard_normal(4),
                reward=rng.random(4),
                token_count=counts,
                inner_step=0,
            )
    file = step_path(path, BAD)
    header, data = read_step(file)
    start = header["token_count"]["data_offsets"][0] + 4
    rewrite_step(file, header, data[:start] + np.int32(-3).tobytes() + data[start + 4 :])
    return path


def test_a_negative_token_count_is_a_step_replay_skips_in_one_line(tmp_path):
    """A crafted token_count below 0 would make a per-token likelihood of the wrong sign: the
    step is `invalid` (replay, check and watch skip it, naming it once on stderr; inspect
    lists it) and adds nothing to the collapse warning's measurements."""
    run = _counted_run(tmp_path / "run")
    why = "token_count holds -3"
    replayed = runner.invoke(app, ["replay", str(run), "--format", "json", "--device", "cpu"])
    assert replayed.exit_code == 0, replayed.stderr
    assert json.loads(replayed.stdout)["steps"] == STEPS - 1
    assert json.loads(replayed.stdout)["collapse_warning"]["measure"] == "token"
    _names_the_step_once(replayed.stderr, BAD, why)
    watched = runner.invoke(app, ["watch", str(run), "--once", "--format", "json"])
    assert watched.exit_code == 0, watched.stderr
    _names_the_step_once(watched.stderr, BAD, why)
    summary, table = _inspected(run)
    assert summary["integrity"]["findings"][0]["kind"] == "invalid"  # type: ignore[index]
    assert why in table
    assert summary["observed"]["collapse_warning"]["measure"] == "token"  # type: ignore[index]
