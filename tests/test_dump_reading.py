"""How the readers touch the disk: a step file opened once, archive datasets opened once, arrays
that do not alias each other, and a file changed after its check refused rather than misread."""

from __future__ import annotations

import collections
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import _step_encoding, _stfile, pack_run
from stabledrl_cli.errors import InputError


def _record(path, steps=3, sequences=4, length=6, seed=0):
    rng = np.random.default_rng(seed)
    with sd.Recorder(path, policy="grpo", unit="token") as rec:
        for step in range(steps):
            logp_old = -rng.random((sequences, length)).astype(np.float32)
            rec.log_step(
                step,
                logp=logp_old + 0.01,
                logp_old=logp_old,
                advantages=rng.normal(size=sequences).astype(np.float32),
                mask=np.ones((sequences, length), dtype=bool),
                group_id=np.arange(sequences) // 2,
                reward=rng.random(sequences).astype(np.float32),
                loss=0.5 + seed,
            )
    return path


def _every_array(run):
    return [{name: step[name].clone() for name in sorted(step.fields)} for step in run.steps()]


def _count_step_opens(monkeypatch, log: Path) -> Callable[[], collections.Counter[str]]:
    """From now on, each opening of a step file is logged to the file `log` (so a forked
    worker's are too); the returned callable counts them by file name."""
    real_open = os.open

    def logging_open(file, *args, **kwargs):
        if str(file).endswith(".safetensors"):
            with open(log, "a") as out:
                out.write(os.path.basename(file) + "\n")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(_stfile.os, "open", logging_open)
    return lambda: collections.Counter(log.read_text().split() if log.exists() else [])


def test_a_pass_over_a_listed_run_opens_each_step_file_once(tmp_path, monkeypatch):
    path = _record(tmp_path / "run")
    run = sd.open_run(path)
    assert run.step_numbers == [0, 1, 2]  # the listing has read each header
    opened = _count_step_opens(monkeypatch, tmp_path / "opens.log")
    arrays = _every_array(run)
    assert len(arrays) == 3 and all("logp" in a and "reward" in a for a in arrays)
    assert opened() == {f"step-{n:08d}.safetensors": 1 for n in range(3)}


@pytest.mark.parametrize("how", ["api", "cli"])
def test_a_replay_opens_each_step_file_once(tmp_path, monkeypatch, how):
    """A whole replay (its pass, the recorded scalars, the integrity count; the command's
    progress too) opens each step file once: the pass reads a file whole and later looks are
    answered from its check, and it checks the first step's fields against the policies
    before computing any. Before, every file was opened twice (listing the run read every
    header first), then the first one still was: its header was read apart for that check.
    The command reads the first step's header apart once more: a scalar run (no step with a
    policy batch) is refused from its headers before torch loads."""
    path = _record(tmp_path / "run", steps=4)
    opened = _count_step_opens(monkeypatch, tmp_path / "opens.log")
    if how == "api":
        assert sd.replay(path, ["grpo"]).steps == 4
    else:
        shown = CliRunner().invoke(app, ["replay", str(path), "-p", "grpo", "--format", "json"])
        assert shown.exit_code == 0, shown.output
        assert json.loads(shown.stdout)["steps"] == 4
    names = [f"step-{n:08d}.safetensors" for n in range(4)]
    assert opened() == {names[0]: 1 + (how == "cli"), **dict.fromkeys(names[1:], 1)}


def test_a_sharded_replay_reads_each_step_file_once(tmp_path, monkeypatch):
    """`--engine processes`: a worker reads each step of its shard once, and the replay's own
    process reads none (the first step's header apart, to refuse a request the workers cannot
    serve before they start): its integrity report
    takes the workers' checks, a torn step's too. Before, the driver read every file once
    more for that report while the workers computed. The opens are logged to a file, as
    forked workers make them in processes of their own."""
    from stabledrl_cli.replay.process_engine import ProcessEngine

    path = _record(tmp_path / "run", steps=6)
    torn = path / "steps" / "step-00000004.safetensors"
    torn.write_bytes(torn.read_bytes()[:-5])
    local = sd.replay(path, ["grpo"])
    opened = _count_step_opens(monkeypatch, tmp_path / "opens.log")
    sharded = sd.replay(path, ["grpo"], engine=ProcessEngine(workers=2))
    names = [f"step-{n:08d}.safetensors" for n in range(6)]
    assert opened() == {names[0]: 2, **dict.fromkeys(names[1:], 1)}
    assert sharded.steps == 5
    assert sharded.to_json() == local.to_json()
    assert sharded.skipped == local.skipped
    assert [reason[:12] for reason in sharded.skipped] == ["step 4: torn"]


@pytest.mark.parametrize("command", ["inspect", "pack"])
def test_inspect_and_pack_read_each_step_file_once(tmp_path, monkeypatch, command):
    """inspect (its integrity check, the replay's checks of each step's data, the recorded
    scalars) and pack (each step, then the integrity report it carries) open each step file
    once, and a damaged one too. Before, every file was opened twice: inspect checked every
    file in full and then read each again, pack listed every header before its pass."""
    path = _record(tmp_path / "run", steps=4)
    torn = path / "steps" / "step-00000002.safetensors"
    torn.write_bytes(torn.read_bytes()[:-5])
    opened = _count_step_opens(monkeypatch, tmp_path / "opens.log")
    extra = [str(tmp_path / "run.h5")] if command == "pack" else []
    shown = CliRunner().invoke(app, [command, str(path), *extra, "--format", "json"])
    assert shown.exit_code == 0, shown.output
    assert opened() == {f"step-{n:08d}.safetensors": 1 for n in range(4)}


@pytest.mark.parametrize(("command", "walks"), [("inspect", 2), ("check", 3)])
def test_inspect_and_check_look_each_header_up_a_bounded_number_of_times(
    tmp_path, monkeypatch, command, walks
):
    """After its pass, inspect walks the steps' headers once: the observed behaviour and the
    recorded series are derived from that walk (a look-up checks the file's identity and
    builds the step's record: 70 us a step, seconds on a 10,000-step run). check walks them
    once more, for the observed behaviour its replay derives, and looks the first step up
    first, to choose between a replay and a scalar run's gates, then once more as its replay
    refuses a scalar run before torch loads. Before, inspect looked each step up five times
    (the pass, its own walk, two for the recorded series, one for the observed behaviour)
    and check four times."""
    from stabledrl_cli.dump._directory import DirectoryRun

    path = _record(tmp_path / "run", steps=4)
    looked_up: collections.Counter[int] = collections.Counter()
    real = DirectoryRun._try_step

    def counting(self, n, **kwargs):
        looked_up[n] += 1
        return real(self, n, **kwargs)

    monkeypatch.setattr(DirectoryRun, "_try_step", counting)
    gate = ["--max-nonfinite", "1000"] if command == "check" else []
    shown = CliRunner().invoke(app, [command, str(path), *gate, "--format", "json"])
    assert shown.exit_code == 0, shown.output
    first = walks + 2 * (command == "check")
    assert looked_up == {0: first, **dict.fromkeys(range(1, 4), walks)}


def test_arrays_read_once_per_load_equal_what_was_recorded(tmp_path):
    """Directory and archive give the same arrays, and a step whose check is cached (a second
    pass) reads its file again, whole, with the same values."""
    path = _record(tmp_path / "run")
    pack_run(sd.open_run(path), tmp_path / "run.h5")
    run = sd.open_run(path)
    first, second = _every_array(run), _every_array(run)
    archived = _every_array(sd.open_run(tmp_path / "run.h5"))
    for a, b, c in zip(first, second, archived, strict=True):
        assert set(a) == set(b) == set(c)
        for name in a:
            assert torch.equal(a[name], b[name]) and torch.equal(a[name], c[name]), name


def test_changing_a_handed_out_array_changes_no_later_read(tmp_path):
    run = sd.open_run(_record(tmp_path / "run"))
    step = next(iter(run.steps()))
    logp = step["logp"]
    expected = logp.clone()
    logp.mul_(0)
    assert torch.equal(step["logp"], expected)
    assert torch.equal(step["logp_old"] + 0.01, expected)


def test_a_file_replaced_after_its_check_is_refused_not_misread(tmp_path):
    path = _record(tmp_path / "run")
    other = _record(tmp_path / "other", sequences=5)
    run = sd.open_run(path)
    _every_array(run)  # checked in full: the next load of step 0 does not read its file
    step = run.step(0)
    name = "step-00000000.safetensors"
    os.replace(other / "steps" / name, path / "steps" / name)
    with pytest.raises(InputError, match="changed since it was checked"):
        step["logp"]
    assert run.step(0).num_sequences == 5  # opened again: the new file, checked anew


def test_archive_opens_each_dataset_once_per_run(tmp_path, monkeypatch):
    path = _record(tmp_path / "run", steps=4)
    pack_run(sd.open_run(path), tmp_path / "run.h5")
    opened = []
    real_getitem = h5py.Group.__getitem__

    def counting_getitem(self, name):
        opened.append(name)
        return real_getitem(self, name)

    monkeypatch.setattr(h5py.Group, "__getitem__", counting_getitem)
    run = sd.open_run(tmp_path / "run.h5")  # its checks open the data datasets: once too
    arrays = _every_array(run)
    _every_array(run)
    assert len(arrays) == 4
    data = [name for name in opened if name.startswith(("tokens/", "sequences/", "ragged/"))]
    assert sorted(data) == sorted(set(data))
    assert {"tokens/logp", "sequences/reward"} <= set(data)


def _count_listings(monkeypatch):
    from stabledrl_cli.dump import _directory_files

    listed = []
    real_scandir = os.scandir

    def counting_scandir(path):
        listed.append(path)
        return real_scandir(path)

    monkeypatch.setattr(_directory_files.os, "scandir", counting_scandir)
    return listed


def test_an_unchanged_run_is_listed_once_and_a_new_step_is_seen(tmp_path, monkeypatch):
    path = _record(tmp_path / "run")
    settled = time.time_ns() - 10_000_000_000
    os.utime(path / "steps", ns=(settled, settled))
    listed = _count_listings(monkeypatch)
    run = sd.open_run(path)
    for _ in range(3):
        assert run.step_numbers == [0, 1, 2]
        assert len(_every_array(run)) == 3
    assert len(listed) == 1
    with sd.Recorder(path, policy="grpo", unit="token", resume=True) as rec:
        rec.log_step(3, logp=[-1.0], logp_old=[-1.0], advantages=[1.0], seq_id=[0])
    assert run.step_numbers == [0, 1, 2, 3]
    assert len(listed) == 2


def test_a_directory_changed_moments_ago_is_listed_on_every_pass(tmp_path, monkeypatch):
    """Within the clock's granularity a new file can leave the directory's time unchanged, so
    a listing is only reused once the directory has settled."""
    path = _record(tmp_path / "run")
    recent = time.time_ns() + 60_000_000_000  # however slow this test runs, not yet settled
    os.utime(path / "steps", ns=(recent, recent))
    listed = _count_listings(monkeypatch)
    run = sd.open_run(path)
    for _ in range(3):
        assert run.step_numbers == [0, 1, 2]
    assert len(listed) == 3


def test_a_remote_file_replaced_under_a_loaded_step_is_refused_not_misread(tmp_path):
    """Through fsspec, an array asked for again reads its file again: a file replaced on the
    store since the step was loaded is refused (its header is not the one checked)."""
    fsspec = pytest.importorskip("fsspec")
    path = _record(tmp_path / "run")
    other = _record(tmp_path / "other", sequences=5)
    memory = fsspec.filesystem("memory")
    root = f"/readers-{os.getpid()}-{time.time_ns()}/run"
    memory.pipe(f"{root}/manifest.json", (path / "manifest.json").read_bytes())
    for file in sorted((path / "steps").iterdir()):
        memory.pipe(f"{root}/steps/{file.name}", file.read_bytes())
    run = sd.open_run(f"memory://{root.lstrip('/')}")
    step = run.step(0)
    expected = step["logp"].clone()
    assert torch.equal(step["logp_old"] + 0.01, expected)
    name = "step-00000000.safetensors"
    memory.pipe(f"{root}/steps/{name}", (other / "steps" / name).read_bytes())
    with pytest.raises(InputError, match="changed since it was checked"):
        step["logp"]
    assert run.step_numbers == [0, 1, 2]  # a new pass lists the store again
    assert run.step(0).num_sequences == 5  # and checks the new file


def _log_dataset_reads(monkeypatch) -> list[str]:
    """From now on, the name of each HDF5 dataset read in this process, in a list returned."""
    read: list[str] = []
    real_getitem = h5py.Dataset.__getitem__

    def counting_getitem(self, key):
        read.append(self.name)
        return real_getitem(self, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", counting_getitem)
    return read


def _datasets_read_by_integrity(run, monkeypatch):
    read = _log_dataset_reads(monkeypatch)
    assert run.integrity.findings == []
    return read


def test_archive_integrity_after_a_pass_reads_nothing_again(tmp_path, monkeypatch):
    """Chunks decoded by the pass's step reads had their Fletcher32 checked then, and the
    indexes and texts were read whole at opening: the integrity check that follows a replay
    reads none of them again."""
    path = _record(tmp_path / "run", steps=4)
    pack_run(sd.open_run(path), tmp_path / "run.h5")
    run = sd.open_run(tmp_path / "run.h5")
    assert len(_every_array(run)) == 4
    assert _datasets_read_by_integrity(run, monkeypatch) == []


def test_archive_integrity_without_a_pass_reads_the_data_once(tmp_path, monkeypatch):
    path = _record(tmp_path / "run", steps=4)
    pack_run(sd.open_run(path), tmp_path / "run.h5")
    read = _datasets_read_by_integrity(sd.open_run(tmp_path / "run.h5"), monkeypatch)
    with h5py.File(tmp_path / "run.h5", "r") as handle:
        data = sorted(
            name
            for group in ("tokens", "sequences")
            for name in (handle[group][n].name for n in handle[group] if n != "step_offsets")
            # one chunk each, or with per-step CRC-32s, each of the 4 steps' slices once
            for _ in range(4 if f"checksums{name}" in handle else 1)
        )
        assert "/checksums/tokens/logp" in handle
    assert sorted(read) == data  # every data chunk or step slice once, no index again


def _archive_read_by_halves(path):
    """What two readers of the archive at `path` checked, each reading half its steps (as two
    shards' workers do)."""
    checks = []
    for half in ([0, 1], [2, 3]):
        reader = sd.open_run(path)
        assert [step.step for step in reader.steps_of(half)] == half
        checks.append(reader.checks())
    return checks


def test_archive_integrity_adopts_other_readers_checks(tmp_path, monkeypatch):
    """A reader that adopts the checks of the readers that read every step between them
    (a sharded replay's driver, its workers') reads no data for its integrity check."""
    path = _record(tmp_path / "run", steps=4)
    pack_run(sd.open_run(path), tmp_path / "run.h5")
    run = sd.open_run(tmp_path / "run.h5")
    for checks in _archive_read_by_halves(tmp_path / "run.h5"):
        run.adopt_checks(checks)
    assert _datasets_read_by_integrity(run, monkeypatch) == []


def test_archive_integrity_ignores_checks_of_another_file(tmp_path, monkeypatch):
    """Checks made on the archive before it was rewritten are not adopted (nor a directory
    reader's): the integrity check reads all the data, as with no checks at all."""
    path = _record(tmp_path / "run", steps=4)
    pack_run(sd.open_run(path), tmp_path / "run.h5")
    earlier = _archive_read_by_halves(tmp_path / "run.h5")
    (tmp_path / "run.h5").unlink()
    pack_run(sd.open_run(path), tmp_path / "run.h5")
    unchecked = sorted(_datasets_read_by_integrity(sd.open_run(tmp_path / "run.h5"), monkeypatch))
    monkeypatch.undo()
    run = sd.open_run(tmp_path / "run.h5")
    for checks in [*earlier, sd.open_run(path).checks()]:
        run.adopt_checks(checks)
    assert sorted(_datasets_read_by_integrity(run, monkeypatch)) == unchecked != []


def test_a_sharded_replay_of_an_archive_reads_no_data_in_the_driver(tmp_path, monkeypatch):
    """`--engine processes` on a .h5: the workers read the data, and the replay's process
    reads none of it again for its integrity report (its counter does not see the forked
    workers' reads, made in processes of their own)."""
    from stabledrl_cli.replay.process_engine import ProcessEngine

    path = _record(tmp_path / "run", steps=6)
    pack_run(sd.open_run(path), tmp_path / "run.h5")
    local = sd.replay(tmp_path / "run.h5", ["grpo"])
    read = _log_dataset_reads(monkeypatch)
    sharded = sd.replay(tmp_path / "run.h5", ["grpo"], engine=ProcessEngine(workers=2))
    assert sharded.to_json() == local.to_json()
    assert read == []


def test_a_diff_reads_the_data_of_the_steps_it_compares_only(tmp_path, monkeypatch):
    """`diff` of two runs that part at their first step, in every kind: it lists both runs
    from their step files' headers, and reads the data of the first step alone (then once
    more to replay it beside the other's, `--context 0`). Before, its warning about skipped
    step files came from a full integrity check: every file of both runs read whole first."""
    a = _record(tmp_path / "a", steps=6)
    b = _record(tmp_path / "b", steps=6, seed=1)
    opened = _count_step_opens(monkeypatch, tmp_path / "opens.log")
    shown = CliRunner().invoke(
        app, ["diff", str(a), str(b), "--context", "0", "--device", "cpu", "--format", "json"]
    )
    assert shown.exit_code == 1, shown.output
    assert json.loads(shown.stdout)["parted_at"] == 0
    names = [f"step-{n:08d}.safetensors" for n in range(6)]
    # each run's files: step 0 three times (header, compared, replayed), the others once
    assert opened() == {names[0]: 2 * 3, **dict.fromkeys(names[1:], 2 * 1)}


def test_a_replay_that_does_not_verify_counts_what_it_skips_and_reads_each_file_once(
    tmp_path, monkeypatch
):
    """`open_run(..., verify=False)`: a step whose data fails its checksum is replayed, so it
    is not reported skipped (it was: the report came from a full check, which also read every
    file whole a second time); a torn step, skipped at its header, still is."""
    path = _record(tmp_path / "run", steps=5)
    corrupt = path / "steps" / "step-00000002.safetensors"
    data = bytearray(corrupt.read_bytes())
    data[-3] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    torn = path / "steps" / "step-00000003.safetensors"
    torn.write_bytes(torn.read_bytes()[:-5])
    verified = sd.replay(path, "grpo")
    assert verified.steps == 3 and [r[:12] for r in verified.skipped] == [
        "step 2: unre",
        "step 3: torn",
    ]
    opened = _count_step_opens(monkeypatch, tmp_path / "opens.log")
    unverified = sd.replay(sd.open_run(path, verify=False), "grpo")
    assert unverified.steps == 4 and [r[:12] for r in unverified.skipped] == ["step 3: torn"]
    assert opened() == {f"step-{n:08d}.safetensors": 1 for n in range(5)}


def test_a_rank_recorded_with_another_world_size_is_not_joined(tmp_path):
    """A rank whose Recorder was given another world_size than the run's (a launcher's
    WORLD_SIZE 3 for a 2-rank run) says so in its files' headers: each of its steps is
    skipped as unreadable, naming both, instead of joined silently with rank 0's part. (Rank 1
    records first: one that starts after rank 0 made the run is refused by its Recorder.)"""
    run = tmp_path / "run"
    for rank, world_size in ((1, 3), (0, 2)):
        with sd.Recorder(run, world_size=world_size, rank=rank) as rec:
            for step in range(2):
                logp = -np.ones((2, 3), np.float32)
                rec.log_step(step, logp=logp, logp_old=logp, advantages=np.ones(2, np.float32))
    result = CliRunner().invoke(app, ["inspect", str(run), "-f", "json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["steps"] == 0
    messages = [f["message"] for f in report["integrity"]["findings"]]
    assert messages == [
        f"step {n}: unreadable: its header says rank '1' of world_size '3', its file name rank 1 "
        "of the run's world_size 2"
        for n in (0, 1)
    ]


def test_a_field_of_another_dtype_is_named_with_every_dtype_it_may_have(tmp_path):
    """A sketch may be stored float32 or float16; the finding of one stored int32 said
    'unit_grad_sketch: dtype I32, expected float32', as if float16 were refused too."""
    path = tmp_path / "run"
    with sd.Recorder(path, policy=None, unit="sequence") as rec:
        sketch = np.ones((1, 2), np.float32)
        rec.log_step(0, logp=[-1.0], logp_old=[-1.0], advantages=[1.0], unit_grad_sketch=sketch)
    file = path / "steps" / "step-00000000.safetensors"
    header = _stfile.read_header(file, deep=True, keep_data=True)
    tensors = {name: header.array(name) for name in header.tensors}
    tensors["unit_grad_sketch"] = tensors["unit_grad_sketch"].astype(np.int32)
    file.write_bytes(b"".join(_step_encoding.encode_step(tensors, header.metadata)))
    (finding,) = sd.open_run(path).integrity.findings
    assert finding.message.endswith("unit_grad_sketch: dtype I32, expected float32 or float16")


def test_a_step_one_rank_finished_after_the_listing_reads_whole(tmp_path):
    """`run.step(n)` of a step the last listing held partial (rank 1 still writing) read the
    listing again only for a step it did not hold: once rank 1 had written it, the step was
    still 'missing_rank: incomplete, no file for rank(s) [1]'."""
    path = tmp_path / "run"
    batch = {"logp": [-1.0], "logp_old": [-1.0], "advantages": [1.0]}
    ranks = [sd.Recorder(path, world_size=2, rank=r, unit="sequence") for r in (0, 1)]
    ranks[0].log_step(0, **batch)
    run = sd.open_run(path)
    assert run.step_numbers == []
    ranks[1].log_step(0, **batch)
    assert run.step(0).num_sequences == 2
    for recorder in ranks:
        recorder.close()


def test_a_url_runs_partial_steps_read_one_by_one_list_the_store_a_few_times(tmp_path, monkeypatch):
    """A store has no directory time to tell a listing still holds, so `run.step(n)` of each
    step a dead rank left partial listed the whole run again: measured on a 1,000-step file://
    run, 31x the time of the same loop before. A partial step lists it again only once a
    missing rank's file is there. Listings here take 20 ms."""
    from stabledrl_cli.dump._remote import RemoteRun

    path = tmp_path / "run"
    batch = {"logp": [-1.0], "logp_old": [-1.0], "advantages": [1.0]}
    ranks = [sd.Recorder(path, world_size=2, rank=r, unit="sequence") for r in (0, 1)]
    ranks[1].log_step(0, **batch)
    for n in range(40):
        ranks[0].log_step(n, **batch)  # rank 1 died after step 0
    listings = 0
    listed = RemoteRun._entries

    def slow_listing(self: RemoteRun, directory: Path) -> list[tuple[str, bool]]:
        nonlocal listings
        listings += 1
        time.sleep(0.02)
        return listed(self, directory)

    monkeypatch.setattr(RemoteRun, "_entries", slow_listing)
    run = sd.open_run(f"file://{path}")
    before = listings
    for n in range(1, 40):
        with pytest.raises(InputError, match="missing_rank"):
            run.step(n)
    assert listings - before <= 5, listings - before  # a listing a step: 39
    assert run.step(0).num_sequences == 2
    for recorder in ranks:
        recorder.close()


def test_a_url_runs_step_a_rank_wrote_after_the_listing_reads_whole(tmp_path):
    """A step of a live URL run that the last listing held partial, its other rank's file
    written since: `run.step(n)` said 'no file for rank(s) [1]' until that listing was ten
    times as old as it took (84 ms after an 8 ms listing), where it read whole before. The
    missing rank's file is looked up: there, the store is listed again."""
    path = tmp_path / "run"
    batch = {"logp": [-1.0], "logp_old": [-1.0], "advantages": [1.0]}
    ranks = [sd.Recorder(path, world_size=2, rank=r, unit="sequence") for r in (0, 1)]
    ranks[0].log_step(0, **batch)
    run = sd.open_run(f"file://{path}")
    assert run.listed_step_numbers == [0]
    assert run.listed_partial_steps.keys() == {0}
    ranks[1].log_step(0, **batch)
    assert run.step(0).num_sequences == 2
    for recorder in ranks:
        recorder.close()
