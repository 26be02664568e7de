"""A bad grad-norm guard spec is refused in one line that names where it was given: replay's
`--guard` option, the Python API's `Guard(rule=...)`, and the spec itself, whatever is wrong
with it (a parameter out of range, an unknown name or key, a malformed spec)."""

from __future__ import annotations

import pytest
import torch
from _cli import ROOT, run_cli
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app
from stabledrl_cli.errors import UsageError
from stabledrl_cli.guard import Decision, Guard

RUN = ROOT / "fixtures" / "grpo"
BAD_SPECS = {
    "skip-step:window=0": "window must be an integer in [6, 1e+09], got 0",
    "skip-step:sigma=-1": "sigma must be a finite number > 0, got -1.0",
    "zclip:alpha=2": "alpha must be in (0, 1), got 2.0",
    "zclip:warmup=0": "warmup must be an integer in [1, 1e+09], got 0",
    "zclip:clip=other": "clip must be one of adaptive, mean: 'other'",
    "skip-step:window=x": "window must be int, got 'x'",
    "zclip:z_thresh=nan": "z_thresh expects a finite number, got 'nan'",
    "bogus": "unknown guard 'bogus'; valid: zclip, skip-step",
    "zclip:foo=1": "unknown key 'foo'; valid: alpha, z_thresh, warmup, clip, clip_factor, max_norm",
    "zclip:": "nothing after ':'; expected NAME or NAME:key=value,key=value",
}


@pytest.mark.parametrize(("spec", "problem"), BAD_SPECS.items())
def test_a_bad_guard_spec_names_the_guard_option_and_the_spec(spec, problem):
    """The line named neither the option nor, for a value out of range, the spec
    ('error: window must be an integer in [6, 1e+09], got 0'): with --guard given twice, or
    beside --window (drift's), the user could not tell what to fix."""
    result = CliRunner().invoke(app, ["replay", str(RUN), "--guard", "zclip", "--guard", spec])
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: --guard '{spec}': {problem}\n"


@pytest.mark.parametrize(("spec", "problem"), BAD_SPECS.items())
def test_a_bad_rule_of_the_in_process_guard_names_its_argument(spec, problem):
    with pytest.raises(UsageError) as refused:
        Guard("skip", rule=spec)
    assert str(refused.value) == f"rule '{spec}': {problem}"


def test_a_bad_guard_spec_exits_2_in_a_process():
    done = run_cli("replay", RUN, "--guard", "skip-step:window=0")
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "error: --guard 'skip-step:window=0': window must be an integer in [6, 1e+09], got 0\n"
    )


@pytest.mark.parametrize(
    ("given", "refusal"),
    [
        (
            {"grad_norm": torch.ones(2)},
            "grad_norm must be a number or a one-element tensor, got a tensor of 2 elements",
        ),
        (
            {"grad_norm": torch.ones(0)},
            "grad_norm must be a number or a one-element tensor, got a tensor of 0 elements",
        ),
        ({"grad_norm": "1.5"}, "grad_norm must be a number or a one-element tensor, got str"),
        ({"grad_norm": None}, "grad_norm must be a number or a one-element tensor, got NoneType"),
        ({"grad_norm": True}, "grad_norm must be a number or a one-element tensor, got bool"),
        (
            {"grad_norm": 1.0, "loss": torch.ones(3)},
            "loss must be a number or a one-element tensor, got a tensor of 3 elements",
        ),
    ],
)
def test_a_guard_input_that_is_not_one_number_is_refused_naming_it(given, refusal):
    """A tensor of several values, a string or None raised Python's own ValueError or TypeError
    ('only one element tensors can be converted to Python scalars'), naming no argument, out of
    the training loop; the string '1.5' was taken as the norm 1.5."""
    with pytest.raises(UsageError) as refused:
        Guard("skip").before_step(**given)
    assert str(refused.value) == refusal


def test_an_applied_factor_or_a_rule_of_the_wrong_type_is_refused_naming_it():
    decision = Decision("scale", 0.5, "why")
    with pytest.raises(UsageError) as refused:
        decision.apply([], applied=torch.ones(2))
    assert str(refused.value) == (
        "applied must be a number or a one-element tensor, got a tensor of 2 elements"
    )
    with pytest.raises(UsageError) as refused:
        Guard("skip", rule=5)  # type: ignore[arg-type]
    assert str(refused.value) == "rule must be a guard spec (a string) or None, got int"
