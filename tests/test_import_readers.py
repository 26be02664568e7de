"""The log readers of `stabledrl import`: what each reads, and what each refuses.

TensorBoard files are written by real writers (torch.utils.tensorboard, and tensorboard's own
protos and record writer for tensor-valued scalars); bad files are crafted byte by byte.
"""

from __future__ import annotations

import io
import json
import math
import struct
import time
from decimal import Decimal
from pathlib import Path

import pytest
from _corpus import tfrecord
from typer.testing import CliRunner

from stabledrl_cli import _json
from stabledrl_cli.cli.app import app
from stabledrl_cli.errors import InputError, UsageError
from stabledrl_cli.importers import _trainer_state, detect_format, read_log
from stabledrl_cli.importers._crc32c import crc32c, masked_crc32c
from stabledrl_cli.importers._names import map_names, sanitise
from stabledrl_cli.importers._table import StepTable

tensorboard = pytest.importorskip("tensorboard", reason="needs tensorboard (the dev extra)")

from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2  # noqa: E402
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import (  # noqa: E402
    masked_crc32c as reference_masked_crc32c,
)
from tensorboard.summary.writer.record_writer import RecordWriter  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402


def _jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _events(path: Path, events: list[event_pb2.Event]) -> Path:
    with path.open("wb") as handle:
        writer = RecordWriter(handle)
        for event in events:
            writer.write(event.SerializeToString())
    return path


def _tensor_event(step: int, tag: str, tensor: tensor_pb2.TensorProto, plugin: str = "") -> bytes:
    value = summary_pb2.Summary.Value(tag=tag, tensor=tensor)
    if plugin:
        value.metadata.plugin_data.plugin_name = plugin
    event = event_pb2.Event(step=step, summary=summary_pb2.Summary(value=[value]))
    return event.SerializeToString()


# -- CRC and names ----------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 63, 64, 1000])
def test_crc32c_equals_tensorboards(size: int) -> None:
    data = bytes((i * 37 + 11) % 256 for i in range(size))
    assert masked_crc32c(data) == reference_masked_crc32c(data)
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value


def test_names_map_trl_and_verl_and_keep_meanings_apart() -> None:
    trl = map_names(
        ["reward", "loss", "grad_norm", "learning_rate", "entropy", "kl",
         "clip_ratio/region_mean", "clip_ratio/low_mean", "clip_ratio/high_mean",
         "clip_ratio/low_min", "clip_ratio/high_max", "step_time"],
        reserved=(),
    )  # fmt: skip
    assert trl.standard == {
        "reward": "reward_mean", "loss": "loss", "grad_norm": "grad_norm",
        "learning_rate": "lr", "entropy": "entropy", "kl": "kl",
        "clip_ratio/region_mean": "clip_frac", "clip_ratio/low_mean": "clip_frac_low",
        "clip_ratio/high_mean": "clip_frac_high", "step_time": "step_time",
    }  # fmt: skip
    assert trl.extra == {"clip_ratio/low_min": "clip_ratio/low_min",
                         "clip_ratio/high_max": "clip_ratio/high_max"}  # fmt: skip
    verl = map_names(
        ["critic/rewards/mean", "critic/score/mean", "actor/pg_clipfrac",
         "actor/pg_clipfrac_lower", "actor/ppo_kl", "actor/kl_loss", "actor/grad_norm",
         "actor/lr", "actor/loss", "actor/entropy", "timing_s/step"],
        reserved=(),
    )  # fmt: skip
    assert verl.standard == {
        "critic/score/mean": "reward_mean", "actor/pg_clipfrac": "clip_frac",
        "actor/kl_loss": "kl", "actor/grad_norm": "grad_norm", "actor/lr": "lr",
        "actor/loss": "loss", "actor/entropy": "entropy", "timing_s/step": "step_time",
    }  # fmt: skip
    # the dual-clip bound is not TRL's low side; the KL to the rollout is not the KL to the ref
    assert set(verl.extra) == {"critic/rewards/mean", "actor/pg_clipfrac_lower", "actor/ppo_kl"}


def test_names_tracker_prefix_and_collisions() -> None:
    names = ["train/loss", "loss", "train/my metric", "lr2", "nonfinite"]
    mapping = map_names(names, ("nonfinite",))
    assert mapping.standard == {"train/loss": "loss"}
    assert mapping.extra == {
        "loss": "loss.2",
        "train/my metric": "my_metric",
        "lr2": "lr2",
        "nonfinite": "nonfinite.2",
    }
    assert sanitise("_runtime") == "runtime"
    assert sanitise("a//b\n/ c ") == "a/b/c"
    assert sanitise("///") == "metric"


# -- the table's rules --------------------------------------------------------------------------
def test_table_rules() -> None:
    table = StepTable("log")
    table.add(1, {"loss": 1.0, "epoch": 0.1, "x": "oops"})
    table.add("2", {"loss": "nan", "grad_norm": float("inf")})
    table.add(2.0, {"loss": 3.0})  # a later row of step 2 wins
    table.add(2.5, {"loss": 1.0})
    table.add(-1, {"loss": 1.0})
    table.add(True, {"loss": 1.0})
    table.add(3, {"eval_loss": 1.0, "epoch": 1.0})
    table.add(4, {"train_runtime": 1.0, "train_loss": 0.5})
    table.add(5, {"epoch": 1.0, "x": None, "y": ""})
    assert table.steps == {1: {"loss": 1.0}, 2: {"loss": 3.0, "grad_norm": math.inf}}
    assert table.replaced == 1
    assert table.skipped_rows == {"bad step": 3, "eval": 1, "summary": 1, "no metrics": 1}
    assert table.non_numeric == {"x": 1}
    assert table.not_imported == {
        "epoch": "bookkeeping", "eval_loss": "eval", "train_runtime": "summary",
        "train_loss": "summary",
    }  # fmt: skip


def test_table_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    from stabledrl_cli.importers import _table

    monkeypatch.setattr(_table, "STEP_COUNT_LIMIT", 3)
    table = StepTable("log")
    for step in range(3):
        table.add(step, {"loss": 1.0})
    with pytest.raises(InputError, match="more than 3 steps"):
        table.add(3, {"loss": 1.0})
    monkeypatch.setattr(_table, "METRIC_LIMIT", 2)
    with pytest.raises(InputError, match="more than 2 metric names"):
        StepTable("log").add(0, {"a": 1, "b": 2, "c": 3})
    with pytest.raises(InputError, match="longer than 256"):
        StepTable("log").add(0, {"a" * 300: 1})


def test_names_left_out_are_bounded_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Names that are not imported (evaluation, bookkeeping) or whose values are not numbers
    were kept by name without bound: a 39 MB JSON-lines log with 100 new eval_* names a row
    held 2 million of them (680 MB of memory, 3 minutes, a 2-million-key summary)."""
    from stabledrl_cli.importers import _table

    monkeypatch.setattr(_table, "LEFT_OUT_LIMIT", 2)
    table = StepTable("log")
    table.add(0, {"eval_a": 1, "eval_b": 1, "loss": 1})
    with pytest.raises(InputError, match="more than 2 names left out"):
        table.add(1, {"eval_c": 1, "loss": 1})
    table = StepTable("log")
    table.add(0, {"a": "x", "b": "x", "loss": 1})
    with pytest.raises(InputError, match="more than 2 names left out"):
        table.add(1, {"c": "x", "loss": 1})
    with pytest.raises(InputError, match="longer than 256"):
        StepTable("log").add(0, {"eval_" + "a" * 300: 1, "loss": 1})
    table = StepTable("log")
    table.leave_out("histogram/a", "not a scalar")
    table.leave_out("histogram/b", "not a scalar")
    with pytest.raises(InputError, match="more than 2 names left out"):
        table.leave_out("histogram/c", "not a scalar")  # TensorBoard's


def test_a_verl_evaluation_over_many_benchmarks_is_left_out_not_refused(tmp_path: Path) -> None:
    """verl logs each benchmark's evaluation as val-core/<source>/<var>/<metric>@<n> and
    val-aux/... (mean@32, std@32, best@n/mean, worst@n/std, maj@n/mean, ... for n = 2..32): 12
    benchmarks with 3 variables log 1,152 names, past the 1,000 names an import left out, so
    the whole log was refused ('more than 1000 names left out'), its training steps too."""
    metrics = ["mean@32", "std@32"] + [
        f"{kind}@{n}/{stat}"
        for n in (2, 4, 8, 16, 32)
        for kind in ("best", "worst", "maj")
        for stat in ("mean", "std")
    ]
    names = [
        f"val-{'core' if metric.endswith('@32') else 'aux'}/{source}/{var}/{metric}"
        for source in range(12)
        for var in ("reward", "acc", "score")
        for metric in metrics
    ]
    assert len(names) == 1152
    rows = [{"step": 1, "data": {"actor/loss": 0.5, "critic/score/mean": 1.0}}]
    rows += [{"step": 2, "data": {"actor/loss": 0.4, **dict.fromkeys(names, 0.5)}}]
    _, _, table = read_log(_jsonl(tmp_path / "verl.jsonl", rows))
    assert table.steps == {1: {"actor/loss": 0.5, "critic/score/mean": 1.0}, 2: {"actor/loss": 0.4}}
    assert len(table.not_imported) == 1152 and set(table.not_imported.values()) == {"eval"}


def test_lines_of_a_text_log_are_bounded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A line that adds no value (a step given again, a blank line, a row skipped) cost time
    and no bound: 5 million lines `1,1` (20 MB) took 64 s, so the 1 GiB input bound allowed
    about an hour. The lines read are bounded."""
    from stabledrl_cli.importers import _files

    monkeypatch.setattr(_files, "LINE_COUNT_LIMIT", 3, raising=False)
    for name, text in (("log.csv", "step,loss\n" + "1,1\n" * 3), ("log.jsonl", "\n" * 4)):
        (tmp_path / name).write_text(text)
        with pytest.raises(InputError, match="more than 3 lines"):
            read_log(tmp_path / name)
    (tmp_path / "ok.csv").write_text("step,loss\n1,1\n2,1\n")
    assert sorted(read_log(tmp_path / "ok.csv")[2].steps) == [1, 2]


# -- trainer_state.json -----------------------------------------------------------------------
def test_trainer_state_reads_nan_and_skips_eval_and_summary(tmp_path: Path) -> None:
    state = tmp_path / "trainer_state.json"
    state.write_text(
        '{"global_step": 3, "log_history": ['
        '{"loss": 0.5, "grad_norm": NaN, "step": 1, "epoch": 0.1},'
        '{"loss": 0.4, "grad_norm": Infinity, "step": 2},'
        '{"eval_loss": 0.3, "eval_runtime": 1.0, "step": 2},'
        '{"train_runtime": 9.0, "train_loss": 0.45, "total_flos": 0.0, "step": 2}, 7]}'
    )
    path, found, table = read_log(tmp_path)  # the directory stands for its trainer_state.json
    assert (path, found) == (state, "trainer_state")
    assert math.isnan(table.steps[1]["grad_norm"]) and table.steps[2]["grad_norm"] == math.inf
    assert table.skipped_rows == {"eval": 1, "summary": 1, "not an object": 1}


@pytest.mark.parametrize("indent", [None, 2])
def test_a_log_history_saved_alone_is_read_as_a_trainer_state(
    tmp_path: Path, indent: int | None
) -> None:
    """`json.dump(trainer.state.log_history, f)`, TRL's logged rows as a JSON array of objects,
    was refused: on one line read as CSV ('the header repeats a column name'), indented as
    TensorBoard's per-tag JSON ('entry 1 is not [wall time, step, value]'). It is read as the
    log_history of a trainer_state.json: eval rows and the summary left out."""
    rows = [
        {"loss": -0.2238, "grad_norm": 1.19, "learning_rate": 0.03, "reward": 0.3125,
         "clip_ratio/region_mean": 0.0, "epoch": 0.125, "step": 1},
        {"loss": 0.0521, "grad_norm": 1.29, "learning_rate": 0.0225,
         "clip_ratio/region_mean": 0.1762, "epoch": 0.25, "step": 2},
        {"eval_loss": 0.3, "eval_reward": 0.5, "epoch": 0.25, "step": 2},
        {"train_runtime": 2.5, "train_loss": -0.0974, "epoch": 0.25, "step": 2},
    ]  # fmt: skip
    log = tmp_path / "log_history.json"
    log.write_text(json.dumps(rows, indent=indent))
    assert detect_format(log) == "trainer_state"
    _, found, table = read_log(log)
    assert found == "trainer_state"
    assert table.steps[1]["reward"] == 0.3125 and table.steps[2]["loss"] == 0.0521
    assert table.steps[2]["clip_ratio/region_mean"] == 0.1762
    assert table.skipped_rows == {"eval": 1, "summary": 1}
    bracketed = tmp_path / "bracketed.txt"  # a header that begins with [ is still CSV
    bracketed.write_text("[step],loss\n1,0.5\n")
    assert detect_format(bracketed) == "csv"
    log.write_text("[1, 2]")  # an array of no rows is still no log_history
    with pytest.raises(InputError, match="no log_history"):
        read_log(log, "trainer_state")


def test_a_json_array_of_rows_takes_its_step_key_as_json_lines_do(tmp_path: Path) -> None:
    """A W&B history saved by pandas (`run.history().to_json(path, orient="records")`: rows
    with `_step`, `_runtime`, `train/global_step`) is a JSON array of objects, read as a
    log_history, whose rows' step is `step` only: 'no training step in this log (skipped rows:
    3 bad step)', exit 3, and `--step-key` was refused ('applies to jsonl and csv logs'). Its
    step key is now found as in JSON lines (the trainer's step before W&B's `_step`), or
    given; a trainer_state.json's rows keep `step`, where a step key is refused."""
    rows = [
        {"_step": 0, "_runtime": 1.5, "train/global_step": 10, "train/loss": 0.5,
         "train/reward": 0.25},
        {"_step": 1, "_runtime": 2.5, "train/global_step": 20, "train/loss": None,
         "train/reward": 0.5},
        {"_step": 2, "_runtime": 2.6, "train/global_step": 20, "eval/loss": 0.7},
    ]  # fmt: skip
    log = tmp_path / "history.json"
    log.write_text(json.dumps(rows))
    _, found, table = read_log(log)
    assert found == "trainer_state"
    assert table.steps == {
        10: {"train/loss": 0.5, "train/reward": 0.25}, 20: {"train/reward": 0.5}
    }  # fmt: skip
    assert table.skipped_rows == {"eval": 1}
    _, _, by_key = read_log(log, step_key="_step")
    assert sorted(by_key.steps) == [0, 1]
    assert "train/global_step" in by_key.not_imported  # bookkeeping, not a metric
    log.write_text(json.dumps([{"iteration": 3, "loss": 1.0}]))
    with pytest.raises(InputError, match="entry 1: no step key"):
        read_log(log)
    assert read_log(log, step_key="iteration")[2].steps == {3: {"loss": 1.0}}
    state = tmp_path / "trainer_state.json"
    state.write_text(json.dumps({"log_history": [{"step": 1, "loss": 1.0}]}))
    with pytest.raises(UsageError, match="no step key applies"):
        read_log(state, step_key="iteration")
    done = CliRunner().invoke(
        app, ["import", str(log), "--out", str(tmp_path / "run"), "--step-key", "iteration"]
    )
    assert done.exit_code == 0, done.output


@pytest.mark.parametrize(
    "text, message",
    [
        ("[1, 2]", "no log_history"),
        ('{"log_history": 3}', "no log_history"),
        ('{"log_history": [' * 100_000, "nested too deeply|not valid JSON"),
        ("\x00\x01binary", "not UTF-8 JSON"),
    ],
)
def test_trainer_state_refusals(tmp_path: Path, text: str, message: str) -> None:
    state = tmp_path / "trainer_state.json"
    state.write_text(text)
    with pytest.raises(InputError, match=message):
        read_log(state)


@pytest.mark.parametrize(
    "items",
    [",".join(["{}"] * 1000), ",".join(["[" * 10 + "]" * 10] * 100)],
    ids=["empty-objects", "nested-arrays"],
)
def test_a_trainer_state_of_too_many_values_is_refused_before_it_is_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, items: str
) -> None:
    """It is parsed whole, and a parsed value costs 30-100 times its bytes: 30 MB of empty
    objects took 827 MB before its refusal (no step in it), so 128 MiB would take 3.5 GB.
    Arrays nested 500 deep hold 500 values a comma: 32 MB of them took 1.69 GB when only
    commas were counted."""
    state = tmp_path / "trainer_state.json"
    state.write_text('{"log_history": [' + items + "]}")
    monkeypatch.setattr(_trainer_state, "VALUE_LIMIT", 999)
    decoded: list[object] = []  # what parse_strict calls just before it parses
    monkeypatch.setattr(_json, "utf8_text", lambda raw: decoded.append(raw))
    with pytest.raises(
        InputError,
        match=r"JSON values \(commas and brackets counted\), more "
        "than the 999 read",
    ):
        read_log(state)
    assert decoded == []


# -- JSON lines -------------------------------------------------------------------------------
def test_jsonl_flat_and_verl_file_logger(tmp_path: Path) -> None:
    flat = _jsonl(tmp_path / "a.jsonl", [{"_step": 0, "train/reward": 1}, {"_step": 1, "x": [1]}])
    _, found, table = read_log(flat)
    assert found == "jsonl" and table.steps == {0: {"train/reward": 1.0}}
    assert table.non_numeric == {"x": 1} and table.skipped_rows == {"no metrics": 1}
    verl = _jsonl(
        tmp_path / "verl.log",
        [{"step": 1, "data": {"critic/score/mean": 0.5, "actor/grad_norm": None}},
         {"step": 2, "data": {"critic/score/mean": 0.7, "val-core/acc": 0.9}}],
    )  # fmt: skip
    _, found, table = read_log(verl)
    assert found == "jsonl"
    assert table.steps[2] == {"critic/score/mean": 0.7}
    assert table.steps[1]["critic/score/mean"] == 0.5
    assert math.isnan(table.steps[1]["actor/grad_norm"])  # orjson's NaN
    assert table.not_imported["val-core/acc"] == "eval"


def test_a_log_of_quoted_numbers_imports_them(tmp_path: Path) -> None:
    """`json.dumps(row, default=str)` of numpy float32 values writes `"loss": "0.5"`, numbers
    as text: read as numbers (only a W&B history's strings are text), where a JSON-lines log
    that held its numbers so imported nothing."""
    np = pytest.importorskip("numpy")
    log = tmp_path / "q.jsonl"
    with log.open("w") as handle:
        for step in range(3):
            row = {"step": step, "loss": np.float32(0.5), "reward": np.float32(1.0)}
            handle.write(json.dumps(row, default=str) + "\n")
    _, _, table = read_log(log)
    assert table.steps == {s: {"loss": 0.5, "reward": 1.0} for s in range(3)}
    assert not table.non_numeric
    done = CliRunner().invoke(app, ["import", str(log), "--out", str(tmp_path / "run")])
    assert done.exit_code == 0, done.output


def test_a_log_of_text_says_it_dropped_it(tmp_path: Path) -> None:
    """A log whose values are all text that spells no number (`"n/a"`) has no step: the
    refusal said `skipped rows: 3 no metrics` only, as if the rows held none. It names what it
    dropped."""
    log = tmp_path / "q.jsonl"
    log.write_text("".join(f'{{"step": {s}, "loss": "n/a", "reward": "-"}}\n' for s in range(3)))
    done = CliRunner().invoke(app, ["import", str(log), "--out", str(tmp_path / "run")])
    assert done.exit_code == 3
    assert done.stderr == (
        f"error: {log}: no training step in this log (skipped rows: 3 no metrics; dropped 6 "
        "non-numeric values of loss, reward)\n"
    )


def test_a_non_finite_value_in_verls_file_log_stays_non_finite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verl's FileLogger writes with orjson, which spells NaN and the infinities `null`: a
    step whose grad norm was NaN (verl skips its update) and one whose loss was inf were read
    as steps without them, so the import counted no non-finite value and `check
    --max-nonfinite 0` passed the run (exit 0) that verl's own console log shows `nan` in."""
    tracking = pytest.importorskip("verl.utils.tracking", reason="needs verl")
    log = tmp_path / "verl.jsonl"
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(log))
    logger = tracking.FileLogger("project", "experiment")
    for step, (loss, grad_norm) in enumerate([(0.5, 1.0), (0.4, math.nan), (math.inf, 2.0)]):
        logger.log({"actor/loss": loss, "actor/grad_norm": grad_norm}, step + 1)
    logger.finish()
    assert b"null" in log.read_bytes()
    run = tmp_path / "run"
    runner = CliRunner()
    done = runner.invoke(app, ["import", str(log), "--out", str(run), "--format", "json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["nonfinite"] == {"grad_norm": 1, "loss": 1}
    checked = runner.invoke(app, ["check", str(run), "--max-nonfinite", "0", "--format", "json"])
    assert checked.exit_code == 1, checked.output
    (gate,) = [g for g in json.loads(checked.stdout)["gates"] if g["gate"] == "max_nonfinite"]
    assert gate["figure"] == 2


@pytest.mark.parametrize("as_array", [False, True], ids=["jsonl", "json-array"])
def test_a_logs_own_step_key_holds_past_a_later_rows_step(tmp_path: Path, as_array: bool) -> None:
    """A log keyed by `global_step` whose eval rows also hold `step` (their eval loop's count)
    was re-keyed by `step` from the first such row on, as a W&B export's `_step` gives way to
    `train/global_step`: of 100 steps, 50 were imported and 50 rows counted 'bad step'. Only
    W&B's `_step` gives way now; a log's own key holds."""
    rows = []
    for n in range(1, 101):
        rows.append({"global_step": n, "loss": 1 / n})
        if n % 50 == 0:
            rows.append({"global_step": n, "step": 8, "eval_loss": 0.5})
    log = tmp_path / ("log.json" if as_array else "log.jsonl")
    log.write_text(json.dumps(rows) if as_array else "\n".join(map(json.dumps, rows)) + "\n")
    table = read_log(log)[2]
    assert sorted(table.steps) == list(range(1, 101)) and table.skipped_rows == {"eval": 2}


@pytest.mark.parametrize("as_array", [False, True], ids=["jsonl", "json-array"])
def test_steps_kept_by_wandbs_step_before_another_key_are_warned_of(tmp_path, as_array) -> None:
    """A W&B export whose script logged 5 training rows (`_step` 0..4) before its trainer's
    `train/global_step` 1..10 imported 11 steps, steps 1..4 holding both rows' metrics, without
    a word. The import now says the key changed and the steps before may share numbers."""
    rows = [{"_step": n, "loss": 9.0} for n in range(5)]
    rows += [{"_step": 4 + n, "train/global_step": n, "train/loss": 1 / n} for n in range(1, 11)]
    log = tmp_path / ("log.json" if as_array else "log.jsonl")

    def write(rows: list[dict[str, float]]) -> None:
        log.write_text(json.dumps(rows) if as_array else "\n".join(map(json.dumps, rows)))

    write(rows)
    table = read_log(log)[2]
    assert sorted(table.steps) == list(range(11))
    (said,) = table.warnings
    assert "steps by train/global_step from here on, the 5 steps (0..4) before by _step" in said
    rows[0]["eval/loss"] = rows[0].pop("loss")  # TRL's: a script's evaluation alone before
    write(rows[:1] + rows[5:])
    assert read_log(log)[2].warnings == []
    rows[0]["loss"] = rows[0].pop("eval/loss")  # one script row: its step, not 0..0
    write(rows[:1] + rows[5:])
    (said,) = read_log(log)[2].warnings
    assert "the 1 step (0) before by _step: they may share numbers" in said, said


def test_csv_unfinished_last_row(tmp_path: Path) -> None:
    """A CSV log whose writer was stopped as it wrote its last row (`3,0.61,1.3` cut to
    `3,0.6`, no newline) imported step 3's loss as 0.6. A last row with no newline and fewer
    cells than its header is ignored with a warning; a whole last row with no newline (an
    export that ends so) and a short row with one are read."""
    log = tmp_path / "log.csv"
    log.write_text("step,loss,grad_norm\n1,0.5,1.0\n2,0.57,1.2\n3,0.6")
    _, _, table = read_log(log)
    assert table.steps == {1: {"loss": 0.5, "grad_norm": 1.0}, 2: {"loss": 0.57, "grad_norm": 1.2}}
    assert table.warnings == [f"{log}: line 4: unfinished last row ignored"]
    log.write_text("step,loss,grad_norm\n1,0.5\n2,0.57,1.2")
    _, _, table = read_log(log)
    assert table.steps == {1: {"loss": 0.5}, 2: {"loss": 0.57, "grad_norm": 1.2}}
    assert table.warnings == []


def test_jsonl_step_key_and_unfinished_last_line(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text('{"iteration": 4, "loss": 1}\n\n{"iteration": 5, "loss": 2}\n{"iteration": 6')
    with pytest.raises(InputError, match="no step key"):
        read_log(log)
    _, _, table = read_log(log, step_key="iteration")
    assert table.steps == {4: {"loss": 1.0}, 5: {"loss": 2.0}}
    assert table.warnings == [f"{log}: line 4: unfinished last line ignored"]
    with pytest.raises(UsageError, match="step key"):
        read_log(log, "tfevents", step_key="iteration")


def test_a_step_key_no_row_has_is_named(tmp_path: Path) -> None:
    """`import log.jsonl --step-key nope` said only 'no training step in this log', as if the
    log held none, where every row has a step under another key: the key is named."""
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 1}\n{"step": 2, "loss": 2}\n')
    with pytest.raises(InputError) as refused:
        read_log(log, step_key="nope")
    assert str(refused.value) == f"{log}: no row of 2 rows has the step key 'nope'"
    done = CliRunner().invoke(
        app, ["import", str(log), "--out", str(tmp_path / "run"), "--step-key", "nope"]
    )
    assert done.exit_code == 3 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"error: {log}: no row of 2 rows has the step key 'nope'"
    ]


def test_a_step_column_the_csv_header_lacks_is_named(tmp_path: Path) -> None:
    """`import log.csv --step-key nope` said 'no step column (one of step, global_step, ...;
    or pass --step-key)', the defaults of a key it had been given; and `--step-key ''` (an
    unset variable) said the same, exit 3. The key given is named (exit 3), an empty one is a
    usage error (exit 2)."""
    log = tmp_path / "log.csv"
    log.write_text("step,loss\n1,1\n2,2\n")
    with pytest.raises(InputError) as refused:
        read_log(log, step_key="nope")
    assert str(refused.value) == f"{log}: the header has no step column 'nope' (--step-key)"
    out = str(tmp_path / "run")
    empty = CliRunner().invoke(app, ["import", str(log), "--out", out, "--step-key", ""])
    assert empty.exit_code == 2, empty.output
    assert empty.stderr == "error: a step key must name a key or column; got an empty one\n"


@pytest.mark.parametrize(
    "name, content, skipped",
    [
        ("trainer_state.json", '{"log_history": [{"step": 3, "eval_loss": 1.5},'
         ' {"step": 3, "train_runtime": 9.0, "train_loss": 1.0}]}', "1 eval, 1 summary"),
        ("log.jsonl", '{"step": -1, "loss": 1}\n{"step": 1.5, "loss": 2}\n', "2 bad step"),
    ],
    ids=["eval-only-trainer-state", "bad-steps"],
)  # fmt: skip
def test_a_log_without_a_training_step_says_which_rows_it_skipped(
    tmp_path: Path, name: str, content: str, skipped: str
) -> None:
    """A trainer_state.json of an evaluation alone, or a log whose steps are all unusable,
    was refused with 'no training step in this log' alone, as if it held no row: the rows
    skipped, and why, are named."""
    log = tmp_path / name
    log.write_text(content)
    done = CliRunner().invoke(app, ["import", str(log), "--out", str(tmp_path / "run")])
    assert done.exit_code == 3 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"error: {log}: no training step in this log (skipped rows: {skipped})"
    ]


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"step": 1, "loss": 1}\nnot json\n{"step": 2}\n', "line 2: unreadable JSON line"),
        (b'{"step": 1}\n[1, 2]\n', "line 2: not a JSON object"),
        (b'{"step": 1, "loss": 1}\n\xff\xfe\x00junk\n', "line 2"),
        (b'{"step": 1, "loss": "' + b"x" * (2 << 20) + b'"}\n', "longer than 1 MiB"),
        (b"[" * 200_000 + b"\n", "nested too deeply|not valid JSON"),
    ],
    ids=["not-json", "not-object", "binary", "huge-line", "deep"],
)
def test_jsonl_hostile(tmp_path: Path, content: bytes, message: str) -> None:
    log = tmp_path / "log.jsonl"
    log.write_bytes(content)
    with pytest.raises(InputError, match=message):
        read_log(log)


def test_a_sparse_10_gb_file_is_refused_unread(tmp_path: Path) -> None:
    for name in ("big.jsonl", "big.csv", "events.out.tfevents.1.host", "trainer_state.json"):
        big = tmp_path / name
        with big.open("wb") as handle:
            handle.truncate(10 << 30)  # claims 10 GB, holds nothing on disk
        with pytest.raises(InputError, match="import limit"):
            read_log(big)


# -- CSV --------------------------------------------------------------------------------------
def test_csv_tracker_export(tmp_path: Path) -> None:
    log = tmp_path / "export.csv"
    log.write_text(
        "\ufeffStep,train/reward,train/grad_norm,eval/loss,note\n"
        "1,0.5,1.0,,a\n"
        "2,,2.0,0.3,\n"
        "3,nan,inf,,\n"
        "\n"
        "4.0,0.7\n"
    )
    _, found, table = read_log(log)
    assert found == "csv"
    assert table.steps[1] == {"train/reward": 0.5, "train/grad_norm": 1.0}
    assert table.steps[2] == {"train/grad_norm": 2.0}
    assert math.isnan(table.steps[3]["train/reward"])
    assert table.steps[4] == {"train/reward": 0.7}
    assert table.non_numeric == {"note": 1}
    assert table.not_imported == {"eval/loss": "eval"}


def test_a_long_number_in_a_csv_is_a_number(tmp_path: Path) -> None:
    """A number of more than 64 characters was dropped as non-numeric: '%.70f' of a loss,
    and 2.2e-308 written out exactly (1,076 characters). Up to 1,100 characters are read;
    longer text is not a number; an integer past a double's range is refused, as in JSON
    (it would read as infinity: a non-finite step no logger wrote)."""
    largest_subnormal = 2.225073858507201e-308
    exact = format(Decimal(largest_subnormal), "f")
    assert len(exact) == 1076
    log = tmp_path / "log.csv"
    log.write_text(f"step,loss,kl,note\n1,{0.123456789:.70f},{exact},{'1' * 1101}\n")
    _, _, table = read_log(log)
    assert table.steps == {1: {"loss": 0.123456789, "kl": largest_subnormal}}
    assert table.non_numeric == {"note": 1}
    log.write_text(f"step,loss\n1,0.5\n2,{'9' * 400}\n")
    with pytest.raises(InputError, match="step 2: loss is an integer past a double's range"):
        read_log(log)


def test_a_csv_cell_of_many_digits_is_no_number_at_once(tmp_path: Path) -> None:
    """A step cell of 20,000 digits and a letter took 9 s to tell it is no number (spec_float's
    pattern tried each split of the digits: quadratic, 34 s at 30,000 digits); a CSV cell
    may hold 128 KiB."""
    log = tmp_path / "log.csv"
    log.write_text(f"step,loss\n1,0.5\n{'1' * 20_000}x,0.4\n{'2' * 20_000}e,0.3\n")
    start = time.perf_counter()
    _, _, table = read_log(log)
    assert time.perf_counter() - start < 1
    assert table.steps == {1: {"loss": 0.5}} and table.skipped_rows == {"bad step": 2}


def test_csv_from_pandas_leaves_out_its_row_index(tmp_path: Path) -> None:
    """pandas' DataFrame.to_csv writes the row index first, under an empty header (and a file
    read back and written again holds it as `Unnamed: 0`): a row counter, not a metric."""
    pandas = pytest.importorskip("pandas")
    frame = pandas.DataFrame({"step": [1, 2], "loss": [0.5, float("nan")], "reward": [1.0, 2.0]})
    log = tmp_path / "log.csv"
    frame.to_csv(log)
    _, _, table = read_log(log)
    assert table.steps[1] == {"loss": 0.5, "reward": 1.0}
    assert table.steps[2] == {"reward": 2.0}  # NaN written as an empty cell: missing
    assert table.not_imported == {"": "bookkeeping"}
    pandas.read_csv(log).to_csv(log)
    _, _, table = read_log(log)
    assert table.steps[1] == {"loss": 0.5, "reward": 1.0}
    assert table.not_imported == {"": "bookkeeping", "Unnamed: 0": "bookkeeping"}


def test_a_tsv_file_is_read_with_tabs(tmp_path: Path) -> None:
    """`.tsv` is tab-separated whatever its header holds: names with commas as many as the
    tabs used to make it read as comma-separated (no step column)."""
    log = tmp_path / "log.tsv"
    log.write_text("step\tacc,top1\tacc,top5\n1\t0.5\t0.7\n")
    _, found, table = read_log(log)
    assert found == "csv" and table.steps == {1: {"acc,top1": 0.5, "acc,top5": 0.7}}


def test_tensorboard_per_tag_export_of_a_transformers_tag(tmp_path: Path) -> None:
    """TensorBoard's per-tag CSV is named run-RUN-tag-TAG.csv with the tag's `/` saved as `_`:
    transformers' `train/loss` arrives as `train_loss` (its end-of-training summary's name),
    which was skipped whole as that summary, and `train/grad_norm` was not the run's grad
    norm. A leading `train_` is read as the `train/` it was."""
    rows = "Wall time,Step,Value\n1700000000.5,1,0.5\n1700000001.5,2,0.25\n"
    loss = tmp_path / "run-Dec02_07-22-04_vm-tag-train_loss.csv"
    loss.write_text(rows)
    _, _, table = read_log(loss)
    assert table.steps == {1: {"train/loss": 0.5}, 2: {"train/loss": 0.25}}
    assert map_names(table.names, ()).standard == {"train/loss": "loss"}
    summary = tmp_path / "run-.-tag-train_train_loss.csv"
    summary.write_text(rows)
    _, _, table = read_log(summary)
    assert not table.steps and table.not_imported["train/train_loss"] == "summary"


@pytest.mark.parametrize(
    "tag, scalar",
    [
        ("critic/score/mean", "reward_mean"),
        ("actor/grad_norm", "grad_norm"),
        ("actor/pg_clipfrac", "clip_frac"),
        ("timing_s/step", "step_time"),
        ("train/clip_ratio/region_mean", "clip_frac"),
        ("train/clip_ratio/low_mean", "clip_frac_low"),
    ],
)
def test_tensorboard_per_tag_export_of_a_metric_with_slashes(
    tmp_path: Path, tag: str, scalar: str
) -> None:
    """verl's `critic/score/mean` exported per tag arrives as `critic_score_mean`, TRL's
    `train/clip_ratio/region_mean` as `train_clip_ratio_region_mean`: they were kept as extra
    scalars of those names, so the import of verl's reward had no reward_mean (check
    --fail-on-collapse: no reward to gate) and neither framework's clip fraction was
    clip_frac. A name that maps to a standard scalar is read as that metric."""
    log = tmp_path / f"run-Dec02_07-22-04_vm-tag-{tag.replace('/', '_')}.csv"
    log.write_text("Wall time,Step,Value\n1700000000.5,1,0.5\n1700000001.5,2,0.25\n")
    _, _, table = read_log(log)
    assert table.steps == {1: {tag: 0.5}, 2: {tag: 0.25}}
    assert map_names(table.names, ()).standard == {tag: scalar}


@pytest.mark.parametrize("suffix", [".csv", ".json"])
@pytest.mark.parametrize(
    "tag", ["val-core/openai/gsm8k/acc/mean@4", "val-aux/num_turns/min", "val/loss"]
)
def test_tensorboard_per_tag_export_of_an_evaluation_metric_is_left_out(
    tmp_path: Path, tag: str, suffix: str
) -> None:
    """verl's validation metric `val-core/openai/gsm8k/acc/mean@4` exported per tag arrives as
    `val-core_openai_gsm8k_acc_mean@4`: imported as a training metric of that name (steps 0
    and 5, exit 0), where the event file it came from leaves it out as evaluation. A leading
    evaluation prefix is read as the one it was, and the export has no training step."""
    log = tmp_path / f"run-.-tag-{tag.replace('/', '_')}{suffix}"
    log.write_text(
        "Wall time,Step,Value\n1700000000.5,0,0.5\n1700000001.5,5,0.75\n"
        if suffix == ".csv"
        else "[[1700000000.5, 0, 0.5], [1700000001.5, 5, 0.75]]"
    )
    _, _, table = read_log(log)
    assert not table.steps and table.skipped_rows == {"eval": 2}
    (name,) = [n for n, why in table.not_imported.items() if why != "bookkeeping"]
    assert name.startswith(tag.split("/")[0] + "/") and table.not_imported[name] == "eval"


@pytest.mark.parametrize(
    "name, metric",
    [
        ("events.out.tfevents.1700000000.vm.1.0-tag-train_reward.csv", "train/reward"),
        ("tfevents_summary.csv", "reward"),
    ],
)
def test_a_csv_with_tfevents_in_its_name_is_read_as_csv(
    tmp_path: Path, name: str, metric: str
) -> None:
    """`tfevents` anywhere in a name made it an event file, whatever its suffix: TensorBoard's
    per-tag CSV of a run named after its event file, or a user's `tfevents_summary.csv`, was
    refused as a corrupt event file. A text log's suffix tells its format first."""
    log = tmp_path / name
    header = "Wall time,Step,Value" if "-tag-" in name else "Wall time,Step,reward"
    log.write_text(f"{header}\n1700000000.5,1,0.5\n1700000001.5,2,0.25\n")
    assert detect_format(log) == "csv"
    _, found, table = read_log(log)
    assert found == "csv" and table.steps == {1: {metric: 0.5}, 2: {metric: 0.25}}


@pytest.mark.parametrize(
    "name, metric",
    [
        ("run-Dec02_07-22-04_vm-tag-train_reward.json", "train/reward"),
        ("run-.-tag-critic_score_mean.json", "critic/score/mean"),
        ("events.out.tfevents.1700000000.vm.1.0-tag-train_reward.json", "train/reward"),
    ],
)
def test_tensorboard_per_tag_json_export(tmp_path: Path, name: str, metric: str) -> None:
    """The JSON download of a TensorBoard scalar chart, `[[wall time, step, value], ...]`
    named as the per-tag CSV, was read as CSV and refused: 'no step column'. It is read as
    that CSV is, its metric named the same way; NaN stays NaN."""
    log = tmp_path / name
    log.write_text("[[1700000000.5, 1, 0.5], [1700000001.5, 2, 0.25], [1700000002.5, 3, NaN]]")
    assert detect_format(log) == "tensorboard_json"
    _, found, table = read_log(log)
    assert found == "tensorboard_json"
    assert table.steps[1] == {metric: 0.5} and table.steps[2] == {metric: 0.25}
    assert math.isnan(table.steps[3][metric])
    assert map_names(table.names, ()).standard == {metric: "reward_mean"}


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"a": 1}', "not TensorBoard's per-tag JSON"),
        (b"[[1700000000.5, 1]]", r"entry 1 is not \[wall time, step, value\]"),
        (b"[[1, 2, 3]" + b", [1, 2, 3]" * 2_000_000 + b"]", "JSON values"),
    ],
    ids=["object", "pair", "too-many"],
)
def test_tensorboard_per_tag_json_refusals(tmp_path: Path, content: bytes, message: str) -> None:
    log = tmp_path / "run-.-tag-loss.json"
    log.write_bytes(content)
    with pytest.raises(InputError, match=message):
        read_log(log, "tensorboard_json")
    with pytest.raises(UsageError, match="step key"):
        read_log(log, "tensorboard_json", step_key="Step")


def test_csv_wandb_chart_and_tensorboard_exports(tmp_path: Path) -> None:
    """A W&B chart's export ("Export panel data as CSV") holds the line and its envelope,
    `__MIN` and `__MAX`: the same numbers for one run's line, as W&B's staff say
    (wandb/wandb#5349), the range of what the line's point stands for where it does not (runs
    grouped, or a bucket of steps, whose last value W&B's full fidelity draws: its docs; the
    message said a mean). The envelope was imported as two extra scalars, and a line
    of means (0.5 at step 10, between 0.4 and 0.6) as the run's reward: the envelope is left
    out, and a row where it parts from the line refused, naming it."""
    chart = tmp_path / "wandb.csv"
    header = "Step,run-7 - train/reward,run-7 - train/reward__MIN,run-7 - train/reward__MAX\n"
    chart.write_text(header + "9,0.25,0.25,0.250\n10,0.5,0.4,0.6\n")
    with pytest.raises(
        InputError, match=r"line 3: train/reward is 0.5 but its __MIN is 0.4"
    ) as info:
        read_log(chart)
    assert "chart drew one point for a bucket of steps or for grouped runs" in str(info.value)
    chart.write_text(header + "9,0.25,0.25,0.250\n10,0.5,0.5,0.5\n11,,,\n")
    _, _, table = read_log(chart)
    assert table.steps == {9: {"train/reward": 0.25}, 10: {"train/reward": 0.5}}
    assert table.not_imported == dict.fromkeys(
        ["train/reward__MIN", "train/reward__MAX"], "bookkeeping"
    )
    per_tag = tmp_path / "run-.-tag-kl.csv"
    per_tag.write_text("Wall time,Step,Value\n1700000000.5,3,0.25\n")
    _, _, table = read_log(per_tag)
    assert table.steps == {3: {"kl": 0.25}}
    semicolons = tmp_path / "log.csv"
    semicolons.write_text("global_step;loss\n1;2,5\n2;3\n")
    _, _, table = read_log(semicolons)
    assert table.steps == {2: {"loss": 3.0}} and table.non_numeric == {"loss": 1}


def test_a_wandb_chart_of_a_run_whose_name_holds_a_dash_keeps_its_metric_names(
    tmp_path: Path,
) -> None:
    """W&B names a chart export's column `<run> - <metric>`; a run named `qwen-7b - grpo` lost
    its name at its first ` - `, so its metrics were `grpo - critic/score/mean`, ...: imported
    as extras (`grpo_-_critic/score/mean`), with no reward_mean or grad_norm to gate. The run's
    name is what precedes the last ` - ` (no framework's metric name holds one); two such runs
    are still two."""
    run = "qwen-7b - grpo"
    chart = tmp_path / "wandb.csv"
    chart.write_text(
        f"Step,{run} - critic/score/mean,{run} - critic/score/mean__MIN,"
        f"{run} - actor/grad_norm\n1,0.5,0.5,1.5\n"
    )
    _, _, table = read_log(chart)
    assert table.steps == {1: {"critic/score/mean": 0.5, "actor/grad_norm": 1.5}}
    chart.write_text("Step,a - seed 1 - loss,a - seed 2 - loss\n1,0.5,0.9\n")
    with pytest.raises(InputError, match=r"the columns of 2 runs \(a - seed 1, a - seed 2\)"):
        read_log(chart)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"loss,lr\n1,2\n", "no step column"),
        (b"step,loss\n1,2,3\n", "line 2: 3 cells"),
        (b"step,loss,loss\n1,2,3\n", "repeats a column"),
        (b"step,loss\n1,2\n\x00\x01\x02\n", "NUL byte"),
        (b"step,loss\n1,\xff\xfe\n", "not UTF-8"),
        (b"step,loss\n1," + b"9" * (2 << 20) + b"\n", "longer than 1 MiB"),
        (b'step,loss\n1,"' + b"x\n" * 100_000 + b'"\n', "not CSV"),
        (b"", "empty file"),
        # a W&B chart of two runs: both runs' rewards were kept as extras of one run
        # ('run-a_-_train/reward', 'run-b_-_train/reward'), neither its reward_mean
        (b"Step,run-a - train/reward,run-b - train/reward\n1,0.5,0.9\n",
         r"the columns of 2 runs \(run-a, run-b\).*export each alone"),
    ],
    ids=["no-step", "long-row", "repeat", "nul", "binary", "huge-line", "huge-cell", "empty",
         "wandb-runs"],
)  # fmt: skip
def test_csv_hostile(tmp_path: Path, content: bytes, message: str) -> None:
    log = tmp_path / "log.csv"
    log.write_bytes(content)
    with pytest.raises(InputError, match=message):
        read_log(log)


# -- TensorBoard ------------------------------------------------------------------------------
def test_tensorboard_from_torch_summary_writer(tmp_path: Path) -> None:
    import numpy as np

    with SummaryWriter(str(tmp_path)) as writer:
        for step in range(4):
            writer.add_scalar("train/loss", 1.0 / (step + 1), step)
            writer.add_scalar("train/reward", float(step), step, new_style=True)
            writer.add_scalar("eval/loss", 2.0, step)
        writer.add_scalar("train/grad_norm", float("nan"), 3)
        writer.add_histogram("weights", np.arange(10.0), 0)
        writer.add_text("args", "lr=1", 0)
    assert detect_format(tmp_path) == "tfevents"
    _, found, table = read_log(tmp_path)
    assert found == "tfevents"
    assert sorted(table.steps) == [0, 1, 2, 3]
    assert table.steps[1] == {"train/loss": 0.5, "train/reward": 1.0}
    assert math.isnan(table.steps[3]["train/grad_norm"])
    assert table.not_imported["eval/loss"] == "eval"
    assert table.not_imported["weights"] == "not a scalar"
    assert table.not_imported["args/text_summary"] == "not a scalar"


def test_tensorboard_tensor_scalars_of_every_dtype(tmp_path: Path) -> None:
    def tensor(**fields: object) -> tensor_pb2.TensorProto:
        return tensor_pb2.TensorProto(**fields)  # type: ignore[arg-type]

    records = [
        _tensor_event(1, "f", tensor(dtype=1, float_val=[0.5]), "scalars"),
        _tensor_event(1, "d", tensor(dtype=2, double_val=[0.25])),
        _tensor_event(1, "i", tensor(dtype=3, int_val=[-3])),
        _tensor_event(1, "q", tensor(dtype=9, int64_val=[1 << 40])),
        _tensor_event(1, "h", tensor(dtype=19, half_val=[0x3C00])),  # 1.0 in half
        _tensor_event(1, "bf", tensor(dtype=14, half_val=[0x3FC0])),  # 1.5 in bfloat16
        _tensor_event(1, "c", tensor(dtype=1, tensor_content=struct.pack("<f", 2.5))),
        _tensor_event(
            1, "v", tensor(dtype=1, float_val=[1, 2], tensor_shape={"dim": [{"size": 2}]})
        ),
        _tensor_event(1, "s", tensor(dtype=7, string_val=[b"x"])),
        _tensor_event(1, "p", tensor(dtype=1, float_val=[9.0]), "histograms"),
    ]
    log = tmp_path / "events.out.tfevents.1.host"
    log.write_bytes(b"".join(tfrecord(r) for r in records))
    _, _, table = read_log(log)
    assert table.steps == {
        1: {"f": 0.5, "d": 0.25, "i": -3.0, "q": float(1 << 40), "h": 1.0, "bf": 1.5, "c": 2.5}
    }
    assert {n for n, why in table.not_imported.items() if why == "not a scalar"} == {"v", "s", "p"}


def test_tensorboard_later_file_wins_and_negative_steps_skip(tmp_path: Path) -> None:
    def event(step: int, value: float) -> event_pb2.Event:
        value_ = summary_pb2.Summary.Value(tag="loss", simple_value=value)
        return event_pb2.Event(step=step, summary=summary_pb2.Summary(value=[value_]))

    _events(tmp_path / "events.out.tfevents.1.a", [event_pb2.Event(file_version="brain.Event:2"),
                                                  event(1, 1.0), event(2, 2.0)])  # fmt: skip
    _events(tmp_path / "events.out.tfevents.2.a", [event(2, 5.0), event(-1, 1.0)])
    (tmp_path / "notes.txt").write_text("not an event file")
    _, _, table = read_log(tmp_path)
    assert table.steps == {1: {"loss": 1.0}, 2: {"loss": 5.0}}
    assert table.replaced == 1 and table.skipped_rows == {"bad step": 1}


@pytest.mark.parametrize("session_start", [True, False])
def test_tensorboard_restart_drops_the_earlier_runs_later_steps(
    tmp_path: Path, session_start: bool
) -> None:
    """A run checkpointed at step 5, stopped at step 9 and restarted from its checkpoint (a new
    event file) that got to step 7: TensorBoard shows 0-4 of the first run and 5-7 of the second
    (a record at step s preempts its tag's records at steps >= s). A restart that says so, with
    a SessionLog START at step 5 (what `SummaryWriter(purge_step=5)` writes), drops every tag's
    steps from 5 on, as tensorboard's own reader does: the first run's `old_only` at 5-9 was
    imported (steps 8-9 of it alone: 10 steps where TensorBoard shows 8). A restart without
    one drops a tag's steps as it logs the tag again: a tag it does not log keeps its steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def run(name: str, steps: range, offset: float, restart: int | None = None) -> None:
        purge = restart if session_start else None  # it writes the SessionLog START
        with SummaryWriter(str(tmp_path / name), purge_step=purge) as writer:
            for step in steps:
                writer.add_scalar("loss", offset + step, step)
                if restart is None:
                    writer.add_scalar("old_only", float(step), step)
        (file,) = (tmp_path / name).iterdir()
        file.rename(tmp_path / f"events.out.tfevents.{name}")

    run("1.first", range(10), 0.0)
    run("2.restart", range(5, 8), 100.0, restart=5)
    _, _, table = read_log(tmp_path)
    loss = {step: row["loss"] for step, row in table.steps.items() if "loss" in row}
    assert loss == {0: 0.0, 1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0, 5: 105.0, 6: 106.0, 7: 107.0}
    old_only = {step: row["old_only"] for step, row in table.steps.items() if "old_only" in row}
    if session_start:
        accumulator = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
        accumulator.Reload()
        assert {e.step: e.value for e in accumulator.Scalars("loss")} == loss
        assert {e.step: e.value for e in accumulator.Scalars("old_only")} == old_only
        assert sorted(table.steps) == list(range(8))
        assert table.replaced == 0 and table.preempted == 10  # each tag's 5-9
        assert table.cells == 13
    else:
        assert sorted(table.steps) == list(range(10))  # old_only's steps 8-9 stay
        assert old_only == {step: float(step) for step in range(10)}
        assert table.replaced == 1 and table.preempted == 4  # 5 replaced; 6-9 dropped
    steps = StepTable("log", preempts=True)
    for step, value in ((1, 0), (3, 1), (4, 2), (2, 3)):
        steps.add(step, {"loss": value})
    assert steps.steps == {1: {"loss": 0.0}, 2: {"loss": 3.0}}  # emptied steps go
    assert steps.cells == 2
    steps.add(3, {"kl": 1})  # step 3 made again
    steps.restart(3)
    steps.restart(2)
    assert steps.steps == {1: {"loss": 0.0}} and steps.cells == 1 and steps.preempted == 4
    steps.add(2, {"loss": 5})  # loss's steps go on from 1
    assert steps.steps == {1: {"loss": 0.0}, 2: {"loss": 5.0}} and steps.preempted == 4


def test_transformers_tensorboard_log_imports_as_its_trainer_state(tmp_path: Path) -> None:
    """transformers' TensorBoardCallback writes each logged row as `train/<name>` scalars, the
    end-of-training summary too (`train/train_runtime`, `train/total_flos`, ...): the event
    files of a real TRL run's rows import as its trainer_state.json does (values as float32)."""
    pytest.importorskip("transformers")
    from transformers import TrainerState
    from transformers.integrations import TensorBoardCallback

    state_file = Path(__file__).parent.parent / "fixtures/imports/trl-lr0.3/trainer_state.json"
    callback = TensorBoardCallback(tb_writer=SummaryWriter(str(tmp_path)))
    for row in json.loads(state_file.read_text())["log_history"]:
        logs = {name: value for name, value in row.items() if name != "step"}
        callback.on_log(None, TrainerState(global_step=row["step"]), None, logs=logs)
    callback.on_train_end(None, None, None)
    _, _, from_state = read_log(state_file)
    _, _, from_events = read_log(tmp_path)

    def f32(value: float) -> float:
        return float(struct.unpack("<f", struct.pack("<f", value))[0])

    assert from_events.steps == {
        step: {f"train/{name}": f32(value) for name, value in row.items()}
        for step, row in from_state.steps.items()
    }
    assert from_events.not_imported["train/train_runtime"] == "summary"
    assert from_events.not_imported["train/total_flos"] == "bookkeeping"


def test_logs_in_subdirectories_are_named_not_dropped_unsaid(tmp_path: Path) -> None:
    """SummaryWriter.add_scalars writes each key as a TensorBoard run of its own, in a
    subdirectory: an import of the parent reads the parent's own files and names the runs it
    did not read; with no step of its own, the error names them. transformers' output_dir
    holds its trainer_state.json files in checkpoint-N directories: the error names those."""
    from stabledrl_cli.importers import import_log

    with SummaryWriter(str(tmp_path / "both")) as writer:
        for step in range(2):
            writer.add_scalar("loss", 1.0, step)
            writer.add_scalars("reward", {"a": step, "b": 2 * step}, step)
    _, _, table = read_log(tmp_path / "both")
    assert sorted(table.steps) == [0, 1]
    assert table.warnings == [
        f"{tmp_path / 'both'}: reward_a, reward_b hold TensorBoard runs of their own (add_scalars "
        "writes one per key, add_hparams one per call), not imported: import each on its own"
    ]
    with SummaryWriter(str(tmp_path / "only")) as writer:
        writer.add_scalars("reward", {"a": 1.0}, 0)
    with pytest.raises(
        InputError, match=r"no training step in this log \(.*: reward_a holds a TensorBoard run"
    ):
        import_log(tmp_path / "only", tmp_path / "run")
    for step in (3, 6):
        (tmp_path / "out" / f"checkpoint-{step}").mkdir(parents=True)
        (tmp_path / "out" / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "out" / "runs").mkdir()
    with pytest.raises(InputError, match="subdirectories checkpoint-3, checkpoint-6 hold logs"):
        detect_format(tmp_path / "out")


def test_tensorboard_tags_that_are_not_utf8_stay_apart(tmp_path: Path) -> None:
    """Two tags that differ in bytes that are not UTF-8 were both read as `loss\\ufffd`: one
    metric, the second value replacing the first. Such a byte is read as `\\xff`."""

    def event(tag: bytes, value: float) -> bytes:
        entry = b"\x0a" + bytes([len(tag)]) + tag + b"\x15" + struct.pack("<f", value)
        summary = b"\x0a" + bytes([len(entry)]) + entry
        return tfrecord(b"\x10\x01\x2a" + bytes([len(summary)]) + summary)

    log = tmp_path / "events.out.tfevents.1.host"
    log.write_bytes(event(b"loss\xff", 1.0) + event(b"loss\xfe", 2.0))
    _, _, table = read_log(log)
    assert table.steps == {1: {"loss\\xff": 1.0, "loss\\xfe": 2.0}} and table.replaced == 0
    assert map_names(table.names, ()).extra == {"loss\\xff": "loss_xff", "loss\\xfe": "loss_xfe"}


def _good_record() -> bytes:
    return tfrecord(_tensor_event(1, "loss", tensor_pb2.TensorProto(dtype=1, float_val=[1.0])))


def _bad_length_crc() -> bytes:
    record = bytearray(_good_record())
    record[8] ^= 0xFF
    return bytes(record)


def _bad_data_crc() -> bytes:
    record = bytearray(_good_record())
    record[-1] ^= 0xFF
    return bytes(record)


def _float_as_varint() -> bytes:
    """A DT_FLOAT tensor whose float_val is written as a 2**40 varint, not 4 fixed bytes."""
    tensor = b"\x08\x01" + b"\x28" + b"\x80\x80\x80\x80\x80\x20"
    value = b"\x0a\x04loss" + b"\x42" + bytes([len(tensor)]) + tensor
    summary = b"\x0a" + bytes([len(value)]) + value
    return tfrecord(b"\x10\x01" + b"\x2a" + bytes([len(summary)]) + summary)


def _claims(length: int) -> bytes:
    header = struct.pack("<Q", length)
    return header + struct.pack("<I", reference_masked_crc32c(header)) + b"\0" * 64


@pytest.mark.parametrize(
    "content, message",
    [
        (_bad_length_crc(), "length checksum mismatch"),
        (_good_record() + _bad_data_crc(), "data checksum mismatch"),
        (_claims(10 << 30), "claims 10737418240 bytes"),
        (tfrecord(b"\xff" * 20), "varint longer than 10 bytes"),
        (tfrecord(b"\x2a\xff\xff\xff\x0f"), "runs past the end"),
        (tfrecord(b"\x0b\x0c"), "wire type 3"),
        (tfrecord(b"\x00\x01"), "field number 0"),
        (tfrecord(b"\x2a\x04\x0a\x02\x0a\x50"), "runs past the end"),
        (tfrecord(b"\x2a\x05\x0a\x03\x15\x00\x00"), "runs past the end"),
        (_float_as_varint(), "a numeric field of wire type 0, not 5"),
    ],
    ids=["length-crc", "data-crc", "10GB", "varint", "past-end", "group", "field0", "nested",
         "fixed32", "float-as-varint"],
)  # fmt: skip
def test_tensorboard_crafted_files(tmp_path: Path, content: bytes, message: str) -> None:
    log = tmp_path / "events.out.tfevents.1.host"
    log.write_bytes(content)
    with pytest.raises(InputError, match=message):
        read_log(log)


def test_an_event_of_more_tags_than_a_log_holds_is_refused_as_they_are_read(
    tmp_path: Path,
) -> None:
    """One 1.3 MB event of 100,000 scalar tags: its tags were all held (a dict of each tag's
    value, 17 MB here) before the table refused the 1,001st metric name; a 33 MB record of 2.3
    million took 491 MB and 17 s to refuse. Now the event is refused at its 21,001st tag."""
    import tracemalloc

    values = [summary_pb2.Summary.Value(tag=f"{i:x}", simple_value=1.0) for i in range(100_000)]
    event = event_pb2.Event(step=1, summary=summary_pb2.Summary(value=values))
    log = tmp_path / "events.out.tfevents.1.host"
    log.write_bytes(tfrecord(event.SerializeToString()))
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="record at byte 0: an event of more than 21,000"):
            read_log(log)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_tensorboard_unfinished_last_record_is_ignored(tmp_path: Path) -> None:
    log = tmp_path / "events.out.tfevents.1.host"
    log.write_bytes(_good_record() + _good_record()[:30])
    _, _, table = read_log(log)
    assert table.steps == {1: {"loss": 1.0}}
    offset = len(_good_record())
    assert table.warnings == [f"{log}: unfinished last record ignored (byte {offset})"]


def test_tensorboard_records_appended_after_the_open_are_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file is read as it was when opened: a live writer appending faster than the checksums
    are computed kept the import reading for as long as it wrote (a writer stopped after 20 s
    took it 46.7 s, 52 MiB), with no bound."""
    from stabledrl_cli.importers import _tfevents

    log = tmp_path / "events.out.tfevents.1.host"
    later = tfrecord(_tensor_event(2, "loss", tensor_pb2.TensorProto(dtype=1, float_val=[2.0])))
    log.write_bytes(_good_record())
    opened = _tfevents.open_log

    class Growing(io.BufferedReader):
        """The file as a live writer appends to it once reading began."""

        def read(self, size: int | None = -1, /) -> bytes:
            if not getattr(self, "appended", False):
                self.appended = True
                with log.open("ab") as writer:  # a record, and half of the next one
                    writer.write(later + later[:30])
            return super().read(size)

    def open_then_append(path: Path, limit: int) -> io.BufferedReader:
        return Growing(opened(path, limit).detach())  # type: ignore[arg-type]

    monkeypatch.setattr(_tfevents, "open_log", open_then_append)
    _, _, table = read_log(log)
    assert table.steps == {1: {"loss": 1.0}}
    assert table.warnings == []


def test_detect_formats_by_content(tmp_path: Path) -> None:
    cases = {
        "a": b'{\n  "log_history": []\n}\n',
        "a1": b'{"best_metric": null, "log_history": [{"step": 1, "loss": 0.5}]}\n',
        "b": b'{"step": 1}\n',
        "c": b"step,loss\n1,2\n",
        "d": _good_record(),
    }
    found = {}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        found[name] = detect_format(tmp_path / name)
    assert found == {"a": "trainer_state", "a1": "trainer_state", "b": "jsonl", "c": "csv",
                     "d": "tfevents"}  # fmt: skip
    (tmp_path / "e").write_bytes(b"\x00\x01\x02 hello")
    with pytest.raises(InputError, match="--format-in"):
        detect_format(tmp_path / "e")
    # verl's file log (VERL_FILE_LOGGER_PATH may name it anything): rows of 80-odd metrics
    # pass the 4096 bytes sniffed; a first line cut there was taken for a JSON document over
    # several lines, and the import said 'unreadable trainer_state.json: ... Extra data'.
    row = {"step": 1, "data": {f"actor/metric_{i}/mean": 0.123456789 for i in range(150)}}
    (tmp_path / "verl.log").write_text(f"\n{json.dumps(row)}\n{json.dumps(row | {'step': 2})}\n")
    assert detect_format(tmp_path / "verl.log") == "jsonl"
    assert sorted(read_log(tmp_path / "verl.log")[2].steps) == [1, 2]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="a directory without"):
        detect_format(tmp_path / "empty")


@pytest.mark.parametrize(
    "log_format, message",
    [
        ("trainer_state", "a directory without trainer_state.json (its subdirectory "
         "checkpoint-4 holds a log: import one)"),
        ("jsonl", "a directory; a jsonl log is one file"),
        ("csv", "a directory; a csv log is one file"),
    ],
)  # fmt: skip
def test_a_directory_given_as_a_file_format_is_refused_saying_so(
    tmp_path: Path, log_format: str, message: str
) -> None:
    """`import OUTPUT_DIR --format-in trainer_state` on a transformers output_dir that keeps
    trainer_state.json in its checkpoint-N directories said '...: not a regular file', where
    the same directory without --format-in is refused naming the checkpoint that holds one."""
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text('{"log_history": []}')
    done = CliRunner().invoke(
        app, ["import", str(tmp_path), "--format-in", log_format, "--out", str(tmp_path / "r")]
    )
    assert done.exit_code == 3 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [f"error: {tmp_path}: {message}"]


def test_a_number_in_a_log_is_ascii_decimal_notation() -> None:
    """float() and int() also read other scripts' digits and `_` separators: a step "1_0" was
    step 10 and a value "\u0661" was 1. Text such as those is not a number (docs/importing.md)."""
    table = StepTable("log")
    table.add("1_0", {"loss": 1.0})
    table.add("\u0662", {"loss": 1.0})
    table.add("3", {"loss": "1_0", "reward": "\u0661", "kl": " 2.5e-1 ", "gain": "-Infinity"})
    assert table.steps == {3: {"kl": 0.25, "gain": -math.inf}}
    assert table.skipped_rows == {"bad step": 2}
    assert table.non_numeric == {"loss": 1, "reward": 1}


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_a_log_newest_first_keeps_every_step(tmp_path: Path, suffix: str) -> None:
    """A log sorted newest first (an export sorted by step, descending) goes back at every row:
    each row was taken for a restart dropping the steps after it, so the import kept step 1
    alone of 5 ('4 values dropped: steps after the step a restarted run logged again', exit
    0). A row below every step its metric has is no restart: all 5 steps are kept."""
    rows = [(5, 0.5), (4, 0.4), (3, 0.3), (2, 0.2), (1, 0.1)]
    path = tmp_path / f"log.{suffix}"
    if suffix == "jsonl":
        _jsonl(path, [{"step": s, "loss": v} for s, v in rows])
    else:
        path.write_text("step,loss\n" + "".join(f"{s},{v}\n" for s, v in rows))
    _, _, table = read_log(path)
    assert table.steps == {s: {"loss": v} for s, v in rows}
    assert table.preempted == 0 and table.replaced == 0


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "json"])
def test_a_jsonl_or_csv_log_appended_across_a_restart_drops_the_dead_runs_later_steps(
    tmp_path: Path, suffix: str
) -> None:
    """A run that logged steps 1-4, restarted from a checkpoint at step 2 and appended steps
    2-3 to its log: the import kept the dead run's step 4 (loss 4.0, as if the restart had got
    there); as TensorBoard's reader does, a row going back in steps drops its metrics' later
    steps (`preempted`). A metric the restart did not log again keeps its steps. The same
    rows as a JSON array (a W&B history exported with pandas' to_json(orient="records")) kept
    the dead run's step 4 too."""
    rows = [(1, 1.0, 0.5), (2, 2.0, 0.5), (3, 3.0, 0.5), (4, 4.0, 0.5), (2, 20.0, None)]
    rows += [(3, 30.0, None)]
    path = tmp_path / f"log.{suffix}"
    objects = [{"step": s, "loss": v, **({"lr": lr} if lr else {})} for s, v, lr in rows]
    if suffix == "jsonl":
        _jsonl(path, objects)
    elif suffix == "json":
        path.write_text(json.dumps(objects))
    else:
        lines = ["step,loss,lr"] + [f"{s},{v},{'' if lr is None else lr}" for s, v, lr in rows]
        path.write_text("\n".join(lines) + "\n")
    _, _, table = read_log(path)
    loss = {step: row["loss"] for step, row in table.steps.items() if "loss" in row}
    assert loss == {1: 1.0, 2: 20.0, 3: 30.0}
    lr = {step: row["lr"] for step, row in table.steps.items()}
    assert lr == dict.fromkeys(range(1, 5), 0.5)
    assert table.replaced == 1 and table.preempted == 2  # step 2's loss replaced; 3-4 dropped


def test_a_csv_header_written_again_by_a_restarted_writer_names_the_rows_after_it(
    tmp_path: Path,
) -> None:
    """A run restarted from its checkpoint at step 3 appended to its CSV with a header of its
    own (`csv.DictWriter(open(path, "a"), fieldnames=list(row)).writeheader()`), whose columns
    came in another order: its rows were read under the first header, so step 3's loss 0.25 and
    reward 0.35 were imported swapped (loss 0.35, reward 0.25); with a column more, the import
    was refused ('line 8: 5 cells, the header has 3'). The rows after a header read under it,
    its step column wherever it is."""
    log = tmp_path / "metrics.csv"
    log.write_text(
        "step,loss,reward\n1,0.5,0.1\n2,0.4,0.2\n3,0.3,0.3\n4,0.2,0.4\n"
        "step,reward,loss\n3,0.35,0.25\n"
    )
    _, _, table = read_log(log)
    assert table.steps[3] == {"loss": 0.25, "reward": 0.35}
    assert sorted(table.steps) == [1, 2, 3] and table.skipped_rows == {}
    assert table.replaced == 2 and table.preempted == 2  # step 3's two; step 4's two dropped
    with log.open("a") as more:
        more.write("kl,reward,loss,eval_loss,step\n0.01,0.45,0.2,0.7,4\n")  # step moved
    _, _, table = read_log(log)
    assert table.steps[4] == {"kl": 0.01, "loss": 0.2, "reward": 0.45}
    assert table.not_imported == {"eval_loss": "eval"}
    done = CliRunner().invoke(app, ["import", str(log), "--out", str(tmp_path / "run")])
    assert done.exit_code == 0, done.output


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_a_run_name_holding_tag_keeps_the_metric_of_a_per_tag_export(
    tmp_path: Path, suffix: str
) -> None:
    """The tag was taken after the first `-tag-`, so a run named `exp-tag-v1` exported
    `run-exp-tag-v1-tag-train_reward.csv` as an extra scalar `v1-tag-train_reward`, no
    reward_mean; the tag follows the last `-tag-`."""
    log = tmp_path / f"run-exp-tag-v1-tag-train_reward{suffix}"
    if suffix == ".csv":
        log.write_text("Wall time,Step,Value\n1700000000.5,1,0.5\n1700000001.5,2,0.25\n")
    else:
        log.write_text("[[1700000000.5, 1, 0.5], [1700000001.5, 2, 0.25]]\n")
    _, _, table = read_log(log)
    assert table.steps == {1: {"train/reward": 0.5}, 2: {"train/reward": 0.25}}
    assert map_names(table.names, ()).standard == {"train/reward": "reward_mean"}
