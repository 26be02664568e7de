"""A step of a run directory, `DirectoryStep`, joined from its ranks' files (`joined_step`).

Multi-rank runs (world_size > 1): a step joins the ranks' files in rank order. Token arrays and
per-sequence arrays are concatenated; `seq_id` of rank r is offset by the number of sequences
of ranks < r, and `micro_batch` by (max micro_batch + 1) of ranks < r, so both stay distinct.
`group_id` is offset the same way when the manifest's group_ids is "per_rank" (the default),
and left alone when it is "global" (ids shared by all ranks). An offset id outside its rank's
range (a negative one, a seq_id past the rank's sequences) would be another rank's: InputError.
With global ids, a group the ranks marked `group_split` is whole in the joined step when it
holds as many members as the trainer generated for each prompt (the manifest's
`meta.num_generations`): the join clears its mark.
`unit_grad_sketch` rows are concatenated (float16 parts are scaled to float32 first); a
`token_ids` [N, k] whose k differs between ranks cannot be joined (InputError);
`unit_grad_gram` is left out (the cross-rank entries were never recorded), and so is a
`unit_grad_sketch` some ranks did not record (a sketch of part of the step), or recorded with
another seed (`_sketch_seed`) or width k (another Omega); a rank's part with no sequence has no
row, so its k says nothing (of token_ids or a sketch): it joins whatever its k; `param_grad_norm`
is rank 0's. Scalars: `nonfinite` sums the ranks' non-finite batch entries, plus the joined
`loss` and `grad_norm` if not finite (one each, not one a rank), `reward_mean` weighted by the
rewards each rank's mean is over (`_scored_rewards`: those not NaN; a file without the count,
no `reward` or an older recorder's, by its sequences; a rank's NaN mean, none of its rewards
scored, left out, as a rank's part with no sequence, which has no mean, and a rank that logged
none), `reward_count` summed over the ranks (a rank that logged none, where another did: the
rewards its mean in the join is over), `loss` averaged over the ranks
that logged one and, in a batch, those of an empty part that logged none (its loss 0: the
all-reduce averages its zero gradient in), `loss_aux` over the same ranks (0 where one logged
none), any other scalar the lowest rank's that logged it (rank 0's when it did: a grad_norm is
every rank's after the all-reduce). A step where some rank recorded no batch (a scalar step,
format 1.2) joins as a scalar step: a batch with a rank missing is not the step's batch; so
does one where no rank's batch holds a token (each part empty), which one rank's file could
not be. A joined batch keeps each rank's number of sequences (`rank_sequences`), for a replay
that normalises each rank's part alone (`loss_norm`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stabledrl_cli.dump._integrity import StepReadError
from stabledrl_cli.dump._schema import (
    BATCH_FIELDS,
    GRAM_KEY,
    LOSS_AUX,
    REWARD_COUNT,
    SKETCH_KEY,
    SKETCH_SCALE_KEY,
    nonfinite_norms,
)
from stabledrl_cli.dump._step import Step, omegas_differ, unjoined_kind
from stabledrl_cli.dump._step_record import Checked, HeaderRecord
from stabledrl_cli.dump._stfile import FileKey, StepHeader
from stabledrl_cli.errors import InputError
from stabledrl_cli.vocab import GroupIds


def _merge_scalars(
    parts: list[dict[str, float]], weights: list[int], sequences: list[int]
) -> dict[str, float]:
    """Joins the ranks' scalars of one step, `weights` each rank's count for its reward_mean,
    `sequences` each rank's part's (all 0 for a scalar step) (rule in the module docstring)."""
    names = sorted(set().union(*parts))  # each scalar the lowest rank's that logged it
    merged = {name: next(p[name] for p in parts if name in p) for name in names}
    merged.pop(SKETCH_SCALE_KEY, None)  # joined sketches are float32, their scales applied
    logged = [p for p in parts if "loss" in p]
    if logged:
        # an empty part's rank adds a zero gradient to the all-reduce's mean: a loss of 0
        idle = sum(1 for p, n in zip(parts, sequences, strict=True) if n == 0 and "loss" not in p)
        zeros = [0.0] * idle if any(sequences) else []
        merged["loss"] = float(np.mean([p["loss"] for p in logged] + zeros))
        if any(LOSS_AUX in p for p in logged):  # the loss's part outside the policy, alike
            merged[LOSS_AUX] = float(np.mean([p.get(LOSS_AUX, 0.0) for p in logged] + zeros))
    if all("nonfinite" in p for p in parts):
        # each rank's count holds its own loss and grad_norm; the joined step holds one of each
        entries = sum(p["nonfinite"] - nonfinite_norms(p) for p in parts)
        merged["nonfinite"] = float(entries + nonfinite_norms(merged))
    # a rank whose mean is NaN, or with none over no reward (an empty part), scored none of
    # its sequences: the others' mean stands, as it does for a rank that logged none
    given = [
        p.get("reward_mean", math.nan if n == 0 else None)
        for p, n in zip(parts, weights, strict=True)
    ]
    scored = [(m, n) for m, n in zip(given, weights, strict=True) if m is not None]
    if scored and sum(weights) > 0:
        kept = [(m, n) for m, n in scored if not math.isnan(m)]
        total = sum(n for _, n in kept)
        merged["reward_mean"] = (
            float(sum(mean * n for mean, n in kept) / total) if total > 0 else math.nan
        )
    if any(REWARD_COUNT in p for p in parts):  # the rewards the joined mean is over
        merged[REWARD_COUNT] = float(
            sum(
                p.get(REWARD_COUNT, n if m is not None and not math.isnan(m) else 0)
                for p, m, n in zip(parts, given, weights, strict=True)
            )
        )
    return merged


@dataclass(eq=False, kw_only=True, repr=False)  # Step's repr
class DirectoryStep(Step):
    """A Step of a run directory: `step[name]` reads the rank files (joined, module docstring)."""

    paths: list[Path] = field(repr=False)
    """One file per rank, in rank order."""
    records: list[HeaderRecord] = field(repr=False)
    """Per rank, what its file's header says."""
    file_keys: list[FileKey] = field(repr=False)
    """Per rank, the key of the file its record was checked from."""
    header_crcs: list[int] = field(repr=False)
    """Per rank, the CRC of the header bytes checked (a later read of the file skips its
    checks when they are the same bytes)."""
    files: list[StepHeader | None] = field(repr=False)
    """Per rank, the file's header and data buffer once read (None until then)."""
    loader: Callable[[Path, int], StepHeader] = field(repr=False)
    """(file, its header CRC) -> the file read whole: `DirectoryRun._load` of the run."""
    named: Callable[[Path], str] = field(default=str, repr=False)
    """How messages name a file: `DirectoryRun.named` of the run."""
    group_ids: GroupIds = field(default="per_rank", repr=False)
    group_size: int | None = field(default=None, repr=False)
    """The members of a whole prompt group (`Run.group_size`), for a join of global ids."""
    handed: set[tuple[int, str]] = field(default_factory=set, repr=False)
    """(rank, name) of the arrays handed out as views of the rank's buffer; asking for one
    again reads the file anew (a caller may have changed the first in place)."""

    @property
    def unknown_fields(self) -> frozenset[str]:
        return frozenset().union(*(record.unknown_fields for record in self.records))

    def _read(self, name: str) -> np.ndarray:
        if len(self.paths) == 1:
            return self._read_rank(0, name)
        joined = self._joined(name)
        if name == "group_split" and self.group_ids == "global" and self.group_size:
            return self._whole_groups_cleared(joined)
        return joined

    def _whole_groups_cleared(self, split: np.ndarray) -> np.ndarray:
        """`split` with the marks of the groups whose `group_size` members are all here
        cleared: the ranks each held part of them, the joined step holds them whole."""
        if "group_id" not in self.fields:
            return split
        # global ids join as they are: read without handing them out (no file read again)
        ids = np.concatenate([self._rank_array(r, "group_id") for r in range(len(self.paths))])
        _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
        whole = counts[inverse.reshape(-1)] == self.group_size
        cleared: np.ndarray = np.where(whole, 0, split).astype(split.dtype)
        return cleared

    def _file(self, rank: int) -> StepHeader:
        """The rank's file read whole: the one the record was checked from."""
        loaded = self.files[rank]
        if loaded is None:
            path = self.paths[rank]
            try:
                loaded = self.loader(path, self.header_crcs[rank])
            except StepReadError as exc:
                raise InputError(f"{self.named(path)}: cannot read it: {exc}") from None
            if loaded.key != self.file_keys[rank] or loaded.header_crc != self.header_crcs[rank]:
                raise InputError(
                    f"{self.named(path)}: changed since it was checked; open the run again"
                )
            self.files[rank] = loaded
        return loaded

    def _read_rank(self, rank: int, name: str) -> np.ndarray:
        if (rank, name) in self.handed:
            self.files[rank] = None
            self.handed = {(r, n) for r, n in self.handed if r != rank}
        self.handed.add((rank, name))
        return self._rank_array(rank, name)

    def _rank_array(self, rank: int, name: str) -> np.ndarray:
        """The rank's array, a view of its file's buffer."""
        try:
            return self._file(rank).array(name)
        except ValueError as exc:  # offsets past the buffer: the file is not what was checked
            raise InputError(f"{self.named(self.paths[rank])}: cannot read {name}: {exc}") from None

    def _joined(self, name: str) -> np.ndarray:
        if name == "param_grad_norm":
            return self._read_rank(0, name)
        parts = [self._read_rank(rank, name) for rank in range(len(self.paths))]
        if name == "seq_id":
            sequences = [r.num_sequences for r in self.records]
            offsets = np.cumsum([0, *sequences])
            parts = [
                self._shifted(p, int(offsets[r]), name, r, sequences[r])
                for r, p in enumerate(parts)
            ]
        elif name == "micro_batch" or (name == "group_id" and self.group_ids == "per_rank"):
            sizes = [int(p.max()) + 1 if p.size else 0 for p in parts]
            offsets = np.cumsum([0, *sizes])
            parts = [self._shifted(p, int(offsets[r]), name, r) for r, p in enumerate(parts)]
        elif name == SKETCH_KEY and any(SKETCH_SCALE_KEY in r.scalars for r in self.records):
            # each rank's scale multiplies its part, float16 or float32, as `decode_geometry`
            # reads a one-rank step; the joined sketch is float32 and has no scale
            with np.errstate(all="ignore"):  # a scale that overflows gives inf, as in torch
                parts = [
                    p.astype(np.float32) * np.float32(r.scalars.get(SKETCH_SCALE_KEY, 1.0))
                    for p, r in zip(parts, self.records, strict=True)
                ]
        first = next((rank for rank, part in enumerate(parts) if len(part)), 0)
        width = parts[first].shape[1:]
        for rank, part in enumerate(parts):
            if not len(part):  # an empty part: its width, of no row, says nothing
                parts[rank] = part.reshape(0, *width)
            elif part.shape[1:] != width:  # each rank's Recorder checks its own only
                raise InputError(
                    f"{self.named(self.paths[first])}: cannot join the ranks' {name}: rank "
                    f"{first}'s has shape {list(parts[first].shape)}, rank {rank}'s "
                    f"{list(part.shape)}"
                )
        return np.concatenate(parts)

    def _shifted(
        self, ids: np.ndarray, offset: int, name: str, rank: int, limit: int | None = None
    ) -> np.ndarray:
        """Rank `rank`'s ids numbered after the ranks before it (`offset` added, in their
        dtype); InputError when the numbers outgrow that dtype, when an id is negative (it
        would be another rank's), or, given the rank's `limit` sequences, when its ids do not
        reach up to `limit` - 1 exactly (past it: another rank's; short of it: a sequence no
        entry is of; no ids at all when it has sequences)."""
        if not ids.size and not limit:
            return ids
        low, high = (int(ids.min()), int(ids.max())) if ids.size else (0, -1)
        if low < 0 or (limit is not None and high != limit - 1):
            bound = (
                "ids are >= 0" if limit is None else f"its {limit} sequences are 0 to {limit - 1}"
            )
            held = f"lie in [{low}, {high}]" if ids.size else "has no entry"
            raise InputError(
                f"{self.named(self.paths[rank])}: cannot join the ranks' {name}: rank {rank}'s "
                f"{held} ({bound})"
            )
        if high + offset > np.iinfo(ids.dtype).max:
            raise InputError(
                f"{self.named(self.paths[0])}: cannot join the ranks' {name}: numbered across "
                f"{len(self.paths)} ranks, its ids pass the {ids.dtype} range"
            )
        shifted: np.ndarray = ids + ids.dtype.type(offset)
        return shifted


def joined_step(
    n: int,
    paths: list[Path],
    checked: list[tuple[HeaderRecord, Checked, StepHeader | None]],
    *,
    loader: Callable[[Path, int], StepHeader],
    named: Callable[[Path], str],
    group_ids: GroupIds,
    group_size: int | None,
) -> DirectoryStep:
    """Step `n` of the ranks' files `paths` (one a rank, in rank order), from each one's
    (record, check, file read by the check or None), joined (module docstring); `loader`,
    `named`, `group_ids` and `group_size` as `DirectoryStep` keeps them."""
    records = [record for record, _, _ in checked]
    fields = set(records[0].fields).intersection(*(r.fields for r in records[1:]))
    held = set().union(*(r.fields for r in records)) & {GRAM_KEY, SKETCH_KEY}
    sketched = SKETCH_KEY in fields
    seeds = tuple(r.sketch_seed for r in records) if sketched else ()
    widths = tuple(r.sketch_width or 0 for r in records) if sketched else ()
    # a Gram of each rank never combines; a sketch is the step's only with every rank's
    # rows, drawn with one Omega (one seed, one k): an empty part's [0, k] has no row
    drawn = [r for r in records if r.num_tokens] or records
    omega = (
        omegas_differ([r.sketch_seed for r in drawn], [r.sketch_width or 0 for r in drawn])
        if sketched
        else None
    )
    differ = {SKETCH_KEY} if omega else set()
    unjoined = frozenset((held - fields) | (held & {GRAM_KEY}) | differ)
    unjoined = unjoined if len(records) > 1 else frozenset()
    fields -= unjoined
    # else a scalar step (module docstring)
    batch = "logp" in fields and any(r.num_tokens for r in records)
    sequences = [r.num_sequences if batch else 0 for r in records]
    weights = [r.reward_weight if batch else 0 for r in records]
    parts = [r.scalars for r in records]
    scalars = parts[0] if len(records) == 1 else _merge_scalars(parts, weights, sequences)
    return DirectoryStep(
        step=n,
        scalars=scalars,
        fields=fields if batch else fields - set(BATCH_FIELDS),
        num_tokens=sum(r.num_tokens for r in records) if batch else 0,
        num_sequences=sum(sequences),
        num_scored_tokens=sum(r.num_scored_tokens for r in records) if batch else 0,
        unjoined=unjoined if batch else frozenset(),
        sketch_seeds=seeds if len(records) > 1 and batch else (),
        sketch_widths=widths if len(records) > 1 and batch else (),
        sketch_width=drawn[0].sketch_width if SKETCH_KEY in fields and batch else None,
        unjoined_why=unjoined_kind(unjoined, omega=omega) if batch else None,
        rank_sequences=tuple(sequences) if len(records) > 1 and batch else (),
        paths=paths,
        records=records,
        file_keys=[check.key for _, check, _ in checked],
        header_crcs=[check.header_crc for _, check, _ in checked],
        files=[loaded for _, _, loaded in checked],
        loader=loader,
        named=named,
        group_ids=group_ids,
        group_size=group_size,
    )
