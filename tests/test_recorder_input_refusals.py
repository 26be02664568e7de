"""What `log_step` refuses of a step's inputs (UsageError, nothing written), where recording
them as given would keep a step that says something else than the training did."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import stabledrl_cli as sd
from stabledrl_cli.errors import UsageError


def _tokens(seq_id: list[int], **more: object) -> dict[str, object]:
    """A unit 'token' policy batch, one entry per id of `seq_id`."""
    n = len(seq_id)
    return {
        "logp": np.full(n, -1.0, dtype=np.float32),
        "logp_old": np.full(n, -1.0, dtype=np.float32),
        "advantages": np.ones(n, dtype=np.float32),
        "seq_id": np.array(seq_id, dtype=np.int32),
        **more,
    }


@pytest.mark.parametrize(
    ("unit", "seq_id", "named"),
    [
        ("token", [0, 2**31 - 1], "2147483648 sequences"),
        ("token", [17, 17, 18], "19 sequences"),  # a dataset's indices, not the step's
        ("sequence", [0, 2**31 - 1], "2147483648 sequences"),
    ],
)
def test_seq_ids_naming_more_sequences_than_the_step_holds_are_refused(
    tmp_path: Path, unit: str, seq_id: list[int], named: str
) -> None:
    """seq_id [0, 2**31 - 1] declared 2^31 sequences for 2 entries and was recorded: the
    sequences between exist nowhere in the step, and joined with another rank's such step the
    ids pass int32 (the step is then invalid, skipped by every reader). An id is an index into
    the step's sequences: N = max(seq_id) + 1 may not pass the entries, or the per-sequence
    arrays that hold the sequences no entry is of."""
    run = tmp_path / "run"
    with sd.Recorder(run, unit=unit) as rec:
        with pytest.raises(UsageError) as raised:
            rec.log_step(0, **_tokens(seq_id))
        assert str(raised.value) == (
            f"seq_id: its largest id {max(seq_id)} names {named} (N = max(seq_id) + 1), but "
            f"the step has {len(seq_id)} entries and no per-sequence array: ids index the "
            "step's sequences, 0 to N - 1 (renumber them: np.unique(seq_id, "
            "return_inverse=True)[1])"
        )
        rec.log_step(1, **_tokens([1, 0]))
    assert sd.open_run(run).step_numbers == [1]


def test_a_sequence_held_by_a_per_sequence_array_alone_is_taken(tmp_path: Path) -> None:
    """A sequence no entry is of (an empty completion that still drew a reward) exists in the
    step when its per-sequence arrays hold it."""
    run = tmp_path / "run"
    with sd.Recorder(run) as rec:
        reward = np.array([1.0, 0.0, 0.5], dtype=np.float32)
        rec.log_step(0, **_tokens([0, 2], reward=reward, group_id=np.zeros(3, np.int32)))
    assert sd.open_run(run).step(0).num_sequences == 3


@pytest.mark.parametrize(
    "field",
    ["logp", "logp_old", "advantages", "mask", "seq_id", "loss_weight", "reward", "grad_norm"],
)
def test_a_numpy_masked_array_is_refused_in_any_field(tmp_path: Path, field: str) -> None:
    """np.ma arrays were read through np.asarray, their mask dropped: the masked entries were
    recorded as if scored (their data, whatever it held). A masked array is refused, naming
    the field; a plain array of the same data is taken."""
    batch = _tokens([0, 0, 1], reward=np.array([1.0, 0.0], dtype=np.float32))
    given = {**batch, "mask": np.ones(3, np.uint8), "loss_weight": np.ones(3, np.float32)}
    given["grad_norm"] = np.array([2.0])
    plain = np.asarray(given[field])
    masked = np.ma.masked_array(plain, mask=np.arange(plain.size) == plain.size - 1)
    run = tmp_path / "run"
    with sd.Recorder(run) as rec:
        with pytest.raises(UsageError) as raised:
            rec.log_step(0, **{**given, field: masked})
        assert str(raised.value) == (
            f"{field}: a numpy masked array, whose mask a step does not keep: pass a plain "
            "array (np.ma.getdata), and mask= for the entries the loss scores"
        )
        rec.log_step(1, **{**given, field: plain})
    assert sd.open_run(run).step_numbers == [1]


def test_a_list_of_numpy_masked_arrays_is_refused_too(tmp_path: Path) -> None:
    """A list of np.ma rows (a [B, L] logp given row by row) was read through np.asarray,
    which drops each row's mask: refused as one masked array is; plain rows are taken."""
    rows = [np.full(2, -1.0, np.float32), np.full(2, -0.5, np.float32)]
    masked = [np.ma.masked_array(row, mask=[False, True]) for row in rows]
    given = {"logp_old": np.full((2, 2), -1.0, np.float32), "advantages": np.ones(2, np.float32)}
    run = tmp_path / "run"
    with sd.Recorder(run) as rec:
        with pytest.raises(UsageError, match=r"^logp: a numpy masked array, whose mask"):
            rec.log_step(0, logp=masked, **given)
        rec.log_step(1, logp=rows, **given)
    assert sd.open_run(run).step_numbers == [1]


@pytest.mark.parametrize("weight", [-0.5, -np.inf])
def test_a_negative_loss_weight_is_refused(tmp_path: Path, weight: float) -> None:
    """A negative loss_weight was recorded, and replayed as a term of the other sign: a weight
    is >= 0 (0 leaves the term out). Refused, naming the value, beside a NaN too; 0 is taken,
    and so is any weight of an entry the mask leaves out (padding: its term is not scored)."""
    run = tmp_path / "run"
    with sd.Recorder(run) as rec:
        with pytest.raises(UsageError) as raised:
            rec.log_step(0, **_tokens([0, 0], loss_weight=np.array([np.nan, weight], np.float32)))
        assert str(raised.value) == (
            f"loss_weight: a weight is >= 0 (0 leaves the entry's term out), got {weight:g}"
        )
        rec.log_step(1, **_tokens([0, 0], loss_weight=np.array([1.0, 0.0], np.float32)))
        padded = _tokens([0, 0], loss_weight=np.array([1.0, weight], np.float32))
        rec.log_step(2, **padded, mask=np.array([1, 0], np.uint8))  # its term is not scored
    assert sd.open_run(run).step_numbers == [1, 2]


def test_a_reward_column_of_a_reward_models_scores_is_taken_as_one_a_sequence(
    tmp_path: Path,
) -> None:
    """A reward model's scores come as [N, 1] (its logits, one a sequence), as advantages may
    come as [B, 1]: such a reward was refused ('expected shape [N], got [2, 1]') where the
    advantages were taken. It is recorded as the [N] rewards it holds; [N, 2] is refused."""
    run = tmp_path / "run"
    with sd.Recorder(run) as rec:
        rec.log_step(0, **_tokens([0, 1], reward=np.array([[0.5], [1.0]], np.float32)))
        with pytest.raises(UsageError, match=r"^reward: expected shape \[N\], got \[2, 2\]$"):
            rec.log_step(1, **_tokens([0, 1], reward=np.ones((2, 2), np.float32)))
    step = sd.open_run(run).step(0)
    assert step.array("reward").tolist() == [0.5, 1.0]
    assert step.scalars["reward_mean"] == 0.75
