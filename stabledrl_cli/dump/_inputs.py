"""`log_step` inputs -> flat numpy arrays of the stored dtypes, checked, with a clear error.

Accepts torch tensors on any device (moved to the CPU once, no copy when already there) or
numpy arrays / lists. Shapes: flat [T], or [B, L] with an optional mask [B, L]; [B, L] is
flattened row-major over ALL positions (masked ones kept with mask = 0).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import numpy.typing as npt

from stabledrl_cli._batch_inputs import is_tensor, rows_of_entries, stack_tensors
from stabledrl_cli.dump._schema import (
    BATCH_FIELDS,
    FIELDS,
    MAX_SCALARS,
    REWARD_COUNT,
    SERIES_SCALARS,
    STANDARD_SCALARS,
    nonfinite_norms,
)
from stabledrl_cli.errors import UsageError
from stabledrl_cli.vocab import Unit

if TYPE_CHECKING:
    import torch

ArrayInput: TypeAlias = "torch.Tensor | npt.ArrayLike"
"""An array `log_step` accepts: a torch tensor on any device, a numpy array, a list."""
ScalarInput: TypeAlias = "float | int | torch.Tensor | np.generic | np.ndarray"
"""A scalar `log_step` accepts: a number, or a one-element tensor or array."""

_FIELD_NAMES = frozenset(FIELDS)
_BATCH_FIELD_NAMES = frozenset(BATCH_FIELDS)
_SEQUENCE_FIELD_NAMES = frozenset(name for name, spec in FIELDS.items() if spec.per == "sequence")
_FLOAT_KINDS = "f"
_INT_KINDS = "iu"
_INT_BITS = {"int32": 31, "int64": 63}
"""The value bits of each stored integer dtype (its sign bit aside)."""
_INT_MAX = {name: 2**bits - 1 for name, bits in _INT_BITS.items()}
"""The largest id each stored integer dtype holds."""
_INT_DTYPES = {name: np.dtype(name) for name in _INT_BITS}
_FLOAT32 = np.dtype("float32")
_UINT8 = np.dtype("uint8")


def to_numpy(value: ArrayInput, field: str) -> np.ndarray:
    """`value` as a plain numpy array (a tensor, or a list of them stacked: `stack_tensors`,
    moved to the CPU; bfloat16 widened to float32; a subclass's values: an np.matrix stays 2-D
    when flattened). UsageError naming `field` for a tensor numpy cannot take (on the meta
    device, sparse, float8, ...)."""
    _refuse_masked(value, field)
    try:
        stacked = stack_tensors(value)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise UsageError(f"{field}: cannot be read as an array ({exc})") from None
    if stacked is not None:
        value = stacked
    if is_tensor(value):
        value = value.detach()
        try:
            if value.dtype is sys.modules["torch"].bfloat16:
                value = value.float()  # numpy has no bfloat16
            return value.cpu().numpy()
        except Exception as exc:
            raise UsageError(f"{field}: cannot be read as an array ({exc})") from None
    if type(value) is np.ndarray:
        return value
    try:
        return np.asarray(value)
    except Exception as exc:
        raise UsageError(f"{field}: cannot be read as an array ({exc})") from None


def _refuse_masked(value: object, field: str) -> None:
    """UsageError naming `field` for a numpy masked array, or a list or tuple holding one (rows
    given one by one): np.asarray and .item() read its data, masked entries included, and a
    step keeps no mask of a field's own."""
    if isinstance(value, np.ma.MaskedArray) or (
        isinstance(value, list | tuple) and any(isinstance(v, np.ma.MaskedArray) for v in value)
    ):
        raise UsageError(
            f"{field}: a numpy masked array, whose mask a step does not keep: pass a plain "
            "array (np.ma.getdata), and mask= for the entries the loss scores"
        )


def element_count(value: ArrayInput, field: str) -> int:
    """How many elements `value` holds (a tensor's without moving it to the CPU); UsageError
    naming `field` as `to_numpy`."""
    if is_tensor(value):
        return int(value.numel())
    return int(to_numpy(value, field).size)


def _stored(array: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """`array` in `dtype`: itself when it already is (no numpy call), else converted."""
    return array if array.dtype is dtype else array.astype(dtype, copy=False)


NUMBER_FIELDS = frozenset({"reward", "advantages", "loss_weight", "loss_scale"})
"""Float fields whose values are often whole numbers in a training (rewards, advantages and
weights of 0/1, a normaliser that is a token count): integer and bool arrays are taken for
them too."""


def _float_array(array: np.ndarray, field: str) -> np.ndarray:
    """`array` in float32. A float64 value past float32's range is stored as inf, as a
    training's own float32 cast makes it, and counts in the step's `nonfinite`; numpy's
    overflow warning, which names neither the field nor the step, is not printed on the
    training's stderr. A field of `NUMBER_FIELDS` also takes integers and bools (a 0/1
    correctness reward, +-1 advantages), stored as the floats they are."""
    kinds = _FLOAT_KINDS + (_INT_KINDS + "b" if field in NUMBER_FIELDS else "")
    if field == "reward" and array.dtype.kind == "O":
        array = _rewards_with_none(array)
    if array.dtype.kind not in kinds:
        raise UsageError(f"{field}: expected a floating dtype, got {array.dtype}")
    with np.errstate(over="ignore"):
        return _stored(array, _FLOAT32)


def _rewards_with_none(array: np.ndarray) -> np.ndarray:
    """Rewards given as Python objects (`[1.0, None]`: TRL's reward functions return None
    for a completion they do not score) as float64, None as NaN (no reward, as the recorded
    field says it); the array as it was when an entry is not a number; UsageError for an int
    past float64's range."""
    values = [math.nan if value is None else value for value in array.reshape(-1)]
    try:
        return np.array(values, dtype=np.float64).reshape(array.shape)
    except OverflowError:  # an int past float64's range
        raise UsageError("reward: a number too large for a float64") from None
    except (TypeError, ValueError):
        return array


def _int_array(array: np.ndarray, field: str, dtype: str, *, index: bool = True) -> np.ndarray:
    """`array` in `dtype`, its values checked to fit; `index`: they are indices, >= 0 (not
    token_ids, which name a sequence: offsets or hashes of any sign)."""
    kind, width = array.dtype.kind, array.dtype.itemsize
    if kind not in _INT_KINDS:
        raise UsageError(f"{field}: expected an integer dtype, got {array.dtype}")
    if array.size:
        if index and kind == "i":  # unsigned ids are >= 0 by their dtype
            low = np.minimum.reduce(array, axis=None)
            if low < 0:
                raise UsageError(f"{field}: ids must be >= 0, got {low}")
        if width * 8 - (kind == "i") > _INT_BITS[dtype]:  # else every value of its dtype fits
            high = np.maximum.reduce(array, axis=None)
            if high > _INT_MAX[dtype]:
                raise UsageError(f"{field}: id {high} does not fit {dtype}")
    return _stored(array, _INT_DTYPES[dtype])


def _count_array(array: np.ndarray, field: str) -> np.ndarray:
    """`array` of counts in int32: whole numbers >= 0 that fit it, of an integer dtype, or of a
    float one holding whole finite values (a mask's float sum)."""
    if array.dtype.kind not in _INT_KINDS + _FLOAT_KINDS:
        raise UsageError(f"{field}: expected an integer or float dtype, got {array.dtype}")
    if array.dtype.kind in _FLOAT_KINDS:
        whole = np.isfinite(array) & (np.trunc(array) == array)
        if not whole.all():
            raise UsageError(f"{field}: counts must be whole numbers, got {array[~whole][0]}")
    if array.size:
        low, high = np.minimum.reduce(array, axis=None), np.maximum.reduce(array, axis=None)
        if low < 0:
            raise UsageError(f"{field}: counts must be >= 0, got {int(low)}")
        if high > _INT_MAX["int32"]:
            raise UsageError(f"{field}: count {int(high)} does not fit int32")
    return _stored(array, _INT_DTYPES["int32"])


def _flag_array(array: np.ndarray, field: str) -> np.ndarray:
    if array.dtype.kind not in "biuf":
        raise UsageError(f"{field}: expected bool or numeric 0/1, got {array.dtype}")
    if array.dtype.kind == "b":
        return array.view(_UINT8)  # numpy stores a bool as the byte 0 or 1: the same bytes
    if array.size and not np.isin(array, (0, 1)).all():
        weights = " (a weight per entry is loss_weight)" if field == "mask" else ""
        raise UsageError(f"{field}: values must be 0 or 1{weights}")
    return _stored(array, _UINT8)


def _scalar(value: ScalarInput | object, field: str) -> float:
    """A scalar as the float it holds: a number (a bool as 0 or 1), or a one-element tensor or
    array of one; UsageError naming `field` for anything else, text included."""
    if type(value) is float:
        return value
    _refuse_masked(value, field)
    if isinstance(value, np.ndarray) or is_tensor(value):
        count = value.size if isinstance(value, np.ndarray) else value.numel()
        if count != 1:
            raise UsageError(f"{field}: expected a scalar, got {count} values")
        try:
            value = value.item()
        except Exception as exc:  # a tensor with no data (meta), ...
            raise UsageError(f"{field}: cannot be read as a number ({exc})") from None
    if isinstance(value, str | bytes):  # float() would parse it: a bug of the loop, unseen
        text = str(value) if isinstance(value, str) else value
        raise UsageError(f"{field}: expected a number, got text {text!r}")
    if isinstance(value, complex | np.complexfloating):  # numpy's float() drops the imaginary
        raise UsageError(f"{field}: expected a number, got {type(value).__name__}")
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UsageError(f"{field}: expected a number, got {type(value).__name__}") from None
    except OverflowError:
        raise UsageError(f"{field}: a number too large for a float64") from None


def _nonfinite_count(arrays: list[np.ndarray], mask: np.ndarray) -> int:
    """Non-finite entries of `arrays` where `mask` is set; a finite sum of a whole array
    (the common case, one vectorized pass) means it has none."""
    count = 0
    with np.errstate(over="ignore", invalid="ignore"):
        for array in arrays:
            if not math.isfinite(np.add.reduce(array, axis=None)):
                count += int(np.count_nonzero(~np.isfinite(array[mask.astype(bool)])))
    return count


def build_step(
    *,
    unit: Unit,
    step: int,
    arrays: Mapping[str, ArrayInput | None],
    scalars: Mapping[str, ScalarInput | None],
    user_scalars: Mapping[str, ScalarInput] | None,
    num_params: int | None,
) -> tuple[dict[str, np.ndarray], dict[str, float], int]:
    """Checks and converts one step. Returns (tensors by field, scalars by name, N: the number
    of sequences, 0 for a scalar step).

    `arrays` holds every array keyword of `log_step` (None where absent); `scalars` the scalar
    keywords. Per-token fields come out [T], per-sequence ones [N] with N = max(seq_id) + 1.
    A step given no batch array at all (`BATCH_FIELDS`) is a scalar step: only its scalars and
    `param_grad_norm`; given some batch arrays, logp, logp_old and advantages are required.
    """
    if user_scalars is not None and not isinstance(user_scalars, Mapping):
        raise UsageError(
            f"scalars: expected a mapping of names to numbers, got {type(user_scalars).__name__}"
        )
    given = {k: to_numpy(v, k) for k, v in arrays.items() if v is not None}
    if not _BATCH_FIELD_NAMES.isdisjoint(given):
        sketch_scaled = scalars.get("unit_grad_sketch_scale") is not None or (
            (user_scalars or {}).get("unit_grad_sketch_scale") is not None
        )
        tensors, num_sequences = _batch_tensors(unit, given, sketch_scaled=sketch_scaled)
    else:
        tensors, num_sequences = {}, 0
    if "param_grad_norm" in given:
        norms = _float_array(given.pop("param_grad_norm"), "param_grad_norm").reshape(-1)
        if num_params is not None and norms.shape[0] != num_params:
            raise UsageError(
                f"param_grad_norm: {norms.shape[0]} entries, but param_names has {num_params}"
            )
        tensors["param_grad_norm"] = norms
    if given:
        raise UsageError(f"unknown array fields: {', '.join(sorted(given))}")
    assert _FIELD_NAMES.issuperset(tensors)
    values = _step_scalars(step, scalars, user_scalars, tensors)
    return tensors, values, num_sequences


def _batch_tensors(
    unit: Unit, given: dict[str, np.ndarray], *, sketch_scaled: bool
) -> tuple[dict[str, np.ndarray], int]:
    """The policy batch's arrays (removed from `given`), checked and converted, and its number
    of sequences; `sketch_scaled` says whether the step has the scale a float16 sketch needs."""
    for name in ("logp", "logp_old", "advantages"):
        if name not in given:
            raise UsageError(f"{name}: required")
    logp = _float_array(given.pop("logp"), "logp")
    two_d = logp.ndim == 2
    if logp.ndim not in (1, 2):
        raise UsageError(f"logp: expected shape [T] or [B, L], got {list(logp.shape)}")
    shape = logp.shape
    if unit == "sequence" and two_d and shape[1] != 1 and "seq_id" not in given:
        raise UsageError(rows_of_entries(shape))

    def token_field(name: str, array: np.ndarray) -> np.ndarray:
        if name == "advantages" and two_d and array.shape in ((shape[0],), (shape[0], 1)):
            return array.reshape(-1).repeat(shape[1])  # each row's advantage, per token
        if name == "loss_scale" and array.ndim == 0:  # the step's one normaliser, every unit's
            return np.full(logp.size, array, dtype=array.dtype)
        if array.shape != shape:
            raise UsageError(
                f"{name}: shape {list(array.shape)} does not match logp's {list(shape)}"
            )
        return array.reshape(-1)

    tensors: dict[str, np.ndarray] = {"logp": logp.reshape(-1)}
    for name in ("logp_old", "advantages", "logp_ref", "logp_rollout", "loss_weight", "loss_scale"):
        if name in given:
            tensors[name] = token_field(name, _float_array(given.pop(name), name))
    num_tokens = tensors["logp"].shape[0]
    if "mask" in given:
        tensors["mask"] = token_field("mask", _flag_array(given.pop("mask"), "mask"))
    else:
        tensors["mask"] = np.ones(num_tokens, dtype="uint8")
    weight = tensors.get("loss_weight")
    if weight is not None and weight.size:
        scored = weight[tensors["mask"].view(bool)]  # a padded entry's weight is not used
        low = np.fmin.reduce(scored, axis=None, initial=0.0)  # the least, NaN aside
        if low < 0:  # the term of the other sign, which no weighting of a loss means
            raise UsageError(
                f"loss_weight: a weight is >= 0 (0 leaves the entry's term out), got {low:g}"
            )

    if "seq_id" in given:
        seq_id = token_field("seq_id", _int_array(given.pop("seq_id"), "seq_id", "int32"))
        num_sequences = int(np.maximum.reduce(seq_id)) + 1 if seq_id.size else 0
    elif two_d:
        seq_id = np.arange(shape[0], dtype="int32").repeat(shape[1])
        num_sequences = shape[0] if seq_id.size else 0  # the rows' ids, 0 to B - 1
    elif unit == "sequence":
        seq_id = np.arange(num_tokens, dtype="int32")
        num_sequences = num_tokens
    else:
        raise UsageError(
            "seq_id: required for flat per-token arrays (or pass [B, L] arrays); one entry "
            "a sequence (its log-probs summed, an ELBO) is unit 'sequence'"
        )
    tensors["seq_id"] = seq_id
    if unit == "sequence" and np.unique(seq_id).size != seq_id.size:
        raise UsageError("seq_id: unit 'sequence' records one entry per sequence; ids repeat")

    def sequence_field(name: str, array: np.ndarray, *, rows: bool = False) -> np.ndarray:
        if array.ndim != 1 and not (rows and array.ndim == 2):
            raise UsageError(f"{name}: expected shape [N], got {list(array.shape)}")
        if array.shape[0] != num_sequences:
            raise UsageError(
                f"{name}: {array.shape[0]} entries, but seq_id implies {num_sequences} "
                "sequences (N = max(seq_id) + 1); an id is out of range or missing"
            )
        return array

    if "group_id" in given:
        group_id = _int_array(given.pop("group_id"), "group_id", "int32")
        tensors["group_id"] = sequence_field("group_id", group_id)
    if "reward" in given:
        reward = _float_array(given.pop("reward"), "reward")
        if reward.ndim == 2 and reward.shape[1] == 1:  # a reward model's [N, 1] scores
            reward = reward.reshape(-1)
        tensors["reward"] = sequence_field("reward", reward)
    if "micro_batch" in given:
        micro_batch = _int_array(given.pop("micro_batch"), "micro_batch", "int32")
        tensors["micro_batch"] = sequence_field("micro_batch", micro_batch)
    if "group_split" in given:
        group_split = _flag_array(given.pop("group_split"), "group_split")
        tensors["group_split"] = sequence_field("group_split", group_split)
    if "token_count" in given:
        if unit != "sequence":
            raise UsageError(
                "token_count: recorded by a unit 'sequence' run (each entry a sequence whose "
                "log-probs sum over its tokens); this run's entries are tokens"
            )
        token_count = _count_array(given.pop("token_count"), "token_count")
        tensors["token_count"] = sequence_field("token_count", token_count)
    if "token_ids" in given:
        token_ids = _int_array(given.pop("token_ids"), "token_ids", "int64", index=False)
        token_ids = sequence_field("token_ids", token_ids, rows=True)
        tensors["token_ids"] = token_ids.reshape(-1, 1) if token_ids.ndim == 1 else token_ids
    if num_sequences > num_tokens and _SEQUENCE_FIELD_NAMES.isdisjoint(tensors):
        raise UsageError(
            f"seq_id: its largest id {num_sequences - 1} names {num_sequences} sequences (N = "
            f"max(seq_id) + 1), but the step has {num_tokens} entries and no per-sequence "
            "array: ids index the step's sequences, 0 to N - 1 (renumber them: "
            "np.unique(seq_id, return_inverse=True)[1])"
        )

    # U: the entries, or for token entries whose gradients were taken per sequence, N
    units: tuple[int, ...] = (num_tokens,) if unit == "sequence" else (num_tokens, num_sequences)
    shown = f"U = {num_tokens}"
    if unit == "token":
        shown += f" (entries) or {num_sequences} (sequences)"
    if "unit_grad_gram" in given and "unit_grad_sketch" in given:
        raise UsageError(
            "unit_grad_gram and unit_grad_sketch: a step records one geometry or the other, "
            "not both"
        )
    if "unit_grad_gram" in given:
        gram = _float_array(given.pop("unit_grad_gram"), "unit_grad_gram")
        if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] not in units:
            raise UsageError(
                f"unit_grad_gram: expected [U, U] with {shown}, got {list(gram.shape)}"
            )
        problem = gram_problem(gram)
        if problem is not None:
            raise UsageError(problem)
        tensors["unit_grad_gram"] = gram
    if "unit_grad_sketch" in given:
        sketch = given.pop("unit_grad_sketch")
        if sketch.dtype == np.float16:
            if not sketch_scaled:
                raise UsageError(
                    "unit_grad_sketch: float16 needs the per-step scale unit_grad_sketch_scale"
                )
        else:
            sketch = _float_array(sketch, "unit_grad_sketch")
        # a rank's part with no sequence has no row: its k says nothing (the join's rule)
        no_columns = sketch.ndim == 2 and sketch.shape[1] == 0 and sketch.shape[0] > 0
        if sketch.ndim != 2 or sketch.shape[0] not in units or no_columns:
            columns = " and k >= 1" if num_tokens else ", any k"
            raise UsageError(
                f"unit_grad_sketch: expected [U, k] with {shown}{columns}, got {list(sketch.shape)}"
            )
        tensors["unit_grad_sketch"] = sketch
    return tensors, num_sequences


def reward_outside(
    span: tuple[float, float], tensors: Mapping[str, np.ndarray], values: Mapping[str, float]
) -> str | None:
    """The first of a step's rewards (`reward`, else its `reward_mean`) that lies outside
    `span`, its run's declared reward_range, said as `a reward of -1`; None when none does
    (NaN is no reward: a completion not scored). Rewards are compared as stored, in float32
    (0.3 is 0.3000000119 there, a reward at the end of (0, 0.3)); a reward_mean beside them
    is theirs, or a mean of them (in float64: 0.3000000119 too), and not compared."""
    low, high = span
    reward = tensors.get("reward")
    if reward is not None:
        outside = np.flatnonzero((reward < low) | (reward > high))  # (a float is weak: float32)
        return f"a reward of {float(reward[outside[0]]):g}" if outside.size else None
    mean = values.get("reward_mean", math.nan)
    return f"a reward_mean of {mean:g}" if mean < low or mean > high else None


LOGP_FIELDS = ("logp", "logp_old", "logp_ref", "logp_rollout")
"""The fields of log-probabilities (or a dLLM's Monte Carlo ELBO estimates of them): <= 0."""

LOGP_ROUNDING = 1e-4
"""The most a log-probability may lie above 0 and still be read as 0 rounded: float32 rounds
a logit x, and x - logsumexp(x), to within 2^-24 |x| each (6e-6 together at |x| = 50, 6e-5 at
512), so a near-certain token's log-probability can come out a few units in the last place
above 0 (1.2e-7 from a log_softmax of x - log(sum(exp(x))), or a logsumexp taken apart from
x). Logits passed as logp (values of order 1) and a flipped sign (-log p, above 1e-4 for any
token of p < 0.9999) lie far above it."""


def positive_logp(arrays: Mapping[str, np.ndarray], mask: np.ndarray) -> tuple[str, float] | None:
    """The first of a step's `LOGP_FIELDS` (each [T], as `mask`) that holds a finite value
    above `LOGP_ROUNDING` where `mask` is set, with its largest such value: logits passed, or
    a flipped sign; None when none does (NaN and inf are the step's `nonfinite`). One pass over
    a field whose largest value is at most that, the common case."""
    for name in LOGP_FIELDS:
        values = arrays.get(name)
        if (
            values is None
            or not values.size
            or np.maximum.reduce(values, axis=None) <= LOGP_ROUNDING
        ):
            continue
        with np.errstate(invalid="ignore"):
            positive = values[(values > LOGP_ROUNDING) & np.isfinite(values) & mask.astype(bool)]
        if positive.size:
            return name, float(np.maximum.reduce(positive))
    return None


GRAM_ASYMMETRY = 1e-3
"""The most |K_uv - K_vu| a Gram matrix may show, relative to sqrt(K_uu K_vv) (plus its
square times the largest diagonal entry, for units whose gradients are next to 0): float32
rounding of the two dot products stays far below it."""


def gram_problem(gram: np.ndarray) -> str | None:
    """What makes a [U, U] matrix no Gram matrix G G^T, None when nothing does: a negative
    diagonal entry (a squared norm), or asymmetry beyond `GRAM_ASYMMETRY`. Non-finite
    entries (a step's non-finite gradients) are no problem: they give non-finite norms."""
    values = gram.astype(np.float64)
    diagonal = np.diagonal(values)
    with np.errstate(invalid="ignore"):
        negative = np.flatnonzero(diagonal < 0)
        if negative.size:
            u = int(negative[0])
            return (
                f"unit_grad_gram is no Gram matrix: its diagonal entry [{u}, {u}] is "
                f"{diagonal[u]:.6g}, and a squared gradient norm cannot be negative"
            )
        finite = diagonal[np.isfinite(diagonal)]
        floor = float(finite.max()) * GRAM_ASYMMETRY**2 if finite.size else 0.0
        scale = np.sqrt(diagonal[:, None] * diagonal[None, :])
        bad = np.argwhere(np.abs(values - values.T) > GRAM_ASYMMETRY * scale + floor)
    if bad.size:
        u, v = (int(i) for i in bad[0])
        return (
            f"unit_grad_gram is no Gram matrix: it is not symmetric ([{u}, {v}] is "
            f"{values[u, v]:.6g}, [{v}, {u}] is {values[v, u]:.6g})"
        )
    return None


def sketch_scale_problem(value: float) -> str | None:
    """What is wrong with a per-step geometry scale (`unit_grad_sketch_scale`), None when it is
    > 0 or NaN: a scale <= 0 would read every norm of the step as 0 or flip the sketch's sign;
    a NaN or inf one (a step's non-finite gradients) gives non-finite norms."""
    if not value <= 0:
        return None
    return f"unit_grad_sketch_scale is {value!r}: a per-step scale is > 0"


def _is_count(value: float) -> bool:
    """Whether a scalar is a count: a whole number >= 0."""
    return math.isfinite(value) and value >= 0 and value == math.floor(value)


def _step_scalars(
    step: int,
    scalars: Mapping[str, ScalarInput | None],
    user_scalars: Mapping[str, ScalarInput] | None,
    tensors: dict[str, np.ndarray],
) -> dict[str, float]:
    """The step's scalars: the keywords, the user's own, reward_mean and nonfinite derived."""
    given = len(user_scalars or {})
    if given > MAX_SCALARS:
        raise UsageError(
            f"scalars: {given:,} names, more than the {MAX_SCALARS:,} a step may hold "
            "(docs/run-format.md#scalars)"
        )
    out: dict[str, float] = {"step": float(step)}
    for name, value in scalars.items():
        if value is not None:
            out[name] = _scalar(value, name)
    for name, value in (user_scalars or {}).items():
        if not isinstance(name, str) or not name or name.startswith("_"):
            raise UsageError(f"scalars: name {name!r} must be a non-empty string not starting '_'")
        try:  # a step header holding a lone surrogate is unreadable
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"scalars: name {name!r} is not Unicode (a lone surrogate)") from None
        if "\x00" in name:  # HDF5 ends a name there: the run could not be packed
            raise UsageError(f"scalars: name {name!r} holds a NUL character")
        if name in STANDARD_SCALARS and name != "unit_grad_sketch_scale":
            how = f"pass it as {name}=" if name in scalars else "it is set by the Recorder"
            raise UsageError(f"scalars: {name!r} is a standard scalar; {how}")
        if name in SERIES_SCALARS and name in out:
            raise UsageError(f"scalars: {name!r} is given twice (as {name}= and in scalars=)")
        out[name] = _scalar(value, f"scalars[{name!r}]")
    problem = sketch_scale_problem(out.get("unit_grad_sketch_scale", 1.0))
    if problem is not None:
        raise UsageError(problem)
    inner_step = out.get("inner_step", 0.0)
    if not _is_count(inner_step):
        raise UsageError(
            f"inner_step: a count of the updates on a rollout before this one, a whole number "
            f">= 0 (0: its first, where the parameters are the sampling ones), got {inner_step!r}"
        )
    if not _is_count(out.get("nonfinite_grads", 0.0)):
        raise UsageError(
            "nonfinite_grads: how many parameters had a gradient with a NaN or an inf, a whole "
            f"number >= 0 (not given: not counted), got {out['nonfinite_grads']!r}"
        )
    if not _is_count(out.get(REWARD_COUNT, 0.0)):
        raise UsageError(
            f"scalars: {REWARD_COUNT!r} is how many rewards reward_mean is a mean of, a whole "
            f"number >= 0, got {out[REWARD_COUNT]!r}"
        )
    if "reward_mean" not in out and "reward" in tensors and tensors["reward"].size:
        reward = tensors["reward"]
        reward = reward[~np.isnan(reward)]  # NaN: a sequence that could not be scored
        total = float(np.add.reduce(reward, axis=None, dtype=np.float64))
        out["reward_mean"] = total / reward.size if reward.size else math.nan
    nonfinite = 0
    if "mask" in tensors:
        batch = [tensors[n] for n in ("logp", "logp_old", "advantages")]
        nonfinite = _nonfinite_count(batch, tensors["mask"])
    out["nonfinite"] = float(nonfinite + nonfinite_norms(out))
    return out
