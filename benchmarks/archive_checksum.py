"""What HDF5's Fletcher32 checksums cost a read of a packed run's steps, against a CRC-32 a step.

    python benchmarks/archive_checksum.py                          # the k=128 sketch run
    python benchmarks/archive_checksum.py --shape 200,256,1024 --steps 20

Copies the first `--steps` steps of every data dataset of the shape's cached `.h5` (built as
`replay_speed.py` builds it) into two temporary archives, each dataset with the chunks and
compression it has there, one with Fletcher32 (as `pack` writes it) and one without, then
reads each step's slice of each dataset as the archive reader does (`dataset[begin:end]`,
every dataset kept open) and prints, per step, the median milliseconds of `--repeats` passes
for each, with the bytes a step holds; and the copy without Fletcher32 read again with the
CRC-32 (`_crc.crc32`) of every slice, as a reader checking a CRC-32 a step (a step file's)
would. What it leaves out: the reader's own work (the run's probe and index, the copies into
torch), which `replay_speed.py`'s floor includes.
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial
from pathlib import Path

import h5py
import numpy as np
from arguments import at_least
from synthetic_runs import Shape, add_step_options, cached_run
from timing import median_seconds

from stabledrl_cli.dump._archive_index import data_dataset
from stabledrl_cli.dump._crc import crc32
from stabledrl_cli.dump._layout import RAGGED_FIELDS, SEQUENCE_FIELDS, TOKEN_FIELDS

DEFAULT_SHAPE = "50,64,512,128"


def _data_datasets(archive: h5py.File) -> list[str]:
    """The archive's per-entry data datasets (where `_layout`'s fields are stored), by name."""
    fields = (*TOKEN_FIELDS, *SEQUENCE_FIELDS, *RAGGED_FIELDS)
    return sorted(where for where in map(data_dataset, fields) if where in archive)


def _step_bounds(archive: h5py.File, name: str, steps: int) -> np.ndarray:
    """The first `steps` + 1 offsets of data dataset `name`'s steps (its group's
    `step_offsets`: `tokens/`, `sequences/` or `ragged/NAME/`)."""
    offsets = archive[f"{name.rsplit('/', 1)[0]}/step_offsets"]
    return np.asarray(offsets[: steps + 1], dtype=np.int64)


def copy_steps(
    source: Path, target: Path, steps: int, fletcher32: bool
) -> list[tuple[str, np.ndarray]]:
    """`target`: the first `steps` steps of `source`'s data datasets, each chunked and compressed
    as there, with or without Fletcher32; returns each dataset's name and step offsets."""
    layout = []
    with h5py.File(source, "r") as packed, h5py.File(target, "w") as copy:
        for name in _data_datasets(packed):
            dataset = packed[name]
            bounds = _step_bounds(packed, name, steps)
            copy.create_dataset(
                name,
                data=dataset[: bounds[-1]],
                maxshape=dataset.maxshape,
                chunks=dataset.chunks,
                compression=dataset.compression,
                compression_opts=dataset.compression_opts,
                shuffle=dataset.shuffle,
                fletcher32=fletcher32,
            )
            layout.append((name, bounds))
    return layout


def read_steps(path: Path, layout: list[tuple[str, np.ndarray]], crc: bool = False) -> int:
    """Every step's slice of every dataset, read as the archive reader reads it (with the
    CRC-32 of each if `crc`); the bytes."""
    total = 0
    with h5py.File(path, "r") as archive:
        datasets = [(archive[name], bounds) for name, bounds in layout]
        for step in range(len(layout[0][1]) - 1):
            for dataset, bounds in datasets:
                part = dataset[bounds[step] : bounds[step + 1]]
                if crc:
                    crc32(part)
                total += part.nbytes
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_options(parser)
    parser.set_defaults(shape=Shape.parse(DEFAULT_SHAPE))
    parser.add_argument("--repeats", type=at_least(1), default=5)
    args = parser.parse_args()
    _, archive = cached_run(args.shape, args.seed, args.cache)
    with tempfile.TemporaryDirectory() as scratch:
        times: dict[bool | str, float] = {}
        for fletcher32 in (True, False):
            copy = Path(scratch) / f"fletcher32-{fletcher32}.h5"
            layout = copy_steps(archive, copy, args.steps, fletcher32)
            steps = len(layout[0][1]) - 1
            nbytes = read_steps(copy, layout)  # (and the page cache holds the copy)
            seconds = median_seconds(partial(read_steps, copy, layout), args.repeats)
            times[fletcher32] = seconds / steps * 1e3
            if not fletcher32:
                seconds = median_seconds(partial(read_steps, copy, layout, True), args.repeats)
                times["crc"] = seconds / steps * 1e3
    print(
        f"{args.shape.name}: {steps} steps of {nbytes / steps / 2**20:.1f} MiB, "
        f"median of {args.repeats}"
    )
    print(f"{'with Fletcher32':<30}{times[True]:8.2f} ms a step")
    print(f"{'without':<30}{times[False]:8.2f} ms a step")
    print(f"{'without, a CRC-32 a slice':<30}{times['crc']:8.2f} ms a step")
    print(f"{'ratio Fletcher32 / without':<30}{times[True] / times[False]:8.2f}x")
    print(f"{'ratio Fletcher32 / CRC-32':<30}{times[True] / times['crc']:8.2f}x")


if __name__ == "__main__":
    main()
