"""The one error map of the CLI: one stderr line and the documented exit code."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from typer.testing import CliRunner

from stabledrl_cli import Recorder
from stabledrl_cli.cli import app as app_module
from stabledrl_cli.cli.app import BROKEN_PIPE, CommandEntry, app
from stabledrl_cli.errors import INTERNAL_ERROR, InputError, UsageError, WriteError


@pytest.fixture
def failing(monkeypatch: pytest.MonkeyPatch):
    """Registers a `fail` command raising the exception the test sets on the returned module."""
    module = types.ModuleType("stabledrl_test_fail")
    module.error = RuntimeError("unset")

    def command(force: bool = False) -> None:
        raise module.error

    module.command = command
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(app_module.COMMANDS, "fail", CommandEntry(module.__name__, "Fails."))
    monkeypatch.setattr(app_module, "_loaded", {})
    return module


@pytest.mark.parametrize(
    ("exc", "code", "text"),
    [
        (UsageError("bad spec"), 2, "bad spec"),
        (InputError("corrupt step"), 3, "corrupt step"),
        (WriteError("out.json: cannot write it (no space left on device)"), 4, "no space left"),
        (PermissionError(errno.EACCES, "Permission denied", "/runs/x"), 3, "/runs/x"),
        (RuntimeError("kaput"), INTERNAL_ERROR, "internal error: RuntimeError: kaput"),
        # Memory running out is the machine's limit, not a bug (it was exit 70, "a bug").
        (MemoryError(), 71, "out of memory: MemoryError"),
        (
            RuntimeError(
                "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                "allocate memory: you tried to allocate 786432 bytes. Error code 12 (Cannot "
                "allocate memory)"
            ),
            71,
            "out of memory: RuntimeError: [enforce fail",
        ),
        (type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory"), 71, "CUDA out"),
    ],
)
def test_errors_are_one_line_with_their_exit_code(failing, exc, code, text):
    failing.error = exc
    result = CliRunner().invoke(app, ["fail"])
    assert result.exit_code == code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "args", [["--debug", "fail"], ["fail", "--debug"], ["fail", "--force", "--debug"]]
)
def test_debug_anywhere_on_the_line_shows_the_traceback(failing, args):
    failing.error = RuntimeError("kaput")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == INTERNAL_ERROR
    assert "Traceback" in result.stderr and "RuntimeError: kaput" in result.stderr


@pytest.mark.parametrize(
    ("exc", "code"),
    [(UsageError("bad spec"), 2), (InputError("corrupt step"), 3), (WriteError("full"), 4)],
)
def test_debug_keeps_the_exit_code(failing, exc, code):
    """A debug run of a CI job fails as the plain one would (not 1, a tripped gate's code)."""
    failing.error = exc
    result = CliRunner().invoke(app, ["--debug", "fail"])
    assert result.exit_code == code
    assert "Traceback" in result.stderr and str(exc) in result.stderr


def test_debug_after_a_double_dash_belongs_to_the_wrapped_command(failing):
    failing.error = RuntimeError("kaput")
    assert app_module._hoist_debug(["record", "--", "train", "--debug"])[0] == "record"
    result = CliRunner().invoke(app, ["fail", "--", "--debug"])
    assert result.exit_code == 2 and "Traceback" not in result.stderr


def test_debug_from_the_environment(failing, monkeypatch):
    failing.error = RuntimeError("kaput")
    monkeypatch.setenv("STABLEDRL_DEBUG", "1")
    result = CliRunner().invoke(app, ["fail"])
    assert result.exit_code == INTERNAL_ERROR and "RuntimeError: kaput" in result.stderr


def test_version():
    from stabledrl_cli._version import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"stabledrl {__version__}"


@pytest.mark.parametrize(
    ("closing", "status"),
    [("| true", "${PIPESTATUS[0]}"), (">&-", "$?")],
    ids=["reader-gone", "closed-at-start"],
)
def test_a_closed_stdout_exits_quietly(closing, status):
    """`stabledrl policies --format json | true`: no traceback, no error line, exit 141. So
    with fd 1 closed as the command starts (`>&-`, Python's sys.stdout None), where json
    ended in 'internal error: AttributeError: 'NoneType' object has no attribute 'write''
    (exit 70) and a table went nowhere with exit 0."""
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("STABLEDRL_DEBUG", None)
    for fmt in ("json", "table"):
        proc = subprocess.run(
            f"{sys.executable} -m stabledrl_cli policies --format {fmt} {closing};"
            f' echo "status={status}" >&2',
            shell=True,
            executable="/bin/bash",
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        assert proc.stderr.splitlines() == [f"status={BROKEN_PIPE}"], proc.stderr


def test_debug_in_a_real_process_keeps_the_exit_code(tmp_path):
    """`stabledrl --debug replay MISSING`: the traceback on stderr, and exit 3 as without it."""
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("STABLEDRL_DEBUG", None)
    missing = str(tmp_path / "no-such-run")
    for debug in ([], ["--debug"]):
        proc = subprocess.run(
            [sys.executable, "-m", "stabledrl_cli", *debug, "inspect", missing],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 3, proc.stderr
        assert ("Traceback" in proc.stderr) == bool(debug), proc.stderr


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["replay", "RUN", "--device", "bogus"], "Invalid value for '--device'"),
        (["replay", "RUN", "--no-such-option"], "No such option: --no-such-option"),
        (["replay"], "Missing argument 'RUN'."),
        (["no-such-command"], "No such command 'no-such-command'."),
        (["--no-such-option"], "No such option: --no-such-option"),
    ],
)
def test_a_bad_command_line_is_one_line_exit_2(args, line):
    """click's three lines (usage, hint, error) are one, naming where the help is."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {line}"), result.stderr
    assert lines[0].endswith(" -h for help)") and result.stdout == ""


def test_no_arguments_still_show_the_help():
    result = CliRunner().invoke(app, [])
    assert result.exit_code == 2 and "Usage: stabledrl [OPTIONS] COMMAND" in result.output


@pytest.mark.parametrize("command", ["record", "branch"])
@pytest.mark.parametrize("threads", ["0", "257", "99999999999"])
def test_threads_of_the_example_are_bounded(tmp_path, command: str, threads: str) -> None:
    """torch.set_num_threads overflowed past 2**31 (exit 70) and crashed the process at 100000."""
    target = ["--out", str(tmp_path / "run")] if command == "record" else [str(tmp_path)]
    result = CliRunner().invoke(app, [command, *target, "--rl-steps", "1", "--threads", threads])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "'--threads'" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["watch", "unused", "--interval", "1e30"], "--interval must be in (0, 86400] seconds"),
        (["record", "--rl-steps", "1", "--seed", str(10**29)], "--seed must be an integer in"),
        (["record", "--rl-steps", "1", "--seed", str(10**30)], "'--seed': not an integer"),
        (["record", "--rl-steps", "1", "--lr", "inf"], "--lr must be a finite number > 0, got inf"),
        (["record", "--rl-steps", "1", "--max-grad-norm", "inf"], "--max-grad-norm must be a fin"),
        (["replay", "unused", "--guard", "skip-step:sigma=inf"], "sigma expects a finite number"),
    ],
    ids=[
        "watch-interval",
        "record-seed",
        "record-seed-digits",
        "record-lr-inf",
        "record-max-grad-norm-inf",
        "sigma-inf",
    ],
)
def test_huge_values_are_usage_errors(tmp_path, args: list[str], message: str) -> None:
    """time.sleep and torch.manual_seed overflowed on them (exit 70)."""
    args = [str(tmp_path / "run") if a == "unused" else a for a in args]
    out = ["--out", str(tmp_path / "out")] if args[0] == "record" else []
    result = CliRunner().invoke(app, [*args, *out])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_a_line_break_in_a_message_shows_escaped_and_stderr_lines_stay_one(failing, tmp_path):
    """A run path holding a newline split `error: no such run: .../nl` from a line `zz`, and
    so every warning naming the run; stderr prints a line break as `\\n` (its other control
    characters were escaped already)."""
    missing = f"{tmp_path}/nl\nzz"
    result = CliRunner().invoke(app, ["replay", missing])
    assert result.exit_code == 3
    assert result.stderr == f"error: no such run: {tmp_path}/nl\\nzz\n"
    failing.error = UsageError("a\nb\u2028c\r\nd")
    result = CliRunner().invoke(app, ["fail"])
    assert result.exit_code == 2 and result.stderr == "error: a\\nb\\u2028c\\x0d\\nd\n"
    run = tmp_path / "r\nzz"
    with Recorder(run, policy="grpo") as recorder:
        for step in range(3):
            zeros = np.zeros(8, "float32")
            recorder.log_step(
                step,
                logp=zeros,
                logp_old=zeros - 0.1,
                advantages=zeros + 1,
                seq_id=np.repeat(np.arange(4), 2).astype("int32"),
                reward=np.ones(4, "float32"),
            )
    torn = run / "steps" / "step-00000001.safetensors"
    torn.write_bytes(torn.read_bytes()[:-20])
    escaped = f"{tmp_path}/r\\nzz"
    for args in (
        ["pack", str(run), str(tmp_path / "out.h5")],
        ["replay", str(run)],
        ["check", str(run), "--max-nonfinite", "5"],
        ["watch", str(run), "--once"],
        ["diff", str(run), str(run)],
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        warned = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
        assert warned and all(escaped in line for line in warned), (args, result.stderr)
        assert not any(line.startswith("zz") for line in result.stderr.splitlines()), args
