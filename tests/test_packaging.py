"""How the package installs for a user who does not work in its checkout: what pyproject.toml
ships, and the install commands the tool prints for a missing extra."""

from __future__ import annotations

import importlib.metadata
import re
import sys
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest

from stabledrl_cli import errors
from stabledrl_cli.errors import MissingExtraError, install_command
from stabledrl_cli.integrations._trl_version import check_trl_version
from stabledrl_cli.integrations.verl import check_verl_version
from stabledrl_cli.replay.plot import require_matplotlib
from stabledrl_cli.replay.ray_engine import require_ray

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11")

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "stabledrl_cli"


def _pyproject() -> dict[str, Any]:
    with (REPO / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)


def _absent_distribution(name: str) -> str:
    raise importlib.metadata.PackageNotFoundError(name)


@pytest.mark.parametrize(
    ("extra", "module", "check"),
    [
        ("plot", "matplotlib", require_matplotlib),
        ("ray", "ray", require_ray),
        ("trl", "trl", check_trl_version),
        ("verl", "verl", check_verl_version),
    ],
)
def test_a_missing_extra_names_a_command_that_works_in_any_directory(
    extra: str, module: str, check: Callable[[], object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pip install -e '.[plot]'` only works in the checkout's root (elsewhere pip finds no
    project, or installs the project of the directory the user trains in), and `pip install
    'stabledrl[plot]'` with another environment's pip looks the unpublished name up on a
    package index: the message names the extra's own pinned packages, pyproject.toml's."""
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setattr(importlib.metadata, "version", _absent_distribution)
    with pytest.raises(MissingExtraError) as error:
        check()
    command = str(error.value).rpartition(": ")[2]
    assert command.startswith("pip install '")
    named = {_requirement(part.strip("'")) for part in command.split()[2:]}
    pinned = _pyproject()["project"]["optional-dependencies"][extra]
    assert named == {_requirement(line) for line in pinned}


def _requirement(text: str) -> tuple[str, frozenset[str]]:
    """A requirement's name and its version bounds, in any order."""
    name, bounds = re.fullmatch(r"([A-Za-z0-9_.-]+)(.*)", text).groups()  # type: ignore[union-attr]
    return name, frozenset(bounds.replace(" ", "").split(","))


def test_a_checkout_run_without_installing_it_names_itself(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A checkout run without installing it has no metadata to read: the message said `pip
    install 'stabledrl[plot]'`, which looks the unpublished name up on an index. It names the
    checkout with the extra, by its path (from any directory); the extra by name only outside
    any checkout."""
    monkeypatch.setattr(importlib.metadata, "requires", _absent_distribution)
    assert install_command("plot") == f"pip install -e '{REPO}[plot]'"
    monkeypatch.setattr(errors, "__file__", str(tmp_path / "stabledrl_cli" / "errors.py"))
    assert install_command("plot") == "pip install 'stabledrl[plot]'"


def test_package_data_ships_every_file_outside_a_package() -> None:
    """setuptools ships a package's .py files by itself; any other file under stabledrl_cli/
    (py.typed, the files of capture/_site/, which is no package) only when a package-data
    glob names it, and an installed wheel would lack it."""
    globs = _pyproject()["tool"]["setuptools"]["package-data"]["stabledrl_cli"]
    unshipped = [
        name
        for path in PACKAGE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
        if path.suffix != ".py" or not (path.parent / "__init__.py").is_file()
        for name in [path.relative_to(PACKAGE).as_posix()]
        if not any(fnmatch(name, glob) for glob in globs)
    ]
    assert unshipped == []


def test_the_declared_license_ships_its_text() -> None:
    """Apache-2.0 asks that its text go with every copy: the wheel and the sdist carry the
    files `license-files` names (each must exist, or the build fails)."""
    project = _pyproject()["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert "Apache License\n" in text and "Version 2.0, January 2004" in text


def test_the_version_has_one_source() -> None:
    """The distribution's version (importlib.metadata, pip) is read from the one the tool prints
    and writes into each run's manifest, so the two cannot differ."""
    pyproject = _pyproject()
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    version = pyproject["tool"]["setuptools"]["dynamic"]["version"]
    assert version == {"attr": "stabledrl_cli._version.__version__"}


def test_the_sdist_carries_every_folder_the_tests_read() -> None:
    """setuptools alone puts tests/test*.py in the sdist but not their helpers (conftest.py,
    _cli.py) nor fixtures/: 115 test modules of an unpacked sdist failed to collect. Each
    top-level folder a test reads is grafted by MANIFEST.in."""
    grafted = re.findall(r"^graft (\S+)$", (REPO / "MANIFEST.in").read_text(), re.M)
    read = {
        name
        for test in (REPO / "tests").glob("*.py")
        for name in re.findall(r'(?:ROOT|REPO|parents\[1\]) / "([^"]+)"', test.read_text())
        if (REPO / name).is_dir() and name != PACKAGE.name
    }
    assert read and read <= {*grafted}, read - {*grafted}


def test_the_torch_floor_is_a_release_the_optimizer_hooks_run_on() -> None:
    """With torch 2.2.2 (the old floor) `record -- CMD` recorded no step: the hooks could not
    import torch.amp.grad_scaler; with 2.3.1 they stopped on `_foreach_norm(..., dtype=)`. 2.4.1
    records, replays and branches. The README's torch range is pyproject's."""
    torch = [d for d in _pyproject()["project"]["dependencies"] if d.startswith("torch")]
    assert torch == ["torch>=2.4,<3"]
    assert "have a torch in `>=2.4,<3`" in (REPO / "README.md").read_text()


def test_the_docs_install_an_extra_by_its_name_alone() -> None:
    """The README's verl line read `pip install -c <(echo torch==2.13.0) 'stabledrl[verl]'`:
    the constraint swapped a user's torch 2.4.1 for 2.13.0 (pip --dry-run), as it would the
    torch 2.11 of a verl job. Each extra the docs install is `pip install 'stabledrl[X]'`."""
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    commands = [
        (doc.name, " ".join(found.group(0).split()), found.group(1))
        for doc in docs
        for found in re.finditer(
            r"pip install(?:(?!pip install)[^`])*?'stabledrl\[(\w+)\]'", doc.read_text()
        )
    ]
    extras = _pyproject()["project"]["optional-dependencies"]
    assert commands and all(extra in extras for _, _, extra in commands)
    assert [c for c in commands if c[1] != f"pip install 'stabledrl[{c[2]}]'"] == []
