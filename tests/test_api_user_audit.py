"""What a researcher with a hand-written dLLM RL loop meets in the Python API, as the docs
describe it: a Recorder's manifest that says its policy one way, `help()` on the public names
that reads without the package's private modules, a step with no token or too large for
memory, and a replay that prints nothing but says everything in its result."""

from __future__ import annotations

import functools
import inspect
import json
import re
from pathlib import Path

import numpy as np
import pytest

import stabledrl_cli as sd
from stabledrl_cli import errors as sd_errors


def _policy_entry(run: Path, policy: str, params: dict[str, object] | None) -> object:
    with sd.Recorder(run, policy=policy, policy_params=params) as recorder:  # type: ignore[arg-type]
        recorder.log_step(0, logp=np.zeros((2, 4)), logp_old=np.zeros((2, 4)), advantages=[1, -1])
    return json.loads((run / "manifest.json").read_text())["policy"]


def test_a_policy_parameter_given_as_text_is_stored_as_its_spec_reads_it(tmp_path: Path) -> None:
    """`policy_params={"eps_low": "0.1"}` (a value read from a config file as text) wrote the spec
    `grpo:eps_low=0.1` beside `params: {"eps_low": "0.1"}`, where the same spec given as a string
    stores the number 0.1: the manifest disagreed with itself, and with the other spelling."""
    as_text = _policy_entry(tmp_path / "text", "grpo", {"eps_low": "0.1"})
    in_spec = _policy_entry(tmp_path / "spec", "grpo:eps_low=0.1", None)
    assert (
        as_text
        == in_spec
        == {"spec": "grpo:eps_low=0.1", "name": "grpo", "params": {"eps_low": 0.1}}
    )
    custom = _policy_entry(tmp_path / "custom", "mine", {"flag": "true", "mode": "fast"})
    assert custom == _policy_entry(tmp_path / "custom-spec", "mine:flag=true,mode=fast", None)
    assert custom["params"] == {"flag": True, "mode": "fast"}  # type: ignore[index]


def _public_members(kind: type) -> dict[str, object]:
    """`kind`'s public methods and properties (and `__enter__`), by qualified name: what
    `help()` shows a docstring for (a data field has none to show)."""
    names = [name for name in dir(kind) if not name.startswith("_") or name == "__enter__"]
    members = {name: inspect.getattr_static(kind, name) for name in names}
    return {
        f"{kind.__name__}.{name}": getattr(kind, name)
        for name, member in members.items()
        if inspect.isfunction(member) or isinstance(member, (property, functools.cached_property))
    }


def test_help_on_the_recording_and_reading_api_names_no_private_module() -> None:
    """`help(sd.Recorder)` pointed a user at `_policy`, `_setup`, `_run_env.forced_run` and
    `_run_target.check_not_in_a_run`, and left most of its keywords unexplained; `log_step`,
    `close`, `open_run` and `Run.manifest` named private modules too, and `Run.unit`,
    `.policy_spec`, `.reward_range`, `.geometry` and `Recorder.__enter__` said nothing."""
    from stabledrl_cli.dump._run import Run
    from stabledrl_cli.dump._step import Step
    from stabledrl_cli.replay.result import PolicyResult, ReplayResult

    documented: dict[str, object] = {"open_run": sd.open_run, "replay": sd.replay}
    documented |= {"log_policy_batch": sd.log_policy_batch, "Recorder": sd.Recorder}
    for kind in (sd.Recorder, Run, Step, ReplayResult, PolicyResult):
        documented |= _public_members(kind)
    private = re.compile(r"`[\w.]*(?<![\w_])_[a-z]\w*")  # `_setup`, `dump._remote`
    undocumented = [name for name, value in documented.items() if not inspect.getdoc(value)]
    assert undocumented == []
    naming = {
        name: private.findall(inspect.getdoc(value) or "") for name, value in documented.items()
    }
    assert {name: found for name, found in naming.items() if found} == {}


def test_the_recorder_docstring_explains_each_of_its_keywords() -> None:
    doc = inspect.getdoc(sd.Recorder) or ""
    keywords = [name for name in inspect.signature(sd.Recorder).parameters]
    assert [name for name in keywords if f"{name}:" not in doc and f"{name}," not in doc] == []


def test_a_step_with_no_token_is_refused_and_its_scalars_alone_replay(tmp_path: Path) -> None:
    """docs/recording.md: a batch whose every sequence was filtered out (no token) is refused by
    `log_step`, naming why, and the step logged as its scalars alone is skipped by `replay`."""
    batch = {"logp": -np.ones((2, 3)), "logp_old": -np.ones((2, 3)), "advantages": [1.0, -1.0]}
    with sd.Recorder(tmp_path / "run") as recorder:
        recorder.log_step(0, **batch, loss=0.5)
        with pytest.raises(sd_errors.UsageError, match="at least one token"):
            recorder.log_step(1, logp=np.zeros((0, 3)), logp_old=np.zeros((0, 3)), advantages=[])
        recorder.log_step(1, loss=0.25, grad_norm=1.0)
        recorder.log_step(2, **batch, loss=0.5)
    result = sd.replay(tmp_path / "run", policies="grpo")
    assert (result.steps, result.scalar_steps, result.missing_steps) == (2, 1, 0)


_NO_MEMORY_HOLDS_IT = np.broadcast_to(np.float64(-0.5), (2**30, 2**20))
"""A view of 2**50 log-probs (a tensor `.expand`ed by mistake), whose float32 copy (4 PiB, past
a process's 47-bit address space) no machine can allocate: the copy fails at once, whatever the
system's overcommit setting."""


def test_a_step_too_large_for_memory_is_a_write_error_not_a_memory_error(tmp_path: Path) -> None:
    """`log_step(0, logp=t.expand(10**6, 10**6), ...)` raised numpy's MemoryError (a traceback
    no doc names) out of the training loop, under `on_write_error="warn"` too, whose Recorder
    promises to warn once and let the training go on: the step could not be recorded, which is
    a WriteError (exit 4), and under "warn" the stop that any failed write is."""
    huge = dict.fromkeys(("logp", "logp_old", "advantages"), _NO_MEMORY_HOLDS_IT)
    with sd.Recorder(tmp_path / "raise") as recorder:
        with pytest.raises(sd_errors.WriteError, match=r"step 0: .*out of memory"):
            recorder.log_step(0, **huge)  # type: ignore[arg-type]
        recorder.log_step(0, logp=[-0.5], logp_old=[-0.5], advantages=[1.0], seq_id=[0])
    assert sd.open_run(tmp_path / "raise").step_numbers == [0]
    with sd.Recorder(tmp_path / "warn", on_write_error="warn") as recorder:
        recorder.log_step(0, **huge)  # type: ignore[arg-type]
        recorder.log_step(1, logp=[-0.5], logp_old=[-0.5], advantages=[1.0], seq_id=[0])
    run = sd.open_run(tmp_path / "warn")
    assert run.step_numbers == []
    assert "out of memory" in run.manifest["recording_stopped"]["reason"]


def test_replay_prints_nothing_and_its_result_says_what_the_command_warns_of(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`sd.replay`'s docstring: the warnings of `stabledrl replay` (a run still recorded, steps
    missing, a step range with no step) are in the result, not on stderr."""
    batch = {"logp": -np.ones((2, 3)), "logp_old": -np.ones((2, 3)), "advantages": [1.0, -1.0]}
    with sd.Recorder(tmp_path / "run") as recorder:
        for step in (0, 1, 3):
            recorder.log_step(step, **batch)
        result = sd.replay(tmp_path / "run", policies="grpo", step_range=(10, 20))
    assert capsys.readouterr().err == ""
    assert result.live is not None and result.live.held
    assert (result.steps, result.missing_steps, result.policy("grpo").steps) == (3, 1, [])
