"""Put on a child's PYTHONPATH by `stabledrl record -- CMD`: installs the optimizer hooks
(`stabledrl_cli.capture.optimizer_hooks`) the moment the child finishes importing torch, and
their FSDP1 clip wrapper the moment it finishes importing torch.distributed.fsdp, and keeps
them out of torch.compile's code once it imports torch._dynamo (all unless
STABLEDRL_OPTIMIZER_HOOKS is "0": `--no-optimizer-hooks`), and an audit hook that makes an
uncaught stabledrl error one line (`stabledrl_cli.capture._uncaught.uncaught_error`), and a
sys.exit that does the same for one a framework caught, reported and exited 1 on, then runs
the sitecustomize module this one hides, if there is one.

Why an audit hook, not a wrapper of sys.excepthook: a training script may replace
sys.excepthook (`rich.traceback.install()`), and a wrapper installed at start-up would then
never run: the error got the script's traceback and Python's exit code 1. Python raises the
audit event `sys.excepthook` for every uncaught exception, before it calls whatever
sys.excepthook is then, and skips that call when an audit hook raises RuntimeError (the
`sys.excepthook` event in the `sys` module's documentation); an audit hook cannot be removed.
So the tool's error is reported whatever the script did to sys.excepthook, and every other
exception goes to the script's own hook as before. The cost is one Python call per audit
event of the process (an `id()`, an import, an `open`...), which returns at once.

A framework may catch the tool's error itself, print its own report and end the process with
`sys.exit(1)` inside its `except` block (hydra's `@hydra.main`, which verl's entry point
uses): no exception is uncaught, and the audit hook never hears of it. So `sys.exit` is
wrapped too, and so are site's `exit` and `quit` builtins, which a script may call instead:
called with 1 in the main thread while a stabledrl error is being handled, it raises
`_uncaught.reported_exit`'s SystemExit, which reports that error as if uncaught once the
interpreter reads its code to end the process (nothing when the script catches that
SystemExit and goes on). Every other call is Python's own `sys.exit`. A `raise SystemExit(1)`
is not seen.

The run that the process records (its optimizer hooks, `log_policy_batch`) is closed by an
exit handler registered here, at start-up: atexit runs handlers last-registered first, so
this one runs after every handler the command registers, and a step that one of them logs
(a script's handler registered before the run opened, say) is recorded before the run is
closed.

A process that its launcher started as a rank (RANK and WORLD_SIZE set before Python starts:
torchrun, accelerate, deepspeed) tells `record` so at start-up, before the script runs, and a
process that takes its rank later (torch.multiprocessing.spawn's, from its process group) as
it opens the run (`bootstrap.open_recorder`): `record` checks that each rank it launched recorded a
step, and leaves alone the ranks that other nodes run.

It imports nothing heavy: a child that never imports torch never imports torch or stabledrl
because of it. A child interpreter that cannot import stabledrl warns once, when it imports
torch, and trains unrecorded.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:  # its name in the package, which the type checker reads
    from stabledrl_cli.capture._site.stabledrl_ranks import rank_file_name
else:  # its name on the command's path, beside this module (stabledrl_cli may be no import)
    from stabledrl_ranks import rank_file_name

_HERE = os.path.dirname(os.path.abspath(__file__))
_FSDP1 = "torch.distributed.fsdp"
_DYNAMO = "torch._dynamo"
_ERRORS = "stabledrl_cli.errors"
_BOOTSTRAP = "stabledrl_cli.capture.bootstrap"
_ENV_OPTIMIZER_HOOKS = "STABLEDRL_OPTIMIZER_HOOKS"  # bootstrap.ENV_OPTIMIZER_HOOKS, unimported
_ENV_RANKS_DIR = "STABLEDRL_RANKS_DIR"  # bootstrap.ENV_RANKS_DIR, unimported
_CHILD_FAILED = "torch.distributed.elastic.multiprocessing.errors.ChildFailedError"  # bootstrap's


def _install_hooks(_torch: ModuleType) -> None:
    try:
        from stabledrl_cli.capture import _clip_records, optimizer_hooks
    except Exception as exc:
        # errors.warn, which this Python cannot import: no stderr (`2>&-`) breaks no training
        with contextlib.suppress(AttributeError, OSError, ValueError):
            sys.stderr.write(
                f"stabledrl: warning: optimizer hooks off, this Python ({sys.executable}) "
                f"cannot import stabledrl_cli: {exc}\n"
            )
        return
    optimizer_hooks.install()
    _when_imported(_FSDP1, _clip_records.wrap_fsdp)
    _when_imported(_DYNAMO, optimizer_hooks.compile_safe)


class _ImportWatch(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when module `name` is imported, it lets the other finders find it
    and calls `then(module)` once the module has executed. One shot."""

    def __init__(self, name: str, then: Callable[[ModuleType], None]) -> None:
        self.name, self.then = name, then

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        loader = spec.loader if spec is not None else None
        if loader is None:
            return spec
        exec_module, then = loader.exec_module, self.then

        def exec_then_call(module: ModuleType) -> None:
            exec_module(module)
            then(module)

        loader.exec_module = exec_then_call  # type: ignore[method-assign]
        return spec


def _when_imported(name: str, then: Callable[[ModuleType], None]) -> None:
    """`then(module)` now if the process has imported module `name`, else once it does."""
    module = sys.modules.get(name)
    if module is not None:
        then(module)
    else:
        sys.meta_path.insert(0, _ImportWatch(name, then))


def _chain() -> None:
    """Imports the sitecustomize that this one hides on sys.path, as Python would have."""
    me = sys.modules.pop(__name__)
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    try:
        importlib.import_module("sitecustomize")
    except ImportError as exc:
        if exc.name != "sitecustomize":
            raise
    finally:
        sys.path[:] = saved
        sys.modules.setdefault(__name__, me)


class _Reported(RuntimeError):
    """Raised from the audit hook: Python then skips sys.excepthook (the error's line is out)."""


def _on_uncaught(event: str, args: tuple[object, ...]) -> None:
    """The audit hook (module docstring): an uncaught exception goes to
    `_uncaught.uncaught_error` when it can be the tool's (stabledrl is imported) or is
    torchrun's report of failed ranks (its process imports stabledrl only with the optimizer
    hooks on); sys.excepthook is skipped when that says so. Called for every audit event of
    the process: any other returns at once."""
    if event != "sys.excepthook":
        return
    value = args[2]
    kind = type(value)
    name = f"{kind.__module__}.{kind.__qualname__}"
    if _ERRORS not in sys.modules and name != _CHILD_FAILED:  # not the tool's error
        return
    try:
        from stabledrl_cli.capture._uncaught import uncaught_error

        reported = isinstance(value, BaseException) and uncaught_error(value)
    except Exception:  # never hide the exception behind one of ours
        return
    if reported:
        raise _Reported


_python_exit = sys.exit


def _exit(status: str | int | None = None, /) -> NoReturn:
    """sys.exit in this process (module docstring): Python's, unless it ends the process with
    1 while a stabledrl error is being handled."""
    handled = sys.exc_info()[1]
    if handled is not None and _ERRORS in sys.modules:  # else it cannot be the tool's error
        try:
            from stabledrl_cli.capture._uncaught import reported_exit

            exiting = reported_exit(handled, status)
        except Exception:  # never hide the exit behind an error of ours
            exiting = None
        if exiting is not None:
            raise exiting
    _python_exit(status)


def _wrap_quitter(quitter: object) -> object:
    """A copy of site's `exit` or `quit` builtin (a `Quitter`) whose call is `_exit`'s, after
    closing stdin as Python's does (for shells that listen to it); `quitter` itself when it is
    not site's (python -S, or a script replaced it)."""
    kind = type(quitter)
    if kind.__name__ != "Quitter" or kind.__module__ != "_sitebuiltins":
        return quitter

    class _Quitter(kind):  # type: ignore[misc,valid-type]
        def __call__(self, code: str | int | None = None) -> NoReturn:
            with contextlib.suppress(Exception):
                sys.stdin.close()
            _exit(code)

    wrapped = _Quitter.__new__(_Quitter)
    wrapped.__dict__.update(vars(quitter))
    return wrapped


def _announce_rank(rank: object, world_size: object) -> None:
    """Tells `record` that this process runs as rank `rank` of `world_size` (decimal numbers;
    anything else is no rank, and is left out): an empty file in record's $STABLEDRL_RANKS_DIR
    (stabledrl_ranks.py). A child of the process that inherits its environment (a dataloader
    worker) announces the same rank again, which changes nothing. Never fails."""
    directory = os.environ.get(_ENV_RANKS_DIR)
    name = rank_file_name(rank, world_size)
    if not directory or name is None:
        return
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL  # never opens what is there (a FIFO)
    with contextlib.suppress(OSError):
        os.close(os.open(os.path.join(directory, name), flags, 0o600))


def _bootstrap_imported(bootstrap: ModuleType) -> None:
    bootstrap.closed_last()
    bootstrap.ranks_announced_by(_announce_rank)


def _close_run() -> None:
    """The exit handler that closes the run (`bootstrap.close`), if this process opened one:
    registered first, it runs after every exit handler of the command (module docstring)."""
    bootstrap = sys.modules.get(_BOOTSTRAP)
    if bootstrap is not None:
        bootstrap.close()


if os.environ.get(_ENV_OPTIMIZER_HOOKS) != "0":
    _when_imported("torch", _install_hooks)
sys.addaudithook(_on_uncaught)
sys.exit = _exit
for _name in ("exit", "quit"):
    if hasattr(builtins, _name):
        setattr(builtins, _name, _wrap_quitter(getattr(builtins, _name)))
atexit.register(_close_run)
if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # set by its launcher (torchrun)
    _announce_rank(os.environ["RANK"], os.environ["WORLD_SIZE"])
_when_imported(_BOOTSTRAP, _bootstrap_imported)
_chain()
