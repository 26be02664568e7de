"""dump/ is layered: no module imports one that imports it back, none imports the package face,
and each imports on its own in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

DUMP = Path(__file__).resolve().parents[1] / "stabledrl_cli" / "dump"
MODULES = sorted(p.stem for p in DUMP.glob("*.py"))


def _imports(module: str) -> set[str]:
    """The stabledrl_cli modules that dump module `module` imports (at any depth of its code)."""
    tree = ast.parse((DUMP / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("stabledrl_cli")}


def _dump_edges() -> dict[str, set[str]]:
    prefix = "stabledrl_cli.dump."
    return {
        module: {
            name[len(prefix) :].split(".")[0]
            for name in _imports(module)
            if name.startswith(prefix) and name[len(prefix) :].split(".")[0] in MODULES
        }
        for module in MODULES
    }


def test_no_import_cycle_inside_dump():
    edges = _dump_edges()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges[module]):
            assert state.get(target) != "open", f"import cycle: {' -> '.join([*path, target])}"
            if target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in MODULES:
        if module not in state:
            visit(module, [module])


def test_dump_imports_only_the_ground_floor_outside_itself():
    """And the catalogue's declarations (`policies._registry`: each policy's config and the
    fields it needs, no torch), against which a Recorder checks the steps of its own policy:
    they import nothing of dump, so the flow stays one-way."""
    allowed = {
        "_atomic", "_batch_inputs", "_child_end", "_json", "_lazy", "_regular", "_repr",
        "_run_env", "_shared_setting", "_sigterm", "_url", "_version", "errors", "spec",
        "vocab", "dump",
    }  # fmt: skip
    declarations = "stabledrl_cli.policies._registry"
    for module in MODULES:
        for name in _imports(module):
            parts = name.split(".")
            if name.startswith(declarations):
                continue
            assert len(parts) > 1 and parts[1] in allowed, f"{module} imports {name}"


def test_the_catalogues_declarations_import_nothing_of_dump_and_no_torch():
    probe = (
        "import sys, stabledrl_cli.policies._registry as r; r.resolve_spec('grpo:beta=0.1'); "
        "print(sorted(m for m in sys.modules if m.startswith(('torch', 'stabledrl_cli.dump'))))"
    )
    found = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert found.stdout.strip() == "[]"


_FRESH_IMPORTS = """
import importlib, sys
for module in sys.argv[1:]:
    for name in [n for n in sys.modules if n.startswith("stabledrl_cli.dump")]:
        del sys.modules[name]
    importlib.import_module(module)
"""


def test_each_module_imports_first_and_alone():
    """Each dump module imported before any other dump module (the package face itself is
    loaded first by Python, so one interpreter serves all)."""
    names = [
        "stabledrl_cli.dump" if module == "__init__" else f"stabledrl_cli.dump.{module}"
        for module in MODULES
    ]
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH_IMPORTS, *names], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
