"""`archive_manifest`: the manifest a pack writes into its archive, with the ranks' stop notes."""

from __future__ import annotations

import json
from typing import Any

from stabledrl_cli.dump._manifest import MANIFEST_LIMIT, RECORDING_WHEN_PACKED
from stabledrl_cli.dump._run import Run
from stabledrl_cli.dump._stop_notes import RECORDING_STOPS, manifest_stops
from stabledrl_cli.errors import InputError, cut

REASON_SHOWN = 1024
"""Characters of a rank's stop reason an archive's manifest keeps at most, fewer when the
notes of many ranks would take it past `MANIFEST_LIMIT`."""


def archive_manifest(run: Run) -> str:
    """The archive's manifest: the run's, with every rank's stop note as its `recording_stops`
    when the run has notes of its own beyond the manifest's (a run of several ranks), and the
    ranks a Recorder was recording or had died on as its `recording_when_packed`. The notes'
    reasons are cut (`REASON_SHOWN`, halved until the manifest fits its readers' bound)."""
    manifest, stops = run.manifest, run.listed_recording_stops  # of the listing packed
    live, died = run.recorder_ranks()
    if live or died:
        manifest = {**manifest, RECORDING_WHEN_PACKED: {"live": live, "died": died}}
    if stops == manifest_stops(manifest):
        text = _fitting(manifest)
        if text is None:
            raise InputError(
                f"{run.location}: cannot pack it: its manifest passes the {MANIFEST_LIMIT} "
                "bytes an archive's manifest may take"
            )
        return text
    shown = REASON_SHOWN
    while shown >= 0:
        notes = [{**note, "reason": cut(note["reason"], shown)} for note in stops]
        text = _fitting({**manifest, RECORDING_STOPS: notes})
        if text is not None:
            return text
        shown = shown // 2 if shown else -1
    raise InputError(
        f"{run.location}: cannot pack it: its manifest and the stop notes of its "
        f"{len(stops)} ranks pass the {MANIFEST_LIMIT} bytes an archive's manifest may take"
    )


def _fitting(manifest: dict[str, Any]) -> str | None:
    """`manifest` as JSON within the `MANIFEST_LIMIT` bytes an archive's readers take:
    indented, or compact when indented it would not fit (a run's own manifest.json, written
    compactly, may be near the bound); None when neither fits."""
    text = json.dumps(manifest, indent=2, allow_nan=False)
    if len(text.encode()) > MANIFEST_LIMIT:
        text = json.dumps(manifest, separators=(",", ":"), allow_nan=False)
    return text if len(text.encode()) <= MANIFEST_LIMIT else None
