"""`ArchiveIndex`: what a packed run's index says of its steps, read whole when it is opened.

Per-step facts stay columns ([S] arrays: step numbers, counts, offsets into the data datasets,
ragged shapes, present and unjoined flags, scalars), turned into a Step's set and dict only
when that step is loaded. An index that cannot be pack's refuses the archive (InputError);
`_archive_marks` marks the steps whose entries contradict each other.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stabledrl_cli._json import parse_strict
from stabledrl_cli.dump._archive_checks import CRC_ATTR, H5_ERRORS
from stabledrl_cli.dump._archive_chunks import chunk_count, written_chunks
from stabledrl_cli.dump._archive_file import ArchiveFile
from stabledrl_cli.dump._integrity import SKIPPED_KINDS, Finding
from stabledrl_cli.dump._layout import (
    RAGGED_FIELDS,
    RANK_SEQUENCES,
    STEP_COUNTS,
    TOKEN_FIELDS,
    UNJOINED,
    checksums_dataset,
    scalar_name,
)
from stabledrl_cli.dump._manifest import MANIFEST_LIMIT, check_manifest, parse_manifest
from stabledrl_cli.dump._schema import FIELDS, GRAM_KEY, SKETCH_KEY, STEP_LIMIT
from stabledrl_cli.errors import InputError, cut
from stabledrl_cli.vocab import OMEGA_KINDS

_INTEGRITY_LIMIT = 64 << 20
"""Bytes of the carried integrity findings (a run with a million stray files has ~200 MB; such
an archive is refused rather than parsed)."""


def data_dataset(name: str) -> str:
    """Where an archive stores the values of field `name` (`_layout`)."""
    if name in RAGGED_FIELDS:
        return f"ragged/{name}/data"
    return f"{'tokens' if name in TOKEN_FIELDS else 'sequences'}/{name}"


_FIELD_AT = {data_dataset(name): name for name in FIELDS}
"""The field whose values each data dataset stores (`data_dataset`)."""


def _is_finding(value: object) -> bool:
    """Whether a carried finding has Finding's fields with their types, its step a step number
    (an int in [0, STEP_LIMIT], as a step file's name says; 10**30 crashed a replay)."""
    return (
        isinstance(value, dict)
        and set(value) == {"kind", "step", "path", "message"}
        and isinstance(value["kind"], str)
        and isinstance(value["message"], str)
        and isinstance(value["path"], str | None)
        and (
            value["step"] is None
            or (type(value["step"]) is int and 0 <= value["step"] <= STEP_LIMIT)
        )
    )


CARRIED_TEXT_LIMIT = 16_384
"""Characters of a carried finding's kind, message or path kept, the rest cut (its length said): a
finding pack carries is a line, its path at most 4096 bytes (each shown as `\\xNN` at worst),
the values it names cut already; a crafted one of 30 MB made `inspect` fold it for minutes."""


class ArchiveIndex(ArchiveFile):
    """A packed run's index, read and checked (module docstring)."""

    def _refuse_held_skipped(self) -> None:
        """InputError for a carried finding that names a step the archive holds as skipped: a
        pack holds only the steps its reader did not skip, so such a finding is crafted (a
        replay would report as skipped a step it replayed)."""
        skipped = {
            f.step: f for f in self._carried if f.kind in SKIPPED_KINDS and f.step is not None
        }
        if not skipped:
            return
        held = np.isin(np.fromiter(skipped, np.int64, len(skipped)), self._numbers)
        for (step, finding), is_held in zip(skipped.items(), held, strict=True):
            if is_held:
                raise InputError(
                    f"{self.location}: corrupt run archive (integrity says step {step} was "
                    f"skipped ({finding.kind}), and the archive holds it)"
                )

    def _load(self) -> None:
        self._step_crcs: dict[str, np.ndarray] = {}
        """Per data dataset written without Fletcher32, the CRC-32 of each step's slice."""
        self._written: dict[str, np.ndarray] = {}
        """Per chunked data dataset, the indexes of its written chunks (`written_chunks`): a
        step whose slice lies in another holds no data, and the integrity check reads these
        without walking the chunk index again."""
        self._unindexed: dict[str, str] = {}
        """Per chunked data dataset whose chunk index cannot be walked, h5py's error: every
        step holding data there is unreadable, and none of its chunks is read."""
        handle, location = self._file, self.location
        manifest = parse_manifest(self._text("manifest", MANIFEST_LIMIT), f"{location} (manifest)")
        check_manifest(manifest, f"{location} (manifest)")
        self._manifest = manifest
        self.world_size = int(manifest.get("world_size") or 1)
        carried = parse_strict(self._text("integrity", _INTEGRITY_LIMIT), location, "integrity")
        if not isinstance(carried, list) or not all(_is_finding(f) for f in carried):
            raise InputError(
                f"{location}: corrupt run archive (integrity is not a list of findings)"
            )
        self._carried = [
            Finding(
                cut(f["kind"], CARRIED_TEXT_LIMIT),
                f["step"],
                None if f["path"] is None else cut(f["path"], CARRIED_TEXT_LIMIT),
                cut(f["message"], CARRIED_TEXT_LIMIT),
            )
            for f in carried
        ]
        prefetched_step = self._prefetched.arrays.get("steps/step")
        self._checksummed = (
            CRC_ATTR in self._named_dataset("steps/step").attrs
            if prefetched_step is None
            else prefetched_step[1] is not None
        )
        if not self._checksummed:
            self._load_findings.append(
                Finding(
                    "unchecked",
                    None,
                    location,
                    "archive written without index checksums (by an older stabledrl): its step "
                    "numbers, counts and scalars are read unchecked; pack the run again",
                )
            )
        self._numbers = self._index("steps/step").astype(np.int64)
        self._refuse_held_skipped()
        self._counts = {name: self._index(f"steps/{name}") for name in STEP_COUNTS}
        self._rank_sequences = (
            self._index(f"steps/{RANK_SEQUENCES}")
            if RANK_SEQUENCES in self._members("steps", required=True)
            else None
        )
        self._offsets = {
            group: self._index(f"{group}/step_offsets") for group in ("tokens", "sequences")
        }
        self._ragged = {
            name: (self._index(f"ragged/{name}/step_offsets"), self._ragged_shapes(name))
            for name in self._members("ragged")
            if name in FIELDS
        }
        # Per-step facts stay columns ([S] arrays), turned into a Step's set and dict only when
        # that step is loaded: a long archive costs a few bytes a step, not a dict a step.
        present = self._members("present", required=True)
        self._present = {
            name: self._index(f"present/{name}").astype(bool) for name in present if name in FIELDS
        }
        members = self._members(UNJOINED)
        self._unjoined = {
            name: self._index(f"{UNJOINED}/{name}").astype(bool)
            for name in members
            if name in (GRAM_KEY, SKETCH_KEY)
        }
        self._omegas = {  # why a sketch every rank recorded was left out
            kind: self._index(f"{UNJOINED}/{kind}").astype(bool)
            for kind in OMEGA_KINDS
            if kind in members
        }
        self.unknown_fields = frozenset(present).difference(FIELDS)
        """The fields of a newer minor version the archive holds (`present/NAME`): never read,
        each step's `unknown_fields` (a step's own `present/NAME` is not read either)."""
        count = len(self._numbers)
        # Which fields' data datasets the archive holds, each looked up once (a lookup by path
        # in libhdf5): the checks below and `_mark_inconsistent_steps` ask again.
        self._data_paths = {where for where in map(data_dataset, FIELDS) if where in handle}
        for name in FIELDS:
            where = data_dataset(name)
            has_data = where in self._data_paths and (
                name not in RAGGED_FIELDS or name in self._ragged
            )
            if name in self._present and self._present[name].any() and not has_data:
                raise self._no_dataset(where)
            if has_data and name not in self._present:  # its steps would read without it
                raise self._no_dataset(f"present/{name}")
        self._check_data_datasets()
        recorded = set(self._scalar_members("scalars_recorded"))
        values = set(self._scalar_members("scalars"))
        for group, missing in (
            ("scalars", recorded - values),
            ("scalars_recorded", values - recorded),
        ):
            if missing:  # a series holds both: its values, and the steps that recorded it
                raise self._no_dataset(f"{group}/{min(missing)}")
        stored = {scalar_name(name, self.format_version): name for name in values}
        self._scalar_values = {
            name: self._index(f"scalars/{stored[name]}") for name in sorted(stored)
        }
        self._scalar_recorded = {
            name: self._index(f"scalars_recorded/{stored[name]}").astype(bool)
            for name in self._scalar_values
        }
        offsets = [*self._offsets.values(), *(o for o, _ in self._ragged.values())]
        per_step = [
            *self._counts.values(),
            *self._step_crcs.values(),
            *self._present.values(),
            *self._unjoined.values(),
            *self._omegas.values(),
            *self._scalar_values.values(),
            *self._scalar_recorded.values(),
        ]
        if (
            any(o.shape != (count + 1,) for o in offsets)
            or any(c.shape != (count,) for c in per_step)
            or any(t.ndim != 2 or t.shape[0] != count for _, t in self._ragged.values())
        ):
            raise InputError(
                f"{location}: corrupt run archive (index lengths do not match the steps)"
            )
        self._check_rank_sequences()
        self._check_unjoined()
        self._index_of = {int(n): i for i, n in enumerate(self._numbers)}

    def _check_rank_sequences(self) -> None:
        """`steps/rank_sequences`, when the archive has it, splits each step's sequences over
        the run's ranks (a row of 0s: a step without a batch), else InputError; so does an
        archive of a per_rank run of several ranks without it, which a replay would read as
        global (pack writes it for every step with a batch)."""
        table = self._rank_sequences
        if table is None:
            if (
                self._manifest.get("loss_norm") == "per_rank"
                and self.world_size > 1
                and self._counts["num_sequences"].any()
            ):
                raise InputError(
                    f"{self.location}: corrupt run archive (no steps/{RANK_SEQUENCES}: a "
                    f"loss_norm per_rank run of {self.world_size} ranks replays each rank's "
                    "sequences alone)"
                )
            return
        sequences = self._counts["num_sequences"]
        sums = table.sum(axis=1)  # [S, R]: `_index` checked its dimensions
        if (
            table.shape != (len(self._numbers), self.world_size)
            or self.world_size < 2
            or (table < 0).any()
            or ((sums != sequences) & (sums != 0)).any()
        ):
            raise InputError(
                f"{self.location}: corrupt run archive (steps/{RANK_SEQUENCES} does not split "
                f"each step's sequences over the run's {self.world_size} ranks)"
            )

    def _check_unjoined(self) -> None:
        """`unjoined/NAME` flags only steps of several ranks' batches that lack NAME (the join
        left it out), else InputError."""
        batch = self._present.get("logp", np.zeros(len(self._numbers), dtype=bool))
        for name, flags in self._unjoined.items():
            lacking = batch & ~self._present.get(name, np.zeros_like(flags))
            if flags.any() and (self.world_size < 2 or (flags & ~lacking).any()):
                raise InputError(
                    f"{self.location}: corrupt run archive ({UNJOINED}/{name} flags a step "
                    f"that holds {name} or no batch of {self.world_size} ranks)"
                )
        left_out = self._unjoined.get(SKETCH_KEY, np.zeros(len(self._numbers), dtype=bool))
        reasons = np.zeros(len(self._numbers), dtype=np.int64)
        for kind, flags in self._omegas.items():
            reasons += flags
            if (flags & ~left_out).any() or (reasons > 1).any():
                raise InputError(
                    f"{self.location}: corrupt run archive ({UNJOINED}/{kind} flags a step "
                    f"whose {SKETCH_KEY} is not flagged left out, or that another flag gives "
                    "another reason for)"
                )

    def _ragged_shapes(self, name: str) -> np.ndarray:
        """ragged/NAME/shape ([S, ndim]: `_index`), its columns the field's dimensions, else
        InputError (the archive refused): every step of the field would read in another shape."""
        shapes = self._index(f"ragged/{name}/shape")
        ndim = FIELDS[name].ndim
        if shapes.shape[1] != ndim:
            raise InputError(
                f"{self.location}: corrupt run archive (ragged/{name}/shape is "
                f"{shapes.dtype.name} {list(shapes.shape)}, expected a [steps, {ndim}] array: "
                f"{name} has {ndim} dimension{'s' if ndim > 1 else ''})"
            )
        return shapes

    def _check_data_datasets(self) -> None:
        """Each field's data dataset, if the archive has one, is flat (1-D), holds the
        field's dtype, in either byte order (`_slice` hands out the native one), and is
        checked: by Fletcher32, or by its `checksums/` dataset (read here); else the archive is
        refused (InputError): every step of the field would be unreadable, or read unchecked."""
        for name, spec in FIELDS.items():
            where = data_dataset(name)
            if where not in self._data_paths:
                continue
            dataset = self._dataset(where)
            self._require_type(where, dataset.dtype, dataset.shape, spec.dtypes, 1)
            try:
                written = written_chunks(dataset)
            except H5_ERRORS as exc:
                self._unindexed[where] = str(exc)
                written = None
            if written is not None:
                self._written[where] = written
            crcs = checksums_dataset(where)
            if crcs in self._file:
                self._step_crcs[where] = self._index(crcs)
            elif not dataset.fletcher32:
                raise InputError(
                    f"{self.location}: corrupt run archive ({where} has no checksum: neither "
                    f"HDF5's Fletcher32 nor a {crcs} dataset)"
                )

    def _offsets_of(self, name: str) -> np.ndarray | None:
        """The step offsets [S+1] into data dataset `name`, or None (not a data dataset)."""
        parts = name.split("/")
        if len(parts) < 2 or parts[-1] in ("step_offsets", "shape"):
            return None
        if parts[0] in ("tokens", "sequences"):
            return self._offsets[parts[0]]
        if parts[0] == "ragged" and parts[-1] == "data" and parts[1] in self._ragged:
            return self._ragged[parts[1]][0]
        return None

    def _unwritten(self, where: str, offsets: np.ndarray) -> np.ndarray:
        """Which steps' slices of data dataset `where` (by its step `offsets`) span a chunk
        never written: they hold no data (the fill value, unchecked)."""
        written = self._written.get(where)
        begin, end = offsets[:-1].astype(np.int64), offsets[1:].astype(np.int64)
        dataset = self._dataset(where)
        if written is None or len(written) == chunk_count(dataset):
            return np.zeros(len(begin), dtype=bool)
        size = int(dataset.chunks[0])
        first, last = begin // size, (end - 1) // size
        held = np.searchsorted(written, last, "right") - np.searchsorted(written, first, "left")
        unwritten: np.ndarray = (end > begin) & (held != last - first + 1)
        return unwritten

    def _holds(self, where: str, offsets: np.ndarray) -> np.ndarray:
        """Which steps hold data in data dataset `where` (by its step `offsets`): those with its
        field and a slice that is not empty. Another step's slice, if any, holds the fill value
        pack left there, which no read of that step touches: a bad byte in it loses no step."""
        none = np.zeros(len(offsets) - 1, dtype=bool)
        holds: np.ndarray = self._present.get(_FIELD_AT.get(where, ""), none) & (
            offsets[1:] > offsets[:-1]
        )
        return holds

    def _fields_of(self, index: int) -> set[str]:
        return {name for name, mask in self._present.items() if mask[index]}

    def _scalars_of(self, index: int) -> dict[str, float]:
        return {
            name: float(values[index])
            for name, values in self._scalar_values.items()
            if self._scalar_recorded[name][index]
        }

    def _ranks_of(self, index: int) -> tuple[int, ...]:
        """`Step.rank_sequences` of the step at `index`: () without the table, or for a step
        without a batch."""
        if self._rank_sequences is None or not self._rank_sequences[index].any():
            return ()
        return tuple(int(n) for n in self._rank_sequences[index])

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest
