"""A step's arrays must mean what the format says (docs/run-format.md): under `unit: sequence`
each entry is a whole sequence, one distinct `seq_id` an entry; a multi-rank step's ids are
each rank's own, from 0. A step that contradicts it (token-level data under unit: sequence, a
rank's ids that would be another rank's) is data a replay cannot use: skipped and named, and
a run with no other step is exit 3 with one line, never replayed as if it were consistent."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from _cli import run_cli
from _corpus import edit_manifest, read_step, rewrite_step, step_path, tiny_run
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import open_run, pack_run
from stabledrl_cli.dump._archive_checks import CRC_ATTR, index_crc
from stabledrl_cli.errors import InputError, UsageError

runner = CliRunner()
STEPS = 4
REPEATS = "unit 'sequence' records one entry per sequence"


def _token_run_said_sequence(path: Path) -> Path:
    """`tiny_run` (4 sequences of 3 tokens a step) under a manifest that says unit: sequence."""
    return edit_manifest(tiny_run(path, steps=STEPS), lambda m: m.update(unit="sequence"))


def _lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not line.startswith("replaying:")]


@pytest.mark.parametrize(
    "options",
    [["replay", "--device", "cpu"], ["check", "--max-collapsed", "100"], ["watch", "--once"]],
    ids=lambda options: options[0],
)
def test_token_data_under_unit_sequence_is_refused(tmp_path, options):
    run = _token_run_said_sequence(tmp_path / "run")
    result = runner.invoke(app, [options[0], str(run), *options[1:]])
    assert result.exit_code == 3, result.output
    assert result.stdout == ""
    lines = _lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "no step could be read" in lines[0] and REPEATS in lines[0], lines[0]
    with pytest.raises(InputError, match=REPEATS):
        sd.replay(run, ["grpo"], device="cpu")


def test_inspect_lists_each_contradicting_step_as_invalid(tmp_path):
    run = _token_run_said_sequence(tmp_path / "run")
    result = runner.invoke(app, ["inspect", str(run), "--format", "json"])
    assert result.exit_code == 0, result.output
    findings = json.loads(result.stdout)["integrity"]["findings"]
    assert [(f["kind"], f["step"]) for f in findings] == [("invalid", n) for n in range(STEPS)]
    assert all(REPEATS in f["message"] for f in findings)


def test_the_exit_code_in_a_real_process(tmp_path):
    run = _token_run_said_sequence(tmp_path / "run")
    result = run_cli("replay", run, "--device", "cpu")
    assert result.returncode == 3, result.stderr
    lines = _lines(result.stderr)
    assert len(lines) == 1 and REPEATS in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_one_contradicting_step_is_skipped_and_named(tmp_path):
    """A sequence run whose step 1 holds token-level data: the other steps replay."""
    run = tmp_path / "run"
    rng = np.random.default_rng(0)
    with sd.Recorder(run, policy="grpo", unit="sequence") as rec:
        for step in range(STEPS):
            logp = -rng.random(4).astype(np.float32)
            rec.log_step(step, logp=logp, logp_old=logp + 0.01, advantages=[1.0, -1.0, 1.0, -1.0])
    token = tmp_path / "token"
    tiny_run(token, steps=2)
    (run / "steps" / "step-00000001.safetensors").write_bytes(
        (token / "steps" / "step-00000001.safetensors").read_bytes()
    )
    result = runner.invoke(app, ["replay", str(run), "--format", "json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == STEPS - 1
    named = [line for line in _lines(result.stderr) if "step 1:" in line]
    assert len(named) == 1 and REPEATS in named[0], result.stderr


def _rank_file(run: Path, step: int, rank: int) -> Path:
    return run / "steps" / f"step-{step:08d}.rank-{rank:04d}.safetensors"


def _set_ids(path: Path, name: str, change: Callable[[np.ndarray], np.ndarray]) -> None:
    """The step file's int32 `name` changed in place (same size), checksums valid."""
    header, data = read_step(path)
    start, stop = header[name]["data_offsets"]
    ids = change(np.frombuffer(data[start:stop], dtype=np.int32).copy()).astype(np.int32)
    rewrite_step(path, header, data[:start] + ids.tobytes() + data[stop:])


@pytest.mark.parametrize(
    ("rank", "name", "change", "why"),
    [
        (
            1,
            "seq_id",
            lambda ids: ids - 1,
            "seq_id: rank 1's lie in [-1, 2] (its 4 sequences are 0 to 3)",
        ),
        (
            0,
            "seq_id",
            lambda ids: ids + 1,
            "seq_id: rank 0's lie in [1, 4] (its 4 sequences are 0 to 3)",
        ),
        (1, "group_id", lambda ids: ids - 2, "group_id: rank 1's lie in [-2, -1] (ids are >= 0)"),
        (0, "seq_id", lambda ids: ids.clip(0, 2), "seq_id: rank 0's lie in [0, 2] (its 4 seq"),
    ],
    ids=[
        "negative_seq_id",
        "seq_id_past_its_rank",
        "negative_group_id",
        "seq_id_short_of_its_rank",
    ],
)
def test_rank_ids_that_would_collide_with_another_ranks_are_refused(
    tmp_path, rank, name, change, why
):
    """A rank's ids are numbered after the ranks before it (seq_id by their sequences,
    group_id by their largest id): a negative id, or a seq_id past the rank's own sequences,
    became another rank's sequence or group, joined as if recorded so (rank 1's seq_id -1 was
    rank 0's last sequence); a seq_id short of them left a sequence no entry is of. Reading the
    joined field is an input error naming the rank; replay skips the step and names it, pack
    stops (exit 3)."""
    run = tiny_run(tmp_path / "run", world_size=2)
    _set_ids(_rank_file(run, 1, rank), name, change)
    with pytest.raises(InputError, match=re.escape(why)):
        open_run(run).step(1).array(name)
    assert open_run(run).step(0).array(name).min() == 0
    replayed = runner.invoke(app, ["replay", str(run), "--format", "json", "--device", "cpu"])
    assert replayed.exit_code == 0, replayed.output
    assert json.loads(replayed.stdout)["steps"] == 3
    named = [line for line in _lines(replayed.stderr) if "step 1:" in line]
    assert len(named) == 1 and why in named[0], replayed.stderr
    packed = runner.invoke(app, ["pack", str(run), str(tmp_path / "out.h5")])
    assert packed.exit_code == 3, packed.stderr
    assert why in packed.stderr and "Traceback" not in packed.stderr


def _set_meta(path: Path, **counts: str) -> None:
    header, data = read_step(path)
    header["__metadata__"].update(counts)
    rewrite_step(path, header, data)


def _no_per_sequence_run(path: Path) -> Path:
    """4 steps of 4 sequences x 3 tokens, without group_id or reward."""
    rng = np.random.default_rng(1)
    with sd.Recorder(path, policy="grpo") as rec:
        for step in range(STEPS):
            logp = -rng.random((4, 3)).astype(np.float32)
            rec.log_step(step, logp=logp, logp_old=logp + 0.01, advantages=[1.0, -1.0, 1.0, -1.0])
    return path


def _archive_scored_tokens(run: Path, archive: Path) -> Path:
    """`run` packed, its step 1's num_scored_tokens set to 5 of 12 (index CRC valid)."""
    pack_run(open_run(run), archive)
    with h5py.File(archive, "r+") as handle:
        counts = handle["steps/num_scored_tokens"]
        values = counts[()]
        values[1] = 5
        counts[...] = values
        counts.attrs[CRC_ATTR] = index_crc(values)
    return archive


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (
            lambda tmp: _set_ids(
                step_path(tiny_run(tmp / "run", steps=STEPS), 1), "seq_id", lambda s: s.clip(0, 2)
            ),
            "seq_id names 3 sequences (its largest id + 1), the step has 4",
        ),
        (
            lambda tmp: _set_meta(
                step_path(_no_per_sequence_run(tmp / "run"), 1), _num_sequences="9"
            ),
            "seq_id names 4 sequences (its largest id + 1), the step has 9",
        ),
        (
            lambda tmp: _set_meta(
                step_path(tiny_run(tmp / "run", steps=STEPS), 1), _scored_tokens="3"
            ),
            "mask scores 12 entries, the step counts 3 scored",
        ),
        (
            lambda tmp: _archive_scored_tokens(tiny_run(tmp / "run", steps=STEPS), tmp / "a.h5"),
            "mask scores 12 entries, the step counts 5 scored",
        ),
    ],
    ids=["per_sequence_arrays_past_seq_id", "num_sequences", "scored_tokens", "archive_scored"],
)
def test_counts_that_contradict_the_arrays_make_the_step_invalid(tmp_path, make, why):
    """A step file's header counts (and an archive's count index) say what its arrays hold:
    per-sequence arrays for a sequence no entry names, or a count no array agrees with, are
    not what a Recorder writes. replay skipped nothing (its sequences' rewards entered their
    groups' statistics, inspect showed the header's count); now the step is invalid."""
    make(tmp_path)
    target = tmp_path / "a.h5" if (tmp_path / "a.h5").exists() else tmp_path / "run"
    replayed = runner.invoke(app, ["replay", str(target), "--format", "json", "--device", "cpu"])
    assert replayed.exit_code == 0, replayed.output
    assert json.loads(replayed.stdout)["steps"] == STEPS - 1
    named = [line for line in _lines(replayed.stderr) if "step 1:" in line]
    assert len(named) == 1 and why in named[0], replayed.stderr
    shown = runner.invoke(app, ["inspect", str(target), "--format", "json"])
    assert shown.exit_code == 0, shown.output
    findings = json.loads(shown.stdout)["integrity"]["findings"]
    assert [(f["kind"], f["step"]) for f in findings] == [("invalid", 1)], findings
    assert why in findings[0]["message"]


def _per_sequence_geometry_run(path: Path, kind: str) -> Path:
    """A token run (2 sequences of 3 tokens a step) whose geometry was taken per sequence:
    [N, N] Gram matrices or [N, k] sketches, N = 2 (docs/run-format.md, Gradient geometry)."""
    rng = np.random.default_rng(2)
    with sd.Recorder(path, policy="grpo") as rec:
        for step in range(STEPS):
            logp = -rng.random((2, 3)).astype(np.float32)
            grads = rng.standard_normal((2, 5)).astype(np.float32)
            geometry = (
                {"unit_grad_gram": grads @ grads.T}
                if kind == "gram"
                else {"unit_grad_sketch": grads[:, :4]}
            )
            rec.log_step(step, logp=logp, logp_old=logp - 0.5, advantages=[1.0, -1.0], **geometry)
    return path


@pytest.mark.parametrize("kind", ["gram", "sketch"])
def test_per_sequence_geometry_of_a_token_run_is_recorded_and_replayed(tmp_path, kind):
    """docs/run-format.md: U is the number of units, or of sequences when the entries are
    tokens and the gradients were taken per sequence; replay sums each sequence's token
    coefficients (docs/replay-json.md, update_norm_approximate). log_step refused such
    geometry ([U, U] = [6, 6] expected) and a reader refused a step file holding it."""
    run = _per_sequence_geometry_run(tmp_path / "run", kind)
    assert open_run(run).integrity.ok
    result = runner.invoke(app, ["replay", str(run), "-p", "grpo", "--format", "json"])
    assert result.exit_code == 0, result.output
    replayed = json.loads(result.stdout)
    assert replayed["steps"] == STEPS and replayed["geometry"] == kind
    pack_run(open_run(run), tmp_path / "run.h5")
    packed = runner.invoke(app, ["replay", str(tmp_path / "run.h5"), "-p", "grpo", "-f", "json"])
    assert packed.exit_code == 0, packed.output
    assert json.loads(packed.stdout)["policies"] == replayed["policies"]


def test_geometry_of_neither_entries_nor_sequences_is_refused(tmp_path):
    with sd.Recorder(tmp_path / "run") as rec, pytest.raises(UsageError, match="unit_grad_gram"):
        rec.log_step(
            0,
            logp=np.zeros((2, 3)),
            logp_old=np.zeros((2, 3)),
            advantages=[1.0, -1.0],
            unit_grad_gram=np.eye(4, dtype=np.float32),
        )


def test_a_gram_of_entries_by_sequences_is_unreadable(tmp_path):
    """Either count may be a Gram's U, but both of its sides are the same U."""
    run = _per_sequence_geometry_run(tmp_path / "run", "gram")
    path = step_path(run, 1)
    header, data = read_step(path)
    arrays = {
        name: data[slice(*entry["data_offsets"])]
        for name, entry in header.items()
        if name != "__metadata__"
    }
    arrays["unit_grad_gram"] = np.ones((6, 2), np.float32).tobytes()
    header["unit_grad_gram"]["shape"] = [6, 2]
    rebuilt = b""
    for name, raw in arrays.items():
        header[name]["data_offsets"] = [len(rebuilt), len(rebuilt) + len(raw)]
        rebuilt += raw
    rewrite_step(path, header, rebuilt)
    findings = open_run(run).integrity.findings
    assert [(f.kind, f.step) for f in findings] == [("unreadable", 1)], findings
    assert "unit_grad_gram: shape [6, 2] disagrees" in findings[0].message


def test_a_rank_whose_sequences_have_no_entry_is_refused(tmp_path):
    """Rank 0's part of step 1 rewritten with no entries but its 4 sequences' reward and
    group_id: rank 1's ids were numbered after them, and the joined step replayed 4 sequences
    no entry is of (their rewards in their groups' statistics)."""
    run = tiny_run(tmp_path / "run", world_size=2)
    path = _rank_file(run, 1, 0)
    header, data = read_step(path)
    arrays = {}
    for name, entry in [(n, e) for n, e in header.items() if n != "__metadata__"]:
        raw = data[slice(*entry["data_offsets"])]
        if name not in ("group_id", "reward", "token_ids"):
            entry["shape"], raw = [0], b""
        arrays[name] = raw
    rebuilt = b""
    for name, raw in arrays.items():
        header[name]["data_offsets"] = [len(rebuilt), len(rebuilt) + len(raw)]
        rebuilt += raw
    header["__metadata__"].update(_num_tokens="0", _scored_tokens="0", nonfinite="0.0")
    rewrite_step(path, header, rebuilt)
    why = "seq_id: rank 0's has no entry (its 4 sequences are 0 to 3)"
    with pytest.raises(InputError, match=re.escape(why)):
        open_run(run).step(1).array("seq_id")
    replayed = runner.invoke(app, ["replay", str(run), "--format", "json", "--device", "cpu"])
    assert replayed.exit_code == 0, replayed.output
    assert json.loads(replayed.stdout)["steps"] == 3


def test_more_sequences_than_an_int32_seq_id_names_is_unreadable(tmp_path):
    """A step without per-sequence arrays, its _num_sequences crafted past int64 (10**29, 30
    digits as a count may have): pack stopped on an internal error (exit 70) converting its
    offsets. seq_id is int32, so a step has at most 2**31 sequences: more is unreadable."""
    run = _no_per_sequence_run(tmp_path / "run")
    _set_meta(step_path(run, 1), _num_sequences=str(10**29))
    _set_meta(step_path(run, 2), _num_sequences=str(2**31 + 1))
    findings = open_run(run).integrity.findings
    assert [(f.kind, f.step) for f in findings] == [("unreadable", 1), ("unreadable", 2)]
    assert "more sequences than an int32 seq_id names" in findings[0].message
    packed = runner.invoke(app, ["pack", str(run), str(tmp_path / "out.h5")])
    assert packed.exit_code == 0, packed.stderr
    assert open_run(tmp_path / "out.h5").step_numbers == [0, 3]
