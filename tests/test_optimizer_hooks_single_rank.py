"""`stabledrl record -- python train.py` of a script that never imports stabledrl, trained
in one process: every optimizer.step() is recorded by the optimizer hooks
(docs/recording.md), and the recorded values are the ones the script computes itself. Ranks:
tests/test_optimizer_hooks_multi_rank.py; child processes that step:
tests/test_optimizer_hooks_child_processes.py."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _bootstrap_state import fresh_recording
from _cli import cli_command, close, record, record_env
from _phases import PHASES_SCRIPT
from _record_here import record_here, record_python_here
from typer.testing import CliRunner

from stabledrl_cli.capture import bootstrap, log_policy_batch
from stabledrl_cli.capture._step_stats import _module_norms
from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import open_run

# Steps 0-1 plain, 2-4 clipped (step 3 by the max norm), a NaN gradient at step 4; two
# parameter groups; a second optimizer ("critic") that steps after the model's. The script
# writes what it computed.
SCRIPT = textwrap.dedent(
    """
    import json, math, sys
    import torch

    fsdp_imported = "torch.distributed.fsdp" in sys.modules
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    critic = torch.nn.Linear(6, 1)
    optimizer = torch.optim.AdamW([
        {"params": model[0].parameters(), "lr": 1e-3},
        {"params": model[2].parameters(), "lr": 3e-3},
    ])
    critic_optimizer = torch.optim.SGD(critic.parameters(), lr=0.5)
    seen = []
    for step in range(5):
        x = torch.randn(16, 6)
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        if step == 4:
            model[2].weight.grad[0, 0] = float("nan")
        norms = {name: p.grad.double().norm().item() for name, p in model.named_parameters()}
        groups = [math.sqrt(sum(norms[f"{m}.{k}"] ** 2 for k in ("weight", "bias")))
                  for m in (0, 2)]
        grad_norm = math.sqrt(sum(n * n for n in norms.values()))
        if step == 3:  # a max-norm clip: the L2 norm before it is recorded
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1, norm_type=math.inf)
        elif step >= 2:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.1).item()
        optimizer.step()
        critic_optimizer.zero_grad()
        critic(x).pow(2).mean().backward()
        critic_norm = math.sqrt(sum(p.grad.double().norm().item() ** 2
                                    for p in critic.parameters()))
        critic_optimizer.step()
        seen.append({"grad_norm": grad_norm, "groups": groups, "critic": critic_norm,
                     "nonfinite": sum(not math.isfinite(n) for n in norms.values())})
    json.dump({"steps": seen}, open(sys.argv[1], "w"))
    print("trained", "fsdp" if fsdp_imported else "alone", flush=True)
    """
)


def _recorded(tmp_path: Path, source: str, *args: str) -> Any:
    """Records a script (`source`) into tmp_path/run, given its output file and `args`, and
    returns what it wrote there (JSON)."""
    script, computed = tmp_path / "train.py", tmp_path / "computed.json"
    script.write_text(source)
    result = record("--out", str(tmp_path / "run"), "--", sys.executable, str(script),
                    str(computed), *args)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(computed.read_text())


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One recording of SCRIPT: (run directory, what the script computed)."""
    tmp = tmp_path_factory.mktemp("hooks")
    script, computed = tmp / "train.py", tmp / "computed.json"
    script.write_text(SCRIPT)
    result = record("--out", str(tmp / "run"), "--", sys.executable, str(script), str(computed))
    assert result.returncode == 0, result.stderr
    assert "trained alone" in result.stdout  # installing the hooks imports no FSDP1
    (tmp / "stderr.txt").write_text(result.stderr)
    return tmp / "run", json.loads(computed.read_text())


def test_every_step_of_a_script_that_never_imports_stabledrl_is_recorded(plain_run):
    run_dir, _ = plain_run
    assert "stabledrl" not in SCRIPT
    run = open_run(run_dir)
    assert run.step_numbers == [0, 1, 2, 3, 4]
    assert run.policy_spec is None
    assert run.manifest["source"] == {"kind": "optimizer-hooks"}
    assert all(run.step(n).is_scalar for n in run.step_numbers)


def test_recorded_norms_equal_what_the_script_computed(plain_run):
    run_dir, computed = plain_run
    run = open_run(run_dir)
    for n, mine in enumerate(computed["steps"]):
        scalars = run.step(n).scalars
        # clip_grad_norm_'s own return value on steps 2 and 4, the norm of the gradients before
        assert close(scalars["grad_norm"], mine["grad_norm"]), (n, scalars)
        for g in (0, 1):
            assert close(scalars[f"grad_norm/group_{g}"], mine["groups"][g]), (n, g)
        assert scalars["lr/group_0"] == 1e-3 and scalars["lr/group_1"] == 3e-3
        assert scalars["lr"] == 1e-3
        assert scalars["nonfinite_grads"] == mine["nonfinite"]
        assert close(scalars["grad_norm/module/0"], mine["groups"][0])
        assert close(scalars["grad_norm/module/2"], mine["groups"][1])
        assert ("step_time" in scalars) == (n > 0)
        assert n == 0 or scalars["step_time"] > 0
        if n > 0:  # the critic's step after the model's step n - 1
            assert scalars["optimizer_1/steps"] == 1
            assert close(scalars["optimizer_1/grad_norm"], computed["steps"][n - 1]["critic"])
            assert scalars["optimizer_1/lr"] == 0.5
    assert computed["steps"][4]["nonfinite"] == 1  # the NaN step is recorded, not raised
    assert math.isnan(run.step(4).scalars["grad_norm"])


def test_another_optimizers_steps_after_the_run_optimizers_last_are_named_at_exit(plain_run):
    """The critic steps after the model's optimizer, the run's: its steps go into the run's
    next step, and its last one has none. It was lost without a word; one line names it."""
    run_dir, _ = plain_run
    notes = [line for line in (run_dir.parent / "stderr.txt").read_text().splitlines()
             if line.startswith("stabledrl: note: not recorded")]  # fmt: skip
    assert notes == [
        "stabledrl: note: not recorded: optimizer_1's last step, taken after the run "
        "optimizer's last step (another optimizer's steps are recorded with the run "
        "optimizer's next step)"
    ]


@pytest.mark.parametrize(("world_size", "prefix"), [("2", "rank 1: "), ("1", "")])
def test_the_unrecorded_note_names_its_rank_in_a_run_of_several(
    monkeypatch, capsys, world_size, prefix
):
    """Under torchrun each rank printed the same 'not recorded' line, the ranks' lines not
    told apart though each rank's lost steps may differ; a rank of several names itself."""
    from stabledrl_cli.capture import optimizer_hooks
    from stabledrl_cli.capture._hook_state import OtherSteps

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setattr(optimizer_hooks.state, "on", True)
    monkeypatch.setattr(optimizer_hooks.state, "others", {1: OtherSteps(last=None, steps=2)})
    monkeypatch.setattr(bootstrap, "hooks_wanted", lambda: True)
    optimizer_hooks._unrecorded_note()
    assert capsys.readouterr().err.startswith(
        f"stabledrl: note: {prefix}not recorded: optimizer_1's last 2 steps, taken after"
    )


def test_a_rank_that_spawn_started_names_itself_as_it_records(monkeypatch, capsys, tmp_path):
    """torch.multiprocessing.spawn sets no RANK or WORLD_SIZE: each rank gives
    init_process_group its own, and records as it (its process group says so). Its lines on
    stderr named no rank: rank 1 of 2's note and error line read as one process's."""
    import torch.distributed as dist

    from stabledrl_cli.capture import _process_rank, _uncaught, optimizer_hooks
    from stabledrl_cli.capture._hook_state import OtherSteps
    from stabledrl_cli.errors import UsageError

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(_process_rank, "_group_rank", {})  # (the rank it sees is kept)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # as rank 1 of 2's group
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setenv("STABLEDRL_STATUS_FILE", str(tmp_path / "status"))
    monkeypatch.setattr(optimizer_hooks.state, "on", True)
    monkeypatch.setattr(optimizer_hooks.state, "others", {1: OtherSteps(last=None, steps=2)})
    monkeypatch.setattr(bootstrap, "hooks_wanted", lambda: True)
    monkeypatch.setattr(_uncaught, "interrupted", None)
    optimizer_hooks._unrecorded_note()
    assert _uncaught.uncaught_error(UsageError("no policy"))
    note, error = capsys.readouterr().err.splitlines()
    assert note.startswith("stabledrl: note: rank 1: not recorded: optimizer_1's last 2 steps")
    assert error == "error: rank 1: no policy"


def test_inspect_shows_a_run_of_optimizer_steps(plain_run):
    run_dir, _ = plain_run
    result = CliRunner().invoke(app, ["inspect", str(run_dir), "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["steps"] == data["scalar_steps"] == 5 and data["policy"] is None
    assert 4 in data["observed"]["nonfinite_steps"]
    assert data["series"]["grad_norm"]["nonfinite"] == 1


MIXED = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    import stabledrl_cli as sd

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def batch(step):
        logp = np.full((2, 3), -1.0 - step, dtype="float32")
        policy = {"policy": "grpo"} if sys.argv[1] == "script" else {}
        return dict(logp=logp, logp_old=logp, advantages=np.ones(2, dtype="float32"),
                    loss=float(step), scalars={"mine": torch.tensor(10.0 + step)}, **policy)

    for step in range(4):
        optimizer.zero_grad()
        model(torch.randn(8, 4)).sum().backward()
        before = step >= 2  # steps 2-3: the batch is logged before the step it drives
        if before:
            fields = batch(step)
            assert sd.log_policy_batch(step, **fields)
            fields["logp"][:] = 99.0  # the script reuses its buffers at once
            fields["scalars"]["mine"].fill_(99.0)
        optimizer.step()
        if not before:  # steps 0-1: after it
            assert sd.log_policy_batch(step, **batch(step))
    print("trained", flush=True)
    """
)


@pytest.mark.parametrize("policy_from", ["record", "script"])
def test_a_logged_batch_and_its_optimizer_step_share_one_step_file(
    tmp_path, monkeypatch, capfd, policy_from
):
    """The policy from `record --policy`, or from the script's first call, which comes after
    the first optimizer step (the hooks' first step waits for it)."""
    script = tmp_path / "train.py"
    script.write_text(MIXED)
    policy = ["--policy", "dapo"] if policy_from == "record" else []
    run_dir = tmp_path / "run"
    code, stderr, _, child_err = record_here(
        monkeypatch, capfd, "--out", str(run_dir), *policy, "--", sys.executable, str(script),
        policy_from,
    )  # fmt: skip
    assert code == 0, stderr + child_err
    run = open_run(run_dir)
    assert run.step_numbers == [0, 1, 2, 3]
    assert run.policy_spec == ("dapo" if policy_from == "record" else "grpo")
    for n in range(4):
        step = run.step(n)
        assert not step.is_scalar
        assert step.scalars["loss"] == n and step.scalars["mine"] == 10.0 + n  # the batch's
        assert step.scalars["lr"] == 0.1 and step.scalars["grad_norm"] > 0  # the hooks'
        assert float(step.get("logp")[0]) == -1.0 - n


EMPTY_BATCHES = textwrap.dedent(
    """
    import numpy as np
    import torch
    import stabledrl_cli as sd

    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def log(step):
        rows = 0 if step in (0, 1, 3) else 2  # steps 0, 1 and 3: batches with no token
        logp = np.full((rows, 3), -1.0, dtype="float32")
        return sd.log_policy_batch(step, logp=logp, logp_old=logp,
                                   advantages=np.ones(rows, dtype="float32"), loss=1.0)

    logged = []
    for step in range(5):
        optimizer.zero_grad()
        model(torch.ones(8, 4)).sum().backward()
        if step >= 3:  # steps 3-4: the batch is logged before the step it drives
            logged.append(log(step))
        optimizer.step()
        if step < 3:
            logged.append(log(step))
    print(*logged, flush=True)
    """
)


@pytest.mark.parametrize("hooks", [True, False])
def test_a_batch_with_no_token_is_skipped_and_recording_goes_on(
    tmp_path, monkeypatch, capfd, hooks
):
    """A step's batch with no token (one rank) has no place in the format: it is skipped with
    one warning (log_policy_batch returns False), the steps after it are recorded. Under the
    optimizer hooks its step is still the optimizer's scalar step, whichever half came first."""
    script = tmp_path / "train.py"
    script.write_text(EMPTY_BATCHES)
    flags = [] if hooks else ["--no-optimizer-hooks"]
    code, stderr, out, err = record_here(
        monkeypatch, capfd, "--out", str(tmp_path / "run"), "-p", "grpo", *flags, "--",
        sys.executable, str(script),
    )  # fmt: skip
    assert code == 0, stderr + err
    assert out.split() == ["False", "False", "True", "False", "True"]
    assert err.count("no token") == 1 and "no token" not in stderr, stderr + err
    run = open_run(tmp_path / "run")
    assert run.integrity.ok
    if hooks:
        assert run.step_numbers == [0, 1, 2, 3, 4]
        assert [run.step(n).is_scalar for n in range(5)] == [True, True, False, True, False]
        assert all(run.step(n).scalars["lr"] == 0.1 for n in range(5))
    else:
        assert run.step_numbers == [2, 4]


def test_a_script_without_torch_is_untouched_and_an_existing_sitecustomize_still_runs(
    tmp_path,
):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import os\nos.environ['USER_SITE_RAN'] = '1'\n")
    script = tmp_path / "train.py"
    script.write_text(
        "import os, sys\n"
        "print(os.environ.get('USER_SITE_RAN'), 'torch' in sys.modules, flush=True)\n"
    )
    env = record_env()
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(site)])
    result = subprocess.run(
        [*cli_command(), "record", "--out", str(tmp_path / "run"), "--",
         sys.executable, str(script)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.stdout.split() == ["1", "False"]
    assert result.returncode == 2
    assert "recorded no step" in result.stderr and "log_policy_batch" in result.stderr
    assert "Error in sitecustomize" not in result.stderr


@pytest.mark.parametrize("where", ["leading", "trailing"])
def test_an_empty_pythonpath_entry_still_puts_the_working_directory_on_the_path(tmp_path, where):
    """An empty entry of PYTHONPATH (`PYTHONPATH=$PYTHONPATH:/x` with PYTHONPATH unset gives
    one) puts the working directory on sys.path: a script run from elsewhere imports its
    modules from there. Before, `record` dropped the empty entries as it put its
    sitecustomize first, and the command died of a ModuleNotFoundError (exit 1).

    The script takes one optimizer step: a run of one step, held until the process ends,
    then written, with the child still exiting 0 (the Recorder's h5py imported at exit
    crashed the interpreter's end)."""
    work, code = tmp_path / "work", tmp_path / "code"
    work.mkdir()
    code.mkdir()
    (work / "local_module.py").write_text("VALUE = 42\n")
    (code / "train.py").write_text(
        "import local_module, torch\n"
        "model = torch.nn.Linear(2, 1)\n"
        "optimizer = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        "model(torch.ones(1, 2)).sum().backward()\n"
        "optimizer.step()\n"
        "print(local_module.VALUE)\n"
    )
    env = record_env()
    paths = [env["PYTHONPATH"], ""] if where == "trailing" else ["", env["PYTHONPATH"]]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    result = subprocess.run(
        [*cli_command(), "record", "--out", str(tmp_path / "run"), "--",
         sys.executable, str(code / "train.py")],
        capture_output=True, text=True, env=env, timeout=300, cwd=work,
    )  # fmt: skip
    assert (result.stdout, result.returncode) == ("42\n", 0), result.stderr
    assert open_run(tmp_path / "run").step_numbers == [0]


def test_a_child_that_cannot_import_stabledrl_and_has_no_stderr_still_trains(tmp_path):
    """The sitecustomize's warning that the hooks are off (this Python cannot import
    stabledrl) in a process whose stderr is closed (`2>&-`: sys.stderr is None): left out, and
    the training's `import torch` goes on. Before, writing it raised AttributeError out of
    `import torch` and the training died (exit 1, nothing printed)."""
    site = Path(__file__).resolve().parent.parent / "stabledrl_cli" / "capture" / "_site"
    (tmp_path / "torch").mkdir()  # a stand-in: the hook runs when any `torch` is imported
    (tmp_path / "torch" / "__init__.py").write_text("")
    script = "import sys; sys.modules['stabledrl_cli'] = None; import torch; print('trained')"
    env = {**record_env(), "PYTHONPATH": os.pathsep.join([str(site), str(tmp_path)])}
    command = f"exec {shlex.quote(sys.executable)} -c {shlex.quote(script)} 2>&-"
    result = subprocess.run(
        ["sh", "-c", command], capture_output=True, text=True, env=env, timeout=120
    )
    assert (result.stdout, result.returncode) == ("trained\n", 0)


def test_no_optimizer_hooks_records_nothing_from_optimizer_steps(tmp_path, monkeypatch, capfd):
    script = tmp_path / "train.py"
    script.write_text(
        "import torch\n"
        "p = torch.nn.Parameter(torch.ones(2))\n"
        "o = torch.optim.SGD([p], lr=0.1)\n"
        "p.sum().backward(); o.step()\n"
    )
    args = ["--out", str(tmp_path / "run"), "--no-optimizer-hooks", "--"]
    code, stderr, _, _ = record_here(monkeypatch, capfd, *args, sys.executable, str(script))
    assert code == 2 and "recorded no step" in stderr


UNWRITABLE = textwrap.dedent(
    """
    import torch
    p = torch.nn.Parameter(torch.ones(3))
    o = torch.optim.SGD([p], lr=0.1)
    for step in range(3):
        o.zero_grad(); (p * p).sum().backward(); o.step()
    print("trained", p.tolist(), flush=True)
    """
)


def test_a_run_that_cannot_be_written_never_breaks_training(tmp_path, monkeypatch, capfd):
    """A module run with `python -m`, whose run directory cannot be written once it trains
    (a file where the steps folder goes: one there before the command is refused up front,
    exit 2; one put there while it runs is a write failure, exit 4: docs/exit-codes.md)."""
    spoiler = textwrap.dedent(
        """
        import os, pathlib, shutil
        steps = pathlib.Path(os.environ["STABLEDRL_RUN_DIR"]) / "steps"
        if steps.is_dir():
            shutil.rmtree(steps)
        steps.write_text("not a directory")  # the run's steps cannot be written
        """
    )
    (tmp_path / "train.py").write_text(spoiler + UNWRITABLE)
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    code, stderr, child_out, child_err = record_here(
        monkeypatch, capfd, "--out", str(out), "--force", "--", sys.executable, "-m", "train"
    )
    assert "trained" in child_out  # training ran to its end
    assert child_err.count("recording is off, training continues") == 1
    # a write failure, reported after the training ran
    assert code == 4, stderr + child_err
    assert stderr.splitlines()[-1] == (
        f"error: recording failed: recording optimizer step 0: {out / 'steps'}: cannot write it "
        "(Not a directory)"
    ), stderr


TERMINATED = textwrap.dedent(
    """
    import os, signal, sys, time
    if sys.argv[1] == "ignored":  # before the hooks are installed (as torch is imported)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import torch
    import stabledrl_cli.dump._step_writes as writer

    shown = {signal.SIG_DFL: "default", signal.SIG_IGN: "ignored"}.get
    if sys.argv[1] == "slow-disk":  # each step takes the Recorder's thread 0.3 s to fsync
        durable = writer.make_durable
        writer.make_durable = lambda item: (time.sleep(0.3), durable(item))[1]
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(int(sys.argv[2])):
        optimizer.zero_grad()
        model(torch.randn(2, 3)).sum().backward()
        optimizer.step()
    print("trained", shown(signal.getsignal(signal.SIGTERM)), flush=True)
    if sys.argv[1] == "slow-disk":  # the test signals record's process group
        time.sleep(120)
    if sys.argv[1] == "handled":  # as a framework that chains to the handler it replaces
        previous = signal.signal(signal.SIGTERM, lambda *_: print("handled", shown(previous)))
    os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler's stop, or `timeout`, sends it
    print("survived", flush=True)
    """
)


def _signalled_as_a_group(*args: str) -> subprocess.CompletedProcess[str]:
    """`record ARGS`, its process group sent SIGTERM once the command printed a line (as
    Slurm signals every process of a job: the command gets it twice, directly and through
    record)."""
    process = subprocess.Popen(
        [*cli_command(), "record", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=record_env(), start_new_session=True,
    )  # fmt: skip
    assert process.stdout is not None
    first = process.stdout.readline()
    os.killpg(process.pid, signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, first + stdout, stderr)


@pytest.mark.parametrize(("disk", "steps"), [("slow-disk", 6), ("disk", 1)])
def test_a_sigterm_the_script_leaves_to_its_default_still_has_every_step_written(
    tmp_path, disk, steps
):
    """The process still dies of SIGTERM, once the steps are written, and the script sees
    SIGTERM's default action. Before, SIGTERM killed it with the steps still queued for the
    Recorder's thread (a slow disk: 0 of 6 written) and the first step, held until the next
    event (then no step file at all). The slow disk's SIGTERM comes twice."""
    script = tmp_path / "train.py"
    script.write_text(TERMINATED)
    args = ["--out", str(tmp_path / "run"), "--", sys.executable, str(script), disk, str(steps)]
    result = _signalled_as_a_group(*args) if disk == "slow-disk" else record(*args)
    assert result.stdout == "trained default\n", result.stderr
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    run = open_run(tmp_path / "run")
    assert run.step_numbers == list(range(steps))
    assert run.integrity.ok


@pytest.mark.parametrize(
    ("disposition", "output"),
    [
        ("ignored", "trained ignored\nsurvived\n"),
        ("handled", "trained default\nhandled default\nsurvived\n"),
    ],
)
def test_a_sigterm_the_script_ignores_or_handles_is_its_own(tmp_path, disposition, output):
    """A handler the script sets, before the hooks or after, takes SIGTERM; one that chains to
    the handler it replaced finds the default action there, as without `record`."""
    script = tmp_path / "train.py"
    script.write_text(TERMINATED)
    command = [sys.executable, str(script), disposition, "3"]
    result = record("--out", str(tmp_path / "run"), "--", *command)
    assert (result.stdout, result.returncode) == (output, 0), result.stderr
    assert open_run(tmp_path / "run").step_numbers == [0, 1, 2]


def test_the_clip_wrapper_clips_exactly_as_torch_does():
    """clip_grad_norm_ under the hooks is torch's own get_total_norm + clip_grads_with_norm_
    (no second pass over the gradients): the same total and the same clipped gradients, bit
    for bit, and each gradient's norm before clipping."""
    import torch

    from stabledrl_cli.capture._clip_records import clip_norms

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((5, 7), (3,), (2, 2, 2))]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for param, copy in zip(params, copies, strict=True):
        param.grad = torch.randn_like(param) * 3
        copy.grad = param.grad.clone()
    before = [float(p.grad.norm()) for p in params]
    measured = clip_norms(params, (1.0,), {})
    assert measured is not None
    total, norms, max_norm, foreach = measured
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach)
    expected = torch.nn.utils.clip_grad.clip_grad_norm_(copies, 1.0)  # torch's own, unwrapped
    assert torch.equal(total, expected)
    assert all(torch.equal(p.grad, c.grad) for p, c in zip(params, copies, strict=True))
    assert norms == pytest.approx(before, rel=1e-6)
    assert clip_norms(params, (1.0, "inf"), {}) is None  # other norms: torch clips itself
    assert clip_norms(params, (), {"max_norm": 1.0, "error_if_nonfinite": True}) is None


CLOSURE = textwrap.dedent(
    """
    import json, sys
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    first = []  # the norm clip_grad_norm_ returned at each step's first evaluation

    def closure():
        optimizer.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3).item()
        if len(first) == steps:
            first.append(norm)
        return loss

    for steps in range(3):
        optimizer.step(closure)
    json.dump(first, open(sys.argv[1], "w"))
    """
)

NO_GRADIENT = textwrap.dedent(
    """
    import torch

    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        optimizer.zero_grad()
        if step == 1:  # steps 0 and 2 step with no gradient at all
            model(torch.ones(2, 4)).sum().backward()
        optimizer.step()
    """
)


OTHER_FIRST_ARGUMENT = textwrap.dedent(
    """
    import torch

    class Scaled(torch.optim.SGD):
        @torch.no_grad()
        def step(self, factor, closure=None):  # a number first, the closure second
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(p.grad, alpha=-group["lr"] * factor)

    model = torch.nn.Linear(4, 1)
    optimizer = Scaled(model.parameters(), lr=0.1)
    for step in range(2):
        optimizer.zero_grad()
        model(torch.ones(2, 4)).sum().backward()
        optimizer.step(0.5)
    print("trained", flush=True)
    """
)


# A GradScaler on the CPU; an inf gradient at step 2 makes scaler.step() skip the update: it
# never calls optimizer.step(), or, for a fused optimizer (argv[2] "fused"), which unscales
# inside its step(), it calls it with the inf found. The script writes which steps were skipped
# and the norm of the unscaled gradients of each.
SCALER_SCRIPT = textwrap.dedent(
    """
    import json, math, sys
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, fused=sys.argv[2] == "fused")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    skipped, norms = [], []
    for step in range(4):
        optimizer.zero_grad()
        scaler.scale(model(torch.randn(8, 4)).pow(2).mean()).backward()
        if step == 2:
            model.weight.grad[0, 0] = float("inf")
        scale = scaler.get_scale()
        norms.append(math.sqrt(sum((p.grad.double() / scale).norm().item() ** 2
                                   for p in model.parameters())))
        before = model.weight.detach().clone()
        scaler.step(optimizer)
        scaler.update()
        skipped.append(bool(torch.equal(before, model.weight.detach())))
    json.dump({"skipped": skipped, "norms": norms}, open(sys.argv[1], "w"))
    """
)


# An optimizer whose step() raises at iteration 2 (a custom optimizer refusing a NaN, say),
# which the script catches and goes on; the batch of iterations 0-2 is logged after the step,
# that of 3-4 before it, numbered from argv[2] (the run's step of iteration 0). The script
# writes each iteration's gradient norm and whether the parameters moved.
RAISING_STEP = textwrap.dedent(
    """
    import json, math, sys
    import numpy as np
    import torch
    import stabledrl_cli as sd

    class Refusing(torch.optim.SGD):
        refuse = False

        def step(self, closure=None):
            if self.refuse:
                raise FloatingPointError("refused")
            return super().step(closure)

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = Refusing(model.parameters(), lr=0.1)
    first = int(sys.argv[2])

    def log(step):
        logp = np.full((2, 3), -1.0 - step, dtype="float32")
        assert sd.log_policy_batch(first + step, logp=logp, logp_old=logp, loss=float(step),
                                   advantages=np.ones(2, dtype="float32"), policy="grpo")

    norms, moved, caught = [], [], []
    for step in range(5):
        optimizer.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        norms.append(math.sqrt(sum(p.grad.double().norm().item() ** 2
                                   for p in model.parameters())))
        if step >= 3:
            log(step)
        before = model.weight.detach().clone()
        optimizer.refuse = step == 2
        try:
            optimizer.step()
        except FloatingPointError as exc:
            caught.append(str(exc))
        moved.append(not torch.equal(before, model.weight.detach()))
        if step < 3:
            log(step)
    json.dump({"norms": norms, "moved": moved, "caught": caught}, open(sys.argv[1], "w"))
    """
)


# A clip made of its two halves, get_total_norm + clip_grads_with_norm_, with one call per
# module sharing the total (as accelerate and transformers clip gradients on several meshes),
# max_norm far below the norm; step 1 calls it through torch.nn.utils, step 2 takes a max-norm
# total. The script writes the total, each module's norm before the clip and the norm after.
WITH_NORM_SCRIPT = textwrap.dedent(
    """
    import json, math, sys
    import torch
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    def norm(params):
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    groups = [list(model[0].parameters()), list(model[2].parameters())]
    seen = []
    for step in range(3):
        optimizer.zero_grad()
        (model(torch.randn(16, 6)).pow(2).mean() * 100).backward()
        modules = [norm(group) for group in groups]
        if step == 2:
            total = get_total_norm([p.grad for p in model.parameters()], norm_type=math.inf)
        else:
            total = torch.linalg.vector_norm(
                torch.stack([get_total_norm([p.grad for p in group]) for group in groups]))
        clip = torch.nn.utils.clip_grads_with_norm_ if step == 1 else clip_grads_with_norm_
        for group in groups:
            clip(group, 0.5, total)
        seen.append({"total": total.item(), "modules": modules,
                     "after": norm(model.parameters())})
        optimizer.step()
    json.dump(seen, open(sys.argv[1], "w"))
    """
)


COMPLEX = textwrap.dedent(
    """
    import json, math, sys
    import torch
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.complex64))
    bias = torch.nn.Parameter(torch.randn(4))
    optimizer = torch.optim.Adam([weight, bias], lr=0.01)
    norms = []
    for _ in range(3):
        x = torch.randn(2, 3, dtype=torch.complex64)
        ((x @ weight).abs() ** 2).sum().add(bias.sum()).backward()
        norms.append(math.sqrt(weight.grad.norm().item() ** 2 + bias.grad.norm().item() ** 2))
        optimizer.step()
        optimizer.zero_grad()
    json.dump(norms, open(sys.argv[1], "w"))
    print("trained", flush=True)
    """
)


# An actor and a reference head, two bare `nn.Linear` roots, and a `frozen` one no optimizer
# holds; argv[2] says how the optimizer holds them: "both" (their parameters), "named" (their
# named parameters, whose names repeat) or "actor" (the actor's alone). The script writes each
# root's gradient norm at each step.
ROOTS = textwrap.dedent(
    """
    import json, math, sys
    import torch

    torch.manual_seed(0)
    actor, reference, frozen = (torch.nn.Linear(4, 1) for _ in range(3))
    held = {"both": [actor, reference], "named": [actor, reference], "actor": [actor]}[sys.argv[2]]
    params = [item for m in held for item in
              (m.named_parameters() if sys.argv[2] == "named" else m.parameters())]
    optimizer = torch.optim.SGD(params, lr=0.1)
    seen = []
    for step in range(2):
        optimizer.zero_grad()
        x = torch.randn(8, 4)
        (actor(x).pow(2).mean() + 3 * reference(x).pow(2).mean() + frozen(x).sum()).backward()
        seen.append([{name: p.grad.double().norm().item() for name, p in m.named_parameters()}
                     for m in held])
        optimizer.step()
    json.dump(seen, open(sys.argv[1], "w"))
    """
)


@pytest.mark.parametrize("held", ["both", "named"])
def test_two_roots_of_one_optimizer_keep_their_module_norms_apart(one_process, held):
    """Two roots whose parameter names repeat (`weight`, `bias`): each root's norms are named
    `<k>:<class>` (k: the order of its parameters in the optimizer), not summed into one
    `weight` and one `bias` entry, as they were (actor and reference norms merged)."""
    phase = one_process[f"roots {held}"]
    for n, roots in enumerate(phase.computed):
        modules = {k: v for k, v in phase.step(n).scalars.items() if "/module/" in k}
        assert modules.keys() == {"grad_norm/module/0:Linear", "grad_norm/module/1:Linear"}
        for k, norms in enumerate(roots):
            assert close(modules[f"grad_norm/module/{k}:Linear"], math.hypot(*norms.values()))


def test_one_root_of_an_optimizer_keeps_its_names_beside_another_root(one_process):
    """A root the optimizer does not hold (a frozen reference) leaves the names as they were."""
    phase = one_process["roots actor"]
    (norms,) = phase.computed[0]
    scalars = phase.step(0).scalars
    assert {k: v for k, v in scalars.items() if "/module/" in k} == pytest.approx(
        {f"grad_norm/module/{name}": norm for name, norm in norms.items()}, rel=1e-6
    )


# A model trained bare, under DistributedDataParallel (one gloo rank) or torch.compile
# (argv[2]); the optimizer holds the model's parameters, named by the trained module when
# argv[3] is "named" (`SGD(ddp.named_parameters())`).
WRAPPED = textwrap.dedent(
    """
    import json, sys
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    trained = model
    if sys.argv[2] == "ddp":
        torch.distributed.init_process_group(
            "gloo", init_method="file://" + sys.argv[1] + ".store", rank=0, world_size=1
        )
        trained = torch.nn.parallel.DistributedDataParallel(model)
    elif sys.argv[2] == "compiled":
        trained = torch.compile(model, backend="eager")
    held = trained.named_parameters() if sys.argv[3] == "named" else model.parameters()
    optimizer = torch.optim.SGD(held, lr=0.1)
    seen = []
    for step in range(2):
        optimizer.zero_grad()
        trained(torch.randn(8, 4)).pow(2).mean().backward()
        seen.append({name: torch.cat([p.grad.flatten() for p in m.parameters()]).norm().item()
                     for name, m in (("0", model[0]), ("2", model[2]))})
        optimizer.step()
    json.dump(seen, open(sys.argv[1], "w"))
    """
)


@pytest.mark.parametrize(
    "wrapper, held",
    [(w, h) for w in ("ddp", "compiled") for h in ("parameters", "named")] + [("bare", "named")],
)
def test_a_wrapped_model_records_its_modules_under_the_names_it_has_alone(
    tmp_path, one_process, wrapper, held
):
    """DDP and torch.compile wrap the model as their own root: its module norms were recorded
    as `module.0`, `module.2` (DDP) and `_orig_mod.0`, `_orig_mod.2` (compiled), where the bare
    model records `0` and `2`, so `diff` of the two runs shared none of them. So were they
    when the optimizer took the wrapper's named parameters (`SGD(ddp.named_parameters())`),
    whose names the optimizer keeps."""
    if wrapper == "compiled":  # torch.compile keeps its optimizer: a run of its own
        computed = _recorded(tmp_path, WRAPPED, wrapper, held)
        steps = [open_run(tmp_path / "run").step(n) for n in range(len(computed))]
    else:
        phase = one_process[f"wrapped {wrapper} {held}"]
        computed, steps = phase.computed, [phase.step(n) for n in range(len(phase.computed))]
    for n, norms in enumerate(computed):
        modules = {k: v for k, v in steps[n].scalars.items() if "/module/" in k}
        assert modules.keys() == {"grad_norm/module/0", "grad_norm/module/2"}, modules
        for name, norm in norms.items():
            assert close(modules[f"grad_norm/module/{name}"], norm), (n, modules, norms)


# GradScaler.step takes any object with param_groups and step(): a dataclass (so unhashable)
# that steps two torch optimizers.
SCALER_OF_TWO = textwrap.dedent(
    """
    from dataclasses import dataclass
    import torch

    @dataclass
    class Both:
        optimizers: list

        @property
        def param_groups(self):
            return [g for o in self.optimizers for g in o.param_groups]

        def step(self):
            for optimizer in self.optimizers:
                optimizer.step()

    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    both = Both([torch.optim.SGD([model.weight], lr=0.1),
                 torch.optim.SGD([model.bias], lr=0.1)])
    scaler = torch.amp.GradScaler("cpu")
    for step in range(3):
        model.zero_grad()
        scaler.scale(model(torch.randn(4, 2)).sum()).backward()
        scaler.step(both)
        scaler.update()
    print("trained")
    """
)

# A warm-up of 3 steps, then 5 steps with a new trainer and its new optimizer (lr 0.2): each
# trainer holds a bound method of its own, a reference cycle that only the cyclic collector
# frees, so the warm-up's optimizer, dropped, is garbage still alive at the next one's steps.
TRAINER = textwrap.dedent(
    """
    import torch

    class Trainer:
        def __init__(self, model, lr):
            self.model = model
            self.optimizer = torch.optim.SGD(model.parameters(), lr=lr)
            self.callbacks = [self.log]

        def log(self):
            pass

        def train(self, steps):
            for _ in range(steps):
                self.optimizer.zero_grad()
                self.model(torch.randn(4, 2)).sum().backward()
                self.optimizer.step()
                for callback in self.callbacks:
                    callback()
    """
)
"""A trainer whose optimizer, dropped with it, is freed only by the cyclic collector (it holds a
bound method of its own)."""

NEW_TRAINER = TRAINER + textwrap.dedent(
    """
    model = torch.nn.Linear(2, 1)
    Trainer(model, 0.1).train(3)
    Trainer(model, 0.2).train(5)
    print("trained")
    """
)

# An outer optimizer (the run's) and a new inner one each step, after it, dropped before the
# outer's next step; argv[2] "recreated": a new run optimizer each step, no inner one. The
# script writes how many times the process listed every object alive (the root modules'
# names: `_root_names`) and the inner optimizers' grad norms.
INNER_OPTIMIZERS = textwrap.dedent(
    """
    import gc, json, sys
    import torch

    listed = 0
    get_objects = gc.get_objects

    def counted(*args, **kwargs):
        global listed
        listed += 1
        return get_objects(*args, **kwargs)

    gc.get_objects = counted
    model = torch.nn.Linear(2, 1)
    outer = torch.optim.SGD(model.parameters(), lr=0.1)
    inner_norms = []
    for _ in range(4):
        if sys.argv[2] == "recreated":
            outer = torch.optim.SGD(model.parameters(), lr=0.1)
            steps = ((outer, model),)
        else:  # a new inner optimizer, of the model's parameters or of a new head's ("fresh")
            net = torch.nn.Linear(2, 1) if sys.argv[2] == "fresh" else model
            steps = ((outer, model), (torch.optim.SGD(net.parameters(), lr=0.01), net))
        for optimizer, net in steps:
            optimizer.zero_grad()
            net(torch.randn(4, 2)).sum().backward()
            if optimizer is not outer:
                inner_norms.append(torch.cat([p.grad.flatten() for p in net.parameters()])
                                   .norm().item())
            optimizer.step()
        del optimizer, net, steps
    gc.get_objects = get_objects
    json.dump({"listed": listed, "inner": inner_norms}, open(sys.argv[1], "w"))
    print("trained")
    """
)

# A GradScaler stepping the model's optimizer (the run's) then a critic's; the critic's
# gradients hold a NaN at iteration 1, so the scaler skips its step there. The script writes
# whether each critic step moved its parameters.
SCALER_CRITIC = textwrap.dedent(
    """
    import json, sys
    import torch

    model, critic = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    critic_optimizer = torch.optim.SGD(critic.parameters(), lr=0.2)
    scaler = torch.amp.GradScaler("cpu")
    moved = []
    for step in range(3):
        optimizer.zero_grad()
        critic_optimizer.zero_grad()
        x = torch.randn(8, 4)
        scaler.scale(model(x).pow(2).mean() + critic(x).pow(2).mean()).backward()
        if step == 1:
            critic.weight.grad[0, 0] = float("nan")
        before = critic.weight.detach().clone()
        scaler.step(optimizer)
        scaler.step(critic_optimizer)
        scaler.update()
        moved.append(not torch.equal(before, critic.weight))
    json.dump(moved, open(sys.argv[1], "w"))
    """
)

# A new head put in the old one's place, in the model and in the optimizer's group (as many
# parameters as before), at step 2. The script writes each step's module norms.
SWAPPED = textwrap.dedent(
    """
    import json, sys
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    norms = []
    for step in range(4):
        if step == 2:
            model[1] = torch.nn.Linear(4, 1)
            optimizer.param_groups[0]["params"][2:] = list(model[1].parameters())
        optimizer.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        norms.append([torch.cat([p.grad.flatten() for p in m.parameters()]).norm().item()
                      for m in model])
        optimizer.step()
    json.dump(norms, open(sys.argv[1], "w"))
    """
)

# torch's ZeroRedundancyOptimizer (one rank): its step() steps a local optimizer over this
# rank's shard of the parameters. The script writes each step's gradient norm.
ZERO = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch.distributed.optim import ZeroRedundancyOptimizer

    torch.distributed.init_process_group(
        "gloo", init_method="file://" + sys.argv[1] + ".store", rank=0, world_size=1
    )
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    optimizer = ZeroRedundancyOptimizer(model.parameters(), torch.optim.SGD, lr=0.1)
    norms = []
    for step in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        norms.append(torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item())
        optimizer.step()
    json.dump(norms, open(sys.argv[1], "w"))
    """
)

# A run optimizer and a critic's; after their first steps a child forked from the process
# leaves by sys.exit (its exit handlers run), then the run optimizer steps again.
FORKED_CRITIC = textwrap.dedent(
    """
    import os, sys
    import torch

    model, critic = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    critic_optimizer = torch.optim.SGD(critic.parameters(), lr=0.2)
    for net, opt in ((model, optimizer), (critic, critic_optimizer)):
        opt.zero_grad()
        net(torch.randn(8, 4)).sum().backward()
        opt.step()
    child = os.fork()
    if child == 0:
        sys.exit(0)
    os.waitpid(child, 0)
    optimizer.step()
    """
)

# `torch.compile` of a function that calls optimizer.step() (the hooks run inside it).
COMPILED_STEP = textwrap.dedent(
    """
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    @torch.compile(backend="eager")
    def step():
        optimizer.step()

    for _ in range(10):
        optimizer.zero_grad()
        model(torch.randn(4, 2)).sum().backward()
        step()
    print("trained")
    """
)

# name -> (script, its arguments after the file it writes ("FIRST": the run's step of its
# first), the steps it takes), in the order they run. The two optimizers stepped by a
# GradScaler come first, as the first optimizers the process steps (named optimizer_0 and
# optimizer_1); the compiled step last (torch.compile keeps its optimizer alive).
PHASES = {
    "scaler of two": (SCALER_OF_TWO, (), 3),
    "raising": (RAISING_STEP, ("FIRST",), 5),
    "closure": (CLOSURE, (), 3),
    "other first argument": (OTHER_FIRST_ARGUMENT, (), 2),
    "no gradient": (NO_GRADIENT, (), 3),
    "scaler unfused": (SCALER_SCRIPT, ("unfused",), 4),
    "scaler fused": (SCALER_SCRIPT, ("fused",), 4),
    "complex": (COMPLEX, (), 3),
    "with norm": (WITH_NORM_SCRIPT, (), 3),
    "roots both": (ROOTS, ("both",), 2),
    "roots named": (ROOTS, ("named",), 2),
    "roots actor": (ROOTS, ("actor",), 2),
    "wrapped bare named": (WRAPPED, ("bare", "named"), 2),
    "wrapped ddp parameters": (WRAPPED, ("ddp", "parameters"), 2),
    "wrapped ddp named": (WRAPPED, ("ddp", "named"), 2),
    "new trainer": (NEW_TRAINER, (), 8),
    "inner optimizers": (INNER_OPTIMIZERS, ("inner",), 4),
    "fresh inner optimizers": (INNER_OPTIMIZERS, ("fresh",), 4),
    "recreated": (INNER_OPTIMIZERS, ("recreated",), 4),
    "swapped": (SWAPPED, (), 4),
    "zero": (ZERO, (), 3),
    "scaler critic": (SCALER_CRITIC, (), 3),
    "forked critic": (FORKED_CRITIC, (), 2),
    "compiled step": (COMPILED_STEP, (), 10),
}


@dataclass
class Phase:
    """One phase of the `one_process` run: its steps numbered from its first, what it
    printed, what it wrote (JSON, or None)."""

    run: Any
    first: int
    count: int
    stdout: str
    stderr: str
    computed: Any

    @property
    def steps(self) -> list[int]:
        """The run's step numbers in the phase's range, from 0 at its first."""
        last = self.first + self.count
        return [n - self.first for n in self.run.step_numbers if self.first <= n < last]

    def step(self, n: int) -> Any:
        return self.run.step(self.first + n)


def _sections(text: str) -> dict[str, str]:
    """A stream of the phases' run, cut at its `== NAME` lines: name -> what came after."""
    sections: dict[str, list[str]] = {}
    lines: list[str] = []
    for line in text.splitlines(keepends=True):
        if line.startswith("== ") and line[3:].rstrip("\n") in PHASES:
            lines = sections[line[3:].rstrip("\n")] = []
        else:
            lines.append(line)
    return {name: "".join(lines) for name, lines in sections.items()}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The PHASES recorded by one `stabledrl record` of one process (each a command of its own
    took seconds, most of them importing torch): name -> its Phase; "run" -> the whole run and
    "stderr" -> all of record's stderr."""
    tmp = tmp_path_factory.mktemp("phases")
    phases, first = [], 0
    for k, (name, (source, args, count)) in enumerate(PHASES.items()):
        script = tmp / f"phase_{k}.py"
        script.write_text(source)
        computed = str(tmp / f"phase_{k}.json")
        argv = [str(first) if a == "FIRST" else a for a in args]
        phases.append((name, str(script), [computed, *argv], first, count))
        first += count
    (tmp / "phases.json").write_text(json.dumps([p[:3] for p in phases]))
    (tmp / "train.py").write_text(PHASES_SCRIPT)
    result = record("--out", str(tmp / "run"), "--", sys.executable, str(tmp / "train.py"),
                    str(tmp / "phases.json"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    run = open_run(tmp / "run")
    stdout, stderr = _sections(result.stdout), _sections(result.stderr)
    recorded: dict[str, Any] = {"run": run, "stderr": result.stderr}
    for name, _, (computed, *_), start, count in phases:
        wrote = Path(computed)
        data = json.loads(wrote.read_text()) if wrote.exists() else None
        recorded[name] = Phase(run, start, count, stdout[name], stderr[name], data)
    return recorded


def test_the_phases_of_one_process_take_the_run_steps_one_after_the_other(one_process):
    total = sum(count for _, _, count in PHASES.values())
    assert one_process["run"].step_numbers == list(range(total))


def test_a_closure_optimizers_steps_record_the_norm_its_closure_produced(one_process):
    """LBFGS evaluates its closure inside step(), so the gradients exist (or are fresh) only
    then: each step records the norm of its first evaluation's gradients, the one at the
    parameters the step starts from (here what the closure's clip returned), not the
    gradients step() found on entry (none at step 0) nor a later evaluation's clip."""
    phase = one_process["closure"]
    first = phase.computed
    assert phase.steps == [0, 1, 2]
    for n in range(3):
        assert close(phase.step(n).scalars["grad_norm"], first[n]), (n, first)


def test_a_step_whose_first_argument_is_not_a_closure_is_left_as_it_is(one_process):
    """The closure is the argument step() names `closure`: an optimizer whose step() takes
    something else first trains as it would without the hooks."""
    phase = one_process["other first argument"]
    assert "trained" in phase.stdout
    assert all(close(phase.step(n).scalars["grad_norm"], math.sqrt(20)) for n in range(2))


def test_a_step_with_no_gradient_records_no_grad_norm(one_process):
    phase = one_process["no gradient"]
    scalars = [phase.step(n).scalars for n in range(3)]
    assert "grad_norm" not in scalars[0] and "grad_norm" not in scalars[2], scalars
    assert scalars[1]["grad_norm"] > 0
    assert all(s["lr"] == 0.1 and s["nonfinite_grads"] == 0 for s in scalars)


def test_a_step_that_raises_is_recorded_as_skipped_and_the_numbering_keeps_pace(one_process):
    """An optimizer.step() that raises, caught by the script, is the iteration's step all the
    same, recorded as not applied (optimizer_skipped 1) with the gradients it found; the script
    still gets its exception. Before, the iteration was not recorded: 5 iterations gave 4
    steps, iteration 3's grad norm at step 2, each later batch paired with the wrong step."""
    phase = one_process["raising"]
    seen = phase.computed
    assert seen["caught"] == ["refused"]
    assert seen["moved"] == [True, True, False, True, True]
    assert phase.steps == [0, 1, 2, 3, 4]
    for n in phase.steps:
        step = phase.step(n)
        assert step.scalars.get("optimizer_skipped", 0.0) == (n == 2), (n, step.scalars)
        assert close(step.scalars["grad_norm"], seen["norms"][n]), (n, step.scalars, seen)
        assert step.scalars["loss"] == n and float(step.get("logp")[0]) == -1.0 - n
        assert step.scalars["lr"] == 0.1


@pytest.mark.parametrize("fused", ["unfused", "fused"])
def test_a_step_the_grad_scaler_skips_is_recorded_as_skipped(one_process, fused):
    """A fused optimizer is handed the scale and the inf found by the GradScaler and unscales
    inside step(): before, its steps were recorded with the norms of the scaled gradients
    (2**10 times the script's) and the skipped step as taken."""
    phase = one_process[f"scaler {fused}"]
    seen = phase.computed
    assert seen["skipped"] == [False, False, True, False]
    assert phase.steps == [0, 1, 2, 3]
    scalars = [phase.step(n).scalars for n in phase.steps]
    assert [s.get("optimizer_skipped", 0.0) for s in scalars] == [0.0, 0.0, 1.0, 0.0]
    assert scalars[2]["nonfinite_grads"] == 1 and math.isinf(scalars[2]["grad_norm"])
    assert scalars[2]["lr"] == 0.1
    for n in (0, 1, 3):
        assert close(scalars[n]["grad_norm"], seen["norms"][n]), (n, scalars[n], seen)


def test_another_optimizers_step_the_grad_scaler_skips_is_counted_as_skipped(one_process):
    """The critic's step the scaler skipped (iteration 1, recorded with the run's step 2) was
    counted in `optimizer_<i>/steps` as any other, with nothing saying it was not taken."""
    phase = one_process["scaler critic"]
    assert phase.computed == [True, False, True]
    others = [
        {
            k.partition("/")[2]: v
            for k, v in phase.step(n).scalars.items()
            if "optimizer_" in k and "/" in k
        }
        for n in (1, 2)
    ]
    assert others[0]["steps"] == others[1]["steps"] == 1
    assert "skipped" not in others[0] and others[1]["skipped"] == 1, others
    assert others[1]["nonfinite_grads"] == 1


def test_a_forked_child_leaving_names_no_step_of_its_parents_optimizers(one_process):
    """A child forked after a critic's step, the step still held for the parent's next, said
    at its exit 'not recorded: optimizer_1's last step' of the parent's step, which the
    parent's next step records."""
    phase = one_process["forked critic"]
    assert "not recorded" not in phase.stderr, phase.stderr
    steps = [v for k, v in phase.step(1).scalars.items() if re.fullmatch(r"optimizer_\d+/steps", k)]
    assert steps == [1.0], phase.step(1).scalars


def test_a_parameter_put_in_anothers_place_keeps_its_module_norm(one_process):
    """A head swapped into the optimizer's group in place (as many parameters as before)
    lost its module norm from then on: the parameters were looked at again only when a
    group's length changed, and the new ones had no name."""
    phase = one_process["swapped"]
    for n, norms in enumerate(phase.computed):
        scalars = phase.step(n).scalars
        for module, norm in enumerate(norms):
            assert close(scalars.get(f"grad_norm/module/{module}", 0.0), norm), (n, scalars)


def test_an_optimizer_stepped_inside_another_ones_step_is_part_of_that_step(one_process):
    """ZeroRedundancyOptimizer's step() steps a local optimizer over the rank's shard. That
    inner step ended first and became the run's: on 2 ranks (torchrun) grad_norm was the
    shard's, 0.512 against the script's 1.060, and the whole norm came a step late as
    `optimizer_0/grad_norm`. The step the loop calls is recorded now, the inner one as its
    part."""
    phase = one_process["zero"]
    assert phase.steps == [0, 1, 2]
    for n, norm in enumerate(phase.computed):
        scalars = phase.step(n).scalars
        assert close(scalars["grad_norm"], norm), (n, scalars)
        assert not any(name.startswith("optimizer_") and "/" in name for name in scalars)


def test_a_grad_scaler_stepping_an_object_that_is_no_torch_optimizer_is_left_to_its_own(
    one_process,
):
    """GradScaler.step takes any object with param_groups and step(): here a dataclass (so
    unhashable) that steps two torch optimizers, whose own steps are recorded. Before, the
    hooks' GradScaler.step raised TypeError (unhashable type) out of the training's
    scaler.step(); a hashable one was recorded as a third optimizer skipping every step."""
    phase = one_process["scaler of two"]
    assert phase.stdout == "trained\n"
    assert phase.steps == [0, 1, 2]
    names = {name for n in phase.steps for name in phase.step(n).scalars}
    assert "optimizer_1/steps" in names and not any(n.startswith("optimizer_2/") for n in names)
    assert not any(phase.step(n).scalars.get("optimizer_skipped") for n in phase.steps)


def test_a_compiled_optimizer_step_leaves_the_hooks_to_run_uncompiled(one_process):
    """`torch.compile` of a function that calls optimizer.step() (the hooks run inside it):
    torch's Dynamo traced the hooks and the Recorder's step encoding too, warning on the
    training's stderr of builtins it cannot trace and recompiling every step until its
    recompile limit (a warning naming stabledrl_cli's files). The hooks run eagerly now."""
    phase = one_process["compiled step"]
    assert phase.stdout == "trained\n"
    stderr = one_process["stderr"]
    assert "stabledrl_cli" not in stderr and "recompile" not in stderr, stderr
    assert phase.steps == list(range(10))


SLOW_COLLECTIONS = TRAINER + textwrap.dedent(
    """
    import time

    real = time.perf_counter
    calls = [0]

    def slow():  # a loaded machine: each reading 10 s after the one before
        calls[0] += 1
        return real() + 10.0 * calls[0]

    time.perf_counter = slow

    model = torch.nn.Linear(2, 1)
    for lr in (0.1, 0.2, 0.3):
        Trainer(model, lr).train(3)
    print("trained")
    """
)


def test_a_new_optimizers_steps_are_recorded_however_slow_the_machine(monkeypatch, capfd, tmp_path):
    """The collections that find a dropped run optimizer had a budget of wall time (1 s, plus
    1% of the time since the hooks were installed): on a loaded machine, where a collection
    took long, the third trainer's optimizer found the budget spent and its 3 steps went to
    no recorded step (6 of 9 recorded, exit 0; the suite's phases lost 5 of 8 so under a
    load of 8). The budget is a count now: what a script records does not hang on the
    machine's speed."""
    done, errors = record_python_here(monkeypatch, capfd, SLOW_COLLECTIONS, cwd=tmp_path)
    assert done.returncode == 0 and not errors, done.stderr
    assert done.stdout == "trained\n"
    run = open_run(tmp_path / "run")
    assert run.step_numbers == list(range(9)), done.stderr
    lrs = [run.step(n).scalars["lr"] for n in range(9)]
    assert lrs == [0.1] * 3 + [0.2] * 3 + [0.3] * 3


def test_a_new_optimizer_whose_dropped_predecessor_awaits_collection_records_its_steps(
    one_process,
):
    """A script that trains its next phase with a new optimizer, its first one dropped in a
    reference cycle (a trainer holding a bound method of its own): the first one stayed the
    run's until the cyclic collector ran, so the new one's steps went to no recorded step
    (3 of 8 recorded, `record` exiting 0). The first step of a new optimizer collects
    garbage when the run's optimizer is still there."""
    phase = one_process["new trainer"]
    assert phase.stdout == "trained\n"
    assert phase.steps == list(range(8))
    assert [phase.step(n).scalars["lr"] for n in range(8)] == [0.1] * 3 + [0.2] * 5


def test_another_optimizers_steps_never_name_its_modules(one_process):
    """Module norms are the run optimizer's alone, but every optimizer's step named its modules,
    a scan of every object alive: at each step of a script that makes a new inner optimizer
    each step (0.1 s with transformers imported; `record` of 100 such steps, farm-bench: CPU
    ratio 0.68 after/before). The run's optimizer names them once."""
    phase = one_process["inner optimizers"]
    assert phase.stdout == "trained\n"
    assert phase.steps == list(range(4))
    assert phase.computed["listed"] == 1
    assert "grad_norm/module/weight" in phase.step(3).scalars


@pytest.mark.parametrize("inner", ["inner optimizers", "fresh inner optimizers"])
def test_a_dropped_optimizers_steps_are_recorded_under_one_name(one_process, inner):
    """A new inner optimizer each step, dropped before the run's next step: its steps were
    recorded nowhere (0 of 4), as their summary went with the optimizer. Each inner one takes
    the name of the one before it, of the same class and parameter shapes, so the run holds one
    name. Over a new head's parameters each step ("fresh"), each took a name of its own
    (optimizer_1, optimizer_2, ...: 400 names in 400 steps), and the hooks kept the id() of
    every parameter of each (15 KB a step for a head of 200 tensors)."""
    phase = one_process[inner]
    norms = phase.computed["inner"]
    names = set()
    for n in (1, 2, 3):
        others = {k: v for k, v in phase.step(n).scalars.items() if k.startswith("optimizer_")}
        index = next(iter(others)).split("/")[0]
        names.add(index)
        assert others.keys() == {f"{index}/{k}" for k in ("grad_norm", "lr", "nonfinite_grads",
                                                          "steps")}  # fmt: skip
        assert close(others[f"{index}/grad_norm"], norms[n - 1]), (n, others, norms)
        assert others[f"{index}/steps"] == 1 and others[f"{index}/lr"] == 0.01
    assert len(names) == 1, names


def test_a_run_optimizer_made_anew_each_step_names_its_modules_once(one_process):
    """A script that makes the run's optimizer anew each step listed every object alive at
    each of them (0.03 s of CPU a step with transformers imported); the names of the same
    parameters are kept."""
    phase = one_process["recreated"]
    assert phase.stdout == "trained\n"
    assert phase.steps == list(range(4))
    assert phase.computed["listed"] == 1
    assert all("grad_norm/module/weight" in phase.step(n).scalars for n in range(4))


def test_a_clip_by_get_total_norm_and_clip_grads_with_norm_records_the_norm_before_it(
    one_process,
):
    phase = one_process["with norm"]
    assert phase.steps == [0, 1, 2]
    for n, mine in enumerate(phase.computed):
        scalars = phase.step(n).scalars
        modules = [scalars[f"grad_norm/module/{m}"] for m in (0, 2)]
        assert modules == pytest.approx(mine["modules"], rel=1e-6), (n, scalars)
        before = math.hypot(*mine["modules"])
        if n < 2:  # the L2 total it gave both calls, once
            assert mine["after"] == pytest.approx(0.5, rel=1e-4)  # the script clipped
            assert scalars["grad_norm"] == mine["total"] > 10, (n, scalars, mine)
            assert close(mine["total"], before)
        else:  # a max-norm total: the L2 norm before the clip
            assert close(scalars["grad_norm"], before), (n, scalars)
            assert mine["total"] < before and mine["after"] < before / 10


def test_complex_gradients_are_recorded_with_their_norm(one_process):
    """A complex parameter's gradient norm is the norm of its real and imaginary parts (it
    stopped recording: torch's norm wants a complex dtype for a complex tensor)."""
    phase = one_process["complex"]
    assert "trained" in phase.stdout and "warning" not in phase.stderr
    assert phase.steps == [0, 1, 2]
    recorded = [phase.step(n).scalars["grad_norm"] for n in phase.steps]
    assert all(close(r, c) for r, c in zip(recorded, phase.computed, strict=True))


def test_a_clip_compiled_whole_is_left_as_torchs(tmp_path, monkeypatch, capfd):
    """`torch.compile(fullgraph=True)` of a function that clips, by clip_grad_norm_ (steps
    0-2) then by get_total_norm + clip_grads_with_norm_ (steps 3-5, a function compiled on
    its own): each compiles as one graph, as it does without record (the clip is not seen:
    docs/recording.md). Before, the hooks' clip wrappers were traced with it, their
    `.tolist()` broke the graph and the training died of torch._dynamo.exc.Unsupported (exit
    1) at the first such clip: one child checks both, each clip's breakage fails it."""
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            """
            import torch

            torch.manual_seed(0)
            model = torch.nn.Linear(2, 1)
            params = list(model.parameters())
            optimizer = torch.optim.SGD(params, lr=0.1)

            @torch.compile(fullgraph=True, backend="eager")
            def clip_grad_norm():
                torch.nn.utils.clip_grad_norm_(params, 1.0)

            @torch.compile(fullgraph=True, backend="eager")
            def clip_with_total_norm():
                torch.nn.utils.clip_grads_with_norm_(
                    params, 1.0, torch.nn.utils.get_total_norm([p.grad for p in params]))

            for clip in (clip_grad_norm, clip_with_total_norm):
                for _ in range(3):
                    optimizer.zero_grad()
                    model(torch.randn(4, 2)).sum().backward()
                    clip()
                    optimizer.step()
                print("trained", clip.__name__, flush=True)
            """
        )
    )
    code, stderr, out, err = record_here(
        monkeypatch, capfd, "--out", str(tmp_path / "run"), "--", sys.executable, str(script)
    )
    trained = ["trained clip_grad_norm", "trained clip_with_total_norm"]
    assert (out.splitlines(), code) == (trained, 0), stderr + err
    assert open_run(tmp_path / "run").step_numbers == list(range(6))


# Real accelerate, one process: a DTensor parameter on a 1-rank gloo mesh beside plain ones,
# so Accelerator.clip_grad_norm_ takes its multi-mesh path (get_total_norm per group, then
# clip_grads_with_norm_ per group). The script writes what it returned and each module's
# norm before the clip.
ACCELERATE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist
    from distributed_exit import exit_without_finalizing
    from accelerate import Accelerator
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{sys.argv[2]}", rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    torch.manual_seed(0)
    first, second = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)
    first.weight = torch.nn.Parameter(distribute_tensor(first.weight.detach(), mesh, [Shard(0)]))
    first.bias = torch.nn.Parameter(distribute_tensor(first.bias.detach(), mesh, [Replicate()]))
    model = torch.nn.Sequential(first, second)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.01))

    def norm(params):
        whole = [p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for p in params]
        return torch.linalg.vector_norm(torch.stack([g.norm() for g in whole])).item()

    seen = []
    for step in range(3):
        optimizer.zero_grad()
        x = distribute_tensor(torch.randn(16, 4), mesh, [Replicate()])
        hidden = torch.tanh(torch.nn.functional.linear(x, first.weight, first.bias).to_local())
        accelerator.backward(second(hidden).pow(2).mean() * 100)
        assert {type(p.grad).__name__ for p in model.parameters()} == {"DTensor", "Tensor"}
        modules = [norm(first.parameters()), norm(second.parameters())]
        returned = accelerator.clip_grad_norm_(model.parameters(), 0.5)
        seen.append({"returned": returned.item(), "modules": modules,
                     "after": norm(model.parameters())})
        optimizer.step()
    json.dump(seen, open(sys.argv[1], "w"))
    dist.destroy_process_group()
    exit_without_finalizing()
    """
)


def test_accelerates_multi_mesh_clip_is_recorded_with_the_norm_it_returned(tmp_path):
    pytest.importorskip("accelerate", reason="needs accelerate (pip install -e '.[trl]')")
    script, computed = tmp_path / "train.py", tmp_path / "norms.json"
    script.write_text(ACCELERATE_SCRIPT)
    result = record(
        "--out", str(tmp_path / "run"), "--", sys.executable, str(script), str(computed),
        str(tmp_path / "store"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr
    run = open_run(tmp_path / "run")
    assert run.step_numbers == [0, 1, 2]
    for n, mine in enumerate(json.loads(computed.read_text())):
        scalars = run.step(n).scalars
        assert mine["after"] == pytest.approx(0.5, rel=1e-4)  # accelerate clipped
        assert scalars["grad_norm"] == mine["returned"] > 1, (n, scalars, mine)
        modules = [scalars[f"grad_norm/module/{m}"] for m in (0, 1)]
        assert modules == pytest.approx(mine["modules"], rel=1e-6), (n, scalars)


def test_a_parameter_the_root_holds_is_its_own_module():
    """A module's norm sums the parameters it holds itself; the root's own parameters (a bare
    `nn.Linear`, a top-level `pos_emb`) have no module name, so each is named alone."""
    named = [("weight", 3.0), ("bias", 4.0), ("layers.0.weight", 1.0), ("layers.0.bias", 1.0)]
    assert _module_norms(named) == [("bias", 4.0), ("weight", 3.0), ("layers.0", math.sqrt(2))]


def test_os_exit_after_the_first_optimizer_step_writes_that_step(tmp_path, monkeypatch):
    """The hooks hold their first step until the next event opens the run (a batch logged
    after it gives the run its policy). A script that took one step and left by os._exit lost
    it: `record` exited 2, "the command recorded no step". os._exit writes it first now."""
    status, ended = tmp_path / "status", []
    fresh_recording(monkeypatch, tmp_path / "run", status, _python_os_exit=ended.append)
    bootstrap.log_hook_step(0, {"grad_norm": 1.5, "scalars": {}})
    assert not (tmp_path / "run").exists()
    bootstrap._os_exit(3)
    assert ended == [3]
    run = open_run(tmp_path / "run")
    assert run.step_numbers == [0] and run.step(0).scalars["grad_norm"] == 1.5
    bootstrap.close()
    assert status.read_text() == ""


def test_os_exit_in_a_signal_handler_inside_a_hook_writes_the_held_step_at_once(
    tmp_path, monkeypatch
):
    """A signal handler runs in the main thread between two instructions; when they were a
    hook's, the recording lock is held by the thread that os._exit's. os._exit waited
    WRITE_SECONDS (10 s) for a lock that thread never gave back, then ended with the held
    step unwritten (`record`: "the command recorded no step"). That thread never goes on:
    the step, whole in memory, is written without the lock."""
    status, ended = tmp_path / "status", []
    fresh_recording(
        monkeypatch, tmp_path / "run", status, _python_os_exit=ended.append, WRITE_SECONDS=2.0
    )
    bootstrap.log_hook_step(0, {"grad_norm": 1.5, "scalars": {}})
    with bootstrap.recording.lock:  # the hook the signal came in
        start = time.perf_counter()
        bootstrap._os_exit(3)
        waited = time.perf_counter() - start
        assert ended == [3]
        run = open_run(tmp_path / "run")
    assert waited < 1.0
    assert run.step_numbers == [0] and run.step(0).scalars["grad_norm"] == 1.5
    bootstrap.close()
    assert status.read_text() == ""


def test_os_exit_in_a_signal_handler_while_the_run_opens_ends_at_once(tmp_path, monkeypatch):
    """The one window left (docs/recording.md): the signal came while the hook was making the
    run's Recorder. The held step cannot be written then (a second Recorder of the run would
    be refused): the process ends at once, without it."""
    status, ended = tmp_path / "status", []
    fresh_recording(
        monkeypatch, tmp_path / "run", status, _python_os_exit=ended.append, WRITE_SECONDS=2.0
    )
    bootstrap.log_hook_step(0, {"grad_norm": 1.5, "scalars": {}})
    monkeypatch.setattr(bootstrap.recording, "opening", True)
    with bootstrap.recording.lock:
        start = time.perf_counter()
        bootstrap._os_exit(3)
        waited = time.perf_counter() - start
    assert waited < 1.0 and ended == [3]
    assert not (tmp_path / "run").exists() and status.read_text() == ""


def test_a_step_logged_by_a_signal_handler_inside_another_step_is_refused(
    tmp_path, monkeypatch, capsys
):
    """A handler of the script's own runs in the main thread between two instructions, and
    the recording lock lets that thread through: its log_policy_batch(2), inside the
    recording of step 1, wrote step 2 first, then step 1 was refused ('does not follow step
    2') and recording stopped. (With a plain lock it hung for ever.) It is refused, named,
    and the steps around it are recorded."""
    import functools

    import numpy as np

    from stabledrl_cli.dump import Recorder

    fresh_recording(monkeypatch, tmp_path / "run", tmp_path / "status")
    batch = {
        "policy": "grpo", "logp": np.zeros(4, np.float32), "logp_old": np.zeros(4, np.float32),
        "advantages": np.ones(4, np.float32), "mask": np.ones(4, bool), "seq_id": np.arange(4),
    }  # fmt: skip
    handled, log_step = [], Recorder.log_step

    @functools.wraps(log_step)
    def signalled(self, step, **fields):  # the handler runs as step 1 is being written
        if step == 1 and not handled:
            handled.append(log_policy_batch(2, **batch))
        return log_step(self, step, **fields)

    monkeypatch.setattr(Recorder, "log_step", signalled)
    assert [log_policy_batch(step, **batch) for step in (0, 1, 3)] == [True] * 3
    assert handled == [False]
    bootstrap.close()
    assert open_run(tmp_path / "run").step_numbers == [0, 1, 3]
    assert capsys.readouterr().err == (
        "stabledrl: warning: log_policy_batch at step 2 came while this thread was recording "
        "another step (a signal handler's call): not recorded; recording goes on\n"
    )
    assert (tmp_path / "status").read_text() == ""


def test_a_spawned_rank_that_destroys_its_group_still_records_and_names_itself_as_it(
    monkeypatch, capsys, tmp_path
):
    """A rank that torch.multiprocessing.spawn started knows its rank from its process group
    alone, which a script destroys at its end, as torch asks. Its held first step, written at
    exit, then opened the run as a one-process run (step-00000000.safetensors: rank 1 of 2
    was refused 'already exists' after rank 0), and its note at exit named no rank."""
    import torch.distributed as dist

    from stabledrl_cli.capture import _process_rank, optimizer_hooks
    from stabledrl_cli.capture._hook_state import OtherSteps

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(_process_rank, "_group_rank", {})
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # as rank 1 of 2's group
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    fresh_recording(monkeypatch, tmp_path / "run", tmp_path / "status")
    bootstrap.log_hook_step(0, {"grad_norm": 1.5, "scalars": {}})  # held
    monkeypatch.setattr(dist, "is_initialized", lambda: False)  # destroy_process_group()
    bootstrap.close()
    assert [path.name for path in (tmp_path / "run" / "steps").iterdir()] == [
        "step-00000000.rank-0001.safetensors"
    ]
    monkeypatch.setattr(optimizer_hooks.state, "on", True)
    monkeypatch.setattr(optimizer_hooks.state, "others", {1: OtherSteps(last=None, steps=1)})
    monkeypatch.setattr(bootstrap, "hooks_wanted", lambda: True)
    optimizer_hooks._unrecorded_note()
    assert capsys.readouterr().err.startswith("stabledrl: note: rank 1: not recorded:")
