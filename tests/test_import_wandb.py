"""`stabledrl import` of W&B run files (`run-<id>.wandb`) that real wandb 0.31 wrote offline:
a tiny TRL GRPOTrainer run and verl's own Tracking (fixtures/imports/wandb-*, made by
tests/trl_scripts/make_wandb_runs.py). The reader's history equals what wandb's own reader
prints of the same file (`wandb leet inspect --json`, kept beside it as history.jsonl); the
TRL run imports as its trainer_state.json does, verl's as its file log does."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from _corpus import WANDB_BLOCK as BLOCK
from _corpus import proto_field, wandb_blocks, wandb_fragment, wandb_history
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app
from stabledrl_cli.errors import InputError
from stabledrl_cli.importers import detect_format, read_log
from stabledrl_cli.importers._names import skip_reason
from stabledrl_cli.importers._wandb import HEADER

runner = CliRunner()
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "imports"
TRL, VERL = FIXTURES / "wandb-trl", FIXTURES / "wandb-verl"
TRL_FILE, VERL_FILE = TRL / "run-trltiny.wandb", VERL / "run-verltiny.wandb"
ROWS_LEFT = {"eval": 1, "profiling": 51, "media": 4, "no metrics": 1}
"""The TRL run's history rows that hold no training metric, by what they hold: the script's
evaluation, TRL's profiled calls' seconds, the completions table, the last step's epoch."""


def _as_wandb_prints(value: Any) -> Any:
    """A value as `wandb leet inspect --json` prints it (NaN and the infinities as text)."""
    if isinstance(value, float) and not math.isfinite(value):
        return {math.inf: "Infinity", -math.inf: "-Infinity"}.get(value, "NaN")
    return value


def _wandbs_history(folder: Path, step_metric: str) -> dict[int, dict[str, Any]]:
    """The training rows of history.jsonl by step (their `step_metric`'s, or `_step`'s in a
    row without it): media (a key group with a `_type`) and names import leaves out taken
    away, a later row's value of a step winning."""
    rows = [json.loads(line)["item"] for line in (folder / "history.jsonl").open()]
    steps: dict[int, dict[str, Any]] = {}
    for row in rows:
        key = step_metric if step_metric in row else "_step"
        media = {n[: -len("._type")] for n in row if n.endswith("._type")}
        kept = {
            n: v
            for n, v in row.items()
            if n != key and skip_reason(n) is None and not any(n.startswith(f"{m}.") for m in media)
        }
        if kept:
            steps.setdefault(row[key], {}).update(kept)
    return steps


@pytest.mark.parametrize(
    "folder, step_metric", [(TRL, "train/global_step"), (VERL, "_step")], ids=["trl", "verl"]
)
def test_the_history_is_what_wandbs_own_reader_prints(folder: Path, step_metric: str) -> None:
    """Every step and value of the history, as wandb printed it, at the step W&B plots it
    against (transformers' callback declares `train/global_step` for every metric: the row
    the script logged before training has none); records split across the file's 32 KiB
    blocks read whole (each fixture has one: its second block begins with the last part of a
    record)."""
    (wandb_file,) = folder.glob("*.wandb")
    assert wandb_file.read_bytes()[BLOCK + 6] == 4  # LevelDB's `last` fragment
    path, found, table = read_log(wandb_file)
    assert (path, found) == (wandb_file, "wandb")
    ours = {
        step: {n: _as_wandb_prints(v) for n, v in row.items()} for step, row in table.steps.items()
    }
    assert ours == _wandbs_history(folder, step_metric)
    assert table.non_numeric == {} and table.warnings == []


def test_the_protobuf_fields_are_wandbs() -> None:
    """Each history record our reader frames, parsed by wandb's own protobuf classes, holds the
    keys and value_json our reader read."""
    internal = pytest.importorskip(
        "wandb.proto.wandb_internal_pb2", reason="needs wandb (the dev extra)"
    )
    from stabledrl_cli.importers._table import StepTable
    from stabledrl_cli.importers._wandb import _records

    with VERL_FILE.open("rb") as handle:
        handle.read(len(HEADER))
        records = list(_records(handle, VERL_FILE, StepTable(""), VERL_FILE.stat().st_size))
    parsed = [internal.Record.FromString(bytes(r)) for _, r in records]
    histories = [r.history for r in parsed if r.WhichOneof("record_type") == "history"]
    printed = [json.loads(line)["item"] for line in (VERL / "history.jsonl").open()]
    assert len(histories) == len(printed)
    for history, row in zip(histories, printed, strict=True):
        items = {".".join(i.nested_key or [i.key]): json.loads(i.value_json) for i in history.item}
        assert {n: _as_wandb_prints(v) for n, v in items.items()} == row


def _import(*args: str) -> dict[str, Any]:
    result = runner.invoke(app, ["import", *args, "--format", "json"])
    assert result.exit_code == 0, result.output
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary


def _scalars(run: Path) -> dict[int, dict[str, float]]:
    """Each step's scalars but the time it was imported at."""
    return {
        step.step: {n: v for n, v in step.scalars.items() if n != "wall_time"}
        for step in sd.open_run(run)
    }


def _same(a: dict[int, dict[str, float]], b: dict[int, dict[str, float]]) -> bool:
    """Equal steps and values, NaN equal to NaN."""
    return a.keys() == b.keys() and all(
        x.keys() == y.keys()
        and all(x[n] == y[n] or (math.isnan(x[n]) and math.isnan(y[n])) for n in x)
        for x, y in ((a[s], b[s]) for s in a)
    )


def test_a_trl_run_imports_as_its_trainer_state_does(tmp_path: Path) -> None:
    """TRL's W&B history is keyed by `train/global_step`, the step metric transformers'
    callback declares, though the row the script logged before training has none (W&B's
    `_step` counts its 60 log calls: each profiled call is one, `profiling/Time taken: ...`,
    left out); its config's logging_steps is kept; the completions table is not a scalar."""
    from_wandb = _import(str(TRL_FILE), "--out", str(tmp_path / "w"))
    from_state = _import(str(TRL / "trainer_state.json"), "--out", str(tmp_path / "s"))
    assert _scalars(tmp_path / "w") == _scalars(tmp_path / "s")
    assert (from_wandb["first_step"], from_wandb["last_step"]) == (2, 6)
    assert from_wandb["skipped_rows"]["eval"] == 1  # the baseline evaluation, at _step 0
    assert from_wandb["mapped"] == {s: f"train/{n}" for s, n in from_state["mapped"].items()}
    assert from_wandb["counts"] == from_state["counts"]
    assert from_wandb["logging_steps"] == from_state["logging_steps"] == 2
    assert from_wandb["not_imported"]["completions"] == "not a scalar"
    assert from_wandb["skipped_rows"] == ROWS_LEFT
    profiled = [n for n in from_wandb["not_imported"] if n.startswith("profiling/Time taken: ")]
    assert profiled and all(from_wandb["not_imported"][n] == "bookkeeping" for n in profiled)
    manifest = json.loads((tmp_path / "w" / "manifest.json").read_text())
    assert manifest["source"]["format"] == "wandb" and manifest["source"]["logging_steps"] == 2


@pytest.mark.parametrize("as_array", [False, True], ids=["jsonl", "json-array"])
def test_a_trl_export_imports_as_its_trainer_state_does(tmp_path: Path, as_array: bool) -> None:
    """W&B's export of a TRL run (`scan_history()`'s rows as JSON lines, or as one JSON array)
    holds `_step` in every row and `train/global_step` from the trainer's callback on, not in
    the row the script logged before training: its steps are `train/global_step`'s (they were
    `_step`'s, 18, 37 and 56 for TRL's 2, 4 and 6), and diff finds it identical to the run's
    trainer_state.json."""
    export = TRL / "export.jsonl"
    if as_array:
        export = tmp_path / "history.json"
        rows = [json.loads(line) for line in (TRL / "export.jsonl").open()]
        export.write_text(json.dumps(rows))
    from_export = _import(str(export), "--out", str(tmp_path / "e"))
    _import(str(TRL / "trainer_state.json"), "--out", str(tmp_path / "s"))
    assert (from_export["first_step"], from_export["last_step"]) == (2, 6)
    assert from_export["skipped_rows"] == ROWS_LEFT and from_export["non_numeric"] == {}
    assert from_export["not_imported"]["completions"] == "not a scalar"
    assert _scalars(tmp_path / "e") == _scalars(tmp_path / "s")
    done = runner.invoke(app, ["diff", str(tmp_path / "s"), str(tmp_path / "e")])
    assert done.exit_code == 0 and "\nidentical: " in done.stdout


def test_a_trl_csv_export_imports_as_its_trainer_state_does(tmp_path: Path) -> None:
    """`run.history().to_csv()` of the TRL run: its `train/global_step` column is the step
    (empty in the row the script logged before training, an evaluation, which was counted a
    `bad step`); the completions table is text there (pandas writes a dict's repr)."""
    from_export = _import(str(TRL / "export.csv"), "--out", str(tmp_path / "e"))
    _import(str(TRL / "trainer_state.json"), "--out", str(tmp_path / "s"))
    assert _scalars(tmp_path / "e") == _scalars(tmp_path / "s")
    assert from_export["skipped_rows"] == {"eval": 1, "profiling": 51, "no metrics": 5}
    assert from_export["non_numeric"] == {"completions": 4}


def test_a_verl_export_imports_as_its_file_log_does(tmp_path: Path) -> None:
    """verl's W&B export is keyed by `_step`, verl's step (its rows hold no other step key)."""
    _import(str(VERL / "export.jsonl"), "--out", str(tmp_path / "e"))
    _import(str(VERL / "verl.jsonl"), "--out", str(tmp_path / "j"))
    assert _same(_scalars(tmp_path / "e"), _scalars(tmp_path / "j"))


def test_a_verl_run_imports_as_its_file_log_does(tmp_path: Path) -> None:
    """verl logs its step as W&B's `_step`; a NaN grad norm (value_json `NaN`, a bare JSON
    constant, not text) is NaN."""
    from_wandb = _import(str(VERL_FILE), "--out", str(tmp_path / "w"))
    from_log = _import(str(VERL / "verl.jsonl"), "--out", str(tmp_path / "j"))
    assert _same(_scalars(tmp_path / "w"), _scalars(tmp_path / "j"))
    assert from_wandb["nonfinite"] == from_log["nonfinite"] == {"grad_norm": 1}
    assert from_wandb["skipped_rows"] == from_log["skipped_rows"] == {"eval": 1}
    assert from_wandb["mapped"] == from_log["mapped"]
    manifest = json.loads((tmp_path / "w" / "manifest.json").read_text())
    assert manifest["source"]["tracker_run"] == {  # verl's Tracking(project, experiment)
        "id": "verltiny", "name": "experiment", "project": "project"
    }  # fmt: skip


def test_a_run_directory_stands_for_its_wandb_file(tmp_path: Path) -> None:
    """`wandb/run-<date>-<id>/` and `wandb/latest-run` import their run file; `wandb/` itself
    is refused in one line naming latest-run (it listed every run, latest-run among them, in
    224 columns for two runs), which is not taken: another run may have started since; a
    folder without it names its newest run by the time in its name. A folder of one run names
    that run's directory (it said "import one (... is the newest)" of one run)."""
    runs = tmp_path / "wandb"
    run = runs / "offline-run-20261206_074646-trltiny"
    (run / "files").mkdir(parents=True)
    shutil.copyfile(TRL_FILE, run / TRL_FILE.name)
    (runs / "latest-run").symlink_to(run.name)
    for source in (run, runs / "latest-run"):
        assert read_log(source)[:2] == (source / TRL_FILE.name, "wandb")
        assert _import(str(source), "--out", str(tmp_path / "r"), "--force")["steps"] == 3
    for given in ([], ["--format-in", "wandb"]):
        done = runner.invoke(app, ["import", str(runs), *given, "--out", str(tmp_path / "x")])
        assert done.exit_code == 3
        assert (
            done.stderr
            == f"error: {runs}: 1 W&B run: import its directory, {run.parent / 'latest-run'}\n"
        )
    (runs / "latest-run").unlink()  # a folder copied without its links: the newest by name
    newer = runs / "run-20261206_081500-abc12345"
    shutil.copytree(run, newer)
    done = runner.invoke(app, ["import", str(runs), "--out", str(tmp_path / "x")])
    assert done.stderr == f"error: {runs}: 2 W&B runs: import one ({newer} is the newest)\n"
    shutil.rmtree(newer)
    shutil.copyfile(TRL_FILE, run / "run-other.wandb")
    done = runner.invoke(app, ["import", str(run), "--out", str(tmp_path / "x")])
    assert done.exit_code == 3
    assert "W&B run files run-other.wandb, run-trltiny.wandb: import one" in done.stderr


def test_a_resumed_runs_other_starts_are_named(tmp_path: Path) -> None:
    """wandb 0.31 writes each start of a resumed run (`wandb.init(id="resrun",
    resume="allow")`, offline: steps 0-4, then 3-6) into a run directory of its own, each
    file one start's history: `import wandb/latest-run` imported steps 3..6 and said nothing
    of steps 0-2, in the directory beside it. It warns, naming it; `import wandb/` counts
    the directories as one run's, where it said '2 W&B runs'."""
    runs = tmp_path / "wandb"
    first, second = (runs / f"offline-run-20261206_0{t}-trltiny" for t in ("74646", "81500"))
    for run in (first, second):
        run.mkdir(parents=True)
        shutil.copyfile(TRL_FILE, run / TRL_FILE.name)
    (runs / "latest-run").symlink_to(second.name)
    (runs / "offline-run-20261206_090000-other").mkdir()
    shutil.copyfile(VERL_FILE, runs / "offline-run-20261206_090000-other" / "run-other.wandb")
    warned = _import(str(runs / "latest-run"), "--out", str(tmp_path / "r"))["warnings"]
    assert warned == [
        f"{runs / 'latest-run' / TRL_FILE.name}: W&B run trltiny was resumed: this file holds "
        f"one start's history; {first.name} beside it holds the other's, not imported (import "
        "each on its own)"
    ]
    done = runner.invoke(app, ["import", str(runs), "--out", str(tmp_path / "x")])
    assert done.stderr == (
        f"error: {runs}: 3 W&B run directories of 2 runs (resumed): import one "
        f"({runs / 'latest-run'} is the newest)\n"
    )
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copyfile(TRL_FILE, alone / TRL_FILE.name)
    assert _import(str(alone), "--out", str(tmp_path / "a"))["warnings"] == []


def _file(*records: bytes) -> bytes:
    return HEADER + b"".join(wandb_fragment(1, r) + r for r in records)


def _refused(tmp_path: Path, raw: bytes, message: str) -> None:
    (tmp_path / "run-x.wandb").write_bytes(raw)
    done = runner.invoke(app, ["import", str(tmp_path / "run-x.wandb"), "--out", f"{tmp_path}/r"])
    assert done.exit_code == 3, done.output
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1
    assert message in done.stderr and "Traceback" not in done.stderr


def test_a_run_still_being_written_imports_its_whole_records(tmp_path: Path) -> None:
    """wandb-core writes whole 32 KiB blocks: a live run's file ends inside a record (as one
    cut by kill -9 anywhere): the records before it import, with one warning."""
    raw = VERL_FILE.read_bytes()
    for cut in (BLOCK, BLOCK - 100, len(raw) - 3):
        (tmp_path / "run-x.wandb").write_bytes(raw[:cut])
        summary = _import(str(tmp_path / "run-x.wandb"), "--out", str(tmp_path / "r"), "--force")
        (warning,) = summary["warnings"][:1]
        assert "unfinished last record ignored" in warning
        assert 0 < summary["steps"] <= 10


def test_damaged_and_crafted_files_are_refused_in_one_line(tmp_path: Path) -> None:
    raw = bytearray(VERL_FILE.read_bytes())
    raw[BLOCK // 2] ^= 0xFF
    _refused(tmp_path, bytes(raw), "checksum mismatch")
    _refused(tmp_path, b"not a run\n" * 10, "not a W&B run file")
    (tmp_path / "renamed").write_bytes(raw)
    assert detect_format(tmp_path / "renamed") == "wandb"
    huge = HEADER + struct.pack("<IHB", 0, 0xFFFF, 1) + b"x" * 100
    _refused(tmp_path, huge, "byte 7: not a W&B record fragment")
    claim = proto_field(2, b"\x0a\x80\x80\x80\x80\x08")  # an item claiming 2**31 bytes
    _refused(tmp_path, _file(claim), "runs past the end")
    spanning = HEADER + wandb_fragment(4, b"x") + b"x"  # a `last` part with no first
    _refused(tmp_path, spanning, "out of order")


def test_rows_keyed_by_step_before_the_step_metric_are_warned_of(tmp_path: Path) -> None:
    """A run whose script logged 3 training rows (`_step` 0..2) before its trainer declared
    `train/global_step` (1..3) imported 4 steps, 1 and 2 holding both rows' metrics, without a
    word; so did one declaring none whose rows hold it from the 4th on. Each now says so."""
    before = [wandb_history(("_step", str(n)), ("loss", "9.0")) for n in range(3)]
    after = [
        wandb_history(("_step", str(2 + n)), ("train/global_step", str(n)), ("train/loss", "0.5"))
        for n in range(1, 4)
    ]
    declared = proto_field(12, proto_field(2, b"*") + proto_field(4, b"train/global_step"))
    for records in ([*before, declared, *after], [*before, *after]):
        summary = _import_raw(tmp_path, _file(*records))
        assert (summary["first_step"], summary["last_step"]) == (0, 3)
        (said,) = summary["warnings"]
        assert "steps by train/global_step from here on, the 3 steps (0..2) before by _step" in said


def test_a_step_metric_declared_again_and_again_is_warned_of_once(tmp_path: Path) -> None:
    """A run file declaring its step metric anew before each of its rows, `a` then `b` in
    turn, warned at each (39,999 lines for a 2 MB file of 40,000 rows), each warning a pass
    over the steps kept: 46 s to read. The first is warned of."""
    declared = {k: proto_field(12, proto_field(2, b"*") + proto_field(4, k.encode())) for k in "ab"}
    records = []
    for step in range(2_000):
        key = "ab"[step % 2]
        records += [declared[key], wandb_history((key, str(step)), ("loss", "0.5"))]
    summary = _import_raw(tmp_path, wandb_blocks(*records))
    assert summary["steps"] == 2_000
    (said,) = summary["warnings"]
    assert "steps by b from here on, the 1 step (0) before by a" in said


def test_a_step_metric_longer_than_a_metric_name_is_refused(tmp_path: Path) -> None:
    """A step metric of 1,000,000 characters imported with a warning line of as many (rows by
    `_step` before it), each row's step under that key; one past a name's 256 is refused."""
    name = "k" * 257
    declared = proto_field(12, proto_field(2, b"*") + proto_field(4, name.encode()))
    before = wandb_history(("_step", "0"), ("loss", "1"))
    raw = wandb_blocks(before, declared, wandb_history((name, "1"), ("loss", "1")))
    _refused(tmp_path, raw, "a step metric name longer than 256 characters")


def _import_raw(tmp_path: Path, raw: bytes) -> dict[str, Any]:
    (tmp_path / "run-x.wandb").write_bytes(raw)
    return _import(str(tmp_path / "run-x.wandb"), "--out", str(tmp_path / "r"), "--force")


def test_values_that_are_not_numbers(tmp_path: Path) -> None:
    """NaN and Infinity (bare JSON constants, as wandb writes them) are kept; a value_json that
    is not JSON is dropped with a warning; text is not a number, text of digits neither:
    `wandb.log({"tag": "0.5"}, step=s)` (wandb 0.31, offline) is `"tag":"0.5"` in what `wandb
    leet inspect --json` prints of the run file, a label W&B charts leave out, and was
    imported as the extra scalar tag = 0.5; nested keys join with `.`."""
    summary = _import_raw(
        tmp_path,
        _file(
            wandb_history(
                ("_step", "1"), ("loss", "NaN"), ("grad_norm", "Infinity"), ("x", "{oops")
            ),
            wandb_history(("_step", "2"), ("loss", "1.5"), ("note", '"text"'), ("a.b", "3")),
            wandb_history(("_step", "3"), ("loss", "1"), ("tag", '"0.5"'), ("x", '"NaN"')),
        ),
    )
    assert summary["nonfinite"] == {"loss": 1, "grad_norm": 1}
    assert summary["extra"]["a.b"] == "a.b" and "tag" not in summary["extra"]
    assert summary["non_numeric"] == {"x": 2, "note": 1, "tag": 1}
    assert summary["warnings"] == [f"{tmp_path / 'run-x.wandb'}: 1 history value not JSON, dropped"]
    assert os.path.exists(tmp_path / "r" / "manifest.json")


def test_an_export_drops_text_as_the_run_file_does(tmp_path: Path) -> None:
    """`wandb.log({"loss": 1.0 + s, "tag": "0.5"}, step=s)` (wandb 0.31, offline): the run
    file drops the text, but its history exported as `scan_history()` gives it (`json.loads`
    of each value_json: `"tag": "0.5"`, JSON lines or a JSON array of them) imported tag as an
    extra scalar 0.5 at each of the 3 steps. A JSON string is text in every JSON log."""
    items = [(("_step", str(s)), ("loss", f"{1.0 + s}"), ("tag", '"0.5"')) for s in range(3)]
    rows = [{k: json.loads(v) for k, v in row} for row in items]
    (tmp_path / "export.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "export.json").write_text(json.dumps(rows))
    wandb_file = _import_raw(tmp_path, _file(*(wandb_history(*row) for row in items)))
    for export in ("export.jsonl", "export.json"):
        summary = _import(str(tmp_path / export), "--out", str(tmp_path / export[7:]))
        assert summary["non_numeric"] == wandb_file["non_numeric"] == {"tag": 3}
        assert summary["counts"] == wandb_file["counts"] == {"loss": 3}
        assert _scalars(tmp_path / export[7:]) == _scalars(tmp_path / "r")


def test_a_logging_steps_past_a_doubles_range_is_no_setting(tmp_path: Path) -> None:
    """A config's (or trainer_state.json's) logging_steps of 400 digits stopped import with an
    internal error (OverflowError, exit 70): it is no setting, the history imports."""
    digits = "9" * 400
    update = proto_field(1, b"logging_steps") + proto_field(16, digits.encode())
    summary = _import_raw(
        tmp_path,
        _file(
            proto_field(5, proto_field(1, update)), wandb_history(("_step", "1"), ("loss", "0.5"))
        ),
    )
    assert summary["steps"] == 1 and summary["logging_steps"] is None
    state = tmp_path / "trainer_state.json"
    state.write_text(f'{{"logging_steps": {digits}, "log_history": [{{"step": 1, "loss": 0.5}}]}}')
    assert _import(str(state), "--out", str(tmp_path / "s"))["logging_steps"] is None


@pytest.mark.parametrize("k", ["1e308", str(2**63), "1e19"])
def test_a_logging_steps_past_the_last_step_is_no_setting(tmp_path: Path, k: str) -> None:
    """A logging_steps of 1e308 (in a double's range) was kept: the import's summary said
    `written every` and 309 digits, a line of 350 characters, and the manifest kept them. Past
    the largest step (2**63 - 1) no row can end such a span: it is no setting."""
    state = tmp_path / "trainer_state.json"
    state.write_text(f'{{"logging_steps": {k}, "log_history": [{{"step": 1, "loss": 0.5}}]}}')
    assert _import(str(state), "--out", str(tmp_path / "s"))["logging_steps"] is None
    done = runner.invoke(app, ["import", str(state), "--out", str(tmp_path / "t")])
    assert done.exit_code == 0 and "written every" not in done.output
    update = proto_field(1, b"logging_steps") + proto_field(16, k.encode())
    summary = _import_raw(
        tmp_path,
        _file(
            proto_field(5, proto_field(1, update)), wandb_history(("_step", "1"), ("loss", "0.5"))
        ),
    )
    assert summary["logging_steps"] is None


def test_a_key_nested_deep_is_refused_at_once(tmp_path: Path) -> None:
    """A history item of 80,000 nested keys (a 240 KB file over 8 blocks) took 19 s to refuse:
    each of its prefixes was looked up among the media groups (quadratic; 1 s at 20,000)."""
    item = b"".join(proto_field(2, b"a") for _ in range(80_000)) + proto_field(16, b"1")
    step = proto_field(1, proto_field(2, b"_step") + proto_field(16, b"1"))
    (tmp_path / "run-x.wandb").write_bytes(
        wandb_blocks(proto_field(2, step + proto_field(1, item)))
    )
    start = time.process_time()
    with pytest.raises(InputError, match="a metric name longer than 256 characters"):
        read_log(tmp_path / "run-x.wandb")
    assert time.process_time() - start < 1


def test_the_docs_say_that_a_history_export_is_sampled() -> None:
    """W&B's `run.history()` returns 500 rows picked from the run (its `samples=` default), and
    TRL logs 60 rows for this fixture's 3 logged steps (2, 4, 6): the export of a long run lacks
    steps. docs/importing.md pointed at `history().to_csv()` without saying so, nor that a
    chart set to random sampling exports 1,500 points of a longer line, which uneven gaps
    between steps do not prove (a run's own logging has them too)."""
    text = " ".join((FIXTURES.parents[1] / "docs" / "importing.md").read_text().split())
    assert "W&B's `run.history()` is a sample: 500 rows" in text
    assert (
        "60 rows for 3 logged steps" in text
        and "`run.scan_history()`, which gives every row" in text
    )
    assert "draws 1,500 points picked at random of a line that has more" in text
    assert "a bucket of equal values (a constant learning rate) leaves its other steps" in text
    assert "does not take uneven gaps for a sample and does not warn of one" in text
