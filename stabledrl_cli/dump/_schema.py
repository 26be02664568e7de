"""The run format v1: names, dtypes and layout shared by the writer and the readers. Here what
a step file holds; the files' names are `_file_names`', the versions `_versions`', the
manifest's check `_manifest`'s and its stop notes `_stop_notes`'.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeGuard

GRAM_KEY = "unit_grad_gram"
"""The step field of an exact Gram matrix K: [U, U]."""
SKETCH_KEY = "unit_grad_sketch"
"""The step field of a sketch S: [U, k]."""
SKETCH_SCALE_KEY = f"{SKETCH_KEY}_scale"
"""The per-step scale of float16 sketch storage (a scalar of the step)."""
STEP_LIMIT = (1 << 63) - 1
"""The largest step number (int64): a longer one in a file name is not a step file."""
SEQUENCE_LIMIT = 1 << 31
"""The most sequences a step holds: N = max(seq_id) + 1, and seq_id is int32."""


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
step's reward draw, `rollouts.reward_draws`) and how many it is a mean of. Not series of
their own: they are reward_mean's draws."""
REWARD_COUNT = "reward_count"
"""How many rewards a step's `reward_mean` is a mean of (its sequences scored, over every
rank): its weight in its rollout's reward draw (`rollouts.reward_draws`). The verl
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


def nonfinite_norms(scalars: dict[str, float]) -> int:
    """How many of a step's `loss` and `grad_norm` are given and not finite: what its
    `nonfinite` counts beside its batch's non-finite entries (the writer's rule, which a join
    of ranks' steps follows)."""
    return sum(1 for name in ("loss", "grad_norm") if not math.isfinite(scalars.get(name, 0.0)))


def is_count(value: object) -> TypeGuard[int]:
    """Whether `value` is an integer >= 0 (not a bool, which would be taken for 0 or 1)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
