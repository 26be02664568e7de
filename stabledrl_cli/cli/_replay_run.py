"""A replay run for a command: its policy specs checked, the --engine's engine, and the replay
with its progress on stderr (`replay_with_progress`, which `replay`, `check` and `tune` share).

The replay engines (torch) are imported where they run: the checks of the options and the run
never load torch."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from stabledrl_cli.cli._option_names import option_names
from stabledrl_cli.cli._options import on_command_line
from stabledrl_cli.cli._output import err, progress
from stabledrl_cli.cli._replay_notes import note_idle_threads
from stabledrl_cli.cli._signals import stopped_by_sigterm
from stabledrl_cli.dump import Run
from stabledrl_cli.dump._integrity import integrity_warnings_ignored
from stabledrl_cli.errors import UsageError
from stabledrl_cli.policies._registry import resolve_spec
from stabledrl_cli.replay.config import MAX_THREADS, ReplayConfig, check_workers
from stabledrl_cli.replay.plot import require_matplotlib
from stabledrl_cli.replay.result import ReplayResult
from stabledrl_cli.replay.run_facts import scalar_run_refusal
from stabledrl_cli.vocab import ReplayEngine

if TYPE_CHECKING:
    from stabledrl_cli.replay.engines import Engine


def check_policy_specs(policies: Sequence[str] | None) -> None:
    """A bad policy spec refused (exit 2) before an engine's module or a replay loads torch,
    which takes a second or more."""
    for spec in policies or ():
        resolve_spec(spec)


def replay_engine(engine: ReplayEngine, workers: int | None, address: str | None) -> Engine | None:
    """The --engine's engine, None for the local one (the replay's default, loading torch only
    when a step is replayed): --workers or --ray-address on the command line without --engine
    ray is a usage error (RAY_ADDRESS in the environment alone is not: people export it for
    every command, and the local engine ignores it), and so are --engine ray without ray
    installed and an empty --ray-address (an unset variable; an empty RAY_ADDRESS is none)."""
    if engine == "local":
        if workers is not None:
            raise UsageError("--workers needs --engine processes or ray")
        if on_command_line("ray_address"):
            raise UsageError("--ray-address needs --engine ray")
        return None
    if workers is not None and workers < 1:
        raise UsageError("--workers must be an integer >= 1")
    if engine == "processes":
        if on_command_line("ray_address"):
            raise UsageError("--ray-address needs --engine ray")
        with option_names():
            check_workers(workers, MAX_THREADS)  # before the engine's module loads torch
        from stabledrl_cli.replay.process_engine import ProcessEngine

        return ProcessEngine(workers=workers)
    if not (address or "").strip() and on_command_line("ray_address"):
        raise UsageError(
            "--ray-address is empty: give the cluster's address (host:6379, or auto), or leave "
            "the option out for a local cluster started for this run"
        )
    from stabledrl_cli.replay.ray_engine import RayEngine, require_ray

    require_ray()
    return RayEngine(address=address, workers=workers)


def replay_with_progress(
    run: Run,
    policies: Sequence[str] | None,
    config: ReplayConfig,
    engine: Engine | None = None,
    *,
    header: str | None = None,
    plot: Path | None = None,
) -> ReplayResult:
    """`replay_run` with its progress on stderr: a bar in a terminal, a line per tenth (at
    least every 30 s) without one. A setting the engine refuses as it starts (more local Ray
    workers than CPUs) is named by its option. `header`, a line on stderr, comes once the
    first step is computed (or the replay returns): a run refused before, such as a run with
    nothing to replay, gets its one error line alone. Given the `plot` to draw after it,
    matplotlib is imported once the run is found to hold something to replay: an install
    that fails to import is refused before the replay, not after it."""
    if str(config.device) in ("auto", "cpu"):  # a device named is checked first, by torch
        with integrity_warnings_ignored():  # the refusal names the skipped step files
            refusal = scalar_run_refusal(run)
        if refusal is not None:  # before torch loads (a second)
            raise refusal
    if plot is not None:
        require_matplotlib()
    from stabledrl_cli.replay.engine import replay_run
    from stabledrl_cli.replay.ray_engine import RayEngine

    pending = [] if header is None else [header]

    def say_header() -> None:
        while pending:
            err.print(pending.pop(), highlight=False)

    with (
        option_names(),
        # SIGTERM stops a Ray replay as Ctrl-C does, so that the cluster it started is stopped
        stopped_by_sigterm(as_interrupt=True) if isinstance(engine, RayEngine) else nullcontext(),
        progress("replaying", len(run.listed_whole_step_numbers), complete=True) as report,
    ):

        def advance(n: int) -> None:
            say_header()
            report(n)

        result = replay_run(run, policies, config=config, progress=advance, engine=engine)
        say_header()  # a replay that reported no step
    note_idle_threads(result, config)
    return result
