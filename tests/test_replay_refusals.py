"""A replay that cannot run says why in one true line, with the exit code of its cause: a
scalar run with steps skipped (a multi-rank run's rank behind, a torn file) has nothing to
replay and names them (3); an archive whose index fails its checksum is named as such, not as
a skipped step file (3); a manifest's own policy that cannot act on the run's units is a note,
not a usage error; the Python API names an argument of the wrong type (2). And `replay(PATH)`
closes the run it opened, failed or not: no file of PATH is left open."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from _corpus import edit_archive, edit_manifest, flip_index
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import pack_run
from stabledrl_cli.errors import InputError, StabledrlError, UsageError
from stabledrl_cli.replay.engine import NothingToReplay
from stabledrl_cli.replay.engines import LocalEngine

ROOT = Path(__file__).resolve().parents[1]
STEPS = 5


def _multirank_scalar_run(path: Path, *, behind: int = 1) -> Path:
    """Two ranks of per-step scalars (no policy batch); rank 1 `behind` steps behind rank 0,
    as a live run's lagging rank leaves it (its last steps miss rank 1's file)."""
    for rank in (0, 1):
        with sd.Recorder(path, policy=None, rank=rank, world_size=2) as rec:
            for step in range(STEPS - behind * rank):
                rec.log_step(step, grad_norm=1.0, reward_mean=0.5, step_time=0.1)
    return path


def _open_files(path: Path) -> list[str]:
    """The files of this process's open descriptors that are `path` or lie under it."""
    opened = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own descriptor, closed by now
            continue
        if target == str(path) or target.startswith(f"{path}/"):
            opened.append(target)
    return opened


def test_a_multirank_scalar_run_with_a_rank_behind_has_nothing_to_replay(tmp_path):
    complete = _multirank_scalar_run(tmp_path / "complete", behind=0)
    lagging = _multirank_scalar_run(tmp_path / "lagging")
    done = CliRunner().invoke(app, ["replay", str(complete), "-p", "grpo"])
    lagged = CliRunner().invoke(app, ["replay", str(lagging)])
    assert done.exit_code == lagged.exit_code == 3, (done.stderr, lagged.stderr)
    assert done.stdout == lagged.stdout == ""
    assert f"{complete}: nothing to replay: a scalar run ({STEPS} steps" in done.stderr
    (line,) = lagged.stderr.strip().splitlines()
    assert f"{lagging}: nothing to replay: no readable step holds a policy batch" in line
    assert f"{STEPS - 1} steps of per-step scalars" in line
    assert "1 step was skipped: step 4: incomplete, no file for rank(s) [1]" in line
    assert "`stabledrl inspect` shows it and `stabledrl check`" in line
    assert "no step could be read" not in line


@pytest.mark.parametrize("engine", ["local", "processes"])
def test_the_api_refuses_a_multirank_scalar_run_as_nothing_to_replay(tmp_path, engine):
    run = _multirank_scalar_run(tmp_path / "run")
    with pytest.raises(NothingToReplay, match="no readable step holds a policy batch"):
        sd.replay(run, "grpo", engine=engine)


def test_a_scalar_run_with_a_torn_step_has_nothing_to_replay_and_names_it(tmp_path):
    """Its other steps were read: the torn file is named, as it may have held a batch."""
    path = tmp_path / "run"
    with sd.Recorder(path, policy=None) as rec:
        for step in range(STEPS):
            rec.log_step(step, grad_norm=1.0, step_time=0.1)
    last = sorted((path / "steps").iterdir())[-1]
    last.write_bytes(last.read_bytes()[:50])
    with pytest.raises(NothingToReplay) as raised:
        sd.replay(path, "grpo")
    assert "no readable step holds a policy batch (4 steps of per-step scalars; 1 step was " in (
        str(raised.value)
    )
    assert "step 4: torn" in str(raised.value)


@pytest.mark.parametrize("command", ["replay", "check"])
def test_an_archive_whose_index_fails_its_checksum_is_named_as_such(tmp_path, command):
    archive = edit_archive(tmp_path, flip_index("steps/step"))
    gate = ["--max-collapsed", "0"] if command == "check" else []
    done = CliRunner().invoke(app, [command, str(archive), "-p", "grpo", *gate])
    assert done.exit_code == 3, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line == (
        f"error: {archive}: no step could be read (archive index steps/step: checksum "
        "mismatch; every step is skipped)"
    )


def _scalar_archive(tmp_path: Path) -> Path:
    run = _multirank_scalar_run(tmp_path / "run", behind=0)
    pack_run(sd.open_run(run), tmp_path / "run.h5")
    return tmp_path / "run.h5"


@pytest.mark.parametrize("where", ["directory", "archive", "archive URL"])
@pytest.mark.parametrize(
    ("policy", "error"), [("grpo", NothingToReplay), ("no-such-policy", UsageError)]
)
def test_a_failed_replay_closes_the_run_it_opened(tmp_path, where, policy, error):
    """Looked at while the error is still held, as a notebook keeps the last one: its
    traceback holds the replay's frames. (A directory run holds no file open between reads.)"""
    if where == "directory":
        run = _multirank_scalar_run(tmp_path / "run", behind=0)
    else:
        run = _scalar_archive(tmp_path)
    with pytest.raises(error) as raised:
        sd.replay(run.as_uri() if where == "archive URL" else run, policy)
    assert isinstance(raised.value, StabledrlError)
    assert _open_files(run) == []


def test_a_replay_of_an_opened_run_leaves_it_open_for_its_caller(tmp_path):
    archive = _scalar_archive(tmp_path)
    opened = sd.open_run(archive)
    with pytest.raises(InputError):
        sd.replay(opened, "grpo")
    assert _open_files(archive) == [str(archive)]
    assert opened.step_numbers == list(range(STEPS))


@pytest.mark.parametrize("where", ["directory", "archive"])
def test_a_run_opened_in_a_with_block_is_closed_at_its_end(tmp_path, where):
    """`with sd.open_run(PATH) as run:` closes what the run holds open when the block ends,
    also when the block raises; closing twice is harmless."""
    if where == "archive":
        run_path = _scalar_archive(tmp_path)
    else:
        run_path = _multirank_scalar_run(tmp_path / "run", behind=0)
    with sd.open_run(run_path) as run:
        assert run.step_numbers == list(range(STEPS))
    assert _open_files(run_path) == []
    with pytest.raises(InputError), sd.open_run(run_path) as run:
        sd.replay(run, "grpo")
    assert _open_files(run_path) == []
    run.close()


def test_an_own_policy_that_cannot_act_on_the_runs_units_is_noted_not_a_usage_error(tmp_path):
    """A manifest naming stabledrl:level=token for a run of sequence units (no Recorder
    writes it; another writer may): replay without -p is the catalogue's, with the note a
    custom own policy gets, not exit 2 telling the user to fix a spec they never gave."""
    run = tmp_path / "run"
    with sd.Recorder(run, unit="sequence", policy="stabledrl") as rec:
        for step in range(3):
            rec.log_step(step, logp=[-1.0, -2.0], logp_old=[-1.1, -2.0], advantages=[1.0, -1.0])
    edit_manifest(run, lambda manifest: manifest["policy"].update(spec="stabledrl:level=token"))
    replayed = CliRunner().invoke(app, ["replay", str(run), "--format", "json"])
    asked = CliRunner().invoke(app, ["replay", str(run), "-p", "stabledrl:level=token"])
    assert replayed.exit_code == 0, replayed.stderr
    assert not any(policy["own"] for policy in json.loads(replayed.stdout)["policies"])
    text = " ".join(replayed.stderr.split())
    assert "note: the run's own policy 'stabledrl:level=token' is none the catalogue replays" in (
        text
    )
    assert "level=token needs token units" in text
    assert asked.exit_code == 2, asked.stderr  # a spec the user gives is the user's to fix


@pytest.mark.parametrize(
    ("run", "policies", "message"),
    [
        (None, "grpo", "run must be a path, a URL or an opened Run, not NoneType"),
        (3, "grpo", "run must be a path, a URL or an opened Run, not int"),
        ("fixtures/grpo", 3, "policies must be a spec, a Policy or a list of them, not int"),
        # a dict replayed its keys, its values dropped silently
        (
            "fixtures/grpo",
            {"grpo": {"eps": 0.1}},
            "policies must be a spec, a Policy or a list of them, not dict",
        ),
    ],
)
def test_the_api_names_an_argument_of_the_wrong_type(run, policies, message):
    """Not Python's own text ("expected str, bytes or os.PathLike object, not NoneType",
    "'int' object is not iterable")."""
    with pytest.raises(UsageError) as raised:
        sd.replay(ROOT / run if isinstance(run, str) else run, policies)
    assert str(raised.value) == message


def test_an_engine_class_instead_of_an_engine_object_is_named():
    """engine=LocalEngine (not LocalEngine()) raised TypeError "LocalEngine.stream() missing 1
    required positional argument: 'progress'" once the pass began."""
    with pytest.raises(UsageError, match=r"engine must be .* or an engine object, got <class"):
        sd.replay(ROOT / "fixtures" / "grpo", "grpo", engine=LocalEngine)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_report_that_cannot_be_written_is_named_in_the_systems_words(tmp_path):
    """`replay --out /proc/x.h5` said "cannot write it (Unable to synchronously create file
    (unable to open file: name = '/proc/.x.h5.tmp-25077', errno = 2, ...))": HDF5's text, and
    a temporary name the user never gave. Now the path given and the system's reason."""
    run = tmp_path / "run"
    with sd.Recorder(run, unit="sequence", policy="grpo") as rec:
        for step in range(3):
            rec.log_step(step, logp=[-1.0, -2.0], logp_old=[-1.1, -2.0], advantages=[1.0, -1.0])
    done = CliRunner().invoke(app, ["replay", str(run), "-p", "grpo", "--out", "/proc/x.h5"])
    assert done.exit_code == 4, done.stderr
    assert done.stderr.splitlines()[-1] == (
        "error: --out /proc/x.h5: cannot write it (No such file or directory)"
    )
