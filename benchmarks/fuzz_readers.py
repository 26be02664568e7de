"""Fuzz the readers of a recorded run: the step-file reader, the archive reader, the manifest
reader (with what inspect and watch make of it) and `record`'s status file reader.

Each input is a step file (target `step`: steps/step-00000001.safetensors of a small good
run), a whole archive (target `archive`: a packed small run), a manifest (target `manifest`:
the good run's, its fields set to crafted JSON values, the recorder's notes `recording_closed`
and `recording_stopped`, `source` and the TRL `meta` keys among them) or a status file (target
`status`: what `record -- CMD` reads after its command, capture/_status.read_status). The
reader must open it, check it (`run.integrity`), read every readable step's every field,
summarize it as `inspect` does, follow it as `watch` does and (archives) pack it again,
raising nothing but InputError: a bad step is a finding, never an exception of another kind,
a hang or a crash; the status reader raises nothing. Inputs start from the good files
(tests/_corpus.py builds them) and are mutated by atheris (coverage-guided, libFuzzer) when it
is installed, else by a seeded loop of bit flips, truncations, splices and header rewrites
(and, for a manifest, of its fields' values).

    python benchmarks/fuzz_readers.py --seconds 60                 # every target, 60 s each
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

from stabledrl_cli.capture._status import read_status  # noqa: E402
from stabledrl_cli.dump import RunIntegrityWarning, open_run, pack_run  # noqa: E402
from stabledrl_cli.errors import InputError  # noqa: E402
from stabledrl_cli.replay.config import ReplayConfig  # noqa: E402
from stabledrl_cli.replay.follow import RunWatcher  # noqa: E402
from stabledrl_cli.replay.inspection import summarize  # noqa: E402

TARGETS = ("step", "archive", "manifest", "status")


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


def exercise_followed(path: Path) -> None:
    """What `inspect` and `watch --once` make of a run: its summary, a watcher's poll."""
    try:
        summarize(open_run(path)).to_dict()
        watcher = RunWatcher(path, ReplayConfig(device="cpu"))
        watcher.poll()
        watcher.state().to_dict()
    except InputError:
        pass


class Target:
    """One reader under test: a good seed file and a place where an input is written."""

    def __init__(self, kind: str, work: Path) -> None:
        self.kind = kind
        if kind in ("step", "manifest"):
            self.run = tiny_run(work / "run", steps=3)
            self.file = step_path(self.run, 1) if kind == "step" else self.run / "manifest.json"
            self.path, self.out = self.run, None
        elif kind == "status":
            self.file = work / "status"
            self.file.write_text("2\tlog_policy_batch failed at step 0: bad\nE3\tno such run\n")
            self.path, self.out = self.file, None
        else:
            self.file = packed(work)
            self.path, self.out = self.file, work / "again.h5"
        self.seed = self.file.read_bytes()

    def __call__(self, data: bytes) -> None:
        self.file.write_bytes(data)
        if self.kind == "status":
            read_status(self.path)
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RunIntegrityWarning)
            exercise(self.path, self.out)
            if self.kind == "manifest":
                exercise_followed(self.path)


CRAFTED = (None, True, False, 0, -1, 2**64, -(2**70), 1e308, -0.0, "", "x", "\x1b[31m\n[/]",
           "\u202e\u0661", [], [1, [2, [3]]], {}, {"kind": []}, "9" * 5000)  # fmt: skip
"""JSON values a crafted manifest field takes (`_manifest_mutations`)."""

MANIFEST_NOTES = ("recording_closed", "recording_stopped", "meta", "source")
"""The manifest fields `_manifest_mutations` sets most: the notes a Recorder adds, and the
fields `inspect` shows as they are."""

MANIFEST_FIELDS = ("world_size", "unit", "policy", "reward_range", "format_version", "group_ids",
                   "estimator", "geometry", "param_names", "created")  # fmt: skip
"""The fields it sets now and then (most such values are a corrupt manifest, exit 3)."""


def _crafted(rng: random.Random, depth: int = 0) -> Any:
    """A crafted JSON value: one of CRAFTED, or an object of the keys a reader looks for."""
    if depth < 2 and rng.random() < 0.3:
        keys = ("step", "rank", "reason", "kind", "scale_rewards", "reward_weights",
                "multi_objective_aggregation", "spec", "name", "params")  # fmt: skip
        picked = rng.sample(keys, rng.randint(1, 4))
        return {key: _crafted(rng, depth + 1) for key in picked}
    return rng.choice(CRAFTED)


def _manifest_mutations(rng: random.Random, seed: bytes) -> bytes:
    """The good manifest with one to three fields set to crafted values (or removed), now and
    then with byte mutations on top."""
    manifest = json.loads(seed)
    names = rng.sample(MANIFEST_NOTES, rng.randint(1, 3))
    names += [rng.choice(MANIFEST_FIELDS)] if rng.random() < 0.2 else []
    for name in names:
        if rng.random() < 0.1:
            manifest.pop(name, None)
        else:
            manifest[name] = _crafted(rng)
    data = json.dumps(manifest).encode()
    return _mutations(rng, data) if rng.random() < 0.1 else data


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
        mutate = _manifest_mutations if target.kind == "manifest" else _mutations
        data = mutate(rng, target.seed)
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=(*TARGETS, "all"), default="all")
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
    kinds = TARGETS if args.target == "all" else (args.target,)
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
