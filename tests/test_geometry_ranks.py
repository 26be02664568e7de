"""A multi-rank run whose ranks each recorded a Gram matrix: the join leaves the Grams out
(per-rank Grams do not combine), and replay says so instead of "no gradient geometry"."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import _inputs, pack_run
from stabledrl_cli.dump._archive_checks import index_crc
from stabledrl_cli.errors import UsageError
from stabledrl_cli.replay.plot import _footnote
from stabledrl_cli.replay.report import proxy_reason


def _record(
    out: Path,
    *,
    gram: bool,
    sketch_ranks: tuple[int, ...] = (),
    every: int = 1,
    seeds: tuple[int, int] | None = None,
    bare: tuple[int, int] | None = None,
    widths: tuple[int, int] = (3, 3),
) -> None:
    """Two ranks' steps 0-2; `seeds`: each rank's Recorder declares a sketch of that seed;
    `bare`: the (rank, step) that records no geometry; `widths`: each rank's sketch k."""
    rng = np.random.default_rng(0)
    recorders = [
        sd.Recorder(
            out,
            policy="grpo",
            world_size=2,
            rank=r,
            overwrite=True,
            unit="sequence",
            geometry=None if seeds is None else {"kind": "sketch", "sketch": {"seed": seeds[r]}},
        )
        for r in range(2)
    ]
    for step in range(3):
        for recorder in recorders:
            logp = rng.normal(-1.0, 0.1, 4).astype(np.float32)
            grads = rng.normal(size=(4, 6)).astype(np.float32)
            geometry = {"unit_grad_gram": grads @ grads.T} if gram else {}
            if recorder.rank in sketch_ranks:
                omega = rng.normal(size=(6, widths[recorder.rank])).astype(np.float32)
                geometry = {"unit_grad_sketch": grads @ omega}
            if step % every != every - 1 or (recorder.rank, step) == bare:
                geometry = {}
            recorder.log_step(
                step,
                logp=logp,
                logp_old=logp + 0.01,
                advantages=np.array([1.0, -1.0, 0.5, -0.5], dtype=np.float32),
                grad_norm_covered=1.0,
                **geometry,
            )
    for recorder in recorders:
        recorder.close()


def test_replay_of_per_rank_grams_says_they_do_not_combine(tmp_path: Path) -> None:
    _record(tmp_path / "gram", gram=True)
    _record(tmp_path / "none", gram=False)
    with sd.open_run(tmp_path / "gram") as run:
        step = run.step(0)
        assert "unit_grad_gram" not in step.fields
        assert step.unjoined == frozenset({"unit_grad_gram"})
    runner = CliRunner()
    gram = runner.invoke(app, ["replay", str(tmp_path / "gram")], terminal_width=400)
    assert gram.exit_code == 0, gram.output
    assert "geometry coef" in gram.output
    assert "the run's ranks recorded Gram matrices (unit_grad_gram), which do not" in gram.output
    assert "recorded no gradient geometry" not in gram.output
    none = runner.invoke(app, ["replay", str(tmp_path / "none")], terminal_width=400)
    assert none.exit_code == 0, none.output
    assert "the run recorded no gradient geometry" in none.output
    assert sd.replay(tmp_path / "gram").per_rank_grams
    assert not sd.replay(tmp_path / "none").per_rank_grams


def test_replay_of_a_sketch_some_ranks_left_out_says_so(tmp_path: Path) -> None:
    _record(tmp_path / "run", gram=False, sketch_ranks=(0,))
    with sd.open_run(tmp_path / "run") as run:
        assert run.step(0).unjoined == frozenset({"unit_grad_sketch"})
    result = CliRunner().invoke(app, ["replay", str(tmp_path / "run")], terminal_width=400)
    assert result.exit_code == 0, result.output
    assert "only some of the run's ranks recorded a sketch (unit_grad_sketch)" in result.output
    assert "recorded no gradient geometry" not in result.output
    assert sd.replay(tmp_path / "run").partial_sketches


@pytest.mark.parametrize("gram", [True, False], ids=["grams", "sketch of rank 0"])
def test_replay_of_unjoined_geometry_every_few_steps_says_so(tmp_path: Path, gram: bool) -> None:
    """Geometry on step 2 of steps 0-2 (geometry every few steps of a run whose first replayed
    step is no multiple of it: its steps start at 1, or its step 0 was skipped): only the
    first replayed step was looked at, and the table said 'the run recorded no gradient
    geometry' of per-rank Grams and of a sketch of rank 0 alike."""
    _record(tmp_path / "run", gram=gram, sketch_ranks=() if gram else (0,), every=3)
    result = sd.replay(tmp_path / "run", "grpo")
    assert result.geometry == "coef"
    assert (result.per_rank_grams, result.partial_sketches) == (gram, not gram)


def _replay(run: Path) -> tuple[dict[str, Any], str, str]:
    """`replay RUN --format json`'s JSON and stderr, and the table's output (its lines
    joined)."""
    runner = CliRunner()
    data = runner.invoke(app, ["replay", str(run), "--format", "json"])
    assert data.exit_code == 0, data.output
    table = runner.invoke(app, ["replay", str(run)], terminal_width=400)
    assert table.exit_code == 0, table.output
    return json.loads(data.stdout), data.stderr, " ".join(table.output.split())


def test_sketches_of_different_seeds_are_left_out_of_the_join(tmp_path: Path) -> None:
    """Each rank's file records its sketch's seed; ranks of different seeds (two Omegas) were
    joined all the same, and a run of two equal updates replayed 1.79 for 2.67 (-33%) with
    no word. Their sketch is left out, said once on stderr, in the JSON and the caption."""
    _record(tmp_path / "same", gram=False, sketch_ranks=(0, 1), seeds=(7, 7))
    _record(tmp_path / "other", gram=False, sketch_ranks=(0, 1), seeds=(7, 8))
    with sd.open_run(tmp_path / "other") as run:
        step = run.step(0)
        assert step.sketch_seeds == (7, 8)
        assert step.unjoined == frozenset({"unit_grad_sketch"})
        assert "unit_grad_sketch" not in step.fields
    data, stderr, table = _replay(tmp_path / "other")
    assert (data["geometry"], data["unjoined_geometry"]) == ("coef", "sketch_seeds_differ")
    assert stderr.count("recorded sketches with 2 different seeds (7, 8), which do not") == 1
    assert "the run's ranks recorded sketches (unit_grad_sketch) with different seeds" in table
    assert "fidelity n/a (needs gradient geometry that joins across ranks)" in table
    assert "only some of the run's ranks" not in table
    same, stderr, _ = _replay(tmp_path / "same")
    assert (same["geometry"], same["unjoined_geometry"]) == ("sketch", None)
    assert "different seeds" not in stderr
    with sd.open_run(tmp_path / "same") as run:
        assert run.step(0).sketch_seeds == (7, 7)


def test_sketches_of_different_widths_are_left_out_of_the_join(tmp_path: Path) -> None:
    """Ranks whose sketches have another k made every step unreadable (`cannot join the
    ranks' unit_grad_sketch`: 3 of 3 steps skipped, exit 3), though only the sketch does not
    join: it is left out as sketches of other seeds are, and the step replayed."""
    _record(tmp_path / "run", gram=False, sketch_ranks=(0, 1), widths=(3, 4))
    data, stderr, table = _replay(tmp_path / "run")
    assert (data["steps"], data["skipped_steps"]) == (3, 0)
    assert (data["geometry"], data["unjoined_geometry"]) == ("coef", "sketch_widths_differ")
    assert stderr.count("recorded sketches with 2 different widths k (3, 4), which do not") == 1
    assert "(unit_grad_sketch) of different widths k, which do not join" in table


def test_the_json_tells_unjoined_geometry_from_none(tmp_path: Path) -> None:
    """Per-rank Grams, a sketch of some ranks and no geometry all replay as geometry "coef";
    the JSON said nothing else (the caption alone told them apart)."""
    _record(tmp_path / "grams", gram=True)
    _record(tmp_path / "some", gram=False, sketch_ranks=(0,))
    _record(tmp_path / "none", gram=False)
    said = {name: _replay(tmp_path / name)[0] for name in ("grams", "some", "none")}
    assert {name: data["geometry"] for name, data in said.items()} == dict.fromkeys(said, "coef")
    assert {name: data["unjoined_geometry"] for name, data in said.items()} == {
        "grams": "per_rank_grams",
        "some": "partial_sketches",
        "none": None,
    }


def test_a_rank_without_a_sketch_on_one_step_is_said_beside_mixed(tmp_path: Path) -> None:
    """Rank 1 recorded no sketch on step 1 alone: that step is measured by coefficient norms
    (geometry mixed), and the JSON and caption say why, not only that the step has none."""
    _record(tmp_path / "run", gram=False, sketch_ranks=(0, 1), bare=(1, 1))
    data, _, table = _replay(tmp_path / "run")
    assert (data["geometry"], data["unjoined_geometry"]) == ("mixed", "partial_sketches")
    assert "of steps without gradient geometry" in table
    assert "only some of the run's ranks recorded a sketch" in table


UNJOINED_RUNS: dict[str, dict[str, Any]] = {
    "grams": {"gram": True},
    "some": {"gram": False, "sketch_ranks": (0,)},
    "seeds": {"gram": False, "sketch_ranks": (0, 1), "seeds": (0, 1)},
    "widths": {"gram": False, "sketch_ranks": (0, 1), "widths": (3, 4)},
    "none": {"gram": False},
}


@pytest.mark.parametrize(
    ("name", "said"),
    [
        ("grams", "the manifest declares none; on 3 steps the ranks recorded Gram matrices, which "
         "do not combine across ranks (replay uses coefficient norms there)"),
        ("some", "the manifest declares none; on 3 steps only some of the ranks recorded a "
         "sketch (replay uses coefficient norms there)"),
        ("seeds", "sketch; on 3 steps the ranks recorded sketches of different seeds, which do "
         "not join (replay uses coefficient norms there)"),
        ("widths", "the manifest declares none; on 3 steps the ranks recorded sketches of "
         "different widths k, which do not join (replay uses coefficient norms there)"),
        ("none", "none"),
    ],
)  # fmt: skip
def test_inspect_says_what_the_ranks_recorded(tmp_path: Path, name: str, said: str) -> None:
    """`geometry none` was all inspect said of per-rank Grams and of a sketch of some ranks."""
    _record(tmp_path / "run", **UNJOINED_RUNS[name])
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "run")], terminal_width=400)
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "│ geometry " in line)
    assert row.split("│")[2].strip() == said
    data = CliRunner().invoke(app, ["inspect", str(tmp_path / "run"), "--format", "json"])
    kinds = {
        "grams": "per_rank_grams",
        "some": "partial_sketches",
        "seeds": "sketch_seeds_differ",
        "widths": "sketch_widths_differ",
    }
    expected = {kinds[name]: 3} if name in kinds else {}
    assert json.loads(data.stdout)["unjoined_geometry"] == expected


@pytest.mark.parametrize("name", list(UNJOINED_RUNS))
def test_the_table_and_the_plot_give_one_reason(tmp_path: Path, name: str) -> None:
    """The table's caption and the plot's footnote say why norms are a proxy in one wording
    (`report.proxy_reason`): the footnote had words of its own, the same choice made twice."""
    _record(tmp_path / "run", **UNJOINED_RUNS[name])
    result = sd.replay(tmp_path / "run", "grpo")
    reason = proxy_reason(result)
    assert reason is not None
    assert reason in " ".join(_footnote(result).split())
    assert reason in _replay(tmp_path / "run")[2]


def _one_rank(out: Path, *, covered: float | None, gram_entry: float = 0.0) -> None:
    rng = np.random.default_rng(1)
    with sd.Recorder(out, policy="grpo", overwrite=True, unit="sequence") as recorder:
        for step in range(3):
            logp = rng.normal(-1.0, 0.1, 4).astype(np.float32)
            grads = rng.normal(size=(4, 6)).astype(np.float32)
            gram = grads @ grads.T
            gram[0, 0] += gram_entry
            recorder.log_step(
                step,
                logp=logp,
                logp_old=logp + 0.01,
                advantages=np.array([1.0, -1.0, 0.5, -0.5], dtype=np.float32),
                unit_grad_gram=gram,
                **({} if covered is None else {"grad_norm_covered": covered}),
            )


def test_fidelity_without_grad_norm_covered_names_what_is_missing(tmp_path: Path) -> None:
    """A run with a Gram on every step but no grad_norm_covered has no fidelity: the line says
    the recorded norm is missing, not the geometry it has."""
    _one_rank(tmp_path / "nocov", covered=None)
    _one_rank(tmp_path / "nan", covered=1.0, gram_entry=float("nan"))
    runner = CliRunner()
    nocov = runner.invoke(app, ["replay", str(tmp_path / "nocov")], terminal_width=400)
    assert nocov.exit_code == 0, nocov.output
    assert "geometry gram (coverage 100%)" in nocov.output
    assert "fidelity n/a (needs grad_norm_covered on the steps with geometry)" in nocov.output
    nan = runner.invoke(app, ["replay", str(tmp_path / "nan")], terminal_width=400)
    assert nan.exit_code == 0, nan.output
    assert "fidelity n/a (no step with geometry has a finite replayed update norm)" in nan.output
    assert "needs gradient geometry" not in nocov.output + nan.output


def _crafted(out: Path, **geometry: object) -> None:
    with sd.Recorder(out, policy="grpo", overwrite=True, unit="sequence") as recorder:
        for step in range(2):
            logp = np.full(4, -1.0, dtype=np.float32)
            recorder.log_step(
                step,
                logp=logp,
                logp_old=logp,
                advantages=np.array([1.0, -1.0, 0.5, -0.5], dtype=np.float32),
                grad_norm_covered=1.0,
                **geometry,  # type: ignore[arg-type]
            )


GRADS = np.arange(24, dtype=np.float32).reshape(4, 6) / 10
ASYMMETRIC = GRADS @ GRADS.T
ASYMMETRIC[0, 1] += 1.0
SKETCH = np.ones((4, 3), dtype=np.float16)


@pytest.mark.parametrize(
    ("geometry", "said"),
    [
        ({"unit_grad_gram": -(GRADS @ GRADS.T)}, "its diagonal entry [0, 0] is -0.55"),
        ({"unit_grad_gram": ASYMMETRIC}, "it is not symmetric ([0, 1] is 2.45, [1, 0] is 1.45)"),
        (
            {"unit_grad_sketch": SKETCH, "unit_grad_sketch_scale": 0.0},
            "unit_grad_sketch_scale is 0.0: a per-step scale is > 0",
        ),
    ],
    ids=["negative-diagonal", "asymmetric", "zero-scale"],
)
def test_replay_refuses_geometry_that_is_no_gram_or_scale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, geometry: dict[str, object], said: str
) -> None:
    """A negative or asymmetric Gram, or a sketch scaled by 0, read as update norms 0 (or
    norms of another matrix) and fidelity 1.0: each step is refused, naming what is wrong.
    (Written as another writer would, past the Recorder's own checks.)"""
    monkeypatch.setattr(_inputs, "sketch_scale_problem", lambda value: None)
    monkeypatch.setattr(_inputs, "gram_problem", lambda gram: None)
    _crafted(tmp_path / "run", **geometry)
    monkeypatch.undo()
    result = CliRunner().invoke(app, ["replay", str(tmp_path / "run")], terminal_width=400)
    assert result.exit_code == 3, result.output
    assert "no step could be read" in result.output
    assert said in result.output
    assert "Traceback" not in result.output


def test_replay_takes_a_gram_with_rounding_and_nonfinite_entries(tmp_path: Path) -> None:
    """float32 rounding of K_uv vs K_vu, a unit with a zero gradient and a NaN entry (a step's
    non-finite gradients) are no reason to refuse a step."""
    gram = (GRADS @ GRADS.T).astype(np.float64)
    gram[0, 1] *= 1 + 1e-6
    gram[3, :] = gram[:, 3] = 0.0
    gram[1, 2] = gram[2, 1] = np.nan
    _crafted(tmp_path / "run", unit_grad_gram=gram.astype(np.float32))
    assert sd.replay(tmp_path / "run").geometry == "gram"


def test_recorder_refuses_a_step_with_both_geometries(tmp_path: Path) -> None:
    """A step records a Gram or a sketch (docs/run-format.md); given both, replay used the
    Gram and never read the sketch."""
    with pytest.raises(UsageError, match="records one geometry or the other, not both"):
        _crafted(tmp_path / "run", unit_grad_gram=GRADS @ GRADS.T, unit_grad_sketch=GRADS)


@pytest.mark.parametrize("scale", [0.0, -2.0, float("-inf")])
def test_recorder_refuses_a_sketch_scale_not_above_zero(tmp_path: Path, scale: float) -> None:
    with pytest.raises(UsageError, match=r"unit_grad_sketch_scale is .*: a per-step scale is > 0"):
        _crafted(tmp_path / "run", unit_grad_sketch=SKETCH, unit_grad_sketch_scale=scale)


def test_a_nan_sketch_scale_gives_nonfinite_norms(tmp_path: Path) -> None:
    """A NaN scale (a step's non-finite gradients) is recorded and replayed: norms NaN."""
    _crafted(tmp_path / "run", unit_grad_sketch=SKETCH, unit_grad_sketch_scale=float("nan"))
    own = sd.replay(tmp_path / "run").own
    assert own is not None
    assert own.summary.update_norm_median is None


@pytest.mark.parametrize(
    ("gram", "said"),
    [(-(GRADS @ GRADS.T), "diagonal entry [0, 0] is -0.55"), (ASYMMETRIC, "not symmetric")],
    ids=["negative-diagonal", "asymmetric"],
)
def test_recorder_refuses_a_matrix_that_is_no_gram(
    tmp_path: Path, gram: np.ndarray, said: str
) -> None:
    with pytest.raises(UsageError, match=r"unit_grad_gram is no Gram matrix: .*" + re.escape(said)):
        _crafted(tmp_path / "run", unit_grad_gram=gram)


def _replay_json(source: Path) -> dict[str, object]:
    result = CliRunner().invoke(app, ["replay", str(source), "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    data.pop("run")
    return data


@pytest.mark.parametrize(
    ("kind", "geometry", "warned", "caption"),
    [
        (
            "unit_grad_gram",
            {"gram": True},
            "its ranks' Gram matrices (unit_grad_gram, 3 steps)",
            "the run's ranks recorded Gram matrices (unit_grad_gram)",
        ),
        (
            "unit_grad_sketch",
            {"gram": False, "sketch_ranks": (0,)},
            "its ranks' sketches (unit_grad_sketch, 3 steps) do not join (only some ranks",
            "only some of the run's ranks recorded a sketch (unit_grad_sketch)",
        ),
        (
            "unit_grad_sketch",
            UNJOINED_RUNS["seeds"],
            "its ranks' sketches (unit_grad_sketch, 3 steps) do not join",
            "the run's ranks recorded sketches (unit_grad_sketch) with different seeds",
        ),
        (
            "unit_grad_sketch",
            UNJOINED_RUNS["widths"],
            "its ranks' sketches (unit_grad_sketch, 3 steps) do not join",
            "the run's ranks recorded sketches (unit_grad_sketch) of different widths k",
        ),
    ],
    ids=["grams", "sketch of rank 0", "seeds", "widths"],
)
def test_pack_keeps_which_geometry_the_join_left_out(
    tmp_path: Path, kind: str, geometry: dict[str, Any], warned: str, caption: str
) -> None:
    """The archive replays with the directory's caption and JSON, pack warning of what it
    leaves out (of sketches of other seeds or widths, why too: the archive said only some
    ranks recorded one); an archive without `unjoined/` (packed before it) reads as before."""
    _record(tmp_path / "run", **geometry)
    archive = tmp_path / "run.h5"
    packed = CliRunner().invoke(
        app, ["pack", str(tmp_path / "run"), str(archive), "--format", "json"], terminal_width=400
    )
    assert packed.exit_code == 0, packed.output
    assert warned in packed.stderr
    assert json.loads(packed.stdout)["unjoined_geometry"] == {kind: 3}
    with sd.open_run(archive) as run:
        assert run.step(0).unjoined == frozenset({kind})
    assert _replay_json(archive) == _replay_json(tmp_path / "run")
    _, stderr, table = _replay(archive)
    assert f"a proxy: {caption}" in table and "no gradient geometry" not in table
    if "seeds" in geometry or "widths" in geometry:
        assert "its ranks recorded sketches with different " in stderr
    with h5py.File(archive, "a") as handle:
        del handle["unjoined"]
    older = CliRunner().invoke(app, ["replay", str(archive)], terminal_width=400)
    assert older.exit_code == 0, older.output
    assert "the run recorded no gradient geometry" in older.output


@pytest.mark.parametrize("kind", ["sketch_seeds_differ", "sketch_widths_differ"])
def test_an_archive_flagging_why_of_a_sketch_it_holds_is_refused(tmp_path: Path, kind: str) -> None:
    """`unjoined/sketch_*_differ` only flags steps whose sketch is flagged left out."""
    _record(tmp_path / "run", gram=False, sketch_ranks=(0, 1))
    archive = tmp_path / "run.h5"
    pack_run(tmp_path / "run", archive)
    with h5py.File(archive, "a") as handle:
        flags = np.ones(len(handle["steps/step"]), dtype=np.uint8)
        handle.create_dataset(f"unjoined/{kind}", data=flags)
        handle[f"unjoined/{kind}"].attrs["crc32"] = index_crc(flags)
    result = CliRunner().invoke(app, ["replay", str(archive)], terminal_width=400)
    assert result.exit_code == 3, result.output
    assert f"corrupt run archive (unjoined/{kind} flags a step" in result.stderr


@pytest.mark.parametrize("where", ["a step that holds it", "a one-rank run"])
def test_crafted_unjoined_flags_are_refused(tmp_path: Path, where: str) -> None:
    if where == "a one-rank run":
        _crafted(tmp_path / "run")
    else:
        _record(tmp_path / "run", gram=False, sketch_ranks=(0, 1))
    archive = tmp_path / "run.h5"
    pack_run(tmp_path / "run", archive)
    with h5py.File(archive, "a") as handle:
        flags = np.ones(len(handle["steps/step"]), dtype=np.uint8)
        handle.create_dataset("unjoined/unit_grad_sketch", data=flags)
        handle["unjoined/unit_grad_sketch"].attrs["crc32"] = index_crc(flags)
    result = CliRunner().invoke(app, ["replay", str(archive)], terminal_width=400)
    assert result.exit_code == 3, result.output
    assert "corrupt run archive (unjoined/unit_grad_sketch flags a step" in result.stderr
    assert "Traceback" not in result.output


def _resumed(out: Path, parts: list[tuple[dict[str, Any], range, str, int]]) -> None:
    """A one-rank run recorded in `parts`, a Recorder each (the first new, then resumed):
    (its geometry entry, its steps, the field its steps at the entry's `every` hold, k): a
    [4, k] sketch, or the Gram of [4, k] gradients."""
    rng = np.random.default_rng(0)
    for n, (geometry, steps, field, k) in enumerate(parts):
        with sd.Recorder(
            out, policy="grpo", unit="sequence", resume=n > 0, overwrite=n == 0, geometry=geometry
        ) as recorder:
            for step in steps:
                grads = rng.normal(size=(4, k)).astype(np.float32)
                every = geometry.get("every", 1)
                held = grads @ grads.T if field == "unit_grad_gram" else grads
                recorder.log_step(
                    step,
                    logp=rng.normal(-1.0, 0.1, 4).astype(np.float32),
                    logp_old=np.full(4, -1.0, dtype=np.float32),
                    advantages=np.array([1.0, -1.0, 0.5, -0.5], dtype=np.float32),
                    **({field: held} if step % every == 0 else {}),
                )


def test_inspect_names_the_widths_of_a_run_resumed_with_another_k(tmp_path: Path) -> None:
    """A run recorded with k=8 (steps 0-2) and resumed with k=16 (steps 3-5): inspect said
    `geometry: sketch, k=8`, the manifest's, though half the steps hold 16 columns; it now
    names each k with its steps, from the run directory and from its archive alike."""
    _resumed(
        tmp_path / "run",
        [({"kind": "sketch", "sketch": {"k": k, "seed": 0}}, steps, "unit_grad_sketch", k)
         for k, steps in ((8, range(3)), (16, range(3, 6)))],
    )  # fmt: skip
    pack_run(tmp_path / "run", tmp_path / "run.h5")
    for source in (tmp_path / "run", tmp_path / "run.h5"):
        table = CliRunner().invoke(app, ["inspect", str(source)], terminal_width=400)
        assert "sketch, k=8 on steps 0..2, k=16 on steps 3..5" in table.stdout, table.output
        data = json.loads(
            CliRunner().invoke(app, ["inspect", str(source), "--format", "json"]).stdout
        )
        assert data["geometry"]["sketch"]["k"] == 8
        assert data["sketch_widths"] == [
            {"k": 8, "steps": 3, "first_step": 0, "last_step": 2},
            {"k": 16, "steps": 3, "first_step": 3, "last_step": 5},
        ]
    _resumed(  # a width a step: the row lists 20
        tmp_path / "many",
        [({"kind": "sketch", "sketch": {"k": 1}}, range(n, n + 1), "unit_grad_sketch", n + 1)
         for n in range(25)],
    )  # fmt: skip
    table = CliRunner().invoke(app, ["inspect", str(tmp_path / "many")], terminal_width=400)
    lines = table.stdout.splitlines()
    first = next(n for n, line in enumerate(lines) if "│ geometry " in line)
    row = [lines[first], *itertools.takewhile(lambda line: line[1:3] == "  ", lines[first + 1 :])]
    text = " ".join(line.split("│")[2].strip() for line in row)
    assert text.endswith("k=20 on step 19 ... and 5 more widths: --format json has them all")


def test_inspect_counts_the_steps_with_geometry_after_a_resume_with_another_cadence(
    tmp_path: Path,
) -> None:
    """A run recorded with a Gram every 4 steps (steps 0-7) and resumed with one every step
    (steps 8-11): inspect said `gram, every 4 steps`, the manifest's, of a run holding 6 Grams
    in 12 steps (replay: coverage 50%); it counts them."""
    _resumed(
        tmp_path / "run",
        [({"kind": "gram", "every": every}, steps, "unit_grad_gram", 6)
         for every, steps in ((4, range(8)), (1, range(8, 12)))],
    )  # fmt: skip
    table = CliRunner().invoke(app, ["inspect", str(tmp_path / "run")], terminal_width=400)
    row = next(line for line in table.stdout.splitlines() if "│ geometry " in line)
    assert row.split("│")[2].strip() == "gram, every 4 steps, on 6 of 12 steps"
    data = CliRunner().invoke(app, ["inspect", str(tmp_path / "run"), "--format", "json"])
    assert json.loads(data.stdout)["geometry_steps"] == 6
    _resumed(tmp_path / "kept", [({"kind": "gram", "every": 4}, range(1, 9), "unit_grad_gram", 6)])
    table = CliRunner().invoke(app, ["inspect", str(tmp_path / "kept")], terminal_width=400)
    row = next(line for line in table.stdout.splitlines() if "│ geometry " in line)
    assert row.split("│")[2].strip() == "gram, every 4 steps"  # steps 4 and 8, as it says
