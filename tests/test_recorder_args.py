"""The Recorder's arguments and keywords refused with one line of its own: log_step's and
rewrite_step's unknown keyword names the call, a reward_range must be an ordered pair of
numbers."""

from __future__ import annotations

from decimal import Decimal

import numpy as np
import pytest

import stabledrl_cli as sd
from stabledrl_cli.errors import UsageError


def test_rewrite_step_refuses_a_misspelt_keyword_in_its_own_name(tmp_path):
    """Before, rewrite_step(0, logpp=...) raised Python's TypeError naming log_step."""
    z = np.zeros(2, np.float32)
    with sd.Recorder(tmp_path / "run", unit="sequence") as rec:
        rec.log_step(0, logp=z, logp_old=z, advantages=z)
        with pytest.raises(UsageError) as refused:
            rec.rewrite_step(0, logpp=z)
        assert str(refused.value) == (
            "'logpp' is not a keyword of rewrite_step (did you mean 'logp'?)"
        )
        rec.rewrite_step(0, logp=z, logp_old=z, advantages=z, grad_norm=1.0)
    assert sd.open_run(tmp_path / "run").step(0).scalars["grad_norm"] == 1.0


def test_log_step_refuses_a_misspelt_keyword_in_the_houses_line(tmp_path):
    """Before, log_step(0, logpp=...) raised Python's TypeError ('Recorder.log_step() got an
    unexpected keyword argument 'logpp''), with no hint, where rewrite_step gave one line."""
    z = np.zeros(2, np.float32)
    with sd.Recorder(tmp_path / "run", unit="sequence") as rec:
        with pytest.raises(UsageError) as refused:
            rec.log_step(0, logpp=z, logp_old=z, advantages=z)
        assert str(refused.value) == "'logpp' is not a keyword of log_step (did you mean 'logp'?)"
        rec.log_step(0, logp=z, logp_old=z, advantages=z)
    assert sd.open_run(tmp_path / "run").step_numbers == [0]


@pytest.mark.parametrize(
    ("reward_range", "shown"),
    [
        ({0: "a", 1: "b"}, "dict {0: 'a', 1: 'b'}"),
        ({0, 1}, "set {0, 1}"),
        ((False, True), "tuple (False, True)"),
        (np.zeros((2, 1)), "numpy.ndarray array([[0.], [0.]])"),
    ],
)
def test_a_reward_range_is_an_ordered_pair_of_numbers(tmp_path, reward_range, shown):
    """Before, a dict read as its keys (0, 1), a set in whatever order it iterates, bools as
    0 and 1 and a [2, 1] array as its two rows: each was recorded as reward_range [0.0, 1.0]
    (the array's [0.0, 0.0] refused only as low == high)."""
    with pytest.raises(UsageError) as refused:
        sd.Recorder(tmp_path / "run", reward_range=reward_range)
    assert str(refused.value) == (
        "reward_range must be (low, high), a list, tuple, array or tensor of two numbers; "
        f"got {shown}"
    )
    assert not (tmp_path / "run").exists()


def test_a_reward_range_past_a_float_or_pasted_long_is_one_short_line(tmp_path):
    """Before, (0, 10**400) raised OverflowError from float(), and a list of 100,000 numbers
    was quoted whole (a 689,000-character line)."""
    for reward_range in [(0, 10**400), list(range(100_000))]:
        with pytest.raises(UsageError) as refused:
            sd.Recorder(tmp_path / "run", reward_range=reward_range)
        assert len(str(refused.value)) < 130
    recorded = [(0, 1), [np.float32(-1), np.int64(1)], np.array([0.0, 1.0]), ("0", "1")]
    for number, reward_range in enumerate(recorded):
        with sd.Recorder(tmp_path / str(number), reward_range=reward_range) as rec:
            assert rec.manifest["reward_range"] == [float(reward_range[0]), 1.0]


def test_a_reward_range_of_decimals_is_recorded(tmp_path):
    """Before, (Decimal('0'), Decimal('1')), which float() reads and log_step takes as a
    reward, was refused as 'a list, tuple, array or tensor of two numbers' (Decimal is no
    numbers.Real); until 470817f it was recorded."""
    with sd.Recorder(tmp_path / "run", reward_range=(Decimal("0"), Decimal("1.5"))) as rec:
        assert rec.manifest["reward_range"] == [0.0, 1.5]
    with pytest.raises(UsageError, match="finite, low < high"):
        sd.Recorder(tmp_path / "nan", reward_range=(Decimal("0"), Decimal("sNaN")))


def test_a_reward_past_a_float_is_one_line(tmp_path):
    """Before, reward=[10**400, 0] (a list of Python ints, one past float64's range) raised
    numpy's OverflowError: 'int too large to convert to float'."""
    with sd.Recorder(tmp_path / "run", unit="sequence") as rec:
        with pytest.raises(UsageError, match=r"^reward: a number too large for a float64$"):
            rec.log_step(0, logp=[-1.0, -2.0], logp_old=[-1.0, -2.0], advantages=[1.0, -1.0],
                         reward=[10**400, 0])  # fmt: skip
        rec.log_step(0, logp=[-1.0, -2.0], logp_old=[-1.0, -2.0], advantages=[1.0, -1.0],
                     reward=[1, None])  # fmt: skip
    assert sd.open_run(tmp_path / "run").step(0)["reward"][0] == 1.0


@pytest.mark.parametrize(
    ("param_names", "message"),
    [
        ({"b", "a"}, "param_names must be a list of strings, got set"),
        (["a", "b", "a"], "param_names names 'a' twice: each name is one entry of param_grad_norm"),
    ],
)
def test_param_names_are_in_order_each_once(tmp_path, param_names, message):
    """Before, a set was recorded in its iteration order (another in another process: the
    names of param_grad_norm's entries shuffled), and a name given twice was recorded."""
    with pytest.raises(UsageError) as refused:
        sd.Recorder(tmp_path / "run", param_names=param_names)
    assert str(refused.value) == message
    names = {"w": 1, "b": 2}.keys()  # a model's state_dict keys: in order
    with sd.Recorder(tmp_path / "run", param_names=names, policy=None) as rec:
        assert rec.manifest["param_names"] == ["w", "b"]


def test_an_unknown_keyword_with_none_alike_is_one_short_line(tmp_path):
    """Before, a keyword like none of rewrite_step's listed all 34 on one line (462 columns);
    a misspelt one still names the keyword it resembles."""
    z = np.zeros(2, np.float32)
    with sd.Recorder(tmp_path / "run", unit="sequence") as rec:
        rec.log_step(0, logp=z, logp_old=z, advantages=z)
        with pytest.raises(UsageError) as refused:
            rec.rewrite_step(0, zzzz=z)
    assert (
        str(refused.value)
        == "'zzzz' is not a keyword of rewrite_step (help(Recorder) lists the 34)"
    )


def test_a_meta_integer_past_pythons_digits_is_the_houses_line(tmp_path):
    """Before, Recorder(meta={'n': 10**5000}) passed on Python's advice to call
    sys.set_int_max_str_digits(), a hint meant for code."""
    with pytest.raises(UsageError) as refused:
        sd.Recorder(tmp_path / "run", meta={"n": 10**5000})
    assert str(refused.value) == (
        "meta must be JSON-serializable: an integer of more than 4300 digits "
        "(at most 4300 are read)"
    )
    assert not (tmp_path / "run").exists()


def test_recorder_kwargs_keys_of_mixed_types_are_one_line():
    """recorder_kwargs={3: ..., 'zz': ...} (a config's keys are not all text) raised Python's
    TypeError from sorting the unknown keys ('<' between int and str); the first, as text, is
    refused with the house's line."""
    from stabledrl_cli.capture._script_args import refuse_unknown

    with pytest.raises(UsageError) as refused:
        refuse_unknown({3: 1, "zz": 2, "queue_size": 4}, "__init__", "a key of recorder_kwargs")
    assert str(refused.value).startswith("3 is not a key of recorder_kwargs (")
