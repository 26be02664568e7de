"""verl's console log: the lines its `console` logger (`LocalLogger`) prints, a training step
each, found among whatever else the job printed (a Slurm output file, a saved terminal).

verl prints `step:N - name:value - name:value ...`: each value is `pprint.pformat` of a
number (`0.5`, `nan`, `True`; a numpy number under numpy 2 as `np.float64(0.5)`). Under Ray,
whose driver prints its actors' lines, a line begins with the actor's tag
(`(TaskRunner pid=2873) `, colour codes around it) and may end with Ray's count of lines it
folded (` [repeated 2x across cluster]`). In a file of stdout and stderr both, a line may
begin with the carriage returns of a progress bar and the bar tqdm drew last, with no newline
before verl's (`\rTraining Progress:  33%|###  | 1/3 [00:01<00:02, 1.0it/s]step:2 - ...`):
what the terminal shows, the text after the last carriage return, is read, and the bar,
which ends in tqdm's `[elapsed<remaining, rate]` and the spaces tqdm pads a shorter bar with,
passed over. Every other line is not verl's and is passed over; a `step:` line whose metrics
are not `name:value` pairs is skipped and counted. A step line with no newline, the file's
last, was cut short (a job stopped as it printed, or a log still being written), its last
value maybe too (`0.5` of `0.57`): it is ignored with a warning.
"""

from __future__ import annotations

import re
from pathlib import Path

from stabledrl_cli.importers._files import text_lines
from stabledrl_cli.importers._table import StepTable

_COLOURS = re.compile(r"\x1b\[[0-9;]*m")
_BAR = r"\[(?:\d+:)?\d\d:\d\d(?:<[^],[]*)?, [^][]*\]"
"""The end of a tqdm progress bar: `[elapsed<remaining, rate]` (`[00:01<00:02, 1.0it/s]`).
The remaining time holds no comma: the first `, ` ends it, so a line of many is not split
at each in turn (quadratic time)."""
_STEP_LINE = re.compile(rf"(?:\([^()]*\) +)?(?:.*{_BAR} *)?step:(\S*)(.*)")
_FOLDED = re.compile(r"\[repeated \d+x across cluster\]$")
_NUMPY_NUMBER = re.compile(r"np\.(?:float|int|uint)\d*\((.*)\)")
SNIFF_LINE = re.compile(rb"(?:^|\) |" + _BAR.encode() + rb" *)step:\d+ - [^ :]+:")
"""A verl console step line (after an actor's tag, a progress bar or none), colour codes
taken out."""
STEP_PAIRS = "not name:value pairs"
"""`skipped_rows`' reason for a step line whose metrics do not read as verl prints them."""


def read_verl_console(path: Path) -> StepTable:
    """The steps of a verl console log (InputError for a file that cannot be read as text)."""
    table = StepTable(str(path), preempts=True)
    for number, text, ended in text_lines(path):
        shown = text.rpartition("\r")[2]  # what a terminal shows of a progress bar's line
        found = _STEP_LINE.fullmatch(_unfolded(_COLOURS.sub("", shown)))
        if found is None:
            continue
        if not ended:  # verl prints a whole line: cut short, its last value may be too
            table.warnings.append(f"{path}: line {number}: unfinished last line ignored")
            break
        step, rest = found.groups()
        values = _metrics(rest)
        if values is None:
            table.skipped_rows[STEP_PAIRS] += 1
        else:
            table.add(step, values)
    return table


def _unfolded(text: str) -> str:
    """`text` without Ray's count of the lines it folded at its end, nor the spaces before it.
    Searched for without those spaces: a pattern starting with ` *` was tried at each space of
    a long run of them, quadratic time (a line of 40,000 spaces took 7 s)."""
    found = _FOLDED.search(text)
    return text[: found.start()].rstrip(" ") if found else text


def _metrics(rest: str) -> dict[str, object] | None:
    """The name -> value text of what follows a line's `step:N` (` - name:value` each, a
    numpy number's value unwrapped); None when it is not that."""
    if not rest:
        return {}
    if not rest.startswith(" - "):
        return None
    values: dict[str, object] = {}
    for pair in rest[3:].split(" - "):
        name, colon, value = pair.rpartition(":")
        if not colon or not name:
            return None
        numpy_number = _NUMPY_NUMBER.fullmatch(value)
        values[name] = numpy_number[1] if numpy_number else value
    return values
