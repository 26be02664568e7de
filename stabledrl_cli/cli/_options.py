"""Shared `Annotated` option aliases, so every command spells them the same way.

Choices come from the `Literal` types of `stabledrl_cli.vocab` (typer reads them); an option
whose default is `None` falls back to the library's default.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic_core import PydanticCustomError
from typer._click.core import ParameterSource
from typer._click.globals import get_current_context

from stabledrl_cli._url import is_url, redacted
from stabledrl_cli.cli._local import EMPTY_PATH
from stabledrl_cli.errors import quoted
from stabledrl_cli.replay.config import (
    DEFAULT_COLLAPSE_WINDOW,
    DEFAULT_DRIFT_THRESHOLD,
    DEFAULT_MEMORY_BUDGET,
    DEFAULT_THREADS,
    DEFAULT_WINDOW,
    MAX_THREADS,
    format_size,
)
from stabledrl_cli.spec import INT_DIGITS, SPEC_SYNTAX, reads_as_zero, spec_float, spec_int
from stabledrl_cli.vocab import DEVICES, OutputFormat, ReplayEngine

_INT_NOTATION = f"at most {INT_DIGITS} ASCII digits with an optional sign, such as 12"
_FLOAT_NOTATION = "ASCII decimal or exponent notation, such as 0.5 or 1e-4"


class StrictNumber:
    """The parser of every numeric option: its text read as a spec's number (`spec_int`,
    `spec_float`: ASCII digits, no `1_0`, no other script's digits, no spaces around, no nonzero
    number that reads as 0 such as `1e-400`), then checked against the option's range. typer
    reads a number with int()/float() otherwise, and skips an option's `min`/`max` once it has a
    parser, so the range is checked here.

    Its errors are pydantic's custom errors, whose text typer prints as is in its usage line
    (`Invalid value for '--threads': ...`, exit 2); a range error keeps typer's own words."""

    def __init__(
        self, kind: type[int] | type[float], low: int | None = None, high: int | None = None
    ) -> None:
        self.kind = kind
        self.low = low
        self.high = high

    def __call__(self, value: str | float) -> int | float:
        if isinstance(value, str):
            try:
                number = spec_int(value) if self.kind is int else spec_float(value)
            except ValueError as exc:
                notation = _INT_NOTATION if self.kind is int else _FLOAT_NOTATION
                raise PydanticCustomError(
                    "number_syntax",
                    "{reason} ({notation})",
                    {"reason": str(exc), "notation": notation},
                ) from None
            if reads_as_zero(value, number):
                raise PydanticCustomError(
                    "number_underflow",
                    "{text} is too small for a float: it reads as 0",
                    {"text": quoted(value)},
                )
        else:  # the option's default, from the code
            number = self.kind(value)
        if self.low is not None and number < self.low:
            raise PydanticCustomError(
                "greater_than_equal",
                "Input should be greater than or equal to {ge}",
                {"ge": self.low},
            )
        if self.high is not None and number > self.high:
            raise PydanticCustomError(
                "less_than_equal", "Input should be less than or equal to {le}", {"le": self.high}
            )
        return number


def local_file(value: str | Path) -> Path:
    """The parser of a local file's path (a report's `--out`, `--plot`, `--junit`,
    `--write-baseline`; `check -b`, `import SRC`): a URL is refused (typer's Path would make
    `s3://b/r.json` the local path `s3:/b/r.json`), and so is an empty one (typer's Path would
    make it the working directory)."""
    if value == "":
        raise PydanticCustomError("local_path", f"the path is empty; {EMPTY_PATH}", {})
    if isinstance(value, str) and is_url(value):
        raise PydanticCustomError(
            "local_path",
            "{value} is a URL; give a local path",
            {"value": redacted(value)},
        )
    return Path(value)


def report_path(value: str | Path) -> Path:
    """The parser of a report's local path (`replay --out`, `--plot`, `--junit`,
    `--write-baseline`): a `local_file` naming a file. A name ending in / names a directory
    and is refused: `Path` drops the slash, and the report would be written as a file of the
    directory's name."""
    path = local_file(value)
    if isinstance(value, str) and value.endswith(("/", os.sep)):
        raise PydanticCustomError(
            "local_path", "{value} ends in /: give the report's file name", {"value": value}
        )
    return path


def number_option(
    *param_decls: str,
    kind: type[int] | type[float],
    min: int | None = None,
    max: int | None = None,
    **options: Any,
) -> Any:
    """`typer.Option` of an int or float: read by `StrictNumber`, its range (if any) checked
    there and shown in the help. Every numeric option of the app is declared with it."""
    return typer.Option(
        *param_decls, min=min, max=max, parser=StrictNumber(kind, min, max), **options
    )


RunArg = Annotated[
    str,
    typer.Argument(
        help="Run directory or .h5 archive, a local path.", show_default=False, metavar="RUN"
    ),
]
"""A run read only at a local path (`cli._local.local_run` refuses a URL in one line)."""
RUN_SOURCE_HELP = (
    "Run directory or .h5 archive, a path or an fsspec URL (memory://, file://, s3://...)."
)
RunSourceArg = Annotated[
    str, typer.Argument(help=RUN_SOURCE_HELP, show_default=False, metavar="RUN")
]
PolicyOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--policy", "-p", metavar="SPEC", help=f"Policy spec: {SPEC_SYNTAX} (repeatable)."
    ),
]
_GPU = re.compile(r"cuda:[0-9]{1,4}")
"""A GPU by its index, as torch names it (`cuda:1`)."""


def device_choice(value: str) -> str:
    """The parser of `--device`: a name of `vocab.DEVICES`, or `cuda:N`. Whether torch sees
    that device is checked where the command resolves it (`_device.resolve_device`: exit 2)."""
    if value in DEVICES or _GPU.fullmatch(value):
        return value
    raise PydanticCustomError(
        "device", "{value} is not one of auto, cpu, cuda, cuda:N, mps", {"value": quoted(value)}
    )


def device_option(panel: str | None = None) -> Any:
    """`--device`, in the help panel `panel` (the options' own by default)."""
    return typer.Option(
        "--device",
        metavar="auto|cpu|cuda[:N]|mps",
        parser=device_choice,
        help="Where to compute (auto: cuda, then mps, then cpu; cuda:N: GPU N).",
        rich_help_panel=panel,
    )


DeviceOpt = Annotated[str, device_option()]
FormatOpt = Annotated[
    OutputFormat, typer.Option("--format", "-f", help="table (human) or json (data on stdout).")
]
PlotOpt = Annotated[
    Path | None,
    typer.Option(
        "--plot",
        metavar="FILE.png",
        parser=report_path,
        help="Draw the reward and each policy's update norms to this PNG, replaced if it "
        "exists (needs the plot extra).",
    ),
]
_OR_BASELINE = ", or the baseline's"
"""What a detector option of `check` adds to its default: a baseline's setting wins."""


def _detector(flag: str, kind: type[int] | type[float], what: str, default: str) -> Any:
    """The option of a detector setting, by the note on its default ("" for replay's,
    `_OR_BASELINE` for check's): `what` it sets, then its default."""

    def option(default_note: str) -> Any:
        return number_option(
            flag,
            kind=kind,
            metavar="N" if kind is int else "X",
            help=f"{what} (default {default}{default_note}).",
        )

    return option


_window = _detector(
    "--window", int, "Drift: steps in the rolling mean of net_push", f"{DEFAULT_WINDOW}, calibrated"
)
_drift_threshold = _detector(
    "--drift-threshold",
    float,
    "Drift: rolling mean of net_push below this",
    f"{DEFAULT_DRIFT_THRESHOLD:g}, calibrated",
)
_collapse_window = _detector(
    "--collapse-window",
    int,
    "Observed collapse: rewards (one a rollout) in the rolling mean of the recorded reward",
    f"{DEFAULT_COLLAPSE_WINDOW}",
)


WindowOpt = Annotated[int | None, _window("")]
DriftThresholdOpt = Annotated[float | None, _drift_threshold("")]
CollapseWindowOpt = Annotated[int | None, _collapse_window("")]
BaselineWindowOpt = Annotated[int | None, _window(_OR_BASELINE)]
BaselineDriftThresholdOpt = Annotated[float | None, _drift_threshold(_OR_BASELINE)]
BaselineCollapseWindowOpt = Annotated[int | None, _collapse_window(_OR_BASELINE)]
"""`check`'s detector options: a baseline's setting is the default where it has one."""
ChunkSizeOpt = Annotated[
    int | None,
    number_option(
        "--chunk-size",
        kind=int,
        metavar="N",
        help="At most N steps moved to the device at a time (default: as --memory-budget allows).",
    ),
]
MemoryBudgetOpt = Annotated[
    str | None,
    typer.Option(
        "--memory-budget",
        metavar="SIZE",
        help="Step arrays and their rows of metrics held at a time (the chunk computed and "
        "the one read ahead, half each), e.g. 256M or 1G "
        f"(default {format_size(DEFAULT_MEMORY_BUDGET)}).",
    ),
]
ThreadsOpt = Annotated[
    int | None,
    number_option(
        "--threads",
        kind=int,
        metavar="N",
        help=f"CPU threads of the computation, 1 to {MAX_THREADS} (default {DEFAULT_THREADS}): "
        "steps computed side by side, each on one thread, so the figures are the same for any "
        "count.",
    ),
]
MaxCollapsedOpt = Annotated[
    int | None,
    number_option(
        "--max-collapsed",
        kind=int,
        help="Fail if a policy has more collapsed steps, or too few update norms to judge.",
    ),
]
MaxDiscardFracOpt = Annotated[
    float | None,
    number_option(
        "--max-discard-frac", kind=float, help="Fail if a policy discards a larger fraction."
    ),
]
MaxNonfiniteOpt = Annotated[
    int | None,
    number_option(
        "--max-nonfinite",
        kind=int,
        help="Fail if a policy has more steps with a non-finite update, or the run more "
        "non-finite recorded steps or no count of them to judge.",
    ),
]
MaxSpikesOpt = Annotated[
    int | None,
    number_option(
        "--max-spikes",
        kind=int,
        help="Fail if the recorded grad norm has more spikes, or too few values to judge.",
    ),
]
MaxLostStepsOpt = Annotated[
    int | None,
    number_option(
        "--max-lost-steps",
        kind=int,
        help="Fail if the run lacks more steps: skipped (unreadable or unusable) plus "
        "missing between its recorded ones.",
    ),
]
FailOnCollapseOpt = Annotated[
    bool,
    typer.Option(
        "--fail-on-collapse",
        help="Fail if the recorded reward collapsed (observed rule), or has no full window to "
        "judge.",
    ),
]
"""`check`'s absolute gates (`replay.gate.Gates`), shared by `watch`."""
EngineOpt = Annotated[
    ReplayEngine,
    typer.Option(
        "--engine",
        help="Where steps are computed: this process, worker processes of this machine, or "
        "the workers of a Ray cluster (needs the ray extra); the results are the same.",
    ),
]
WorkersOpt = Annotated[
    int | None,
    number_option(
        "--workers",
        kind=int,
        metavar="N",
        help="--engine processes or ray: shards computed at once (default: the CPUs this "
        "process may use, at most 256, or the cluster's).",
    ),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        metavar="ADDR",
        envvar="RAY_ADDRESS",
        help="--engine ray: the cluster to join (default: a local one started for this run).",
    ),
]


def on_command_line(name: str) -> bool:
    """Whether the running command's parameter `name` was given on its command line, not taken
    from its environment variable (`RAY_ADDRESS` for --ray-address) or its default; False
    outside a command."""
    ctx = get_current_context(silent=True)
    return ctx is not None and ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE
