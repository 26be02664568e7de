"""What a step file's header says, checked against its file name, the run and itself: the
`HeaderRecord` a step of a run directory is built from (`header_record`), and a file's last
check (`Checked`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stabledrl_cli.dump._integrity import StepReadError
from stabledrl_cli.dump._schema import (
    BATCH_FIELDS,
    FIELDS,
    META_NUM_SEQUENCES,
    META_NUM_TOKENS,
    META_RANK,
    META_SCORED_REWARDS,
    META_SCORED_TOKENS,
    META_SKETCH_SEED,
    META_WORLD_SIZE,
    SEQUENCE_LIMIT,
    SKETCH_KEY,
)
from stabledrl_cli.dump._stfile import FileKey, StepHeader
from stabledrl_cli.dump._versions import SCALAR_STEP_VERSION
from stabledrl_cli.errors import quoted, shown
from stabledrl_cli.spec import spec_float, spec_int


def _parse_scalars(metadata: dict[str, str]) -> dict[str, float]:
    scalars = {}
    for name, text in sorted(metadata.items()):
        if name.startswith("_"):
            continue
        try:  # as the writer spells a float (repr): not float()'s '1_0', ' 0.5' or other digits
            scalars[name] = spec_float(text)
        except ValueError:
            continue  # a newer minor's non-numeric metadata: ignored
    return scalars


_STORED_DTYPES = {"float32": "F32", "float16": "F16", "uint8": "U8", "int32": "I32", "int64": "I64"}


def _count(metadata: dict[str, str], key: str) -> int:
    try:  # ASCII digits, as the writer spells a count: not int()'s '1_0' or other digits
        value = spec_int(metadata.get(key, "0"))
    except ValueError:
        raise StepReadError("unreadable", f"{key} is not an integer") from None
    if value < 0:
        raise StepReadError("unreadable", f"{key} is negative")
    return value


def _check_fields(header: StepHeader, tokens: int, sequences: int, *, scalar: bool) -> None:
    """Every schema field has its dtype and a shape that agrees with the step's counts, and
    the required fields are there (none for a scalar step); else StepReadError (the step is
    skipped, not the run)."""
    for name, spec in FIELDS.items():
        if name not in header.tensors:
            if spec.required and not scalar:
                raise StepReadError("unreadable", f"required field {name} is missing")
            continue
        dtype, shape = header.tensors[name]
        allowed = {_STORED_DTYPES[d] for d in spec.dtypes}
        if dtype not in allowed:
            stored = " or ".join(spec.dtypes)
            raise StepReadError("unreadable", f"{name}: dtype {dtype}, expected {stored}")
        counts = {"tokens": (tokens,), "sequences": (sequences,), "units": (tokens, sequences)}
        expected = [None if dim is None else counts[dim] for dim in spec.dims]
        if (
            len(shape) != len(expected)
            or any(
                want is not None and got not in want
                for got, want in zip(shape, expected, strict=True)
            )
            or (spec.per == "unit_pairs" and shape[0] != shape[1])
        ):
            raise StepReadError(
                "unreadable",
                f"{name}: shape {shown(list(shape))} disagrees with the step's {tokens} tokens and "
                f"{sequences} sequences",
            )


@dataclass(frozen=True, slots=True)
class HeaderRecord:
    """What a step's Step is built from, kept per checked file instead of its parsed header
    (a few hundred bytes, not a few KB): names are shared by files of the same layout."""

    fields: frozenset[str]
    """The file's tensors that are schema fields."""
    scalar_names: tuple[str, ...]
    scalar_values: tuple[float, ...]
    num_tokens: int
    num_sequences: int
    num_scored_tokens: int
    num_scored_rewards: int | None = None
    """`_scored_rewards`; None for a file without it."""
    unknown_fields: frozenset[str] = frozenset()
    """The file's tensors that are no schema field (a newer minor version's)."""
    sketch_seed: int | None = None
    """`_sketch_seed`: the Omega seed of the file's sketch; None when it records none."""
    sketch_width: int | None = None
    """The k of the file's `unit_grad_sketch` [U, k]; None without one."""

    @property
    def scalars(self) -> dict[str, float]:
        return dict(zip(self.scalar_names, self.scalar_values, strict=True))

    @property
    def reward_weight(self) -> int:
        """The weight of its reward_mean in a join: the rewards the mean is over, else (no
        count recorded) the sequences."""
        if self.num_scored_rewards is None:
            return self.num_sequences
        return self.num_scored_rewards


@dataclass(slots=True)
class Checked:
    """A step file's last check: its stat key, whether its data CRC was checked, and what it
    gave (a record, or the (kind, message) of its StepReadError: the exception itself is not
    kept, since its traceback would hold the checking frames)."""

    key: FileKey
    deep: bool
    outcome: HeaderRecord | tuple[str, str]
    header_crc: int = 0
    """`StepHeader.header_crc` of the checked header (a later full read skips its checks)."""


def header_record(
    header: StepHeader,
    step: int,
    rank: int,
    version: tuple[int, int],
    *,
    world_size: int,
    shared: dict[Any, Any],
) -> HeaderRecord:
    """What the Step is built from, its names taken from `shared` (one tuple a layout);
    StepReadError for a header that disagrees with its file name (step, rank) or the run's
    `world_size` (a rank recorded with another one is not a part of this run's steps), with
    itself (counts, shapes, dtypes), or a step with no tokens (a scalar step, with no batch
    field at all, has none: from format 1.2 on)."""
    metadata = header.metadata
    scalars = _parse_scalars(metadata)
    if "step" in scalars and scalars["step"] != float(step):
        raise StepReadError(
            "unreadable", f"its header says step {quoted(metadata['step'])}, its file name {step}"
        )
    said = (metadata.get(META_RANK, str(rank)), metadata.get(META_WORLD_SIZE))
    if said[0] != str(rank) or said[1] not in (None, str(world_size)):
        raise StepReadError(
            "unreadable",
            f"its header says rank {quoted(said[0])} of world_size "
            f"{said[1] if said[1] is None else quoted(said[1])}, its file name rank "
            f"{rank} of the run's world_size {world_size}",
        )
    tokens = _count(metadata, META_NUM_TOKENS)
    sequences = _count(metadata, META_NUM_SEQUENCES)
    scored = _count(metadata, META_SCORED_TOKENS)
    scalar = version >= SCALAR_STEP_VERSION and not any(
        name in header.tensors for name in BATCH_FIELDS
    )
    if scalar and tokens + sequences + scored > 0:
        raise StepReadError("unreadable", "a step without a batch counts tokens")
    if tokens == 0 and world_size == 1 and not scalar:
        raise StepReadError("unreadable", "the step has no tokens")
    if scored > tokens:
        raise StepReadError("unreadable", f"{scored} scored tokens of {tokens}")
    if sequences > SEQUENCE_LIMIT:
        raise StepReadError(
            "unreadable", f"{sequences} sequences: more sequences than an int32 seq_id names"
        )
    rewards = _count(metadata, META_SCORED_REWARDS) if META_SCORED_REWARDS in metadata else None
    if rewards is not None and rewards > sequences:
        raise StepReadError("unreadable", f"{rewards} scored rewards of {sequences} sequences")
    _check_fields(header, tokens, sequences, scalar=scalar)
    seed = _count(metadata, META_SKETCH_SEED) if META_SKETCH_SEED in metadata else None
    width = header.tensors[SKETCH_KEY][1][1] if SKETCH_KEY in header.tensors else None
    names = tuple(scalars)
    fields = frozenset(name for name in header.tensors if name in FIELDS)
    unknown = frozenset(header.tensors).difference(FIELDS)
    return HeaderRecord(
        fields=shared.setdefault(fields, fields),
        unknown_fields=shared.setdefault(unknown, unknown),
        scalar_names=shared.setdefault(names, names),
        scalar_values=tuple(scalars.values()),
        num_tokens=tokens,
        num_sequences=sequences,
        sketch_seed=seed,
        sketch_width=width,
        num_scored_tokens=scored,
        num_scored_rewards=rewards,
    )
