"""One `log_step` call's inputs -> the step: its arrays by field, its scalars and its number of
sequences, checked together (fields, shapes, geometry), with a clear error.

Shapes: flat [T], or [B, L] with an optional mask [B, L]; [B, L] is flattened row-major over
ALL positions (masked ones kept with mask = 0). Each value is converted by `_input_arrays`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from stabledrl_cli._batch_inputs import rows_of_entries
from stabledrl_cli.dump._input_arrays import (
    ArrayInput,
    ScalarInput,
    count_array,
    flag_array,
    float_array,
    int_array,
    scalar_value,
    to_numpy,
)
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

_FIELD_NAMES = frozenset(FIELDS)
_BATCH_FIELD_NAMES = frozenset(BATCH_FIELDS)
_SEQUENCE_FIELD_NAMES = frozenset(name for name, spec in FIELDS.items() if spec.per == "sequence")


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
        norms = float_array(given.pop("param_grad_norm"), "param_grad_norm").reshape(-1)
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
    logp = float_array(given.pop("logp"), "logp")
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
            tensors[name] = token_field(name, float_array(given.pop(name), name))
    num_tokens = tensors["logp"].shape[0]
    if "mask" in given:
        tensors["mask"] = token_field("mask", flag_array(given.pop("mask"), "mask"))
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
        seq_id = token_field("seq_id", int_array(given.pop("seq_id"), "seq_id", "int32"))
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
        group_id = int_array(given.pop("group_id"), "group_id", "int32")
        tensors["group_id"] = sequence_field("group_id", group_id)
    if "reward" in given:
        reward = float_array(given.pop("reward"), "reward")
        if reward.ndim == 2 and reward.shape[1] == 1:  # a reward model's [N, 1] scores
            reward = reward.reshape(-1)
        tensors["reward"] = sequence_field("reward", reward)
    if "micro_batch" in given:
        micro_batch = int_array(given.pop("micro_batch"), "micro_batch", "int32")
        tensors["micro_batch"] = sequence_field("micro_batch", micro_batch)
    if "group_split" in given:
        group_split = flag_array(given.pop("group_split"), "group_split")
        tensors["group_split"] = sequence_field("group_split", group_split)
    if "token_count" in given:
        if unit != "sequence":
            raise UsageError(
                "token_count: recorded by a unit 'sequence' run (each entry a sequence whose "
                "log-probs sum over its tokens); this run's entries are tokens"
            )
        token_count = count_array(given.pop("token_count"), "token_count")
        tensors["token_count"] = sequence_field("token_count", token_count)
    if "token_ids" in given:
        token_ids = int_array(given.pop("token_ids"), "token_ids", "int64", index=False)
        token_ids = sequence_field("token_ids", token_ids, rows=True)
        tensors["token_ids"] = token_ids.reshape(-1, 1) if token_ids.ndim == 1 else token_ids
    if num_sequences > num_tokens and _SEQUENCE_FIELD_NAMES.isdisjoint(tensors):
        raise UsageError(
            f"seq_id: its largest id {num_sequences - 1} names {num_sequences} sequences (N = "
            f"max(seq_id) + 1), but the step has {num_tokens} entries and no per-sequence "
            "array: ids index the step's sequences, 0 to N - 1 (renumber them: "
            "np.unique(seq_id, return_inverse=True)[1])"
        )

    if "unit_grad_gram" in given or "unit_grad_sketch" in given:
        tensors.update(_geometry(unit, given, num_tokens, num_sequences, sketch_scaled))
    return tensors, num_sequences


def _geometry(
    unit: Unit,
    given: dict[str, np.ndarray],
    num_tokens: int,
    num_sequences: int,
    sketch_scaled: bool,
) -> dict[str, np.ndarray]:
    """The step's unit_grad_gram or unit_grad_sketch (removed from `given`), checked against
    its U units and converted; `sketch_scaled` as `_batch_tensors`."""
    tensors: dict[str, np.ndarray] = {}
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
        gram = float_array(given.pop("unit_grad_gram"), "unit_grad_gram")
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
            sketch = float_array(sketch, "unit_grad_sketch")
        # a rank's part with no sequence has no row: its k says nothing (the join's rule)
        no_columns = sketch.ndim == 2 and sketch.shape[1] == 0 and sketch.shape[0] > 0
        if sketch.ndim != 2 or sketch.shape[0] not in units or no_columns:
            columns = " and k >= 1" if num_tokens else ", any k"
            raise UsageError(
                f"unit_grad_sketch: expected [U, k] with {shown}{columns}, got {list(sketch.shape)}"
            )
        tensors["unit_grad_sketch"] = sketch
    return tensors


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
            out[name] = scalar_value(value, name)
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
        out[name] = scalar_value(value, f"scalars[{name!r}]")
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
