"""The HDF5 archive of a run (`stabledrl pack`): its layout, shared by the packer and reader.

Layout (every data dataset, `tokens/NAME`, `sequences/NAME` and `ragged/NAME/data`, chunked
and compressed as `FILTERS` says and checked by HDF5's Fletcher32 filter, or, written without
it, by a CRC-32 of each step's slice; every other dataset stored whole, contiguous, and checked
by its `crc32` attribute, `_archive_checks`):
    attrs: kind = "stabledrl-run", format_version, tool_version, source (the packed path)
    manifest                 the run's manifest.json as one JSON string dataset (an HDF5
                             attribute fails past 64 KiB, a manifest with param_names can be
                             larger)
    integrity                JSON string: the source's integrity findings, carried over
    steps/step               int64 [S]       step numbers, ascending
    steps/num_tokens         int64 [S]       T of each step (also num_sequences,
                             num_scored_tokens)
    steps/rank_sequences     int64 [S, R]    a run of R > 1 ranks: the sequences of each
                             rank's part of each step (0s for a step without a batch), so a
                             replay can normalise each rank's part alone (loss_norm
                             "per_rank"); absent in an archive of one rank, or an older one
    scalars/NAME             float64 [S]     one per-step scalar (NaN where not recorded)
    scalars_recorded/NAME    uint8 [S]       1 where the step recorded it (a recorded NaN
                             is a fact, not a gap)
    tokens/step_offsets      int64 [S+1]     step i's tokens are [off[i], off[i+1])
    tokens/NAME              [sum T]         per-token fields, concatenated
    sequences/step_offsets   int64 [S+1]     the same for per-sequence [N] fields (group_id,
    sequences/NAME           [sum N]         reward, from 1.1 micro_batch, group_split, from
                                             1.3 token_count)
    ragged/NAME/data         flat            fields of other shapes (unit_grad_gram [U, U],
    ragged/NAME/step_offsets int64 [S+1]     unit_grad_sketch [U, k], token_ids [N, k],
    ragged/NAME/shape        int64 [S, ndim] param_grad_norm [P]), each with its own index
    present/NAME             uint8 [S]       1 where the step has the field
    unjoined/NAME            uint8 [S]       a run of several ranks: 1 where the ranks
                             recorded geometry NAME (unit_grad_gram, unit_grad_sketch) that
                             their join leaves out (`Step.unjoined`); absent when no step
                             left any out, or in an older archive. NAME sketch_seeds_differ
                             or sketch_widths_differ: 1 where a sketch every rank recorded
                             was left out for that reason (`Step.unjoined_why`)
    checksums/DATA           uint32 [S]      for each data dataset DATA written without
                             Fletcher32 (`tokens/NAME`, `sequences/NAME`,
                             `ragged/NAME/data`): the CRC-32 (`_crc.crc32`) of each step's
                             slice of DATA, its bytes as stored (a step without the field:
                             its slice of fill values, zeros)

A scalar's dataset name is its name with "%" and "/" written %25 and %2F (and a name "." or
".." written %2E, %2E%2E), since HDF5 reads "/" as a path (format 1.2; an older archive wrote
a name with "/" as that path, groups, and is read so: each dataset's path under the group).

The archive's format_version follows the run format's rule: 1.3 when the packed run uses a 1.3
addition (a token_count), else 1.2 when it uses a 1.2 addition (a scalar step: no batch field
present, counts 0; a null policy or a source in the manifest), else 1.1 when it uses a 1.1
addition, else 1.0. A multi-rank run is packed joined: one entry a step, ids already offset.
An archive with a `checksums/` dataset says 2.0 (`CHECKSUMS_VERSION`) whatever the run uses:
a reader of major version 1 knows no such dataset, and would read the data it checks with no
check at all; it refuses a newer major version.
"""

from __future__ import annotations

import re
from typing import Any

from stabledrl_cli._json import utf8_text
from stabledrl_cli.dump._schema import FIELDS

REPLAY_REPORT_KIND = "stabledrl-replay-report"
"""The kind of a replay report (also HDF5); replay/ writes it, dump/ imports no replay."""
TOKEN_FIELDS = tuple(name for name, spec in FIELDS.items() if spec.per == "token")
SEQUENCE_FIELDS = tuple(
    name for name, spec in FIELDS.items() if spec.per == "sequence" and spec.ndim == 1
)
RAGGED_FIELDS = tuple(n for n in FIELDS if n not in TOKEN_FIELDS and n not in SEQUENCE_FIELDS)
STEP_COUNTS = ("num_tokens", "num_sequences", "num_scored_tokens")
RANK_SEQUENCES = "rank_sequences"
UNJOINED = "unjoined"
"""`unjoined/NAME`, [S]: the steps whose ranks' geometry NAME their join left out."""
"""`steps/rank_sequences`, [S, R]: each rank's sequences of each step of a multi-rank run."""

CHUNK_ELEMENTS = 1 << 15
"""32 Ki elements (128 KiB of float32) a chunk: small enough that reading one step's slice
decompresses little, large enough that gzip has something to work with. A data dataset of
fewer entries is one chunk of its length (an uncompressed chunk takes its whole size). An
uncompressed one of a narrower dtype holds 256 KiB of entries (`_pack_column.PLAIN_CHUNK_WIDTH`)."""
FILTERS: dict[str, dict[str, Any]] = {
    "small": {"compression": "gzip", "compression_opts": 4, "shuffle": True, "fletcher32": True},
    "small-unshuffled": {"compression": "gzip", "compression_opts": 4, "fletcher32": True},
    "deflated": {"compression": "gzip", "compression_opts": 1, "fletcher32": True},
    "plain": {},
}
"""HDF5 filters of a data dataset: under `pack --compression small` (the smallest archive;
gzip's inflate and HDF5's unshuffle make reading it ~3.8x the directory's floor) every one is
gzipped, with HDF5's byte shuffle where it makes the field's first values smaller (float
log-probabilities of many digits) and without it where it makes them larger (values of few
distinct bit patterns, whose repeats the shuffle breaks up);
under `fast`, "deflated" for a field whose first values a level-1 deflate halves (runs: masks,
ids, per-sequence values repeated per token, which then inflate at memory speed), "plain" for
the rest (log-probabilities and sketches: high-entropy floats that gzip shrinks by a fifth at
twice the read time; unfiltered, with a per-step CRC-32 in `checksums/` instead of HDF5's
Fletcher32, which doubled the time of reading them). A reader needs none of this: HDF5 records
each dataset's filters, and a dataset without Fletcher32 has its `checksums/` dataset."""
CHECKSUMS = "checksums"
"""The group of the per-step CRC-32 datasets (module docstring)."""
ARCHIVE_MAJOR = 2
"""The newest major format version of an archive this tool reads (and writes)."""
CHECKSUMS_VERSION = f"{ARCHIVE_MAJOR}.0"
"""The format version of an archive with a `checksums/` dataset (module docstring)."""


def checksums_dataset(data: str) -> str:
    """Where an archive keeps the per-step CRC-32s of data dataset `data`."""
    return f"{CHECKSUMS}/{data}"


def decode(value: Any) -> Any:
    """An HDF5 string attribute or dataset value as str (h5py may hand out bytes)."""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def decode_json_text(value: Any) -> Any:
    """A JSON string dataset's value as str, its bytes read as UTF-8 only (`utf8_text`:
    NotUtf8 for any other), where `decode` would replace them."""
    return utf8_text(value) if isinstance(value, bytes) else value


SCALAR_ESCAPE_VERSION = (1, 2)
"""The first archive version whose scalar dataset names are escaped (module docstring)."""


def scalar_dataset_name(name: str) -> str:
    """A scalar's name as an HDF5 dataset name (module docstring)."""
    if name in (".", ".."):
        return "%2E" * len(name)
    return name.replace("%", "%25").replace("/", "%2F")


def needs_escape(name: str) -> bool:
    """Whether `scalar_dataset_name` changes `name` (an archive holding one says 1.2)."""
    return scalar_dataset_name(name) != name


def scalar_name(dataset: str, version: tuple[int, int]) -> str:
    """The scalar's name back from its dataset name in an archive of `version`."""
    if version < SCALAR_ESCAPE_VERSION:
        return dataset
    return re.sub(r"%(25|2F|2E)", lambda m: {"25": "%", "2F": "/", "2E": "."}[m.group(1)], dataset)
