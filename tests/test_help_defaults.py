"""Every option of `record` and `replay` that takes a default when not given says which in its
help, and says the library's own default."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from stabledrl_cli.capture.bootstrap import NO_POLICY
from stabledrl_cli.capture.geometry import GeometryConfig
from stabledrl_cli.cli.app import app
from stabledrl_cli.example.config import ExampleConfig
from stabledrl_cli.replay.config import (
    DEFAULT_COLLAPSE_WINDOW,
    DEFAULT_DRIFT_THRESHOLD,
    DEFAULT_WINDOW,
)

runner = CliRunner()


def _help(command: str) -> dict[str, str]:
    """Each option's help, its lines joined, by its long name."""
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    records: dict[str, str] = {}
    name = ""
    for line in result.stdout.splitlines():
        start = re.match(r"^  (?:-\w, )?(--[\w-]+)", line)
        if start:
            name = start[1]
        if name and line.startswith("  "):
            records[name] = records.get(name, "") + " " + line.strip()
        elif not line.startswith("  "):
            name = ""
    return {key: " ".join(text.split()) for key, text in records.items()}


GEOMETRY = GeometryConfig()


@pytest.mark.parametrize(
    ("option", "default"),
    [
        ("--geometry-every", f"default {GEOMETRY.every}"),
        ("--geometry-k", f"default {GEOMETRY.k}"),
        ("--geometry-seed", f"default {GEOMETRY.seed}"),
        ("--geometry-method", f"{GEOMETRY.method} (the default"),
        ("--geometry-dtype", f"default {GEOMETRY.storage_dtype}"),
        ("--skip-nonfinite", "default --skip-nonfinite" if ExampleConfig().skip_nonfinite
         else "default --no-skip-nonfinite"),
    ],
)  # fmt: skip
def test_record_help_states_each_default(option, default):
    assert default in _help("record")[option]


@pytest.mark.parametrize(
    ("option", "default"),
    [
        ("--policy", "default: the run's own policy, then the standard catalogue"),
        ("--max-grad-norm", "default: none, clip_scale 1"),
        ("--window", f"default {DEFAULT_WINDOW}"),
        ("--drift-threshold", f"default {DEFAULT_DRIFT_THRESHOLD:g}"),
        ("--collapse-window", f"default {DEFAULT_COLLAPSE_WINDOW}"),
    ],
)
def test_replay_help_states_each_default(option, default):
    assert default in _help("replay")[option]


@pytest.mark.parametrize("command", ["replay", "check"])
def test_collapse_window_help_counts_rewards_not_steps(command):
    """The help said 'steps in the rolling mean of the recorded reward', where W counts reward
    draws, one a rollout: on the built-in example (4 steps a rollout) W = 10 spans 40 steps."""
    text = _help(command)["--collapse-window"]
    assert "one a rollout" in text
    assert "steps in the rolling mean" not in text


@pytest.mark.parametrize("option", ["--window", "--drift-threshold", "--collapse-window"])
def test_only_check_speaks_of_a_baseline(option):
    """replay takes no baseline, yet its help gave these defaults as 'calibrated, or the
    baseline's' (check's words), without the number."""
    assert "baseline" not in _help("replay")[option]
    assert "or the baseline's" in _help("check")[option]


def test_record_policy_help_says_a_command_has_no_default(tmp_path):
    """The help said '(default grpo)' for every use, where `record -- CMD` whose script calls
    log_policy_batch without policy= records nothing: a command's policy has no default."""
    assert "no default there" in _help("record")["--policy"]
    script = tmp_path / "train.py"
    script.write_text(
        "import numpy as np, stabledrl_cli as sd\n"
        "sd.log_policy_batch(0, logp=np.zeros(2, np.float32), logp_old=np.zeros(2, np.float32),"
        " advantages=np.ones(2, np.float32))\n",
        encoding="utf-8",
    )
    done = subprocess.run(
        [sys.executable, "-m", "stabledrl_cli", "record", "--out", str(tmp_path / "run"),
         "--no-optimizer-hooks", "--", sys.executable, str(script)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert NO_POLICY in done.stderr
