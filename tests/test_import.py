"""`stabledrl import` end to end, on the trainer_state.json of a real tiny TRL run.

fixtures/imports/trl-lr*/trainer_state.json come from tests/trl_scripts/make_trainer_state.py
(a real GRPOTrainer on CPU); with trl installed, a fresh run checks the import still maps every
metric TRL logs. The imported run is then inspected and gated like a recorded one.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _cli import run_cli, run_cli_together
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app
from stabledrl_cli.importers import STANDARD_SOURCES

ROOT = Path(__file__).resolve().parents[1]
TRL_STATE = ROOT / "fixtures" / "imports" / "trl-lr0.2" / "trainer_state.json"
"""A real tiny TRL run that learns its task, its gradient norm spiking on the way."""
TRL_COLLAPSED = ROOT / "fixtures" / "imports" / "trl-lr0.3" / "trainer_state.json"
"""The same run at a larger learning rate: its reward collapses."""
SCRIPTS = Path(__file__).parent / "trl_scripts"
HANG_SECONDS = 30.0
"""Wall-clock bound of a hostile log's import: a hang guard, far above its ~0.5 s of work."""
runner = CliRunner()


def _import(*args: str) -> dict[str, Any]:
    result = runner.invoke(app, ["import", *args, "--format", "json"])
    assert result.exit_code == 0, result.output
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary


def test_trls_wandb_history_imports_the_steps_of_its_trainer_state(tmp_path: Path) -> None:
    """A real TRL run's W&B history (its rows as wandb's reader prints them, as JSON lines)
    holds TRL's `profiling/Time taken: ...` rows, one a profiled call at the step logged last:
    they made a step 0 of their own and 6 extra scalars (the step's last call), 4 steps
    where its trainer_state.json has 3. They are left out, as bookkeeping."""
    folder = ROOT / "fixtures" / "imports" / "wandb-trl"
    rows = [json.loads(line)["item"] for line in (folder / "history.jsonl").open()]
    media = ("completions.",)  # the table W&B writes as a group of keys: not a JSON-lines metric
    log = tmp_path / "history.jsonl"  # its rows of the trainer (a JSON-lines log's first row
    log.write_text("".join(  # names its step key: the script's evaluation before has _step)
        json.dumps({k: v for k, v in row.items() if not k.startswith(media)}) + "\n"
        for row in rows if "train/global_step" in row
    ))  # fmt: skip
    history = _import(str(log), "--out", str(tmp_path / "h"))
    state = _import(str(folder / "trainer_state.json"), "--out", str(tmp_path / "s"))
    assert (history["steps"], history["first_step"]) == (state["steps"], state["first_step"])
    assert sorted(history["extra"]) == sorted(f"train/{n}" for n in state["extra"])
    assert all(history["not_imported"][n] == "bookkeeping"
               for n in {k for row in rows for k in row} if n.startswith("profiling/"))  # fmt: skip


def test_the_docs_document_every_key_of_the_import_json(tmp_path: Path) -> None:
    """A script reads `import --format json`; docs/importing.md named two of its 15 keys."""
    summary = _import(str(TRL_STATE), "--out", str(tmp_path / "run"))
    text = (ROOT / "docs" / "importing.md").read_text()
    section = text[text.index("`--format json` prints one JSON document") :]
    section = section[: section.index("\n\n", section.index("| key |"))]
    rows = re.findall(r"^\| ((?:`[a-z_]+`(?:, )?)+) \|", section, re.M)
    documented = {key for row in rows for key in re.findall(r"`([a-z_]+)`", row)}
    assert documented == set(summary), documented ^ set(summary)


def test_the_help_names_every_kind_of_log_import_reads() -> None:
    """`stabledrl --help` and `import --help` (each one line) named four kinds of log,
    stopping at TensorBoard, where import reads W&B's run file and verl's console too."""
    kinds = ("trainer_state", "JSON", "CSV", "TensorBoard", "W&B", "verl")
    for args in (["--help"], ["import", "--help"]):
        result = CliRunner().invoke(app, args, env={"COLUMNS": "80"})
        assert result.exit_code == 0, result.output
        text = " ".join(result.stdout.split())
        said = text[text.index("Import a log") :].split(". ")[0]
        assert all(kind in said for kind in kinds), (args, said)


def test_a_log_whose_file_name_is_not_utf8_imports_to_a_readable_run(tmp_path: Path) -> None:
    """The manifest's source.file names the log escaped. Before, the name's lone surrogate
    went into the manifest, which every reader then refused (exit 3: a string with a lone
    surrogate), the import having said it imported 60 steps."""
    log = tmp_path / os.fsdecode(b"state\xff.json")
    log.write_bytes(TRL_STATE.read_bytes())
    summary = _import(str(log), "--out", str(tmp_path / "run"))
    assert summary["steps"] == 60
    shown = runner.invoke(app, ["inspect", str(tmp_path / "run"), "--format", "json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["source"]["file"] == "state\\xff.json"


def _training_rows(state: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {row["step"]: row for row in state["log_history"] if "loss" in row}


def _assert_maps_every_metric(summary: dict[str, Any], state: dict[str, Any]) -> None:
    """Every metric TRL logged on a training row is a standard or an extra scalar."""
    logged = {k for row in _training_rows(state).values() for k in row} - {"step", "epoch"}
    assert logged == set(summary["mapped"].values()) | set(summary["extra"])
    for standard in STANDARD_SOURCES:  # TRL logs every standard scalar
        assert standard in summary["mapped"], standard


def test_trl_trainer_state_imports_every_metric_and_value(tmp_path: Path) -> None:
    state = json.loads(TRL_STATE.read_text())
    summary = _import(str(TRL_STATE), "--out", str(tmp_path / "run"))
    _assert_maps_every_metric(summary, state)
    assert summary["mapped"]["clip_frac"] == "clip_ratio/region_mean"
    assert summary["skipped_rows"] == {"summary": 1}
    rows = _training_rows(state)
    run = sd.open_run(tmp_path / "run")
    assert run.step_numbers == sorted(rows)
    assert run.policy_spec is None
    assert run.manifest["source"]["format"] == "trainer_state"
    assert run.manifest["source"]["file"] == TRL_STATE.name
    for step in run:
        assert step.is_scalar
        row = rows[step.step]
        for standard, name in summary["mapped"].items():
            if name in row:
                assert step.scalars[standard] == row[name], (step.step, standard)
            else:
                assert standard not in step.scalars
        for name, extra in summary["extra"].items():
            if name in row:
                assert step.scalars[extra] == row[name]


def test_a_fresh_trl_run_still_maps_every_metric(tmp_path: Path) -> None:
    """The committed fixture is what TRL logs today: same metric names, all mapped. The same
    run's TensorBoard log (TRL's trainer reporting to tensorboard) imports as its
    trainer_state.json does: the same steps and scalars, the values as float32."""
    pytest.importorskip("trl", reason="needs trl 1.16 (pip install -e '.[trl]')")
    pytest.importorskip("tensorboard", reason="needs tensorboard (the dev extra)")
    sys.path.insert(0, str(SCRIPTS))
    import make_trainer_state

    state = make_trainer_state.trainer_state(tmp_path, max_steps=4, report_to="tensorboard")
    (tmp_path / "fresh.json").write_text(json.dumps(state))
    summary = _import(str(tmp_path / "fresh.json"), "--format-in", "trainer_state",
                      "--out", str(tmp_path / "run"))  # fmt: skip
    _assert_maps_every_metric(summary, state)
    committed = json.loads(TRL_STATE.read_text())
    names = {k for row in _training_rows(committed).values() for k in row}
    assert {k for row in _training_rows(state).values() for k in row} == names
    (events,) = (tmp_path / "out" / "runs").iterdir()
    from_events = _import(str(events), "--out", str(tmp_path / "events"))
    assert from_events["mapped"] == {s: f"train/{n}" for s, n in summary["mapped"].items()}
    assert from_events["counts"] == summary["counts"]
    for logged, read in zip(sd.open_run(tmp_path / "run"), sd.open_run(tmp_path / "events"),
                            strict=True):  # fmt: skip
        assert read.step == logged.step
        standard = [name for name in summary["mapped"] if name in logged.scalars]
        assert standard == [name for name in summary["mapped"] if name in read.scalars]
        for name in standard:
            assert read.scalars[name] == np.float32(logged.scalars[name]), (read.step, name)


def test_table_output_and_force(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["import", str(TRL_STATE), "--out", str(run)]
    result = runner.invoke(app, args, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("imported ")
    assert any(line.split()[:2] == ["clip_frac", "clip_ratio/region_mean"] for line in lines)
    assert max(len(line.rstrip()) for line in lines) <= 80
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "pass --force" in again.output
    forced = runner.invoke(app, [*args, "--force"])
    assert forced.exit_code == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["import", "", "--out", "run"], "Invalid value for 'SRC': the path is empty"),
        (["import", "log/trainer_state.json", "--out", "", "--force"],
         "import: the path of its run is empty"),
        (["watch", "", "--once"], "watch: the path of the run is empty"),
    ],
    ids=["import-src", "import-out", "watch"],
)  # fmt: skip
def test_an_empty_path_is_refused_not_taken_for_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    """`import "$LOG" --out "$RUN"` with a variable unset: typer's Path made "" the working
    directory, so an empty SRC imported the trainer_state.json there ('imported 60 steps of
    trainer_state.json', exit 0), an empty --out with --force wrote manifest.json and steps/
    among the working directory's files, and `watch ""` watched it. Each is refused, exit 2."""
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / "trainer_state.json").write_bytes(TRL_STATE.read_bytes())
    (tmp_path / "trainer_state.json").write_bytes(TRL_STATE.read_bytes())
    runner.invoke(app, ["import", str(TRL_STATE), "--out", str(tmp_path / "imported")])
    monkeypatch.chdir(tmp_path / ("imported" if args[0] == "watch" else "."))
    before = sorted(p.name for p in Path().iterdir())
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stdout == "" and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in Path().iterdir()) == before


@pytest.mark.parametrize(
    ("name", "text", "said"),
    [
        ("train.log", b"", "empty file"),
        ("metrics.json", b"", "empty file"),
        ("log", b"", "empty file"),
        ("train.log", b"\n\n  \r\n", "empty file (blank lines only)"),
        ("metrics.json", b"\n", "empty file (blank lines only)"),
    ],
)
def test_an_empty_log_is_named_empty_not_of_a_kind_to_pass(
    tmp_path: Path, name: str, text: bytes, said: str
) -> None:
    """A log a job left empty (it ended before its first line) was 'cannot tell what kind of
    log this is (...); pass --format-in', where --format-in csv then said 'empty file'; one
    of blank lines only still was, and --format-in csv then said 'no step column'."""
    log = tmp_path / name
    log.write_bytes(text)
    result = runner.invoke(app, ["import", str(log), "--out", str(tmp_path / "run")])
    assert (result.exit_code, result.stderr) == (3, f"error: {log}: {said}\n")
    assert not (tmp_path / "run").exists()


def test_a_foreign_manifest_is_named_without_the_force_hint(tmp_path: Path) -> None:
    """A directory whose manifest.json is another tool's was 'not empty; pass --force', and
    --force was then refused ('is not a stabledrl run's manifest'): the refusal now comes
    first, without the hint that cannot help."""
    run = tmp_path / "webapp"
    run.mkdir()
    (run / "manifest.json").write_text('{"name": "webapp"}')
    for force in ([], ["--force"]):
        result = runner.invoke(app, ["import", str(TRL_STATE), "--out", str(run), *force])
        assert result.exit_code == 2, result.output
        assert result.stderr == (
            f"error: {run / 'manifest.json'} is not a stabledrl run's manifest: replacing a "
            "run would overwrite it; remove it, or import into another --out\n"
        )
    assert (run / "manifest.json").read_text() == '{"name": "webapp"}'


def test_other_formats_land_under_the_same_names(tmp_path: Path) -> None:
    (tmp_path / "log.csv").write_text(
        "train/global_step,train/reward,train/grad_norm,actor/pg_clipfrac,my metric\n"
        "1,0.5,1.5,0.1,7\n2,0.6,,0.2,8\n"
    )
    summary = _import(str(tmp_path / "log.csv"), "--out", str(tmp_path / "csv"))
    assert summary["mapped"] == {
        "reward_mean": "train/reward", "grad_norm": "train/grad_norm",
        "clip_frac": "actor/pg_clipfrac",
    }  # fmt: skip
    assert summary["extra"] == {"my metric": "my_metric"}
    assert summary["counts"]["grad_norm"] == 1
    run = sd.open_run(tmp_path / "csv")
    assert [s.scalars["clip_frac"] for s in run] == [0.1, 0.2]
    assert [s.scalars["my_metric"] for s in run] == [7.0, 8.0]


def test_a_log_that_names_its_metrics_as_a_run_does_lands_under_those_names(
    tmp_path: Path,
) -> None:
    """A custom loop's CSV with the run format's own names (`reward_mean`, `clip_frac`, its low
    and high sides) was imported with each kept as an extra `reward_mean.2`, ...: inspect
    then found no reward and judged no collapse. Each standard scalar's own name is its last
    source: a framework's name, where a log has both, still wins."""
    (tmp_path / "log.csv").write_text(
        "step,reward_mean,clip_frac,clip_frac_low,clip_frac_high\n0,0.5,0.1,0.02,0.08\n"
    )
    summary = _import(str(tmp_path / "log.csv"), "--out", str(tmp_path / "own"))
    assert summary["mapped"] == {name: name for name in
        ("reward_mean", "clip_frac", "clip_frac_low", "clip_frac_high")}  # fmt: skip
    assert summary["extra"] == {}
    assert sd.open_run(tmp_path / "own").step(0).scalars["reward_mean"] == 0.5
    (tmp_path / "both.csv").write_text("step,reward_mean,reward\n0,0.5,0.7\n")
    summary = _import(str(tmp_path / "both.csv"), "--out", str(tmp_path / "both"))
    assert summary["mapped"] == {"reward_mean": "reward"}
    assert summary["extra"] == {"reward_mean": "reward_mean.2"}


def test_nonfinite_values_are_kept_and_counted(tmp_path: Path) -> None:
    (tmp_path / "log.jsonl").write_text(
        '{"step": 1, "loss": 1.0, "grad_norm": 2.0}\n'
        '{"step": 2, "loss": NaN, "grad_norm": Infinity}\n'
    )
    summary = _import(str(tmp_path / "log.jsonl"), "--out", str(tmp_path / "run"))
    assert summary["nonfinite"] == {"loss": 1, "grad_norm": 1}
    second = list(sd.open_run(tmp_path / "run"))[1]
    assert math.isnan(second.scalars["loss"]) and second.scalars["grad_norm"] == math.inf
    assert second.scalars["nonfinite"] == 2


def test_exit_codes_in_a_real_process(tmp_path: Path) -> None:
    bad = tmp_path / "events.out.tfevents.1.host"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"\x00" * 40)
    cases = {
        "missing": ([str(tmp_path / "nope.jsonl")], 3),
        "crafted": ([str(bad)], 3),
        "no steps": ([str(tmp_path / "empty.jsonl")], 3),
        "bad format": ([str(TRL_STATE), "--format-in", "yaml"], 2),
        "huge int": ([str(tmp_path / "huge.jsonl")], 3),
        "huge int state": ([str(tmp_path / "trainer_state.json")], 3),
    }
    (tmp_path / "empty.jsonl").write_text('{"step": 1, "epoch": 1}\n')
    huge = {"step": 6, "loss": 10**400}  # JSON integers have no bound; a double's end at 1.8e308
    (tmp_path / "huge.jsonl").write_text(f'{{"step": 5, "loss": 1.0}}\n{json.dumps(huge)}\n')
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": [huge]}))
    real = ("missing", "bad format")  # a process of its own per exit code; the rest in this one
    *refused, ok = run_cli_together(
        *(["import", *cases[name][0], "--out", tmp_path / name] for name in real),
        ["import", TRL_STATE, "--out", tmp_path / "ok"],
        timeout=120,
    )
    ended = {
        name: (d.returncode, d.stdout, d.stderr) for name, d in zip(real, refused, strict=True)
    }
    for name, (args, _) in cases.items():
        if name not in ended:
            result = runner.invoke(app, ["import", *args, "--out", str(tmp_path / name)])
            ended[name] = (result.exit_code, result.stdout, result.stderr)
    for name, (_, code) in cases.items():
        returncode, stdout, stderr = ended[name]
        assert returncode == code, (name, stderr)
        assert stdout == "" and "Traceback" not in stderr, name
        if code == 3:
            assert len(stderr.strip().splitlines()) == 1, name
        if name.startswith("huge int"):
            assert "step 6: loss is an integer past a double's range" in stderr, name
    assert ok.returncode == 0, ok.stderr
    again = run_cli("import", TRL_STATE, "--out", tmp_path / "ok", timeout=120)
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1


def _sparse(path: Path) -> Path:
    with path.open("wb") as handle:
        handle.truncate(10 << 30)  # claims 10 GB, holds nothing on disk
    return path


def _claims_10_gb(path: Path) -> Path:
    from stabledrl_cli.importers._crc32c import masked_crc32c

    header = (10 << 30).to_bytes(8, "little")
    path.write_bytes(header + masked_crc32c(header).to_bytes(4, "little") + b"\0" * 100)
    return path


def _junk(path: Path) -> Path:
    path.write_bytes(bytes((i * 7919 + 13) % 256 for i in range(1 << 20)))
    return path


def _huge_line(path: Path) -> Path:
    path.write_bytes(b"step,loss\n1," + b"9" * (64 << 20) + b"\n")
    return path


@pytest.mark.parametrize(
    "make, name",
    [
        (_sparse, "big.jsonl"),
        (_sparse, "events.out.tfevents.1.host"),
        (_claims_10_gb, "events.out.tfevents.2.host"),
        (_junk, "junk.jsonl"),
        (_junk, "junk.csv"),
        (_huge_line, "huge.csv"),
    ],
    ids=["sparse-jsonl", "sparse-tfevents", "record-10GB", "junk-jsonl", "junk-csv", "huge-line"],
)
def test_hostile_logs_fail_fast_and_small(make: Any, name: str, tmp_path: Path) -> None:
    """Exit 3, one line, in a child under an address-space cap: under 16 MiB read, 100 MB of
    memory, and no hang."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _corpus import measure

    target = make(tmp_path / name)
    args = ["import", str(target), "--out", str(tmp_path / "run")]
    measured = measure(args, tmp_path / "c", preload=())  # `import` never loads torch
    assert measured.code == 3, measured.stderr
    assert len(measured.stderr.strip().splitlines()) == 1 and "Traceback" not in measured.stderr
    # Refused from what it read first: a few MiB (the modules the command imports among them),
    # not the 10 GB a sparse file claims or the 64 MiB line; the time bound only catches a hang.
    assert measured.read_mb is None or measured.read_mb < 16
    assert measured.seconds < HANG_SECONDS
    assert measured.extra_rss_mb < 100
    assert not (tmp_path / "run").exists()


def _inspect(run: Path) -> dict[str, Any]:
    result = runner.invoke(app, ["inspect", str(run), "--format", "json"])
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_inspect_finds_the_observed_collapse_and_the_spikes(tmp_path: Path) -> None:
    _import(str(TRL_COLLAPSED), "--out", str(tmp_path / "collapsed"))
    _import(str(TRL_STATE), "--out", str(tmp_path / "spiky"))
    collapsed = _inspect(tmp_path / "collapsed")["observed"]
    assert collapsed["first_reward_collapse"] == 21
    spiky = _inspect(tmp_path / "spiky")["observed"]
    assert spiky["first_reward_collapse"] is None
    assert spiky["recorded_spike_steps"] == [23, 24, 25]


def _doctored(state: dict[str, Any], out: Path) -> Path:
    """The log with its clip ratios tripled from step 31 on (a policy that clips more)."""
    doctored = json.loads(json.dumps(state))
    for row in doctored["log_history"]:
        if row.get("step", 0) > 30 and "clip_ratio/region_mean" in row:
            for key in ("clip_ratio/region_mean", "clip_ratio/low_mean", "clip_ratio/high_mean"):
                row[key] = min(1.0, 3 * row[key] + 0.2)
    out.write_text(json.dumps(doctored))
    return out


def _check(*args: str) -> tuple[int, dict[str, Any]]:
    result = runner.invoke(app, ["check", *args, "--format", "json"])
    assert result.exit_code in (0, 1), result.output
    report: dict[str, Any] = json.loads(result.stdout)
    return result.exit_code, report


def _failed(report: dict[str, Any]) -> set[str]:
    return {gate["gate"] for gate in report["gates"] if not gate["ok"]}


def test_check_gates_an_imported_run_against_its_baseline(tmp_path: Path) -> None:
    run, baseline = tmp_path / "run", tmp_path / "base.json"
    _import(str(TRL_STATE), "--out", str(run))
    code, _ = _check(str(run), "--write-baseline", str(baseline))
    assert code == 0
    code, report = _check(str(run), "-b", str(baseline))
    assert code == 0, _failed(report)
    state = json.loads(TRL_STATE.read_text())
    _import(str(_doctored(state, tmp_path / "doctored.json")), "--out", str(tmp_path / "doc"))
    code, report = _check(str(tmp_path / "doc"), "-b", str(baseline))
    assert code == 1
    assert any("clip_frac" in name for name in _failed(report)), _failed(report)
    _import(str(TRL_COLLAPSED), "--out", str(tmp_path / "collapsed"))
    code, report = _check(str(tmp_path / "collapsed"), "-b", str(baseline))
    assert code == 1
    assert any("collapse" in name or "reward" in name for name in _failed(report))
