"""Where a recording TRL trainer records: its run directory (`run_dir`), and the step of the
checkpoint its train() resumes (`resume_step`)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from stabledrl_cli.capture._record_out import refuse_another_run_dir
from stabledrl_cli.capture.bootstrap import ENV_RUN_DIR, env_force
from stabledrl_cli.dump._arguments import path_argument, switch_argument
from stabledrl_cli.errors import InputError, UsageError
from stabledrl_cli.importers._trainer_state import bounded_json_document


def run_dir(out: str | os.PathLike[str] | None, overwrite: bool, trainer: str) -> tuple[Path, bool]:
    """(directory, overwrite): `out`, else $STABLEDRL_RUN_DIR (set by `stabledrl record`,
    which also passes --force); UsageError naming `trainer` when neither is there, or when
    `out` is another directory than record's --out (whose optimizer hooks stand down for the
    trainer: record would find no step there), or when `out` is empty or no path, or
    `overwrite` is not True or False."""
    overwrite = switch_argument(overwrite, "stabledrl_overwrite")
    if out is not None:
        out = path_argument(out, "stabledrl_out")
        refuse_another_run_dir(
            out, f"{trainer}'s stabledrl_out={os.fspath(out)}", "leave stabledrl_out out"
        )
        return Path(out), overwrite
    env = os.environ.get(ENV_RUN_DIR)
    if not env:
        raise UsageError(
            f"{trainer} needs a run directory: pass stabledrl_out=DIR, or run the "
            "script under `stabledrl record --out DIR -- python train.py`"
        )
    return Path(env), overwrite or env_force()


def resume_step(trainer: Any, checkpoint: str | bool | None) -> int | None:
    """The global_step of the checkpoint `train(resume_from_checkpoint=...)` resumes, else None.
    OSError when there is no checkpoint to resume (TRL's train() refuses that with its own
    error); InputError, one line, when its trainer_state.json is not one (read bounded and
    strict: `bounded_json_document`)."""
    if checkpoint is None or checkpoint is False:
        return None
    if checkpoint is True:
        trainer_utils: Any = importlib.import_module("transformers.trainer_utils")
        checkpoint = trainer_utils.get_last_checkpoint(trainer.args.output_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"no checkpoint in {trainer.args.output_dir}")
    path = Path(str(checkpoint)) / "trainer_state.json"
    if not os.path.lexists(path):
        raise FileNotFoundError(f"no {path}")
    state = bounded_json_document(path)
    step = state.get("global_step") if isinstance(state, dict) else None
    if type(step) is not int or step < 0:
        raise InputError(f"{path}: not a trainer_state.json (no global_step: a whole number >= 0)")
    return step
