"""W&B run files (`run-<id>.wandb`) written by real wandb, offline, for `stabledrl import`'s
tests. The committed fixtures come from:

    cd tests/trl_scripts
    python make_wandb_runs.py ../../fixtures/imports

which writes, under `wandb-trl/`, a tiny TRL GRPOTrainer run with `report_to="wandb"`
(make_trainer_state's settings, 6 steps logged every 2, completions logged as a W&B table;
the run started by the script, which logs an evaluation before training) and that run's
`trainer_state.json`; under `wandb-verl/`, 10 steps (and 2 validations) logged
by verl's own `Tracking` to W&B and to its file log (`verl.jsonl`), as test_import_verl
computes them, step 4's grad norm NaN. Beside each `.wandb` file, `history.jsonl` holds its
history records as wandb's own reader prints them (`wandb leet inspect --json`), the numbers
the tests compare with, and `export.jsonl` the history as W&B's public API gives it once the
run is synced, which offline it cannot be: `for row in run.scan_history(): f.write(
json.dumps(row) + "\n")`, where each row is the record's items by key (`HistoryScan`, wandb
0.31: `{item.key: json.loads(item.value_json)}`), a medium (a key group with a `_type`: TRL's
`completions` table) one object under its key, as wandb-core uploads it; under `wandb-trl/`,
`export.csv` those rows as `run.history().to_csv(PATH)` writes them (`history()` is
`pd.DataFrame.from_records` of the rows, sampled to 500: all of these; needs pandas). wandb
writes offline (WANDB_MODE=offline) with system metrics, console capture and machine info
off, so each file stays under 50 KB.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUIET = {
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "WANDB_CONSOLE": "off",
    "WANDB_DISABLE_GIT": "true",
    "WANDB_DISABLE_CODE": "true",
    "WANDB__DISABLE_STATS": "true",
    "WANDB__DISABLE_META": "true",
    "WANDB__DISABLE_MACHINE_INFO": "true",
}


def _trl(work: Path) -> Path:
    """Trains the tiny TRL run in `work`, reporting to W&B; its trainer_state.json."""
    import tiny_grpo
    import wandb
    from make_trainer_state import SETTINGS
    from trl import GRPOTrainer

    config = {**SETTINGS, "max_steps": 6, "logging_steps": 2, "log_completions": True}
    wandb.init()  # the user's, before the trainer's callback defines its step metric
    wandb.log({"eval/reward": 0.25})  # say, a baseline evaluation
    trainer = GRPOTrainer(
        model=tiny_grpo.tiny_model_dir(str(work / "model")),
        reward_funcs=tiny_grpo.count_b,
        args=tiny_grpo.tiny_config(str(work / "out"), report_to="wandb", **config),
        train_dataset=tiny_grpo.tiny_dataset(),
        processing_class=tiny_grpo.tiny_tokenizer(),
    )
    trainer.train()
    trainer.save_state()
    wandb.finish()  # what the end of a script does
    return work / "out" / "trainer_state.json"


def _verl(work: Path) -> Path:
    """verl's file log of the run it also logged to W&B."""
    from test_import_verl import write_verl_log

    with pytest.MonkeyPatch.context() as monkeypatch:
        log, _ = write_verl_log(
            work, monkeypatch, steps=10, grad_norms={4: math.nan}, backends=("file", "wandb")
        )
    return log


def _history(wandb_file: Path) -> str:
    """The history records of `wandb_file`, one JSON object a line, as wandb's reader prints
    them."""
    printed = subprocess.run(
        ["wandb", "leet", "inspect", "--json", str(wandb_file)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    records = [json.loads(line) for line in printed.splitlines() if line.strip()]
    return "".join(
        json.dumps(r["history"], sort_keys=True) + "\n" for r in records if r["type"] == "history"
    )


_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
"""What leet prints for value_json's bare NaN and infinities (neither run logs text)."""


def _export(history: str) -> str:
    """`history` (history.jsonl's records) as `scan_history()` rows, one JSON object a line."""
    lines = []
    for line in history.splitlines():
        item = json.loads(line)["item"]
        media = {n[: -len("._type")] for n in item if n.endswith("._type")}
        row: dict[str, object] = {}
        for name, printed in item.items():
            value = _NONFINITE.get(printed, printed) if isinstance(printed, str) else printed
            group = next((m for m in media if name.startswith(f"{m}.")), None)
            if group is None:
                row[name] = value
            else:
                nested = row.setdefault(group, {})
                assert isinstance(nested, dict)
                nested[name[len(group) + 1 :]] = value
        lines.append(json.dumps(row) + "\n")
    return "".join(lines)


def _export_csv(export: Path, target: Path) -> None:
    """The rows of `export` (export.jsonl) as pandas writes `run.history()`'s DataFrame."""
    import pandas as pd

    rows = [json.loads(line) for line in export.open()]
    pd.DataFrame.from_records(rows).to_csv(target)


def make(target: Path, name: str, run_id: str) -> None:
    """Runs `name` (trl or verl) with W&B offline and copies its files to target/wandb-name."""
    import wandb

    out = target / f"wandb-{name}"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        os.environ.update(QUIET, WANDB_DIR=work, WANDB_RUN_ID=run_id)
        other = (_trl if name == "trl" else _verl)(Path(work))
        wandb.teardown()  # the next run reads WANDB_DIR anew
        (wandb_file,) = Path(work, "wandb").glob(f"*run-*/run-{run_id}.wandb")
        shutil.copyfile(other, out / other.name)
        shutil.copyfile(wandb_file, out / wandb_file.name)
        history = _history(wandb_file)
        (out / "history.jsonl").write_text(history)
        (out / "export.jsonl").write_text(_export(history))
        if name == "trl":
            _export_csv(out / "export.jsonl", out / "export.csv")


if __name__ == "__main__":
    make(Path(sys.argv[1]), "trl", "trltiny")
    make(Path(sys.argv[1]), "verl", "verltiny")
