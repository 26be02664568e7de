"""`Packer`: the steps of a pack, added one by one, and the archive's per-step index written
at the end."""

from __future__ import annotations

from dataclasses import dataclass, field

import h5py
import numpy as np

from stabledrl_cli.dump._archive_checks import CRC_ATTR, index_crc
from stabledrl_cli.dump._layout import (
    RAGGED_FIELDS,
    RANK_SEQUENCES,
    SEQUENCE_FIELDS,
    STEP_COUNTS,
    TOKEN_FIELDS,
    UNJOINED,
    checksums_dataset,
    scalar_dataset_name,
)
from stabledrl_cli.dump._pack_column import Column, column_filters
from stabledrl_cli.dump._schema import FIELDS
from stabledrl_cli.dump._step import Step
from stabledrl_cli.errors import InputError, quoted
from stabledrl_cli.vocab import OMEGA_KINDS, PackCompression, UnjoinedGeometry


def index_dataset(group: h5py.Group, name: str, values: np.ndarray) -> None:
    """An index dataset (read whole by readers) with its checksum attribute."""
    dataset = group.create_dataset(name, data=values)
    dataset.attrs[CRC_ATTR] = index_crc(values)


@dataclass
class Packer:
    """Per-step bookkeeping of one pack, written as [S] datasets at the end."""

    handle: h5py.File
    compression: PackCompression
    numbers: list[int] = field(default_factory=list)
    counts: dict[str, list[int]] = field(default_factory=lambda: {n: [] for n in STEP_COUNTS})
    scalars: list[dict[str, float]] = field(default_factory=list)
    fields: list[set[str]] = field(default_factory=list)
    rank_sequences: list[tuple[int, ...]] = field(default_factory=list)
    unjoined: list[frozenset[str]] = field(default_factory=list)
    """Each step's `Step.unjoined`: geometry of its ranks that the join left out."""
    unjoined_why: list[UnjoinedGeometry | None] = field(default_factory=list)
    """Each step's `Step.unjoined_why`."""
    unknown_fields: set[str] = field(default_factory=set)
    """Arrays of the packed steps that no field of this format version names: not packed."""
    offsets: dict[str, list[int]] = field(default_factory=lambda: {"tokens": [0], "sequences": [0]})
    columns: dict[str, Column] = field(default_factory=dict)
    ragged_offsets: dict[str, list[int]] = field(default_factory=dict)
    ragged_shapes: dict[str, list[tuple[int, ...] | None]] = field(default_factory=dict)

    def _column(
        self, group: str, name: str, first: np.ndarray, offsets: list[int], field_name: str
    ) -> Column:
        """The dataset `group/name` of the step's field `field_name`, created for its `first`
        values (their dtype and filters) after the fill entries of the earlier steps (`offsets`
        into it)."""
        key = f"{group}/{name}"
        if key not in self.columns:
            self.columns[key] = Column(
                self.handle.require_group(group),
                name,
                first,
                offsets,
                column_filters(self.compression, first),
                field_name,
            )
        return self.columns[key]

    def add(self, step: Step, where: str) -> None:
        at = f"{where}: step {step.step}"
        for name in step.scalars:
            if not name or "\x00" in name:  # HDF5 ends a name at a NUL and has no empty one
                raise InputError(
                    f"{at}: scalar {quoted(name)} has no HDF5 name "
                    "(empty, or holding a NUL character); cannot pack it"
                )
        arrays = {name: step.array(name) for name in sorted(step.fields)}
        tokens, sequences = step.num_tokens, step.num_sequences
        for group, names, count in (
            ("tokens", TOKEN_FIELDS, tokens),
            ("sequences", SEQUENCE_FIELDS, sequences),
        ):
            offsets = self.offsets[group]
            for name in names:
                array = arrays.get(name)
                if array is not None and array.shape != (count,):
                    raise InputError(
                        f"{at}: {name} has shape {list(array.shape)}, "
                        f"expected [{count}]; cannot pack it"
                    )
                if array is not None:
                    self._column(group, name, array, offsets, name).append(array, count, at)
                elif f"{group}/{name}" in self.columns:  # an optional field this step lacks
                    self.columns[f"{group}/{name}"].append(None, count, at)
            offsets.append(offsets[-1] + count)
        for name in RAGGED_FIELDS:
            array = arrays.get(name)
            if array is None and name not in self.ragged_offsets:
                continue
            if array is not None and name not in self.ragged_offsets:
                # The first step with it: earlier steps lack it.
                self.ragged_offsets[name] = [0] * (len(self.numbers) + 1)
                self.ragged_shapes[name] = [None] * len(self.numbers)
                self._column(f"ragged/{name}", "data", array, self.ragged_offsets[name], name)
            size = 0 if array is None else array.size
            flat = None if array is None else array.reshape(-1)
            self.columns[f"ragged/{name}/data"].append(flat, size, at)
            self.ragged_offsets[name].append(self.ragged_offsets[name][-1] + size)
            self.ragged_shapes[name].append(None if array is None else array.shape)
        self.numbers.append(step.step)
        for name, value in zip(
            STEP_COUNTS,
            (tokens, sequences, step.num_scored_tokens),
            strict=True,
        ):
            self.counts[name].append(int(value))
        self.scalars.append(dict(step.scalars))
        self.fields.append(set(step.fields))
        self.rank_sequences.append(step.rank_sequences)
        self.unjoined.append(step.unjoined)
        self.unjoined_why.append(step.unjoined_why)
        self.unknown_fields |= step.unknown_fields

    def finish(self) -> None:
        handle, count = self.handle, len(self.numbers)
        for column in self.columns.values():
            column.finish()
        steps = handle.require_group("steps")
        index_dataset(steps, "step", np.array(self.numbers, dtype=np.int64))
        for name, values in self.counts.items():
            index_dataset(steps, name, np.array(values, dtype=np.int64))
        ranks = max(map(len, self.rank_sequences), default=0)
        if ranks:  # steps joined from several ranks: each rank's sequences (0s: no batch)
            table = np.zeros((count, ranks), dtype=np.int64)
            for i, sizes in enumerate(self.rank_sequences):
                table[i, : len(sizes)] = sizes
            index_dataset(steps, RANK_SEQUENCES, table)
        for group, offsets in self.offsets.items():
            index_dataset(
                handle.require_group(group), "step_offsets", np.array(offsets, dtype=np.int64)
            )
        for name, offsets in self.ragged_offsets.items():
            group = handle.require_group(f"ragged/{name}")
            index_dataset(group, "step_offsets", np.array(offsets, dtype=np.int64))
            shapes = self.ragged_shapes[name]
            ndim = max(len(s) for s in shapes if s is not None)
            table = np.zeros((count, ndim), dtype=np.int64)
            for i, shape in enumerate(shapes):
                if shape is not None:
                    table[i] = shape
            index_dataset(group, "shape", table)
        present = handle.require_group("present")
        for name in FIELDS:
            flags = np.array([name in f for f in self.fields], dtype=np.uint8)
            if flags.any():
                index_dataset(present, name, flags)
        for name in self.unjoined_steps:
            flags = np.array([name in u for u in self.unjoined], dtype=np.uint8)
            index_dataset(handle.require_group(UNJOINED), name, flags)
        for kind in OMEGA_KINDS:  # why a sketch every rank recorded was left out
            flags = np.array([why == kind for why in self.unjoined_why], dtype=np.uint8)
            if flags.any():
                index_dataset(handle.require_group(UNJOINED), kind, flags)
        values, recorded = handle.require_group("scalars"), handle.require_group("scalars_recorded")
        for name in sorted(set().union(*self.scalars)):
            stored = scalar_dataset_name(name)
            index_dataset(
                values,
                stored,
                np.array([s.get(name, np.nan) for s in self.scalars], dtype=np.float64),
            )
            index_dataset(
                recorded, stored, np.array([name in s for s in self.scalars], dtype=np.uint8)
            )
        for where, column in self.columns.items():
            if column.crcs is not None:
                group, name = checksums_dataset(where).rsplit("/", 1)
                index_dataset(
                    handle.require_group(group), name, np.array(column.crcs, dtype=np.uint32)
                )

    @property
    def unjoined_steps(self) -> dict[str, int]:
        """Geometry the ranks' join left out, by name, with the steps that left it out."""
        names = sorted(set().union(*self.unjoined))
        return {name: sum(name in u for u in self.unjoined) for name in names}

    @property
    def checksummed(self) -> bool:
        """Whether some data dataset has per-step CRC-32s (`checksums/`) instead of Fletcher32."""
        return any(column.crcs is not None for column in self.columns.values())
