"""The Recorder's arguments as `log_policy_batch` takes them from a script: its keywords and
recorder_kwargs checked by name, its policy against record's --policy."""

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


def warn_policies_differ(scripts: str | PolicyLike, given: str) -> None:
    """Warns when the script's `log_policy_batch(policy=...)` names another policy than
    `record --policy` (`$STABLEDRL_POLICY`): the script's is recorded. Specs that do not
    resolve are left to the Recorder's refusal."""
    from stabledrl_cli.policies import resolve_spec

    ours = scripts if isinstance(scripts, str) else scripts.spec
    try:
        (entry, config), (other, other_config) = resolve_spec(ours), resolve_spec(given)
    except UsageError:
        return
    if (entry.name, config) != (other.name, other_config):
        warn(
            f"stabledrl: warning: log_policy_batch(policy=...) names {ours}, record --policy "
            f"{given}: the run records the script's, {ours}\n"
        )
