"""A run's checkpoints and the branch's temporary manifest are named in ASCII digits, ending
where the name ends: a file whose name has a final newline or another script's digits is a
user's file, never listed as a checkpoint (nor deleted as one by a run recorded over it), and
`--device cuda:N` takes ASCII digits only."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from stabledrl_cli.capture.branch_protocol import CHECKPOINTS_DIR, list_checkpoints
from stabledrl_cli.cli.app import app
from stabledrl_cli.example.old_run import checkpoint_files

ODD_NAMES = ("step-00000001.pt\n", "step-\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0663.pt",
             ".step-00000004.pt.tmp-1\n")  # fmt: skip


def test_only_the_writers_names_are_checkpoints(tmp_path: Path) -> None:
    directory = tmp_path / CHECKPOINTS_DIR
    directory.mkdir()
    for name in (*ODD_NAMES, "step-00000002.pt", ".step-00000005.pt.tmp-7"):
        (directory / name).write_bytes(b"x")
    assert list_checkpoints(tmp_path) == [(2, directory / "step-00000002.pt")]
    assert sorted(p.name for p in checkpoint_files(tmp_path)) == [
        ".step-00000005.pt.tmp-7",
        "step-00000002.pt",
    ]


def test_a_gpu_index_in_other_digits_is_no_device() -> None:
    grpo = Path(__file__).resolve().parents[1] / "fixtures" / "grpo"
    done = CliRunner().invoke(app, ["replay", str(grpo), "--device", "cuda:\u0661"])
    assert done.exit_code == 2
    assert "is not one of auto, cpu, cuda, cuda:N, mps" in done.stderr
