"""A run's manifest: the keys its Recorders write beside the format's own, and the check a
reader makes of its text and fields."""

from __future__ import annotations

import math
from typing import Any

from stabledrl_cli._batch_inputs import WORLD_SIZE_LIMIT
from stabledrl_cli._json import parse_strict
from stabledrl_cli.dump._schema import is_count
from stabledrl_cli.dump._stop_notes import (
    RECORDING_STOPPED,
    RECORDING_STOPS,
    STOP_NOTE_SHAPE,
    is_stop_note,
)
from stabledrl_cli.dump._versions import (
    MANIFEST_MAJOR,
    RUN_KIND,
    check_readable_version,
    known_version_below,
)
from stabledrl_cli.errors import InputError, shown
from stabledrl_cli.vocab import GROUP_IDS, LOSS_NORMS, UNITS

RECORDING_CLOSED = "recording_closed"
"""The manifest's mark (true) that the run's recording closed: every step it will have is
written. A closed Recorder of a world_size 1 run writes it, and of a larger run the rank whose
close completes `RECORDING_CLOSED_RANKS`; a resumed or overwritten run clears it before any
step file changes; older readers leave it alone, as every field they do not know."""
RECORDING_CLOSED_RANKS = "recording_closed_ranks"
"""The ranks of a world_size > 1 run whose Recorder closed, its writes done (ascending), each
added by its rank under the manifest's lock; a resuming or overwriting rank removes its own."""
RECORDING_WHEN_PACKED = "recording_when_packed"
"""In an archive's copy of the manifest only (`stabledrl pack`): how the run's Recorders stood
when it was packed, as its lock files said (`Run.recorder_states`): {"live": ranks recording
then, "died": ranks whose process had died without closing the run}, absent when neither.
It changes no format version: an older reader leaves it alone."""
RUN_ID = "run_id"
"""The manifest's run identity (docs/run-format.md), new with each recording of the run: it
changes no format version, a reader that does not know it leaves it alone."""

MANIFEST_LIMIT = 1 << 20
"""Bytes a manifest may take (a manifest with param_names of a large model is ~100 KB)."""


def _finite_number(value: object) -> bool:
    """Whether a JSON value is a number that is a finite float (an int past float's range,
    1e400, or a literal like 1e999, which parses as inf, is not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_manifest(manifest: dict[str, Any], where: str) -> tuple[int, int]:
    """Checks the manifest fields a reader relies on; returns the format version.

    A newer major version, or a field of the wrong type, raises InputError naming the field
    (exit 3). Fields this version does not know (a newer minor's) are left alone.
    """
    version = check_readable_version(manifest.get("format_version"), where, MANIFEST_MAJOR)
    known = known_version_below(version)
    # A newer minor may give a field a value this version does not know (1.1 did: group_ids).
    newer = (
        f"; the run says format {version[0]}.{version[1]}, newer than the {known} this "
        "stabledrl reads: upgrade stabledrl"
        if known is not None
        else ""
    )

    def corrupt(name: str, expected: str) -> InputError:
        value = shown(manifest.get(name))
        return InputError(
            f"{where}: corrupt manifest: {name} must be {expected}, got {value}{newer}"
        )

    if manifest.get("unit") not in UNITS:
        raise corrupt("unit", " or ".join(UNITS))
    if manifest.get("group_ids", "per_rank") not in GROUP_IDS:
        raise corrupt("group_ids", " or ".join(GROUP_IDS))
    if manifest.get("loss_norm", "global") not in LOSS_NORMS:
        raise corrupt("loss_norm", " or ".join(LOSS_NORMS))
    world_size = manifest.get("world_size")
    if (
        isinstance(world_size, bool)
        or not isinstance(world_size, int)
        or not 1 <= world_size <= WORLD_SIZE_LIMIT
    ):
        raise corrupt("world_size", f"an integer in [1, {WORLD_SIZE_LIMIT}]")
    for name in ("meta", "estimator", "policy", "geometry", "source"):
        if not isinstance(manifest.get(name), dict | None):
            raise corrupt(name, "an object or null")
    if not isinstance(manifest.get(RUN_ID, ""), str):
        raise corrupt(RUN_ID, "a string")
    if not isinstance((manifest.get("policy") or {}).get("spec"), str | None):
        raise corrupt("policy", "an object whose spec is a string")
    source = manifest.get("source")
    if source is not None and not isinstance(source.get("kind"), str):
        raise corrupt("source", "null or an object whose kind is a string")
    reward_range = manifest.get("reward_range")
    if reward_range is not None:
        numbers = (
            isinstance(reward_range, list)
            and len(reward_range) == 2
            and all(_finite_number(v) for v in reward_range)
        )
        if not (numbers and reward_range[0] < reward_range[1]):
            raise corrupt("reward_range", "null or [low, high] of finite numbers, low < high")
    param_names = manifest.get("param_names")
    if param_names is not None and not (
        isinstance(param_names, list) and all(isinstance(n, str) for n in param_names)
    ):
        raise corrupt("param_names", "null or a list of strings")
    if not isinstance(manifest.get(RECORDING_CLOSED, False), bool):
        raise corrupt(RECORDING_CLOSED, "true or false")
    closed = manifest.get(RECORDING_CLOSED_RANKS)
    if closed is not None and not (isinstance(closed, list) and all(map(is_count, closed))):
        raise corrupt(RECORDING_CLOSED_RANKS, "null or a list of ranks")
    stopped = manifest.get(RECORDING_STOPPED)
    if stopped is not None and not is_stop_note(stopped):
        raise corrupt(RECORDING_STOPPED, f"null or {STOP_NOTE_SHAPE}")
    stops = manifest.get(RECORDING_STOPS)
    if stops is not None and not (isinstance(stops, list) and all(map(is_stop_note, stops))):
        raise corrupt(RECORDING_STOPS, f"null or a list of {STOP_NOTE_SHAPE}")
    packed = manifest.get(RECORDING_WHEN_PACKED)
    if packed is not None and not (
        isinstance(packed, dict)
        and set(packed) <= {"live", "died"}
        and all(isinstance(ranks, list) and all(map(is_count, ranks)) for ranks in packed.values())
    ):
        raise corrupt(RECORDING_WHEN_PACKED, 'null or {"live": [ranks], "died": [ranks]}')
    infinite = _infinite_number(manifest)
    if infinite is not None:
        raise InputError(
            f"{where}: corrupt manifest: {infinite} is a number JSON parsers read as infinity "
            "(e.g. 1e999; the format's numbers are finite)"
        )
    return version


def _infinite_number(manifest: dict[str, Any]) -> str | None:
    """Where the first float that is not finite sits in the manifest (`meta.sweep[1].lr`), or
    None. Strict JSON has no NaN or Infinity, but a literal past a float's range (1e999)
    parses as inf; an integer is kept exactly, whatever its size. Walked with a stack: the
    parser's nesting bound is not the interpreter's recursion limit."""
    stack: list[tuple[str, object]] = [(key, value) for key, value in manifest.items()][::-1]
    while stack:
        where, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return where
        if isinstance(value, dict):
            stack.extend([(f"{where}.{key}", item) for key, item in value.items()][::-1])
        elif isinstance(value, list):
            stack.extend([(f"{where}[{index}]", item) for index, item in enumerate(value)][::-1])
    return None


def parse_manifest(raw: bytes | str, where: str) -> dict[str, Any]:
    """A manifest's text as a run manifest dict; InputError (exit 3) for one above
    `MANIFEST_LIMIT` bytes, not strict JSON (NaN, Infinity), nested past the parser's depth,
    or not a stabledrl-run object. Fields are checked by `check_manifest`."""
    if len(raw) > MANIFEST_LIMIT:
        raise InputError(
            f"{where}: manifest of {len(raw)} bytes is larger than {MANIFEST_LIMIT} bytes"
        )
    manifest = parse_strict(raw, where, "manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != RUN_KIND:
        raise InputError(f"{where}: not a run (not a {RUN_KIND} manifest)")
    return manifest
