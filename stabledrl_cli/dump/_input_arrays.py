"""One `log_step` value -> a numpy array (or a float) of its stored dtype, checked, with a clear
error.

Accepts torch tensors on any device (moved to the CPU once, no copy when already there) or
numpy arrays / lists.
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import numpy.typing as npt

from stabledrl_cli._batch_inputs import is_tensor, stack_tensors
from stabledrl_cli.errors import UsageError

if TYPE_CHECKING:
    import torch

ArrayInput: TypeAlias = "torch.Tensor | npt.ArrayLike"
"""An array `log_step` accepts: a torch tensor on any device, a numpy array, a list."""
ScalarInput: TypeAlias = (
    "float | int | torch.Tensor | np.generic | np.ndarray | list[float] | tuple[float, ...]"
)
"""A scalar `log_step` accepts: a number, or a one-element tensor, array, list or tuple."""

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
    if type(value) is np.ndarray:  # the common case first (no masked array, no list)
        return value
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


def float_array(array: np.ndarray, field: str) -> np.ndarray:
    """`array` in float32. A float64 value past float32's range is stored as inf, as a
    training's own float32 cast makes it, and counts in the step's `nonfinite`; numpy's
    overflow warning, which names neither the field nor the step, is not printed on the
    training's stderr. A field of `NUMBER_FIELDS` also takes integers and bools (a 0/1
    correctness reward, +-1 advantages), stored as the floats they are."""
    if array.dtype is _FLOAT32:  # stored as given: nothing to check or convert (the common case)
        return array
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


def int_array(array: np.ndarray, field: str, dtype: str, *, index: bool = True) -> np.ndarray:
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


def count_array(array: np.ndarray, field: str) -> np.ndarray:
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


def flag_array(array: np.ndarray, field: str) -> np.ndarray:
    if array.dtype.kind not in "biuf":
        raise UsageError(f"{field}: expected bool or numeric 0/1, got {array.dtype}")
    if array.dtype.kind == "b":
        return array.view(_UINT8)  # numpy stores a bool as the byte 0 or 1: the same bytes
    if array.size and not np.isin(array, (0, 1)).all():
        weights = " (a weight per entry is loss_weight)" if field == "mask" else ""
        raise UsageError(f"{field}: values must be 0 or 1{weights}")
    return _stored(array, _UINT8)


def scalar_value(value: ScalarInput | object, field: str) -> float:
    """A scalar as the float it holds: a number (a bool as 0 or 1), or a one-element tensor,
    array, list or tuple of one; UsageError naming `field` for anything else, text included."""
    if type(value) is float:
        return value
    if isinstance(value, list | tuple):  # torch's scheduler.get_last_lr(): an lr a param group
        if len(value) != 1:
            raise UsageError(f"{field}: expected a scalar, got {len(value)} values")
        (value,) = value
        if isinstance(value, list | tuple):  # a list in a list: no lr of a param group
            raise UsageError(f"{field}: expected a number in the list, got {type(value).__name__}")
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
