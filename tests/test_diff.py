"""`stabledrl diff`: where two real recorded runs of the built-in example part.

Same seed twice: identical. Another seed: the inputs part at step 0. A resume from a checkpoint
under the run's own policy: equal on every step it holds. A branch under another policy: the
scalars (loss, grad norm) part at the branch point, the log-probs one step later. A doctored
log-prob: the runs part exactly there.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli import run_cli, run_cli_together
from _corpus import flip_bit, read_step, rewrite_step, step_path, tiny_run
from conftest import fixture_run
from typer.testing import CliRunner

from stabledrl_cli.capture.branch_protocol import checkpoints_dir
from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import Recorder, open_run, pack_run
from stabledrl_cli.example import ExampleConfig
from stabledrl_cli.example.checkpoint import CheckpointPlan, load_checkpoint
from stabledrl_cli.example.run_setup import recorder_kwargs
from stabledrl_cli.example.trainer import train
from stabledrl_cli.policies import get_policy
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.diff import diff_runs
from stabledrl_cli.replay.diff.figures import FIGURES

CONFIG = ExampleConfig(seed=2, steps=12, pretrain_steps=10)
CPU = ReplayConfig(device="cpu")


def _record(out: Path, config: ExampleConfig, **kwargs: object) -> Path:
    policy = get_policy(config.policy)
    with Recorder(out, **recorder_kwargs(config, policy)) as recorder:
        train(config, recorder=recorder, **kwargs)  # type: ignore[arg-type]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Fresh example runs: the original (checkpoints every 4 steps), its twin (same seed), one
    of another seed, a resume at step 4 under its own policy, a branch at 4 under stabledrl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("diff")
    try:
        original = _record(
            root / "original",
            CONFIG,
            checkpoints=CheckpointPlan(directory=checkpoints_dir(root / "original"), every=4),
        )
        state = load_checkpoint(checkpoints_dir(original) / "step-00000004.pt")
        other = ExampleConfig(seed=3, steps=12, pretrain_steps=10)
        branch = ExampleConfig(seed=2, steps=12, pretrain_steps=10, policy="stabledrl")
        return {
            "original": original,
            "twin": _record(root / "twin", CONFIG),
            "seed3": _record(root / "seed3", other),
            "resumed": _record(root / "resumed", CONFIG, resume=state),
            "branch": _record(root / "branch", branch, resume=state),
        }
    finally:
        torch.set_num_threads(threads)


def _diff(a: Path, b: Path, **kwargs: object):
    return diff_runs(open_run(a), open_run(b), config=CPU, **kwargs)  # type: ignore[arg-type]


def _cli(*args: object) -> tuple[int, dict]:
    result = CliRunner().invoke(app, ["diff", *map(str, args), "--device", "cpu", "-f", "json"])
    return result.exit_code, json.loads(result.stdout)


def test_the_same_seed_twice_is_identical(runs):
    result = _diff(runs["original"], runs["twin"])
    assert result.identical and result.parted_at is None
    assert result.compared == result.common == 12
    assert all(p is None for p in result.first.values())
    assert result.around == []
    code, data = _cli(runs["original"], runs["twin"])
    assert code == 0 and data["identical"] and data["parted_at"] is None


def test_another_seed_parts_at_step_0_in_its_inputs(runs):
    result = _diff(runs["original"], runs["seed3"])
    assert result.parted_at == 0
    inputs = result.first["inputs"]
    assert inputs is not None and inputs.step == 0
    assert {"reward", "advantages"} & {d.field for d in inputs.fields}
    assert result.compared == 1  # every kind parted at the first step: nothing more read
    assert [row.step for row in result.around] == [0, 1, 2, 3]
    code, data = _cli(runs["original"], runs["seed3"])
    assert code == 1 and data["parted_before_until"]
    assert data["first"]["inputs"]["step"] == 0


def test_a_resume_under_its_own_policy_matches_its_original(runs):
    result = _diff(runs["original"], runs["resumed"])
    assert result.parted_at is None and result.first["arrays"] is None
    assert result.only_a == [(0, 3)] and result.only_b == []
    assert result.common == 8 and not result.identical  # steps 0-3 are in the original only
    code, data = _cli(runs["original"], runs["resumed"], "--until", 12)
    assert code == 0 and data["only_a"] == [[0, 3]]


def test_a_branch_under_another_policy_parts_at_the_branch_point(runs):
    result = _diff(runs["original"], runs["branch"])
    # Same parameters and batch at step 4: inputs and log-probs equal, the update differs.
    assert result.parted_at == 4
    scalars = result.first["scalars"]
    assert scalars is not None and scalars.step == 4
    assert {"loss", "grad_norm"} <= {d.field for d in scalars.fields}
    logprobs = result.first["logprobs"]
    assert logprobs is not None and logprobs.step == 5
    assert result.own_policy == {"a": "grpo", "b": "stabledrl"}
    assert [row.step for row in result.around] == [4, 5, 6, 7]
    for row in result.around:
        assert set(row.a) == set(FIGURES) == set(row.b)
        assert (
            row.a["reward_mean"] == open_run(runs["original"]).step(row.step).scalars["reward_mean"]
        )
    assert _cli(runs["original"], runs["branch"], "--until", 4)[0] == 0  # parts at 4, not before
    assert _cli(runs["original"], runs["branch"], "--until", 5)[0] == 1


def _doctor_logp(run: Path, step: int, index: int, delta: float) -> None:
    """Adds `delta` to logp[index] of a step, the file rewritten with valid checksums."""
    path = step_path(run, step)
    header, data = read_step(path)
    start = header["logp"]["data_offsets"][0] + 4 * index
    (value,) = struct.unpack("<f", data[start : start + 4])
    patched = data[:start] + struct.pack("<f", value + delta) + data[start + 4 :]
    rewrite_step(path, header, patched)


def test_a_doctored_log_prob_parts_exactly_there(runs, tmp_path):
    doctored = tmp_path / "doctored"
    shutil.copytree(runs["original"], doctored)
    _doctor_logp(doctored, 7, 5, 1e-3)
    result = _diff(runs["original"], doctored)
    assert result.parted_at == 7 and result.first["inputs"] is None
    logprobs = result.first["logprobs"]
    assert logprobs is not None and logprobs.step == 7
    [difference] = logprobs.fields
    assert difference.field == "logp" and difference.what.startswith("1 of 64 differ, first at 5")
    assert [row.step for row in result.around] == [4, 5, 6, 7, 8, 9, 10]
    assert result.first["arrays"] is not None and result.first["arrays"].step == 7
    # Within tolerance the log-probs agree; the bits still differ.
    loose = _diff(runs["original"], doctored, atol=1e-2)
    assert loose.parted_at is None and loose.first["arrays"] is not None
    assert _cli(runs["original"], doctored, "--until", 7)[0] == 0
    assert _cli(runs["original"], doctored, "--until", 8)[0] == 1
    assert _cli(runs["original"], doctored, "--atol", 1e-2)[0] == 0


def test_the_table_reads_at_80_columns(runs, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    result = CliRunner().invoke(
        app, ["diff", str(runs["original"]), str(runs["branch"]), "--device", "cpu"]
    )
    assert result.exit_code == 1
    text = result.stdout
    assert "parted at step 4" in text and "scalars     part at step 4" in text
    assert "log-probs   part at step 5" in text
    assert "(A grpo, B stabledrl)" in text
    assert max(len(line) for line in text.splitlines()[-6:]) <= 80


def test_the_fixtures_part_at_step_0_in_their_scalars():
    result = diff_runs(
        open_run(fixture_run("grpo")), open_run(fixture_run("stabledrl")), config=CPU, context=1
    )
    # Same seed and batch at step 0, another policy's update: loss and grad norm part first.
    assert result.parted_at == 0
    assert result.first["scalars"] is not None and result.first["scalars"].step == 0
    assert result.first["inputs"] is not None and result.first["inputs"].step > 0
    row0 = result.around[0]
    assert row0.a["discard_frac"] != row0.b["discard_frac"]
    assert np.isclose(row0.a["grad_norm"], 64.9191589)  # type: ignore[arg-type]


def test_a_run_and_its_packed_archive_are_identical(grpo_fixture, tmp_path):
    archive = tmp_path / "grpo.h5"
    pack_run(open_run(grpo_fixture), archive)
    result = diff_runs(open_run(grpo_fixture), open_run(archive), config=CPU)
    assert result.identical and result.compared == 160


def test_exit_codes_in_a_real_process(runs, tmp_path):
    a, b = runs["original"], runs["branch"]
    apart = tmp_path / "apart"
    with Recorder(apart, policy="grpo", unit="sequence") as rec:  # the example's unit
        rec.log_step(99, logp=np.zeros(2), logp_old=np.zeros(2), advantages=np.ones(2))
    twins, parted, negative, missing = run_cli_together(
        ["diff", a, runs["twin"], "--device", "cpu"],
        ["diff", a, b, "--device", "cpu"],
        ["diff", a, b, "--atol", "-1"],
        ["diff", a, tmp_path / "nope"],
    )  # a process of its own for each exit code; a second way to exit 3 in this one:
    disjoint = CliRunner().invoke(app, ["diff", str(a), str(apart)])
    assert twins.returncode == 0 and parted.returncode == 1
    assert negative.returncode == 2 and "atol" in negative.stderr
    assert missing.returncode == 3 and "no such run" in missing.stderr
    assert disjoint.exit_code == 3 and "share no step" in disjoint.stderr
    assert disjoint.stderr.count("\n") == 1


def test_two_fresh_records_of_one_seed_are_identical(tmp_path):
    """`stabledrl record` twice with one seed (threads 1), once in a process of its own and
    once in this one: every array equal, bit for bit."""
    outs = [tmp_path / name for name in ("first", "second")]
    args = ["record", "--rl-steps", "6", "--seed", "5", "--device", "cpu", "--out"]
    fresh = run_cli(*args, outs[0])
    assert fresh.returncode == 0, fresh.stderr
    here = CliRunner().invoke(app, [*args, str(outs[1])])
    assert here.exit_code == 0, here.stderr
    done = CliRunner().invoke(app, ["diff", *map(str, outs), "--until", "6", "--format", "json"])
    assert done.exit_code == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["identical"] and data["compared"] == 6


def _scalar_only(path: Path, grad_norms: list[float]) -> Path:
    """A run of scalar steps (no array at all) with these recorded grad norms."""
    with Recorder(path, policy=None, reward_range=(0.0, 1.0)) as recorder:
        for step, norm in enumerate(grad_norms):
            recorder.log_step(step, grad_norm=norm, loss=0.5, reward_mean=0.5)
    return path


@pytest.mark.parametrize(
    ("other", "code", "parted_at"),
    [(2.0, 1, 1), (1.0 + 1e-9, 0, None)],
    ids=["parting", "within-tolerance"],
)
def test_runs_whose_scalars_differ_are_never_called_identical(tmp_path, other, code, parted_at):
    """Scalar steps have no array: a scalar that differs (beyond the tolerance or only in its
    bits) still makes the runs not identical (it was `identical` beside a parting, exit 1)."""
    a = _scalar_only(tmp_path / "a", [1.0, 1.0, 1.0])
    b = _scalar_only(tmp_path / "b", [1.0, other, 1.0])
    exit_code, data = _cli(a, b)
    assert (exit_code, data["parted_at"], data["identical"]) == (code, parted_at, False)
    assert data["first"]["arrays"]["step"] == 1
    # the bits' difference is shown with the digits that tell the two apart
    assert data["first"]["arrays"]["fields"][0]["what"] == f"1.0 vs {other!r}"
    text = CliRunner().invoke(app, ["diff", str(a), str(b), "--device", "cpu"]).stdout
    assert "identical" not in text


def test_runs_equal_within_the_tolerance_show_the_steps_around_their_first_bits(tmp_path):
    """Runs that never part but differ in their bits (another thread count): the figures are
    set side by side around the first step whose bits differ, and the table's title names it.
    The title said 'around step :' with no step."""
    a = _scalar_only(tmp_path / "a", [1.0, 1.0, 1.0])
    b = _scalar_only(tmp_path / "b", [1.0, 1.0 + 1e-9, 1.0])
    result = CliRunner().invoke(app, ["diff", str(a), str(b), "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    assert "they never part: bits first differ at step 1" in result.stdout
    assert "around step 1: discard and risk" in result.stdout


def test_bits_that_differ_within_the_tolerance_are_not_called_a_parting(tmp_path):
    """Bits that differ within the tolerance are not a parting: the arrays line said 'arrays
    part at step 1' above 'they never part', a contradiction. It says they differ there, and
    the verdict says where the bits first differ and that every value is within the tolerance."""
    a = _scalar_only(tmp_path / "a", [1.0, 1.0, 1.0])
    b = _scalar_only(tmp_path / "b", [1.0, 1.0 + 1e-9, 1.0])
    result = CliRunner().invoke(app, ["diff", str(a), str(b), "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "arrays      differ at step 1" in lines
    assert not [line for line in lines if " part at step" in line]
    assert "they never part: bits first differ at step 1, within atol 1e-06, rtol 1e-05" in lines


def _series_run(path: Path, **changed: float) -> Path:
    """A scalar run of 3 steps recording the format 1.2 series scalars; step 1 records
    `changed` in place of their usual values."""
    usual = {"entropy": 0.5, "kl": 0.01, "clip_frac": 0.1, "nonfinite_grads": 0.0}
    with Recorder(path, policy=None) as recorder:
        for step in range(3):
            values = {**usual, "step_time": 0.1 + step, **(changed if step == 1 else {})}
            recorder.log_step(step, grad_norm=1.0, **values)  # type: ignore[arg-type]
    return path


@pytest.mark.parametrize("name", ["entropy", "kl", "clip_frac", "nonfinite_grads"])
def test_runs_whose_series_scalars_differ_part_where_they_do(tmp_path, name):
    """The format 1.2 standard scalars (an optimizer-hook recording's nonfinite_grads, an
    imported log's kl or entropy) are training scalars too: runs that differ in one part there.
    They were not compared: such runs were 'identical' (exit 0)."""
    a = _series_run(tmp_path / "a")
    b = _series_run(tmp_path / "b", **{name: 3.0})
    exit_code, data = _cli(a, b)
    assert (exit_code, data["parted_at"], data["identical"]) == (1, 1, False)
    assert [f["field"] for f in data["first"]["scalars"]["fields"]] == [name]


def test_runs_whose_step_times_differ_are_identical(tmp_path):
    """step_time is a clock reading, as wall_time: two recordings of one training differ in
    it, and it is not compared."""
    a = _series_run(tmp_path / "a")
    b = _series_run(tmp_path / "b", step_time=9.0)
    exit_code, data = _cli(a, b)
    assert (exit_code, data["identical"]) == (0, True)


def _normalized_run(path: Path, scales: list[float]) -> Path:
    """A grpo:agg=recorded run whose steps divide their terms by `scales`, one a step."""
    with Recorder(path, policy="grpo:agg=recorded") as recorder:
        for step, scale in enumerate(scales):
            logp = np.full((2, 3), -1.0, np.float32)
            recorder.log_step(
                step,
                logp=logp,
                logp_old=logp,
                advantages=np.array([1.0, -1.0], np.float32),
                loss_scale=np.full((2, 3), scale, np.float32),
            )
    return path


def test_runs_whose_loss_normalizer_differs_part_in_their_inputs(tmp_path):
    """loss_scale is what training divided each term by: another normalizer is another update
    (agg=recorded replays it). Runs that differed only there 'never part' (exit 0)."""
    a = _normalized_run(tmp_path / "a", [6.0, 6.0, 6.0])
    b = _normalized_run(tmp_path / "b", [6.0, 12.0, 12.0])
    exit_code, data = _cli(a, b)
    assert (exit_code, data["parted_at"]) == (1, 1)
    assert [f["field"] for f in data["first"]["inputs"]["fields"]] == ["loss_scale"]


def test_steps_in_one_run_only_are_cut_in_the_table_not_in_the_json(tmp_path):
    """Every step against every other one: a range a step. The line listed them all (50,000
    of them for a 100,000-step run, one line of 400 KB)."""
    a = _scalar_only(tmp_path / "a", [1.0] * 40)
    b = tmp_path / "b"
    with Recorder(b, policy=None, reward_range=(0.0, 1.0)) as recorder:
        for step in range(0, 40, 2):
            recorder.log_step(step, grad_norm=1.0, loss=0.5, reward_mean=0.5)
    result = CliRunner().invoke(app, ["diff", str(a), str(b), "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("only in A")]
    assert line == "only in A: 1, 3, 5, 7, 9, 11, 13, 15 (+12 more: --format json has them all)"
    assert _cli(a, b)[1]["only_a"] == [[n, n] for n in range(1, 40, 2)]


def test_a_torn_step_file_is_named_on_stderr_not_passed_off_as_missing(grpo_fixture, tmp_path):
    """Step files the reader skips at its header check (here torn, as a crash under a final
    name leaves them) are warned about, as docs/diff.md says; they were silently listed as
    steps only the other run holds."""
    torn = tmp_path / "torn"
    shutil.copytree(grpo_fixture, torn)
    for n in (150, 151):
        path = step_path(torn, n)
        path.write_bytes(path.read_bytes()[:500])
    result = CliRunner().invoke(app, ["diff", str(torn), str(grpo_fixture), "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and f"{torn}: skipped 2 unreadable step files" in warning[0]
    assert "step 150: torn" in warning[0] and "step 151: torn" in warning[0]
    assert "only in B: 150..151" in result.stdout
    assert "unreadable in A, not compared: 150..151" in result.stdout.splitlines()


def test_a_run_whose_every_step_is_torn_names_them_beside_its_error(grpo_fixture, tmp_path):
    """No step of A can be read: exit 3 'share no step', and the warning says why (it was
    dropped with the error, which then read as if the runs were of other steps)."""
    torn = tmp_path / "torn"
    shutil.copytree(grpo_fixture, torn)
    for path in (torn / "steps").iterdir():
        path.write_bytes(path.read_bytes()[:500])
    result = CliRunner().invoke(app, ["diff", str(torn), str(grpo_fixture), "--device", "cpu"])
    assert result.exit_code == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"warning: {torn}: skipped 160 unreadable")
    assert lines[1].startswith("error: ") and "share no step" in lines[1]


def test_runs_of_different_units_are_not_compared(tmp_path):
    """The same arrays under another unit (token entries against sequence entries) mean other
    things: exit 3 in one line naming both. Before, such runs were 'identical' (exit 0)."""
    a = tmp_path / "a"
    with Recorder(a, policy="grpo", unit="sequence") as rec:
        for step in range(2):
            rec.log_step(step, logp=np.zeros(4), logp_old=np.zeros(4), advantages=np.ones(4))
    b = tmp_path / "b"
    shutil.copytree(a, b)
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["unit"] = "token"
    (b / "manifest.json").write_text(json.dumps(manifest))
    done = CliRunner().invoke(app, ["diff", str(a), str(b), "--device", "cpu"])
    assert done.exit_code == 3, done.stderr
    assert done.stderr.splitlines() == [
        f"error: {a} records sequence entries, {b} token entries: their steps are not comparable"
    ]


def test_a_sequence_run_and_a_run_of_scalars_are_compared(tmp_path):
    """A scalar run (an imported log, the optimizer hooks) holds no entry of any unit, though
    its manifest says `token`: diffing a sequence run (RecordingRLOOTrainer's, say) against
    its own imported log said '... B token entries: their steps are not comparable' (exit 3),
    where a token run against the same log is compared. Both are now compared: the scalars
    that agree, the arrays only one run has."""
    a, b = tmp_path / "a", tmp_path / "b"
    with Recorder(a, policy="grpo", unit="sequence") as rec:
        for step in range(3):
            rec.log_step(
                step, logp=np.zeros(4), logp_old=np.zeros(4), advantages=np.ones(4), loss=0.5
            )
    with Recorder(b, policy=None) as rec:
        for step in range(3):
            rec.log_step(step, loss=0.5)
    done = CliRunner().invoke(app, ["diff", str(a), str(b), "--format", "json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert (report["common"], report["first"]["scalars"]) == (3, None)
    assert (report["scalars_only"], report["identical"]) == (3, False)


def _logged(path: Path, losses: list[float], norms: list[float] | None = None) -> Path:
    """A run of scalar steps logging only these losses and a reward, as an imported log (and
    each step's parameter grad norms [1, norm], with `norms`)."""
    with Recorder(path, policy=None) as recorder:
        for step, loss in enumerate(losses):
            grads = None if norms is None else np.array([1.0, norms[step]], np.float32)
            recorder.log_step(step, loss=loss, reward_mean=0.5, param_grad_norm=grads)
    return path


def test_a_run_and_its_imported_log_part_where_their_scalars_do(tmp_path):
    """Against a log of scalars only, a run's arrays and the scalars the log lacks are not
    a parting: the run 'parted at step 0' ('logp: only in A', 'grad_norm: 2 vs absent'),
    exit 1, whatever its log said, and stopped there (compared 1). It is compared on the
    scalars both record: equal, exit 0; a loss that differs at step 2 parts there."""
    a = tmp_path / "a"
    with Recorder(a, policy="grpo", unit="sequence") as rec:
        for step in range(4):
            logp = np.zeros(4, np.float32)
            rec.log_step(
                step, logp=logp, logp_old=logp, advantages=np.ones(4, np.float32), loss=0.5,
                reward_mean=0.5, grad_norm=2.0, param_grad_norm=np.ones(2, np.float32),
            )  # fmt: skip
    same = _logged(tmp_path / "same", [0.5] * 4)
    exit_code, data = _cli(a, same)
    assert (exit_code, data["parted_at"], data["compared"], data["scalars_only"]) == (0, None, 4, 4)
    assert data["first"] == dict.fromkeys(("arrays", "inputs", "logprobs", "scalars"))
    text = CliRunner().invoke(app, ["diff", str(a), str(same), "--device", "cpu"]).stdout
    assert "inputs      not compared: one run holds scalars only" in text.splitlines()
    assert "identical" not in text
    exit_code, data = _cli(a, _logged(tmp_path / "other", [0.5, 0.5, 0.7, 0.5]))
    assert (exit_code, data["parted_at"]) == (1, 2)
    assert [f["field"] for f in data["first"]["scalars"]["fields"]] == ["loss"]
    # an array both record is compared: its bits differ, not a parting
    exit_code, data = _cli(a, _logged(tmp_path / "grads", [0.5] * 4, [1.0, 1.0, 1.0, 3.0]))
    assert (exit_code, data["parted_at"], data["first"]["arrays"]["step"]) == (0, None, 3)
    assert [f["field"] for f in data["first"]["arrays"]["fields"]] == ["param_grad_norm"]


def test_a_step_whose_data_one_run_cannot_read_is_not_called_identical(grpo_fixture, tmp_path):
    """A step file whose header reads but whose data fails its checksum is skipped with a
    warning, and counts as a step only the other run holds, as a file skipped at its header
    check does. It was counted as compared-equal: 'identical: every array of every step equal,
    bit for bit' (JSON identical true) beside a step whose bytes differ."""
    damaged = tmp_path / "damaged"
    shutil.copytree(grpo_fixture, damaged)
    path = step_path(damaged, 5)
    flip_bit(path, path.stat().st_size - 10)
    result = CliRunner().invoke(
        app, ["diff", str(grpo_fixture), str(damaged), "--device", "cpu", "-f", "json"]
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["identical"] is False
    assert data["only_a"] == [[5, 5]] and data["only_b"] == []
    assert data["unreadable_a"] == [] and data["unreadable_b"] == [[5, 5]]
    assert (data["steps_a"], data["steps_b"], data["common"]) == (160, 159, 159)
    assert data["compared"] == 159
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "step 5" in warning[0] and "checksum" in warning[0]
    text = CliRunner().invoke(app, ["diff", str(grpo_fixture), str(damaged), "--device", "cpu"])
    assert "only in A: 5" in text.stdout and "identical" not in text.stdout
    assert "unreadable in B, not compared: 5" in text.stdout.splitlines()


def test_runs_that_share_no_readable_step_are_exit_3(tmp_path):
    """Every step of B fails its data checksum: no step both runs can read, exit 3 'share no
    step' after the warnings naming them, as when every step of B is torn (it was 'identical',
    exit 0, with nothing compared)."""
    a = tiny_run(tmp_path / "a", steps=3)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    for n in range(3):
        path = step_path(b, n)
        flip_bit(path, path.stat().st_size - 1)
    done = CliRunner().invoke(app, ["diff", str(a), str(b), "--device", "cpu"])
    assert done.exit_code == 3, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 4 and all("checksum" in line for line in lines[:3])
    assert lines[3] == f"error: {a} and {b} share no step: nothing to compare"


def test_a_run_whose_own_policy_cannot_be_replayed_is_still_compared(tmp_path):
    """Runs whose own policy needs a field their steps lack (grpo:beta=0.04 without logp_ref):
    the comparison stands, with '-' for the figures of the policy that cannot be replayed and
    one warning line a run saying why. diff ended with exit 3 on the replay's error, which
    docs/diff.md's exit codes do not list, and showed nothing of where the runs part."""
    runs = []
    for name, bump in (("a", 0.0), ("b", 1.0)):
        with Recorder(tmp_path / name, policy="grpo", unit="sequence") as rec:
            for step in range(3):
                advantages = np.ones(4, dtype=np.float32) + (bump if step == 1 else 0.0)
                rec.log_step(step, logp=-np.ones(4), logp_old=-np.ones(4), advantages=advantages)
        # The Recorder refuses such steps now; a run recorded before, or written otherwise:
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        manifest["policy"] = {"spec": "grpo:beta=0.04", "name": "grpo", "params": {"beta": 0.04}}
        (tmp_path / name / "manifest.json").write_text(json.dumps(manifest))
        runs.append(tmp_path / name)
    result = CliRunner().invoke(app, ["diff", *map(str, runs), "--device", "cpu", "-f", "json"])
    assert result.exit_code == 1, result.stderr
    data = json.loads(result.stdout)
    assert data["parted_at"] == 1 and [s["step"] for s in data["around"]] == [0, 1, 2]
    assert all(s[side]["discard_frac"] is None for s in data["around"] for side in "ab")
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and all("logp_ref" in line for line in warnings), result.stderr


@pytest.mark.parametrize(
    ("option", "value", "problem"),
    [
        ("--atol", "nan", "must be a finite number >= 0, got nan"),
        ("--rtol", "-1", "must be a finite number >= 0, got -1.0"),
        ("--context", "-1", "must be >= 0, got -1"),
    ],
)
def test_a_bad_tolerance_or_context_names_its_option(grpo_fixture, option, value, problem):
    """The line named the library's setting (`atol must be ...`), not the option given."""
    result = CliRunner().invoke(app, ["diff", str(grpo_fixture), str(grpo_fixture), option, value])
    assert result.exit_code == 2
    assert result.stderr == f"error: {option} {problem}\n"


def test_a_negative_until_is_refused(grpo_fixture):
    """`--until -1` was taken: no step is before it, so the diff could never exit 1."""
    result = CliRunner().invoke(
        app, ["diff", str(grpo_fixture), str(grpo_fixture), "--until", "-1"]
    )
    assert result.exit_code == 2
    assert (
        result.stderr.startswith("error: Invalid value for '--until'")
        and "greater than or equal to 0" in result.stderr
    )


def test_a_long_difference_wraps_at_80_columns_under_its_field(tmp_path):
    """A field's description past the width (a NaN count, a large array's figures) ran on in
    one line, 107 wide at 80 columns; it wraps at the width, its next lines under the first."""
    runs = []
    for name, bad in (("a", False), ("b", True)):
        with Recorder(tmp_path / name, policy="grpo") as rec:
            for step in range(2):
                logp = np.full((300, 400), -1.0, np.float32)
                if bad and step == 1:
                    logp[5:, 7], logp[3, :] = np.nan, -1.5
                rec.log_step(step, logp=logp, logp_old=np.full_like(logp, -1.0),
                             advantages=np.ones(300, np.float32))  # fmt: skip
        runs.append(str(tmp_path / name))
    result = CliRunner().invoke(app, ["diff", *runs, "--device", "cpu"], env={"COLUMNS": "80"})
    assert result.exit_code == 1, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, result.stdout
    at = lines.index("log-probs   part at step 1")
    assert lines[at + 1].startswith("             logp: 695 of 120000 differ, first at 1200")
    assert lines[at + 2].startswith(" " * 13) and lines[at + 2].strip()
    joined = " ".join(line.strip() for line in lines[at + 1 : at + 3])
    assert "295 NaN or inf against another value" in joined


def test_a_device_torch_does_not_see_is_refused_whether_or_not_the_runs_part(
    grpo_fixture, monkeypatch
):
    """--device cuda without a GPU was refused (exit 2) only when the runs part, as their
    figures are replayed then; runs that never part exited 0 on it: a CI job got 0 or 2, never
    the 1 of a parting. It is refused before any comparison, parting or not."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for other in (grpo_fixture, fixture_run("stabledrl")):
        result = CliRunner().invoke(
            app, ["diff", str(grpo_fixture), str(other), "--device", "cuda"]
        )
        assert result.exit_code == 2, result.output
        assert (
            result.stderr == "error: device 'cuda' was asked for, but torch sees no CUDA device\n"
        )
        assert result.stdout == ""


def test_fields_past_those_described_are_counted(tmp_path):
    """At most 6 differing fields are described a kind; the others went unsaid, so 8 fields
    that differ (another seed: 4 arrays, 4 scalars) read as 6. The rest are counted: '(+2 more
    fields)' in the table, `more` in the JSON."""
    a, b = tmp_path / "a", tmp_path / "b"
    names = (
        "loss",
        "grad_norm",
        "lr",
        "reward_mean",
        "entropy",
        "kl",
        "clip_frac",
        "clip_frac_low",
    )
    for path, value in ((a, 0.5), (b, 0.25)):
        with Recorder(path, policy=None, reward_range=(0.0, 1.0)) as recorder:
            recorder.log_step(0, **dict.fromkeys(names, value))  # type: ignore[arg-type]
    exit_code, data = _cli(a, b)
    scalars = data["first"]["scalars"]
    assert (exit_code, len(scalars["fields"]), scalars["more"]) == (1, 6, 2)
    text = CliRunner().invoke(app, ["diff", str(a), str(b), "--device", "cpu"]).stdout.splitlines()
    at = text.index("scalars     part at step 0")
    assert text[at + 7] == "             (+2 more fields)"


def test_two_logs_of_scalars_part_where_the_scalars_both_record_do(tmp_path):
    """Two runs of scalars only from two sources (the optimizer hooks' grad_norm, lr and
    step_time; an imported log's loss, reward_mean and grad_norm of the same training) parted
    at step 0 on what only one records ('loss: absent vs 0.5'), exit 1, compared 1. As against
    a policy batch, only the scalars both record are compared: equal grad norms exit 0 (never
    'identical'), the scalars one run records alone listed; a grad norm differing at step 2
    parts there."""
    hooks, log = tmp_path / "hooks", tmp_path / "log"
    with Recorder(hooks, policy=None) as rec:
        for step in range(4):
            rec.log_step(step, grad_norm=2.0, lr=1e-3, step_time=0.1)
    with Recorder(log, policy=None) as rec:
        for step in range(4):
            rec.log_step(step, loss=0.5, reward_mean=0.4, grad_norm=2.0 if step != 2 else 3.0)
    exit_code, data = _cli(hooks, log)
    assert (exit_code, data["parted_at"]) == (1, 2), data
    assert [f["field"] for f in data["first"]["scalars"]["fields"]] == ["grad_norm"]
    assert data["unshared"] == {"a": ["lr"], "b": ["loss", "reward_mean"]}
    shutil.rmtree(log)
    with Recorder(log, policy=None) as rec:
        for step in range(4):
            rec.log_step(step, loss=0.5, reward_mean=0.4, grad_norm=2.0)
    exit_code, data = _cli(hooks, log)
    assert (exit_code, data["parted_at"], data["compared"]) == (0, None, 4)
    assert (data["first"]["arrays"], data["identical"]) == (None, False)
    text = CliRunner().invoke(app, ["diff", str(hooks), str(log), "--device", "cpu"]).stdout
    lines = text.splitlines()
    assert "not compared, recorded by A only: lr; by B only: loss, reward_mean" in lines
    assert lines[-1] == "they never part: every value both record equal, bit for bit"


def test_two_logs_that_share_no_scalar_are_refused(tmp_path):
    """Two runs of scalars only that record no scalar in common (the optimizer hooks' lr and
    step_time; a log's loss and reward_mean) exited 0, 'they never part', having compared
    only the non-finite count each derives: as a `--until` gate, one that could not fail.
    Like two runs that share no step, they have nothing to compare: exit 3, one line."""
    hooks, log = tmp_path / "hooks", tmp_path / "log"
    with Recorder(hooks, policy=None) as rec:
        for step in range(4):
            rec.log_step(step, lr=1e-3, step_time=0.1)
    with Recorder(log, policy=None) as rec:
        for step in range(4):
            rec.log_step(step, loss=0.5, reward_mean=0.4)
    result = CliRunner().invoke(app, ["diff", str(hooks), str(log), "--until", "3"])
    assert result.exit_code == 3, result.output
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: {hooks} and {log} share no scalar: A records lr, B loss, reward_mean "
        "(nothing to compare)"
    ]  # (step_time is not compared: a timing)


def test_two_runs_of_scalars_only_say_their_batches_were_not_compared(tmp_path):
    """Two runs of scalars only (loss and grad_norm logged with policy=None) said 'inputs
    equal on all 4 compared steps' and 'log-probs   equal on ...', though neither holds an
    input or a log-prob, and the JSON (first null, scalars_only 0) read as equal too. Now they
    were not compared, as against a run's own log: batches_compared counts the steps where
    both runs hold a policy batch, 0 here; the scalars are compared, the runs identical."""
    for path in (tmp_path / "a", tmp_path / "b"):
        with Recorder(path, policy=None) as rec:
            for step in range(4):
                rec.log_step(step, loss=0.5, grad_norm=2.0)
    exit_code, data = _cli(tmp_path / "a", tmp_path / "b")
    assert (exit_code, data["compared"], data["scalars_only"]) == (0, 4, 0)
    assert (data["batches_compared"], data["identical"]) == (0, True)
    args = ["diff", str(tmp_path / "a"), str(tmp_path / "b"), "--device", "cpu"]
    lines = CliRunner().invoke(app, args).stdout.splitlines()
    assert "inputs      not compared: both runs hold scalars only" in lines
    assert "log-probs   not compared: both runs hold scalars only" in lines
    assert "scalars     equal on all 4 compared steps" in lines
    assert "arrays      equal on all 4 compared steps" in lines
