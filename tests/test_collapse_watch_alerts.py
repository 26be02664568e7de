"""watch's alerts of the observed reward collapse on a live run (docs/watch.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stabledrl_cli.dump import Recorder
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.observed import observe
from stabledrl_cli.replay.watch.follow import RunWatcher


def test_a_collapse_after_one_the_reward_recovered_from_is_alerted(tmp_path: Path) -> None:
    """On a live run the collapse rule reads "stays below to the end" of the steps so far, so a
    dip is reported while it lasts and vanishes once the reward recovers. The alert was once
    per run: the dip's alert (step 65) was the only one, and the real collapse at step 205
    raised none, though the view and the finished run's replay report it."""
    noise = np.random.default_rng(0).normal(0.0, 0.02, 260)
    rewards = np.r_[np.full(60, 0.6), np.full(15, 0.1), np.full(125, 0.6), np.full(60, 0.05)]
    path = tmp_path / "live"
    watcher = RunWatcher(path, ReplayConfig(device="cpu"))
    alerted: list[tuple[int, int]] = []  # (step of the collapse, last step read)
    views: dict[int, int | None] = {}
    with Recorder(path, policy=None, reward_range=(0.0, 1.0)) as recorder:
        for step, reward in enumerate(rewards + noise):
            recorder.log_step(step, reward_mean=float(reward))
            if step % 5 == 4:
                alerted += [(a.step, step) for a in watcher.poll() if a.kind == "reward_collapse"]
                views[step] = watcher.state().first_reward_collapse
    assert observe(watcher.replay.run).first_reward_collapse == 205
    assert views[69] == 65 and views[99] is None and views[259] == 205
    assert alerted == [(65, 69), (205, 209)]
    assert watcher.poll() == []  # nothing new: no alert twice
