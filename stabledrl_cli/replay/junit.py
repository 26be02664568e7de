"""JUnit XML of a check's gates: one testsuite, one testcase per policy and gate, so CI
systems show each gate as a test."""

from __future__ import annotations

import datetime as _dt
import os
import xml.etree.ElementTree as ET
from pathlib import Path

from stabledrl_cli._atomic import write_output
from stabledrl_cli._json import unicode_text
from stabledrl_cli.replay.gate import GateResult

RUN_CLASS = "stabledrl.run"
"""JUnit classname of run-level gates (a policy's is stabledrl.POLICY, `class_of`)."""
SPEC_DOT = "\u00b7"
"""What a '.' of a policy spec reads as in a classname (U+00B7 MIDDLE DOT, in no spec): Jenkins
splits a classname at its last '.', and would read `two-sided:delta=4.5` as class `5`."""
NOT_XML = {
    code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    for code in (*range(0x20), 0xFFFE, 0xFFFF)
    if chr(code) not in "\t\n\r"
}
"""Characters XML 1.0 cannot hold, and how the report spells them (a run's path, a recorded
scalar's name may hold them)."""


def _xml(text: str) -> str:
    """`text` as XML can hold it: `NOT_XML` spelled out, bytes that are not UTF-8 as `\\xNN`."""
    return unicode_text(text).translate(NOT_XML)


def class_of(policy: str | None) -> str:
    """The JUnit classname of a gate of `policy` (None: a run-level gate): one '.', after
    `stabledrl`."""
    return RUN_CLASS if policy is None else "stabledrl." + policy.replace(".", SPEC_DOT)


def case_name(result: GateResult) -> str:
    """The JUnit testcase name: the gate (its `label`: a recorded series' long name cut), and
    what it judges when one gate may appear more than once (`baseline.present
    (recorded.kl.max)`)."""
    return result.label if result.subject is None else f"{result.label} ({result.subject})"


def _unique(cases: list[tuple[str, str]]) -> list[str]:
    """The names of `cases` (classname, name), each once in its class: a name met before gets
    ` #2`, ` #3`, ... (two long series names cut alike: the same start, the same length)."""
    seen: dict[tuple[str, str], int] = {}
    names = []
    for case in cases:
        seen[case] = seen.get(case, 0) + 1
        names.append(case[1] if seen[case] == 1 else f"{case[1]} #{seen[case]}")
    return names


def junit_xml(results: list[GateResult], run: str, *, seconds: float = 0.0) -> bytes:
    """One testsuite, one testcase per policy and gate (`class_of`, `case_name`, `_unique`)."""
    failures = str(sum(not r.ok for r in results))
    tests, time = str(len(results)), f"{seconds:.3f}"
    suites = ET.Element(
        "testsuites", name="stabledrl check", tests=tests, failures=failures, errors="0", time=time
    )
    suite = ET.SubElement(
        suites,
        "testsuite",
        name=_xml(f"stabledrl check {run}"),
        tests=tests,
        failures=failures,
        errors="0",
        skipped="0",
        time=time,
        timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    cases = [(class_of(r.policy), case_name(r)) for r in results]
    for r, (classname, _), name in zip(results, cases, _unique(cases), strict=True):
        case = ET.SubElement(
            suite, "testcase", classname=_xml(classname), name=_xml(name), time="0"
        )
        message = _xml(r.message)
        if not r.ok:
            failure = ET.SubElement(case, "failure", message=message, type="GateFailed")
            figure, limit = r.shown()
            failure.text = f"figure {figure}, limit {limit}: {message}"
        else:
            ET.SubElement(case, "system-out").text = message
    ET.indent(suites)
    text: bytes = ET.tostring(suites, encoding="utf-8", xml_declaration=True)
    return text + b"\n"


def write_junit(
    results: list[GateResult], run: str, path: str | os.PathLike[str], *, seconds: float = 0.0
) -> Path:
    """Writes `junit_xml` atomically, or in place (`_atomic.write_output`); WriteError when it
    cannot."""
    return write_output(path, junit_xml(results, run, seconds=seconds))
