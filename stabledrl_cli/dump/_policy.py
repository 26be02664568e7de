"""The manifest's `policy` entry: {spec, name, params}, from what a Recorder is given.

`Recorder(policy=...)` takes either a spec string in the one grammar of `stabledrl_cli.spec`
(`"dapo:eps_high=0.28"`, optionally with more parameters in `policy_params`; a key given in
both is refused; a numpy number or bool, read from an array, as the value it holds:
`plain_number`; text as the spec's own text reads: "0.1" is 0.1, "true" True), or any object
with `.name`, `.spec` and `.params` (a `PolicyLike`, e.g. a catalogue policy): the manifest
then stores exactly that object's spec, name and params. The stored spec is canonical text
(`spec.format_spec`): keys sorted, values in shortest form.
`own_policy_reads`: what a step must hold for the replay of the run's own policy (a Recorder
refuses, as it is made or at the step, a run whose replay would refuse its policy), and the
setting of that policy that reads each step's `micro_batch`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from stabledrl_cli.dump._arguments import json_checked
from stabledrl_cli.errors import UsageError
from stabledrl_cli.policies._registry import REGISTRY, resolve_spec
from stabledrl_cli.spec import (
    SpecValue,
    format_spec,
    plain_number,
    spec_float,
    spec_int,
    split_spec,
)
from stabledrl_cli.vocab import Unit


@runtime_checkable
class PolicyLike(Protocol):
    """A resolved policy, as the catalogue's are: its name, canonical spec and parameters."""

    @property
    def name(self) -> str: ...

    @property
    def spec(self) -> str: ...

    @property
    def params(self) -> Mapping[str, Any]: ...


def _typed(text: str) -> SpecValue:
    """A spec value's text as the JSON value it reads as: bool, int, finite float, else str."""
    if text in ("true", "false"):
        return text == "true"
    for parse in (spec_int, spec_float):
        try:
            value = parse(text)
        except ValueError:
            continue
        if math.isfinite(value):
            return value
    return text


def policy_entry(
    policy: str | PolicyLike, policy_params: Mapping[str, SpecValue] | None
) -> dict[str, Any]:
    """The manifest's policy entry; UsageError for a bad spec, a bad parameter, or a key given
    both in the spec string and in `policy_params`. A parameter given as None is left at its
    default, as the spec leaves it (`format_spec`): neither is written."""
    if isinstance(policy, str):
        name, raw = split_spec(policy)
        params: dict[str, Any] = {key: _typed(text) for key, text in raw.items()}
        given = (policy_params or {}).items()
        # text as the spec's own text reads ("0.1" is 0.1), so params say what the spec does
        policy_params = {
            k: _typed(v) if isinstance(v, str) else plain_number(v)
            for k, v in given
            if v is not None
        }
        twice = sorted(set(params) & set(policy_params))
        if twice:
            raise UsageError(
                f"policy parameter {twice[0]!r} is given both in the spec {policy!r} and in "
                "policy_params; give it once"
            )
        params.update(policy_params)
        spec = format_spec(name, params)
    elif isinstance(policy, PolicyLike):
        if policy_params:
            raise UsageError(
                "policy_params go with a spec string; a policy object carries its own params"
            )
        name, spec, params = policy.name, policy.spec, dict(policy.params)
        if not isinstance(name, str) or not isinstance(spec, str):
            raise UsageError("a policy object's name and spec must be strings")
    else:
        raise UsageError(
            "policy must be a spec string such as 'dapo:eps_high=0.28' or an object with "
            f".name, .spec and .params, got {type(policy).__name__}"
        )
    return {
        "spec": spec,
        "name": name,
        "params": json_checked(params, "policy_params"),
    }


def same_policy(first: str | None, second: str | None) -> bool:
    """Whether two manifests' specs name one policy: the same text, or catalogue specs of one
    canonical form (`grpo:eps_low=0.2` is `grpo` given its default; `dapo` is
    `dapo:eps_high=0.28`), as `replay` tells the run's own policy. A spec the catalogue does
    not resolve (a custom policy) is the same only as its own text."""
    if first == second:
        return True
    if first is None or second is None:
        return False
    try:
        canonical = [entry.spec_of(config) for entry, config in map(resolve_spec, (first, second))]
    except UsageError:
        return False
    return canonical[0] == canonical[1]


class _Config(Protocol):
    """A catalogue policy's configuration (`policies._config.BaseConfig`, which dump does not
    import: the flow stays one-way), as far as the Recorder reads it."""

    def required_fields(self, unit: Unit = "token") -> set[str]: ...


def _replayed_config(spec: str | None) -> _Config | None:
    """The configuration of the run's own policy `spec` as the catalogue replays it: None when
    the run names no policy, or one the catalogue does not replay as the run's own (a custom
    one, a key it does not know). UsageError for a catalogue policy given a bad value."""
    if spec is None:
        return None
    name, raw = split_spec(spec)
    entry = REGISTRY.get(name)
    if entry is None or not set(raw).issubset(entry.keys):
        return None
    return resolve_spec(spec)[1]


def own_policy_reads(spec: str | None, unit: Unit) -> tuple[frozenset[str], str | None]:
    """What the replay of a run's own policy `spec` reads of each step, its spec resolved once
    (no torch): the step fields beyond logp, logp_old, advantages, mask and seq_id it needs
    (`BaseConfig.required_fields`), and the setting with which it reads each step's
    `micro_batch` (`_micro_batch_setting`). Nothing when the run names no policy, or one the
    catalogue does not replay as the run's own (a custom one, a key it does not know).
    UsageError, naming the policy, for a catalogue policy given a bad value (grpo:eps_low=-1,
    refused as replay's -p refuses it) or that cannot act on `unit` units
    (stabledrl:level=token on a sequence run)."""
    config = _replayed_config(spec)  # a bad value of a key the catalogue knows: refused
    if config is None:
        return frozenset(), None
    try:
        fields = frozenset(config.required_fields(unit))
    except UsageError as exc:
        raise UsageError(f"policy {spec!r}: {exc}") from None
    return fields, _micro_batch_setting(config)


MICRO_BATCH_SETTINGS = (
    ("agg", "micro-token-mean"),  # each micro-batch's token mean, averaged (TRL's bnpo, d1)
    ("norm", "micro"),  # stabledrl: one softmax a micro-batch
    ("cov", "micro"),  # kl-cov: each micro-batch's own covariance (verl's kl_cov)
    ("mean", "micro"),  # gmpo: each micro-batch's own mean (verl's geo_mean)
)
"""The (key, value) settings with which a policy reads each step's recorded `micro_batch`."""


def _micro_batch_setting(config: _Config) -> str | None:
    """The `key=value` of a policy's `config` that reads each step's `micro_batch`
    (`MICRO_BATCH_SETTINGS`, or `agg=seq-mean-token-sum-norm` without `max_len`, whose horizon
    is each micro-batch's longest response): a step without it is replayed as one micro-batch.
    None for a policy that reads none."""
    if getattr(config, "agg", None) == "seq-mean-token-sum-norm":
        return None if getattr(config, "max_len", None) else "agg=seq-mean-token-sum-norm"
    for key, value in MICRO_BATCH_SETTINGS:
        if getattr(config, key, None) == value:
            return f"{key}={value}"
    return None
