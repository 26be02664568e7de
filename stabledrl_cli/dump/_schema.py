"""The run format v1: names, dtypes and layout shared by the writer and the readers.

A run is a directory:
    manifest.json                          run-level facts (below)
    steps/step-00000042.safetensors        one optimizer step (world_size 1)
    steps/step-00000042.rank-0001.safetensors   one rank's part of a step (world_size > 1)
    steps/stopped.rank-0001.json           rank 1's recording_stopped note (world_size > 1)

Arrays are safetensors tensors (`FIELDS`); per-step scalars live in the safetensors metadata as
strings (`STANDARD_SCALARS`, plus the user's own).

Manifest fields: format ("stabledrl-run"), format_version, tool_version, created, meta,
policy {spec, name, params} (spec in its canonical text), unit ("token" or "sequence"),
estimator, reward_range (null or [low, high]), world_size, group_ids, geometry, param_names,
fields (each field's per and dtype), source (format 1.2, optional: where the run came from, an
object with at least a string `kind`, e.g. {"kind": "import", "format": ..., "file": ...}), and,
only when a Recorder with on_write_error="warn" stopped after a failed write (or was stopped
by `note_stop`: a step the TRL or verl integration cannot record),
recording_stopped {step, rank, reason} (one note: with several ranks, each rank's is also a
file of its own in steps/, `STOP_NOTE_RE`); and recording_closed (true) once the run's
Recorders closed, their writes done (`RECORDING_CLOSED`; with several ranks, the ranks closed
so far in recording_closed_ranks, `RECORDING_CLOSED_RANKS`); and run_id (`RUN_ID`, a
string unique to each recording of the run: a new one when a run is created or replaced, or a
resume replaces steps; absent in a run recorded before it existed). policy may be null
(format 1.2): the run's policy is not known (an imported log, an optimizer-hook recording).

Scalar steps (format 1.2): a step file may hold no token, sequence or geometry array at all
(only, optionally, `param_grad_norm`): its scalars are the whole step. Such a step has no
policy batch; `Step.is_scalar` says so, and replay has nothing to replay on it.

group_ids (format 1.1; absent means "per_rank"): "per_rank" when each rank numbers its own
prompt groups from 0 (a reader joining the ranks of a step offsets each rank's ids past the
ranks before it), "global" when the ids are prompt-group ids shared by all ranks (a group
split across ranks keeps one id; the join leaves them alone).

loss_norm (absent means "global"; written only as "per_rank"): how the ranks of a multi-rank
run normalised their losses. "global": over every rank's part (token and sequence counts
gathered across the ranks), so a replay normalises over the joined step; "per_rank": each rank
over its own part, the all-reduce averaging the ranks, so a replay normalises each rank's part
on its own and divides by world_size. Such a manifest of a run of several ranks says
`PER_RANK_VERSION` (2.0): a reader of major version 1, which does not know loss_norm and would
replay the run as "global", refuses it. A run of one rank replays alike either way, and keeps
the 1.x version its other fields give.

Versions. A file records the oldest format version that describes it: 1.0, 1.1 when it uses
a 1.1 addition (the step fields `micro_batch` and `group_split`, or group_ids = "global"), 1.2
when it uses a 1.2 addition (a scalar step; a null policy or a `source` in the manifest), 1.3
when it uses a 1.3 addition (the step field `token_count`), so that a run without them reads
as 1.0 everywhere. A reader refuses a newer major version and
reads a newer minor one, ignoring the fields it does not know.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain
from typing import Any, TypeGuard, TypeVar, cast

from stabledrl_cli._json import parse_strict
from stabledrl_cli.errors import InputError, UsageError, quoted, shown, type_name
from stabledrl_cli.spec import plain_number, whole_number
from stabledrl_cli.vocab import GROUP_IDS, LOSS_NORMS, UNITS


class NotARun(InputError):
    """A path that is no run: an HDF5 file whose root names it something else (a replay
    report), or what is neither a directory nor a regular file."""


GRAM_KEY = "unit_grad_gram"
"""The step field of an exact Gram matrix K: [U, U]."""
SKETCH_KEY = "unit_grad_sketch"
"""The step field of a sketch S: [U, k]."""
SKETCH_SCALE_KEY = f"{SKETCH_KEY}_scale"
"""The per-step scale of float16 sketch storage (a scalar of the step)."""

_Json = TypeVar("_Json")

RUN_KIND = "stabledrl-run"
FORMAT_VERSION = "1.3"
"""The newest format version this tool reads and writes."""
FORMAT_MAJOR = 1
PER_RANK_VERSION = "2.0"
"""The format version of a manifest whose `loss_norm` is "per_rank": a reader of major version
1 knows no `loss_norm` and would replay the run as "global", with other figures and no word,
where it refuses a major version it does not know ("upgrade stabledrl")."""
MANIFEST_MAJOR = 2
"""The newest major version of a manifest this tool reads: 1, or `PER_RANK_VERSION`'s."""
BASE_VERSION = "1.0"
"""The version of a file that uses no 1.1, 1.2 or 1.3 addition."""
SCALAR_STEP_VERSION = (1, 2)
"""The first version in which a step file may hold no policy batch (a scalar step)."""
MANIFEST_NAME = "manifest.json"
RECORDING_CLOSED = "recording_closed"
"""The manifest's mark (true) that the run's recording closed: every step it will have is
written. A closed Recorder of a world_size 1 run writes it, and of a larger run the rank whose
close completes `RECORDING_CLOSED_RANKS`; a resumed or overwritten run clears it before any
step file changes; older readers leave it alone, as every field they do not know."""
RECORDING_CLOSED_RANKS = "recording_closed_ranks"
"""The ranks of a world_size > 1 run whose Recorder closed, its writes done (ascending), each
added by its rank under the manifest's lock; a resuming or overwriting rank removes its own."""
RECORDING_STOPPED = "recording_stopped"
"""The manifest's note ({step, rank, reason}) that a Recorder stopped recording after a write
failed (`on_write_error="warn"`): the training went on, that rank recorded no later step."""
STOP_RESUMED = "resumed"
"""In a `recording_stopped` note (manifest's or a rank's file), true once a resume of its rank
appended to the run after the stop (a resume that records the stopped step again removes the
note): the note stays, for the steps it says are missing, but its rank records again. It
changes no format version: an older reader leaves the key alone."""
RECORDING_STOPS = "recording_stops"
"""Every rank's `recording_stopped` note, a list ordered by rank: what a reader gives of a
run whose ranks stopped (`Run.recording_stops`), and where an archive keeps them (its
manifest's copy: `stabledrl pack`)."""
RECORDING_WHEN_PACKED = "recording_when_packed"
"""In an archive's copy of the manifest only (`stabledrl pack`): how the run's Recorders stood
when it was packed, as its lock files said (`Run.recorder_states`): {"live": ranks recording
then, "died": ranks whose process had died without closing the run}, absent when neither.
It changes no format version: an older reader leaves it alone."""
RUN_ID = "run_id"
"""The manifest's run identity (docs/run-format.md), new with each recording of the run: it
changes no format version, a reader that does not know it leaves it alone."""
STEPS_DIR = "steps"

MANIFEST_LIMIT = 1 << 20
"""Bytes a manifest may take (a manifest with param_names of a large model is ~100 KB)."""
WORLD_SIZE_LIMIT = 4096
"""The largest world_size a reader accepts: a larger one is a corrupt manifest."""
STEP_LIMIT = (1 << 63) - 1
"""The largest step number (int64): a longer one in a file name is not a step file."""
SEQUENCE_LIMIT = 1 << 31
"""The most sequences a step holds: N = max(seq_id) + 1, and seq_id is int32."""

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
"""The first bytes of an HDF5 file (a packed run)."""
# The names of a run's files below match as the writer spells them only: ASCII digits (`\d`
# also takes other scripts', which int() reads) and `\Z` (`$` also matches before a final
# newline: `stopped.rank-0001.json\n` was read as rank 1's note).
STEP_FILE_RE = re.compile(r"^step-([0-9]{8,})(?:\.rank-([0-9]{4,}))?\.safetensors\Z")
STOP_NOTE_RE = re.compile(r"^stopped\.rank-([0-9]{4,})\.json\Z")
"""A rank's own `recording_stopped` note in steps/ (`stop_note_name`), written by a Recorder of
a world_size > 1 run as it stops: the ranks of a run, or of a node's own directory, never
write the same file."""
TEMP_STOP_NOTE_RE = re.compile(r"^\.stopped\.rank-([0-9]{4,})\.json\.tmp-[0-9]+\Z")
"""A rank's note while it is written (`_atomic.temp_name` of its name): in flight, not read."""
WRITER_LOCK_RE = re.compile(r"^\.writer\.rank-([0-9]{4,})\.lock\Z")
"""The file a live Recorder of a rank holds locked (`writer_lock_name`; `dump._writer_lock`):
no step's data, never read; it goes when the Recorder closes."""
OS_FILE_RE = re.compile(r"^(\.DS_Store|\._.+|Thumbs\.db|desktop\.ini)\Z")
"""The files an operating system's file browser leaves in any folder it shows (macOS Finder's
.DS_Store and ._NAME AppleDouble files, Windows Explorer's Thumbs.db and desktop.ini): never
a user's data nor a run's. Readers pass over them; recording over a run (overwrite=True,
--force) removes them from it with its branch runs (`dump._run_target.os_file`)."""
STOP_NOTE_LIMIT = 1 << 16
"""Bytes a rank's note may take (its reason is an error's text, a path or two in it)."""
# Temporary names start with a dot so that no glob for finished steps ever matches them.
TEMP_FILE_RE = re.compile(r"^\.step-([0-9]{8,})(?:\.rank-([0-9]{4,}))?\.safetensors\.tmp-[0-9]+\Z")


def step_file_name(step: int, rank: int, world_size: int) -> str:
    """`step-00000042.safetensors`, or with `.rank-0001` when the run has several ranks."""
    if world_size > 1:
        return f"step-{step:08d}.rank-{rank:04d}.safetensors"
    return f"step-{step:08d}.safetensors"


def canonical_step(name: str) -> tuple[int, int] | None:
    """(step, rank) of a finished step file's name when it is the one spelling the writer uses
    (`step_file_name`) of an int64 step; None for any other name (e.g. `step-000000001`)."""
    match = STEP_FILE_RE.match(name)
    if match is None:
        return None
    step, rank = int(match.group(1)), int(match.group(2) or 0)
    if step > STEP_LIMIT:
        return None
    expected = step_file_name(step, rank, 2 if match.group(2) is not None else 1)
    return (step, rank) if expected == name else None


def stop_note_name(rank: int) -> str:
    """`stopped.rank-0001.json`: the name of rank `rank`'s note in steps/ (`STOP_NOTE_RE`)."""
    return f"stopped.rank-{rank:04d}.json"


def writer_lock_name(rank: int) -> str:
    """`.writer.rank-0001.lock`: the file in steps/ a live Recorder of rank `rank` holds locked
    (`WRITER_LOCK_RE`)."""
    return f".writer.rank-{rank:04d}.lock"


STOP_NOTE_SHAPE = "{step: an integer >= 0 or null, rank: an integer >= 0, reason: text}"


def is_stop_note(value: object) -> bool:
    """Whether `value` is a `recording_stopped` note (`STOP_NOTE_SHAPE`)."""
    return (
        isinstance(value, dict)
        and (value.get("step") is None or is_count(value.get("step")))
        and is_count(value.get("rank"))
        and isinstance(value.get("reason"), str)
    )


def note_text(note: dict[str, Any]) -> bytes:
    """A rank's note as its file holds it: JSON, one line."""
    return (json.dumps(note) + "\n").encode()


def stops_by_rank(*sources: Iterable[object]) -> list[dict[str, Any]]:
    """One stop note a rank, by rank (each a copy): of the notes in `sources`, in their order,
    the first of a rank; what is not a note's dict (a None) is passed over."""
    by_rank: dict[int, dict[str, Any]] = {}
    for stop in chain(*sources):
        if isinstance(stop, dict):
            by_rank.setdefault(stop["rank"], dict(stop))
    return [by_rank[rank] for rank in sorted(by_rank)]


def manifest_stops(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The stop notes a manifest holds, one a rank, by rank: its `recording_stops` (an
    archive's; the first of a rank), and its one `recording_stopped` note for a rank they do
    not name."""
    stops = manifest.get(RECORDING_STOPS)
    return stops_by_rank(
        stops if isinstance(stops, list) else [], [manifest.get(RECORDING_STOPPED)]
    )


def temp_file_name(final_name: str, pid: int) -> str:
    """The name a step file has while it is written (matches `TEMP_FILE_RE`)."""
    return f".{final_name}.tmp-{pid}"


def written_version(
    uses_1_1: bool,
    uses_1_2: bool = False,
    uses_1_3: bool = False,
    *,
    loss_norm: str = "global",
    world_size: int = 1,
) -> str:
    """The format version to record in a file: `PER_RANK_VERSION` for the manifest (or
    archive) of a run of several ranks whose `loss_norm` is "per_rank" (one rank's part is
    the whole step, which a reader of major version 1 replays alike), else 1.3 if it uses a
    1.3 addition, else 1.2 if it uses a 1.2 addition, else 1.1 if it uses a 1.1 addition,
    else 1.0."""
    if loss_norm == "per_rank" and world_size > 1:
        return PER_RANK_VERSION
    if uses_1_3:
        return "1.3"
    if uses_1_2:
        return "1.2"
    return "1.1" if uses_1_1 else BASE_VERSION


@dataclass(frozen=True, kw_only=True)
class FieldSpec:
    """One array of a step file."""

    name: str
    per: str
    """token: [T]; sequence: [N] (or [N, k] for token_ids); unit_pairs: [U, U];
    unit_rows: [U, k]; param: [P] (names in the manifest)."""
    dtype: str
    """The stored dtype (numpy name); floats of other widths are cast to it."""
    required: bool = False
    ndim: int = 1
    """1 for [T], [N] and [P]; 2 for token_ids [N, k] and the geometry fields."""
    also: tuple[str, ...] = ()
    """Other dtypes a file may store it in."""

    @property
    def dtypes(self) -> tuple[str, ...]:
        """Every dtype (numpy name) a step file or an archive may store the field in."""
        return (self.dtype, *self.also)

    @property
    def dims(self) -> tuple[str | None, ...]:
        """What each dimension of the field counts: "tokens" (T), "sequences" (N), "units"
        (the geometry's U: T, or N when the gradients were taken per sequence; a Gram's two
        are the same), or None (free: token_ids' k, a sketch's k, the parameters)."""
        return {
            "token": ("tokens",),
            "sequence": ("sequences",) if self.ndim == 1 else ("sequences", None),
            "unit_pairs": ("units", "units"),
            "unit_rows": ("units", None),
            "param": (None,),
        }[self.per]


FIELDS: dict[str, FieldSpec] = {
    spec.name: spec
    for spec in (
        FieldSpec(name="logp", per="token", dtype="float32", required=True),
        FieldSpec(name="logp_old", per="token", dtype="float32", required=True),
        FieldSpec(name="advantages", per="token", dtype="float32", required=True),
        FieldSpec(name="mask", per="token", dtype="uint8", required=True),
        FieldSpec(name="seq_id", per="token", dtype="int32", required=True),
        FieldSpec(name="logp_ref", per="token", dtype="float32"),
        FieldSpec(name="logp_rollout", per="token", dtype="float32"),
        FieldSpec(name="loss_weight", per="token", dtype="float32"),
        FieldSpec(name="loss_scale", per="token", dtype="float32"),
        FieldSpec(name="group_id", per="sequence", dtype="int32"),
        FieldSpec(name="reward", per="sequence", dtype="float32"),
        # 1.1: the micro-batch of each sequence within the optimizer step (0, 1, ...).
        FieldSpec(name="micro_batch", per="sequence", dtype="int32"),
        # 1.1: 1 where the sequence's prompt group is split across optimizer steps or ranks.
        FieldSpec(name="group_split", per="sequence", dtype="uint8"),
        # 1.3: how many tokens a sequence entry's log-probs sum over (unit "sequence").
        FieldSpec(name="token_count", per="sequence", dtype="int32"),
        FieldSpec(name="token_ids", per="sequence", dtype="int64", ndim=2),
        FieldSpec(name=GRAM_KEY, per="unit_pairs", dtype="float32", ndim=2),
        # float16 with the per-step scalar `unit_grad_sketch_scale`.
        FieldSpec(name=SKETCH_KEY, per="unit_rows", dtype="float32", ndim=2, also=("float16",)),
        FieldSpec(name="param_grad_norm", per="param", dtype="float32"),
    )
}
EXTENSION_FIELDS = ("micro_batch", "group_split")
"""Step fields added by format 1.1."""
COUNT_FIELDS = ("token_count",)
"""Step fields added by format 1.3."""
SCALAR_STEP_FIELDS = ("param_grad_norm",)
"""The only fields a scalar step (format 1.2) may hold; any other field makes a policy batch."""
BATCH_FIELDS = tuple(name for name in FIELDS if name not in SCALAR_STEP_FIELDS)
"""The fields of a step's policy batch (token, sequence and geometry arrays)."""

# Per-step scalars, stored as strings in the safetensors metadata. Read back as floats.
STANDARD_SCALARS = (
    "step",
    "inner_step",
    "loss",
    "grad_norm",
    "grad_norm_clipped",
    "grad_norm_covered",
    "lr",
    "reward_mean",
    "nonfinite",
    "wall_time",
    SKETCH_SCALE_KEY,
)
# 1.2: standard names with one meaning for the scalars that optimizer hooks and imported logs
# record (units in docs/run-format.md). Given as `log_step` keywords or in `scalars=`; and
# ROLLOUT_SCALARS (in `scalars=`).
SERIES_SCALARS = (
    "entropy",
    "kl",
    "clip_frac",
    "clip_frac_low",
    "clip_frac_high",
    "step_time",
    "nonfinite_grads",
    "rollout_reward",
    "rollout_count",
    "reward_count",
)
ROLLOUT_SCALARS = ("rollout_reward", "rollout_count")
"""The TRL integration's mark of the rollouts generated during a step: their mean reward (the
step's reward draw, `detectors.reward_draws`) and how many it is a mean of. Not series of
their own: they are reward_mean's draws."""
REWARD_COUNT = "reward_count"
"""How many rewards a step's `reward_mean` is a mean of (its sequences scored, over every
rank): its weight in its rollout's reward draw (`detectors.reward_draws`). The verl
integration records it; a step without it weighs as much as any other of its rollout."""
DRAW_SCALARS = (*ROLLOUT_SCALARS, REWARD_COUNT)
"""The scalars reward_mean's draws are made of, not series of their own."""
LOSS_AUX = "loss_aux"
"""The part of a step's recorded `loss` outside the policy's objective, which no policy of the
catalogue models (the TRL integration's MoE router loss, its coefficient times the router's
load-balancing loss): replay compares the run's own policy with `loss` less it
(`loss_parity`). A scalar of the step's, absent where the loss has no such part."""
MAX_SCALARS = 10_000
"""The most scalars of one's own (`scalars=`) a step may hold: real runs log tens to a few
thousand; `log_step` refuses more (a usage error naming the count)."""
MAX_METADATA = MAX_SCALARS + 100
"""The most entries a step file's header metadata may hold (MAX_SCALARS, the standard
scalars, the bookkeeping and a newer minor's text entries): a file holding more is unreadable,
a finding like a corrupt one, read no further (millions of crafted keys would cost minutes and
gigabytes to read)."""
MAX_TENSORS = 1_000
"""The most tensors a step file may hold (FIELDS are about twenty; the rest is room for a
newer minor's): a file holding more is unreadable, read no further, as for MAX_METADATA."""
# Bookkeeping in the same metadata; user scalars may not start with "_".
META_FORMAT = "_format_version"
META_RANK = "_rank"
META_WORLD_SIZE = "_world_size"
META_NUM_TOKENS = "_num_tokens"
META_NUM_SEQUENCES = "_num_sequences"
META_SCORED_TOKENS = "_scored_tokens"
META_SCORED_REWARDS = "_scored_rewards"
"""How many of the step's rewards are scored (not NaN), what its reward_mean is a mean of: the
weight of a rank's reward_mean in a multi-rank join. Written with every `reward` array; a file
without it (no `reward`, an older recorder) is weighted by its sequences."""
META_SKETCH_SEED = "_sketch_seed"
"""The seed of the Omega a rank's `unit_grad_sketch` was drawn with (the Recorder's
`geometry["sketch"]["seed"]`): written with each sketch whose seed the Recorder knows. Sketches
of different seeds do not join across ranks; a file without it (an older recorder, a sketch of
a seed not given) joins as before."""
META_CRC_HEADER = "_crc32_header"
META_CRC_DATA = "_crc32_data"


_VERSION_RE = re.compile(r"([0-9]{1,9})\.([0-9]{1,9})")
"""A format version: a string of ASCII digits, a dot, ASCII digits (at most 9 each)."""


def nonfinite_norms(scalars: dict[str, float]) -> int:
    """How many of a step's `loss` and `grad_norm` are given and not finite: what its
    `nonfinite` counts beside its batch's non-finite entries (the writer's rule, which a join
    of ranks' steps follows)."""
    return sum(1 for name in ("loss", "grad_norm") if not math.isfinite(scalars.get(name, 0.0)))


def parse_version(text: object, what: str) -> tuple[int, int]:
    """ "1.0" -> (1, 0); anything else (a number, other digits than ASCII's, more than 9
    digits a part) is corrupt input."""
    match = _VERSION_RE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise InputError(f"{what}: malformed format version {shown(text)}")
    return int(match.group(1)), int(match.group(2))


def check_readable_version(
    text: object, what: str, newest_major: int = FORMAT_MAJOR
) -> tuple[int, int]:
    """A major version newer than `newest_major` is refused (an archive's may be 2:
    `_layout.ARCHIVE_MAJOR`); a newer minor is read, its new fields ignored."""
    major, minor = parse_version(text, what)
    if major > newest_major:
        raise InputError(
            f"{what}: run format {major}.{minor} is newer than this tool reads "
            f"({newest_major}.x); upgrade stabledrl"
        )
    if major < FORMAT_MAJOR:
        raise InputError(f"{what}: run format {major}.{minor} is not supported")
    return major, minor


def _finite_number(value: object) -> bool:
    """Whether a JSON value is a number that is a finite float (an int past float's range,
    1e400, or a literal like 1e999, which parses as inf, is not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def known_version_below(version: tuple[int, int]) -> str | None:
    """The newest version of a manifest's (or an archive's) major this stabledrl knows, when
    the (readable) `version` is a newer minor of it, whose added fields it leaves unread; None
    else."""
    known = FORMAT_VERSION if version[0] == FORMAT_MAJOR else PER_RANK_VERSION
    return known if version > parse_version(known, known) else None


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


def is_count(value: object) -> TypeGuard[int]:
    """Whether `value` is an integer >= 0 (not a bool, which would be taken for 0 or 1)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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


def json_checked(value: _Json, what: str) -> _Json:
    """`value` with each numpy number or bool in it as the Python value it holds (`_plain`);
    UsageError naming the argument for values that JSON cannot hold, text that is not Unicode
    too (a lone surrogate, which every reader of the run refuses: `_json.has_lone_surrogate`),
    and an integer past the digits Python converts (its own message is a hint for code)."""
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False, default=_plain_or_refused)
        text.encode("utf-8")
        return _plain(value)
    except (TypeError, ValueError, RecursionError) as exc:  # (nested past the encoder's depth)
        if "integer string conversion" in str(exc):
            limit = sys.get_int_max_str_digits()
            exc = ValueError(f"an integer of more than {limit} digits (at most {limit} are read)")
        raise UsageError(f"{what} must be JSON-serializable: {exc}") from None


def _plain_or_refused(value: object) -> object:
    """json.dumps's hook for what it cannot write: a numpy number, bool or 0-d array as the
    Python value it holds (`spec.plain_number`), else TypeError, json's own."""
    plain = plain_number(value)
    if plain is value:
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
    return plain


def _plain(value: _Json) -> _Json:
    """`value` with each numpy number, bool or 0-d array in it, at any depth of its dicts,
    lists and tuples, as the Python value it holds: a config read from arrays (checked by
    `json_checked`: no cycle, a depth JSON takes)."""
    if isinstance(value, dict):
        return cast(_Json, {key: _plain(item) for key, item in value.items()})
    if isinstance(value, list | tuple):
        return cast(_Json, [_plain(item) for item in value])
    return plain_number(value)


def step_number(value: object, name: str = "step") -> int:
    """An int >= 0 (a numpy or 0-d torch integer is fine), else UsageError naming `name`."""
    step = whole_number(value)
    if step is None or not 0 <= step <= STEP_LIMIT:
        raise UsageError(f"{name} must be an int in [0, 2**63 - 1], got {value!r}")
    return step


def switch_argument(value: object, name: str) -> bool:
    """`value`, the switch `name`, when it is True or False, else UsageError: its truth value
    would be taken for it (overwrite="false" would replace the run). A numpy bool is the bool
    it holds."""
    value = plain_number(value)
    if not isinstance(value, bool):
        raise UsageError(f"{name} must be True or False, not {type_name(value)}")
    return value


def path_argument(path: object, name: str = "path", what: str = "the run's directory") -> str:
    """A run's `path` as given to `Recorder` or `open_run` (or an integration's run directory,
    or `pack_run`'s archive: `what`, the argument `name`): a non-empty str or path object (its
    text returned), else UsageError (None, a number, bytes; "" would be the working directory,
    which no caller means; a NUL, which the system refuses)."""
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if not isinstance(text, str):
        raise UsageError(f"{name} must be a str or a path object, not {type(path).__name__}")
    if not text:
        raise UsageError(f"{name} is empty: name {what}")
    if "\x00" in text:
        raise UsageError(f"{name} {quoted(text)} holds a NUL character, which no file name can")
    return text
