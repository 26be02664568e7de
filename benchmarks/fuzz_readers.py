"""Fuzz the readers of a recorded run: the step-file reader, the archive reader, the manifest
reader (with what inspect and watch make of it), `record`'s status file reader, the log
readers of `stabledrl import` and the baseline reader of `check -b`.

Each input is a step file (target `step`: steps/step-00000001.safetensors of a small good
run), a whole archive (target `archive`: a packed small run), a manifest (target `manifest`:
the good run's, its fields set to crafted JSON values, the recorder's notes `recording_closed`
and `recording_stopped`, `source` and the TRL `meta` keys among them), a status file (target
`status`: what `record -- CMD` reads after its command, capture/_status.read_status), a log of
one format `import` reads (targets `trainer_state`, `jsonl`, `csv`, `tensorboard_json`,
`verl_console`, `tfevents` and `wandb`: a small log of each, tests/_corpus.py; `detect`: any
of them under a name that says no format, told by its content) or a baseline
(target `baseline`: replay/baseline_read.load_baseline). The run reader must open it, check it
(`run.integrity`), read every readable step's every field, summarize it as `inspect` does,
follow it as `watch` does and (archives) pack it again, raising nothing but InputError: a bad
step is a finding, never an exception of another kind, a hang or a crash; the status reader
raises nothing. A log must import (the run it writes read back as `inspect` reads it) or be
refused, a baseline load or be refused, with an InputError of at most MESSAGE_LIMIT characters
(and no warning of an import longer). Inputs start from the good files (tests/_corpus.py
builds them) and are mutated by atheris (coverage-guided, libFuzzer) when it is installed,
else by a seeded loop of bit flips, truncations, splices and header rewrites (for a manifest
and a baseline, of their fields' values too; for a text log, of the tokens its syntax and
numbers are made of; for an event file and a W&B run file, of their records' protobuf, framed
again with valid checksums: under atheris an input is one record, framed so).

    python benchmarks/fuzz_readers.py --seconds 60                 # every target, 60 s each
    python benchmarks/fuzz_readers.py --target archive --seconds 300 --engine random
    python benchmarks/fuzz_readers.py --target wandb --seconds 120
    TMPDIR=/dev/shm python benchmarks/fuzz_readers.py --target jsonl   # a tmpfs: faster

An import target writes each input's run as `import` does, every step file fsynced: on a tmpfs
(TMPDIR=/dev/shm) it tries several times the inputs a second it tries on a disk.

A failing input is saved under --crashes (default /tmp/stabledrl-fuzz) and its traceback
printed; add the case to tests/_corpus.py when it is fixed. Exit status 1 if any input failed.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
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

from _corpus import (  # noqa: E402
    IMPORT_LOGS,
    baseline_data,
    number_field,
    packed,
    proto_field,
    step_path,
    tf_event,
    tf_tensor,
    tf_value,
    tfevents_records,
    tfrecord,
    tiny_run,
    varint,
    wandb_blocks,
    wandb_history,
)

from stabledrl_cli.capture._status import read_status  # noqa: E402
from stabledrl_cli.dump import RunIntegrityWarning, open_run, pack_run  # noqa: E402
from stabledrl_cli.errors import InputError  # noqa: E402
from stabledrl_cli.importers import import_log  # noqa: E402
from stabledrl_cli.importers._table import StepTable  # noqa: E402
from stabledrl_cli.importers._wandb import HEADER, _records  # noqa: E402
from stabledrl_cli.replay.baseline_read import load_baseline  # noqa: E402
from stabledrl_cli.replay.config import ReplayConfig  # noqa: E402
from stabledrl_cli.replay.inspection import summarize  # noqa: E402
from stabledrl_cli.replay.watch.follow import RunWatcher  # noqa: E402

IMPORTS = {
    "trainer_state": "trainer_state.json",
    "jsonl": "log.jsonl",
    "csv": "log.csv",
    "tensorboard_json": "run-x-tag-train_loss.json",
    "verl_console": "slurm.out",
    "tfevents": "events.out.tfevents.1.host",
    "wandb": "run-x.wandb",
    "detect": "train.log",
}
"""The importer targets: each a format `import` reads, and the file name it is detected by;
`detect` a log of any of them under a name that says none (told by its content)."""
TARGETS = ("step", "archive", "manifest", "status", *IMPORTS, "baseline")
WANDB_RUN = ROOT / "fixtures/imports/wandb-verl/run-verltiny.wandb"
"""The W&B target's seed: a real run file's records (verl's Tracking, wandb 0.31)."""
MESSAGE_LIMIT = 2_000
"""Most characters of an import's or a baseline's error or warning: the log's path twice and
four names of 256 characters (`listed`) fit; a value of the input quoted whole does not."""


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


def _short(message: str) -> None:
    if len(message) > MESSAGE_LIMIT:
        raise AssertionError(f"a message of {len(message)} characters: {message[:300]!r}...")


def exercise_import(path: Path, out: Path) -> None:
    """What `import` does with a log: read it, write its run, read that back as `inspect`
    does; nothing but an InputError, and no error or warning longer than MESSAGE_LIMIT."""
    try:
        summary = import_log(path, out, overwrite=True)
    except InputError as exc:
        _short(str(exc))
        return
    for warning in summary.warnings:
        _short(warning)
    summarize(open_run(out)).to_dict()


def exercise_baseline(path: Path) -> None:
    """What `check -b` reads of a baseline: loaded, or an InputError of one short line."""
    try:
        load_baseline(path)
    except InputError as exc:
        _short(str(exc))


def wandb_records(path: Path) -> list[bytes]:
    """The records of a W&B run file."""
    with path.open("rb") as handle:
        handle.read(len(HEADER))
        found = _records(handle, path, StepTable(str(path)), path.stat().st_size)
        return [bytes(record) for _, record in found]


class Target:
    """One reader under test: a good seed file and a place where an input is written. A
    framed log (event file, W&B run file) keeps its records, for mutations that frame them
    again with valid checksums (`frame`)."""

    def __init__(self, kind: str, work: Path) -> None:
        self.kind = kind
        self.records: list[bytes] = []
        self.formats: list[Target] = []
        if kind in IMPORTS:
            self.file = work / IMPORTS[kind]
            self.path, self.out = self.file, work / "imported"
            if kind == "tfevents":
                self.records = tfevents_records()
            elif kind == "wandb":
                self.records = wandb_records(WANDB_RUN)
            elif kind == "detect":
                for other in list(IMPORTS)[:-1]:
                    (work / other).mkdir()
                    self.formats.append(Target(other, work / other))
                self.file.write_bytes(self.formats[0].seed)
            else:
                self.file.write_text(IMPORT_LOGS[IMPORTS[kind]])
            if self.records:
                self.file.write_bytes(self.frame(self.records))
        elif kind == "baseline":
            self.file = work / "baseline.json"
            self.file.write_text(json.dumps(baseline_data()))
            self.path, self.out = self.file, None
        elif kind in ("step", "manifest"):
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

    def frame(self, records: list[bytes]) -> bytes:
        """A log file of `records` (event payloads, or W&B records), checksums valid."""
        if self.kind == "tfevents":
            return b"".join(tfrecord(record) for record in records)
        return wandb_blocks(*records)

    def mutate(self, rng: random.Random) -> bytes:
        """One input of the seeded loop (`fuzz_random`)."""
        if self.formats:
            return rng.choice(self.formats).mutate(rng)
        if self.kind in ("manifest", "baseline"):
            mutate = _manifest_mutations if self.kind == "manifest" else _json_mutations
            return mutate(rng, self.seed)
        if self.records:
            return _framed_mutations(rng, self)
        if self.kind in ("trainer_state", "tensorboard_json", "jsonl") and rng.random() < 0.6:
            documents = _json_lines_mutations if self.kind == "jsonl" else _json_mutations
            return documents(rng, self.seed)
        if self.kind in IMPORTS:
            return _log_mutations(rng, self.seed)
        return _mutations(rng, self.seed)

    def __call__(self, data: bytes) -> None:
        self.file.write_bytes(data)
        if self.kind == "status":
            read_status(self.path)
            return
        if self.kind == "baseline":
            exercise_baseline(self.path)
            return
        if self.kind in IMPORTS:
            assert self.out is not None
            exercise_import(self.path, self.out)
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
                "multi_objective_aggregation", "spec", "name", "params", "value", "worse",
                "abs_tol", "rel_tol", "max")  # fmt: skip
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


def _json_mutations(rng: random.Random, seed: bytes) -> bytes:
    """A JSON document (a baseline) with one to three values anywhere in it set to crafted
    ones, removed, or given a crafted sibling key, now and then with byte mutations on top."""
    document = json.loads(seed)
    for _ in range(rng.randint(1, 3)):
        parent: Any = document
        while True:
            keys = list(parent) if isinstance(parent, dict) else list(range(len(parent)))
            if not keys:
                break
            key = rng.choice(keys)
            if not isinstance(parent[key], (dict, list)) or not parent[key] or rng.random() < 0.3:
                break
            parent = parent[key]
        value = copy.deepcopy(_crafted(rng))  # CRAFTED's own lists and objects stay as they are
        choice = rng.random()
        if isinstance(parent, dict) and (not keys or choice < 0.15):
            parent[rng.choice(JSON_KEYS)] = value
        elif keys and choice < 0.25:
            del parent[key]
        elif keys:
            parent[key] = value
    data = json.dumps(document).encode()
    return _mutations(rng, data) if rng.random() < 0.1 else data


JSON_KEYS = ("x", "", "\x1b[31m", "9" * 300, "grpo:eps_low=0.1", "collapse_window", "steps",
             "step", "_step", "global_step", "logging_steps", "eval_loss", "train/loss",
             "data")  # fmt: skip
"""Keys `_json_mutations` adds: unknown ones, a policy spec, settings a baseline may hold, the
step keys and metric names of a log."""


def _json_lines_mutations(rng: random.Random, seed: bytes) -> bytes:
    """A JSON-lines log with one of its lines given `_json_mutations`."""
    lines = seed.split(b"\n")
    at = rng.randrange(len(lines))
    if lines[at].strip():
        lines[at] = _json_mutations(rng, lines[at])
    return b"\n".join(lines)


LOG_TOKENS = (b"NaN", b"-Infinity", b"1e999", b"-1", b"1.5", b"9223372036854775808", b"1e-400",
              b"null", b"true", b'"', b",", b";", b"\t", b"\n", b"\r", b"\x1b[31m", b"\xff",
              b"{", b"}", b"[", b"]", b":", b" - ", b"step", b"_step", b"global_step", b"step:",
              b"np.float64(", b"eval_loss", b"train_runtime", b"_type", b"logging_steps",
              b"[repeated 2x across cluster]", b"(TaskRunner pid=1) ")  # fmt: skip
"""What a text log is made of: its syntax, its step keys, crafted numbers and bytes."""


def _log_mutations(rng: random.Random, seed: bytes) -> bytes:
    """A text log with tokens of LOG_TOKENS put in or over its bytes, now and then a line
    repeated, a long run of one byte or byte mutations."""
    data = bytearray(seed)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(data) + 1)
        choice = rng.random()
        if choice < 0.6:
            tokens = b"".join(rng.choice(LOG_TOKENS) for _ in range(rng.randint(1, 3)))
            data[at : at + rng.randint(0, 8)] = tokens
        elif choice < 0.75 and b"\n" in data:
            start = data.rfind(b"\n", 0, at) + 1
            end = data.find(b"\n", at)
            line = bytes(data[start : len(data) if end < 0 else end + 1])
            data[start:start] = line * rng.choice((2, 10, 2000))
        elif choice < 0.85:
            data[at:at] = rng.choice(b"x9[{\n-").to_bytes(1, "little") * rng.choice((300, 70_000))
        else:
            data = bytearray(_mutations(rng, bytes(data)))
    return bytes(data)


def _crafted_field(rng: random.Random, record: bytes) -> bytes:
    """A protobuf field of crafted content: a huge varint, a length past any message, a
    string of 70 KB, a message nested 2,000 deep, the record in itself, a NaN fixed32."""
    number = rng.choice((1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 17, rng.randint(1, 40)))
    choice = rng.random()
    if choice < 0.25:
        return number_field(number, rng.choice((0, 1, -1, 2**31, 2**63 - 1, 2**63, 2**64 - 1)))
    if choice < 0.35:
        return varint(number << 3 | 2) + varint(rng.choice((2**31, 2**63, 2**64 - 1)))
    if choice < 0.45:
        return proto_field(number, b"x" * rng.choice((300, 70_000)))
    if choice < 0.55:
        nested = b"x"
        for _ in range(2_000):
            nested = proto_field(number, nested)
        return nested
    if choice < 0.7:
        return proto_field(number, record)
    return varint(number << 3 | 5) + struct.pack("<f", rng.choice((math.nan, math.inf, -0.0)))


def _crafted_record(rng: random.Random, kind: str) -> bytes:
    """A well-formed record of crafted values: an event of a crafted step, tag and value, or
    a W&B history row of crafted keys and value_json."""
    steps = (0, 1, 2, 3, -1, 2**31, 2**63 - 1, rng.randrange(2**64))
    names = ("train/loss", "loss", "_step", "", "a/b/c", "eval_loss", "\x1b[31m\n", "x" * 300)
    if kind == "tfevents":
        value = rng.choice((0.5, math.nan, -math.inf, 3.4e38))
        tag = rng.choice(names).encode()
        values = [
            tf_value(tag, simple=value),
            tf_value(tag, tensor=tf_tensor(rng.choice((1, 2, 3, 9, 10, 14, 19, 7)), b"\x01" * 4)),
        ]
        return tf_event(rng.choice(steps), *rng.sample(values, rng.randint(0, 2)),
                        restart=rng.random() < 0.2)  # fmt: skip
    numbers = ("1", "-1", "0.5", "NaN", "Infinity", "1e999", "9" * 400, '"0.5"', "[1]", "{}",
               '{"_type": "table"}', "null", "true", str(rng.choice(steps)))  # fmt: skip
    items = [(rng.choice(names), rng.choice(numbers)) for _ in range(rng.randint(1, 4))]
    return wandb_history(("_step", rng.choice(numbers)), *items)


def _framed_mutations(rng: random.Random, target: Target) -> bytes:
    """The target's records, one to three of them mutated (bytes, crafted fields) or crafted
    records put in, framed again with valid checksums; now and then the framed file's bytes
    mutated too (checksums, lengths, a record cut short)."""
    records = list(target.records)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(records) + 1)
        choice = rng.random()
        if choice < 0.3 and at < len(records):
            records[at] = _mutations(rng, records[at])
        elif choice < 0.6 and at < len(records):
            records[at] = records[at] + _crafted_field(rng, records[at])
        elif choice < 0.9:
            records[at:at] = [_crafted_record(rng, target.kind)] * rng.choice((1, 1, 3, 500))
        elif at < len(records):
            del records[at]
    data = target.frame(records)
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
        data = target.mutate(rng)
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
    for other in target.formats:
        (seeds / other.kind).write_bytes(other.seed)
    run = target
    if target.records:  # an input is one record, framed with valid checksums after the seed's
        for number, record in enumerate(target.records):
            (seeds / f"record-{number}").write_bytes(record)

        def run(data: bytes) -> None:
            target(target.frame([*target.records, data]))

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
        lambda data: run(bytes(data)),
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
