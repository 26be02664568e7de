"""The abstract step: one optimizer step of a recorded run, whatever holds it, and why its
ranks' geometry is left out of the join.

A `Step` knows its scalars, fields and counts at once; `step[name]` (a torch tensor) and
`step.array(name)` (numpy) read one array when it is asked for, and the step reads as a mapping
of its fields (`keys()`, iteration, `get`, `in`). `omegas_differ` and `unjoined_kind` say why a
step joined from several ranks' files leaves some geometry out (`Step.unjoined_why`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar, overload

import numpy as np

from stabledrl_cli._repr import compact_repr
from stabledrl_cli.dump._schema import GRAM_KEY, SKETCH_KEY
from stabledrl_cli.vocab import UnjoinedGeometry

if TYPE_CHECKING:
    import torch

_Default = TypeVar("_Default")


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A step's array as the CPU torch tensor `step[name]` hands out (no copy). torch is
    imported here, at the first array read: listing or inspecting a run's headers, and the
    commands' --help, never load it."""
    import torch

    return torch.from_numpy(array)


def omegas_differ(seeds: Iterable[int | None], widths: Iterable[int]) -> UnjoinedGeometry | None:
    """Why the sketches every rank of a step recorded were drawn with two Omegas, so do not
    join: other widths k, else other seeds (None: not recorded, taken as agreeing); None when
    they agree."""
    if len(set(widths)) > 1:
        return "sketch_widths_differ"
    if len({seed for seed in seeds if seed is not None}) > 1:
        return "sketch_seeds_differ"
    return None


def unjoined_kind(
    unjoined: frozenset[str], *, omega: UnjoinedGeometry | None = None
) -> UnjoinedGeometry | None:
    """Why a step's ranks' geometry `unjoined` was left out of the join, None when none was:
    `GRAM_KEY` first (Grams never join), then a sketch of two Omegas (`omega`:
    `omegas_differ` of the ranks' own, or as an archive keeps it), then a sketch some ranks
    did not record."""
    if GRAM_KEY in unjoined:
        return "per_rank_grams"
    if SKETCH_KEY not in unjoined:
        return None
    return omega or "partial_sketches"


@dataclass(eq=False, kw_only=True)
class Step(ABC):
    """One optimizer step, read lazily: `step[name]` -> a CPU torch.Tensor read when indexed
    (token fields [T], sequence fields [N], token_ids [N, k], geometry [U, U] or [U, k]);
    `step.array(name)` -> the same values as a numpy array."""

    step: int
    scalars: dict[str, float]
    fields: set[str]
    num_tokens: int
    num_sequences: int
    num_scored_tokens: int
    """Tokens with mask = 1."""
    unjoined: frozenset[str] = frozenset()
    """Geometry some rank's file holds that the step leaves out, since the ranks' parts do not
    combine: `unit_grad_gram` of a multi-rank step, or a `unit_grad_sketch` not every rank
    recorded."""
    sketch_seeds: tuple[int | None, ...] = ()
    """Each rank's Omega seed of its `unit_grad_sketch` (`_sketch_seed`; None: not recorded),
    in rank order, of a step joined from several ranks' files that each hold a sketch; ()
    otherwise. Seeds that differ leave the sketch out (`unjoined`)."""
    sketch_widths: tuple[int, ...] = ()
    """Each rank's k of its `unit_grad_sketch` [U, k], as `sketch_seeds`: widths that differ
    (two Omegas) leave the sketch out too."""
    sketch_width: int | None = None
    """The k of the step's `unit_grad_sketch` [U, k] (a resumed run's steps may hold another
    k than its manifest's); None when the step holds none."""
    unjoined_why: UnjoinedGeometry | None = None
    """Why `unjoined` was left out (`unjoined_kind`); None when nothing was."""
    rank_sequences: tuple[int, ...] = ()
    """The sequences of each rank's part, in rank order, of a step joined from several ranks'
    files (rank r's are the joined step's next ones, as `seq_id` numbers them); () for a step
    of one file."""

    def __repr__(self) -> str:
        return compact_repr(self)

    @property
    def unknown_fields(self) -> frozenset[str]:
        """Arrays of the step's files that no field of this format version names (a newer
        minor version's fields): never read, so never packed either."""
        return frozenset()

    def __contains__(self, name: object) -> bool:
        return name in self.fields

    def keys(self) -> list[str]:
        """The step's fields, sorted: with `step[name]`, `dict(step)` reads every array."""
        return sorted(self.fields)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    @property
    def is_scalar(self) -> bool:
        """Whether the step has no policy batch (format 1.2): only scalars, and perhaps
        param_grad_norm. Replay has nothing to replay on such a step."""
        return "logp" not in self.fields

    @overload
    def get(self, name: str) -> torch.Tensor | None: ...

    @overload
    def get(self, name: str, default: _Default) -> torch.Tensor | _Default: ...

    def get(self, name: str, default: object = None) -> object:
        """`step[name]`, or `default` when the step did not record the field."""
        return self[name] if name in self.fields else default

    def __getitem__(self, name: str) -> torch.Tensor:
        return as_tensor(self.array(name))

    def array(self, name: str) -> np.ndarray:
        """`step[name]` as the numpy array it is read into (no torch): KeyError for a field the
        step did not record (saying so of one of its scalars), InputError if it cannot be read."""
        if name not in self.fields:
            scalar = name in self.scalars
            where = f"; {name!r} is a scalar: step.scalars[{name!r}]" if scalar else ""
            raise KeyError(
                f"step {self.step} has no field {name!r}; it has: {sorted(self.fields)}{where}"
            )
        return self._read(name)

    @abstractmethod
    def _read(self, name: str) -> np.ndarray:
        """The array `name` (a field of this step); InputError if it cannot be read."""
