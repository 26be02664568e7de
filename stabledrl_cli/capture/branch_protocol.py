"""The branch protocol: how a trainer is asked to train one branch of a recorded run.

A branch is asked for with environment variables, which a trainer honours at start-up (the
built-in example does, through `stabledrl_cli.example.branch.train_branch`; an integration can
honour them for users' own trainers):

- STABLEDRL_RESUME_CHECKPOINT: the checkpoint file to resume from (its format is the
  trainer's own; the built-in example's is described in `stabledrl_cli.example.checkpoint`).
- STABLEDRL_POLICY_OVERRIDE: the catalogue spec to train with from the checkpoint on,
  instead of the run's own policy (e.g. `dapo:eps_high=0.28`).
- STABLEDRL_RUN_DIR: the branch's run directory to record into (the same variable
  `stabledrl record -- CMD` sets: `log_policy_batch` records there).
- STABLEDRL_BRANCH_AT: the optimizer step the checkpoint resumes at (the branch's first step).
- STABLEDRL_BRANCH_STEPS: how many optimizer steps to train from there.

`BranchRequest.from_env(os.environ)` reads them (None when no resume is asked for);
`BranchRequest.to_env()` writes them. docs/branching.md describes it for users.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from stabledrl_cli.capture.bootstrap import ENV_RUN_DIR
from stabledrl_cli.dump._run_files import symlink_refused
from stabledrl_cli.dump._run_target import BRANCHES_DIR as BRANCHES_DIR
from stabledrl_cli.dump._run_target import CHECKPOINTS_DIR as CHECKPOINTS_DIR
from stabledrl_cli.dump._run_target import check_outside_run_folders
from stabledrl_cli.errors import UsageError, quoted
from stabledrl_cli.spec import INT_DIGITS, spec_int

ENV_RESUME_CHECKPOINT = "STABLEDRL_RESUME_CHECKPOINT"
ENV_POLICY_OVERRIDE = "STABLEDRL_POLICY_OVERRIDE"
ENV_BRANCH_AT = "STABLEDRL_BRANCH_AT"
ENV_BRANCH_STEPS = "STABLEDRL_BRANCH_STEPS"
# ASCII digits and `\Z` (the writer's spelling only: `\d` takes other scripts' digits, `$` a
# name's final newline), as the run's own file names (`dump._file_names.STEP_FILE_RE`)
CHECKPOINT_RE = re.compile(r"^step-([0-9]{8})\.pt\Z")


def checkpoints_dir(run_dir: str | Path) -> Path:
    """RUN/checkpoints; InputError when it is a symlink: a run's checkpoints are never read,
    written or removed through a link (docs/trust.md)."""
    directory = Path(run_dir) / CHECKPOINTS_DIR
    if os.path.islink(directory):
        raise symlink_refused(str(directory))
    return directory


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint of a run, ascending; [] without any. Every entry named
    as one is listed, whatever it is: one that is no file (a directory, a FIFO) is refused
    when it is loaded, naming it, rather than skipped for an earlier checkpoint unsaid."""
    directory = checkpoints_dir(run_dir)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = CHECKPOINT_RE.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


@dataclass(frozen=True, kw_only=True)
class BranchRequest:
    """One branch: resume `checkpoint` at step `at`, train `steps` steps under `policy`,
    record into `run_dir`."""

    checkpoint: Path
    policy: str
    run_dir: Path
    at: int
    steps: int

    def __post_init__(self) -> None:
        if self.at < 0:
            raise UsageError(f"the branch step must be >= 0, got {self.at}")
        if self.steps < 1:
            raise UsageError(f"a branch must train >= 1 step, got {self.steps}")

    def to_env(self) -> dict[str, str]:
        """The protocol's environment variables for this request."""
        return {
            ENV_RESUME_CHECKPOINT: str(self.checkpoint),
            ENV_POLICY_OVERRIDE: self.policy,
            ENV_RUN_DIR: str(self.run_dir),
            ENV_BRANCH_AT: str(self.at),
            ENV_BRANCH_STEPS: str(self.steps),
        }

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> BranchRequest | None:
        """The request the environment makes, or None when it asks for no resume.

        UsageError when STABLEDRL_RESUME_CHECKPOINT is set but another variable is missing or
        not an integer where one is needed.
        """
        checkpoint = env.get(ENV_RESUME_CHECKPOINT)
        if not checkpoint:
            return None
        wanted = (ENV_POLICY_OVERRIDE, ENV_RUN_DIR, ENV_BRANCH_AT, ENV_BRANCH_STEPS)
        missing = [name for name in wanted if not env.get(name)]
        if missing:
            raise UsageError(f"{ENV_RESUME_CHECKPOINT} is set but {', '.join(missing)} is not")
        numbers = {}
        for name in (ENV_BRANCH_AT, ENV_BRANCH_STEPS):
            try:
                numbers[name] = spec_int(env[name])
            except ValueError:
                raise UsageError(
                    f"{name} must be an integer of at most {INT_DIGITS} digits, "
                    f"got {quoted(env[name])}"
                ) from None
        return cls(
            checkpoint=Path(checkpoint),
            policy=env[ENV_POLICY_OVERRIDE],
            run_dir=Path(env[ENV_RUN_DIR]),
            at=numbers[ENV_BRANCH_AT],
            steps=numbers[ENV_BRANCH_STEPS],
        )


def branch_dir(base: Path, policy: str, at: int) -> Path:
    """`base/POLICY@STEP`: the run directory of the branch of `policy` at step `at`."""
    return base / f"{policy}@{at}"


def request_from_environment() -> BranchRequest | None:
    """The branch this process is asked to train (`BranchRequest.from_env(os.environ)`)."""
    return BranchRequest.from_env(os.environ)


def check_not_the_original(branch: Path, run_dir: Path, *, given: str = "--out") -> None:
    """UsageError when the branch run `branch` would be `run_dir`, the run it branches from
    (--out its parent, the run named POLICY@STEP: --force would replace it), or lie in that
    run's steps or checkpoints folder, or deeper than POLICY@STEP in its branches folder
    (`check_outside_run_folders`), or anywhere else in that run (`--out RUN`: recording over
    it, --force, removes the branch runs of its branches folder alone, so the new run would
    keep this one); the line says to give another `given` (what named the branch run's
    place)."""
    where, run = Path(os.path.realpath(branch)), Path(os.path.realpath(run_dir))
    if where == run:
        raise UsageError(
            f"{run_dir}: a branch run would be the run it branches from; pass another {given}"
        )
    original = f"{run_dir}, the run it branches from"
    check_outside_run_folders(
        branch, run_dir, what="a branch run", run=original, given=given, branch=True
    )
    if where.is_relative_to(run) and where.parent != run / BRANCHES_DIR:
        raise UsageError(
            f"{branch}: a branch run would be inside {original}, outside its {BRANCHES_DIR} "
            f"folder, where recording over the run (--force) would keep it; pass another "
            f"{given}, outside the run (or none: {run_dir / BRANCHES_DIR})"
        )
