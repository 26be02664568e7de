"""`stabledrl inspect RUN`: what was recorded, its integrity, what the run observably did, and
its recorded series (any run, a scalar run of per-step scalars only included).

The run is a path or an fsspec URL (`memory://`, `file://`, `s3://`...), read in place.

Exit codes: 0 (a corrupt or torn step, or one whose data a replay cannot use, is a finding, not
fatal); 2 for a URL that cannot be read at all (an unknown or refused scheme, a filesystem
package not installed); 3 for a missing run (or a URL with nothing there), a path that is not a
run, an unreadable manifest, a manifest field of the wrong type, or a newer major format
version.
"""

from __future__ import annotations

from stabledrl_cli.cli._inspect_run_table import run_summary_table
from stabledrl_cli.cli._inspect_tables import observed_table, print_integrity, series_table
from stabledrl_cli.cli._options import FormatOpt, RunSourceArg
from stabledrl_cli.cli._output import out, print_json
from stabledrl_cli.dump._open import open_snapshot
from stabledrl_cli.replay.inspection import summarize
from stabledrl_cli.tables import print_fitted, print_title


def command(run: RunSourceArg, output_format: FormatOpt = "table") -> None:
    """Show what a run recorded, its integrity, and its observed behaviour."""
    summary = summarize(open_snapshot(run))
    if output_format == "json":
        print_json(summary.to_dict())
    else:
        run_table = run_summary_table(summary)
        print_title(run_table, out)  # the run's path, however long, never widens the table
        out.print(run_table)
        print_integrity(summary)
        out.print(observed_table(summary))
        if summary.series:
            print_fitted(series_table(summary.series, "Recorded series (finite values)"), out)
