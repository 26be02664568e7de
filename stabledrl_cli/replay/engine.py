"""The replay: every policy over a recorded run, as `replay()` (the public API) and
`replay_run`.

A replay is a one-step counterfactual: the same batch, the same weights, another policy. It
never simulates another trajectory. The streaming pass (`stream.stream_run`) evaluates every
policy on every step; the per-step columns (`columns.COLUMNS`) are derived from it, among them
the detectors (docs/collapse.md): spikes on the pre-clip `update_norm`, drift on the rolling
mean of `net_push`. With `detail`, a second pass re-reads the flagged steps of the reported
range to name the sequences behind them.

Scalar steps (format 1.2: per-step scalars, no policy batch) hold nothing to replay: a mixed
run's are skipped and counted (`ReplayResult.scalar_steps`), and a run of scalar steps only is
refused (`NothingToReplay`, exit 3): `inspect` shows it and `check` gates its recorded series.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial

import numpy as np

from stabledrl_cli._device import resolve_device
from stabledrl_cli.dump import Run
from stabledrl_cli.dump._integrity import integrity_warnings_ignored
from stabledrl_cli.dump._live import live_read
from stabledrl_cli.dump._open import opened_run
from stabledrl_cli.dump._views import StepSubset
from stabledrl_cli.errors import InputError, UsageError, type_name
from stabledrl_cli.policies import STANDARD_CATALOGUE, Policy, get_policy
from stabledrl_cli.replay.columns import derive_series, device_metrics
from stabledrl_cli.replay.config import (
    DEFAULT_DRIFT_THRESHOLD,
    DEFAULT_SPIKE_FACTOR,
    DEFAULT_WINDOW,
    ReplayConfig,
    StepRange,
    guard_specs,
    in_range,
    parse_size,
    replay_config,
)
from stabledrl_cli.replay.engines import (
    Engine,
    LocalEngine,
    named_engine,
    no_engine,
    single_torch_thread,
)
from stabledrl_cli.replay.observed import Observed, observe
from stabledrl_cli.replay.result import PolicyResult, ReplayResult, Unjoined
from stabledrl_cli.replay.run_facts import (
    NothingToReplay,
    no_steps_message,
    nothing_to_replay,
    own_spec,
    refuse_recorded_again,
    run_gaps,
    run_ranks,
    skipped_reasons,
)
from stabledrl_cli.replay.step_data import check_step, run_unit
from stabledrl_cli.replay.step_series import StepSeries
from stabledrl_cli.replay.stream import StreamedRun, detail_pass
from stabledrl_cli.replay.summary import (
    best_index,
    fidelity_gap,
    parity_gap,
    summarize_policy,
)
from stabledrl_cli.replay.top_sequences import TopSequence
from stabledrl_cli.vocab import ReplayEngine, RunGeometryKind, StepGeometryKind

__all__ = [
    "DEFAULT_DRIFT_THRESHOLD",
    "DEFAULT_SPIKE_FACTOR",
    "DEFAULT_WINDOW",
    "Engine",
    "LocalEngine",
    "NothingToReplay",
    "ReplayConfig",
    "ReplayResult",
    "own_policy",
    "replay",
    "replay_run",
    "resolve_policies",
]


def own_policy(run: Run) -> Policy | None:
    """The run's own policy from its manifest (`run_facts.own_spec`), or None when the
    manifest names none or a spec the catalogue does not hold (a custom policy recorded by a
    training script)."""
    spec = own_spec(run)
    return None if spec is None else get_policy(spec)


PolicySpecs = str | Policy | Sequence[str | Policy] | None
"""The policies of a replay: one spec or Policy, several, or None (the run's own and the
standard catalogue). A lone string is one spec, never a sequence of one-letter ones."""


def resolve_policies(run: Run, specs: PolicySpecs) -> tuple[list[Policy], int | None]:
    """-> (policies, index of the run's own one or None).

    No specs: the run's own policy, then the standard catalogue, deduplicated by canonical spec.
    With specs: exactly those (deduplicated), the own one marked where one matches.
    Unknown specs raise UsageError (exit 2), and so does an empty list: a list filtered down
    to nothing replays nothing, not the catalogue.
    """
    own = own_policy(run)
    if isinstance(specs, (str, Policy)):
        specs = [specs]
    elif specs is not None and (
        isinstance(specs, (bytes, bytearray, Mapping)) or not isinstance(specs, Iterable)
    ):  # a dict's keys would be replayed, its values (parameters?) silently dropped
        raise _not_policies(specs)
    if specs is not None:
        try:
            specs = list(specs)  # a generator, filtered down to nothing, is an empty list too
        except TypeError:  # a 0-d numpy array or tensor: iterable by its type, not its value
            raise _not_policies(specs) from None
    if specs is not None and not specs:
        raise UsageError(
            "no policy to replay (an empty list): name one, or pass None for the run's own "
            "policy and the standard catalogue"
        )
    if specs is not None:
        candidates = [get_policy(s) for s in specs]
    else:
        candidates = ([own] if own is not None else []) + [
            get_policy(s) for s in STANDARD_CATALOGUE
        ]
    policies: list[Policy] = []
    seen: set[str] = set()
    for policy in candidates:
        if policy.spec not in seen:
            seen.add(policy.spec)
            policies.append(policy)
    own_index = None
    if own is not None:
        own_index = next((i for i, p in enumerate(policies) if p.spec == own.spec), None)
    for policy in policies:
        policy.required_fields(run_unit(run))  # level=token on a sequence run: a usage error, now
    return policies, own_index


def _not_policies(specs: object) -> UsageError:
    """The error of a `policies` argument that is no spec, Policy or list of them."""
    kind = type_name(specs)
    if getattr(specs, "ndim", None) == 0:
        kind = f"a 0-d {kind}"
    return UsageError(f"policies must be a spec, a Policy or a list of them, not {kind}")


def _run_geometry(kinds: tuple[StepGeometryKind, ...]) -> tuple[RunGeometryKind, float]:
    """The run's geometry over its steps, and the fraction of steps with geometry."""
    distinct = set(kinds)
    coverage = float(np.mean([k != "coef" for k in kinds])) if kinds else 0.0
    if len(distinct) == 1:
        return distinct.pop(), coverage
    return ("mixed" if distinct else "coef"), coverage


def _unjoined_geometry(run: Run, step_numbers: np.ndarray) -> Unjoined:
    """The geometry the ranks of `run` recorded on the replayed steps that the join left out
    (`Step.unjoined`: Grams, which do not combine, or a sketch of some ranks only or of other
    seeds or widths), and the ranks' seeds (widths) on the first step they left the sketch out
    for (() where none did), from the steps' headers. A one-rank run has none, and its steps
    are not looked up again after the streaming pass."""
    if not step_numbers.size or run_ranks(run) < 2:
        return Unjoined()
    unjoined = Unjoined()
    for step in StepSubset(run, step_numbers.tolist()).step_headers():  # gone since: left out
        why = step.unjoined_why
        unjoined = Unjoined(
            unjoined.kinds | ({why} if why else set()),
            unjoined.seeds or (step.sketch_seeds if why == "sketch_seeds_differ" else ()),
            unjoined.widths or (step.sketch_widths if why == "sketch_widths_differ" else ()),
        )
    return unjoined


def _flagged_steps(series: list[StepSeries], keep: np.ndarray) -> dict[int, list[int]]:
    """step -> indices of the policies that flagged it (collapsed or drift), in range."""
    flagged: dict[int, list[int]] = {}
    for i, s in enumerate(series):
        hits = keep & (np.asarray(s["collapsed"], dtype=bool) | np.asarray(s["drift"], dtype=bool))
        for number in np.asarray(s["step"])[hits]:
            flagged.setdefault(int(number), []).append(i)
    return flagged


def check_first_step(run: Run, policies: list[Policy]) -> None:
    """From the headers, before any step is computed: InputError (exit 3) when the first step
    with a policy batch that the pass reads lacks a field a policy needs (`check_step`; a
    problem of the request, unlike a step whose data is bad, which the pass skips),
    `NothingToReplay` when every step it reads is a scalar step (`replay_run` decides the same
    after a pass). A step the pass skips is passed over as the pass passes it, so every engine
    names the step the local pass names: one some rank has no file of, and one whose data
    fails its checksum (read whole only when its header lacks a field)."""
    whole = set(run.listed_whole_step_numbers)
    scalar = 0
    for header in run.step_headers():
        if header.step not in whole:
            continue
        if header.is_scalar:
            scalar += 1
            continue
        try:
            check_step(header, policies, run_unit(run), run.location)
        except InputError:
            with integrity_warnings_ignored():  # the replay counts the steps it skips
                if not list(run.steps_of((header.step,))):
                    continue
            raise
        return
    if scalar:
        raise nothing_to_replay(run, scalar, skipped_reasons(run))


def replay_run(
    run: Run,
    policies: PolicySpecs = None,
    *,
    config: ReplayConfig | None = None,
    progress: Callable[[int], None] | None = None,
    engine: Engine | None = None,
) -> ReplayResult:
    """Replays every step of `run` under each policy (None: own + the standard catalogue).

    progress: called with the number of steps done after each chunk (or shard).
    A run still being recorded is read as listed when the replay began (`Run.snapshot`).
    engine: where the streaming pass runs (None: `LocalEngine`); the result does not depend on it.
    """
    with run.snapshot():  # every figure from the steps listed now (`Run.snapshot`)
        config = config or ReplayConfig()
        resolved, own_index = resolve_policies(run, policies)
        engine = engine or LocalEngine()
        if not isinstance(engine, LocalEngine):
            # Its workers read the steps: a request they cannot serve is refused before they start.
            # The local pass checks each step as it reads it, the first before any is computed.
            check_first_step(run, resolved)
        with integrity_warnings_ignored():  # the skipped steps are counted below
            with single_torch_thread():
                stream = engine.stream(run, resolved, own_index, config, progress)
            skipped = skipped_reasons(run) + [reason for _, reason in stream.rejected]
            if stream.step_numbers.size == 0:
                if stream.scalar_steps and not stream.rejected:  # no step held a batch
                    raise nothing_to_replay(run, stream.scalar_steps, skipped)
                raise InputError(no_steps_message(run, skipped))
            observed = observe(
                run, config, noise_floor=stream.noise_floor, likelihood=stream.likelihood
            )
        result = replay_result(run, resolved, own_index, stream, observed, skipped, config)
        refuse_recorded_again(run, "replay")
        result.live = live_read(run)  # of the listing read, before it is released
        return result


def replay_result(
    run: Run,
    resolved: list[Policy],
    own_index: int | None,
    stream: StreamedRun,
    observed: Observed,
    skipped: list[str],
    config: ReplayConfig,
) -> ReplayResult:
    """The replay of the `resolved` policies from their streaming pass over `run` (`stream`)
    and the run's observed behaviour: per-step columns, summaries, the best policy, and the
    detail pass when `config.detail`."""
    series = [
        StepSeries(
            derive=partial(
                derive_series, stream.metrics[:, i, :], stream.step_numbers, stream.geometry, config
            )
        )
        for i in range(len(resolved))
    ]
    summaries = [
        summarize_policy(
            s,
            stream,
            own=(i == own_index),
            approximate=bool(stream.approximate[i]),
            objective_mass=stream.metrics[:, i, device_metrics().index("objective_mass")],
            window=config.window,
        )
        for i, s in enumerate(series)
    ]
    best = best_index(summaries)
    keep = in_range(stream.step_numbers, config.step_range)
    # Each policy's series is derived from the streamed metrics when read (`StepSeries`), and
    # a range of every step keeps it so: a copy of every column of every policy set the peak.
    every_step = bool(keep.all())
    details: list[dict[int, list[TopSequence]] | None] = [None for _ in resolved]
    if config.detail:
        with integrity_warnings_ignored():
            flagged = _flagged_steps(series, keep)
            device = resolve_device(config.device)
            with single_torch_thread():
                details = [*detail_pass(run, resolved, flagged, device, config.top_k)]
    geometry, coverage = _run_geometry(stream.geometry)
    unjoined = _unjoined_geometry(run, stream.step_numbers)
    gap = parity = ""
    if own_index is not None and summaries[own_index].fidelity is None:
        norms = np.asarray(series[own_index]["update_norm"], dtype=np.float64)
        gap = fidelity_gap(stream, norms, unjoined=unjoined.kind is not None)
    if own_index is not None and summaries[own_index].loss_parity is None:
        objective = np.asarray(series[own_index]["objective"], dtype=np.float64)
        parity = parity_gap(objective, stream.loss)
    return ReplayResult(
        fidelity_gap=gap,
        loss_parity_gap=parity,
        unjoined=unjoined,
        run=run.location,
        steps=int(stream.step_numbers.shape[0]),
        geometry=geometry,
        geometry_coverage=coverage,
        policies=[
            PolicyResult(
                name=policy.name,
                spec=policy.spec,
                params=dict(policy.params),
                own=(i == own_index),
                best=(i == best),
                summary=summaries[i],
                series=series[i] if every_step else series[i].select(keep),
                detail=details[i],
            )
            for i, policy in enumerate(resolved)
        ],
        observed=observed,
        run_policy_spec=run.policy_spec,
        step_range=config.step_range,
        skipped=skipped,
        missing=run_gaps(run),
        threads=config.threads,
        widest_chunk=stream.widest_chunk,
        scalar_steps=stream.scalar_steps,
    )


def replay(
    run: str | os.PathLike[str] | Run,
    policies: PolicySpecs = None,
    *,
    device: str = "auto",
    chunk_size: int | None = None,
    memory_budget: int | str | None = None,
    threads: int | None = None,
    spike_factor: float | None = None,
    window: int | None = None,
    drift_threshold: float | None = None,
    max_grad_norm: float | None = None,
    collapse_window: int | None = None,
    warning_window: int | None = None,
    warning_drop: float | None = None,
    step_range: StepRange = (None, None),
    detail: bool = False,
    guards: str | Sequence[str] | None = None,
    engine: Engine | ReplayEngine | None = None,
) -> ReplayResult:
    """`stabledrl replay` as a function: the same results as the CLI, as Python objects.

    run: a run directory, archive or URL (or an opened Run); policies: a spec, or a non-empty
    list of specs (None: the run's own policy plus the standard catalogue); engine: where the
    streaming pass runs (None or "local": this process; "processes" or
    `process_engine.ProcessEngine(workers=N)`: worker processes of this machine; "ray" or
    `ray_engine.RayEngine(...)`: a Ray cluster; the results are the same); guards: the
    adaptive grad-norm guards replayed over the recorded norms, a spec or a list of them as
    `--guard` takes them (None: zclip and skip-step; "none" or an empty list: no guard);
    memory_budget: bytes, or a size as `--memory-budget` takes it ("256M", "1G"); the other
    arguments are `ReplayConfig`'s (None: its default). `.to_json()` of the result prints the
    JSON contract. A run it opens (a path or URL) is closed when it returns or raises; a Run
    given is left open.

    Raises UsageError for a bad setting or policy spec (before the run is read), InputError
    for a run that is missing, unreadable, recorded again while read, or has no step to
    replay, or a step without a field a policy needs, and WorkerDiedError when a worker of
    the "processes" or "ray" engine died. It prints nothing: what `stabledrl replay` warns
    of on stderr is in the result (`.live`: a Recorder still holds the run; `.missing_steps`,
    `.skipped_steps`; a `step_range` that selects no step gives no per-step row) and in the
    run (`open_run(path).recording_stops`: a recording that stopped early).
    """
    if isinstance(engine, str):
        engine = named_engine(engine)
    elif engine is not None and (
        isinstance(engine, type) or not callable(getattr(engine, "stream", None))
    ):  # a class (engine=RayEngine): its stream is unbound
        raise no_engine(engine)
    budget = parse_size(memory_budget) if isinstance(memory_budget, str) else memory_budget
    config = replay_config(
        device=device,
        chunk_size=chunk_size,
        memory_budget=budget,
        threads=threads,
        spike_factor=spike_factor,
        window=window,
        drift_threshold=drift_threshold,
        max_grad_norm=max_grad_norm,
        collapse_window=collapse_window,
        warning_window=warning_window,
        warning_drop=warning_drop,
        step_range=step_range,
        detail=detail,
        guards=guard_specs(guards),
    )
    with opened_run(run) as opened:
        return replay_run(opened, policies, config=config, engine=engine)
