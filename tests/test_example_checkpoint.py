"""Checkpoints of the built-in example: written at rollout boundaries, read as data only, and a
resume reproduces the original run's recorded arrays bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from stabledrl_cli.capture.branch_protocol import checkpoints_dir, list_checkpoints
from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import Recorder, open_run
from stabledrl_cli.errors import InputError, UsageError
from stabledrl_cli.example import ExampleConfig
from stabledrl_cli.example.checkpoint import (
    CheckpointPlan,
    load_checkpoint,
)
from stabledrl_cli.example.run_setup import recorder_kwargs
from stabledrl_cli.example.trainer import train
from stabledrl_cli.policies import get_policy

CONFIG = ExampleConfig(seed=2, steps=16, pretrain_steps=10)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _record(out: Path, config: ExampleConfig, **kwargs: object) -> None:
    policy = get_policy(config.policy)
    with Recorder(out, **recorder_kwargs(config, policy)) as recorder:
        train(config, recorder=recorder, **kwargs)  # type: ignore[arg-type]


def test_a_resume_at_step_k_reproduces_the_recorded_arrays_bit_for_bit(tmp_path):
    original = tmp_path / "original"
    _record(
        original, CONFIG, checkpoints=CheckpointPlan(directory=checkpoints_dir(original), every=8)
    )
    assert [step for step, _ in list_checkpoints(original)] == [0, 8]

    state = load_checkpoint(checkpoints_dir(original) / "step-00000008.pt")
    assert (state.step, state.rollout) == (8, 2)  # a rollout boundary (mu = 4)
    resumed = tmp_path / "resumed"
    _record(resumed, CONFIG, resume=state)

    a, b = open_run(original), open_run(resumed)
    assert b.step_numbers == list(range(8, 16))
    for n in b.step_numbers:
        old, new = a.step(n), b.step(n)
        timeless = {k: v for k, v in old.scalars.items() if k != "wall_time"}
        assert timeless == {k: v for k, v in new.scalars.items() if k in timeless}
        for name in ("logp", "logp_old", "advantages", "reward", "mask"):
            assert torch.equal(old[name], new[name]), (n, name)


def test_a_checkpoint_interval_off_the_rollout_grid_saves_at_the_next_boundary(tmp_path):
    config = ExampleConfig(seed=2, steps=12, pretrain_steps=2)
    train(config, checkpoints=CheckpointPlan(directory=tmp_path, every=5))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["step-00000000.pt", "step-00000008.pt"]  # 5 -> 8, 10 -> 12 = the end


def test_resume_refuses_other_settings_and_reads_data_only(tmp_path):
    config = ExampleConfig(seed=2, steps=4, pretrain_steps=2)
    train(config, checkpoints=CheckpointPlan(directory=tmp_path, every=4))
    state = load_checkpoint(tmp_path / "step-00000000.pt")
    with pytest.raises(UsageError, match="lr"):
        train(ExampleConfig(seed=2, steps=4, pretrain_steps=2, lr=1e-3), resume=state)
    junk = tmp_path / "step-00000004.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a readable checkpoint"):
        load_checkpoint(junk)


class _Runs:
    """Unpickled, it would run a command: a checkpoint is data, never code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_checkpoint_holding_code_is_refused_in_one_line_and_never_run(tmp_path, protocol):
    """A pickle of another protocol than torch's (4, as pickle.dump writes) made torch print a
    UserWarning of two lines, with its source line, beside the error line."""
    import pickle
    import warnings

    marker = tmp_path / "ran"
    path = tmp_path / "step-00000000.pt"
    path.write_bytes(pickle.dumps({"format": _Runs(marker)}, protocol=protocol))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InputError, match=r"not a readable checkpoint \(UnpicklingError\)"):
            load_checkpoint(path)
    assert not marker.exists()


def test_record_steps_is_a_deprecated_alias_of_rl_steps(tmp_path):
    out = tmp_path / "run"
    (out / "x").mkdir(parents=True)  # non-empty: refused after the warning, before training
    result = CliRunner().invoke(app, ["record", "--out", str(out), "--steps", "2"])
    assert result.exit_code == 2 and "--force" in result.stderr
    assert result.stderr.count("deprecated") == 1 and "--rl-steps" in result.stderr
    both = CliRunner().invoke(app, ["record", "--out", str(out), "--steps", "2", "--rl-steps", "3"])
    assert both.exit_code == 2 and "give one of them" in both.stderr
    help_text = CliRunner().invoke(app, ["record", "--help"], env={"COLUMNS": "200"}).output
    assert "--rl-steps" in help_text and "--checkpoint-every" in help_text
    assert "--steps " not in help_text


def test_record_over_a_run_removes_the_half_checkpoint_a_killed_writer_left(tmp_path):
    """A writer killed while it saved a checkpoint leaves it under its temporary name
    (`.step-XXXXXXXX.pt.tmp-PID`): recording again over the run (--force) removes it with the
    run's other checkpoints, as it removes the step files' temporaries. It stayed, for good."""
    out = tmp_path / "run"
    Recorder(out, policy="grpo").close()
    left = out / "checkpoints" / ".step-00000008.pt.tmp-4242"
    left.parent.mkdir(parents=True)
    left.write_bytes(b"half a checkpoint")
    other = out / "checkpoints" / "notes.txt"  # not a checkpoint's: left alone
    other.write_text("mine")
    args = ["record", "--out", str(out), "--force", "--rl-steps", "1", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert not left.exists() and other.exists()


def test_record_force_never_removes_checkpoints_of_a_directory_that_holds_no_run(tmp_path):
    """`record --out PROJECT --force` into a folder that holds no run but a
    `checkpoints/step-00001000.pt` of its own (a project's training checkpoint) removed that
    file as an old run's checkpoint. It is refused, exit 2, before anything changes."""
    out = tmp_path / "project"
    mine = out / "checkpoints" / "step-00001000.pt"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"my model's weights")
    args = ["record", "--out", str(out), "--force", "--rl-steps", "1", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"error: {mine}: no run's ({out} holds no manifest.json); recording over a run "
        "(--force) removes its checkpoints and branches, never what is no run's: remove it, or "
        "record elsewhere\n"
    )
    assert mine.read_bytes() == b"my model's weights"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]


@pytest.mark.parametrize("every", [None, "4"])
def test_record_force_never_writes_or_removes_checkpoints_through_a_symlink(tmp_path, every):
    """A run's `checkpoints` that is a symlink is refused, exit 3, before the run changes.
    Before, `record --force` removed the checkpoints of the folder it points at (an
    `--rl-steps 8` run, with `--checkpoint-every 4` or without) and wrote its own there."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "step-00000000.pt").write_bytes(b"another run's checkpoint")
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").symlink_to(elsewhere)
    args = ["record", "--out", str(out), "--force", "--rl-steps", "8", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, *(["--checkpoint-every", every] if every else [])])
    assert result.exit_code == 3, result.output
    assert result.stderr == (
        f"error: {out / 'checkpoints'}: a symlink (nothing in a run is followed out of it)\n"
    )
    assert [p.name for p in elsewhere.iterdir()] == ["step-00000000.pt"]
    assert (elsewhere / "step-00000000.pt").read_bytes() == b"another run's checkpoint"
    assert not (out / "steps").exists()


def test_branch_never_reads_checkpoints_through_a_symlink(tmp_path):
    """`branch` on a run whose `checkpoints` links to another run's: exit 3, one line; before,
    it read (torch.load) the checkpoint out of the run."""
    other = tmp_path / "other"
    _record(other, CONFIG, checkpoints=CheckpointPlan(directory=checkpoints_dir(other), every=8))
    run = tmp_path / "run"
    _record(run, CONFIG)
    (run / "checkpoints").symlink_to(other / "checkpoints")
    result = CliRunner().invoke(app, ["branch", str(run), "--at", "8", "-p", "grpo"])
    assert result.exit_code == 3, result.output
    assert result.stderr == (
        f"error: {run / 'checkpoints'}: a symlink (nothing in a run is followed out of it)\n"
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [("step", float("inf")), ("rollout", float("inf")), ("step", 4.5), ("rollout", -1),
     ("step", True)],
)  # fmt: skip
def test_a_checkpoint_whose_step_or_rollout_is_no_count_is_refused_naming_it(tmp_path, key, value):
    """A checkpoint is data: an infinite step or rollout ended `branch` with 'internal error:
    OverflowError' (exit 70), and 4.5 was read as step 4."""
    from stabledrl_cli.example.checkpoint import FORMAT

    data = {"format": FORMAT, "step": 4, "rollout": 1, "model": {}, "optimizer": {},
            "rng": torch.zeros(1, dtype=torch.uint8), "config": {}}  # fmt: skip
    data[key] = value
    path = tmp_path / "step-00000004.pt"
    torch.save(data, path)
    with pytest.raises(InputError, match=rf"{path}: its {key} is not a whole number >= 0"):
        load_checkpoint(path)


def test_a_checkpoint_that_unpacks_past_its_size_is_refused_before_it_is_loaded(tmp_path):
    """A zip bomb: torch.save stores its members uncompressed, but torch.load also inflates a
    compressed one, allocating its whole size first. A 3.3 MB checkpoint whose tensor storage
    was deflated from 2 GiB of zeros made `branch` take 2.4 GB (13 s) before its 'not a
    readable checkpoint (RuntimeError)'; it is refused from the zip directory's sizes."""
    import io
    import zipfile

    from stabledrl_cli.example.checkpoint import FORMAT

    saved = io.BytesIO()
    data = {"format": FORMAT, "step": 4, "rollout": 1, "model": {"w": torch.zeros(4)},
            "optimizer": {}, "rng": torch.zeros(1, dtype=torch.uint8), "config": {}}  # fmt: skip
    torch.save(data, saved)
    path = tmp_path / "step-00000004.pt"
    with zipfile.ZipFile(saved) as source, zipfile.ZipFile(path, "w") as bomb:
        for member in source.infolist():
            if member.filename.endswith("/data/0"):  # the storage of `w`
                member.compress_type = zipfile.ZIP_DEFLATED
                with bomb.open(member, "w") as inflated:
                    for _ in range(64):
                        inflated.write(bytes(1 << 20))
            else:
                bomb.writestr(member, source.read(member))
    size = path.stat().st_size
    with pytest.raises(InputError, match=rf"unpacks to \d+ bytes, more than its {size}\)$"):
        load_checkpoint(path)


@pytest.fixture(scope="module")
def _saved_state(tmp_path_factory):
    config = ExampleConfig(seed=2, steps=8, pretrain_steps=2)
    directory = tmp_path_factory.mktemp("checkpoints")
    train(config, checkpoints=CheckpointPlan(directory=directory, every=4))
    return config, directory / "step-00000004.pt"  # after RL steps: AdamW moments held


def _group(key: str, value: object):
    return lambda data: data["optimizer"]["param_groups"][0].update({key: value})


def _moments(key: str, value):
    return lambda data: [m.update({key: value(m)}) for m in data["optimizer"]["state"].values()]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_group("lr", "x"), r"AdamW settings differ from the optimizer's own \(lr:"),
        (_group("lr", float("nan")), r"AdamW settings differ .* \(lr:"),
        (_group("betas", (0.9,)), r"AdamW settings differ .* \(betas:"),
        (_group("amsgrad", "yes"), r"AdamW settings differ .* \(amsgrad:"),
        (_moments("step", lambda m: torch.tensor([1.0, 2.0])), "AdamW step count is not one"),
        (_moments("step", lambda m: torch.tensor(-1.0)), "AdamW step count is not one"),
        (_moments("exp_avg", lambda m: m["exp_avg"] * float("inf")), "AdamW exp_avg is not fin"),
        (_moments("exp_avg_sq", lambda m: -1 - m["exp_avg_sq"]), "AdamW exp_avg_sq is not fin"),
        (
            lambda data: data["model"].update(
                {k: v * float("nan") for k, v in data["model"].items()}
            ),
            "its model parameter .* is not finite",
        ),
    ],
)
def test_a_checkpoint_training_cannot_go_on_from_is_refused_before_the_branch(
    _saved_state, tmp_path, edit, message
):
    """A checkpoint is data: AdamW settings of another type or value (a string lr, one beta,
    a string amsgrad), a step count of two numbers or a non-finite model passed the restore and
    ended `branch` with 'internal error: TypeError' (or ValueError, KeyError, RuntimeError),
    exit 70, after the branch run was opened; a NaN lr or a negative step trained on."""
    from stabledrl_cli.example.rollout_state import check_restorable

    config, saved = _saved_state
    data = torch.load(saved, weights_only=True)
    edit(data)
    path = tmp_path / saved.name
    torch.save(data, path)
    with pytest.raises(InputError, match=message):
        check_restorable(load_checkpoint(path), config)
    check_restorable(load_checkpoint(saved), config)  # the checkpoint as written restores


def test_a_branch_records_the_geometry_its_original_recorded(tmp_path):
    """A run recorded with `--geometry gram` branched under its own policy trained the same
    steps, bit for bit, but recorded no geometry: `diff` said the two parted at the branch
    point (unit_grad_gram and grad_norm_covered only in the original, exit 1) and the branch
    replayed with the coefficient proxy. Its checkpoints now carry the geometry settings."""
    from stabledrl_cli.capture.geometry import GeometryConfig

    config = ExampleConfig(seed=2, steps=8, pretrain_steps=2)
    geometry = GeometryConfig(kind="gram", every=2)
    original = tmp_path / "original"
    with Recorder(original, **recorder_kwargs(config, get_policy("grpo"), geometry)) as recorder:
        plan = CheckpointPlan(directory=checkpoints_dir(original), every=4)
        train(config, recorder=recorder, geometry=geometry, checkpoints=plan)
    args = ["branch", str(original), "--at", "4", "-p", "grpo", "--out", str(tmp_path / "b")]
    assert CliRunner().invoke(app, args).exit_code == 0
    branch = tmp_path / "b" / "grpo@4"
    diff = CliRunner().invoke(app, ["diff", str(original), str(branch)])
    assert diff.exit_code == 0, diff.stdout
    assert open_run(branch).manifest["geometry"] == open_run(original).manifest["geometry"]


def test_a_branch_of_a_guarded_run_goes_on_under_its_guard(tmp_path):
    """`record --guard ... --checkpoint-every N` saved checkpoints without the guard, and a
    branch from one trained unguarded: under the run's own policy it parted from its original
    at step 22 (diff exit 1), the guard having skipped step 21 there. Checkpoints now carry
    the guard and the grad norms it was asked about; the branch rebuilds it from them and
    never parts, skipping step 21 as the original did."""
    original = tmp_path / "original"
    guard = ["--guard", "skip", "--guard-rule", "skip-step:window=8,sigma=2"]
    args = ["record", "--out", str(original), "--rl-steps", "24", "--checkpoint-every", "8"]
    recorded = CliRunner().invoke(app, [*args, *guard])
    assert recorded.exit_code == 0, recorded.output
    skipped = open_run(original).scalar_series("guard_action")
    assert 21 in skipped[0][skipped[1] == 2]  # the guard acts after the branch point
    args = ["branch", str(original), "--at", "8", "-p", "grpo", "--out", str(tmp_path / "b")]
    assert CliRunner().invoke(app, args).exit_code == 0
    branch = tmp_path / "b" / "grpo@8"
    diff = CliRunner().invoke(app, ["diff", str(original), str(branch)])
    assert diff.exit_code == 0, diff.stdout
    meta = open_run(branch).manifest["meta"]
    assert meta["guard"] == open_run(original).manifest["meta"]["guard"]
