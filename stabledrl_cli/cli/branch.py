"""`stabledrl branch RUN --at STEP -p POLICY ...`: re-train the built-in example from the run's
checkpoint under each policy, record each branch, and say whether it collapsed beside what the
one-step replay said about that policy (stabledrl_cli.branching, docs/branching.md).

Exit codes: 0; 2 for a bad spec, a step before the first checkpoint, branch runs that exist
without --force, or an --out inside RUN but for RUN/branches; 3 for a run without checkpoints
(record it with --checkpoint-every N), or with no readable step at or after the checkpoint
(nothing to replay beside a branch).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Annotated

import typer
from rich.table import Table

from stabledrl_cli.branching import BranchOutcome, BranchReport, run_branches
from stabledrl_cli.capture.branch_protocol import BranchRequest
from stabledrl_cli.cli._live import note_live
from stabledrl_cli.cli._local import local_output, local_run
from stabledrl_cli.cli._options import DeviceOpt, FormatOpt, number_option
from stabledrl_cli.cli._output import Advance, err, out, print_json, progress, progress_enabled
from stabledrl_cli.cli._replay_notes import note_skipped, note_stopped
from stabledrl_cli.dump import open_run
from stabledrl_cli.errors import InputError, counted
from stabledrl_cli.example.config import MAX_RL_STEPS
from stabledrl_cli.replay._format import format_steps
from stabledrl_cli.replay.config import MAX_THREADS
from stabledrl_cli.replay.report import unjudged_lines
from stabledrl_cli.tables import (
    fold_specs,
    print_fitted,
    print_legend,
    shared_widths,
    spec_room,
    stacked_width,
)

LIST_LIMIT = 8
"""Step lists longer than this are cut in the table (JSON has them all)."""
SPEC_WIDTH = 24
"""Where the other columns do not fit whole beside the specs, a spec is broken at a comma
past this many characters a line (fewer where the width leaves less)."""
_HEADERS = ("branch", "replay risk steps", "replay drift steps", "compared", "agree")
"""The columns beside the policy."""
_UNJUDGED = {
    "drift": ("replay drift steps", "not judged", "none there says nothing"),
    "spike": ("replay risk steps", "spikes not judged", "they count non-finite updates only"),
}
"""The replay's rules that may judge no step (`report.unjudged_lines`), in this table's words."""


def _table(report: BranchReport, width: int) -> Table:
    """The branches a row each, their specs folded to fit `width` where the other columns allow."""
    moved = (
        f" (the last checkpoint before step {report.requested_at})"
        if report.at != report.requested_at
        else ""
    )
    original = report.original_first_reward_collapse
    stopped = report.original_stopped_at
    stop = "" if stopped is None else f"; its recording stopped at step {stopped}"
    if report.original_not_judged is not None:
        how = "the original run's collapse not judged" + stop
    elif original is not None:
        how = f"the original run collapsed at step {original}" + stop
    elif stopped is None:
        how = "the original run held"
    else:  # what came after the stop (a divergence, say), nothing saw
        how = f"the original run showed no collapse before its recording stopped at step {stopped}"
    table = Table(
        title=f"Branches of {report.run} at step {report.at}{moved}, "
        f"{counted(report.steps, 'step')} each; {how}",
        title_justify="left",
    )
    rows = [_cells(b) for b in report.branches]
    # each line of a spec whole, broken at its commas, beside the other columns with each
    # word of theirs whole on a line: never inside a key, a value, a word or a step number
    narrowest = [
        stacked_width(header, (word for row in rows for word in row[i].split()))
        for i, header in enumerate(_HEADERS)
    ]
    natural = [stacked_width(h, (row[i] for row in rows)) for i, h in enumerate(_HEADERS)]
    room = spec_room(narrowest, width)
    fold = max(spec_room(natural, width), min(SPEC_WIDTH, room))
    specs, widest = fold_specs([b.policy for b in report.branches], fold)
    widest = max(widest, len("policy"))
    table.add_column("policy", no_wrap=True, min_width=widest)
    shown = shared_widths(narrowest, natural, room - widest)
    for column, column_width in zip(_HEADERS, shown, strict=True):
        table.add_column(column, width=column_width)
    for spec, row in zip(specs, rows, strict=True):
        table.add_row(spec, *row)
    return table


def _cells(b: BranchOutcome) -> list[str]:
    """A branch's cells beside its policy."""
    outcome = {None: "not judged", False: "held"}.get(
        b.collapsed,
        "collapsed"
        if b.first_reward_collapse is None
        else f"collapsed at {b.first_reward_collapse}",
    )
    reward = f", reward {b.final_reward:.3f}" if b.final_reward is not None else ""
    diverged = f", diverged after step {b.diverged_at}" if b.diverged_at is not None else ""
    return [
        outcome + reward + diverged,
        format_steps(b.replay_collapsed_steps, LIST_LIMIT, empty="none", separator=", "),
        format_steps(b.replay_drift_steps, LIST_LIMIT, empty="none", separator=", "),
        _compared(b),
        {True: "yes", False: "no", None: "n/a"}[b.agree],
    ]


def _compared(branch: BranchOutcome) -> str:
    """The compared span and how much of it the replay covered."""
    if branch.span is None:
        return "no branch step"
    first, last = branch.span
    replayed = f"{branch.replayed_in_span} of {branch.steps} steps replayed"
    return f"{first}-{last}" + ("" if branch.complete else f" (partial: {replayed})")


LEGEND = (
    "branch: the observed-collapse rule over the original's steps before the branch point "
    "and the branch's after it (not judged: fewer reward draws in a row, one a rollout, than "
    "its window; final reward: its last 10% of steps; diverged after step N: its weights "
    "or outputs were not finite after step N, where it stopped: collapsed, whatever the "
    "rule judged). replay risk/drift "
    "steps: the one-step replay of the policy on the original's recorded batches, from the "
    "branch point on. compared: the branch's steps, over which agree compares; partial when "
    "the original's replay does not cover each of them (steps the original never recorded, "
    "or skipped). agree: a replay risk step within the compared steps exactly when the branch "
    "collapsed; n/a when partial, when the branch is not judged, or when the collapse is "
    "before the branch point (the original's), as the two would judge different spans."
)


class _BranchProgress(ExitStack):
    """Progress of one branch after the other (`cli._output.progress`: a bar in a terminal,
    a stderr line per tenth of the steps without one)."""

    def __init__(self) -> None:
        super().__init__()
        self._advance: Advance | None = None

    def start(self, request: BranchRequest) -> None:
        """A branch is about to train: the previous one's progress ends, its own begins."""
        self.close()
        what = f"branch {request.policy}@{request.at}"
        if not progress_enabled():
            steps = counted(request.steps, "step")
            err.print(f"{what}: {steps} into {request.run_dir}", highlight=False)
        self._advance = self.enter_context(progress(what, request.steps))

    def advance(self, step: int) -> None:
        """The branch recorded one more step."""
        if self._advance is not None:
            self._advance(1)


def command(
    run_arg: Annotated[
        str,
        typer.Argument(
            metavar="RUN",
            help="Run directory recorded with --checkpoint-every, a local path.",
            show_default=False,
        ),
    ],
    at: Annotated[
        int,
        number_option(
            "--at",
            kind=int,
            min=0,
            help="Branch at the checkpoint at this step, or the nearest before.",
        ),
    ],
    policy: Annotated[
        list[str],
        typer.Option("--policy", "-p", metavar="SPEC", help="Policy of a branch (repeatable)."),
    ],
    rl_steps: Annotated[
        int | None,
        number_option(
            "--rl-steps",
            kind=int,
            min=1,
            max=MAX_RL_STEPS,
            metavar="N",
            help=f"RL optimizer steps each branch trains, 1 to {MAX_RL_STEPS} as record's "
            "--rl-steps (default: to the end of the original run).",
        ),
    ] = None,
    out_arg: Annotated[
        str | None,
        typer.Option(
            "--out",
            "-o",
            metavar="DIR",
            help="Where the branch runs go, a local path outside RUN (default RUN/branches).",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing branch runs.")] = False,
    output_format: FormatOpt = "table",
    device: DeviceOpt = "cpu",
    threads: Annotated[
        int,
        number_option(
            "--threads",
            kind=int,
            min=1,
            max=MAX_THREADS,
            help=f"CPU threads, 1 to {MAX_THREADS} (as record's: with 1, a branch under the run's "
            "own policy reproduces the run's arrays bit for bit).",
        ),
    ] = 1,
) -> None:
    """Re-train the built-in example from RUN's checkpoint under each policy: did it collapse?

    Each branch is recorded as a run (RUN/branches/POLICY@STEP, or under --out) and judged by
    the observed-collapse rule, beside the one-step replay of its policy on RUN's batches.
    """
    run = local_run(run_arg, "branch", "it trains from the checkpoints of a local run directory")
    out_dir = None if out_arg is None else local_output(out_arg, "branch", "its branch runs")
    if not run.is_dir():
        raise InputError(f"{run}: not a run directory (branch reads the checkpoints in one)")
    with _BranchProgress() as branches:
        report = run_branches(
            run,
            at=at,
            policies=policy,
            steps=rl_steps,
            out=out_dir,
            force=force,
            device=device,
            threads=threads,
            on_branch=branches.start,
            on_step=branches.advance,
        )
    note_live(report.replayed.live, str(run), "the branch read", "branch")
    note_stopped(open_run(run), str(run))  # the default branch ends where it stopped
    note_skipped(report.replayed)
    if output_format == "json":
        print_json(report.to_dict())
        return
    print_fitted(_table(report, out.width), out)  # a long run path wraps, above the table
    for line in unjudged_lines(report.replayed, _UNJUDGED):
        out.print(line, highlight=False, soft_wrap=False)
    print_legend([LEGEND], out)
