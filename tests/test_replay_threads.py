"""`--threads N`: a chunk's steps computed N at a time, each on one thread, so a replay's
figures are the same, bit for bit, for any thread count (torch's intra-op threads would sum a
large step's reductions in another order)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from _corpus import bad_seq_id, float16_sketch_without_scale, tiny_run
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app
from stabledrl_cli.replay import metrics, stream
from stabledrl_cli.replay.engines import single_torch_thread

SEQUENCES, LENGTH, GROUP = 64, 2048, 8
"""131K positions a step: past torch's grain, where two intra-op threads split a reduction."""


@pytest.fixture(scope="module")
def large_steps(tmp_path_factory) -> Path:
    """Six steps of 131K token entries: dLLM-like log-ratio noise, groups of 8, 0/1 rewards."""
    path = tmp_path_factory.mktemp("threads") / "run"
    rng = np.random.default_rng(7)
    group = (np.arange(SEQUENCES) // GROUP).astype(np.int32)
    with sd.Recorder(path, policy="grpo", unit="token", reward_range=(0.0, 1.0)) as recorder:
        for step in range(6):
            logp_old = -rng.gamma(0.6, 1.5, size=(SEQUENCES, LENGTH)).astype(np.float32)
            noise = rng.normal(0.0, 0.3, size=(SEQUENCES, LENGTH)).astype(np.float32)
            reward = (rng.random(SEQUENCES) < 0.5).astype(np.float32)
            means = np.bincount(group, weights=reward) / np.bincount(group)
            recorder.log_step(
                step,
                logp=logp_old + noise,
                logp_old=logp_old,
                advantages=(reward - means[group]).astype(np.float32),
                mask=rng.random((SEQUENCES, LENGTH)) < 0.9,
                group_id=group,
                reward=reward,
                grad_norm=1.0,
                loss=0.0,
            )
    return path


def _replay(run: Path, threads: int, budget: str = "64M") -> dict:
    args = ["replay", str(run), "--format", "json", "--device", "cpu", "--threads", str(threads)]
    result = CliRunner().invoke(app, [*args, "--memory-budget", budget])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data.pop("threads") == threads
    return data


def test_figures_are_the_same_bit_for_bit_for_any_thread_count(large_steps):
    one = _replay(large_steps, 1)
    assert _replay(large_steps, 2) == one
    assert _replay(large_steps, 3, budget="4M") == one  # a step a chunk: fewer steps than threads


def test_steps_are_computed_on_the_threads_asked_for(large_steps, monkeypatch):
    names: set[str] = set()
    computed = metrics.step_metrics

    def step_metrics(*args, **kwargs):
        names.add(threading.current_thread().name)
        return computed(*args, **kwargs)

    monkeypatch.setattr(stream, "step_metrics", step_metrics)
    intra_op = []
    with single_torch_thread():
        intra_op.append(torch.get_num_threads())
    sd.replay(large_steps, ["grpo"], device="cpu", threads=2, memory_budget=64 * 2**20)
    assert intra_op == [1]
    assert len(names) == 2 and all(n.startswith("stabledrl-compute") for n in names), names
    names.clear()
    sd.replay(large_steps, ["grpo"], device="cpu", threads=1)
    assert names == {threading.current_thread().name}


@pytest.mark.parametrize("make", [bad_seq_id, float16_sketch_without_scale])
def test_a_rejected_step_is_named_as_with_one_thread(tmp_path, make):
    run = make(tiny_run(tmp_path / "run", steps=6), 2)
    one = sd.replay(run, ["grpo"], device="cpu", threads=1)
    many = sd.replay(run, ["grpo"], device="cpu", threads=3)
    assert len(one.skipped) == 1 and one.skipped[0].startswith("step 2: ")
    assert many.to_dict() | {"threads": 1} == one.to_dict()


def _replay_note(run: Path, *options: str) -> str:
    """The stderr of a replay with `options`, its progress lines left out."""
    result = CliRunner().invoke(app, ["replay", str(run), "--format", "json", *options])
    assert result.exit_code == 0, result.output
    return "\n".join(line for line in result.stderr.splitlines() if "replaying" not in line)


def test_threads_a_budget_leaves_idle_are_named_with_the_budget_that_fills_them(large_steps):
    note = _replay_note(large_steps, "--threads", "4", "--memory-budget", "4M")
    assert note.startswith("note: --threads 4 computed at most 1 step side by side"), note
    assert "--memory-budget (4M)" in note
    suggested = note.rsplit("--memory-budget ", 1)[1].split()[0]
    assert _replay_note(large_steps, "--threads", "4", "--memory-budget", suggested) == ""


def test_threads_a_chunk_size_leaves_idle_are_named_with_the_chunk_size(large_steps):
    note = _replay_note(large_steps, "--threads", "4", "--chunk-size", "2")
    assert "computed at most 2 steps side by side" in note
    assert "--chunk-size 4 or more lets all 4 work" in note
    assert _replay_note(large_steps, "--threads", "4", "--chunk-size", "4") == ""


def test_threads_beyond_the_run_steps_or_one_thread_make_no_note(large_steps):
    assert _replay_note(large_steps, "--threads", "8", "--memory-budget", "1G") == ""
    assert _replay_note(large_steps, "--memory-budget", "4M") == ""
