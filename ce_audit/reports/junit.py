"""The gate's verdict as JUnit XML: one <testcase> per cell, a <failure> per failing cell, and the
per-implementation summary (ce_audit.gate.summary) as the suite's <system-out>.

CI systems (GitHub, GitLab, Jenkins, Azure) display these natively. classname is
``ce-audit.IMPL.DTYPE``; name lists the cell's other key columns. Unmeasured (skipped) cells are
<skipped/>; budgets that match no cell get a test case of their own in a "budgets" suite.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from ce_audit.gate.compare import GateResult
from ce_audit.printable import printable
from ce_audit.reports.files import write_atomically

_NOT_XML = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _clean(text: str) -> str:
    """Control characters shown as escapes (plugin error messages may hold any; XML 1.0 forbids most),
    then anything else XML cannot hold dropped."""
    return _NOT_XML.sub("", printable(text))


def gate_junit(result: GateResult) -> str:
    """The XML document as text."""
    from ce_audit.gate.summary import summary_lines

    root = ET.Element("testsuites", name="ce-audit gate")
    suite = ET.SubElement(root, "testsuite", name="ce-audit precision gate")
    summary = summary_lines(result)
    failures = skipped = 0
    for cell in result.cells:
        case = ET.SubElement(
            suite, "testcase", classname=_clean(f"ce-audit.{cell.impl}.{cell.dtype}"), name=_clean(cell.name)
        )
        if cell.failures:
            failures += 1
            first = cell.failures[0]
            message = f"{first.metric}: {first.baseline} → {first.current} ({first.message})"
            if len(cell.failures) > 1:
                message += f" and {len(cell.failures) - 1} more"
            failure = ET.SubElement(case, "failure", message=_clean(message), type="regression")
            failure.text = _clean(
                "\n".join(f"{f.metric}: {f.baseline} → {f.current}: {f.message}" for f in cell.failures)
            )
        elif cell.skipped:
            skipped += 1
            ET.SubElement(case, "skipped", message=_clean(cell.skipped))
        if cell.state == "new":
            ET.SubElement(case, "system-out").text = "new cell, not in the baseline"
    if summary:  # what regressed per implementation, before the per-cell detail of the test cases
        ET.SubElement(suite, "system-out").text = _clean("\n".join(summary))
    suite.set("tests", str(len(result.cells)))
    suite.set("failures", str(failures))
    suite.set("errors", "0")
    suite.set("skipped", str(skipped))
    total_tests, total_failures = len(result.cells), failures
    orphans = [failure for failure in result.failures if failure.cell == "(no cell)"]
    if orphans:
        budgets = ET.SubElement(root, "testsuite", name="budgets", tests=str(len(orphans)))
        budgets.set("failures", str(len(orphans)))
        for orphan in orphans:
            case = ET.SubElement(
                budgets, "testcase", classname="ce-audit.budget", name=_clean(orphan.baseline)
            )
            ET.SubElement(case, "failure", message=_clean(orphan.message), type="budget")
        total_tests += len(orphans)
        total_failures += len(orphans)
    root.set("tests", str(total_tests))
    root.set("failures", str(total_failures))
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_gate_junit(result: GateResult, path: str | Path) -> Path:
    return write_atomically(path, gate_junit(result))
