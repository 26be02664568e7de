"""The checks of a replay's report files (--out, --plot, and check's and tune's own), made
before the replay: where each may be written, and that no two name one file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from stabledrl_cli._atomic import missing_directory, write_error
from stabledrl_cli._url import redacted
from stabledrl_cli.cli._output import is_standard_output, refuse_standard_error
from stabledrl_cli.dump._open import packed_run
from stabledrl_cli.dump._run_target import run_holding
from stabledrl_cli.dump._url_filesystem import inside_local_run
from stabledrl_cli.errors import UsageError
from stabledrl_cli.replay.plot import check_plot_path, require_matplotlib

BINARY_REPORTS = ("--out", "--plot")
"""The report options whose file (HDF5, PNG) is no text to print beside the results."""


def check_outputs(
    run: str, plot: Path | None, targets: dict[str, Path | None], *, json_results: bool = False
) -> None:
    """Before the replay: the output files' directories exist (targets: option -> path), none
    lies inside the run read (`run`, a directory or an archive: a report there would replace
    one of its files, or sit among them, as `pack` refuses too) or inside another run (whose
    files are kept nowhere else either: `run_holding`), is a directory (its write
    would fail once the replay is done), a packed run (a report replaces the file it names,
    as a CI job rewrites its reports on every run; a run may be kept nowhere else, and `pack`
    replaces a file only with --force) or, for a binary report, the standard output (the
    results printed there would follow it into one stream; a text report is printed beside
    them, but for `json_results`, results printed as JSON, which a report before them would
    leave no JSON reader able to take) or error (so would progress and warnings), no two name
    one file (the last written
    would replace the other), and a plot can be drawn (a missing extra fails fast, exit 2)."""
    named = [(flag, path) for flag, path in {**targets, "--plot": plot}.items() if path is not None]
    for flag, target in named:
        try:
            inside = inside_local_run(target, run)
            holder = redacted(run) if inside else run_holding(target)
            directory = target.is_dir()
            problem = missing_directory(target) if flag != "--plot" else None
        except OSError as exc:  # a name longer than the file system takes, ...
            raise write_error(target, exc) from None
        if holder is not None:
            raise UsageError(
                f"{flag} {target} is inside the run {holder}; write it outside the run"
            )
        if directory:
            raise UsageError(f"{flag} {target} is a directory; give a file name")
        if (packed := packed_run(target)) is not None:
            raise UsageError(
                f"{flag} {target} is {packed} (stabledrl pack); a report replaces its file, "
                "never a run: give another file"
            )
        if flag in BINARY_REPORTS and is_standard_output(target):
            raise UsageError(
                f"{flag} {target} is the standard output, where the results are printed; "
                "give a file name"
            )
        if json_results and is_standard_output(target):
            raise UsageError(
                f"{flag} {target} is the standard output, where --format json prints the "
                "results; give a file name, or drop --format json (the report is then printed "
                "beside the table)"
            )
        if flag in BINARY_REPORTS:
            refuse_standard_error(target, f"{flag} {target}")
        if problem is not None:
            raise UsageError(f"{flag} {target}: {problem}")
    for i, (flag, target) in enumerate(named):
        for other_flag, other in named[i + 1 :]:
            if same_file(target, other):
                raise UsageError(
                    f"{flag} {target} and {other_flag} {other} name the same file; give each "
                    "report a file of its own"
                )
    if plot is not None:
        try:
            check_plot_path(plot)
        except UsageError as exc:
            raise UsageError(f"--plot {exc}") from None
        require_matplotlib(load=False)  # imported before the replay (replay_with_progress)


def same_file(target: Path, other: Path) -> bool:
    """Whether two reports would replace one file: the same path once links are resolved,
    there or not yet. A device or a FIFO is written in place, not replaced (two reports to
    /dev/null are no clash)."""
    path = os.path.realpath(target)
    if path != os.path.realpath(other):
        return False
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:  # not there yet: both would create it
        return True
