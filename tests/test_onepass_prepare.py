"""`prepare`'s and the prepared batch's shared quantities on their fast CPU paths (numpy masks,
integer counts, reciprocals) equal what torch's own operations give, bit for bit."""

from __future__ import annotations

import pytest
import torch

from stabledrl_cli.errors import InputError
from stabledrl_cli.policies import PolicyBatch, prepare


def _batch(layout: str, dtype: torch.dtype = torch.float32) -> PolicyBatch:
    generator = torch.Generator().manual_seed(3)
    rows, length = 6, 10
    logp_old = -torch.rand(rows * length, generator=generator, dtype=dtype) * 4
    logp = logp_old + 0.1 * torch.randn(rows * length, generator=generator, dtype=dtype)
    mask = torch.tensor([2, 0, 1, 255] * 15, dtype=torch.uint8)
    mask[20:30] = 0  # a sequence without a scored token
    advantages = torch.randn(rows * length, generator=generator, dtype=dtype)
    advantages[::7] = 0.0
    advantages[3] = float("nan")
    advantages[5] = -0.0
    seq = torch.arange(rows).repeat_interleave(length)
    if layout == "scattered":
        seq = seq[torch.randperm(seq.numel(), generator=generator)]
    return PolicyBatch(
        logp=logp,
        logp_old=logp_old,
        advantages=advantages,
        mask=mask,
        seq_id=seq.to(torch.int32),
        reward=torch.zeros(rows),
    )


@pytest.mark.parametrize("layout", ["rows", "scattered"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masks_and_counts_equal_torchs(layout: str, dtype: torch.dtype) -> None:
    batch = _batch(layout, dtype)
    prep = prepare(batch)
    mask = torch.as_tensor(batch.mask) != 0
    assert torch.equal(prep.mask, mask)
    assert (prep.row_length is not None) == (layout == "rows")
    ones = torch.ones_like(prep.logp)
    expected = torch.zeros(prep.n_seq, dtype=dtype).index_add_(0, prep.seq, ones * mask)
    assert prep.seq_len.dtype == dtype
    assert torch.equal(prep.seq_len, expected)
    assert torch.equal(prep.num_scored, mask.sum().to(dtype))
    adv = prep.advantages()
    eligible, positive, negative = prep.signs(adv)
    assert torch.equal(eligible, mask & (adv != 0))
    assert torch.equal(positive, mask & (adv > 0))
    assert torch.equal(negative, mask & (adv < 0))
    assert bool(eligible[3]) and not bool(positive[3] | negative[3])  # NaN is nonzero


def test_weight_over_is_ones_over_the_norm_bit_for_bit() -> None:
    prep = prepare(_batch("rows"))
    norm = torch.tensor([0.0, -0.0, float("inf"), float("nan"), 1e-40, 3.0] * 10)
    got = prep.weight_over(norm)
    assert torch.equal(got.view(torch.int32), (torch.ones(60) / norm).view(torch.int32))
    assert prep.weight_over(torch.tensor(4.0)).shape == (60,)


def test_seq_ids_past_the_sequences_are_refused_with_their_range() -> None:
    batch = _batch("rows")
    seq = torch.as_tensor(batch.seq_id).clone()
    seq[0] = 9
    with pytest.raises(InputError, match=r"got ids in \[1, 9\]|got ids in \[0, 9\]"):
        prepare(PolicyBatch(**{**batch.__dict__, "seq_id": seq}))


@pytest.mark.parametrize(
    ("seq", "expected"),
    [
        ([0, 0, 1, 1, 2, 2], 2),
        ([0, 0, 1, 1, 1, 2], None),  # rows of unequal length
        ([0, 1, 0, 1, 2, 2], None),  # interleaved
        ([0, 1, 2, 3, 4, 5], None),  # one token a sequence: no rows to sum
    ],
)
def test_row_length_is_found_only_for_rows_in_order(seq: list[int], expected: int | None) -> None:
    prep = prepare(
        PolicyBatch(
            logp=torch.zeros(6),
            logp_old=torch.zeros(6),
            advantages=torch.ones(6),
            seq_id=torch.tensor(seq, dtype=torch.int32),
            reward=torch.zeros(max(seq) + 1),
        )
    )
    assert prep.row_length == expected
