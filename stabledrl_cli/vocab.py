"""Every closed vocabulary of the tool, once, as `Literal` types with their tuples.

The library validates against these tuples; the CLI derives its choices from them; the docs
list them. Nothing here imports torch, so the CLI can build its help from it at once.
"""

from __future__ import annotations

from typing import Literal, get_args

Unit = Literal["token", "sequence"]
"""What a recorded entry scores: a token, or a whole sequence (a dLLM ELBO under independent
masks for old and new)."""
UNITS: tuple[Unit, ...] = get_args(Unit)

Device = Literal["auto", "cpu", "cuda", "mps"]
"""Where replay and the example compute; auto: cuda, then mps, then cpu."""
DEVICES: tuple[Device, ...] = get_args(Device)

ReplayEngine = Literal["local", "processes", "ray"]
"""Where replay's streaming pass runs: this process, or the workers of a Ray cluster."""
REPLAY_ENGINES: tuple[ReplayEngine, ...] = get_args(ReplayEngine)

PackCompression = Literal["fast", "small"]
"""How `pack` compresses an archive's data: fast (only the fields that deflate halves, so a
replay reads it near the directory's speed), or small (every field gzip with shuffle)."""
PACK_COMPRESSIONS: tuple[PackCompression, ...] = get_args(PackCompression)

Estimator = Literal["llada", "elbo"]
"""The built-in example's log-likelihood estimator: LLaDA's 1/t-weighted ELBO, or the mean
ELBO."""
ESTIMATORS: tuple[Estimator, ...] = get_args(Estimator)

GeometryKind = Literal["gram", "sketch"]
"""Recorded gradient geometry of a step's units: an exact Gram matrix, or a sketch."""
GEOMETRY_KINDS: tuple[GeometryKind, ...] = get_args(GeometryKind)

StepGeometryKind = Literal["gram", "sketch", "coef"]
"""How a replayed step's update norm was measured (coef: the coefficient norm, a proxy)."""
STEP_GEOMETRY_KINDS: tuple[StepGeometryKind, ...] = get_args(StepGeometryKind)

RunGeometryKind = Literal["gram", "sketch", "coef", "mixed"]
"""A replay's geometry over all its steps (mixed: some steps with geometry, some without)."""

SketchMethod = Literal["auto", "exact", "jvp"]
"""How a sketch is taken: from exact per-unit gradients, forward-mode JVPs, or auto."""
SKETCH_METHODS: tuple[SketchMethod, ...] = get_args(SketchMethod)

UnjoinedGeometry = Literal[
    "per_rank_grams", "sketch_widths_differ", "sketch_seeds_differ", "partial_sketches"
]
"""Why the geometry a multi-rank step's ranks recorded does not join: Gram matrices (which
never combine across ranks), sketches of other widths k or seeds, or a sketch only some ranks
recorded; a run's steps of several name the first of these."""
UNJOINED_KINDS: tuple[UnjoinedGeometry, ...] = get_args(UnjoinedGeometry)
OMEGA_KINDS: tuple[UnjoinedGeometry, ...] = ("sketch_widths_differ", "sketch_seeds_differ")
"""The sketches left out though every rank recorded one: their Omegas differ."""

GeometryDtype = Literal["float32", "float16"]
"""Storage dtype of recorded geometry (float16: sketches only, with a per-step scale)."""
GEOMETRY_DTYPES: tuple[GeometryDtype, ...] = get_args(GeometryDtype)

Agg = Literal[
    "token-mean",
    "token-sum",
    "micro-token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "constant",
    "recorded",
]
"""How a policy's per-token terms are reduced to one objective (docs/policies.md)."""
AGGS: tuple[Agg, ...] = get_args(Agg)

Rows = Literal["scored", "all"]
"""Which sequences a sequence mean counts: those with a scored token, or every row."""
ROWS: tuple[Rows, ...] = get_args(Rows)

RolloutIS = Literal["off", "token-truncate", "token-mask", "sequence-truncate", "sequence-mask"]
"""A policy's rollout correction: the weight w = pi_old / pi_rollout per token or per sequence
(product), truncated to [tis_min, tis_max] or zeroed outside it (TRL's
vllm_importance_sampling_mode, verl's rollout_is and IcePop)."""
ROLLOUT_IS: tuple[RolloutIS, ...] = get_args(RolloutIS)

AdvMode = Literal["recorded", "center", "zscore", "rloo"]
"""Where a policy's advantages come from: as recorded, or recomputed from rewards per group."""
ADV_MODES: tuple[AdvMode, ...] = get_args(AdvMode)

OutputFormat = Literal["table", "json"]
"""What a command prints on stdout: a human table, or the JSON contract."""
OUTPUT_FORMATS: tuple[OutputFormat, ...] = get_args(OutputFormat)

Worse = Literal["higher", "lower"]
"""The direction in which a gated figure is a regression."""
WORSE: tuple[Worse, ...] = get_args(Worse)

SeriesStat = Literal["first", "last", "min", "max", "mean", "median", "tail", "nonfinite"]
"""A whole-run statistic of a recorded scalar series (over its finite values), as a baseline's
`recorded` section gates it (`tail`: the mean of the last `recorded.TAIL_STEPS` values;
`nonfinite`: the count of steps where it is NaN or infinite, worse when higher)."""
SERIES_STATS: tuple[SeriesStat, ...] = get_args(SeriesStat)

GroupIds = Literal["per_rank", "global"]
"""What a multi-rank run's `group_id`s mean: numbered per rank (a reader offsets each rank's
ids past the ranks before it), or global prompt-group ids shared by all ranks (left as is)."""
GROUP_IDS: tuple[GroupIds, ...] = get_args(GroupIds)

LossNorm = Literal["global", "per_rank"]
"""How a multi-rank run's ranks normalised their losses: over every rank's part (counts
gathered across the ranks: verl, TRL's dapo, cispo and vespo), or each rank over its own part,
the data-parallel all-reduce then averaging the ranks (a plain DistributedDataParallel loop)."""
LOSS_NORMS: tuple[LossNorm, ...] = get_args(LossNorm)

OnWriteError = Literal["raise", "warn"]
"""What a Recorder does when a step cannot be written: raise WriteError, or warn once on
stderr, stop recording and note it in the manifest (`recording_stopped`) and, a rank of a
run of several, in a note file of its own (docs/run-format.md)."""
ON_WRITE_ERROR: tuple[OnWriteError, ...] = get_args(OnWriteError)

ImportFormat = Literal[
    "trainer_state", "jsonl", "csv", "tfevents", "tensorboard_json", "verl_console", "wandb"
]
"""Logs `stabledrl import` reads: transformers' trainer_state.json, JSON lines, CSV as trackers
export it, TensorBoard event files, TensorBoard's per-tag JSON export, verl's console output,
W&B's run file."""
IMPORT_FORMATS: tuple[ImportFormat, ...] = get_args(ImportFormat)

MetricGroup = Literal["trl", "verl", "counts"]
"""Per-step columns a replay table shows only on request: TRL's clip ratios, verl's clip
fractions, the scored and clipped counts."""
METRIC_GROUPS: tuple[MetricGroup, ...] = get_args(MetricGroup)

DiffKind = Literal["arrays", "inputs", "logprobs", "scalars"]
"""What `diff` compares of a step: every array bit for bit, the inputs exactly, the
log-probabilities and the training scalars within a tolerance."""
DIFF_KINDS: tuple[DiffKind, ...] = get_args(DiffKind)

AlertKind = Literal[
    "risk",
    "nonfinite",
    "drift",
    "collapse_warning",
    "reward_collapse",
    "grad_norm_spike",
    "unscored_streak",
]
"""What `watch` alerts on: a risk step of the run's own policy replayed (a spike or a
non-finite update), a recorded non-finite step, the start of a drift stretch, the collapse
warning, the observed reward collapse, a step whose recorded grad_norm is a spike (and that is
not already a risk step), the first step of a streak of steps without a policy-gradient update
(`observed.UnscoredStreak`)."""
ALERT_KINDS: tuple[AlertKind, ...] = get_args(AlertKind)

GuardMode = Literal["skip", "scale"]
"""What an in-process guard (`stabledrl_cli.guard`) does to a step it flags: skip its update,
or scale its gradient down."""
GUARD_MODES: tuple[GuardMode, ...] = get_args(GuardMode)
GuardStepAction = Literal["none", "scale", "skip"]
"""What an in-process guard did to one step."""
GUARD_ACTION_CODES: dict[GuardStepAction, int] = {"none": 0, "scale": 1, "skip": 2}
"""Its step scalar `guard_action` as recorded (step scalars are numbers)."""
