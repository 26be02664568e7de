"""The documentation shows what the tool does: every relative link of README.md, docs/*.md and
fixtures/README.md leads to a file (and a heading) of the repository, and each shown session
that runs on the committed fixtures alone (`$ stabledrl ...` and what it printed, at 80
columns) prints that today. A shown line `...` stands for lines left out; elsewhere the lines
shown are the command's lines, in order, each on stdout or stderr, and a session that does
not end with `...` shows each stream to its end."""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stabledrl_cli.cli.app import COMMANDS, ROOT_EXAMPLES, app

ROOT = Path(__file__).resolve().parents[1]

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "fixtures" / "README.md"]
ELIDED = "..."
PROGRESS = re.compile(r"^\w[\w ]*: \d+/\d+ \(\d+%\)$")
"""A progress line on stderr (`replaying: 160/160 (100%)`), which no session shows."""


@dataclass
class Command:
    """One `$ ...` line of a session: the arguments after `stabledrl`, or the exit code
    that `$ echo $?` shows for the command before it."""

    args: list[str]
    shown: list[str] = field(default_factory=list)


def heading_anchor(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {
        heading_anchor(found.group(1))
        for found in re.finditer(r"^#+\s+(.*)$", page.read_text(encoding="utf-8"), re.M)
    }


def prose(page: Path) -> str:
    """The page without its fenced code blocks."""
    return re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_relative_link_leads_to_a_file_and_heading_of_the_repository(page: Path) -> None:
    broken = []
    for link in re.findall(r"\]\(([^)\s]+)\)", prose(page)):
        if re.match(r"[a-z]+:", link):
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        outside = ROOT not in target.parents or not target.exists()
        if outside or (anchor and target.suffix == ".md" and anchor not in anchors(target)):
            broken.append(link)
    assert not broken, f"{page.name}: {broken}"


def sessions(page: Path) -> list[list[Command]]:
    """Each fenced block of `page` whose lines begin with `$ `: its commands and the lines
    each printed. A block that reads a run an earlier block of the page wrote begins with
    that block's command, its lines left out."""
    found = []
    writers: dict[str, Command] = {}
    for block in re.findall(r"```\n(\$ .*?)\n```", page.read_text(encoding="utf-8"), re.S):
        commands: list[Command] = []
        lines = iter(block.splitlines())
        for line in lines:
            if not line.startswith("$ "):
                commands[-1].shown.append(line.rstrip())
                continue
            text = line[2:]
            while text.endswith("\\"):
                text = text[:-1] + next(lines)
            runnable = text.startswith("stabledrl ") or text == "echo $?"
            commands.append(Command(shlex.split(text) if runnable else [text]))
        earlier = [
            writers[arg] for command in commands[:1] for arg in command.args if arg in writers
        ]
        for command in commands:
            if "--out" in command.args:
                writers[command.args[command.args.index("--out") + 1]] = command
        found.append([Command(writer.args, [ELIDED]) for writer in earlier] + commands)
    return found


def runs_on_the_fixtures_alone(session: list[Command]) -> bool:
    """Every command is `stabledrl` (or `echo $?`), none trains, and every run it reads is
    a fixture or one an earlier command of the session wrote."""
    written = set()
    for command in session:
        if command.args == ["echo", "$?"]:
            continue
        name, *args = command.args
        if name != "stabledrl" or args[0] in ("record", "branch"):
            return False
        if "--out" in args:
            written.add(args[args.index("--out") + 1])
        if any(arg.startswith("runs/") and arg not in written for arg in args[1:]):
            return False
    return True


def session_name(session: list[Command]) -> str:
    """The first command the session's block shows (after those of earlier blocks)."""
    return shlex.join(next(c for c in session if c.shown != [ELIDED]).args)


def first_replay() -> list[Command]:
    """The README's first replay, shown after the sentence that gives its command."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    shown = re.search(r"```\n(Replay of fixtures/grpo:.*?)\n```", readme, re.S)
    assert shown, "the README lost its first replay"
    lines = [line.rstrip() for line in shown.group(1).splitlines()]
    return [Command(["stabledrl", "replay", "fixtures/grpo"], lines)]


SESSIONS = [
    pytest.param(first_replay(), id="README.md:stabledrl replay fixtures/grpo"),
    *(
        pytest.param(session, id=f"{page.relative_to(ROOT).as_posix()}:{session_name(session)}")
        for page in PAGES
        for session in sessions(page)
        if runs_on_the_fixtures_alone(session)
    ),
]


def match(shown: list[str], stdout: list[str], stderr: list[str]) -> str | None:
    """None when `shown` is what the command printed (module docstring), else what differs."""
    streams = {"stdout": stdout, "stderr": stderr}
    position = dict.fromkeys(streams, 0)
    elided = dict.fromkeys(streams, False)  # a `...` shown since the stream's last line
    for line in shown:
        if line.strip() == ELIDED:
            elided = dict.fromkeys(streams, True)
            continue
        for name, lines in streams.items():
            start = position[name]
            if elided[name]:
                at = next((i for i in range(start, len(lines)) if lines[i] == line), None)
            else:
                at = start if start < len(lines) and lines[start] == line else None
            if at is not None:
                position[name], elided[name] = at + 1, False
                break
        else:
            return f"not printed there: {line!r}"
    if shown and shown[-1].strip() != ELIDED:
        for name, lines in streams.items():
            if position[name] and position[name] < len(lines):
                return f"{name} goes on, unshown: {lines[position[name]]!r}"
    return None


def play(session: list[Command]) -> list[str]:
    """Runs `session` in this process, in the working directory, at 80 columns; what differs
    from the lines it shows."""
    differences = []
    exit_code = 0
    for command in session:
        if command.args == ["echo", "$?"]:
            if command.shown != [str(exit_code)]:
                differences.append(f"exit code {exit_code}, shown {command.shown}")
            continue
        done = CliRunner().invoke(app, command.args[1:], env={"COLUMNS": "80"})
        exit_code = done.exit_code
        stdout = [line.rstrip() for line in done.stdout.splitlines()]
        stderr = [line.rstrip() for line in done.stderr.splitlines() if not PROGRESS.match(line)]
        difference = match(command.shown, stdout, stderr)
        if difference:
            differences.append(f"$ {shlex.join(command.args)}: {difference}")
    return differences


@pytest.mark.parametrize("session", SESSIONS)
def test_each_session_shown_on_the_fixtures_prints_what_it_shows(
    session: list[Command], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures")
    monkeypatch.chdir(tmp_path)
    differences = play(session)
    assert not differences, "\n".join(differences)


def test_the_pages_still_show_the_sessions_this_test_plays() -> None:
    assert len(SESSIONS) >= 8


def test_lines_left_out_or_added_unmarked_are_differences() -> None:
    printed = ["title", "row 1", "row 2", "row 3"]
    assert match(["title", "row 1", "row 2", "row 3"], printed, []) is None
    assert match(["title", ELIDED, "row 3"], printed, []) is None
    assert match([ELIDED, "row 1", "row 2", ELIDED], printed, ["alert"]) is None
    assert match(["alert", "title", ELIDED], printed, ["alert"]) is None
    assert match(["title", "row 2", ELIDED], printed, []) == "not printed there: 'row 2'"
    assert match(["title", "row 1", "row 2"], printed, []) == "stdout goes on, unshown: 'row 3'"
    assert match(["title", "row 9", ELIDED], printed, []) == "not printed there: 'row 9'"
    assert match(["row 1", "row 2", "row 3"], printed, []) == "not printed there: 'row 1'"
    assert match(["title", "row 1", "alert", "row 2", "row 3"], printed, ["alert"]) is None
    assert match(["title", "row 2", "row 3"], printed, []) == "not printed there: 'row 2'"


def test_each_record_into_the_quick_starts_run_passes_force() -> None:
    """The Quick start records runs/demo, and `record` refuses a directory that is not empty
    (exit 2): a later block's `stabledrl record --out runs/demo` runs as written only with
    --force, and so does an example of the commands' help (`branch --help` showed one
    without it)."""
    lines = [
        (page.relative_to(ROOT).as_posix(), line.strip())
        for page in PAGES
        for block in re.findall(r"```[a-z]*\n(.*?)```", page.read_text(encoding="utf-8"), re.S)
        for line in block.replace("\\\n", " ").splitlines()
    ]
    lines += [
        (f"{name} --help", line) for name, entry in COMMANDS.items() for line in entry.examples
    ]
    lines += [("--help", line) for line in ROOT_EXAMPLES]
    refused = [
        f"{where}: {line}"
        for where, line in lines
        if re.search(r"stabledrl record (\S+ )*--out runs/demo\b", line)
        and "--force" not in line.split(" -- ")[0]
    ]
    assert not refused, refused


def marked_block(page: Path, marker: str) -> str:
    """The fenced code block right after `<!-- test: MARKER -->` on `page`."""
    text = page.read_text(encoding="utf-8")
    found = re.search(rf"<!-- test: {re.escape(marker)} -->\n```[a-z]*\n(.*?)```", text, re.S)
    assert found, f"{page.name} has no code block marked {marker!r}"
    return found.group(1)


def test_the_scalar_watch_session_runs_on_the_script_the_page_shows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scalar run `watch` follows is recorded from a script the page shows (`spike.py`),
    and the session prints what the page shows: a reader can run it as written."""
    page = ROOT / "docs" / "watch.md"
    (tmp_path / "spike.py").write_text(marked_block(page, "spike.py"), encoding="utf-8")
    [session] = [s for s in sessions(page) if "spike.py" in s[0].args]
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    differences = play(session)
    assert not differences, "\n".join(differences)


def test_the_package_cites_pages_that_hold_what_it_cites() -> None:
    """The package's messages and docstrings cite docs/NAME.md pages that exist, and no
    section of the README, which is a summary (the caption of a per-rank Gram replay sent
    users to 'README, Gradient geometry', a section the README never had)."""
    cited = set()
    for source in (ROOT / "stabledrl_cli").rglob("*.py"):
        text = source.read_text(encoding="utf-8")
        assert "README" not in text, source.relative_to(ROOT)
        cited |= set(re.findall(r"docs/[\w-]+\.md", text))
    assert cited and not [page for page in cited if not (ROOT / page).is_file()]
