"""Fuzz the two readers of a recorded run: the step-file reader and the archive reader.

Each input is a step file (target `step`: steps/step-00000001.safetensors of a small good
run) or a whole archive (target `archive`: a packed small run). The reader must open it, check
it (`run.integrity`), read every readable step's every field, and (archives) pack it again,
raising nothing but InputError: a bad step is a finding, never an exception of another kind,
a hang or a crash. Inputs start from the good files (tests/_corpus.py builds them) and are
mutated by atheris (coverage-guided, libFuzzer) when it is installed, else by a seeded loop of
bit flips, truncations, splices and header rewrites.

    python benchmarks/fuzz_readers.py --seconds 60                 # both targets, 60 s each
    python benchmarks/fuzz_readers.py --target archive --seconds 300 --engine random

A failing input is saved under --crashes (default /tmp/stabledrl-fuzz) and its traceback
printed; add the case to tests/_corpus.py when it is fixed. Exit status 1 if any input failed.
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import struct
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from _corpus import packed, step_path, tiny_run  # noqa: E402

from stabledrl_cli.dump import RunIntegrityWarning, open_run, pack_run  # noqa: E402
from stabledrl_cli.errors import InputError  # noqa: E402


def exercise(path: Path, out: Path | None) -> None:
    """Everything a command does with a run: open, check, read every field, pack."""
    try:
        run = open_run(path)
        run.integrity  # noqa: B018 -- the full check is the point
        for step in run:
            for name in sorted(step.fields):
                step[name]
        run.scalar_series_many(["loss", "grad_norm"])
        if out is not None:
            pack_run(run, out, force=True)
    except InputError:
        pass


class Target:
    """One reader under test: a good seed file and a place where an input is written."""

    def __init__(self, kind: str, work: Path) -> None:
        self.kind = kind
        if kind == "step":
            self.run = tiny_run(work / "run", steps=3)
            self.file = step_path(self.run, 1)
            self.path, self.out = self.run, None
        else:
            self.file = packed(work)
            self.path, self.out = self.file, work / "again.h5"
        self.seed = self.file.read_bytes()

    def __call__(self, data: bytes) -> None:
        self.file.write_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RunIntegrityWarning)
            exercise(self.path, self.out)


def _mutations(rng: random.Random, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        at = rng.randrange(len(data)) if data else 0
        if choice < 0.4 and data:
            data[at] ^= 1 << rng.randrange(8)
        elif choice < 0.55:
            del data[at:]
        elif choice < 0.7 and data:
            data[at] = rng.choice((0, 0xFF, 0x7F, 0x80))
        elif choice < 0.8:
            data[at:at] = rng.randbytes(rng.randint(1, 64))
        elif choice < 0.9 and len(data) > 16:
            start = rng.randrange(len(data) - 8)
            data[at : at + 8] = data[start : start + 8]
        else:
            data[at : at + 8] = struct.pack("<Q", rng.choice((0, 1, 2**31, 2**63, 2**64 - 1)))
    return bytes(data)


def fuzz_random(target: Target, seconds: float, seed: int, save: Callable[[bytes], None]) -> int:
    """A seeded mutation loop; returns the number of inputs tried."""
    rng, tried, stop = random.Random(seed), 0, time.monotonic() + seconds
    while time.monotonic() < stop:
        data = _mutations(rng, target.seed)
        tried += 1
        try:
            target(data)
        except Exception:
            save(data)
            raise
    return tried


def _instrument_package(instrument: Callable[[Any], Any]) -> None:
    """Coverage for the package's own functions and methods (instrumenting all of torch would
    take minutes)."""
    for name, module in list(sys.modules.items()):
        if not name.startswith("stabledrl_cli"):
            continue
        for value in list(vars(module).values()):
            if getattr(value, "__module__", None) != name:
                continue
            members = vars(value).values() if inspect.isclass(value) else [value]
            for member in members:
                function = member.fget if isinstance(member, property) else member
                if inspect.isfunction(function):
                    instrument(function)


def fuzz_atheris(target: Target, seconds: float, corpus: Path) -> None:
    """libFuzzer through atheris, coverage-guided over the package's Python code."""
    import atheris

    seeds = corpus / target.kind
    seeds.mkdir(parents=True, exist_ok=True)
    (seeds / "good").write_bytes(target.seed)
    _instrument_package(atheris.instrument_func)
    atheris.Setup(
        [
            sys.argv[0],
            f"-max_total_time={int(seconds)}",
            f"-max_len={max(4096, 2 * len(target.seed))}",
            "-timeout=60",  # above the archive probe's 20 s limit
            "-rss_limit_mb=3072",
            f"-artifact_prefix={corpus}/{target.kind}-",
            str(seeds),
        ],
        lambda data: target(bytes(data)),
    )
    atheris.Fuzz()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", choices=("step", "archive", "both"), default="both")
    parser.add_argument("--seconds", type=float, default=60.0, help="per target")
    parser.add_argument("--engine", choices=("auto", "atheris", "random"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crashes", type=Path, default=Path("/tmp/stabledrl-fuzz"))
    args = parser.parse_args()
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
        except ImportError:
            engine = "random"
        else:
            engine = "atheris"
    kinds = ("step", "archive") if args.target == "both" else (args.target,)
    if engine == "atheris" and len(kinds) > 1:
        # libFuzzer runs one target a process: run each in turn.
        import subprocess

        common = ["--seconds", str(args.seconds), "--engine", "atheris"]
        common += ["--crashes", str(args.crashes)]
        codes = [
            subprocess.call([sys.executable, __file__, "--target", kind, *common]) for kind in kinds
        ]
        return max(codes)
    args.crashes.mkdir(parents=True, exist_ok=True)
    failed = 0
    for kind in kinds:
        with tempfile.TemporaryDirectory(prefix=f"fuzz-{kind}-") as work:
            target = Target(kind, Path(work))
            if engine == "atheris":
                fuzz_atheris(target, args.seconds, args.crashes)
                continue

            def save(data: bytes, kind: str = kind) -> None:
                path = args.crashes / f"{kind}-{int(time.time() * 1000)}"
                path.write_bytes(data)
                print(f"failing input saved: {path}", file=sys.stderr)

            start = time.monotonic()
            try:
                tried = fuzz_random(target, args.seconds, args.seed, save)
            except Exception:
                traceback.print_exc()
                failed += 1
                continue
            rate = tried / (time.monotonic() - start)
            print(json.dumps({"target": kind, "inputs": tried, "per_second": round(rate, 1)}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
