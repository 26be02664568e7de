"""Recorder -> open_run round trips, refusals, input validation, versions, integrity."""

from __future__ import annotations

import errno
import json
import math
import os
import sys
import warnings

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import RunIntegrityWarning, _step_encoding, pack_run
from stabledrl_cli.dump._integrity import gap_findings
from stabledrl_cli.errors import InputError, UsageError, WriteError


def _token_batch(seed: int, batch: int = 3, length: int = 5) -> dict:
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(batch, length, generator=gen)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 1:] = False
    return {
        "logp": logp,
        "logp_old": logp - 0.1 * torch.rand(batch, length, generator=gen),
        "advantages": torch.randn(batch, generator=gen),
        "mask": mask,
    }


def test_token_round_trip_exact(tmp_path):
    path = tmp_path / "run"
    inputs = [_token_batch(seed) for seed in range(3)]
    with sd.Recorder(
        path,
        policy="ppo",
        policy_params={"eps_low": 0.2, "eps_high": 0.28, "agg": "token-mean"},
        meta={"model": "tiny", "seed": 7},
        estimator={"mask_scheme": "random", "mc_samples": 2},
        reward_range=(0, 1),
    ) as rec:
        for step, batch in zip((0, 1, 5), inputs, strict=True):
            rec.log_step(
                step,
                **batch,
                group_id=np.array([0, 0, 1]),
                reward=np.array([1.0, 0.0, 0.5]),
                logp_ref=batch["logp"].double() - 0.5,
                grad_norm=torch.tensor(1.5),
                loss=-0.25,
                lr=3e-6,
                inner_step=0,
                scalars={"kl": 0.125, "entropy": 2.0},
            )

    run = sd.open_run(path)
    manifest = run.manifest
    assert manifest["format_version"] == "1.0" and manifest["tool_version"] == sd.__version__
    assert run.policy_spec == "ppo:agg=token-mean,eps_high=0.28,eps_low=0.2"
    assert manifest["policy"]["name"] == "ppo"
    assert manifest["policy"]["params"] == {"eps_low": 0.2, "eps_high": 0.28, "agg": "token-mean"}
    assert manifest["meta"] == {"model": "tiny", "seed": 7}
    assert manifest["estimator"] == {"mask_scheme": "random", "mc_samples": 2}
    assert run.unit == "token" and run.reward_range == (0.0, 1.0) and run.geometry is None
    assert manifest["world_size"] == 1
    assert run.step_numbers == [0, 1, 5] and len(run) == 3

    steps = list(run)
    assert [s.step for s in steps] == [0, 1, 5]
    for step, batch in zip(steps, inputs, strict=True):
        assert step.fields == {
            "logp", "logp_old", "advantages", "mask", "seq_id", "group_id", "reward", "logp_ref",
        }  # fmt: skip
        assert step.num_tokens == 15 and step.num_sequences == 3 and step.num_scored_tokens == 9
        assert torch.equal(step["logp"], batch["logp"].reshape(-1))
        assert torch.equal(step["logp_old"], batch["logp_old"].reshape(-1))
        expected_adv = batch["advantages"][:, None].expand(3, 5).reshape(-1)
        assert torch.equal(step["advantages"], expected_adv)
        assert torch.equal(step["mask"], batch["mask"].reshape(-1).to(torch.uint8))
        assert torch.equal(step["seq_id"], torch.arange(3, dtype=torch.int32).repeat_interleave(5))
        assert torch.equal(step["logp_ref"], (batch["logp"].double() - 0.5).float().reshape(-1))
        assert step["group_id"].dtype == torch.int32
        assert step["group_id"].tolist() == [0, 0, 1]
        assert step["reward"].tolist() == [1.0, 0.0, 0.5]
        assert step.get("loss_weight") is None and "loss_weight" not in step
        scalars = step.scalars
        assert scalars["grad_norm"] == 1.5 and scalars["loss"] == -0.25 and scalars["lr"] == 3e-6
        assert scalars["kl"] == 0.125 and scalars["entropy"] == 2.0
        assert scalars["reward_mean"] == 0.5  # defaults to reward.mean()
        assert scalars["inner_step"] == 0.0 and scalars["nonfinite"] == 0.0
        assert scalars["step"] == float(step.step) and "wall_time" in scalars
    with pytest.raises(KeyError, match="loss_weight"):
        steps[0]["loss_weight"]
    assert run.step(5).step == 5
    steps_, values = run.scalar_series("kl")
    assert steps_.tolist() == [0, 1, 5] and values.tolist() == [0.125] * 3
    assert [(f.kind, f.step) for f in run.integrity.findings] == [("gap", 2)]  # steps 2..4


def test_flat_numpy_input_and_nonfinite_count(tmp_path):
    path = tmp_path / "run"
    logp = np.array([-1.0, np.nan, -0.5, -np.inf, -2.0], dtype=np.float64)
    mask = np.array([1, 1, 1, 0, 1], dtype=np.int64)  # the -inf sits on a padding position
    with sd.Recorder(path) as rec:
        rec.log_step(
            3,
            logp=logp,
            logp_old=np.zeros(5, dtype=np.float32),
            advantages=np.ones(5, dtype=np.float16),
            mask=mask,
            seq_id=np.array([0, 0, 1, 1, 2], dtype=np.int64),
            loss=float("nan"),
        )
    step = sd.open_run(path).step(3)
    assert step["logp"].dtype == torch.float32
    np.testing.assert_array_equal(step["logp"].numpy(), logp.astype(np.float32))
    assert step["seq_id"].tolist() == [0, 0, 1, 1, 2] and step["mask"].tolist() == [1, 1, 1, 0, 1]
    assert step.num_sequences == 3
    # the NaN logp on a scored token and the NaN loss; the masked -inf is padding
    assert step.scalars["nonfinite"] == 2.0
    assert np.isnan(step.scalars["loss"])


def test_finite_values_whose_sum_overflows_are_not_counted_nonfinite(tmp_path):
    """log_step counts non-finite values from a sum first; a sum that overflows is no proof."""
    big = np.array([-3e38, -3e38, -1.0], dtype=np.float32)
    with sd.Recorder(tmp_path / "run", unit="sequence") as rec:
        rec.log_step(0, logp=big, logp_old=big, advantages=np.ones(3, np.float32))
    assert sd.open_run(tmp_path / "run").step(0).scalars["nonfinite"] == 0.0


def test_reward_mean_leaves_out_unscorable_sequences(tmp_path):
    """A NaN reward marks a sequence that could not be scored (TRL's None): the derived
    reward_mean is over the others (TRL's logged reward is the same nanmean); a step with no
    scored sequence has none to average (NaN)."""
    with sd.Recorder(tmp_path / "run", policy="grpo", policy_params={}) as rec:
        for step, reward in enumerate(([0.5, np.nan], [np.nan, np.nan])):  # 2 sequences
            rec.log_step(step, **_flat(), reward=np.array(reward, np.float32))
    means = [s.scalars["reward_mean"] for s in sd.open_run(tmp_path / "run")]
    assert means[0] == 0.5 and np.isnan(means[1])


def test_sequence_unit_round_trip(tmp_path):
    path = tmp_path / "run"
    elbo = torch.tensor([-3.0, -2.5, -4.0, -1.0])
    with sd.Recorder(
        path, policy="stabledrl", policy_params={"c": 5.0}, unit="sequence",
        estimator={"mask": "independent", "mc_samples": 4},
    ) as rec:  # fmt: skip
        rec.log_step(
            0,
            logp=elbo,
            logp_old=elbo + 0.3,
            advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]),
            group_id=torch.tensor([0, 0, 1, 1]),
            reward=torch.tensor([1.0, 0.0, 1.0, 0.0]),
            unit_grad_sketch=torch.arange(8, dtype=torch.float16).reshape(4, 2),
            unit_grad_sketch_scale=0.5,
            grad_norm_covered=2.0,
        )
    run = sd.open_run(path)
    assert run.unit == "sequence" and run.policy_spec == "stabledrl:c=5"
    step = run.step(0)
    assert step["seq_id"].tolist() == [0, 1, 2, 3]  # defaults to arange for unit sequence
    assert torch.equal(step["logp"], elbo) and torch.equal(step["logp_old"], elbo + 0.3)
    assert step["unit_grad_sketch"].dtype == torch.float16
    assert step["unit_grad_sketch"].float().reshape(-1).tolist() == list(range(8))
    assert step.scalars["unit_grad_sketch_scale"] == 0.5
    assert step.scalars["grad_norm_covered"] == 2.0 and step.num_sequences == 4


def test_strided_and_broadcast_inputs_are_recorded_as_their_values(tmp_path):
    """A column view x[:, 0], a broadcast (stride 0) tensor and a reversed numpy view are
    stored as the values they show, not as the memory they point into."""
    path = tmp_path / "run"
    table = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    with sd.Recorder(path, policy="reinforce:agg=recorded", unit="sequence") as rec:
        rec.log_step(
            0,
            logp=table[:, 0],
            logp_old=table[:, 1],
            advantages=np.arange(6, dtype=np.float32)[::-1],
            loss_scale=torch.tensor(7.0).expand(6),
        )
    step = sd.open_run(path).step(0)
    assert step["logp"].tolist() == [0.0, 4.0, 8.0, 12.0, 16.0, 20.0]
    assert step["logp_old"].tolist() == [1.0, 5.0, 9.0, 13.0, 17.0, 21.0]
    assert step["advantages"].tolist() == [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    assert step["loss_scale"].tolist() == [7.0] * 6


def test_geometry_and_param_norms(tmp_path):
    path = tmp_path / "run"
    geometry = {"kind": "gram", "params": ["lm_head.weight"], "every": 1}
    gram = np.eye(4, dtype=np.float64) * 2.0
    with sd.Recorder(path, geometry=geometry, param_names=["a", "b"]) as rec:
        rec.log_step(
            0, logp=np.zeros(4, np.float32), logp_old=np.zeros(4, np.float32),
            advantages=np.ones(4, np.float32), seq_id=np.array([0, 0, 1, 1]),
            unit_grad_gram=gram, param_grad_norm=np.array([1.0, 2.0]),
        )  # fmt: skip
    run = sd.open_run(path)
    assert run.geometry == geometry and run.manifest["param_names"] == ["a", "b"]
    step = run.step(0)
    assert step["unit_grad_gram"].dtype == torch.float32
    assert torch.equal(step["unit_grad_gram"], torch.eye(4) * 2.0)
    assert step["param_grad_norm"].tolist() == [1.0, 2.0]


def test_refuses_to_overwrite_unless_told(tmp_path):
    path = tmp_path / "run"
    with sd.Recorder(path) as rec:
        rec.log_step(0, **_token_batch(0))
        rec.log_step(1, **_token_batch(1))
    with pytest.raises(UsageError, match="overwrite=True"):
        sd.Recorder(path)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("x")
    with pytest.raises(UsageError, match="not empty"):
        sd.Recorder(other)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        sd.Recorder(tmp_path / "file")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(UsageError, match=r"is a symlink to .*nowhere, which does not exist"):
        sd.Recorder(tmp_path / "dangling")
    foreign = tmp_path / "webapp"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"name": "webapp"}')
    with pytest.raises(UsageError, match="is not a stabledrl run's manifest"):
        sd.Recorder(foreign, overwrite=True)
    assert (foreign / "manifest.json").read_text() == '{"name": "webapp"}'
    with sd.Recorder(path, overwrite=True, policy="dapo") as rec:
        rec.log_step(7, **_token_batch(2))
    run = sd.open_run(path)
    assert run.step_numbers == [7] and run.policy_spec == "dapo"


def _flat(n: int = 4) -> dict:
    return {
        "logp": np.zeros(n, np.float32),
        "logp_old": np.zeros(n, np.float32),
        "advantages": np.ones(n, np.float32),
        "seq_id": np.array([0, 0, 1, 1][:n]),
    }


def test_a_foreign_manifest_is_named_without_the_overwrite_hint(tmp_path):
    """A directory whose manifest.json is another tool's was 'not empty; pass overwrite=True', and
    overwrite=True was then refused ('is not a stabledrl run's manifest'): the refusal now comes
    first, without the hint that cannot help."""
    foreign = tmp_path / "webapp"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"name": "webapp"}')
    with pytest.raises(UsageError) as refused:
        sd.Recorder(foreign)
    assert str(refused.value) == (
        f"{foreign / 'manifest.json'} is not a stabledrl run's manifest: replacing a run would "
        "overwrite it; remove it, or record elsewhere"
    )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"logp_old": np.zeros(3, np.float32)}, "logp_old"),
        ({"advantages": np.ones(5, np.float32)}, "advantages"),
        ({"logp": np.zeros(4, np.int64)}, "logp"),
        ({"seq_id": np.array([0.0, 0.0, 1.0, 1.0])}, "seq_id"),
        ({"seq_id": np.array([0, 0, -1, 1])}, "seq_id"),
        ({"seq_id": None}, "seq_id"),
        ({"mask": np.array([0, 1, 2, 1])}, "mask"),
        ({"mask": np.ones(3)}, "mask"),
        ({"group_id": np.array([0, 1, 2])}, "group_id"),
        ({"group_id": np.array([0, -1])}, "group_id"),
        ({"reward": np.array([1.0])}, "reward"),
        ({"reward": np.array(["1", "0"])}, "reward"),
        ({"logp_ref": np.zeros(2, np.float32)}, "logp_ref"),
        ({"unit_grad_gram": np.eye(3, dtype=np.float32)}, "unit_grad_gram"),
        ({"unit_grad_sketch": np.zeros((4, 2), np.float16)}, "unit_grad_sketch"),
        ({"unit_grad_sketch": np.zeros((3, 2), np.float32)}, "unit_grad_sketch"),
        ({"loss": "high"}, "loss"),
        ({"grad_norm": np.ones(2)}, "grad_norm"),
        ({"scalars": {"_crc": 1.0}}, "scalars"),
        ({"scalars": {"loss": 1.0}}, "scalars"),
        ({"logp_old": None}, "logp_old"),
    ],
)
def test_log_step_validation_names_the_field(tmp_path, change, field):
    with sd.Recorder(tmp_path / "run") as rec:
        with pytest.raises(UsageError, match=field):
            rec.log_step(0, **{**_flat(), **change})
        rec.log_step(0, **_flat())  # a refused step leaves the recorder usable
    assert sd.open_run(tmp_path / "run").step_numbers == [0]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"logp": torch.empty(4, device="meta")}, "logp"),
        ({"logp_old": torch.zeros(4).to_sparse()}, "logp_old"),
        ({"advantages": torch.ones(4).to(torch.float8_e4m3fn)}, "advantages"),
        ({"logp": torch.zeros(4, dtype=torch.cfloat).conj().imag}, "logp"),  # negative bit
        ({"loss": torch.tensor(1.0, device="meta")}, "loss"),
        ({"grad_norm": 10**400}, "grad_norm"),
        ({"scalars": {"kl_coef": torch.ones(1, device="meta")}}, "kl_coef"),
    ],
)
def test_tensors_numpy_cannot_take_are_a_usage_error_naming_the_field(tmp_path, change, field):
    # Not the NotImplementedError, TypeError, RuntimeError or OverflowError of the conversion.
    with sd.Recorder(tmp_path / "run") as rec:
        with pytest.raises(UsageError, match=field):
            rec.log_step(0, **{**_flat(), **change})
        rec.log_step(0, **_flat())
    assert sd.open_run(tmp_path / "run").step_numbers == [0]


@pytest.mark.parametrize("name", ["step", "wall_time", "nonfinite"])
def test_a_scalar_the_recorder_sets_is_refused_without_pointing_at_a_keyword(tmp_path, name):
    # log_step has no wall_time= or nonfinite= keyword to pass them as
    with sd.Recorder(tmp_path / "run") as rec:
        refused = f"'{name}' is a standard scalar; it is set by the Recorder"
        with pytest.raises(UsageError, match=refused) as info:
            rec.log_step(0, **_flat(), scalars={name: 1.0})
        assert f"{name}=" not in str(info.value)


def test_a_step_header_past_the_readers_bound_is_refused_not_written_unreadable(
    tmp_path, monkeypatch
):
    """The readers refuse a step header longer than HEADER_LIMIT (safetensors' 100 MB cap)
    as unreadable: before, log_step wrote such a step (a long scalar name) and returned, and
    the finished step was lost. The bound is lowered here so that the test stays small."""
    monkeypatch.setattr(_step_encoding, "HEADER_LIMIT", 4096)
    with sd.Recorder(tmp_path / "run") as rec:
        with pytest.raises(UsageError, match=r"header of \d+ bytes is larger than 4096") as info:
            rec.log_step(0, **_flat(), scalars={"x" * 5000: 1.0})
        assert "\n" not in str(info.value)
        rec.log_step(0, **_flat(), scalars={"x": 1.0})
    run = sd.open_run(tmp_path / "run")
    assert run.step_numbers == [0] and run.integrity.findings == []


@pytest.mark.parametrize("scalars", [[("acc", 1.0)], "acc", 1.0])
@pytest.mark.parametrize("batch", [True, False])
def test_scalars_that_are_no_mapping_are_a_usage_error(tmp_path, scalars, batch):
    """Before, a list of pairs (or any non-mapping) was an AttributeError ('list' object has
    no attribute 'get' / 'items'), not the one clear line of a UsageError."""
    with sd.Recorder(tmp_path / "run") as rec:
        with pytest.raises(UsageError, match="scalars: expected a mapping of names to numbers"):
            rec.log_step(0, **(_flat() if batch else {}), scalars=scalars)
        rec.log_step(0, **_flat(), scalars={"acc": 1.0})
    assert sd.open_run(tmp_path / "run").step(0).scalars["acc"] == 1.0


@pytest.mark.parametrize(
    "argument",
    [
        {"meta": {"reward_funcs": ["acc_\udcff"]}},
        {"meta": {"\ud800": 1}},
        {"estimator": {"name": "k3\udcff"}},
        {"source": {"kind": "import", "path": "/runs/\udcff.jsonl"}},
    ],
)
def test_text_that_is_not_unicode_is_refused_not_written_unreadable(tmp_path, argument):
    """A lone surrogate (a name decoded from a non-UTF-8 file name) in the manifest's JSON:
    before, the Recorder wrote it escaped and every reader refused the whole run (exit 3,
    'a string with a lone surrogate')."""
    with pytest.raises(UsageError, match="must be JSON-serializable"):
        sd.Recorder(tmp_path / "run", **argument)
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_a_scalar_name_that_is_not_unicode_is_refused_not_written_unreadable(tmp_path):
    """Before, the step was written and its reader found it unreadable ('header has a string
    with a lone surrogate'): a finished step lost."""
    with sd.Recorder(tmp_path / "run") as rec:
        with pytest.raises(UsageError, match="scalars: name 'acc_\\\\udcff'"):
            rec.log_step(0, **_flat(), scalars={"acc_\udcff": 1.0})
        rec.log_step(0, **_flat(), scalars={"acc_\u00e9": 1.0})
    run = sd.open_run(tmp_path / "run")
    assert run.integrity.findings == [] and run.step(0).scalars["acc_\u00e9"] == 1.0


def test_what_the_readers_or_pack_refuse_is_refused_when_recorded(tmp_path):
    """A scalar name holding a NUL (pack cannot write it: HDF5 ends a name there) and a
    sketch of no columns (a reader skips its step: it measures no update) were recorded;
    each is now refused by log_step, and the run goes on and packs."""
    with sd.Recorder(tmp_path / "run") as rec:
        with pytest.raises(UsageError, match="holds a NUL character"):
            rec.log_step(0, **_flat(), scalars={"acc\x00b": 1.0})
        with pytest.raises(UsageError, match="k >= 1"):
            rec.log_step(0, **_flat(), unit_grad_sketch=np.zeros((4, 0), np.float32))
        rec.log_step(0, **_flat(), scalars={"acc": 1.0})
    pack_run(sd.open_run(tmp_path / "run"), tmp_path / "run.h5")
    assert sd.open_run(tmp_path / "run.h5").step(0).scalars["acc"] == 1.0


def test_step_numbers_and_constructor_are_checked(tmp_path):
    with sd.Recorder(tmp_path / "run", param_names=["a"]) as rec:
        rec.log_step(4, **_flat())
        with pytest.raises(UsageError, match=r"^step 4 was logged already"):
            rec.log_step(4, **_flat())
        with pytest.raises(
            UsageError, match=r"^step 3 does not follow step 4; steps must increase$"
        ):
            rec.log_step(3, **_flat())
        with pytest.raises(UsageError, match="step must be"):
            rec.log_step(-1, **_flat())
        for not_a_step in (True, 5.0, "5"):
            with pytest.raises(UsageError, match="step must be"):
                rec.log_step(not_a_step, **_flat())
        # a tensor with no data: before, the RuntimeError of Tensor.item()
        with pytest.raises(UsageError, match="step must be"):
            rec.log_step(torch.tensor(5, device="meta"), **_flat())
        rec.log_step(np.int64(5), **_flat())  # numpy and 0-d torch integers are steps
        rec.log_step(torch.tensor(6), **_flat())
        with pytest.raises(UsageError, match="param_grad_norm"):
            rec.log_step(7, **_flat(), param_grad_norm=np.ones(2))
    with pytest.raises(UsageError, match="closed"):
        rec.log_step(9, **_flat())
    for kwargs, word in [
        ({"unit": "word"}, "unit"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"reward_range": (1, 0)}, "reward_range"),
        ({"reward_range": (0, float("inf"))}, "reward_range"),
        ({"reward_range": ("low", 1)}, "reward_range"),
        ({"reward_range": (0,)}, "reward_range"),
        ({"policy_params": {"eps": [1]}}, "eps"),
        ({"meta": {"x": object()}}, "meta"),
        ({"policy": "a:b"}, "policy"),
    ]:
        with pytest.raises(UsageError, match=word):
            sd.Recorder(tmp_path / f"bad-{word}", **kwargs)
    nested: list = []
    for _ in range(sys.getrecursionlimit() + 10):  # nested past what json.dumps can encode
        nested = [nested]
    with pytest.raises(UsageError, match=r"^meta must be JSON-serializable: "):
        sd.Recorder(tmp_path / "deep", meta={"a": nested})  # before, a RecursionError
    # Before, a TypeError or ValueError of dict() ('dictionary update sequence element #0 ...')
    for name, value in [
        ("meta", [1, 2]),
        ("estimator", "elbo"),
        ("geometry", ["gram"]),
        ("policy_params", [("eps_high", 0.3)]),
    ]:
        with pytest.raises(UsageError, match=f"^{name} must be a dict, got "):
            sd.Recorder(tmp_path / f"bad-{name}", **{name: value})
        assert not (tmp_path / f"bad-{name}").exists()


def test_async_writes_round_trip(tmp_path):
    path = tmp_path / "run"
    inputs = [_token_batch(seed) for seed in range(20)]
    with sd.Recorder(path, async_writes=True, queue_size=2) as rec:
        for step, batch in enumerate(inputs):
            rec.log_step(step, **batch)
            batch["logp"].fill_(0.0)  # the caller reuses its buffers at once: a snapshot was taken
    run = sd.open_run(path)
    assert run.step_numbers == list(range(20))
    for step in run:
        assert not torch.all(step["logp"] == 0.0)
        assert torch.equal(step["logp_old"], inputs[step.step]["logp_old"].reshape(-1))


def test_open_run_refuses_non_runs(tmp_path):
    with pytest.raises(InputError, match="no such run"):
        sd.open_run(tmp_path / "missing")
    too_long = tmp_path / ("r" * (os.pathconf(tmp_path, "PC_NAME_MAX") + 1))
    with pytest.raises(InputError, match=r"cannot read .*: File name too long$"):
        sd.open_run(too_long)  # before, the OSError of Path.exists() (Python 3.11)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"no manifest\.json"):
        sd.open_run(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match="unreadable manifest"):
        sd.open_run(bad)
    (bad / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(InputError, match="not a run"):
        sd.open_run(bad)
    report = tmp_path / "report.h5"
    with h5py.File(report, "w") as handle:
        handle.attrs["kind"] = "stabledrl-replay-report"
    with pytest.raises(InputError, match="not a run"):
        sd.open_run(report)
    (tmp_path / "text.txt").write_text("hello")
    with pytest.raises(InputError, match="not a run"):
        sd.open_run(tmp_path / "text.txt")


def _rewrite_manifest(path, **changes):
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(changes)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_version_newer_major_refused_newer_minor_read(tmp_path):
    path = tmp_path / "run"
    with sd.Recorder(path) as rec:
        rec.log_step(0, **_flat())
    _rewrite_manifest(path, format_version="3.0")
    with pytest.raises(InputError, match="newer"):
        sd.open_run(path)
    _rewrite_manifest(path, format_version="1.9", some_future_field={"x": 1})
    # A 1.9 step file: an extra tensor and extra metadata, written through the same encoder.
    from stabledrl_cli._atomic import write_atomic
    from stabledrl_cli.dump._step_encoding import encode_step
    from stabledrl_cli.dump._stfile import read_header

    step_path = path / "steps" / "step-00000001.safetensors"
    header = read_header(path / "steps" / "step-00000000.safetensors", deep=True)
    metadata = {k: v for k, v in header.metadata.items() if not k.startswith("_crc32")}
    metadata.update({"_format_version": "1.9", "future_note": "text", "future_scalar": "2.5"})
    metadata["step"] = "1.0"  # the header agrees with its file name
    tensors = {**{k: v for k, v in _flat().items()}, "future_array": np.ones(3, np.float32)}
    tensors["seq_id"] = tensors["seq_id"].astype(np.int32)
    tensors["mask"] = np.ones(4, np.uint8)
    write_atomic(step_path, encode_step(tensors, metadata))
    run = sd.open_run(path)
    assert run.format_version == (1, 9) and run.step_numbers == [0, 1]
    step = run.step(1)
    assert "future_array" not in step.fields and step.scalars["future_scalar"] == 2.5
    assert "future_note" not in step.scalars
    assert run.integrity.ok
    # A step file of a newer major inside an old run: reported and skipped, not read.
    metadata["_format_version"] = "2.0"
    write_atomic(step_path, encode_step(tensors, metadata))
    assert run.step_numbers == [0]
    assert [f.kind for f in run.integrity.findings] == ["unreadable"]


@pytest.mark.parametrize(
    ("version", "change", "newer"),
    [
        ("1.9", {"unit": "chunk"}, "; the run says format 1.9, newer than the 1.3 this"),
        ("1.3", {"unit": "chunk"}, None),
        ("2.1", {"loss_norm": "per_node"}, "; the run says format 2.1, newer than the 2.0 this"),
        ("1.0", {"group_ids": "per_node"}, None),
    ],
)
def test_a_value_a_newer_minor_may_add_is_refused_saying_the_run_is_newer(
    tmp_path, version, change, newer
):
    """A run of a newer minor version whose manifest holds a value this one does not know (1.1
    added group_ids "global" so) was refused as a 'corrupt manifest' and nothing else, read as
    damage; the line now says the run's format is newer than this tool's and to upgrade."""
    path = tmp_path / "run"
    with sd.Recorder(path) as rec:
        rec.log_step(0, **_flat())
    _rewrite_manifest(path, format_version=version, **change)
    with pytest.raises(InputError) as raised:
        sd.open_run(path)
    message = str(raised.value)
    assert (
        f"corrupt manifest: {next(iter(change))} must be" in message and raised.value.exit_code == 3
    )
    if newer is None:
        assert "the run says format" not in message
    else:
        assert message.endswith(f"{newer} stabledrl reads: upgrade stabledrl")


def test_a_per_rank_run_says_format_2_so_a_reader_of_major_1_refuses_it(tmp_path):
    """A run recorded with loss_norm="per_rank" said format 1.0, and a stabledrl of before
    loss_norm replayed it as "global" with exit 0: 2 ranks of 1 and 24 tokens under dapo gave
    update norm 0.204 and objective 0.108 where the ranks trained 0.349 and 0.375. Its manifest
    now says 2.0, which a reader of major version 1 refuses ("upgrade stabledrl", exit 3);
    this one reads it, and a "global" run says 1.0 as before."""
    from stabledrl_cli.dump import pack_run
    from stabledrl_cli.dump._versions import check_readable_version

    for loss_norm, version in (("per_rank", "2.0"), ("global", "1.0")):
        path = tmp_path / loss_norm
        for rank in range(2):
            with sd.Recorder(path, world_size=2, rank=rank, loss_norm=loss_norm) as rec:
                rec.log_step(0, **_flat())
        written = json.loads((path / "manifest.json").read_text())["format_version"]
        assert written == version
        assert sd.open_run(path).step_numbers == [0]
        pack_run(path, tmp_path / f"{loss_norm}.h5", compression="small")
        with h5py.File(tmp_path / f"{loss_norm}.h5") as handle:
            assert handle.attrs["format_version"] == version
    with pytest.raises(InputError, match=r"run format 2\.0 is newer than this tool reads \(1\.x\)"):
        check_readable_version("2.0", "manifest.json")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"reward_range": "0..1"}, "reward_range"),
        ({"reward_range": [0]}, "reward_range"),
        ({"reward_range": [None, None]}, "reward_range"),
        ({"reward_range": [1, 0]}, "reward_range"),
        ({"meta": [1, 2]}, "meta"),
        ({"estimator": "random"}, "estimator"),
        ({"policy": 5}, "policy"),
        ({"policy": {"spec": 5}}, "policy"),
        ({"geometry": "gram"}, "geometry"),
        ({"param_names": [1]}, "param_names"),
        ({"unit": "word"}, "unit"),
        ({"world_size": 0}, "world_size"),
        ({"world_size": True}, "world_size"),
    ],
)
def test_manifest_field_of_the_wrong_type_is_corrupt_input(tmp_path, changes, field):
    path = tmp_path / "run"
    with sd.Recorder(path) as rec:
        rec.log_step(0, **_flat())
    _rewrite_manifest(path, **changes)
    with pytest.raises(InputError, match=f"corrupt manifest: {field} must be") as info:
        sd.open_run(path)
    assert info.value.exit_code == 3 and "\n" not in str(info.value)


def _record(path, steps) -> None:
    with sd.Recorder(path) as rec:
        for step in steps:
            rec.log_step(step, **_token_batch(step), reward=np.array([0.0, 1.0, 0.5]), loss=0.5)


def test_corrupt_files_are_reported_and_skipped(tmp_path):
    path = tmp_path / "run"
    _record(path, range(8))
    steps_dir = path / "steps"
    good = (steps_dir / "step-00000000.safetensors").read_bytes()

    truncated = steps_dir / "step-00000002.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-7])
    flipped = steps_dir / "step-00000003.safetensors"
    data = bytearray(flipped.read_bytes())
    data[-3] ^= 0x10  # one bit of the last tensor's data
    flipped.write_bytes(bytes(data))
    header_flip = steps_dir / "step-00000004.safetensors"
    text = header_flip.read_bytes()
    header_flip.write_bytes(text.replace(b'"loss":"0.5"', b'"loss":"0.7"', 1))
    assert header_flip.read_bytes() != text
    (steps_dir / "step-00000005.safetensors").unlink()  # a gap
    (steps_dir / ".step-00000008.safetensors.tmp-999").write_bytes(good[: len(good) // 2])
    (steps_dir / "step-00000009.safetensors").write_bytes(good[:5])
    (steps_dir / "notes.txt").write_text("hi")

    run = sd.open_run(path)
    # Headers are checked on listing: the truncated files and the header flip are not listed.
    assert run.step_numbers == [0, 1, 3, 6, 7]
    with pytest.warns(RunIntegrityWarning, match="step 3"):
        read = [s.step for s in run]
    assert read == [0, 1, 6, 7]  # the data flip is found when the data is read
    assert run.step_numbers == [0, 1, 6, 7]  # and remembered while the file is unchanged
    kinds = {(f.kind, f.step) for f in run.integrity.findings}
    assert kinds == {
        ("torn", 2),
        ("unreadable", 3),
        ("unreadable", 4),
        ("gap", 5),
        ("temporary", 8),
        ("torn", 9),
        ("unknown_file", None),
    }
    assert not run.integrity.ok
    with pytest.raises(InputError, match="step 3"):
        run.step(3)
    with pytest.raises(InputError, match="step 2"):
        run.step(2)
    with pytest.raises(InputError, match="no step 5"):
        run.step(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run.scalar_series("loss")[0].tolist() == [0, 1, 6, 7]
    # verify=False trusts the data: the flipped step reads, with the flipped value.
    unverified = sd.open_run(path, verify=False)
    assert [s.step for s in unverified] == [0, 1, 3, 6, 7]


def test_a_bad_file_stays_out_until_it_changes(tmp_path):
    path = tmp_path / "run"
    _record(path, range(4))
    step_file = path / "steps" / "step-00000002.safetensors"
    original = step_file.read_bytes()
    run = sd.open_run(path)
    expected = run.step(2)["logp"].clone()
    assert run.scalar_series("loss")[0].tolist() == [0, 1, 2, 3]

    step_file.write_bytes(original[:-7])  # torn after it was checked and read
    for _ in range(2):  # the remembered failure reads the same each time
        assert run.step_numbers == [0, 1, 3]
        with pytest.raises(InputError, match=r"step 2 is torn: .* the header needs"):
            run.step(2)
    assert [(f.kind, f.step) for f in run.integrity.findings] == [("torn", 2)]
    assert run.scalar_series("loss")[0].tolist() == [0, 1, 3]

    step_file.write_bytes(original)  # repaired: checked again, listed and read again
    assert run.step_numbers == [0, 1, 2, 3]
    assert run.integrity.ok
    step = run.step(2)
    assert torch.equal(step["logp"], expected)
    assert step.scalars["loss"] == 0.5
    assert (step.num_tokens, step.num_sequences) == (15, 3)
    assert run.scalar_series("loss")[1].tolist() == [0.5] * 4


@pytest.mark.parametrize(
    ("steps", "gaps"),
    [
        ([10, 20, 30, 37], []),  # every 10th, then the last step: no step is missing
        ([1, 10, 20, 30], []),  # TRL's logging_first_step, then every 10th
        ([0, 1, 5], ["steps 2..4 missing (3 step(s), stride 1)"]),
        ([0, 10, 20, 50, 60, 63], ["steps 30..40 missing (2 step(s), stride 10)"]),
    ],
)
def test_a_gap_is_a_whole_number_of_strides(steps, gaps):
    """A log of every 10th step that ends off the stride (10, 20, 30, 37: TRL's last step)
    read 'steps 17..13 missing (0 step(s), stride 7)' and 'steps 27..23 ...', against the
    smallest difference (7): `inspect` called a whole log damaged. The stride is the most
    common difference (the smallest of those as common), and only a difference of a whole
    number of strides misses steps."""
    assert [f.message for f in gap_findings(steps)] == gaps


def test_gaps_follow_the_recording_stride(tmp_path):
    path = tmp_path / "run"
    _record(path, [0, 10, 20, 50, 60])
    findings = sd.open_run(path).integrity.findings
    assert [(f.kind, f.step) for f in findings] == [("gap", 30)]
    assert "steps 30..40" in findings[0].message


def test_multi_rank_step_joins_ranks(tmp_path):
    path = tmp_path / "run"
    recorders = [sd.Recorder(path, world_size=2, rank=r) for r in (0, 1)]
    for step in range(2):
        for rank, rec in enumerate(recorders):
            rec.log_step(
                step,
                logp=torch.full((2, 3), -1.0 - rank),
                logp_old=torch.full((2, 3), -1.0),
                advantages=torch.tensor([1.0, -1.0]),
                group_id=np.array([0, 0]),
                reward=np.array([1.0, 0.0]) if rank == 0 else np.array([1.0, 1.0]),
                loss=float(rank),
                grad_norm=3.0,
            )
    for rec in recorders:
        rec.close()
    assert sorted(os.listdir(path / "steps"))[:2] == [
        "step-00000000.rank-0000.safetensors",
        "step-00000000.rank-0001.safetensors",
    ]
    run = sd.open_run(path)
    step = run.step(1)
    assert step.num_tokens == 12 and step.num_sequences == 4
    assert step["seq_id"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert step["group_id"].tolist() == [0, 0, 1, 1]
    assert step["logp"].tolist() == [-1.0] * 6 + [-2.0] * 6
    assert step.scalars["reward_mean"] == 0.75 and step.scalars["loss"] == 0.5
    assert step.scalars["grad_norm"] == 3.0
    (path / "steps" / "step-00000001.rank-0001.safetensors").unlink()
    assert run.step_numbers == [0]
    assert [(f.kind, f.step) for f in run.integrity.findings] == [("missing_rank", 1)]
    # A step another rank has not written (yet: a live run) is left out of a pass without a
    # warning, as `step_numbers` leaves it out; the integrity check names it.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [s.step for s in sd.open_run(path)] == [0]


def test_multi_rank_sketches_join_and_gram_is_left_out(tmp_path):
    """Ranks' sketches join into the global batch's; their Grams do not (a step records one
    geometry or the other, so each is its own run here)."""
    for geometry in ("sketch", "gram"):
        path = tmp_path / geometry
        for rank, scale in ((0, 0.5), (1, 2.0)):
            logged = (
                {"unit_grad_sketch": np.full((2, 3), 4.0, np.float16),
                 "unit_grad_sketch_scale": scale}
                if geometry == "sketch"
                else {"unit_grad_gram": np.eye(2, dtype=np.float32)}
            )  # fmt: skip
            with sd.Recorder(path, world_size=2, rank=rank, unit="sequence") as rec:
                rec.log_step(
                    0,
                    logp=np.zeros(2, np.float32),
                    logp_old=np.zeros(2, np.float32),
                    advantages=np.ones(2, np.float32),
                    **logged,
                )
    gram_step = sd.open_run(tmp_path / "gram").step(0)
    assert "unit_grad_gram" not in gram_step.fields  # the cross-rank entries were never recorded
    step = sd.open_run(tmp_path / "sketch").step(0)
    sketch = step["unit_grad_sketch"]
    assert sketch.dtype == torch.float32
    assert sketch[:, 0].tolist() == [2.0, 2.0, 8.0, 8.0]  # each rank dequantized by its scale
    assert "unit_grad_sketch_scale" not in step.scalars


def test_multi_rank_arrays_whose_columns_differ_are_an_input_error(tmp_path):
    """Each rank's Recorder checks its own [N, k] and [U, k] arrays only: ranks whose k differ
    made the join's np.concatenate raise ValueError, an internal error (exit 70) of inspect,
    replay and pack. Joining them is an input error naming the step file and both shapes; a
    sketch of another k is left out of the join instead (two Omegas never join, as sketches
    of other seeds: test_geometry_ranks), the step replayed with coefficient norms."""
    path = tmp_path / "run"
    for rank, k in ((0, 3), (1, 5)):
        with sd.Recorder(path, world_size=2, rank=rank, unit="sequence") as rec:
            for step in range(2):
                rec.log_step(
                    step,
                    logp=np.zeros(2, np.float32),
                    logp_old=np.zeros(2, np.float32),
                    advantages=np.ones(2, np.float32),
                    token_ids=np.zeros((2, k if step == 1 else 3), np.int64),
                    unit_grad_sketch=np.ones((2, k if step == 1 else 3), np.float32),
                )
    step = sd.open_run(path).step(1)
    with pytest.raises(
        InputError,
        match=r"cannot join the ranks' token_ids: rank 0's has shape \[2, 3\], rank 1's \[2, 5\]",
    ):
        step.array("token_ids")
    assert (step.unjoined, step.sketch_widths) == ({"unit_grad_sketch"}, (3, 5))
    assert sd.open_run(path).step(0)["token_ids"].shape == (4, 3)
    packed = CliRunner().invoke(app, ["pack", str(path), str(tmp_path / "out.h5")])
    replayed = CliRunner().invoke(app, ["replay", str(path), "-p", "grpo", "--device", "cpu"])
    assert packed.exit_code == 3, packed.stderr
    assert "cannot join the ranks' " in packed.stderr and "Traceback" not in packed.stderr
    assert replayed.exit_code == 0, replayed.stderr
    assert "different widths k (3, 5), which do not join" in replayed.stderr  # no token_ids read


def test_an_empty_part_joins_whatever_the_width_of_its_token_ids(tmp_path):
    """A rank whose part of the step holds no sequence has no row of token_ids: the width k
    of its [0, k] says nothing. Before, an empty part logged with an [N] token_ids of N = 0
    (stored [0, 1]) beside rank 0's [2, 3] was refused as ranks of different k, and pack of the run
    stopped, exit 3 ("cannot join the ranks' token_ids: rank 0's has shape [2, 3], rank 1's
    [0, 1]"). The join takes rank 0's rows."""
    path = tmp_path / "run"
    ids = np.arange(6, dtype=np.int64).reshape(2, 3)
    with sd.Recorder(path, world_size=2, rank=0, unit="sequence") as rec:
        rec.log_step(
            0, logp=[-1.0, -2.0], logp_old=[-1.0, -2.0], advantages=[1.0, -1.0], token_ids=ids
        )
    with sd.Recorder(path, world_size=2, rank=1, unit="sequence") as rec:
        empty = np.zeros(0, np.float32)
        rec.log_step(
            0, logp=empty, logp_old=empty, advantages=empty, token_ids=np.zeros(0, np.int64)
        )
    assert sd.open_run(path).step(0)["token_ids"].tolist() == ids.tolist()
    packed = CliRunner().invoke(app, ["pack", str(path), str(tmp_path / "out.h5")])
    assert packed.exit_code == 0, packed.stderr
    assert sd.open_run(tmp_path / "out.h5").step(0)["token_ids"].tolist() == ids.tolist()


def test_an_empty_part_joins_whatever_the_width_of_its_sketch(tmp_path):
    """A rank whose part of the step holds no sequence has no row of unit_grad_sketch: the k of
    its [0, k] says nothing of its Omega, as token_ids' k says nothing. Before, rank 0's empty
    part logged with a [0, 1] sketch beside rank 1's [2, 3] left the sketch out of the step as
    drawn with two Omegas ('sketch_widths_differ'), and its sketch_width read 1."""
    path = tmp_path / "run"
    rows = np.arange(6, dtype=np.float32).reshape(2, 3)
    with sd.Recorder(path, world_size=2, rank=0, unit="sequence") as rec:
        empty = np.zeros(0, np.float32)
        rec.log_step(
            0, logp=empty, logp_old=empty, advantages=empty, unit_grad_sketch=np.zeros((0, 1))
        )
    with sd.Recorder(path, world_size=2, rank=1, unit="sequence") as rec:
        rec.log_step(
            0, logp=[-1.0, -2.0], logp_old=[-1.0, -2.0], advantages=[1.0, -1.0],
            unit_grad_sketch=rows,
        )  # fmt: skip
    step = sd.open_run(path).step(0)
    assert (step.unjoined, step.unjoined_why, step.sketch_width) == (frozenset(), None, 3)
    assert step["unit_grad_sketch"].tolist() == rows.tolist()
    packed = CliRunner().invoke(app, ["pack", str(path), str(tmp_path / "out.h5")])
    assert packed.exit_code == 0, packed.stderr
    assert sd.open_run(tmp_path / "out.h5").step(0)["unit_grad_sketch"].tolist() == rows.tolist()


def test_bfloat16_and_token_ids(tmp_path):
    path = tmp_path / "run"
    logp = torch.tensor([[-1.0, -0.5], [-0.25, -2.0]], dtype=torch.bfloat16)
    with sd.Recorder(path) as rec:
        rec.log_step(
            0,
            logp=logp,
            logp_old=logp,
            advantages=torch.tensor([1.0, -1.0], dtype=torch.float64),
            token_ids=torch.tensor([[11, 12], [13, 14]]),
        )
    step = sd.open_run(path).step(0)
    assert step["logp"].tolist() == [-1.0, -0.5, -0.25, -2.0]
    assert step["token_ids"].dtype == torch.int64 and step["token_ids"].shape == (2, 2)


def test_token_ids_of_one_name_a_sequence_are_read_back(tmp_path):
    """docs/run-format.md: token_ids is [N] or [N, k]. An [N] array was written as it was
    given, and every reader refused the step as unreadable (they read [N, k] only): the
    step was lost. It is stored as [N, 1], one name a sequence; replay and pack read it."""
    path = tmp_path / "run"
    with sd.Recorder(path) as rec:
        rec.log_step(0, **_flat(), token_ids=np.array([7, -9]))
    run = sd.open_run(path)
    assert run.integrity.ok, run.integrity.findings
    assert run.step(0).array("token_ids").tolist() == [[7], [-9]]
    assert CliRunner().invoke(app, ["pack", str(path), str(tmp_path / "run.h5")]).exit_code == 0
    assert sd.open_run(tmp_path / "run.h5").step(0).array("token_ids").tolist() == [[7], [-9]]


def test_token_ids_are_names_not_indices_so_negative_ones_are_kept(tmp_path):
    # docs/run-format.md: token offsets or text hashes, int64; a signed hash is negative half
    # the time, and HF pads with -100. Ids that index (seq_id, group_id) stay >= 0.
    names = np.array([[-5_283_173_402_221_861_137, -100], [2**63 - 1, 0]], dtype=np.int64)
    with sd.Recorder(tmp_path / "run") as rec:
        rec.log_step(0, **_flat(), token_ids=names)
        with pytest.raises(UsageError, match="token_ids: id 9223372036854775808 does not fit"):
            rec.log_step(1, **_flat(), token_ids=np.array([[2**63], [0]], dtype=np.uint64))
    assert sd.open_run(tmp_path / "run").step(0)["token_ids"].tolist() == names.tolist()


def test_async_writer_failure_reaches_the_caller(tmp_path, monkeypatch):
    from stabledrl_cli import _atomic

    def no_disk(fd):  # the writer thread's fsync of a step
        raise OSError(errno.EIO, "Input/output error")

    rec = sd.Recorder(tmp_path / "run", async_writes=True, queue_size=1)
    monkeypatch.setattr(_atomic.os, "fsync", no_disk)
    rec.log_step(0, **_flat())
    with pytest.raises(WriteError, match=r"step-00000000\.safetensors.*Input/output error"):
        rec.flush()
    with pytest.raises(WriteError, match=r"step-00000001\.safetensors.*Input/output error"):
        rec.log_step(1, **_flat())  # raises if the thread has met step 1's failure, else close
        rec.close()
    rec.close()  # each failure is raised once
    assert os.listdir(tmp_path / "run" / "steps") == []  # the files that failed are removed


def test_per_rank_ids_that_outgrow_their_dtype_across_ranks_are_refused(tmp_path):
    """Rank 0's group ids reach int32's top: numbered after them, rank 1's cannot be int32.
    Reading the joined field is one InputError; replay skips the step, and with no other step
    exits 3 with one error line (after its progress line)."""
    path = tmp_path / "run"
    recorders = [sd.Recorder(path, world_size=2, rank=r) for r in (0, 1)]
    for rank, rec in enumerate(recorders):
        rec.log_step(
            0,
            logp=np.full((2, 3), -1.0),
            logp_old=np.full((2, 3), -1.0),
            advantages=np.array([1.0, -1.0]),
            group_id=np.array([2**31 - 1, 0]) if rank == 0 else np.array([0, 0]),
            reward=np.array([1.0, 0.0]),
        )
        rec.close()
    step = sd.open_run(path).step(0)
    assert step.array("seq_id").tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    with pytest.raises(InputError, match="cannot join the ranks' group_id"):
        step.array("group_id")
    replayed = CliRunner().invoke(app, ["replay", str(path), "-p", "grpo"])
    assert replayed.exit_code == 3, replayed.stderr
    lines = [x for x in replayed.stderr.splitlines() if not x.startswith("replaying: ")]
    assert len(lines) == 1 and "no step could be read" in lines[0] and "int32 range" in lines[0]


def test_a_float64_past_float32s_range_is_recorded_as_inf_without_a_numpy_warning(tmp_path):
    """numpy printed 'RuntimeWarning: overflow encountered in cast' on the training's stderr,
    naming neither field nor step; the value is stored as inf and the step counts it."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with sd.Recorder(tmp_path / "run") as rec:
            rec.log_step(0, **{**_flat(), "logp": np.array([1e300, 0, 0, 0])})
    step = sd.open_run(tmp_path / "run").step(0)
    assert step["logp"][0].item() == math.inf and step.scalars["nonfinite"] == 1.0


def test_an_async_log_step_waits_for_room_in_a_full_queue_as_the_docs_say(tmp_path, monkeypatch):
    """async_writes on a disk slower than the training: once `queue_size` steps wait and one
    is being written, log_step waits for the writer to take one (the training runs at most
    `queue_size + 1` steps ahead of the disk, the loss bound on a crash). The docs said the
    training thread never waits for the disk; they now say when it does."""
    import threading

    from _cli import ROOT

    from stabledrl_cli.dump import _step_writes

    disk = threading.Event()
    durable = _step_writes.make_step_durable

    def slow_disk(*args: object) -> None:
        disk.wait()
        durable(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(_step_writes, "make_step_durable", slow_disk)
    with sd.Recorder(tmp_path / "run", policy=None, async_writes=True, queue_size=2) as rec:
        for step in range(3):  # one taken by the writer, two waiting
            rec.log_step(step, grad_norm=1.0)
        fourth = threading.Thread(target=rec.log_step, args=(3,), kwargs={"grad_norm": 1.0})
        fourth.start()
        fourth.join(timeout=0.3)
        assert fourth.is_alive()  # the queue is full: it waits
        disk.set()
        fourth.join(timeout=60)
        assert not fourth.is_alive()
    assert sd.open_run(tmp_path / "run").step_numbers == [0, 1, 2, 3]
    for doc in ("docs/run-format.md", "docs/recording.md"):
        text = " ".join((ROOT / doc).read_text().split())
        assert "never waits for the disk" not in text, doc
        assert "finds the queue full waits" in text, doc


_OS_FILES = (".DS_Store", "._step-00000000.safetensors", "Thumbs.db", "desktop.ini")
"""What macOS Finder and Windows Explorer leave in a folder they show."""


def test_a_file_browsers_files_are_no_finding_and_go_when_the_run_is_recorded_over(tmp_path):
    """A .DS_Store (._NAME, Thumbs.db, desktop.ini) in RUN/steps was an `unknown_file` finding
    of `inspect` for good, and recording over the run (overwrite=True, `record --force`) left
    it there and in RUN: the reader now passes over them (a folder so named is still a
    finding), and the run recorded over goes without them."""
    path = tmp_path / "run"
    with sd.Recorder(path, policy="grpo") as recorder:
        recorder.log_step(0, grad_norm=1.0)
    for folder in (path, path / "steps"):
        for name in _OS_FILES:
            (folder / name).write_bytes(b"\0\5\26\7")
    assert sd.open_run(path).integrity.findings == []
    (path / "steps" / "._folder").mkdir()
    (finding,) = sd.open_run(path).integrity.findings
    assert (finding.kind, finding.message) == (
        "unknown_file",
        "._folder: not a step file of this run",
    )
    with sd.Recorder(path, policy="grpo", overwrite=True) as recorder:
        recorder.log_step(0, grad_norm=2.0)
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "steps"]
    names = sorted(p.name for p in (path / "steps").iterdir())
    assert names == ["._folder", "step-00000000.safetensors"]


def test_a_folder_holding_only_a_file_browsers_files_is_recorded_into(tmp_path):
    """A folder made in Finder (its .DS_Store, Thumbs.db...) was refused by a Recorder as 'already
    exists and is not empty (.DS_Store); pass overwrite=True': it is recorded into as an empty
    one, and any other file is still refused."""
    path = tmp_path / "run"
    path.mkdir()
    for name in _OS_FILES:
        (path / name).write_bytes(b"\0")
    with sd.Recorder(path, policy="grpo") as recorder:
        recorder.log_step(0, grad_norm=1.0)
    assert sd.open_run(path).step_numbers == [0]
    other = tmp_path / "other"
    other.mkdir()
    (other / ".DS_Store").write_bytes(b"\0")
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match=r"not empty \(notes\.txt\)"):
        sd.Recorder(other, policy="grpo")


def test_an_empty_part_records_a_sketch_of_no_column(tmp_path):
    """The reader joins a rank's [0, 0] sketch (a part with no sequence has no row, whatever
    its k); the Recorder refused to write one: 'expected [U, k] with U = 0 and k >= 1, got
    [0, 0]'. A part with rows still needs k >= 1."""
    path = tmp_path / "run"
    rows = np.arange(6, dtype=np.float32).reshape(2, 3)
    empty = np.zeros(0, np.float32)
    with sd.Recorder(path, world_size=2, rank=0, unit="sequence") as rec:
        rec.log_step(
            0, logp=empty, logp_old=empty, advantages=empty, unit_grad_sketch=np.zeros((0, 0))
        )
    with sd.Recorder(path, world_size=2, rank=1, unit="sequence") as rec:
        with pytest.raises(UsageError, match=r"k >= 1, got \[2, 0\]"):
            rec.log_step(0, logp=[-1.0, -2.0], logp_old=[-1.0, -2.0], advantages=[1.0, -1.0],
                         unit_grad_sketch=np.zeros((2, 0)))  # fmt: skip
        rec.log_step(
            0, logp=[-1.0, -2.0], logp_old=[-1.0, -2.0], advantages=[1.0, -1.0],
            unit_grad_sketch=rows,
        )  # fmt: skip
    run = sd.open_run(path)
    assert run.integrity.ok
    step = run.step(0)
    assert (step.unjoined, step.sketch_width) == (frozenset(), 3)
    assert step["unit_grad_sketch"].tolist() == rows.tolist()


def test_an_empty_parts_sketch_refusal_does_not_ask_for_a_column(tmp_path):
    """An empty part takes a sketch of any k ([0, 0] too); before, one of the wrong shape was
    told 'expected [U, k] with U = 0 and k >= 1', a k it does not need."""
    empty = np.zeros(0, np.float32)
    rec = sd.Recorder(tmp_path / "run", world_size=2, rank=0, unit="sequence")
    with rec, pytest.raises(UsageError) as refused:
        rec.log_step(0, logp=empty, logp_old=empty, advantages=empty, unit_grad_sketch=empty)
    assert str(refused.value) == "unit_grad_sketch: expected [U, k] with U = 0, any k, got [0]"


def test_a_numpy_sketch_seed_is_recorded_with_each_sketch(tmp_path):
    """geometry={'sketch': {'seed': np.int64(s)}} (a seed from a numpy config) went into the
    manifest as s, but no step file recorded its _sketch_seed: two ranks drawn with different
    seeds joined their sketches as one Omega's. Now the step's sketch is left out, as for
    int seeds ('sketch_seeds_differ')."""
    path = tmp_path / "run"
    for rank in (0, 1):
        geometry = {"sketch": {"seed": np.int64(3 + rank)}}
        with sd.Recorder(path, world_size=2, rank=rank, unit="sequence", geometry=geometry) as rec:
            rec.log_step(0, logp=[-1.0], logp_old=[-1.0], advantages=[1.0],
                         unit_grad_sketch=np.ones((1, 2), np.float32))  # fmt: skip
    step = sd.open_run(path).step(0)
    assert (step.unjoined_why, step.sketch_seeds) == ("sketch_seeds_differ", (3, 4))
