"""The streaming pass holds its [steps, policies, metrics] rows once, plus a chunk's; the
driver that joins a sharded pass's rows holds them once, plus a shard's; the follower behind
watch and diff holds its own policy's rows once.

The peak is the process's resident memory (its rows are torch's, which tracemalloc does not
see), measured in a fresh interpreter: a heap left by earlier tests could hide what the pass
allocates."""

from __future__ import annotations

import gc
import pickle
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest

from stabledrl_cli.dump import open_run
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.engine import replay_run
from stabledrl_cli.replay.incremental import OwnReplay

needs_peak_rss = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak RSS"
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

SETUP = """
import torch
torch.set_num_threads(1)  # as a replay computes
from stabledrl_cli.dump import open_run
from stabledrl_cli.policies import get_policy
from stabledrl_cli.replay import columns, stream

def memory_kb(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

def peak_from_here():  # resets the peak; the resident bytes now, for peak_over
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return memory_kb("VmRSS") * 1024

def peak_over(start, nbytes):  # the peak's bytes above start, over nbytes
    return (memory_kb("VmHWM") * 1024 - start) / nbytes

def random_row(item, *, policies, **_):  # the row's shape, without the policies' compute
    metrics = torch.rand(len(policies), len(columns.device_metrics()), dtype=torch.float64)
    return metrics, "coef", None

stream._step_row = random_row
"""


def peak_over_rows_of(scenario: str, *, policies: int) -> tuple[int, float]:
    """(steps, peak over rows) that `scenario` prints, run over the grpo fixture with this
    many policies in a fresh interpreter."""
    code = (SETUP + scenario).replace("RUN", repr(str(FIXTURES / "grpo")))
    done = subprocess.run(
        [sys.executable, "-c", code.replace("POLICIES", str(policies))],
        capture_output=True,
        text=True,
        check=True,
    )
    steps, peak_over_rows = done.stdout.split()
    return int(steps), float(peak_over_rows)


SCENARIO = """
run = open_run(RUN)
policies = [get_policy("grpo")] * POLICIES
stream.stream_run(run, policies[:1], None, torch.device("cpu"))  # what a first pass sets up
start = peak_from_here()  # the peak from here
streamed = stream.stream_run(run, policies, None, torch.device("cpu"), memory_budget=2**21)
print(streamed.metrics.shape[0], peak_over(start, streamed.metrics.nbytes))
"""


@needs_peak_rss
def test_the_streamed_rows_are_held_once_plus_a_chunk() -> None:
    """2048 policies over the grpo fixture's 160 steps: 68 MB of rows, in chunks of 1 MB of
    arrays and rows. The old pass held a chunk's rows beside their torch.stack, then its
    blocks beside their np.concatenate: 2.0-2.2x the rows above the pass's start; now 1.1x
    (one buffer, written a chunk at a time)."""
    steps, peak_over_rows = peak_over_rows_of(SCENARIO, policies=2048)
    assert steps == 160
    assert peak_over_rows < 1.5


SHARD_SCENARIO = SCENARIO.replace(
    "memory_budget=2**21)",  # the shard: 129 steps, a row past 128, a step a chunk
    "memory_budget=2**21, chunk_size=1, steps=run.steps_of(run.listed_step_numbers[:129]), "
    "step_count=129)",
)


@needs_peak_rss
def test_a_shard_s_rows_are_held_once_plus_a_chunk() -> None:
    """A worker's pass over a shard (its steps come one at a time, `Run.steps_of`) is told
    the shard's step count: 2048 policies over 129 steps of the grpo fixture, 55 MB of rows,
    a step a chunk. The old pass, which could not count them, grew its buffer by doubling
    from a chunk's rows, and at the 129th held 128 rows beside the 256 it copied them to:
    2.0x the rows above the pass's start; now the buffer is sized once: 1.0x."""
    steps, peak_over_rows = peak_over_rows_of(SHARD_SCENARIO, policies=2048)
    assert steps == 129
    assert peak_over_rows < 1.5


MERGE_SCENARIO = """
import gc
import pickle
from stabledrl_cli.replay.shards import merge_streams, plan_shards
run = open_run(RUN)
policies = [get_policy("grpo")] * POLICIES
parts = [  # as the driver receives them: each shard's rows alone, unpickled
    pickle.loads(pickle.dumps(stream.stream_run(
        run, policies, None, torch.device("cpu"), steps=run.steps_of(shard), memory_budget=2**21
    )))
    for shard in plan_shards(run.listed_step_numbers, 4)
]
rows = sum(part.metrics.nbytes for part in parts)
start = peak_from_here()  # the peak from here: the shards' rows are held already
merged = merge_streams(run, parts, POLICIES)
print(merged.metrics.shape[0], peak_over(start, rows))
"""


@needs_peak_rss
def test_the_driver_holds_the_shards_rows_once_plus_a_shard() -> None:
    """4096 policies over the grpo fixture's 160 steps in 4 shards of 34 MB of rows each, as
    the driver of `--engine processes` or `ray` joins them (`merge_streams`). The old join
    held every shard's rows beside their np.concatenate: 1.0x the rows above the shards'
    own; now each shard's rows are written into one buffer and the shard dropped: a shard's."""
    steps, peak_over_rows = peak_over_rows_of(MERGE_SCENARIO, policies=4096)
    assert steps == 160
    assert peak_over_rows < 0.6


RESULT_SCENARIO = """
from dataclasses import replace
import numpy as np
from stabledrl_cli.replay import engine
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.engine import replay_run
from stabledrl_cli.replay.measurements import NoiseFloor, OwnLikelihood
from stabledrl_cli.replay.observed import observe
run = open_run(RUN)
policies = [get_policy("grpo")] * POLICIES
steps = 2000
metrics = np.full((steps, POLICIES, len(columns.device_metrics())), 0.0)  # pages written
streamed = stream.StreamedRun(
    step_numbers=np.arange(steps, dtype=np.int64), metrics=metrics, geometry=("coef",) * steps,
    approximate=np.zeros(POLICIES, dtype=bool), loss=np.full(steps, np.nan),
    grad_norm_covered=np.full(steps, np.nan), noise_floor=NoiseFloor(),
    likelihood=OwnLikelihood(),
)
observed, config = observe(run), ReplayConfig(device="cpu")
first = replace(streamed, metrics=metrics[:, :1])
engine.replay_result(run, policies[:1], None, first, observed, [], config)  # what it sets up
start = peak_from_here()  # the peak from here: the streamed metrics are held already
result = engine.replay_result(run, policies, None, streamed, observed, [], config)
print(steps, peak_over(start, metrics.nbytes))
"""


@needs_peak_rss
def test_a_result_holds_the_streamed_rows_not_every_policy_s_columns() -> None:
    """The result of 128 policies over 2000 steps (53 MB of streamed metrics), as the driver
    builds it after the streaming pass: each policy's series is derived from the metrics
    when read, one policy's at a time. The old result held every policy's derived columns
    (its integer casts, flags and ratios) beside the metrics: 0.49x them above its start;
    now 0.01x."""
    steps, peak_over_rows = peak_over_rows_of(RESULT_SCENARIO, policies=128)
    assert steps == 2000
    assert peak_over_rows < 0.2


def test_a_result_whose_columns_are_derived_when_read_pickles() -> None:
    """A replay's result, whose series derive their columns when read (over every step, or
    a `--steps` range of them), pickles and prints the same JSON after, as one that held
    its columns did."""
    for step_range in ((None, None), (10, 40)):
        result = replay_run(
            open_run(FIXTURES / "grpo"),
            ["grpo", "cispo"],
            config=ReplayConfig(device="cpu", step_range=step_range),
        )
        assert pickle.loads(pickle.dumps(result)).to_json() == result.to_json()


def test_a_dropped_result_frees_its_streamed_metrics() -> None:
    """The columns a result's series derived last are kept with that series: once the result
    is dropped, nothing holds its streamed metrics (a script that replays run after run
    holds one run's metrics at a time)."""
    result = replay_run(open_run(FIXTURES / "grpo"), ["grpo"], config=ReplayConfig(device="cpu"))
    series = result.policies[0].series
    metrics = weakref.ref(np.asarray(series["update_norm"]).base)
    assert metrics() is not None
    del result, series
    gc.collect()
    assert metrics() is None


def test_the_follower_holds_its_rows_once() -> None:
    """The follower behind watch and diff (`OwnReplay`) writes each step's rows into one
    buffer as it reads the run, a few steps at a time: its streamed pass is that buffer's
    filled rows, not a new join of every block read (the old stream() concatenated them at
    each call: a second copy of the rows), and equals a pass over the same steps at once."""
    run = open_run(FIXTURES / "grpo")
    follower = OwnReplay(run, ReplayConfig(device="cpu"))
    numbers = run.step_numbers[:30]
    for start in range(0, len(numbers), 7):
        follower.extend(numbers[start : start + 7])
    first, second = follower.stream(), follower.stream()
    assert np.shares_memory(first.metrics, second.metrics)
    whole = OwnReplay(open_run(FIXTURES / "grpo"), ReplayConfig(device="cpu"))
    whole.extend(numbers)
    assert first.step_numbers.tolist() == whole.stream().step_numbers.tolist()
    assert np.array_equal(first.metrics, whole.stream().metrics, equal_nan=True)
