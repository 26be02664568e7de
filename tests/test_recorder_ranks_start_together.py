"""Ranks of one run that start together (verl's ranks open their Recorders at the first step,
at the same moment): each makes the run directory if it is not there yet, and the directory
another rank makes while this one looks at the path is a directory, not a reason to refuse
the run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from test_recorder_resume import _ranked

import stabledrl_cli as sd
from stabledrl_cli.errors import UsageError


def _made_by_another_rank_after_the_first_look(path: Path, monkeypatch: Any) -> None:
    """Another rank's mkdir of `path` lands just after this process's first look at it
    (whether anything is there, or whether it is a directory), as it did under load."""
    looked = False

    def then_made(answer: bool) -> bool:
        nonlocal looked
        if not looked:
            looked = True
            path.mkdir()
        return answer

    is_dir, lexists = Path.is_dir, os.path.lexists

    def patched_is_dir(self: Path, *args: Any, **kwargs: Any) -> bool:
        answer = is_dir(self, *args, **kwargs)
        return then_made(answer) if self == path else answer

    def patched_lexists(name: Any) -> bool:
        answer = lexists(name)
        return then_made(answer) if os.fspath(name) == os.fspath(path) else answer

    monkeypatch.setattr(Path, "is_dir", patched_is_dir)
    monkeypatch.setattr(os.path, "lexists", patched_lexists)


@pytest.mark.parametrize("overwrite", [True, False], ids=["overwrite", "new"])
@pytest.mark.parametrize("rank", [0, 1])
def test_a_run_directory_another_rank_makes_meanwhile_is_recorded_into(
    tmp_path: Path, monkeypatch: Any, rank: int, overwrite: bool
) -> None:
    """Before, a rank that found no directory and then, looking again, something there
    refused the run ("exists and is not a directory"): under the verl integration that rank
    recorded nothing, and the run read back with no step (every step missed a rank) or, for
    rank 0, no manifest. Failed on the old code for each rank, with overwrite and without."""
    path = tmp_path / "run"
    _made_by_another_rank_after_the_first_look(path, monkeypatch)
    _ranked(path, rank, [0, 1], overwrite=overwrite)
    monkeypatch.undo()
    _ranked(path, 1 - rank, [0, 1], overwrite=overwrite)
    assert sd.open_run(path).step_numbers == [0, 1]


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ({"unit": "sequence"}, "its unit is 'token', this recorder's 'sequence'"),
        ({"policy": "dapo"}, "its policy is 'grpo', this recorder's 'dapo'"),
        ({"world_size": 3}, "its world_size is 2, this recorder's 3"),
    ],
)
def test_a_rank_that_disagrees_with_rank_0s_run_is_refused(tmp_path, given, said):
    """Before, rank 1 of unit 'sequence' recorded into rank 0's 'token' run: its sequences'
    log-probs were read as tokens' (3 sequences joined, no finding); one of another policy
    or world_size was recorded too. A rank that agrees (grpo spelled with its default) joins."""
    path = tmp_path / "run"
    with sd.Recorder(path, world_size=2, rank=0, policy="grpo"):
        with pytest.raises(UsageError) as refused:
            sd.Recorder(path, **({"world_size": 2, "rank": 1} | given))
        assert str(refused.value) == f"{path}: rank 1 cannot join the run there: {said}"
        assert os.listdir(path / "steps") == [".writer.rank-0000.lock"]  # rank 0's
        sd.Recorder(path, world_size=2, rank=1, policy="grpo:eps_low=0.2").close()


def test_a_rank_refused_by_an_earlier_runs_manifest_is_not_told_rank_0_made_it(tmp_path):
    """A relaunch of 4 ranks into a finished run of 2, without overwrite=True: rank 3 (no
    file there) finds the old manifest. Before, its line said 'cannot join the run rank 0
    made', a run no rank of this launch made (rank 0 is refused as not empty)."""
    path = tmp_path / "run"
    for rank in (0, 1):
        _ranked(path, rank, [0])
    with pytest.raises(UsageError) as refused:
        sd.Recorder(path, world_size=4, rank=3)
    assert str(refused.value) == (
        f"{path}: rank 3 cannot join the run there: its world_size is 2, this recorder's 4"
    )
