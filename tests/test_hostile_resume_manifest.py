"""A Recorder resuming a run (or a rank joining it) names the run's manifest values that
differ from its own: a crafted manifest's policy spec (up to 1 MB) went whole into that line.
It is cut as any spec is (`quoted_spec`), its length said."""

from __future__ import annotations

from pathlib import Path

import pytest
from _corpus import edit_manifest, tiny_run

import stabledrl_cli as sd
from stabledrl_cli.errors import UsageError

LONG = 900_000


def test_a_long_policy_of_the_run_is_cut_in_the_refusal(tmp_path: Path) -> None:
    run = edit_manifest(tiny_run(tmp_path / "run"), lambda m: m["policy"].update(spec="x" * LONG))
    with pytest.raises(UsageError) as refused:
        sd.Recorder(run, policy="grpo", reward_range=(0.0, 1.0), resume=True)
    message = str(refused.value)
    assert len(message) < 300 + len(str(run)), message[:300]
    assert f"its policy is {'x' * 40!r}... ({LONG:,} characters), this recorder's 'grpo'" in message


def test_a_long_estimator_of_the_run_is_cut_in_the_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A resume given another estimator warns that the run keeps its own: a crafted one of
    1 MB went whole into the warning."""
    run = tiny_run(tmp_path / "run")
    edit_manifest(run, lambda m: m.update(estimator={"kind": "x" * LONG}))
    capsys.readouterr()
    with sd.Recorder(run, policy="grpo", estimator={"kind": "elbo"}, resume=True):
        pass
    (line,) = capsys.readouterr().err.splitlines()
    assert len(line) < 300 + len(str(run)), line[:300]
    assert (
        f'keeps its estimator {{"kind": "{"x" * 47}...; this recorder\'s {{"kind": "elbo"}} is'
        in line
    )
