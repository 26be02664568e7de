"""`stabledrl record -- CMD`: the run directory, the child's log_policy_batch, exit codes."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from _cli import TIMEOUT, cli_command, cli_environment
from _corpus import ADDRESS_SPACE
from _record_here import child_env, record_done_here, record_here
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import Recorder, open_run

SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import stabledrl_cli as sd

    steps = int(sys.argv[1])
    rng = np.random.default_rng(0)
    for step in range(steps):
        logp = -np.abs(rng.normal(size=8)).astype("float32") - 0.2  # log-probabilities: <= 0
        ok = sd.log_policy_batch(
            step,
            logp=logp,
            logp_old=logp + 0.1,
            advantages=rng.normal(size=8).astype("float32"),
            seq_id=np.repeat(np.arange(4), 2).astype("int32"),
            group_id=np.array([0, 0, 1, 1], dtype="int32"),
            reward=np.array([1.0, 0.0, 0.5, 0.5], dtype="float32"),
            grad_norm=1.5,
            loss=0.25,
            inner_step=step % 2,
        )
        print("logged" if ok else "not logged", flush=True)
    if len(sys.argv) > 2:
        # A bad call: recording must warn once and never raise.
        print(sd.log_policy_batch(steps, logp=np.zeros(3), logp_old=np.zeros(2), advantages=1))
        print(sd.log_policy_batch(steps + 1, logp=np.zeros(3), logp_old=np.zeros(3),
                                  advantages=np.zeros(3)))
        print("training continues", flush=True)
        sys.exit(int(sys.argv[2]))
    """
)


def test_an_out_holding_only_a_file_browsers_files_is_empty(tmp_path):
    """`record --out DIR`, DIR a folder made in Finder (a .DS_Store in it), exited 2 ('--out DIR
    is not empty; pass --force'): DIR is recorded into as an empty folder would be."""
    out = tmp_path / "made in finder"
    out.mkdir()
    (out / ".DS_Store").write_bytes(b"\0")
    result = CliRunner().invoke(app, ["record", "--out", str(out), "--rl-steps", "1"])
    assert result.exit_code == 0, result.stderr
    assert open_run(out).step_numbers == [0]


@pytest.mark.parametrize(
    ("name", "what"),
    [
        ("steps", "not a directory (where a run keeps its step files)"),
        ("manifest.json", "not a file (where a run keeps its manifest)"),
    ],
)
def test_force_refuses_a_steps_file_or_a_manifest_folder(tmp_path, name, what):
    """RUN/steps a file (or RUN/manifest.json a folder): `record --out RUN --force` exited 4
    ('RUN/steps: cannot write it (File exists)'), its manifest reopened, as did every later
    try: it is refused as what --force never removes is, exit 2, before the run changes."""
    out = tmp_path / "run"
    with Recorder(out, policy="grpo") as recorder:
        recorder.log_step(0, grad_norm=1.0)
    place = out / name
    if name == "steps":
        shutil.rmtree(place)
        place.write_text("mine")
    else:
        place.unlink()
        place.mkdir()
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    result = CliRunner().invoke(app, ["record", "--out", str(out), "--force", "--rl-steps", "1"])
    assert result.exit_code == 2, result.stderr
    assert result.stderr == (
        f"error: {place}: {what}; replacing a run never removes it: remove it, or record "
        "elsewhere\n"
    )
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "train.py"
    path.write_text(SCRIPT)
    return path


def test_record_wraps_a_command_and_a_non_empty_out_needs_force(
    tmp_path, script, monkeypatch, capfd
):
    out = tmp_path / "run"
    code, _, child_out, child_err = record_here(
        monkeypatch, capfd, "--out", str(out), "-p", "grpo", "--", sys.executable, str(script), "3"
    )
    assert code == 0, child_err
    assert child_out.count("logged") == 3 and "not logged" not in child_out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["policy"]["name"] == "grpo"
    names = sorted(p.name for p in (out / "steps").iterdir())
    assert names == [f"step-{i:08d}.safetensors" for i in range(3)]

    command = ["--", sys.executable, str(script), "1"]
    code, stderr, child_out, _ = record_here(
        monkeypatch, capfd, "--out", str(out), "-p", "grpo", *command
    )
    assert code == 2 and "--force" in stderr and child_out == ""  # refused before it runs
    code, _, _, child_err = record_here(
        monkeypatch, capfd, "--out", str(out), "--force", "-p", "grpo", *command
    )
    assert code == 0, child_err
    assert sorted(p.name for p in (out / "steps").iterdir()) == ["step-00000000.safetensors"]


def test_a_failing_log_call_warns_once_and_the_commands_exit_code_passes_through(
    tmp_path, script, monkeypatch
):
    # A real `stabledrl record` process: its exit code is the wrapped command's.
    out = tmp_path / "run"
    result = subprocess.run(
        [*cli_command(), "record", "--out", str(out), "-p", "grpo",
         "--", sys.executable, str(script), "2", "7"],
        capture_output=True, text=True, env=child_env(monkeypatch), timeout=120,
    )  # fmt: skip
    assert result.returncode == 7  # the command's own failing code wins over the recorder's
    assert "training continues" in result.stdout
    assert "recording failed" in result.stderr
    assert result.stdout.splitlines()[-3:-1] == ["False", "False"]
    assert result.stderr.count("stabledrl: warning:") == 1
    assert f"exited with code 7; the run holds 2 step file(s): `stabledrl inspect {out}`" in (
        result.stderr
    )
    assert len(list((out / "steps").iterdir())) == 2


def test_without_a_policy_the_error_says_what_to_pass(tmp_path, script, monkeypatch, capfd):
    out = tmp_path / "run"
    code, stderr, child_out, child_err = record_here(
        monkeypatch, capfd, "--out", str(out), "--", sys.executable, str(script), "2"
    )
    assert code == 2
    assert child_out.count("not logged") == 2
    assert child_err.count("stabledrl: warning:") == 1
    assert "--policy grpo" in stderr and "policy='grpo'" in stderr
    assert len(stderr.strip().splitlines()) == 2  # "recording ..." and the one error line


def test_square_brackets_in_the_command_and_a_failure_are_printed_as_they_are(
    tmp_path, monkeypatch, capfd
):
    """Neither the command nor the child's failure is read as rich markup."""
    script = tmp_path / "train.py"
    script.write_text(
        "import sys, numpy as np, stabledrl_cli as sd\n"
        "sd.log_policy_batch(0, policy=sys.argv[1], logp=np.zeros(3))\n"
        "sys.exit(5)\n"
    )
    command = [sys.executable, str(script), "[/bad]"]
    code, stderr, _, child_err = record_here(
        monkeypatch, capfd, "--out", str(tmp_path / "run"), "--", *command
    )
    assert code == 5, stderr + child_err
    assert f"recording {shlex.join(command)} into" in stderr
    assert "warning: recording failed: log_policy_batch failed at step 0" in stderr
    assert "[/bad]" in stderr.splitlines()[1]


def _record_process(out: Path, script: Path, monkeypatch, *args: str):
    """A real `stabledrl record` process wrapping a real python child."""
    return subprocess.run(
        [*cli_command(), "record", "--out", str(out), *args,
         "--", sys.executable, str(script)],
        capture_output=True, text=True, env=child_env(monkeypatch), timeout=120,
    )  # fmt: skip


def test_a_command_that_records_no_step_fails_with_the_reason(tmp_path, monkeypatch):
    script = tmp_path / "silent.py"
    script.write_text("print('trained without logging')\n")
    result = _record_process(tmp_path / "run", script, monkeypatch, "-p", "grpo")
    assert result.returncode == 2, result.stderr
    assert "trained without logging" in result.stdout
    assert "recorded no step" in result.stderr and "log_policy_batch" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_command_that_records_no_step_over_an_earlier_run_fails(tmp_path, monkeypatch, capfd):
    """`record --force` over a run, with a command that records nothing: the earlier run's
    step files are not the command's. Before, record exited 0, as if the command had
    recorded them."""
    out = tmp_path / "run"
    with Recorder(out, policy=None) as recorder:
        for n in range(3):
            recorder.log_step(n, grad_norm=1.0, loss=0.5)
    silent = "print('trained without logging')\n"
    code, stderr, _, child_err = _record_text(
        tmp_path, monkeypatch, capfd, silent, options=("--force", "-p", "grpo")
    )
    assert code == 2, stderr + child_err
    assert "recorded no step" in stderr
    assert "holds only the 3 step file(s) it held before" in stderr
    assert "Traceback" not in stderr + child_err


def test_a_failed_recorder_fails_record_even_when_the_command_succeeds(
    tmp_path, monkeypatch, capfd
):
    script = (
        "import numpy as np, stabledrl_cli as sd\n"
        "ok = sd.log_policy_batch(0, logp=np.zeros(3), logp_old=np.zeros(2), advantages=1)\n"
        "print('logged' if ok else 'not logged')\n"
    )
    code, stderr, child_out, child_err = _record_text(
        tmp_path, monkeypatch, capfd, script, options=("-p", "grpo")
    )
    assert child_out.strip() == "not logged"
    assert code == 2, stderr + child_err  # arrays log_step refuses: a usage error
    assert child_err.count("stabledrl: warning:") == 1  # the child's, once
    assert "warning" not in stderr
    assert "error: recording failed: log_policy_batch failed at step 0" in stderr


def test_a_step_its_policy_cannot_be_replayed_with_stops_recording_not_training(
    tmp_path, monkeypatch, capfd
):
    """A policy batch without a field the run's policy needs (grpo:beta=0.04, no logp_ref):
    warned once, recording off, training goes on, record exits 2 with the reason. Before, the
    steps were recorded and record exited 0; the run's replay then ended with exit 3."""
    script = (
        "import numpy as np, stabledrl_cli as sd\n"
        "ones = np.ones(4, 'float32')\n"
        "for step in range(3):\n"
        "    ok = sd.log_policy_batch(step, policy='grpo:beta=0.04', logp=-ones,\n"
        "                             logp_old=-ones, advantages=ones,\n"
        "                             recorder_kwargs={'unit': 'sequence'})\n"
        "    print('logged' if ok else 'not logged', flush=True)\n"
        "print('training continues', flush=True)\n"
    )
    code, stderr, child_out, child_err = _record_text(tmp_path, monkeypatch, capfd, script)
    assert child_out.split("\n") == ["not logged"] * 3 + ["training continues", ""]
    assert code == 2, stderr + child_err
    assert child_err.count("stabledrl: warning:") == 1, child_err  # the child's, once
    assert "warning" not in stderr, stderr
    reason = "step 0 has no 'logp_ref', which the run's policy 'grpo:beta=0.04' needs"
    assert "error: recording failed: log_policy_batch failed at step 0" in stderr
    assert reason in stderr and "Traceback" not in stderr + child_err
    assert list((tmp_path / "run" / "steps").iterdir()) == []


RANKS_LAUNCHER = textwrap.dedent(
    """
    import os, subprocess, sys
    from pathlib import Path

    train = Path(__file__).with_name("train.py")
    # RANK_STEPS: the steps each rank launched here logs, "3,0": the second one trains none;
    # NODE_RANKS: "FIRST,WORLD_SIZE", the first rank launched here and the job's ranks;
    # RANK_NAMES: the variables they are passed in (RANK,WORLD_SIZE: torchrun's)
    first, world_size = os.environ.get("NODE_RANKS", "0,2").split(",")
    names = os.environ.get("RANK_NAMES", "RANK,WORLD_SIZE").split(",")
    for local, steps in enumerate(os.environ["RANK_STEPS"].split(",")):
        rank = {names[0]: str(int(first) + local), names[1]: world_size}
        env = {**os.environ, **rank, "LOCAL_RANK": str(local)}
        subprocess.run([sys.executable, str(train), steps], env=env, check=True)
    """
)


def _ranks(tmp_path: Path, monkeypatch, steps: str, *options: str, out: str = "run", script=SCRIPT):
    """`record` around a launcher of ranks that run `script`, logging `steps` ("3,0") each,
    one after the other (log_policy_batch records as RANK of WORLD_SIZE), all exiting 0: the
    ranks of a 2-rank job, or those of one node (NODE_RANKS set)."""
    (tmp_path / "train.py").write_text(script)
    launcher = tmp_path / "launch.py"
    launcher.write_text(RANKS_LAUNCHER)
    monkeypatch.setenv("RANK_STEPS", steps)
    return _record_process(tmp_path / out, launcher, monkeypatch, "-p", "grpo", *options)


@pytest.mark.parametrize(("steps", "silent"), [("3,0", 1), ("0,3", 0)])
def test_a_rank_that_recorded_no_step_fails_record(tmp_path, monkeypatch, steps, silent):
    """A 2-rank command whose every process exits 0, one rank never logging a step: no step
    of the run is whole (readers skip them all; with rank 0 silent the run has no manifest).
    Before, record exited 0 and said nothing."""
    result = _ranks(tmp_path, monkeypatch, steps)
    assert result.returncode == 2, result.stderr
    line = result.stderr.splitlines()[-1]
    assert line.startswith(f"error: rank(s) [{silent}] of the run's 2 recorded no step")
    assert "the other ranks wrote 3 step file(s)" in line and "Traceback" not in result.stderr


def test_steps_a_rank_did_not_record_are_named_by_record(tmp_path, monkeypatch):
    """Rank 1 logs 2 steps of rank 0's 4: record exits 0 (the whole steps replay) and says in
    one line which steps readers skip. Before, it said nothing."""
    result = _ranks(tmp_path, monkeypatch, "4,2")
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stderr.splitlines() if "warning" in line]
    assert line.startswith("warning: 2 step(s) the command recorded are incomplete")
    assert "step 2: incomplete, no file for rank(s) [1]" in line
    assert open_run(tmp_path / "run").step_numbers == [0, 1]


@pytest.mark.parametrize(("steps", "torn"), [("4,2", 2), ("4,0", 4)])
def test_steps_a_crashed_rank_did_not_record_are_named_by_record(
    tmp_path, monkeypatch, steps, torn
):
    """Rank 1 crashes after 2 steps of rank 0's 4 (or before its first): record exits with
    the command's code and names the steps readers skip, as after a command that exited 0.
    Before, it said only that the run holds 6 (4) step files."""
    crash = SCRIPT + "if steps < 4:\n    raise RuntimeError('rank 1 crashed')\n"
    result = _ranks(tmp_path, monkeypatch, steps, script=crash)
    assert result.returncode == 1, result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("warning")]
    assert line.startswith(f"warning: {torn} step(s) the command recorded are incomplete")
    assert f"step {4 - torn}: incomplete, no file for rank(s) [1]" in line
    assert result.stderr.splitlines()[-1].startswith("the training command exited with code 1")


def _node(tmp_path: Path, monkeypatch, node: int, steps: str, *options: str, **ranks):
    """`_ranks` on node `node` of a job of 2 nodes of 2 ranks each (ranks 2 * node and
    2 * node + 1 of 4). Its launcher runs as rank `node` of 2, as a job scheduler numbers
    nodes (the ranks' RANK and WORLD_SIZE are torchrun's); record's temporary files go to
    tmp_path/tmp."""
    monkeypatch.setenv("NODE_RANKS", f"{2 * node},4")
    monkeypatch.setenv("RANK", str(node))
    monkeypatch.setenv("WORLD_SIZE", "2")
    (tmp_path / "tmp").mkdir(exist_ok=True)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    return _ranks(tmp_path, monkeypatch, steps, *options, **ranks)


def test_each_node_records_its_own_ranks_and_the_node_directories_make_one_run(
    tmp_path, monkeypatch
):
    """`record --out NODE_DIR -- torchrun --nnodes 2 ...` on each node: the other node's
    ranks write elsewhere, and record checks only the ranks it launched (exit 0, nothing
    said, no temporary file left). Before, each node's record exited 2 naming the other
    node's ranks. The node directories copied into one make the whole run."""
    for node in (0, 1):
        result = _node(tmp_path, monkeypatch, node, "3,3", out=f"node{node}")
        assert result.returncode == 0, result.stderr
        assert "warning" not in result.stderr and "error" not in result.stderr
    assert list((tmp_path / "tmp").iterdir()) == []
    assert not (tmp_path / "node1" / "manifest.json").exists()  # rank 0 writes it
    whole = tmp_path / "whole"
    for node in (0, 1):
        shutil.copytree(tmp_path / f"node{node}", whole, dirs_exist_ok=True)
    run = open_run(whole)
    assert (run.world_size, run.step_numbers, run.integrity.findings) == (4, [0, 1, 2], [])
    replayed = CliRunner().invoke(app, ["replay", str(whole), "--format", "json"])
    assert replayed.exit_code == 0, replayed.output
    assert json.loads(replayed.stdout)["steps"] == 3


def test_a_rank_of_this_node_that_recorded_no_step_fails_record(tmp_path, monkeypatch):
    """Node 1's second rank (rank 3 of 4) logs nothing: record names it alone, not node 0's
    ranks, which run elsewhere. Before, the line named ranks [0, 1, 3]."""
    result = _node(tmp_path, monkeypatch, 1, "3,0", out="run")
    assert result.returncode == 2, result.stderr
    line = result.stderr.splitlines()[-1]
    assert line.startswith("error: rank(s) [3] of the run's 4 recorded no step"), line
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_node_that_finishes_first_in_a_shared_directory_says_nothing(tmp_path, monkeypatch):
    """Both nodes record into one directory; node 1 is slower (its ranks have written step 0
    when node 0's record ends, with steps 0 to 2). Node 0's steps are whole for its own ranks:
    exit 0, no warning. Before, node 1's record exited 2 naming ranks [0, 1], and node 0's
    warned that steps 1 and 2 miss ranks [2, 3]."""
    slower = _node(tmp_path, monkeypatch, 1, "1,1", out="run")
    assert slower.returncode == 0, slower.stderr
    faster = _node(tmp_path, monkeypatch, 0, "3,3", "--force", out="run")
    assert faster.returncode == 0, faster.stderr
    assert "warning" not in faster.stderr, faster.stderr
    run = open_run(tmp_path / "run")
    assert run.step_numbers == [0]
    assert sorted(f.step for f in run.integrity.findings if f.kind == "missing_rank") == [1, 2]


RANK_SET_BY_THE_SCRIPT = (
    "import os\n"
    "os.environ.update(RANK=os.environ['LATE_RANK'], WORLD_SIZE=os.environ['LATE_WORLD_SIZE'])\n"
)


def test_ranks_that_take_their_rank_in_the_script_are_checked_once_they_record(
    tmp_path, monkeypatch
):
    """Node 1's ranks start with no RANK (their script sets it, as a process of
    torch.multiprocessing.spawn takes its rank from its process group): each says which rank
    it is as it opens the run, so the step that rank 3 did not log is named (rank 2 logged 3
    steps, rank 3 two), and node 0's ranks are not."""
    monkeypatch.setenv("RANK_NAMES", "LATE_RANK,LATE_WORLD_SIZE")
    script = RANK_SET_BY_THE_SCRIPT + SCRIPT
    result = _node(tmp_path, monkeypatch, 1, "3,2", out="run", script=script)
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stderr.splitlines() if "warning" in line]
    assert line.startswith("warning: 1 step(s) the command recorded are incomplete"), line
    assert "step 2: incomplete, no file for rank(s) [3])" in line


# A script that stabledrl refuses (an integration's check, a bad Recorder argument) raises a
# stabledrl error it does not catch; a script with a bug of its own raises anything else.
# KIND is WHAT, or HOW-WHAT: the exception is caught and reported by the script (as a framework
# such as hydra does), which then exits in one of the ways HOW names.
RAISES_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import stabledrl_cli.errors as errors

    print("started", flush=True)
    kinds = sys.argv[1].split(",")  # one kind, or one a rank
    how, _, what = kinds[int(os.environ.get("RANK", "0")) % len(kinds)].rpartition("-")
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if ranks > 1:  # every rank raises, none before all are ready (a rank that ended first
        # would have torchrun stop the others before their error)
        ready = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ready")
        os.makedirs(ready, exist_ok=True)
        open(os.path.join(ready, os.environ["RANK"]), "w").close()
        while len(os.listdir(ready)) < ranks:
            time.sleep(0.01)


    def fail(what):
        if what == "usage":
            raise errors.UsageError("cannot record this run: a refused setting")
        if what == "input":
            raise errors.InputError("no such run: /nowhere")
        if what == "wrapped":  # an error of the script's whose cause is the tool's
            try:
                fail("usage")
            except errors.UsageError as exc:
                raise RuntimeError("cannot build the trainer") from exc
        if what == "remote":  # the tool's error in a Ray task, as Ray raises it in the caller
            import ray.exceptions

            cause = errors.UsageError("cannot record this run: a refused setting")
            trace = "\\x1b[36mray::train()\\x1b[39m\\nTraceback (most recent call last):"
            raise ray.exceptions.RayTaskError("train", trace, cause).as_instanceof_cause()
        if what == "during":  # the script's own bug, raised while it handled the tool's error
            try:
                fail("usage")
            except errors.UsageError:
                raise KeyError("the script's own bug")
        raise KeyError("the script's own bug")


    try:
        fail(what)
    except Exception as exc:
        if not how:
            raise
        # the framework's report, in one write: print writes its newline apart, and another
        # rank's line could land between the two
        sys.stderr.write(f"the job failed: {exc!r}\\n")
        sys.stderr.flush()
        if how == "reported":  # then sys.exit(1) in its except block, as hydra does
            sys.exit(1)
        if how in ("exit", "quit"):  # the builtins site gives a script
            {"exit": exit, "quit": quit}[how](1)
        if how == "exit5":  # an exit code of its choosing
            sys.exit(5)
        if how == "message":  # a message of its own (Python prints it, exits 1)
            sys.exit("the script's message")
        if how == "caught":  # an exit inside the block, which the script catches: it goes on
            try:
                sys.exit(1)
            except SystemExit as exit:
                print(f"exit caught: {exit.code}", flush=True)
    print("carries on", flush=True)
    sys.exit(1)  # later, for another reason
    """
)


def _raising_args(tmp_path: Path, args: tuple[str, ...], command: tuple[str, ...]) -> list[str]:
    """record's arguments `--out TMP/run OPTIONS -- COMMAND KIND` (ARGS: OPTIONS, then KIND);
    COMMAND defaults to `python` on RAISES_SCRIPT, whose path COMMAND may hold as `{script}`."""
    script = tmp_path / "train.py"
    script.write_text(RAISES_SCRIPT)
    *options, kind = args
    command = command or (sys.executable, "{script}")
    child = [part.format(script=script) for part in command]
    return ["--out", str(tmp_path / "run"), *options, "--", *child, kind]


def _record_raising(
    tmp_path: Path, monkeypatch, capfd, *args: str, command: tuple[str, ...] = ()
) -> tuple[int, str, str, str]:
    """`record_here` of `_raising_args`: record in-process, its command a real process. record
    prints its first line before the command starts and the others once it ended."""
    return record_here(monkeypatch, capfd, *_raising_args(tmp_path, args, command))


RICH_HOOK = (
    sys.executable,
    "-c",
    "import runpy, rich.traceback; rich.traceback.install(); "
    "runpy.run_path('{script}', run_name='__main__')",
)
"""RAISES_SCRIPT run by a command that first replaces sys.excepthook with rich's (as training
scripts often do: `rich.traceback.install()`)."""


@pytest.mark.parametrize("command", [(), RICH_HOOK], ids=["python", "rich-excepthook"])
@pytest.mark.parametrize("hooks", ["--optimizer-hooks", "--no-optimizer-hooks"])
@pytest.mark.parametrize(
    ("kind", "code", "line"),
    [
        ("usage", 2, "error: cannot record this run: a refused setting"),
        ("input", 3, "error: no such run: /nowhere"),
    ],
)
def test_a_stabledrl_error_the_command_does_not_catch_is_one_line_and_its_exit_code(
    tmp_path, monkeypatch, capfd, hooks, kind, code, line, command
):
    """Also when the command replaced sys.excepthook (RICH_HOOK): before, rich printed its
    traceback, no status line was written and record exited 1 ("the training command exited
    with code 1")."""
    ended, stderr, out, err = _record_raising(
        tmp_path, monkeypatch, capfd, hooks, kind, command=command
    )
    assert ended == code, stderr + err
    assert "started" in out
    assert err.splitlines() == [line], err  # the command's stderr: no traceback
    assert len(stderr.splitlines()) == 1, stderr  # record's own "recording ... into" line


@pytest.mark.parametrize("hooks", ["--optimizer-hooks", "--no-optimizer-hooks"])
@pytest.mark.parametrize(
    ("what", "code", "line"),
    [
        ("usage", 2, "error: cannot record this run: a refused setting"),
        ("input", 3, "error: no such run: /nowhere"),
        ("wrapped", 2, "error: cannot record this run: a refused setting"),
    ],
)
def test_a_stabledrl_error_a_framework_reports_then_exits_1_on_is_our_last_line_and_code(
    tmp_path, monkeypatch, capfd, hooks, what, code, line
):
    """What hydra's `@hydra.main` (verl's entry point) does: catch the exception, print its
    report and call sys.exit(1) in its except block. Its report stays; ours comes last, with
    the error's exit code. Before, record exited 1 ("the training command exited with code
    1") and printed no line of ours."""
    ended, stderr, out, err = _record_raising(
        tmp_path, monkeypatch, capfd, hooks, f"reported-{what}"
    )
    assert ended == code, stderr + err
    assert out.splitlines() == ["started"]
    assert err.splitlines() == [f"the job failed: {_RAISED[what]}", line], err
    assert len(stderr.splitlines()) == 1, stderr


@pytest.mark.parametrize("how", ["exit", "quit"])
def test_a_stabledrl_error_a_script_reports_then_ends_with_the_exit_builtin_is_our_line(
    tmp_path, monkeypatch, capfd, how
):
    """`exit(1)` or `quit(1)`, the builtins Python's site module gives a script, in the except
    block ends the command as `sys.exit(1)` does: our line last, the error's code. Before, only
    `sys.exit` was wrapped: record exited 1 with no line of ours."""
    ended, stderr, _, err = _record_raising(
        tmp_path, monkeypatch, capfd, "--no-optimizer-hooks", f"{how}-usage"
    )
    assert ended == 2, stderr + err
    assert err.splitlines() == [
        f"the job failed: {_RAISED['usage']}",
        "error: cannot record this run: a refused setting",
    ], err
    assert len(stderr.splitlines()) == 1, stderr


@pytest.mark.parametrize("how", ["", "reported-"])
def test_the_tools_error_raised_in_a_ray_task_is_its_own_line_not_rays_traceback(
    tmp_path, monkeypatch, capfd, how
):
    """Ray raises a task's error in the caller as `RayTaskError(UsageError)`, a UsageError
    whose text is the task's traceback in colour: before, that whole traceback was flattened
    into the `error:` line."""
    pytest.importorskip("ray", reason="needs the ray extra (pip install -e '.[ray]')")
    ended, stderr, _, err = _record_raising(
        tmp_path, monkeypatch, capfd, "--no-optimizer-hooks", f"{how}remote"
    )
    assert ended == 2, stderr + err
    assert err.splitlines()[-1] == "error: cannot record this run: a refused setting", err
    assert "\x1b" not in err.splitlines()[-1] and len(stderr.splitlines()) == 1, stderr


_RAISED = {
    "usage": "UsageError('cannot record this run: a refused setting')",
    "input": "InputError('no such run: /nowhere')",
    "wrapped": "RuntimeError('cannot build the trainer')",
    "during": 'KeyError("the script\'s own bug")',
}
"""repr of the exception RAISES_SCRIPT's fail(WHAT) raises."""


@pytest.mark.parametrize(
    ("kind", "code", "out"),
    [
        # the exit inside the except block is caught, the script carries on and exits 1 later
        ("caught-usage", 1, ["started", "exit caught: 1", "carries on"]),
        ("exit5-usage", 5, ["started"]),  # an exit code the script chose
        ("message-usage", 1, ["started"]),  # sys.exit("the script's message")
        ("reported-during", 1, ["started"]),  # the script's own bug, while handling ours
    ],
)
def test_a_stabledrl_error_the_command_handles_keeps_its_exit_code(
    tmp_path, monkeypatch, capfd, kind, code, out
):
    ended, stderr, child_out, err = _record_raising(tmp_path, monkeypatch, capfd, kind)
    assert ended == code, stderr + err
    assert child_out.splitlines() == out
    message = ["the script's message"] if kind.startswith("message-") else []
    assert err.splitlines() == [f"the job failed: {_RAISED[kind.partition('-')[2]]}", *message]
    assert stderr.splitlines()[1:] == [
        f"the training command exited with code {code}; the run holds no step file",
    ], stderr


HYDRA_SCRIPT = textwrap.dedent(
    """
    import hydra
    from stabledrl_cli.dump import Recorder


    @hydra.main(version_base=None, config_path=None)
    def main(cfg) -> None:
        print("started", flush=True)
        Recorder("run", unit="bogus")  # a misuse: UsageError


    main()
    """
)


@pytest.mark.parametrize("full_error", ["", "1"], ids=["hydra-report", "HYDRA_FULL_ERROR"])
def test_a_stabledrl_error_under_real_hydra_is_our_last_line_and_its_exit_code(
    tmp_path, monkeypatch, full_error
):
    """hydra's run_and_report (verl's `python -m verl.trainer.main_ppo` runs under it)
    prints its shortened traceback and calls sys.exit(1); with HYDRA_FULL_ERROR=1 it lets
    the error through instead. Either way our line is the last and record exits 2. Before,
    hydra's report ended with record's "exited with code 1" (HYDRA_FULL_ERROR: the same as
    now)."""
    pytest.importorskip("hydra", reason="hydra is not installed (the verl extra brings it)")
    script = tmp_path / "train.py"
    script.write_text(HYDRA_SCRIPT)
    monkeypatch.setenv("HYDRA_FULL_ERROR", full_error)
    result = subprocess.run(
        [*cli_command(), "record", "--out", str(tmp_path / "out"), "--no-optimizer-hooks",
         "--", sys.executable, str(script)],
        capture_output=True, text=True, env=child_env(monkeypatch), timeout=TIMEOUT,
        cwd=tmp_path,  # hydra writes its outputs/ there
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stdout.splitlines() == ["started"]
    lines = result.stderr.splitlines()
    assert lines[-1] == "error: unit 'bogus' is not one of: token, sequence", result.stderr
    assert ("HYDRA_FULL_ERROR=1" in result.stderr) == (not full_error)  # hydra's own report


def test_any_other_exception_of_the_command_keeps_its_traceback_and_exit_code(
    tmp_path, monkeypatch, capfd
):
    ended, stderr, _, err = _record_raising(tmp_path, monkeypatch, capfd, "bug")
    assert ended == 1, stderr + err
    assert "Traceback (most recent call last)" in err
    assert 'KeyError: "the script\'s own bug"' in err
    assert "the training command exited with code 1" in stderr


def test_other_exceptions_keep_a_replaced_excepthook(tmp_path, monkeypatch, capfd):
    """Any other exception still goes to the command's own excepthook (rich's traceback, not
    Python's) and keeps its exit code."""
    ended, stderr, _, err = _record_raising(tmp_path, monkeypatch, capfd, "bug", command=RICH_HOOK)
    assert ended == 1, stderr + err
    assert "╭" in err and "Traceback (most recent call last)" in err  # rich's
    assert 'KeyError: "the script\'s own bug"' in err
    assert "the training command exited with code 1" in stderr


@pytest.mark.parametrize("how", ["STABLEDRL_DEBUG=1", "--debug"])
def test_with_debug_the_commands_stabledrl_error_shows_its_traceback(
    tmp_path, monkeypatch, capfd, how
):
    if how == "--debug":
        result = _record_raising(tmp_path, monkeypatch, capfd, "--debug", "input")
    else:
        monkeypatch.setenv("STABLEDRL_DEBUG", "1")
        result = _record_raising(tmp_path, monkeypatch, capfd, "input")
    ended, stderr, _, err = result
    assert ended == 3, stderr + err
    assert "Traceback (most recent call last)" in err
    assert "stabledrl_cli.errors.InputError: no such run: /nowhere" in err


def test_outside_record_a_stabledrl_error_is_pythons_usual_traceback(tmp_path, monkeypatch):
    script = tmp_path / "train.py"
    script.write_text(RAISES_SCRIPT)
    env = child_env(monkeypatch)
    result = subprocess.run(
        [sys.executable, str(script), "usage"], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 1
    assert result.stderr.startswith("Traceback (most recent call last)"), result.stderr
    assert result.stderr.endswith(
        "stabledrl_cli.errors.UsageError: cannot record this run: a refused setting\n"
    )


@pytest.mark.parametrize("hooks", ["--optimizer-hooks", "--no-optimizer-hooks"])
def test_a_stabledrl_error_on_every_torchrun_rank_is_one_line_per_rank(
    tmp_path, monkeypatch, hooks
):
    """torchrun's own ChildFailedError report is left out with the hooks off too: its process
    then never imports stabledrl. Rank 0 raises the error; rank 1 reports it and exits 1 in
    its except block (`reported-usage`: its report stays, before its line)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    # torchrun looks at its ranks every --monitor-interval seconds: 2 s leave each rank the
    # time to print its line once one has ended (0.1 s, the default, cut one short at times).
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", "--monitor-interval", "2", "{script}")  # fmt: skip
    result = subprocess.run(  # a real record process: its exit code, torchrun's report left out
        [*cli_command(), "record",
         *_raising_args(tmp_path, (hooks, "usage,reported-usage"), torchrun)],
        capture_output=True, text=True, env=child_env(monkeypatch), timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    errors = sorted(line for line in result.stderr.splitlines() if line.startswith("error:"))
    assert errors == [
        f"error: rank {rank}: cannot record this run: a refused setting" for rank in (0, 1)
    ], result.stderr
    lines = result.stderr.splitlines()  # rank 1's own report, before its line
    report = "the job failed: UsageError('cannot record this run: a refused setting')"
    assert lines.count(report) == 1 and lines.index(report) < lines.index(errors[1])


def test_a_missing_binary_is_one_line_and_exit_2(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["record", "--out", str(out), "--", "no-such-binary-sdrl"])
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "no-such-binary" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_a_bad_policy_spec_is_a_usage_error_before_the_command_runs(tmp_path, script):
    args = ["record", "--out", str(tmp_path / "r"), "-p", "nope", "--", sys.executable, str(script)]
    result = CliRunner().invoke(app, [*args, "1"])
    assert result.exit_code == 2 and "unknown policy" in result.output
    assert "logged" not in result.output


@pytest.mark.parametrize("spec", ["grpo:eps=abc", "nonsense", "nonsense:eps="])
def test_a_bad_policy_spec_in_the_environment_is_refused_as_policy_is(
    tmp_path, script, monkeypatch, capfd, spec
):
    """$STABLEDRL_POLICY, which `--policy` sets for the command, set by hand to a spec that
    `--policy` refuses: one line, exit 2, before the command runs. Before, the command ran:
    'grpo:eps=abc' and 'nonsense' were recorded as the run's policy (exit 0), and
    'nonsense:eps=' failed the first log_policy_batch (a warning, then exit 2)."""
    monkeypatch.setenv("STABLEDRL_POLICY", spec)
    out = tmp_path / "run"
    code, stderr, child_out, _ = record_here(
        monkeypatch, capfd, "--out", str(out), "--", sys.executable, str(script), "2"
    )
    assert code == 2 and child_out == "" and not out.exists()
    [line] = stderr.splitlines()
    assert line.startswith("error: $STABLEDRL_POLICY in the environment (record's --policy): ")

    monkeypatch.setenv("STABLEDRL_POLICY", "dapo:eps_high=0.28")  # a good one is recorded
    code, _, _, child_err = record_here(
        monkeypatch, capfd, "--out", str(out), "--", sys.executable, str(script), "2"
    )
    assert code == 0, child_err
    assert open_run(out).manifest["policy"]["name"] == "dapo"


# Three optimizer steps (recorded by the hooks, written by their writer thread), then an
# object whose finalizer aborts the process: it runs when the interpreter clears the module at
# exit, after the exit handlers, as torch's gloo teardown race does (tests/distributed_exit.py).
ABORT_AT_EXIT_SCRIPT = textwrap.dedent(
    """
    import os
    import torch

    class AbortsWhenFinalized:
        def __del__(self, abort=os.abort):  # the module's globals are gone by then
            abort()

    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        optimizer.step()
    print("trained", flush=True)
    held = AbortsWhenFinalized()
    """
)


def test_a_command_killed_by_a_signal_is_the_shells_exit_code_and_named(tmp_path, monkeypatch):
    """As the out-of-memory killer ends a training: 137 as a shell (and Kubernetes) reports it,
    where record exited 247 (256 - 9) and said 'exited with code -9'."""
    script = tmp_path / "train.py"
    script.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    result = subprocess.run(
        [*cli_command(), "record", "--out", str(tmp_path / "run"), "--no-optimizer-hooks",
         "--", sys.executable, str(script)],
        capture_output=True, text=True, env=child_env(monkeypatch), timeout=120,
    )  # fmt: skip
    assert result.returncode == 137, result.stderr
    assert result.stderr.splitlines()[-1] == (
        "the training command was killed by SIGKILL (often the out-of-memory killer); the run "
        "holds no step file"
    )


def test_a_command_that_aborts_at_the_interpreters_exit_keeps_every_finished_step(
    tmp_path, monkeypatch
):
    script, out = tmp_path / "train.py", tmp_path / "run"
    script.write_text(ABORT_AT_EXIT_SCRIPT)
    result = subprocess.run(
        [*cli_command(), "record", "--out", str(out), "--",
         sys.executable, str(script)],
        capture_output=True, text=True, env=child_env(monkeypatch), timeout=120,
    )  # fmt: skip
    assert "trained" in result.stdout
    assert result.returncode == 128 + 6, result.stderr  # SIGABRT, as a shell reports it
    assert (
        f"the training command was killed by SIGABRT; the run holds 3 step file(s): "
        f"`stabledrl inspect {out}`"
    ) in result.stderr
    shown = CliRunner().invoke(app, ["inspect", str(out), "--format", "json"])
    assert shown.exit_code == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["steps"] == 3 and report["integrity"]["findings"] == [], report


@pytest.mark.parametrize("flag", ["--rl-steps", "--steps"])
def test_a_step_count_past_the_bound_is_a_usage_error_before_training(tmp_path, monkeypatch, flag):
    """--rl-steps (and its old name) past MAX_RL_STEPS: exit 2, one line naming the bound, and
    no training started (a count of 10**30 trained until stopped)."""
    from stabledrl_cli.cli import record
    from stabledrl_cli.example.config import MAX_RL_STEPS

    trained: list[object] = []
    monkeypatch.setattr(record, "run_example", lambda *args: trained.append(args))
    out = tmp_path / "run"
    for count in (10**30, MAX_RL_STEPS + 1):
        result = CliRunner().invoke(app, ["record", "--out", str(out), flag, str(count)])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and f"{MAX_RL_STEPS}" in lines[0], result.stderr
    assert trained == [] and not out.exists()
    at_bound = CliRunner().invoke(app, ["record", "--out", str(out), flag, str(MAX_RL_STEPS)])
    assert at_bound.exit_code == 0, at_bound.output
    assert trained[0][2].steps == MAX_RL_STEPS


def test_branch_steps_past_the_bound_are_a_usage_error_before_training(tmp_path, monkeypatch):
    from stabledrl_cli import branching  # where branch's command takes run_branches from
    from stabledrl_cli.example.config import MAX_RL_STEPS

    branched: list[object] = []
    monkeypatch.setattr(branching, "run_branches", lambda *args, **kwargs: branched.append(kwargs))
    args = ["branch", str(tmp_path), "--at", "0", "-p", "grpo", "--rl-steps", str(10**30)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{MAX_RL_STEPS}" in lines[0], result.stderr
    assert branched == []


def test_record_force_over_a_closed_run_removes_its_mark_before_the_command_runs(tmp_path):
    """`record --force -- CMD` over a closed run: the mark is gone before the command starts,
    so a watch started beside it follows the new recording. Before, the mark stayed until the
    command's Recorder opened (at its first step, after its imports and model loading): a
    watch started meanwhile ended at once on the old run, with its gates (here the command,
    which checks the mark, exited 7)."""
    out = tmp_path / "run"
    with Recorder(out, policy=None) as recorder:
        recorder.log_step(0, grad_norm=1.0)
    check = (
        "import json, sys; "
        f"sys.exit(7 if 'recording_closed' in json.load(open({str(out / 'manifest.json')!r})) "
        "else 0)"
    )
    done = subprocess.run(
        cli_command("record", "--out", out, "--force", "--", sys.executable, "-c", check),
        capture_output=True, text=True, env=cli_environment(), timeout=TIMEOUT,
    )  # fmt: skip
    assert "exited with code 7" not in done.stderr and done.returncode != 7, done.stderr
    # the command recorded nothing: the run is the one closed, its mark back (test below)
    assert json.loads((out / "manifest.json").read_text())["recording_closed"] is True


TORCH_STEPS = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import torch

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(int(sys.argv[1])):  # optimizer steps, which the hooks record
        optimizer.zero_grad()
        model(torch.ones(1, 2)).sum().backward()
        optimizer.step()
    """
)
"""A script's first lines: `python script.py N ...` takes N optimizer steps."""

POLICY_STEPS = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import stabledrl_cli as sd

    logp = np.zeros((2, 3), dtype="float32")
    for step in range(int(sys.argv[1])):  # policy batches, recorded without torch
        sd.log_policy_batch(step, policy="grpo", logp=logp, logp_old=logp,
                            advantages=np.ones(2, dtype="float32"))
    """
)
"""A script's first lines: `python script.py N ...` logs N steps of a grpo run (numpy only:
for a test about record, not about the optimizer hooks)."""

CTRL_C_SCRIPT = TORCH_STEPS + textwrap.dedent(
    """
    flag = Path(sys.argv[2])
    flag.write_text("trained")
    try:
        while True:
            time.sleep(0.05)
    except KeyboardInterrupt:
        time.sleep(2)  # saving a checkpoint, far longer than subprocess's 0.25 s of grace
        flag.write_text("checkpoint saved")
        sys.exit(3)
    """
)


def _signalled(
    tmp_path: Path, monkeypatch, script_text: str, send: Callable[[int], None]
) -> tuple[subprocess.Popen[str], str]:
    """A real `record --out RUN -- python train.py 3 FLAG` in a process group of its own (as a
    terminal's foreground job; nothing is left running if the test fails), `send` called with
    its pid once the script wrote "trained" to FLAG; -> the ended process and its stderr."""
    script, out, flag = tmp_path / "train.py", tmp_path / "run", tmp_path / "flag"
    script.write_text(script_text)
    process = subprocess.Popen(
        [*cli_command(), "record", "--out", str(out), "--",
         sys.executable, str(script), "3", str(flag)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(monkeypatch),
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # not inherited ignored
    )  # fmt: skip
    try:
        while not (flag.exists() and flag.read_text() == "trained"):
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        send(process.pid)
        _, stderr = process.communicate(timeout=TIMEOUT)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    return process, stderr


def test_ctrl_c_reaches_the_command_which_ends_as_it_chooses(tmp_path, monkeypatch):
    """Ctrl-C in a terminal sends SIGINT to record and to its command (one process group).
    Before, record's subprocess.call killed the command (SIGKILL) 0.25 s later: a training
    that saves a checkpoint on Ctrl-C lost it, its exit code, the steps its Recorder still
    had to write at exit and the run's recording_closed mark; record exited 130."""
    out, flag = tmp_path / "run", tmp_path / "flag"
    process, stderr = _signalled(
        tmp_path, monkeypatch, CTRL_C_SCRIPT, lambda pid: os.killpg(pid, signal.SIGINT)
    )  # what Ctrl-C does
    assert flag.read_text() == "checkpoint saved"
    assert process.returncode == 3, stderr  # the command's own exit code
    assert "the training command exited with code 3; the run holds 3 step file(s)" in stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest.get("recording_closed") is True  # its Recorder closed at its exit
    assert len(list((out / "steps").iterdir())) == 3


TERM_SCRIPT = TORCH_STEPS + textwrap.dedent(
    """
    import signal

    def saved(*_):
        time.sleep(1)  # saving a checkpoint
        flag.write_text("checkpoint saved")
        sys.exit(143)

    signal.signal(signal.SIGTERM, saved)
    flag = Path(sys.argv[2])
    flag.write_text("trained")
    while True:
        time.sleep(0.05)
    """
)


def test_a_sigterm_to_record_reaches_the_command_which_ends_as_it_chooses(tmp_path, monkeypatch):
    """Kubernetes and docker signal a container's first process only: record. Before, record
    died at once on SIGTERM and its command trained on, unseen (in a container, killed with
    SIGKILL as record ended): no checkpoint, no exit code, the Recorder's last steps lost."""
    out, flag = tmp_path / "run", tmp_path / "flag"
    process, stderr = _signalled(
        tmp_path, monkeypatch, TERM_SCRIPT, lambda pid: os.kill(pid, signal.SIGTERM)
    )  # record's process alone
    assert flag.read_text() == "checkpoint saved"
    assert process.returncode == 143, stderr  # the command's own exit code
    assert "the training command exited with code 143; the run holds 3 step file(s)" in stderr
    assert json.loads((out / "manifest.json").read_text()).get("recording_closed") is True


def test_a_failure_whose_message_is_not_unicode_never_reaches_the_training(tmp_path, monkeypatch):
    """A recording failure whose message holds a lone surrogate (as a name decoded from a
    non-UTF-8 file name does) is reported like any other. Before, writing it to record's
    status file raised UnicodeEncodeError out of log_policy_batch, which never raises: the
    training died with a traceback (exit 1)."""
    script = tmp_path / "train.py"
    script.write_text(
        "import numpy as np, stabledrl_cli as sd\n"
        "fields = {'logp': np.zeros(3), 'logp_old': np.zeros(3), 'advantages': np.zeros(3)}\n"
        "ok = sd.log_policy_batch(0, **fields, **{'acc_\\udcff': 1.0})\n"
        "print('logged' if ok else 'not logged', 'training continues', flush=True)\n"
    )
    result = _record_process(tmp_path / "run", script, monkeypatch, "-p", "grpo")
    assert result.stdout.strip() == "not logged training continues", result.stderr
    assert "Traceback" not in result.stderr
    assert result.returncode == 2, result.stderr  # a field the Recorder does not take
    assert "error: recording failed: log_policy_batch failed at step 0: 'acc_" in result.stderr
    assert "is not a field of log_policy_batch" in result.stderr


STATUS_SCRIPT = POLICY_STEPS + textwrap.dedent(
    """
    status = os.environ["STABLEDRL_STATUS_FILE"]
    if sys.argv[2] == "removed":
        os.remove(status)
    elif sys.argv[2] == "fifo":  # a FIFO no one writes to in its place
        os.remove(status)
        os.mkfifo(status)
    else:  # lines that are not the bootstrap's: not ASCII digits, no exit code, not UTF-8
        with open(status, "ab") as out:
            out.write("E\\u00b2\\tx\\nE99999999999999999999\\tx\\n".encode() + b"\\xff\\xfe\\n")
    print("trained", flush=True)
    sys.exit(int(sys.argv[3]))
    """
)


@pytest.mark.parametrize(
    ("status", "code"), [("removed", 5), ("removed", 0), ("garbage", 0), ("fifo", 5)]
)
def test_a_status_file_record_cannot_read_leaves_the_commands_exit_code(
    tmp_path, monkeypatch, capfd, status, code
):
    """The command may remove or write to record's status file (it is in its environment):
    record still ends with the command's own exit code. Before, a removed file was exit 3
    (`status: No such file or directory`) and a line record could not parse exit 70
    (ValueError of int('²'), UnicodeDecodeError), whatever the command's code; and a FIFO
    put in its place made record wait for ever for a writer."""
    script = tmp_path / "train.py"
    script.write_text(STATUS_SCRIPT)
    args = ["--out", str(tmp_path / "run"), "--", sys.executable, str(script), "2", status]
    if (status, code) in (("removed", 5), ("garbage", 0)):  # the codes' real processes below
        result = record_done_here(monkeypatch, capfd, *args, str(code))
    else:  # a real record process: a FIFO may leave it waiting (the timeout ends it)
        result = subprocess.run(
            [*cli_command(), "record", *args, str(code)],
            capture_output=True, text=True, env=child_env(monkeypatch), timeout=120,
        )  # fmt: skip
    assert result.stdout == "trained\n"
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and "error:" not in result.stderr, result.stderr
    assert len(list((tmp_path / "run" / "steps").iterdir())) == 2


FORK_SCRIPT = TORCH_STEPS + textwrap.dedent(
    """
    if os.fork() == 0:  # a child forked after the first optimizer step, ending normally
        print("the child evaluates", flush=True)
        sys.exit(0)
    os.wait()
    for step in range(1, 4):
        if step == 2:  # a child forked with the run open, ending as any process does
            child = os.fork()
            if child == 0:
                sys.exit(0)
            os.waitpid(child, 0)
        optimizer.zero_grad()
        model(torch.ones(1, 2)).sum().backward()
        optimizer.step()
    print("trained", flush=True)
    """
)


@pytest.fixture(scope="module")
def forked_children(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """`record` of FORK_SCRIPT, once (its children forked before step 1 and before step 2):
    its result and run."""
    tmp = tmp_path_factory.mktemp("forked")
    with pytest.MonkeyPatch.context() as patch:
        return _record_script(tmp, patch, FORK_SCRIPT, "1"), tmp / "run"


def test_a_forked_child_leaves_the_parents_held_first_step_to_the_parent(forked_children):
    """The hooks hold the first optimizer step until the next event. Before, a child forked
    meanwhile wrote it at its exit (opening the run and marking it recording_closed), and the
    parent's recording then failed at its step 1 (`already exists and is not empty`): a run
    of 1 step of 4, exit 2."""
    result, out = forked_children
    assert result.stdout == "the child evaluates\ntrained\n"
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr, result.stderr
    assert len(list((out / "steps").iterdir())) == 4
    assert json.loads((out / "manifest.json").read_text())["recording_closed"] is True


@pytest.mark.parametrize("manifest", ["fifo", "endless", "deep"])
def test_record_force_over_a_manifest_that_is_no_file_records_the_run(
    tmp_path, monkeypatch, manifest
):
    """--force removes a closed run's mark, reading its manifest first: as every reader
    does, only a regular file, a bounded part of it, and JSON as strictly. Before, a FIFO
    there hung record before its command started, a link to /dev/zero read until memory ran
    out, and a JSON nested past the parser's depth was an internal error (RecursionError,
    exit 70)."""
    out, script = tmp_path / "run", tmp_path / "train.py"
    out.mkdir()
    if manifest == "fifo":
        os.mkfifo(out / "manifest.json")
    elif manifest == "deep":
        (out / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    else:
        (out / "manifest.json").symlink_to("/dev/zero")
    script.write_text(POLICY_STEPS + "print('trained')\n")

    def limit() -> None:  # an endless read fails here (MemoryError) rather than take the host
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))

    result = subprocess.run(
        [*cli_command(), "record", "--out", str(out), "--force", "--",
         sys.executable, str(script), "2"],
        capture_output=True, text=True, env=child_env(monkeypatch), timeout=120,
        preexec_fn=limit,
    )  # fmt: skip
    assert result.stdout == "trained\n" and result.returncode == 0, result.stderr
    assert json.loads((out / "manifest.json").read_text())["recording_closed"] is True
    assert len(list((out / "steps").iterdir())) == 2


def test_a_recording_failure_in_a_command_without_stderr_never_reaches_the_training(
    tmp_path, monkeypatch, capfd
):
    """A command run with its stderr closed (`2>&-`: Python's sys.stderr is None): the
    recording failure's warning is left out, the failure is still reported to record. Before,
    writing the warning raised AttributeError out of log_policy_batch (documented: never
    raises), and the training died (exit 1)."""
    script = tmp_path / "train.py"
    script.write_text(
        "import numpy as np, stabledrl_cli as sd\n"
        "ok = sd.log_policy_batch(0, logp=np.zeros(3), logp_old=np.zeros(2), advantages=1)\n"
        "print('logged' if ok else 'not logged', 'training continues', flush=True)\n"
    )
    command = f"exec {shlex.quote(sys.executable)} {shlex.quote(str(script))} 2>&-"
    code, stderr, child_out, child_err = record_here(
        monkeypatch, capfd, "--out", str(tmp_path / "run"), "-p", "grpo", "--", "sh", "-c", command
    )
    assert child_out == "not logged training continues\n" and child_err == "", stderr
    assert code == 2, stderr  # arrays log_step refuses: a usage error
    assert "error: recording failed: log_policy_batch failed at step 0" in stderr


def test_the_example_recorded_with_its_stderr_closed_exits_0(tmp_path):
    """`stabledrl record --rl-steps 2 2>&-` (Python's sys.stderr None) recorded its run, then
    exited 70, 'internal error': record flushed the missing stderr at its end."""
    command = shlex.join(cli_command("record", "--out", tmp_path / "run", "--rl-steps", "2"))
    done = subprocess.run(
        f"exec {command} 2>&-", shell=True, capture_output=True, text=True,
        env=cli_environment(), stdin=subprocess.DEVNULL, timeout=TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", (done.returncode, done.stderr)
    assert open_run(tmp_path / "run").step_numbers == [0, 1]


@pytest.mark.parametrize("how", [["--", sys.executable, "-c", "pass"], ["--rl-steps", "2"]])
def test_an_out_named_longer_than_the_file_system_takes_cannot_be_written(tmp_path, how):
    """A name past NAME_MAX is a path the system refuses to write: exit 4, one line naming it
    (it was exit 3, 'File name too long', from the check that --out is a directory)."""
    out = tmp_path / ("r" * (os.pathconf(tmp_path, "PC_NAME_MAX") + 1))
    result = CliRunner().invoke(app, ["record", "--out", str(out), *how])
    assert result.exit_code == 4, result.output
    assert result.stderr == f"error: {out}: cannot write it (File name too long)\n"


@pytest.mark.parametrize("how", [["--", sys.executable, "-c", "pass"], ["--rl-steps", "2"]])
def test_an_out_that_is_a_symlink_to_nothing_is_refused_as_one(tmp_path, how):
    """A dangling symlink named as --out is no directory: exit 2 and one line that says where
    it leads (it was exit 4, 'cannot write it (File exists)', once mkdir met the link; then
    'exists and is not a directory', of a name that names nothing that exists)."""
    out = tmp_path / "run"
    out.symlink_to(tmp_path / "nowhere")
    result = CliRunner().invoke(app, ["record", "--out", str(out), *how])
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"error: --out {out} is a symlink to {tmp_path / 'nowhere'}, which does not exist\n"
    )
    assert out.is_symlink() and not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize(
    "manifest", ['{"name": "webapp"}', '{"format": "other-tool"}', '["a.png", "b.png"]', "42"]
)
def test_force_never_overwrites_a_manifest_that_is_no_runs(tmp_path, manifest):
    """`--force` replaces a run: a directory whose manifest.json is another tool's (JSON of no
    stabledrl run: an object of another kind, or a list, a number...) is refused before the
    command starts (exit 2, one line), the file kept; it was overwritten with the run's
    manifest (a list or a number until the list of files `["a.png", "b.png"]` was lost so).
    (A manifest that is no JSON is a damaged run's, and replaced:
    test_record_force_over_a_manifest_that_is_no_file...)"""
    out = tmp_path / "webapp"
    out.mkdir()
    (out / "manifest.json").write_text(manifest)
    ran = tmp_path / "ran"
    command = ["--", sys.executable, "-c", f"open({str(ran)!r}, 'w')"]
    for how in (command, ["--rl-steps", "2"]):
        result = CliRunner().invoke(app, ["record", "--out", str(out), "--force", *how])
        assert result.exit_code == 2, result.output
        assert result.stderr == (
            f"error: {out / 'manifest.json'} is not a stabledrl run's manifest: replacing a "
            "run would overwrite it; remove it, or record elsewhere\n"
        )
        assert (out / "manifest.json").read_text() == manifest and not ran.exists()
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]


def test_without_force_a_foreign_manifest_is_named_without_the_force_hint(tmp_path):
    """A directory whose manifest.json is another tool's was 'not empty; pass --force', and
    --force was then refused ('is not a stabledrl run's manifest'): the refusal now comes
    first, without the hint that cannot help."""
    out = tmp_path / "webapp"
    out.mkdir()
    (out / "manifest.json").write_text('{"name": "webapp"}')
    result = CliRunner().invoke(app, ["record", "--out", str(out), "--", sys.executable, "-c", ""])
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"error: {out / 'manifest.json'} is not a stabledrl run's manifest: replacing a "
        "run would overwrite it; remove it, or record elsewhere\n"
    )


LATE_STEP_SCRIPT = textwrap.dedent(
    """
    import atexit, sys
    import numpy as np
    import stabledrl_cli as sd


    def log(step):
        logp = np.full(4, -1.0, dtype="float32")
        return sd.log_policy_batch(
            step, logp=logp, logp_old=logp + 0.1, advantages=np.ones(4, dtype="float32"),
            seq_id=np.zeros(4, dtype="int32"),
        )


    # registered before the run opens (and before torch is imported): atexit runs it after
    # every handler registered later
    atexit.register(lambda: print("late step logged:", log(2), flush=True))
    if sys.argv[1] == "optimizer":  # the optimizer hooks open the run (asynchronous writes)
        import torch

        weight = torch.nn.Parameter(torch.ones(2))
        optimizer = torch.optim.SGD([weight], lr=0.1)
    for step in range(2):
        if sys.argv[1] == "optimizer":
            weight.grad = torch.ones(2)
            optimizer.step()
        log(step)
    """
)


@pytest.mark.parametrize("steps", ["batches", "optimizer"])
def test_a_step_an_exit_handler_registered_before_the_run_logs_is_recorded(
    tmp_path, monkeypatch, capfd, steps
):
    """Before, the run's own exit handler (registered when the run opened, so run first)
    closed it before the script's: the late step was refused ("already exists and is not
    empty", or "log_step on a closed Recorder") and record exited 2."""
    out = tmp_path / "run"
    code, stderr, child_out, child_err = _record_text(
        tmp_path, monkeypatch, capfd, LATE_STEP_SCRIPT, steps, options=("-p", "grpo")
    )
    assert code == 0, stderr + child_err
    assert child_out.splitlines() == ["late step logged: True"]
    run = open_run(out)
    assert run.step_numbers == [0, 1, 2]
    assert json.loads((out / "manifest.json").read_text()).get("recording_closed") is True


def _script_args(tmp_path: Path, text: str, args: tuple[str, ...], options: tuple[str, ...]):
    """record's arguments `--out TMP/run OPTIONS -- python SCRIPT ARGS`, SCRIPT holding
    `text`."""
    script = tmp_path / "train.py"
    script.write_text(text)
    return ["--out", str(tmp_path / "run"), *options, "--", sys.executable, str(script), *args]


def _record_script(
    tmp_path: Path, monkeypatch, text: str, *args: str, options: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """A real `stabledrl record --out TMP/run OPTIONS -- python SCRIPT ARGS` process."""
    return subprocess.run(
        [*cli_command(), "record", *_script_args(tmp_path, text, args, options)],
        capture_output=True, text=True, env=child_env(monkeypatch), timeout=TIMEOUT,
    )  # fmt: skip


def _record_text(
    tmp_path: Path, monkeypatch, capfd, text: str, *args: str, options: tuple[str, ...] = ()
):
    """`_record_script` with record in-process (`record_here`), its command a real process."""
    return record_here(monkeypatch, capfd, *_script_args(tmp_path, text, args, options))


THREAD_EXIT_SCRIPT = textwrap.dedent(
    """
    import sys, threading
    import stabledrl_cli.errors as errors


    def work():
        try:
            raise errors.UsageError("cannot record this run: a refused setting")
        except errors.UsageError:
            sys.exit(1)  # ends this thread only, silently, as Python's SystemExit does


    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    print("carries on", flush=True)
    sys.exit(5)
    """
)


def test_a_thread_that_exits_while_it_handles_the_tools_error_ends_silently(
    tmp_path, monkeypatch, capfd
):
    """threading ignores a SystemExit in a thread only when its type is SystemExit itself:
    before, the exit that reports the error (a subclass) was printed as the thread's
    traceback ("Exception in thread ... _ReportedExit: 1"), though the process went on."""
    code, stderr, child_out, child_err = _record_text(
        tmp_path, monkeypatch, capfd, THREAD_EXIT_SCRIPT, options=("--no-optimizer-hooks",)
    )
    assert code == 5, stderr + child_err
    assert child_out.splitlines() == ["carries on"] and child_err == ""
    assert stderr.splitlines()[1:] == [
        "the training command exited with code 5; the run holds no step file"
    ], stderr


ENDED_AT_EXIT_SCRIPT = textwrap.dedent(
    """
    import atexit, os, sys

    atexit.register(os._exit, 0)  # a library's exit handler, registered before torch's import
    import torch

    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    for step in range(int(sys.argv[1])):
        weight.grad = torch.ones(2)
        optimizer.step()
    """
)


@pytest.mark.parametrize("steps", [1, 5])
def test_an_exit_handler_that_ends_the_process_loses_no_finished_step(
    tmp_path, monkeypatch, capfd, steps
):
    """An exit handler registered before the run opened that ends the process (`os._exit`),
    or never returns: the run is closed after it, so the held and queued steps are written
    before it runs. Before, none was written (the run held no step file, exit 2); at d3346fa
    they all were."""
    code, stderr, _, child_err = _record_text(
        tmp_path, monkeypatch, capfd, ENDED_AT_EXIT_SCRIPT, str(steps)
    )
    out = tmp_path / "run"
    assert code == 0, stderr + child_err
    assert open_run(out).step_numbers == list(range(steps))
    # ended before its close: the run is not marked closed, as a killed recording is not
    assert "recording_closed" not in json.loads((out / "manifest.json").read_text())


def test_a_forked_child_that_ends_leaves_the_parents_run_alone(forked_children):
    """The child runs the exit handlers it inherited: they are the parent's run's to run."""
    result, out = forked_children
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[1:] == [], result.stderr
    assert open_run(out).step_numbers == [0, 1, 2, 3]
    assert json.loads((out / "manifest.json").read_text()).get("recording_closed") is True


INTERRUPTED_DRAIN_SCRIPT = textwrap.dedent(
    """
    import atexit, threading
    import stabledrl_cli.dump._step_writes as writer

    LATE = 4
    disk = threading.Event()  # a slow disk for the late step: it waits in the queue
    durable, stop = writer.make_durable, writer.WriteThread.stop


    def slow_durable(item):
        if item.step == LATE:
            disk.wait()
        durable(item)


    def stop_interrupted_once(self):
        if not getattr(self, "interrupted", False):  # a second Ctrl-C, as the close drains
            self.interrupted = True
            raise KeyboardInterrupt
        disk.set()
        stop(self)


    def late_step():  # the script's exit handler, registered before the run opened
        weight.grad = torch.ones(2)
        optimizer.step()


    writer.make_durable, writer.WriteThread.stop = slow_durable, stop_interrupted_once
    atexit.register(late_step)
    import torch

    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    for step in range(LATE):
        weight.grad = torch.ones(2)
        optimizer.step()
    """
)


def test_a_ctrl_c_during_the_exit_drain_loses_no_queued_step(tmp_path, monkeypatch, capfd):
    """The Recorder's own exit handler used to finish a drain that a Ctrl-C cut short; record
    removed it (the run is closed last), so a step still queued was lost (here the one the
    script's exit handler logs)."""
    code, stderr, _, child_err = _record_text(
        tmp_path, monkeypatch, capfd, INTERRUPTED_DRAIN_SCRIPT
    )
    out = tmp_path / "run"
    assert code == 0, stderr + child_err
    assert "KeyboardInterrupt" in child_err  # the Ctrl-C is not hidden
    assert open_run(out).step_numbers == [0, 1, 2, 3, 4]
    assert json.loads((out / "manifest.json").read_text()).get("recording_closed") is True


def test_the_exit_that_reports_a_handled_error_pickles_as_pythons_own(tmp_path, monkeypatch):
    """A SystemExit may be pickled to another process (concurrent.futures' process pool sends
    a worker's back): the copy is a plain SystemExit with the same code, never an error of
    its own when it is loaded."""
    from stabledrl_cli.capture._status import ENV_STATUS_FILE
    from stabledrl_cli.capture._uncaught import reported_exit
    from stabledrl_cli.errors import UsageError

    monkeypatch.setenv(ENV_STATUS_FILE, str(tmp_path / "status"))
    exiting = reported_exit(UsageError("a refused setting"), 1)
    assert exiting is not None
    copy = pickle.loads(pickle.dumps(exiting))
    assert type(copy) is SystemExit and copy.code == 1
    assert not (tmp_path / "status").exists()  # nothing reported: the process goes on


@pytest.mark.parametrize(
    ("first_line", "mode", "why"),
    [
        (None, 0o755, "command not found: {cmd}"),
        (b"#!/no/such/interpreter\n", 0o755, "cannot run {cmd}: its #! line names "
         "/no/such/interpreter, which does not exist"),
        (b"just text, no #! line\n", 0o755, "cannot run {cmd}: Exec format error"),
        (b"#!/bin/sh\n", 0o644, "cannot run {cmd}: Permission denied"),
    ],
)  # fmt: skip
def test_a_command_the_system_cannot_start_is_one_line_and_exit_2(
    tmp_path, monkeypatch, capfd, first_line, mode, why
):
    """A script whose interpreter is missing made exec say the script itself did not exist
    (exit 3, "No such file or directory"), and a file the system cannot execute exited 3
    with the OSError's text: each is now a usage error saying why, before any step. A file
    without the execute bit was said to be "command not found": it is there, not runnable."""
    cmd = tmp_path / "train.sh"
    if first_line is not None:
        cmd.write_bytes(first_line + b"exit 0\n")
        cmd.chmod(mode)
    out = tmp_path / "run"
    if first_line is None:  # a real process for the exit code; the other ways to it here
        done = subprocess.run(
            [*cli_command(), "record", "--out", str(out), "--", str(cmd)],
            capture_output=True, text=True, timeout=TIMEOUT, env=cli_environment(),
        )  # fmt: skip
    else:
        done = record_done_here(monkeypatch, capfd, "--out", str(out), "--", str(cmd))
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == f"error: {why.format(cmd=cmd)}"
    assert "Traceback" not in done.stderr
    assert not (out / "steps").exists() or not any((out / "steps").iterdir())


RESUMED_LOOP = textwrap.dedent(
    """
    import sys
    import numpy as np
    import stabledrl_cli as sd

    start, end = int(sys.argv[1]), int(sys.argv[2])
    kwargs = {"resume": True, "resume_from": start} if start else None
    for step in range(start, end):
        logp = np.full((2, 3), -1.0, dtype="float32")
        ok = sd.log_policy_batch(
            step, recorder_kwargs=kwargs, logp=logp, logp_old=logp,
            advantages=np.ones(2, dtype="float32"), loss=float(step),
        )
        print(step, ok, flush=True)
    """
)


@pytest.fixture(scope="module")
def closed_loop_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`record -p grpo` of RESUMED_LOOP's steps 0 to 4, closed, once: tests copy it."""
    tmp = tmp_path_factory.mktemp("closed")
    with pytest.MonkeyPatch.context() as patch:
        first = _record_script(tmp, patch, RESUMED_LOOP, "0", "5", options=("-p", "grpo"))
    assert first.returncode == 0, first.stderr
    return tmp / "run"


def test_record_force_with_a_loop_that_resumes_continues_the_run(
    tmp_path, monkeypatch, capfd, closed_loop_run
):
    """A custom loop that resumes its run (recorder_kwargs resume=True) under `record --force`
    (the directory is not empty): --force made the Recorder overwrite=True beside the script's
    resume=True, refused ('pick one'): recording was off for the whole resumed training. Now
    the run goes on: steps before resume_from kept, the later ones the resumed loop's."""
    options = ("-p", "grpo", "--no-optimizer-hooks")
    shutil.copytree(closed_loop_run, tmp_path / "run")
    code, stderr, child_out, child_err = _record_text(
        tmp_path, monkeypatch, capfd, RESUMED_LOOP, "3", "7", options=(*options, "--force")
    )
    assert code == 0, stderr + child_err
    assert "False" not in child_out and "warning" not in stderr + child_err
    run = open_run(tmp_path / "run")
    assert run.step_numbers == list(range(7))
    assert [run.step(n).scalars["loss"] for n in range(7)] == [float(n) for n in range(7)]


RESUMED_TORCH_LOOP = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    import stabledrl_cli as sd

    start, end, first = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    kwargs = {"resume": True, "resume_from": start} if start else None
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(start, end):
        model(torch.ones(2)).sum().backward()
        if first == "step":
            optimizer.step()
        logp = np.full((2, 3), -1.0, dtype="float32")
        ok = sd.log_policy_batch(
            step, recorder_kwargs=kwargs, logp=logp, logp_old=logp,
            advantages=np.ones(2, dtype="float32"), loss=float(step),
        )
        if first == "batch":
            optimizer.step()
        optimizer.zero_grad()
        print(step, ok, flush=True)
    """
)


@pytest.mark.parametrize("first", ["batch", "step"])
def test_a_resumed_loops_optimizer_steps_pair_with_its_batches(tmp_path, monkeypatch, capfd, first):
    """Under the optimizer hooks, the resumed process's n-th optimizer step is the run's step
    resume_from + n. Before, the hooks numbered it n from 0 again: step 0 'does not follow
    step 3', recording went off and steps 4-6 were lost (or, batch first, 3 kept half)."""
    options = ("-p", "grpo")
    code, stderr, _, child_err = _record_text(
        tmp_path, monkeypatch, capfd, RESUMED_TORCH_LOOP, "0", "5", first, options=options
    )
    assert code == 0, stderr + child_err
    code, stderr, _, child_err = _record_text(
        tmp_path, monkeypatch, capfd, RESUMED_TORCH_LOOP, "3", "7", first,
        options=(*options, "--force"),
    )  # fmt: skip
    assert code == 0, stderr + child_err
    assert "warning" not in stderr + child_err
    run = open_run(tmp_path / "run")
    assert run.step_numbers == list(range(7))
    for n in range(7):
        step = run.step(n)
        assert step.scalars["loss"] == float(n) and step.scalars["lr"] == 0.1, n
        assert not step.is_scalar


SERIES_IN_SCALARS = textwrap.dedent(
    """
    import numpy as np
    import torch
    import stabledrl_cli as sd

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        model(torch.ones(2)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        logp = np.full((2, 3), -1.0, dtype="float32")
        ok = sd.log_policy_batch(
            step, logp=logp, logp_old=logp, advantages=np.ones(2, dtype="float32"),
            scalars={"step_time": 7.0, "nonfinite_grads": 5.0}, lr=0.5,
        )
        print(step, ok, flush=True)
    """
)


def test_a_scalar_the_batch_and_the_hooks_both_give_is_the_batchs(tmp_path, monkeypatch, capfd):
    """step_time and nonfinite_grads in the batch's scalars=, which the hooks give as keywords:
    the step had both, refused ('given twice'), and recording went off at step 0. The batch's
    value wins, as a keyword of the batch's does (lr)."""
    code, stderr, _, child_err = _record_text(
        tmp_path, monkeypatch, capfd, SERIES_IN_SCALARS, options=("-p", "grpo")
    )
    assert code == 0, stderr + child_err
    run = open_run(tmp_path / "run")
    assert run.step_numbers == [0, 1, 2]
    for n in range(3):
        scalars = run.step(n).scalars
        assert (scalars["step_time"], scalars["nonfinite_grads"], scalars["lr"]) == (7, 5, 0.5)
        assert "grad_norm" in scalars  # the hooks' own


GUARDED_LOOP = textwrap.dedent(
    """
    import numpy as np
    import torch
    import stabledrl_cli as sd
    from stabledrl_cli.guard import Guard

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = Guard(mode="skip")
    for step in range(5):
        optimizer.param_groups[0]["lr"] = 0.1 * (step + 1)  # names the loop's step
        model(torch.ones(2)).sum().backward()
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        decision = guard.before_step(grad_norm=float("nan") if step == 2 else norm)
        if not decision.skip:
            optimizer.step()
        optimizer.zero_grad()
        logp = np.full((2, 3), -1.0, dtype="float32")
        ok = sd.log_policy_batch(
            step, logp=logp, logp_old=logp, advantages=np.ones(2, dtype="float32"),
            loss=float(step), scalars=guard.scalars(decision),
        )
        print(step, decision.action, ok, flush=True)
    """
)


def test_a_step_the_guard_skips_keeps_the_hooks_steps_paired(tmp_path, monkeypatch, capfd):
    """A guard skip leaves optimizer.step() uncalled: the hooks' numbering fell one behind
    the loop's, so step 3's batch was paired with step 4's optimizer step (its lr, its grad
    norm), step 2 held step 3's, and step 4 had none. The guard's skip is now the hooks'
    step, recorded as skipped (optimizer_skipped 1), and the numbering goes on."""
    code, stderr, child_out, child_err = _record_text(
        tmp_path, monkeypatch, capfd, GUARDED_LOOP, options=("-p", "grpo")
    )
    assert code == 0, stderr + child_err
    assert "skip" in child_out.splitlines()[2]
    run = open_run(tmp_path / "run")
    assert run.step_numbers == list(range(5))
    for n in range(5):
        scalars = run.step(n).scalars
        assert scalars["loss"] == n
        assert scalars["lr"] == pytest.approx(0.1 * (n + 1)), n
        assert scalars.get("optimizer_skipped", 0.0) == (1.0 if n == 2 else 0.0), n
        assert scalars["guard_action"] == (2.0 if n == 2 else 0.0)


@pytest.mark.parametrize(
    ("damage", "end", "policy", "code"),
    [
        (False, "3", "grpo", 2),  # a resume that records no step
        (True, "6", "grpo", 3),  # refused: an earlier step is corrupt
        (False, "6", "dapo", 2),  # refused: another policy
    ],
)
def test_record_force_that_changes_no_step_gives_the_run_its_closed_mark_back(
    tmp_path, monkeypatch, capfd, closed_loop_run, damage, end, policy, code
):
    """`record --force` removes a closed run's mark before its command starts; a command that
    then records nothing (a resume refused, a loop that logs no step) leaves the run's steps
    and manifest as they were closed. Before, the mark stayed gone: a `watch` of the run never
    ended on 'the recording closed'. Now it is back once the command ended."""
    shutil.copytree(closed_loop_run, tmp_path / "run")
    manifest = tmp_path / "run" / "manifest.json"
    closed = json.loads(manifest.read_text())
    assert closed["recording_closed"] is True
    if damage:
        step = next((tmp_path / "run" / "steps").glob("*000001*"))
        step.write_bytes(step.read_bytes()[:40])
    options = ("--force", "--no-optimizer-hooks", "-p", policy)
    again = _record_text(tmp_path, monkeypatch, capfd, RESUMED_LOOP, "3", end, options=options)
    assert again[0] == code, again
    assert json.loads(manifest.read_text()) == closed


OWN_POLICY_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    import stabledrl_cli as sd

    for step in range(2):
        sd.log_policy_batch(step, policy="POLICY", logp=np.zeros((2, 3), "float32"),
                            logp_old=np.zeros((2, 3), "float32"), advantages=np.ones(2, "float32"))
    """
)


@pytest.mark.parametrize(
    ("given", "scripts", "warned"),
    [("grpo", "dapo", True), ("dapo", "dapo:eps_high=0.28", False), ("grpo", "grpo", False)],
)
def test_a_script_that_names_another_policy_than_record_is_told(
    tmp_path, monkeypatch, capfd, given, scripts, warned
):
    """`record -p grpo -- python train.py` whose script calls log_policy_batch(policy='dapo'):
    the run recorded dapo in silence, though --policy's help says it is the policy the
    command's log_policy_batch records. The script's still wins (it knows what it trains
    with); one warning says so. The same policy written two ways warns of nothing."""
    script = tmp_path / "own.py"
    script.write_text(OWN_POLICY_SCRIPT.replace("POLICY", scripts))
    out = tmp_path / "run"
    code, _, _, child_err = record_here(
        monkeypatch, capfd, "--out", str(out), "-p", given, "--", sys.executable, str(script)
    )
    assert code == 0, child_err
    assert open_run(out).manifest["policy"]["name"] == scripts.split(":")[0]
    lines = [line for line in child_err.splitlines() if "record --policy" in line]
    if warned:
        assert lines == [
            f"stabledrl: warning: log_policy_batch(policy=...) names {scripts}, record "
            f"--policy {given}: the run records the script's, {scripts}"
        ], child_err
    else:
        assert lines == [], child_err


@pytest.mark.parametrize(
    ("inside", "folder", "run"),
    [
        ("steps/x", "steps", ""),
        ("checkpoints", "checkpoints", ""),
        ("branches/grpo@0/steps/x", "steps", "branches/grpo@0"),
        ("branches", "branches", ""),
        ("branches/mine", "branches", ""),
        ("branches/grpo@0/x", "branches", ""),
    ],
)
@pytest.mark.parametrize("command", [(), ("--", sys.executable, "-c", "print('it ran')")])
def test_an_out_inside_a_runs_steps_or_checkpoints_folder_is_refused(
    tmp_path, inside, folder, run, command
):
    """`record --out RUN/steps/x` recorded a run there (exit 0), which left RUN holding a file
    that is not its own (an unknown_file finding), where `branch --out` refuses the place:
    refused as branch refuses it, exit 2, before anything is written (the run of a branch run
    included). In RUN/branches, where only branch runs go, `record --out RUN --force` then
    exited 2 ('RUN/branches/manifest.json: not a file of a branch run')."""
    original = tmp_path / "run"
    for path in (original, original / "branches" / "grpo@0"):
        with Recorder(path, policy="grpo") as recorder:
            recorder.log_step(0, grad_norm=1.0)
    (original / "checkpoints").mkdir()
    before = sorted(original.rglob("*"))
    out = original / inside
    args = ["record", "--out", str(out), *(command or ("--rl-steps", "1"))]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2, refused.output
    assert refused.stderr == (
        f"error: {out}: a run would be inside the {folder} folder of {original / run}; pass "
        "another --out\n"
    )
    assert "it ran" not in refused.stdout and sorted(original.rglob("*")) == before
