"""The suite's own reports, beside pytest's output and JUnit XML:
reports/conformance.json (every test, its outcome and per-bit details),
reports/conformance.md and reports/conformance.html (one self-contained page,
inline CSS, built with lxml): a feature-by-backend matrix headed by the host
fingerprint (kernel, QEMU, libvirt, CPU, microcode).

Tests attach details with `record()` (user_properties, so they survive
pytest-xdist); the hooks in conftest.py call `logreport` and `sessionfinish`.
"""

from __future__ import annotations

import enum
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Final

import pytest
from lxml import etree

from kvmcpuid_virt.analysis.backend import Backend
from kvmcpuid_virt.fsutil import atomic_write

__all__ = ["EXTRAS", "addoption", "configure", "logreport", "record", "sessionfinish"]

KEY: Final = "conformance"
BACKENDS: Final[tuple[Backend, ...]] = tuple(Backend)
# Session-level facts the fixtures learn (host control, batches, plan notes).
EXTRAS: dict[str, object] = {}
_RESULTS: dict[str, dict[str, Any]] = {}
_SYMBOL: Final = {"passed": "pass", "failed": "FAIL", "xfailed": "xfail", "skipped": "skip",
                  "error": "ERROR", "xpassed": "XPASS"}
_CSS: Final = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px;text-align:left;vertical-align:top}
th{background:#f0f0f0}
td.passed{background:#d9f2d9}td.failed,td.error,td.xpassed{background:#f7c6c6;font-weight:bold}
td.xfailed{background:#fbeec1}div.why{font-size:85%}td.skipped{background:#e8e8e8;color:#666}
pre{white-space:pre-wrap;font-size:12px;margin:0}
"""


def addoption(parser: pytest.Parser) -> None:
    parser.addoption("--conformance-report-dir", default="reports",
                     help="where conformance.{json,md,html} go ('' to write none)")


def configure(config: pytest.Config) -> None:
    EXTRAS.clear()
    _RESULTS.clear()


def record(request: pytest.FixtureRequest, **details: object) -> None:
    """Attach a test's details (backend, kind, subject, issues, ...) to its report."""
    # Enum members (Backend) as their plain str value: pytest-xdist's execnet
    # sends only builtin types, and the JSON report reads the same either way.
    plain = {k: v.value if isinstance(v, enum.Enum) else v for k, v in details.items()}
    request.node.user_properties.append((KEY, plain))


def _outcome(report: pytest.TestReport) -> str:
    if hasattr(report, "wasxfail"):
        return "xfailed" if report.skipped else "xpassed"
    if report.when != "call" and report.failed:
        return "error"
    return str(report.outcome)


def logreport(report: pytest.TestReport) -> None:
    entry = _RESULTS.setdefault(report.nodeid, {"nodeid": report.nodeid, "outcome": "passed",
                                                "details": {}})
    for key, value in report.user_properties:
        if key == KEY and isinstance(value, dict):
            entry["details"] = value
    outcome = _outcome(report)
    # The worst phase wins (setup skip, call failure, teardown error).
    if (report.when == "call" or outcome != "passed") and (
        entry["outcome"] == "passed" or outcome in ("failed", "error")
    ):
        entry["outcome"] = outcome
    if outcome == "skipped" and isinstance(report.longrepr, tuple):
        entry["reason"] = str(report.longrepr[2])
    elif outcome == "xfailed":
        entry["reason"] = str(getattr(report, "wasxfail", ""))
    elif outcome in ("failed", "error", "xpassed"):
        text = str(report.longrepr) if report.longrepr else ""
        entry["reason"] = text.strip().splitlines()[-1][:500] if text.strip() else ""
        entry["longrepr"] = text[-4000:]


def _param(nodeid: str) -> tuple[str, str, str]:
    """(test name, backend, subject) from a node id like
    conformance/test_backends.py::test_feature_off[qemu-avx2]."""
    name = nodeid.split("::")[-1]
    test, _, param = name.partition("[")
    param = param.rstrip("]")
    backend, _, subject = param.partition("-")
    if backend not in BACKENDS:
        return test, "", param
    return test, backend, subject or test


def _fingerprint() -> dict[str, str]:
    from kvmcpuid_virt.host import host_metadata

    meta = host_metadata()
    order = ("kernel", "qemu_version", "libvirt_version", "cpu_model", "cpu_vendor",
             "microcode", "hostname", "time", "tool_version")
    return {k: meta[k] for k in order if k in meta} | {k: v for k, v in meta.items()
                                                       if k not in order}


def _matrix() -> tuple[list[str], dict[str, dict[str, dict[str, Any]]]]:
    """Rows (test/subject) -> backend -> entry, for the backend tests."""
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for entry in _RESULTS.values():
        test, backend, subject = _param(entry["nodeid"])
        if not backend or "test_backends" not in entry["nodeid"]:
            continue
        label = {"test_full_config": "full configuration", "test_baseline": "cluster baseline",
                 "test_model": f"model {subject}", "test_feature_off": f"off: {subject}"}.get(
                     test, f"{test} {subject}")
        rows.setdefault(label, {})[backend] = entry
    def key(label: str) -> tuple[int, str]:
        rank = 0 if label.startswith("full") else 1 if label.startswith("model") else \
            2 if label.startswith("cluster") else 3
        return rank, label
    return sorted(rows, key=key), rows


def _counts() -> dict[str, dict[str, int]]:
    out: dict[str, Counter[str]] = {}
    for entry in _RESULTS.values():
        _, backend, _ = _param(entry["nodeid"])
        out.setdefault(backend or "host", Counter())[entry["outcome"]] += 1
    return {k: dict(v) for k, v in sorted(out.items())}


def _document(exitstatus: int) -> dict[str, Any]:
    return {
        "fingerprint": _fingerprint(),
        "exitstatus": int(exitstatus),
        "counts": _counts(),
        "extras": EXTRAS,
        "tests": sorted(_RESULTS.values(), key=lambda e: e["nodeid"]),
    }


def _cell(entry: dict[str, Any] | None) -> tuple[str, str]:
    if entry is None:
        return "-", ""
    issues = entry["details"].get("issues") or []
    why = entry.get("reason", "")
    tip = "\n".join([why, *issues]).strip()
    return _SYMBOL.get(entry["outcome"], entry["outcome"]), tip


def _markdown(doc: dict[str, Any]) -> str:
    lines = ["# KVM CPUID conformance", ""]
    lines += ["| host | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in doc["fingerprint"].items()]
    lines += ["", "| outcome | " + " | ".join(doc["counts"]) + " |",
              "| --- |" + " --- |" * len(doc["counts"])]
    outcomes = sorted({o for c in doc["counts"].values() for o in c})
    for o in outcomes:
        lines.append(f"| {o} | " + " | ".join(str(c.get(o, 0)) for c in doc["counts"].values())
                     + " |")
    order, rows = _matrix()
    lines += ["", "| configuration | " + " | ".join(BACKENDS) + " |",
              "| --- |" + " --- |" * len(BACKENDS)]
    for label in order:
        cells = []
        for b in BACKENDS:
            sym, tip = _cell(rows[label].get(b))
            short = tip.splitlines()[0][:120].replace("|", "\\|") if tip and sym != "pass" else ""
            cells.append(f"{sym} {short}".strip())
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    hc = EXTRAS.get("host_control")
    if isinstance(hc, list) and hc:
        lines += ["", "## Bits this host does not let KVM_SET_CPUID2 control", ""]
        lines += [f"- {line}" for line in hc]
    problems = [e for e in doc["tests"] if e["outcome"] in ("failed", "error", "xpassed")]
    if problems:
        lines += ["", "## Failures", ""]
        for e in problems:
            lines += [f"### {e['nodeid']}", "", "```",
                      *(e["details"].get("issues") or [e.get("reason", "")]), "```", ""]
    return "\n".join(lines) + "\n"


def _html(doc: dict[str, Any]) -> str:
    E = etree.Element
    S = etree.SubElement
    html = E("html", lang="en")
    head = S(html, "head")
    S(head, "meta", charset="utf-8")
    S(head, "title").text = "KVM CPUID conformance"
    S(head, "style").text = _CSS
    body = S(html, "body")
    S(body, "h1").text = "KVM CPUID conformance"
    t = S(body, "table")
    for k, v in doc["fingerprint"].items():
        tr = S(t, "tr")
        S(tr, "th").text = k
        S(tr, "td").text = str(v)
    counts = S(body, "table")
    tr = S(counts, "tr")
    S(tr, "th").text = "outcome"
    for b in doc["counts"]:
        S(tr, "th").text = b
    for o in sorted({o for c in doc["counts"].values() for o in c}):
        tr = S(counts, "tr")
        S(tr, "th").text = o
        for c in doc["counts"].values():
            S(tr, "td").text = str(c.get(o, 0))
    S(body, "h2").text = "Configuration by backend"
    order, rows = _matrix()
    m = S(body, "table")
    tr = S(m, "tr")
    S(tr, "th").text = "configuration"
    for b in BACKENDS:
        S(tr, "th").text = b
    for label in order:
        tr = S(m, "tr")
        S(tr, "th").text = label
        for b in BACKENDS:
            entry = rows[label].get(b)
            sym, tip = _cell(entry)
            td = S(tr, "td", {"class": entry["outcome"] if entry else "none"})
            if tip:
                td.set("title", tip)
            td.text = sym
            if tip and sym != "pass":
                # The first line says why in a few words; the per-bit detail
                # folds away so the matrix stays readable at a glance.
                first, _, rest = tip.partition("\n")
                S(td, "div", {"class": "why"}).text = first
                if rest.strip():
                    det = S(td, "details")
                    S(det, "summary").text = "bits"
                    S(det, "pre").text = rest.strip()[:2000]
    hc = EXTRAS.get("host_control")
    if isinstance(hc, list) and hc:
        S(body, "h2").text = "Bits this host does not let KVM_SET_CPUID2 control"
        ul = S(body, "ul")
        for line in hc:
            S(ul, "li").text = str(line)
    S(body, "h2").text = "Session"
    S(body, "pre").text = json.dumps(EXTRAS, indent=1, default=str)
    text: str = etree.tostring(html, encoding="unicode", method="html", doctype="<!DOCTYPE html>")
    return text + "\n"


def sessionfinish(session: pytest.Session, exitstatus: int | pytest.ExitCode) -> None:
    out = session.config.getoption("--conformance-report-dir")
    if not out or not _RESULTS or hasattr(session.config, "workerinput"):
        return  # nothing ran, or an xdist worker (the controller writes)
    directory = Path(session.config.invocation_params.dir) / str(out)
    os.makedirs(directory, exist_ok=True)
    doc = _document(int(exitstatus))
    atomic_write(str(directory / "conformance.json"),
                 json.dumps(doc, indent=1, default=str) + "\n")
    atomic_write(str(directory / "conformance.md"), _markdown(doc))
    atomic_write(str(directory / "conformance.html"), _html(doc))
