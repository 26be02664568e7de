"""`Run.step(n)` given what is no step number: the UsageError log_step gives for one, not a
step read under a bool or float as its number, nor an InputError that the run lacks it."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import RunIntegrityWarning, pack_run
from stabledrl_cli.errors import InputError, UsageError


@pytest.fixture
def run_path(tmp_path: Path) -> Path:
    with sd.Recorder(tmp_path / "run", policy=None) as recorder:
        for n in range(3):
            recorder.log_step(n, loss=float(n))
    return tmp_path / "run"


@pytest.mark.parametrize("number", [True, 1.0, "1", None, -1])
def test_what_is_no_step_number_is_a_usage_error(run_path: Path, number: object) -> None:
    """Before: True and 1.0 read step 1 as a step whose .step was True or 1.0; '1', None and
    -1 were InputErrors, 'no step 1' (exit 3: as if the run lacked them)."""
    with sd.open_run(run_path) as run, pytest.raises(UsageError) as refused:
        run.step(number)  # type: ignore[arg-type]
    assert str(refused.value) == f"step must be an int in [0, 2**63 - 1], got {number!r}"


def test_a_numpy_integer_reads_the_step_as_its_int(run_path: Path) -> None:
    with sd.open_run(run_path) as run:
        step = run.step(np.int64(1))  # type: ignore[arg-type]
        assert type(step.step) is int and step.step == 1 and step.scalars["loss"] == 1.0
        with pytest.raises(InputError, match=r": no step 7$"):
            run.step(7)


@pytest.mark.parametrize(("start", "stop"), [("1", None), (None, 2.5), (True, 3), (-1, None)])
def test_steps_bounds_that_are_no_step_numbers_are_a_usage_error(
    run_path: Path, start: object, stop: object
) -> None:
    """Before: run.steps("1") raised TypeError ("'>=' not supported between instances of 'int'
    and 'str'"), and 2.5, True and -1 were taken as bounds."""
    bad, name = (start, "start") if start is not None else (stop, "stop")
    with sd.open_run(run_path) as run, pytest.raises(UsageError) as refused:
        list(run.steps(start, stop))  # type: ignore[arg-type]
    assert str(refused.value) == f"{name} must be an int in [0, 2**63 - 1], got {bad!r}"


def test_steps_bounds_may_be_numpy_integers(run_path: Path) -> None:
    with sd.open_run(run_path) as run:
        assert [s.step for s in run.steps(np.int64(1), np.int32(3))] == [1, 2]  # type: ignore[arg-type]


def test_steps_of_a_number_the_run_does_not_hold_warns_that_it_has_no_such_step(
    run_path: Path,
) -> None:
    """Before: the warning called the absent step of a one-rank run 'incomplete, no file for
    rank(s) [0]', as if a rank had failed to write it."""
    with sd.open_run(run_path) as run, pytest.warns(RunIntegrityWarning) as warned:
        assert [s.step for s in run.steps_of([1, 7])] == [1]
    assert [str(w.message) for w in warned] == [
        f"{run_path}: skipping step 7: missing_rank: no file of step 7: the run does not hold it"
    ]


def test_a_scalar_asked_for_as_an_array_is_named_as_a_scalar(run_path: Path) -> None:
    """step["loss"] said only "step 1 has no field 'loss'; it has: []", of a step that
    recorded loss: the KeyError now says where it is (step.scalars['loss'])."""
    step = sd.open_run(run_path).step(1)
    with pytest.raises(KeyError) as missing:
        step["loss"]
    assert missing.value.args[0] == (
        "step 1 has no field 'loss'; it has: []; 'loss' is a scalar: step.scalars['loss']"
    )
    with pytest.raises(KeyError) as missing:
        step.array("lr")
    assert missing.value.args[0] == "step 1 has no field 'lr'; it has: []"


def test_a_step_reads_as_the_mapping_its_indexing_makes_it(tmp_path: Path) -> None:
    """`step[name]`, `step.get(name)` and `name in step` read a step as a mapping of its
    fields, but `step.keys()` raised "'list' object is not callable" on a directory's step (an
    internal list of file keys) and AttributeError on an archive's, and `list(step)` and
    `dict(step)` KeyError "step 0 has no field 0". keys() and iteration give the field names,
    sorted, from either reader; dict(step) every array as a tensor."""
    rng = np.random.default_rng(0)
    logp = -rng.random((2, 3)).astype(np.float32)
    with sd.Recorder(tmp_path / "run", policy="grpo") as recorder:
        recorder.log_step(0, logp=logp, logp_old=logp, advantages=np.ones(2, np.float32))
    pack_run(tmp_path / "run", tmp_path / "run.h5")
    for source in ("run", "run.h5"):
        with sd.open_run(tmp_path / source) as run:
            step = run.step(0)
            assert step.keys() == list(step) == sorted(step.fields)
            arrays = dict(step)
            assert sorted(arrays) == sorted(step.fields)
            assert np.array_equal(arrays["logp"].numpy(), logp.reshape(-1)), source


@pytest.mark.parametrize("number", [True, 1.0, "1", None, -1])
def test_steps_of_what_is_no_step_number_is_a_usage_error(run_path: Path, number: object) -> None:
    """run.step(1.0) is refused, but run.steps_of([1.0]) read step 1 as a step whose .step was
    1.0 (True: True), and steps_of(["1"]) or [-1] warned that the run did not hold the step.
    Each number is checked as step() checks it; a numpy integer reads as its int."""
    for source in (run_path, _packed(run_path)):
        with sd.open_run(source) as run, pytest.raises(UsageError) as refused:
            list(run.steps_of([0, number]))  # type: ignore[list-item]
        assert str(refused.value) == f"step must be an int in [0, 2**63 - 1], got {number!r}"
        with sd.open_run(source) as run:
            [step] = run.steps_of([np.int64(1)])  # type: ignore[list-item]
            assert type(step.step) is int and step.step == 1


def _packed(run_path: Path) -> Path:
    archive = run_path.with_suffix(".h5")
    if not archive.exists():
        pack_run(run_path, archive)
    return archive


def test_scalar_series_of_what_is_no_scalar_name_is_a_usage_error(run_path: Path) -> None:
    """run.scalar_series_many("loss") (a name where a list of them goes) returned the series of
    'l', 'o' and 's', each empty, and scalar_series(3) or (b"loss") an empty series: as if the
    run had not recorded them. A name must be a str, and the names a list of them."""
    for source in (run_path, _packed(run_path)):
        _scalar_names_refused(source)


def _scalar_names_refused(source: Path) -> None:
    with sd.open_run(source) as run:
        for call, said in (
            (lambda: run.scalar_series_many("loss"), "names must be a list of scalar names"),
            (lambda: run.scalar_series_many(["loss", 3]), "a scalar name is a str, not int"),
            (lambda: run.scalar_series(b"loss"), "a scalar name is a str, not bytes"),
        ):
            with pytest.raises(UsageError, match=said):
                call()
        steps, values = run.scalar_series_many(("loss",))["loss"]
        assert steps.tolist() == [0, 1, 2] and values.tolist() == [0.0, 1.0, 2.0]


def test_an_archives_run_and_steps_pickle_as_a_directorys_do(run_path: Path) -> None:
    """A directory's run and steps pickle (a multiprocessing pool's workers take them); an
    archive's raised TypeError 'h5py objects cannot be pickled'. An archive's run pickles as
    the way to open it again (its source), so its steps read the same in another process; a
    closed one is refused as reading it is."""
    archive = _packed(run_path)
    with sd.open_run(archive) as run:
        step = run.step(1)
        again, step_again = pickle.loads(pickle.dumps((run, step)))
        assert again.step_numbers == run.step_numbers == [0, 1, 2]
        assert step_again.step == 1 and step_again.scalars == step.scalars
        assert [s.scalars["loss"] for s in again] == [0.0, 1.0, 2.0]
        again.close()
    with pytest.raises(UsageError, match="the run was closed"):
        pickle.dumps(run)


def test_a_scalar_named_twice_or_by_an_iterator_is_read_once_a_step(run_path: Path) -> None:
    """A directory run's scalar_series_many(["loss", "loss"]) held each step's loss twice, and
    scalar_series_many(iter(["loss"])) no value at all; `inspect` asks for `inner_step` beside
    every recorded scalar, so its series counted 800 steps of inner_step in a 400-step run (and
    its `tail` averaged the last 5 steps, not 10). An archive's read each step once."""
    for source in (run_path, _packed(run_path)):
        with sd.open_run(source) as run:
            for names in (["loss", "loss"], iter(["loss"]), (n for n in ("loss",))):
                steps, values = run.scalar_series_many(names)["loss"]
                assert steps.tolist() == [0, 1, 2] and values.tolist() == [0.0, 1.0, 2.0]


def test_inspect_counts_each_step_of_inner_step_once(tmp_path: Path) -> None:
    with sd.Recorder(tmp_path / "run", policy=None) as recorder:
        for n in range(12):
            recorder.log_step(n, loss=float(n), inner_step=n % 4)
    done = CliRunner().invoke(app, ["inspect", str(tmp_path / "run"), "-f", "json"])
    assert done.exit_code == 0, done.stderr
    inner = json.loads(done.stdout)["series"]["inner_step"]
    assert inner["steps"] == 12
    assert inner["tail"] == pytest.approx(np.mean([n % 4 for n in range(2, 12)]))
