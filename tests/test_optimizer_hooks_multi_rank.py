"""`stabledrl record` of a training whose optimizer steps in more than one process, as ranks
(torchrun, torch.multiprocessing.spawn; DDP, FSDP, DTensor meshes, accelerate); the recorded
values are the ones the ranks compute themselves (docs/recording.md). One process's training:
tests/test_optimizer_hooks_single_rank.py; child processes a script starts:
tests/test_optimizer_hooks_child_processes.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
from _cli import close, record, record_env
from _ports import free_port
from safetensors import safe_open

from stabledrl_cli.dump import open_run


def _rank_scalars(run: Any, step: int, rank: int) -> dict[str, float]:
    """The scalars rank `rank` recorded at step `step` of a run (`open_run`)."""
    with safe_open(run.step(step).paths[rank], "pt") as step_file:
        return {k: float(v) for k, v in step_file.metadata().items() if k[0] != "_"}


def test_ranks_started_by_mp_spawn_record_as_ranks(tmp_path):
    """torch.multiprocessing.spawn (the DDP tutorial's launcher) sets no RANK or WORLD_SIZE:
    each process gives init_process_group its rank itself. The run records each rank as
    torch.distributed numbers it. Before, both processes opened the run as a one-process run:
    one wrote it, the other warned `already exists` and `record` exited 2 after a training
    that succeeded."""
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os
            import torch, torch.distributed as dist, torch.multiprocessing as mp

            def train(rank, world_size):
                os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{free_port()}")
                dist.init_process_group("gloo", rank=rank, world_size=world_size)
                torch.manual_seed(0)
                model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 1))
                optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
                for _ in range(3):
                    optimizer.zero_grad()
                    model(torch.randn(4, 2) + rank).sum().backward()
                    optimizer.step()
                dist.destroy_process_group()

            if __name__ == "__main__":
                mp.spawn(train, args=(2,), nprocs=2)
                print("trained")
            """
        )
    )
    result = record("--out", str(tmp_path / "run"), "--", sys.executable, str(script))
    assert (result.stdout, result.returncode) == ("trained\n", 0), result.stderr
    run = open_run(tmp_path / "run")
    assert run.step_numbers == [0, 1, 2]
    assert [len(run.step(n).paths) for n in run.step_numbers] == [2, 2, 2]
    for n in run.step_numbers:  # DDP averaged the gradients: both ranks step the same ones
        assert _rank_scalars(run, n, 0)["grad_norm"] == _rank_scalars(run, n, 1)["grad_norm"]


# FSDP2 on 2 gloo ranks (CPU): DTensor gradients, clipped on steps 1-2 (step 2 by a 3-norm:
# the L2 norm before it is recorded); rank 0 writes the whole-model norms it computed (step 1:
# what the clip returned).
FSDP_SCRIPT = textwrap.dedent(
    """
    import json, math, sys
    import torch, torch.distributed as dist
    from distributed_exit import exit_without_finalizing
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    for layer in (model[0], model[2], model):
        fully_shard(layer)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    for step in range(3):
        optimizer.zero_grad()
        torch.manual_seed(step + 10 * dist.get_rank())
        model(torch.randn(4, 8)).pow(2).mean().backward()
        whole = [p.grad.full_tensor() for p in model.parameters()]
        seen.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in whole])).item())
        if step == 1:
            returned = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5).full_tensor()
            assert math.isclose(returned.item(), seen[-1], rel_tol=1e-6), (returned, seen)
            seen[-1] = returned.item()
        if step == 2:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01, norm_type=3.0)
        optimizer.step()
    if dist.get_rank() == 0:
        json.dump(seen, open(sys.argv[1], "w"))
    dist.destroy_process_group()
    exit_without_finalizing()
    """
)


def test_fsdp2_gradients_are_recorded_with_their_whole_norm(recorded):
    result, (first, computed) = recorded["result"], recorded["fsdp2"]
    assert result.returncode == 0, result.stderr
    assert "recording failed" not in result.stderr
    run = open_run(recorded["out"])
    wholes = json.loads(computed.read_text())
    assert len(wholes) == 3
    for n, whole in enumerate(wholes):
        scalars = run.step(first + n).scalars
        assert close(scalars["grad_norm"], whole), (n, scalars["grad_norm"], whole)
        modules = [scalars[f"grad_norm/module/{m}"] for m in (0, 2)]
        assert close(math.hypot(*modules), whole)
        assert scalars["nonfinite_grads"] == 0


# FSDP1 (FullyShardedDataParallel, a nested instance and the root) on 2 gloo ranks (CPU):
# FlatParameter shards (argv[2] "flat") or sharded views of the original parameters ("orig").
# Steps 1-2 clip with the method model.clip_grad_norm_ (step 2 by the max norm), step 3 has a
# NaN in rank 1's shard only. Each rank writes the whole-model L2 norm it gathered before
# clipping (step 1: what the clip returned).
FSDP1_SCRIPT = textwrap.dedent(
    """
    import json, math, sys
    import torch, torch.distributed as dist
    from distributed_exit import exit_without_finalizing
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    dist.init_process_group("gloo")
    rank, orig = dist.get_rank(), sys.argv[2] == "orig"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    cpu = torch.device("cpu")
    model[0] = FSDP(model[0], device_id=cpu, use_orig_params=orig)
    model = FSDP(model, device_id=cpu, use_orig_params=orig)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    for step in range(4):
        optimizer.zero_grad()
        torch.manual_seed(step + 10 * rank)
        model(torch.randn(4, 8)).pow(2).mean().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None and p.grad.numel()]
        if step == 3 and rank == 1:
            grads[0][0] = math.nan
        local = sum(g.double().pow(2).sum() for g in grads)
        dist.all_reduce(local)
        whole = local.sqrt().item()
        if step == 1:
            returned = model.clip_grad_norm_(0.5).item()
            assert math.isclose(returned, whole, rel_tol=1e-5), (returned, whole)
            whole = returned
        if step == 2:  # a max-norm clip: the L2 norm before it is recorded
            model.clip_grad_norm_(0.01, norm_type=math.inf)
        optimizer.step()
        seen.append(whole)
    json.dump(seen, open(f"{sys.argv[1]}.{rank}", "w"))
    dist.destroy_process_group()
    exit_without_finalizing()
    """
)


@pytest.mark.parametrize("params", ["flat", "orig"])
def test_fsdp1_steps_are_recorded_with_the_whole_norm_on_every_rank(recorded, params):
    result, (first, computed) = recorded["result"], recorded[f"fsdp1 {params}"]
    assert result.returncode == 0, result.stderr
    assert "recording failed" not in result.stderr and "warning" not in result.stderr
    run = open_run(recorded["out"])
    for rank in (0, 1):
        truth = json.loads(Path(f"{computed}.{rank}").read_text())
        assert len(truth) == 4
        for n, whole in enumerate(truth):
            scalars = _rank_scalars(run, first + n, rank)
            # step 1: what model.clip_grad_norm_ returned; else the norm gathered by hand
            assert close(scalars["grad_norm"], whole), (rank, n, scalars["grad_norm"], whole)
            modules = [scalars[f"grad_norm/module/{m}"] for m in (0, 2)]
            assert close(math.hypot(*modules), whole), (rank, n, scalars)
            assert scalars["nonfinite_grads"] == (n == 3), (rank, n)
        assert math.isnan(truth[3])


# Rank 1 stops recording at step 1 (a policy batch without a policy), rank 0 does not.
FSDP1_STOP_SCRIPT = textwrap.dedent(
    """
    import datetime, sys
    import torch, torch.distributed as dist
    from distributed_exit import exit_without_finalizing
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    import stabledrl_cli

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    model = FSDP(torch.nn.Linear(8, 4), device_id=torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(4):
        optimizer.zero_grad()
        model(torch.randn(4, 8)).pow(2).mean().backward()
        if step == 1 and dist.get_rank() == 1:
            stabledrl_cli.log_policy_batch(step, logp=torch.zeros(3))
        optimizer.step()
    sys.stdout.write(f"trained {dist.get_rank()}\\n")  # one write: the ranks share stdout
    sys.stdout.flush()
    dist.destroy_process_group()
    exit_without_finalizing()
    """
)


def test_an_fsdp1_rank_that_stops_recording_stops_the_others_without_a_hang(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(FSDP1_STOP_SCRIPT)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    result = record(
        "--out", str(tmp_path / "run"), "--", *torchrun, "--nproc-per-node", "2", str(script)
    )  # fmt: skip
    assert "trained 0" in result.stdout and "trained 1" in result.stdout, result.stderr
    assert result.returncode == 2, result.stderr  # rank 1's failure: no policy
    assert "another rank stopped recording" in result.stderr
    assert open_run(tmp_path / "run").step_numbers == [0]


# FSDP2 on 2 gloo ranks (CPU) with a short collective timeout, clipped on steps 1 and 3, the
# model sharded over both ranks ("fsdp") or replicated on both (HSDP, "hsdp": a 2 x 1 mesh);
# argv[4] lists the layouts to train, one after the other in the same ranks. Rank 1 stops
# recording at step argv[3]: "batch" (a policy batch without a policy, before the step) or
# "hooks" (the hooks' own measuring fails inside optimizer.step()). For each layout rank 0
# writes each step's whole gradient norm before clipping and the final parameters to
# argv[1].LAYOUT.
FSDP2_STOP_SCRIPT = textwrap.dedent(
    """
    import datetime, json, sys
    import torch, torch.distributed as dist
    from distributed_exit import exit_without_finalizing
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    import stabledrl_cli

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
    rank, how, stop_at = dist.get_rank(), sys.argv[2], int(sys.argv[3])
    foreach_norm = torch._foreach_norm

    def broken(*args, **kwargs):
        raise RuntimeError("measuring failed")

    def train(layout):
        if layout == "hsdp":
            mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh("cpu", (2,))
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        for layer in (model[0], model[2], model):
            fully_shard(layer, mesh=mesh)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        norms = []
        for step in range(5):
            optimizer.zero_grad()
            torch.manual_seed(step + 10 * rank)
            model(torch.randn(4, 8)).pow(2).mean().backward()
            whole = torch.cat([p.grad.full_tensor().reshape(-1) for p in model.parameters()])
            norms.append(whole.norm().item())
            stops = rank == 1 and step == stop_at
            if stops and how == "batch":
                stabledrl_cli.log_policy_batch(step, logp=torch.zeros(3))
            if step in (1, 3):
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            if stops and how == "hooks":
                torch._foreach_norm = broken
            optimizer.step()
            torch._foreach_norm = foreach_norm
        final = [p.full_tensor().tolist() for p in model.parameters()]
        if rank == 0:
            json.dump({"norms": norms, "final": final}, open(f"{sys.argv[1]}.{layout}", "w"))

    for layout in sys.argv[4].split(","):
        train(layout)
    sys.stdout.write(f"trained {rank}\\n")  # one write: the ranks share stdout
    sys.stdout.flush()
    dist.destroy_process_group()
    exit_without_finalizing()
    """
)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.mark.parametrize(
    ("how", "stop_at", "layout"),
    [("batch", 0, "fsdp"), ("batch", 3, "fsdp"), ("hooks", 2, "fsdp"), ("batch", 2, "hsdp")],
)
def test_an_fsdp2_rank_that_stops_recording_stops_the_others_without_a_hang(
    tmp_path, unrecorded, how, stop_at, layout
):
    script, out = tmp_path / "train.py", tmp_path / "out.json"
    script.write_text(FSDP2_STOP_SCRIPT)
    result = record(
        "--out", str(tmp_path / "run"), "--", *TORCHRUN, str(script), str(out), how,
        str(stop_at), layout,
    )  # fmt: skip
    assert "trained 0" in result.stdout and "trained 1" in result.stdout, result.stderr
    assert "another rank stopped recording" in result.stderr
    assert result.returncode == {"batch": 2, "hooks": 3}[how], result.stderr  # rank 1's failure
    trained = json.loads(Path(f"{out}.{layout}").read_text())
    assert trained["final"] == unrecorded[layout]["final"]  # training is untouched
    steps = tmp_path / "run" / "steps"
    written = sorted(p.name for p in steps.iterdir()) if steps.exists() else []
    # every step before the stop on both ranks, none after
    names = [f"step-{n:08d}.rank-{r:04d}.safetensors" for n in range(stop_at) for r in (0, 1)]
    assert written == names, result.stderr
    for name in written:
        with safe_open(steps / name, "pt") as step_file:
            recorded = float(step_file.metadata()["grad_norm"])
        whole = trained["norms"][int(name[5:13])]
        assert close(recorded, whole), (name, recorded, whole)


# Three modules on a 2-rank CPU mesh (after `rank` and the process group): "replicated" holds
# Replicate DTensor parameters fed each rank's own batch rows as a Shard(0) input, so torch
# leaves their gradients Partial (summed over the ranks only when read whole), as in sequence
# parallelism; "sharded" holds Shard(0) parameters fed the same input on both ranks (Shard(0)
# gradients); "plain" holds plain tensors fed each rank's own data. `loss(step)` is a step's
# loss, `placements()` each module's kinds of gradient.
MODULES_ON_A_MESH = textwrap.dedent(
    """
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"replicated": torch.nn.Linear(4, 8),
                                 "sharded": torch.nn.Linear(4, 8), "plain": torch.nn.Linear(3, 1)})
    for name, placement in (("replicated", Replicate()), ("sharded", Shard(0))):
        for key, param in list(model[name].named_parameters()):
            whole = distribute_tensor(param.detach(), mesh, [placement])
            setattr(model[name], key, torch.nn.Parameter(whole))

    def loss(step):
        torch.manual_seed(step + 10 * rank)
        rows = DTensor.from_local(torch.randn(4, 4), mesh, [Shard(0)])  # this rank's rows
        mine = torch.randn(5, 3)
        torch.manual_seed(100 + step)
        same = distribute_tensor(torch.randn(6, 4), mesh, [Replicate()])
        shared = (torch.tanh(model["replicated"](rows)).pow(2).mean()
                  + torch.tanh(model["sharded"](same)).pow(2).mean())
        return (shared.full_tensor() + model["plain"](mine).pow(2).mean()) * 10

    def placements():
        kinds = {name: {p.grad.placements[0] if isinstance(p.grad, DTensor) else p.grad
                        for p in model[name].parameters()} for name in model}
        return {name: sorted({type(k).__name__ for k in ks}) for name, ks in kinds.items()}
    """
)
PLACEMENTS = {"replicated": ["Partial"], "sharded": ["Shard"], "plain": ["Tensor"]}


# Real accelerate on 2 gloo ranks (torchrun, Accelerator(cpu=True): MULTI_CPU), with
# MODULES_ON_A_MESH, "plain" wrapped in DDP by accelerate. accelerate 1.15's
# Accelerator.clip_grad_norm_ then takes the path of _clip_grad_norm_dtensor_aware that every
# rank runs together: one mesh group plus the plain group, so get_total_norm per group (the
# mesh group's DTensor total made whole by full_tensor), their L2 norm as the total, and
# clip_grads_with_norm_ once per group (the mesh group's total as a replicated DTensor). The
# script counts those calls, and each rank writes what the clip returned, each module's whole
# (full_tensor) norm before it, and the norm after it.
ACCELERATE_RANKS_SCRIPT = (
    textwrap.dedent(
        """
        import json, sys
        import torch, torch.distributed as dist
        from distributed_exit import exit_without_finalizing
        from accelerate import Accelerator
        from accelerate.utils import DistributedType
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

        accelerator = Accelerator(cpu=True)
        assert accelerator.distributed_type == DistributedType.MULTI_CPU
        rank = accelerator.process_index
        """
    )
    + MODULES_ON_A_MESH
    + textwrap.dedent(
        """
        model["plain"], optimizer = accelerator.prepare(
            model["plain"], torch.optim.SGD(model.parameters(), lr=0.01))
        assert type(model["plain"]).__name__ == "DistributedDataParallel"
        with_norm_calls = []
        clip_with_norm = torch.nn.utils.clip_grads_with_norm_

        def counted(*args, **kwargs):
            with_norm_calls.append(1)
            return clip_with_norm(*args, **kwargs)

        torch.nn.utils.clip_grads_with_norm_ = counted

        def norm(params):
            whole = [p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                     for p in params]
            return torch.linalg.vector_norm(torch.stack([g.norm() for g in whole])).item()

        seen = []
        for step in range(3):
            optimizer.zero_grad()
            accelerator.backward(loss(step))
            modules = {name: norm(model[name].parameters()) for name in model}
            with_norm_calls.clear()
            returned = accelerator.clip_grad_norm_(model.parameters(), 0.5)
            seen.append({"returned": returned.item(), "modules": modules, "grads": placements(),
                         "with_norm_calls": len(with_norm_calls),
                         "after": norm(model.parameters())})
            optimizer.step()
        json.dump(seen, open(f"{sys.argv[1]}.{rank}", "w"))
        dist.destroy_process_group()
        exit_without_finalizing()
        """
    )
)


def test_accelerates_clip_on_two_ranks_is_recorded_with_the_norm_it_returned(recorded):
    pytest.importorskip("accelerate", reason="needs accelerate (pip install -e '.[trl]')")
    result, (first, computed) = recorded["result"], recorded["accelerate"]
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower() and "recording failed" not in result.stderr
    run = open_run(recorded["out"])
    for rank in (0, 1):
        seen = json.loads(Path(f"{computed}.{rank}").read_text())
        assert len(seen) == 3
        for n, mine in enumerate(seen):
            assert mine["grads"] == PLACEMENTS and mine["with_norm_calls"] == 2  # its path
            assert mine["after"] == pytest.approx(0.5, rel=1e-4)  # accelerate clipped
            scalars = _rank_scalars(run, first + n, rank)
            # exactly: the hooks read the very total accelerate gave clip_grads_with_norm_ and
            # returned (a float32 tensor), and a float32 is a float64 exactly
            assert scalars["grad_norm"] == mine["returned"] > 1, (rank, n, scalars, mine)
            # approximately: the hooks sum float32 local norms in float64, the script takes
            # float32 norms of the whole gradients
            modules = {m: scalars[f"grad_norm/module/{m}"] for m in ("replicated", "sharded")}
            modules["plain"] = scalars["grad_norm/module/plain.module"]
            assert modules == pytest.approx(mine["modules"], rel=1e-6), (rank, n, scalars)
            assert close(mine["returned"], math.sqrt(sum(v * v for v in modules.values())))
            assert scalars["nonfinite_grads"] == 0


# MODULES_ON_A_MESH on 2 gloo ranks, without DDP (each rank its own "plain" gradients): a
# Partial gradient beside a Shard and a plain one at every step. Steps 1 and 3 clip with
# torch.nn.utils.clip_grad_norm_ (step 1: the DTensor modules in one call and the plain one in
# another; step 3: one call per module), max_norm far below the norm. Each rank writes each
# module's norm before any clip, computed by hand (a Partial gradient's local tensors summed
# over the ranks by all_reduce, a Shard one's squares summed), what each clip returned and the
# norm after it.
PARTIAL_SCRIPT = (
    textwrap.dedent(
        """
        import datetime, json, sys
        import torch, torch.distributed as dist
        from distributed_exit import exit_without_finalizing
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        rank = dist.get_rank()
        """
    )
    + MODULES_ON_A_MESH
    + textwrap.dedent(
        """
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

        def whole_norm(params):
            squares = torch.zeros((), dtype=torch.float64)
            for grad in (p.grad for p in params):
                if not isinstance(grad, DTensor):
                    squares += grad.double().pow(2).sum()
                    continue
                local = grad.to_local().double()
                if grad.placements[0].is_partial():
                    local = local.clone()
                    dist.all_reduce(local)  # the reduced gradient: the ranks' local ones summed
                    squares += local.pow(2).sum()
                else:
                    part = local.pow(2).sum()
                    dist.all_reduce(part)
                    squares += part
            return squares.sqrt().item()

        clips = {1: [["replicated", "sharded"], ["plain"]],
                 3: [["replicated"], ["sharded"], ["plain"]]}
        stop_at = int(sys.argv[2]) if len(sys.argv) > 2 else -1
        seen = []
        for step in range(4):
            optimizer.zero_grad()
            loss(step).backward()
            modules = {name: whole_norm(model[name].parameters()) for name in model}
            returned = []
            for names in clips.get(step, []):
                params = [p for name in names for p in model[name].parameters()]
                total = torch.nn.utils.clip_grad_norm_(params, 0.05)
                whole = total.full_tensor() if isinstance(total, DTensor) else total
                returned.append(whole.item())
            if rank == 1 and step == stop_at:  # after the clip: its Partial copies are held
                import stabledrl_cli
                stabledrl_cli.log_policy_batch(step, logp=torch.zeros(3))  # no policy: stops
            seen.append({"grads": placements(), "modules": modules, "returned": returned,
                         "after": whole_norm(model.parameters())})
            optimizer.step()
        final = {name: (p.full_tensor() if isinstance(p, DTensor) else p).tolist()
                 for name, p in model.named_parameters()}
        seen.append({"final": final})
        json.dump(seen, open(f"{sys.argv[1]}.{rank}", "w"))
        dist.destroy_process_group()
        exit_without_finalizing()
        """
    )
)


def test_partial_dtensor_gradients_are_recorded_with_their_reduced_norm(recorded):
    result, (first, computed) = recorded["result"], recorded["partial"]
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower() and "recording failed" not in result.stderr
    run = open_run(recorded["out"])
    for rank in (0, 1):
        seen = json.loads(Path(f"{computed}.{rank}").read_text())[:-1]
        assert len(seen) == 4
        for n, mine in enumerate(seen):
            assert mine["grads"] == PLACEMENTS, (rank, n)
            scalars = _rank_scalars(run, first + n, rank)
            modules = {m: scalars[f"grad_norm/module/{m}"] for m in PLACEMENTS}
            # each module's norm before any clip (the plain one: this rank's own gradients)
            assert modules == pytest.approx(mine["modules"], rel=1e-6), (rank, n, scalars)
            whole = math.sqrt(sum(v * v for v in mine["modules"].values()))
            assert close(scalars["grad_norm"], whole), (rank, n, scalars["grad_norm"], whole)
            if mine["returned"]:  # torch's clips: what they returned, summed in squares
                assert len(mine["returned"]) == {1: 2, 3: 3}[n]
                assert close(scalars["grad_norm"], math.hypot(*mine["returned"]))
                assert mine["after"] < whole / 10  # torch clipped
            assert scalars["nonfinite_grads"] == 0


# Runs each phase (argv[1]: a JSON list of [name, script, its arguments]) as a script of its
# own, one after the other in the same ranks, as tests/_phases.py's PHASES_SCRIPT does in one
# process: it prints `== NAME` before it and frees its optimizers after it. The scripts' own
# init_process_group and ending are skipped once the group is up; the ranks end after the
# last phase.
RANK_PHASES_SCRIPT = textwrap.dedent(
    """
    import gc, json, runpy, sys
    import torch.distributed as dist
    import distributed_exit

    end, init, destroy = (
        distributed_exit.exit_without_finalizing, dist.init_process_group,
        dist.destroy_process_group)
    distributed_exit.exit_without_finalizing = lambda code=0: None
    dist.init_process_group = lambda *args, **kwargs: (
        None if dist.is_initialized() else init(*args, **kwargs))
    dist.destroy_process_group = lambda *args, **kwargs: None
    for name, path, args in json.load(open(sys.argv[1])):
        for stream in (sys.stdout, sys.stderr):
            print(f"== {name}", file=stream, flush=True)
        sys.argv = [path, *args]
        runpy.run_path(path, run_name="__main__")
        gc.collect()
    destroy()
    end()
    """
)


def _rank_phases(tmp: Path, phases: dict[str, tuple[str, list[str]]]) -> list[str]:
    """The command of 2 ranks under torchrun that run `phases` (name -> (script, its
    arguments)) one after the other (RANK_PHASES_SCRIPT), their scripts written to `tmp`."""
    listed = []
    for k, (name, (source, args)) in enumerate(phases.items()):
        script = tmp / f"phase_{k}.py"
        script.write_text(source)
        listed.append((name, str(script), args))
    (tmp / "phases.json").write_text(json.dumps(listed))
    (tmp / "ranks.py").write_text(RANK_PHASES_SCRIPT)
    return [*TORCHRUN, str(tmp / "ranks.py"), str(tmp / "phases.json")]


@pytest.fixture(scope="module")
def unrecorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What FSDP2_STOP_SCRIPT wrote of each layout ("fsdp", "hsdp") and what PARTIAL_SCRIPT
    wrote of each rank ("partial": rank -> its list) when they trained without recording (one
    launch: both layouts, no rank stopping, then PARTIAL_SCRIPT)."""
    tmp = tmp_path_factory.mktemp("unrecorded")
    fsdp2, partial = tmp / "fsdp2.json", tmp / "partial"
    phases = {
        "fsdp2": (FSDP2_STOP_SCRIPT, [str(fsdp2), "none", "-1", "fsdp,hsdp"]),
        "partial": (PARTIAL_SCRIPT, [str(partial)]),
    }
    result = subprocess.run(
        _rank_phases(tmp, phases), capture_output=True, text=True, env=record_env(), timeout=300
    )
    assert result.returncode == 0, result.stderr
    written: dict[str, Any] = {
        layout: json.loads(Path(f"{fsdp2}.{layout}").read_text()) for layout in ("fsdp", "hsdp")
    }
    written["partial"] = {r: json.loads(Path(f"{partial}.{r}").read_text()) for r in (0, 1)}
    return written


HEALTHY = {
    "fsdp2": (FSDP_SCRIPT, [], 3),
    "fsdp1 flat": (FSDP1_SCRIPT, ["flat"], 4),
    "fsdp1 orig": (FSDP1_SCRIPT, ["orig"], 4),
    "partial": (PARTIAL_SCRIPT, [], 4),
    **({"accelerate": (ACCELERATE_RANKS_SCRIPT, [], 3)} if find_spec("accelerate") else {}),
}
"""Scripts of 2 ranks whose recording goes well, with their arguments after the file they
write and the steps they take: one launch records them all, one after the other (accelerate's
last: its state outlives its phase)."""


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """HEALTHY recorded by one `stabledrl record` of one torchrun launch: name -> (the run's
    step of the phase's first, the file its script wrote: FSDP1_SCRIPT and PARTIAL_SCRIPT one
    a rank, `FILE.RANK`); "result" -> record's result, "out" -> the run."""
    tmp = tmp_path_factory.mktemp("recorded")
    phases, found, first = {}, {}, 0
    for k, (name, (source, args, steps)) in enumerate(HEALTHY.items()):
        computed = tmp / f"computed_{k}"
        phases[name] = (source, [str(computed), *args])
        found[name] = (first, computed)
        first += steps
    result = record("--out", str(tmp / "run"), "--", *_rank_phases(tmp, phases))
    return {"result": result, "out": tmp / "run", **found}


def test_the_healthy_phases_take_the_run_steps_one_after_the_other(recorded):
    result = recorded["result"]
    assert result.returncode == 0, result.stderr
    run = open_run(recorded["out"])
    assert run.manifest["world_size"] == 2
    assert run.step_numbers == list(range(sum(steps for _, _, steps in HEALTHY.values())))
    names = {f"step-{n:08d}.rank-{r:04d}.safetensors" for n in run.step_numbers for r in (0, 1)}
    assert {p.name for p in (recorded["out"] / "steps").iterdir()} == names


def test_a_rank_that_stops_recording_while_holding_partial_copies_stops_the_other(
    tmp_path, unrecorded
):
    # PARTIAL_SCRIPT with rank 1's recording stopped at step 3, after the clips copied its
    # Partial gradients: both ranks stop there, neither waits, and training is untouched.
    script, computed = tmp_path / "train.py", tmp_path / "norms"
    script.write_text(PARTIAL_SCRIPT)
    result = record(
        "--out", str(tmp_path / "run"), "--", *TORCHRUN, str(script), str(computed), "3"
    )  # fmt: skip
    assert "another rank stopped recording" in result.stderr
    assert result.returncode == 2, result.stderr  # rank 1's log_policy_batch failure
    for rank in (0, 1):
        trained = json.loads(Path(f"{computed}.{rank}").read_text())[-1]
        alone = unrecorded["partial"][rank][-1]
        assert trained == alone  # training is untouched
    run = open_run(tmp_path / "run")
    assert run.step_numbers == [0, 1, 2]  # every step before the stop on both ranks
    names = sorted(p.name for p in (tmp_path / "run" / "steps").iterdir())
    assert names == [f"step-{n:08d}.rank-{r:04d}.safetensors" for n in range(3) for r in (0, 1)]
