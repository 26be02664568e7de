"""`replay()`'s options are the command line's: the same names, defaults and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app
from stabledrl_cli.errors import ConfigError, UsageError


def _cli_guards(run: Path, *guards: str) -> list[object]:
    """The `guards` of `stabledrl replay RUN -p grpo --format json --guard G ...`."""
    options = [option for guard in guards for option in ("--guard", guard)]
    result = CliRunner().invoke(
        app, ["replay", str(run), "-p", "grpo", "--device", "cpu", "--format", "json", *options]
    )
    assert result.exit_code == 0, result.output
    guard_list: list[object] = json.loads(result.stdout)["guards"]
    return guard_list


@pytest.mark.parametrize(
    ("guards", "options"),
    [
        (None, ()),
        ("zclip:z_thresh=3", ("zclip:z_thresh=3",)),
        (["zclip:z_thresh=3", "skip-step:window=8"], ("zclip:z_thresh=3", "skip-step:window=8")),
        ("none", ("none",)),
        ([], ("none",)),
    ],
)
def test_guards_are_the_guards_of_the_command_line(grpo_fixture, guards, options):
    """Before: replay() had no `guards` (TypeError: unexpected keyword argument), so a script
    could not replay the guards `--guard` sets, nor leave them out as `--guard none` does."""
    result = sd.replay(grpo_fixture, "grpo", device="cpu", guards=guards)
    assert result.to_dict()["guards"] == _cli_guards(grpo_fixture, *options)


@pytest.mark.parametrize(
    ("guards", "message"),
    [
        ("nope", "guard 'nope': unknown guard 'nope'; valid: zclip, skip-step"),
        (3, "guards must be a guard spec or a list of them, not int"),
        ([3], "guards must be a guard spec or a list of them, not list"),
        (["none", "zclip"], "guard none (no guard) contradicts 'zclip': give one or the other"),
    ],
)
def test_a_bad_guard_is_refused_before_the_run_is_read(tmp_path, guards, message):
    """["none", "zclip"] replayed zclip, where `--guard none --guard zclip` is refused: `none`
    (no guard) was silently overruled."""
    with pytest.raises(ConfigError) as refused:
        sd.replay(tmp_path / "no-such-run", guards=guards)
    assert str(refused.value) == message


def test_a_memory_budget_is_a_size_as_the_command_line_takes_it(grpo_fixture):
    """Before: replay(memory_budget="256M") was refused ('memory_budget must be an integer
    >= 1'), though docs/replay.md shows `--memory-budget 256M` and the two take the same
    settings."""
    by_size = sd.replay(grpo_fixture, "grpo", device="cpu", memory_budget="1M", guards=[])
    by_bytes = sd.replay(grpo_fixture, "grpo", device="cpu", memory_budget=2**20, guards=[])
    assert by_size.to_json() == by_bytes.to_json()


def test_a_memory_budget_that_is_no_size_is_refused_as_the_command_line_refuses_it(tmp_path):
    result = CliRunner().invoke(app, ["replay", str(tmp_path), "--memory-budget", "lots"])
    assert result.exit_code == 2
    with pytest.raises(ConfigError) as refused:
        sd.replay(tmp_path / "no-such-run", memory_budget="lots")
    assert str(refused.value) == "memory_budget expects a size such as 256M or 1G, got 'lots'"
    assert result.stderr.strip() == "error: --" + str(refused.value).replace("_", "-")


def test_settings_that_are_numpy_numbers_are_taken_as_the_numbers_they_hold(grpo_fixture):
    """Before: window=np.int64(5) was refused as 'window must be an integer in [1, 1e+09]'
    and spike_factor=np.float32(5) as 'must be a finite number > 1' (a sweep's settings read
    from a numpy array or a DataFrame), though step_range took numpy integers."""
    settings = {
        "window": 5,
        "collapse_window": 4,
        "warning_window": 6,
        "threads": 1,
        "chunk_size": 8,
        "memory_budget": 2**20,
        "spike_factor": 5.0,
        "drift_threshold": -0.25,
        "warning_drop": 0.5,
        "max_grad_norm": 1.0,
    }
    numpy_settings = {
        name: (np.int64(value) if isinstance(value, int) else np.float32(value))
        for name, value in settings.items()
    }
    plain = sd.replay(grpo_fixture, "grpo", device="cpu", guards=[], **settings)
    given = sd.replay(grpo_fixture, "grpo", device="cpu", guards=[], **numpy_settings)
    assert given.to_json() == plain.to_json()


def test_a_step_range_of_torch_integers_is_the_range_of_the_ints_they_hold(grpo_fixture):
    """step_range=(torch.tensor(5), None) (a bound read from a training's step counter) was
    let through the check and raised TypeError ('>=' not supported between instances of
    'numpy.ndarray' and 'Tensor') once the run was replayed; a float tensor, let through as
    well, the same. Now an integer tensor is the int it holds, as a numpy integer is, and a
    float one is refused before the run is read."""
    import torch

    given = sd.replay(
        grpo_fixture, "grpo", device="cpu", guards=[], step_range=(torch.tensor(5), torch.tensor(8))
    )
    plain = sd.replay(grpo_fixture, "grpo", device="cpu", guards=[], step_range=(5, 8))
    assert given.to_json() == plain.to_json()
    assert given.step_range == (5, 8) and type(given.step_range[0]) is int
    with pytest.raises(ConfigError, match=r"^step_range must be"):
        sd.replay(grpo_fixture, "grpo", step_range=(torch.tensor(5.0), None))


def test_a_numpy_number_of_the_wrong_kind_is_still_refused(tmp_path):
    """(A numpy bool is the bool it holds: tests/test_api_numpy_bools.py.)"""
    for name, value in (("window", np.float64(5.0)), ("detail", np.float64(1.0))):
        with pytest.raises(ConfigError, match=f"^{name} must be"):
            sd.replay(tmp_path / "no-such-run", **{name: value})
    with pytest.raises(ConfigError) as refused:
        sd.replay(tmp_path / "no-such-run", detail=np.int64(1))
    assert str(refused.value) == "detail must be True or False, not int"


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("meta", "unknown device 'meta'; valid: auto, cpu, cuda, mps"),
        ("cuda:1", "device 'cuda:1' was asked for, but torch sees no CUDA device"),
    ],
)
def test_a_torch_device_is_checked_as_its_name_is(grpo_fixture, device, message):
    """Before: torch.device("meta") was taken and every step was then skipped as unreadable
    (InputError, exit 3: 'no step could be read (... logp: a tensor on the meta device holds
    no data ...)'), blaming the run for the device given; the name 'meta' was refused."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("a CUDA device is there")
    for given in (device, torch.device(device)):
        with pytest.raises(UsageError) as refused:
            sd.replay(grpo_fixture, "grpo", device=given)
        assert str(refused.value) == message


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("threads", 2.0, "threads must be an integer in [1, 256], not float"),
        ("threads", True, "threads must be an integer in [1, 256], not bool"),
        ("memory_budget", b"16M", "memory_budget must be an integer >= 1, not bytes"),
        ("memory_budget", 2.5e7, "memory_budget must be an integer >= 1, not float"),
        ("chunk_size", "8", "chunk_size must be an integer >= 1, not str"),
        ("window", 5.0, "window must be an integer in [1, 1e+09], not float"),
        ("spike_factor", "5", "spike_factor must be a finite number > 1, not str"),
        ("threads", 0, "threads must be an integer in [1, 256]"),
        ("spike_factor", 0.5, "spike_factor must be a finite number > 1"),
    ],
)
def test_a_setting_of_the_wrong_type_is_refused_naming_the_type(tmp_path, name, value, message):
    """docs/replay.md: a setting of the wrong type raises UsageError naming the setting and the type
    given. The numbers did not name it: threads=2.0, memory_budget=b"16M" or chunk_size="8"
    read 'threads must be an integer in [1, 256]', as if 2.0 were out of range. They now end
    ', not float' (bytes, str, ...); a number of the right type out of range keeps its words."""
    with pytest.raises(ConfigError) as refused:
        sd.replay(tmp_path / "no-such-run", **{name: value})
    assert str(refused.value) == message
