"""Synthetic runs of given shapes, written by the project's own Recorder and cached on disk.

A shape is STEPS x SEQS x LEN (optionally with K: a k=K gradient sketch per token). Each step
holds SEQS sequences of LEN positions in prompt groups of 8, recorded as [B, L] arrays with a
mask: a prompt (masked out) then a completion of random length, then padding. Values look like
a diffusion LM's RL step: token log-probs with a long tail towards -inf (logp_old), a new
log-prob whose log-ratio carries ELBO-like noise (each sequence its own noise scale, drawn
log-normally, since the masking ratio sets the estimator's variance; at most 0, as a
log-probability is: version 1 let the noise lift a near-certain token's above 0, which the
Recorder warns of as logits), 0/1 rewards drawn at a
per-group success rate, group-centred advantages, and with K a float16 sketch [T, K] with its
per-step scale. Step s draws from its own generator (seed, s): a run with a sketch holds the
same log-probs, rewards and advantages as the run without one.

`cached_run` builds a run once per (shape, seed, generator version) under a cache directory,
packs it into `run.h5` beside it (`pack`'s default compression; packed again when that
changes), and finds both on the next call.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from arguments import at_least

if TYPE_CHECKING:
    from stabledrl_cli.dump import Run

GENERATOR_VERSION = 2
"""Bumped whenever the generator's output changes, so stale cached runs are rebuilt."""
ARCHIVE = "fast"
"""How the cached `run.h5` is packed (`pack_run`'s default compression)."""
PACKED = f"{ARCHIVE}, format 2, 256 KiB uncompressed chunks"
"""What a cached `run.h5` was packed as (`done.json`'s "archive"): its compression, the
archive format (2: per-step CRC-32s instead of Fletcher32 on the uncompressed datasets) and
the uncompressed datasets' chunks (256 KiB, `_pack_column.PLAIN_CHUNK_WIDTH`; 32 Ki entries before).
A cached run packed otherwise is packed again."""
GROUP_SIZE = 8


@dataclass(frozen=True)
class Shape:
    """A synthetic run's shape: steps, sequences a step, positions a sequence, sketch width."""

    steps: int
    sequences: int
    length: int
    sketch_k: int = 0

    @classmethod
    def parse(cls, text: str) -> Shape:
        """`STEPS,SEQS,LEN[,K]` (or with `x` between the numbers)."""
        parts = text.replace("x", ",").split(",")
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            numbers = []
        if len(numbers) not in (3, 4) or min(numbers[:3]) < 1 or min(numbers) < 0:
            raise ValueError(f"shape {text!r}: expected STEPS,SEQS,LEN[,K] with positive numbers")
        return cls(*numbers)

    @property
    def tokens(self) -> int:
        """Positions over the whole run (masked ones included: what the reader reads)."""
        return self.steps * self.sequences * self.length

    @property
    def name(self) -> str:
        base = f"{self.steps}x{self.sequences}x{self.length}"
        return base + (f"+k{self.sketch_k}" if self.sketch_k else "")

    def key(self, seed: int) -> str:
        return f"{self.name}-seed{seed}-gen{GENERATOR_VERSION}"


def step_arrays(shape: Shape, seed: int, step: int) -> dict[str, np.ndarray | float]:
    """One step's `Recorder.log_step` keywords (module docstring)."""
    rng = np.random.default_rng((seed, step))
    b, n = shape.sequences, shape.length
    group = (np.arange(b) // GROUP_SIZE).astype(np.int32)
    prompt = rng.integers(n // 8, n // 4 + 1, size=b)
    completion = rng.integers(np.maximum(1, n // 4), n - prompt + 1)
    position = np.arange(n)
    mask = (position >= prompt[:, None]) & (position < (prompt + completion)[:, None])
    logp_old = -rng.gamma(0.6, 1.5, size=(b, n)).astype(np.float32)
    noise_scale = (0.03 * np.exp(rng.normal(0.0, 0.7, size=(b, 1)))).astype(np.float32)
    noisy = logp_old + noise_scale * rng.standard_normal((b, n), dtype=np.float32)
    logp = np.minimum(noisy, np.float32(0.0))  # a log-probability is <= 0
    success = rng.random(group.max() + 1)[group]
    reward = (rng.random(b) < success).astype(np.float32)
    means = np.bincount(group, weights=reward) / np.bincount(group)
    arrays: dict[str, np.ndarray | float] = {
        "logp": logp,
        "logp_old": logp_old,
        "advantages": (reward - means[group]).astype(np.float32),
        "mask": mask,
        "group_id": group,
        "reward": reward,
        "grad_norm": float(rng.gamma(2.0, 0.5)),
        "loss": float(rng.normal(0.0, 0.05)),
        "lr": 1e-6,
    }
    if shape.sketch_k:
        sketch = rng.standard_normal((b * n, shape.sketch_k), dtype=np.float32)
        scale = float(np.abs(sketch).max() / 60000.0)
        arrays["unit_grad_sketch"] = (sketch / scale).astype(np.float16)
        arrays["unit_grad_sketch_scale"] = scale
    return arrays


def build_run(shape: Shape, seed: int, path: Path) -> None:
    """Records the run at `path` with the Recorder (synchronous writes, as by default)."""
    from stabledrl_cli.dump import Recorder

    geometry = {"kind": "sketch", "k": shape.sketch_k} if shape.sketch_k else None
    with Recorder(path, policy="grpo", unit="token", reward_range=(0.0, 1.0), overwrite=True,
                  geometry=geometry) as recorder:  # fmt: skip
        for step in range(shape.steps):
            recorder.log_step(step, **step_arrays(shape, seed, step))  # type: ignore[arg-type]


def cached_run(shape: Shape, seed: int, cache: Path, log: object = None) -> tuple[Path, Path]:
    """(run directory, packed .h5) of `shape`, built and packed unless already in `cache`."""
    from stabledrl_cli.dump import open_run, pack_run

    home = cache / shape.key(seed)
    run, archive, done = home / "run", home / "run.h5", home / "done.json"
    if done.is_file():
        facts = json.loads(done.read_text())
        if facts.get("archive") != PACKED:
            if callable(log):
                log(f"packing {shape.name} (seed {seed}) again: {PACKED}")
            pack_run(open_run(run), archive, force=True, compression=ARCHIVE)
            done.write_text(json.dumps({**facts, "archive": PACKED}))
        return run, archive
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    if callable(log):
        log(f"building {shape.name} (seed {seed}) in {home}")
    build_run(shape, seed, run)
    pack_run(open_run(run), archive, compression=ARCHIVE)
    done.write_text(
        json.dumps({"shape": shape.name, "seed": seed, "pid": os.getpid(), "archive": PACKED})
    )
    return run, archive


def add_step_options(parser: argparse.ArgumentParser) -> None:
    """--shape, --steps, --seed and --cache of a script that measures a few steps of one run."""
    parser.add_argument("--shape", type=Shape.parse, default=Shape.parse("200,256,1024"))
    parser.add_argument("--steps", type=at_least(1), default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "stabledrl-bench"
    )


def open_cached(args: argparse.Namespace) -> Run:
    """The run directory of `add_step_options`' shape and seed, built once (`cached_run`)."""
    from stabledrl_cli.dump import open_run

    directory, _ = cached_run(args.shape, args.seed, args.cache)
    return open_run(directory)
