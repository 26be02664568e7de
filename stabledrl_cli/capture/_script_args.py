"""The Recorder's arguments as `log_policy_batch` takes them from a script: its keywords and
recorder_kwargs checked by name, its policy against record's --policy and the run's."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from stabledrl_cli.errors import UsageError, warn

if TYPE_CHECKING:
    from stabledrl_cli.dump._policy import PolicyLike


RECORD_SETS = ("path", "policy", "overwrite")
"""The Recorder's arguments that `record` gives it itself: the run directory (--out), the
policy (log_policy_batch's `policy`, else --policy) and overwrite (--force)."""


def refuse_unknown(given: Iterable[object], method: str, what: str) -> None:
    """UsageError naming the first of `given` that is no keyword of `Recorder.<method>` a
    script may pass (a misspelt field: `logpp=`; `refuse_unknown_keywords`), or one that
    record sets itself."""
    import inspect

    from stabledrl_cli.dump._recorder_args import refuse_unknown_keywords
    from stabledrl_cli.dump._writer import Recorder

    parameters = inspect.signature(getattr(Recorder, method)).parameters
    taken = [n for n in parameters if n not in ("self", "step", *RECORD_SETS)]
    first = min(set(given).difference(taken), default=None, key=str)
    if first in RECORD_SETS:
        raise UsageError(
            f"{first!r} is not {what} (record sets it: --out, log_policy_batch's policy or "
            "--policy, --force)"
        )
    refuse_unknown_keywords(given, taken, what)


def spec_of(policy: str | PolicyLike) -> str:
    """The spec a policy argument is given as."""
    return policy if isinstance(policy, str) else policy.spec


def policies_differ(policy: str | PolicyLike, other: str | PolicyLike) -> bool:
    """Whether two policies are other losses (`dapo` and `dapo:eps_high=0.28` are one). Specs
    that do not resolve are left to the Recorder's refusal: not said to differ."""
    from stabledrl_cli.policies import resolve_spec

    if spec_of(policy) == spec_of(other):
        return False
    try:
        (entry, config), (theirs, their_config) = (
            resolve_spec(spec_of(policy)),
            resolve_spec(spec_of(other)),
        )
    except UsageError:
        return False
    return (entry.name, config) != (theirs.name, their_config)


def warn_policies_differ(scripts: str | PolicyLike, given: str) -> None:
    """Warns when the script's `log_policy_batch(policy=...)` names another policy than
    `record --policy` (`$STABLEDRL_POLICY`): the script's is recorded."""
    if policies_differ(scripts, given):
        ours = spec_of(scripts)
        warn(
            f"stabledrl: warning: log_policy_batch(policy=...) names {ours}, record --policy "
            f"{given}: the run records the script's, {ours}\n"
        )


def warn_policy_changed(step: int, policy: str | PolicyLike, runs: str | PolicyLike) -> None:
    """Warns that `log_policy_batch(step, policy=...)` names another policy than the run's,
    the one its first batch named (a KL coefficient annealed in the spec, a loss switched
    mid-run): the run keeps its one policy, which replay scores every step with."""
    warn(
        f"stabledrl: warning: log_policy_batch({step}) names the policy {spec_of(policy)}, "
        f"where the run's, its first batch's, is {spec_of(runs)}: a run has one policy, and "
        "replay scores every step with it as the run's own\n"
    )
