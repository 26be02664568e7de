"""`ArchiveMarks`: the steps of a packed run whose index entries contradict each other or the
data, marked unreadable when it is opened (each a finding), as a step file whose header says
the same is."""

from __future__ import annotations

import numpy as np

from stabledrl_cli.dump._archive_index import ArchiveIndex, data_dataset
from stabledrl_cli.dump._integrity import Finding, StepReadError
from stabledrl_cli.dump._layout import SEQUENCE_FIELDS, TOKEN_FIELDS
from stabledrl_cli.dump._schema import BATCH_FIELDS, FIELDS


class ArchiveMarks(ArchiveIndex):
    """A packed run's index, its inconsistent steps marked (module docstring)."""

    def _load(self) -> None:
        """The index (`ArchiveIndex`), then its inconsistent steps marked."""
        super()._load()
        self._bad: dict[int, StepReadError] = {}  # step index -> why it cannot be read
        self._mark_inconsistent_steps()

    def _mark_inconsistent_steps(self) -> None:
        """Marks the steps whose index entries disagree with each other or with the data
        datasets (a slice out of range, counts that disagree with offsets, a ragged shape that
        does not match its slice, a repeated, negative or descending step number, scored tokens
        past the tokens, a step scalar that is not the step's number, a batch without one of its
        required fields, a step without a batch that counts tokens, a batch of no token: what
        a step file's header may not say either); each is a finding."""
        count = len(self._numbers)
        reasons: dict[int, str] = {}

        def mark(bad: np.ndarray, why: str) -> None:
            for index in np.flatnonzero(bad):
                reasons.setdefault(int(index), why)

        if self._all_bad is not None:
            mark(np.ones(count, dtype=bool), self._all_bad)
        _, first = np.unique(self._numbers, return_index=True)
        unique = np.zeros(count, dtype=bool)
        unique[first] = True
        mark(~unique, "its step number repeats an earlier step's")
        mark(self._numbers < 0, "a negative step number")
        below = np.zeros(count, dtype=bool)  # pack writes the steps ascending
        below[1:] = self._numbers[1:] < np.maximum.accumulate(self._numbers)[:-1]
        mark(below, "its step number is below an earlier step's")
        tokens, scored = self._counts["num_tokens"], self._counts["num_scored_tokens"]
        for at in np.flatnonzero((scored < 0) | (scored > tokens)):
            reasons.setdefault(int(at), f"{scored[at]} scored tokens of {tokens[at]}")
        if "step" in self._scalar_values:
            said = self._scalar_values["step"]
            for at in np.flatnonzero(
                self._scalar_recorded["step"] & (said != self._numbers.astype(np.float64))
            ):
                reasons.setdefault(int(at), f"its step scalar says {said[at]:g}")
        absent = np.zeros(count, dtype=bool)
        batch = np.zeros(count, dtype=bool)
        for name in BATCH_FIELDS:
            batch |= self._present.get(name, absent)
        for name, spec in FIELDS.items():
            if spec.required:
                mark(
                    batch & ~self._present.get(name, absent),
                    f"required field {name} is missing",
                )
        counted = (tokens != 0) | (self._counts["num_sequences"] != 0) | (scored != 0)
        mark(~batch & counted, "a step without a batch counts tokens")
        mark(batch & (tokens == 0), "the step has no tokens")
        for group, names, counts in (
            ("tokens", TOKEN_FIELDS, self._counts["num_tokens"]),
            ("sequences", SEQUENCE_FIELDS, self._counts["num_sequences"]),
        ):
            offsets = self._offsets[group].astype(np.int64)
            lengths = [
                self._dataset(f"{group}/{n}").shape[0]
                for n in names
                if f"{group}/{n}" in self._data_paths
            ]
            # Without a dataset of the group (no per-sequence field but seq_id) nothing is read
            # from its range: the offsets only have to agree with the counts.
            end = min(lengths) if lengths else int(offsets[-1])
            mark(
                (offsets[:-1] < 0) | (offsets[1:] > end) | (np.diff(offsets) != counts),
                f"its {group} offsets disagree with its counts or the data",
            )
        for name, (offsets, shapes) in self._ragged.items():
            offsets = offsets.astype(np.int64)
            end = self._dataset(f"ragged/{name}/data").shape[0]
            sizes = np.prod(np.maximum(shapes, 0), axis=1, dtype=np.float64)
            present = self._present.get(name, np.zeros(count, dtype=bool))
            mark(
                (offsets[:-1] < 0)
                | (offsets[1:] > end)
                | (np.diff(offsets) < 0)
                | (present & ((shapes < 0).any(axis=1) | (sizes != np.diff(offsets)))),
                f"its {name} shape does not match its data",
            )
            for column, dim in enumerate(FIELDS[name].dims):
                if dim == "units":  # T, or N for geometry taken per sequence
                    mark(
                        present
                        & (shapes[:, column] != self._counts["num_tokens"])
                        & (shapes[:, column] != self._counts["num_sequences"]),
                        f"its {name} shape disagrees with its tokens and sequences counts",
                    )
                elif dim is not None:
                    mark(
                        present & (shapes[:, column] != self._counts[f"num_{dim}"]),
                        f"its {name} shape disagrees with its {dim} count",
                    )
            if FIELDS[name].per == "unit_pairs":
                mark(present & (shapes[:, 0] != shapes[:, 1]), f"its {name} is not square")
        for name in FIELDS:
            where = data_dataset(name)
            if where in self._written and (starts := self._offsets_of(where)) is not None:
                mark(
                    self._present.get(name, absent) & self._unwritten(where, starts),
                    f"its {name} lies in chunks of {where} never written",
                )
            if where in self._unindexed and (starts := self._offsets_of(where)) is not None:
                mark(
                    self._holds(where, starts),
                    f"its {name} lies in {where}, whose chunk index cannot be read "
                    f"({self._unindexed[where]})",
                )
        for index, why in sorted(reasons.items()):
            self._bad[index] = StepReadError("unreadable", why)
            if self._all_bad is None:
                self._load_findings.append(
                    Finding(
                        "unreadable",
                        int(self._numbers[index]),
                        self.location,
                        f"step {int(self._numbers[index])}: {why}",
                    )
                )
