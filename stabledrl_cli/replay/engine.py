"""The replay engine: stream a recorded run's steps to a device and evaluate every policy on each.

A replay is a one-step counterfactual: the same batch, the same weights, another policy. It
never simulates another trajectory. Per step, `prepare` runs once and every policy is
evaluated on the prepared batch (metrics.step_metrics). Steps are read `chunk_size` at a time;
each chunk's arrays go to the device in one transfer per field and its per-step results come
back in one transfer, after which the chunk's arrays are dropped: memory holds one chunk of
arrays plus O(steps x policies) scalars, whatever the run's length. Each step is computed on
its own, so results do not depend on the chunk size.

Detectors (design.md "Collapse") run on the per-step scalars afterwards: spikes on the
pre-clip `update_norm` (detectors.spike_flags), drift on the rolling mean of `net_push`
(detectors.drift_flags). With `detail`, a second pass re-reads the flagged steps of the
reported range to name the sequences behind them.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stabledrl_cli._device import resolve_device
from stabledrl_cli.dump import Run, RunIntegrityWarning, Step, open_run
from stabledrl_cli.errors import InputError, UsageError
from stabledrl_cli.policies import STANDARD_CATALOGUE, Policy, PolicyBatch, get_policy, prepare
from stabledrl_cli.replay.detectors import drift_flags, spike_flags
from stabledrl_cli.replay.metrics import (
    COLUMN,
    StepGeometry,
    step_metrics,
    top_sequences,
    varies_within_sequence,
)
from stabledrl_cli.replay.observed import observe
from stabledrl_cli.replay.result import PolicyResult, ReplayResult

DEFAULT_CHUNK_SIZE = 64
# design.md: a spike is an update norm above 10x the median of the previous 20 finite steps.
DEFAULT_SPIKE_FACTOR = 10.0
# Drift defaults, calibrated by benchmarks/calibrate_drift.py on the built-in example (elbo
# and llada estimators, seeds 1-3, never the fixtures' seed 0, 400 steps). The lowest 50-step
# rolling mean of net_push was <= -0.179 for independent-mask grpo (all six runs), >= -0.120
# for stabledrl and >= -0.008 for same-mask grpo. 50 steps separates them with the widest gap
# (10 and 20 separate too, with narrower ones); the threshold is the gap's midpoint.
DEFAULT_WINDOW = 50
DEFAULT_DRIFT_THRESHOLD = -0.15
# torch.nn.utils.clip_grad_norm_'s epsilon: scale = max_norm / (norm + 1e-6).
CLIP_EPS = 1e-6
TOP_SEQUENCES = 5

BASE_FIELDS = ("logp", "logp_old", "advantages", "mask", "seq_id")
TOKEN_FIELDS = (*BASE_FIELDS, "logp_ref", "loss_weight", "loss_scale")
SEQUENCE_FIELDS = ("group_id", "reward")
GEOMETRY_FIELDS = ("unit_grad_gram", "unit_grad_sketch")


@dataclass(frozen=True, kw_only=True)
class ReplayConfig:
    """How a replay runs and what it flags."""

    device: str = "auto"
    """auto | cpu | cuda (auto: cuda, then mps, then cpu)."""
    chunk_size: int = DEFAULT_CHUNK_SIZE
    """Steps read and moved to the device at a time (bounds memory; results do not depend on it)."""
    spike_factor: float = DEFAULT_SPIKE_FACTOR
    """A spike: update_norm above this many times the median of the previous 20 finite steps."""
    window: int = DEFAULT_WINDOW
    """Steps in the rolling mean of net_push that the drift detector tests."""
    drift_threshold: float = DEFAULT_DRIFT_THRESHOLD
    """Drift: the rolling mean of net_push is below this (REINFORCE sits at 0)."""
    max_grad_norm: float | None = None
    """clip_grad_norm_ bound for `clip_scale`; None: no clipping (clip_scale 1)."""
    step_range: tuple[int | None, int | None] = (None, None)
    """Per-step rows reported for start <= step < stop (the replay itself covers the run)."""
    detail: bool = False
    """Name the top sequences of each flagged step in the reported range."""
    top_k: int = TOP_SEQUENCES
    """Sequences named per flagged step."""

    def __post_init__(self) -> None:
        checks = {
            "--chunk-size must be an integer >= 1": isinstance(self.chunk_size, int)
            and self.chunk_size >= 1,
            "--spike-factor must be > 1": self.spike_factor > 1
            and math.isfinite(self.spike_factor),
            "--window must be an integer >= 1": isinstance(self.window, int) and self.window >= 1,
            "--drift-threshold must be finite": math.isfinite(self.drift_threshold),
            "--max-grad-norm must be > 0": self.max_grad_norm is None
            or (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)),
            "top_k must be >= 1": self.top_k >= 1,
        }
        for message, ok in checks.items():
            if not ok:
                raise UsageError(message)
        start, stop = self.step_range
        if start is not None and stop is not None and stop <= start:
            raise UsageError(f"--steps {start}:{stop} is empty (the range is start <= step < stop)")


def parse_step_range(text: str | None) -> tuple[int | None, int | None]:
    """'A:B' -> (A, B) meaning A <= step < B; either side may be empty ('100:', ':50')."""
    if text is None or text.strip() == "":
        return None, None
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            value = int(start)
            return value, value + 1
        return (int(start) if start.strip() else None, int(stop) if stop.strip() else None)
    except ValueError:
        raise UsageError(f"--steps expects A:B (A <= step < B), got {text!r}") from None


# --- policies ---------------------------------------------------------------------------------
def own_policy(run: Run) -> Policy | None:
    """The run's own policy from its manifest, or None when the manifest's spec is not one of
    the catalogue (a custom policy recorded by a training script)."""
    spec = run.policy_spec
    if not spec:
        return None
    try:
        return get_policy(spec)
    except UsageError:
        return None


def resolve_policies(
    run: Run, specs: Sequence[str | Policy] | None
) -> tuple[list[Policy], int | None]:
    """-> (policies, index of the run's own one or None).

    No specs: the run's own policy, then the standard catalogue, deduplicated by canonical spec.
    With specs: exactly those (deduplicated), the own one marked where one matches.
    Unknown specs raise UsageError (exit 2).
    """
    own = own_policy(run)
    requested = list(specs) if specs else None
    if requested is None:
        candidates = ([own] if own is not None else []) + [
            get_policy(s) for s in STANDARD_CATALOGUE
        ]
    else:
        candidates = [get_policy(s) for s in requested]
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
        policy.required_fields(run.unit)  # level=token on a sequence run: a usage error, now
    return policies, own_index


# --- reading ----------------------------------------------------------------------------------
def check_step(step: Step, policies: Sequence[Policy], unit: str, where: str) -> None:
    """InputError (exit 3) for a field a policy needs that the step lacks."""
    for name in BASE_FIELDS:
        if name not in step.fields:
            raise InputError(f"{where}: step {step.step} has no {name!r}, which every policy needs")
    for policy in policies:
        missing = sorted(policy.required_fields(unit) - step.fields)
        if missing:
            names = ", ".join(repr(name) for name in missing)
            raise InputError(
                f"{where}: step {step.step} has no {names}, which policy {policy.spec!r} needs"
            )


def _read_arrays(step: Step, where: str) -> dict[str, torch.Tensor]:
    """The step's arrays a replay uses (CPU), with their lengths checked."""
    arrays = {name: step[name] for name in (*TOKEN_FIELDS, *SEQUENCE_FIELDS) if name in step.fields}
    for name in GEOMETRY_FIELDS:
        if name in step.fields:
            arrays[name] = step[name]
    length = arrays["logp"].reshape(-1).shape[0]
    for name in TOKEN_FIELDS:
        if name in arrays and arrays[name].reshape(-1).shape[0] != length:
            raise InputError(
                f"{where}: step {step.step}: {name} has {arrays[name].numel()} entries but logp "
                f"has {length} (mismatched array lengths)"
            )
    present = [n for n in SEQUENCE_FIELDS if n in arrays]
    if len(present) == 2 and arrays["group_id"].shape != arrays["reward"].shape:
        raise InputError(
            f"{where}: step {step.step}: group_id has {arrays['group_id'].numel()} entries but "
            f"reward has {arrays['reward'].numel()} (mismatched array lengths)"
        )
    return arrays


def _to_device(chunk: list[dict[str, torch.Tensor]], device: torch.device) -> None:
    """Moves a chunk's arrays to the device with one transfer per field (in place)."""
    if device.type == "cpu":
        return
    names = {name for arrays in chunk for name in arrays}
    for name in names:
        holders = [arrays for arrays in chunk if name in arrays]
        same_dtype = len({a[name].dtype for a in holders}) == 1
        if not same_dtype:
            for arrays in holders:
                arrays[name] = arrays[name].to(device)
            continue
        shapes = [a[name].shape for a in holders]
        flat = torch.cat([a[name].reshape(-1) for a in holders]).to(device, non_blocking=True)
        pieces = flat.split([int(np.prod(s)) if len(s) else 1 for s in shapes])
        for arrays, piece, shape in zip(holders, pieces, shapes, strict=True):
            arrays[name] = piece.reshape(shape)


def _batch(arrays: dict[str, torch.Tensor], unit: str) -> PolicyBatch:
    return PolicyBatch(
        logp=arrays["logp"].reshape(-1),
        logp_old=arrays["logp_old"],
        advantages=arrays["advantages"],
        mask=arrays["mask"],
        seq_id=arrays["seq_id"],
        group_id=arrays.get("group_id"),
        reward=arrays.get("reward"),
        logp_ref=arrays.get("logp_ref"),
        loss_weight=arrays.get("loss_weight"),
        loss_scale=arrays.get("loss_scale"),
        unit=unit,
    )


def _prepared(step: Step, arrays: dict[str, torch.Tensor], unit: str, where: str):
    try:
        return prepare(_batch(arrays, unit))
    except InputError as exc:
        raise InputError(f"{where}: step {step.step}: {exc}") from None


def _geometry(step: Step, arrays: dict[str, torch.Tensor], prep, where: str) -> StepGeometry:
    scale = step.scalars.get("unit_grad_sketch_scale")
    try:
        return StepGeometry.from_arrays(
            arrays.get("unit_grad_gram"), arrays.get("unit_grad_sketch"), scale, prep, step.step
        )
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None


def _chunks(steps: Iterable[Step], size: int) -> Iterator[list[Step]]:
    chunk: list[Step] = []
    for step in steps:
        chunk.append(step)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass
class _Stream:
    """What the streaming pass keeps: per-step scalars only."""

    step_numbers: np.ndarray
    metrics: np.ndarray
    """[S, P, M] float64, columns metrics.METRICS."""
    geometry: list[str]
    approximate: np.ndarray
    """[P] bool: some step's norm summed varying token coefficients into one sequence unit."""
    loss: np.ndarray
    grad_norm_covered: np.ndarray


def _stream(
    run: Run,
    policies: list[Policy],
    own_index: int | None,
    config: ReplayConfig,
    device: torch.device,
    progress: Callable[[int], None] | None,
) -> _Stream:
    where = str(run.path)
    numbers: list[int] = []
    blocks: list[np.ndarray] = []
    kinds: list[str] = []
    loss: list[float] = []
    covered: list[float] = []
    approximate = np.zeros(len(policies), dtype=bool)
    for chunk in _chunks(run.steps(), config.chunk_size):
        arrays = []
        for step in chunk:
            check_step(step, policies, run.unit, where)
            arrays.append(_read_arrays(step, where))
        _to_device(arrays, device)
        rows = []
        for step, step_arrays in zip(chunk, arrays, strict=True):
            prep = _prepared(step, step_arrays, run.unit, where)
            geometry = _geometry(step, step_arrays, prep, where)
            weights = [policy.weights(prep) for policy in policies]
            rows.append(step_metrics(prep, policies, weights, geometry, own_index))
            if geometry.per_sequence:
                coef = torch.stack([w.coef for w in weights])
                approximate |= varies_within_sequence(coef, prep).cpu().numpy()
            numbers.append(step.step)
            kinds.append(geometry.kind)
            loss.append(step.scalars.get("loss", math.nan))
            covered.append(step.scalars.get("grad_norm_covered", math.nan))
        blocks.append(torch.stack(rows).cpu().numpy())
        del arrays, rows
        if progress is not None:
            progress(len(chunk))
    metrics = (
        np.concatenate(blocks)
        if blocks
        else np.zeros((0, len(policies), len(COLUMN)), dtype=np.float64)
    )
    return _Stream(
        step_numbers=np.array(numbers, dtype=np.int64),
        metrics=metrics,
        geometry=kinds,
        approximate=approximate,
        loss=np.array(loss, dtype=np.float64),
        grad_norm_covered=np.array(covered, dtype=np.float64),
    )


# --- summaries --------------------------------------------------------------------------------
def _ratio(num: np.ndarray, den: np.ndarray, empty: float) -> np.ndarray:
    """num / den elementwise; `empty` where den is 0 (nothing to divide), NaN propagated."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = num / np.where(den == 0, 1.0, den)
    return np.where(den == 0, np.where(np.isfinite(num), empty, np.nan), out)


def _median_or_none(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else None


def _relative_error(replayed: np.ndarray, recorded: np.ndarray) -> float | None:
    ok = np.isfinite(replayed) & np.isfinite(recorded) & (recorded != 0)
    if not ok.any():
        return None
    return float(np.median(np.abs(replayed[ok] - recorded[ok]) / np.abs(recorded[ok])))


def _series(
    data: np.ndarray, steps: np.ndarray, kinds: list[str], config: ReplayConfig
) -> dict[str, np.ndarray]:
    """One policy's per-step arrays: data [S, M] -> STEP_KEYS -> [S]."""
    col = {name: data[:, i] for name, i in COLUMN.items()}
    update_norm = col["update_norm"]
    nonfinite = ~np.isfinite(update_norm) | (col["nonfinite_coefs"] > 0)
    # Norms from recorded geometry and coefficient norms (the proxy) are in different units
    # (on the example, ~13x apart): in a mixed run each step's spike history holds only steps
    # measured the same way, else every geometry step among proxy steps would be a "spike".
    measured = np.array([kind != "coef" for kind in kinds], dtype=bool)
    spike = np.zeros(update_norm.shape[0], dtype=bool)
    for same in (measured, ~measured):
        spike[same] = spike_flags(update_norm[same], factor=config.spike_factor)
    drift = drift_flags(col["net_push"], config.window, config.drift_threshold)
    if config.max_grad_norm is None:
        clip_scale = np.where(np.isfinite(update_norm), 1.0, np.nan)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            clip_scale = np.minimum(1.0, config.max_grad_norm / (update_norm + CLIP_EPS))
    tokens = col["tokens"].astype(np.int64)
    discarded = col["discarded"].astype(np.int64)
    return {
        "step": steps,
        "tokens": tokens,
        "discarded": discarded,
        "discard_frac": _ratio(discarded.astype(np.float64), tokens.astype(np.float64), 0.0),
        "clipped": col["clipped"].astype(np.int64),
        "geometry": np.array(kinds, dtype=object),
        "update_norm": update_norm,
        "clip_scale": clip_scale,
        "cosine_to_own": col["cosine_to_own"],
        "weight_max": col["weight_max"],
        "ess_frac": col["ess_frac"],
        "net_push": col["net_push"],
        "spike": spike,
        "nonfinite": nonfinite,
        "drift": drift,
        "collapsed": nonfinite | spike,
        "discarded_pos": col["discarded_pos"].astype(np.int64),
        "discarded_neg": col["discarded_neg"].astype(np.int64),
        "discarded_mass_frac": _ratio(col["discarded_mass"], col["is_mass"], 0.0),
        "objective": col["objective"],
        # kept for the summary, not reported per step
        "_discarded_mass": col["discarded_mass"],
        "_is_mass": col["is_mass"],
    }


def _summary(
    series: dict[str, np.ndarray],
    *,
    own: bool,
    observed_collapse: int | None,
    stream: _Stream,
    approximate: bool,
) -> dict[str, Any]:
    steps = series["step"]
    tokens, discarded = int(series["tokens"].sum()), int(series["discarded"].sum())
    # Median over steps of the per-step fraction: a ratio of sums would let one step whose
    # IS reference overflowed (r = exp(large)) outweigh every other step.
    mass_frac = _median_or_none(series["discarded_mass_frac"])
    norms = series["update_norm"]
    finite_norms = norms[np.isfinite(norms)]
    collapsed = steps[series["collapsed"]]
    flagged = steps[series["collapsed"] | series["drift"]]
    first_flag = int(flagged[0]) if flagged.size else None
    has_geometry = np.array([k != "coef" for k in stream.geometry], dtype=bool)
    fidelity = None
    loss_parity = None
    if own:
        if has_geometry.any():
            fidelity = _relative_error(norms[has_geometry], stream.grad_norm_covered[has_geometry])
        loss_parity = _relative_error(-series["objective"], stream.loss)
    return {
        "tokens": tokens,
        "discarded": discarded,
        "discard_frac": discarded / tokens if tokens else 0.0,
        "discarded_pos": int(series["discarded_pos"].sum()),
        "discarded_neg": int(series["discarded_neg"].sum()),
        "discarded_mass_frac": mass_frac,
        "clipped": int(series["clipped"].sum()),
        "update_norm_median": float(np.median(finite_norms)) if finite_norms.size else None,
        "update_norm_max": float(finite_norms.max()) if finite_norms.size else None,
        "cosine_to_own_median": _median_or_none(series["cosine_to_own"]),
        "spike_steps": [int(s) for s in steps[series["spike"]]],
        "drift_steps": [int(s) for s in steps[series["drift"]]],
        "collapsed_steps": [int(s) for s in collapsed],
        "first_collapse": int(collapsed[0]) if collapsed.size else None,
        "lead_steps": (
            observed_collapse - first_flag
            if observed_collapse is not None and first_flag is not None
            else None
        ),
        "fidelity": fidelity,
        "loss_parity": loss_parity,
        "update_norm_approximate": approximate,
    }


def _best_index(summaries: list[dict[str, Any]]) -> int | None:
    """Fewest collapsed steps, then fewest drift steps, then the lowest discarded_mass_frac."""
    if not summaries:
        return None

    def key(i: int) -> tuple[int, int, float]:
        s = summaries[i]
        mass = s["discarded_mass_frac"]
        return (
            len(s["collapsed_steps"]),
            len(s["drift_steps"]),
            mass if mass is not None and math.isfinite(mass) else math.inf,
        )

    return min(range(len(summaries)), key=key)


def _in_range(steps: np.ndarray, step_range: tuple[int | None, int | None]) -> np.ndarray:
    start, stop = step_range
    keep = np.ones(steps.shape[0], dtype=bool)
    if start is not None:
        keep &= steps >= start
    if stop is not None:
        keep &= steps < stop
    return keep


def _detail(
    run: Run,
    policies: list[Policy],
    flagged: dict[int, list[int]],
    device: torch.device,
    top_k: int,
) -> list[dict[int, list[dict[str, Any]]]]:
    """Second pass over the flagged steps: per policy, step -> top sequences."""
    where = str(run.path)
    out: list[dict[int, list[dict[str, Any]]]] = [{} for _ in policies]
    for number in sorted(flagged):
        step = run.step(number)
        arrays = _read_arrays(step, where)
        _to_device([arrays], device)
        prep = _prepared(step, arrays, run.unit, where)
        geometry = _geometry(step, arrays, prep, where)
        for i in flagged[number]:
            weights = policies[i].weights(prep)
            out[i][number] = top_sequences(
                prep,
                weights.coef,
                weights,
                geometry,
                arrays["seq_id"].reshape(-1),
                arrays.get("group_id"),
                arrays.get("reward"),
                k=top_k,
            )
    return out


def replay_run(
    run: Run,
    policies: Sequence[str | Policy] | None = None,
    *,
    config: ReplayConfig | None = None,
    progress: Callable[[int], None] | None = None,
) -> ReplayResult:
    """Replays every step of `run` under each policy (None: own + the standard catalogue).

    progress: called with the number of steps done after each chunk.
    """
    config = config or ReplayConfig()
    device = resolve_device(config.device)
    resolved, own_index = resolve_policies(run, policies)
    first = next(iter(run.step_headers()), None)
    if first is not None:  # fail fast, before any step is read
        check_step(first, resolved, run.unit, str(run.path))
    with warnings.catch_warnings():
        # Corrupt steps are skipped by the reader; `stabledrl inspect` reports them.
        warnings.simplefilter("ignore", RunIntegrityWarning)
        stream = _stream(run, resolved, own_index, config, device, progress)
        observed = observe(run).to_dict()
    collapse = observed.get("first_reward_collapse")
    series = [_series(stream.metrics[:, i, :], stream.step_numbers, stream.geometry, config)
              for i in range(len(resolved))]  # fmt: skip
    summaries = [
        _summary(
            s,
            own=(i == own_index),
            observed_collapse=collapse,
            stream=stream,
            approximate=bool(stream.approximate[i]),
        )
        for i, s in enumerate(series)
    ]
    best = _best_index(summaries)
    keep = _in_range(stream.step_numbers, config.step_range)
    details: list[dict[int, list[dict[str, Any]]]] = [{} for _ in resolved]
    if config.detail:
        flagged: dict[int, list[int]] = {}
        for i, s in enumerate(series):
            hits = keep & (s["collapsed"] | s["drift"])
            for number in s["step"][hits]:
                flagged.setdefault(int(number), []).append(i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RunIntegrityWarning)
            details = _detail(run, resolved, flagged, device, config.top_k)
    results = []
    for i, policy in enumerate(resolved):
        reported = {k: v[keep] for k, v in series[i].items() if not k.startswith("_")}
        results.append(
            PolicyResult(
                name=policy.name,
                spec=policy.spec,
                params=policy.params,
                own=(i == own_index),
                best=(i == best),
                summary=summaries[i],
                series=reported,
                detail=details[i],
            )
        )
    kinds = set(stream.geometry)
    coverage = float(np.mean([k != "coef" for k in stream.geometry])) if stream.geometry else 0.0
    return ReplayResult(
        run=str(run.path),
        steps=int(stream.step_numbers.shape[0]),
        geometry=kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "coef"),
        geometry_coverage=coverage,
        policies=results,
        observed=observed,
        run_policy_spec=run.policy_spec,
        step_range=config.step_range,
    )


def replay(
    run: str | os.PathLike[str] | Run,
    policies: Sequence[str | Policy] | None = None,
    *,
    device: str = "auto",
    **options: Any,
) -> ReplayResult:
    """`stabledrl replay` as a function: the same results as the CLI, as Python objects.

    run: a run directory (or an opened Run); policies: specs (None: the run's own policy plus
    the standard catalogue); options: the other `ReplayConfig` fields (chunk_size,
    spike_factor, window, drift_threshold, max_grad_norm, step_range, detail).
    `.to_json()` of the result prints the JSON contract.
    """
    opened = run if isinstance(run, Run) else open_run(run)
    try:
        config = ReplayConfig(device=device, **options)
    except TypeError as exc:
        raise UsageError(f"replay: {exc}") from None
    return replay_run(opened, policies, config=config)
