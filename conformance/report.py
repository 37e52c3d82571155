"""The suite's own reports, beside pytest's output and JUnit XML:
reports/conformance.json (every test, its outcome and per-bit details),
reports/conformance.md and reports/conformance.html (one self-contained page,
inline CSS, built with lxml): a feature-by-backend matrix headed by the host
fingerprint (kernel, QEMU, libvirt, CPU, microcode).

Each cell says what was proven, an xfail included: how many of the bits this
host controls were compared and matched, and which bits it does not control
differed. "At a glance" says it per kind of configuration (the full
configuration first); cells whose guest the suite's machinery could not run
are "COULD NOT RUN" with the cause, apart from failures; "Retries" has the
libvirt retry statistics (attempts, retries by cause, guests in flight) and
the guests a batch could not run that were run once more alone.

Tests attach details with `record()` (user_properties, so they survive
pytest-xdist); the hooks in conftest.py call `configure`, `logreport` and
`sessionfinish`, and `mark_could_not_run` for a CouldNotRun.
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

__all__ = ["COULD_NOT_RUN", "EXTRAS", "addoption", "configure", "default_report_dir",
           "logreport", "mark_could_not_run", "record", "sessionfinish"]

KEY: Final = "conformance"
COULD_NOT_RUN: Final = "could-not-run"  # the outcome, and its user_properties key
REPO: Final = Path(__file__).resolve().parent.parent
BACKENDS: Final[tuple[Backend, ...]] = tuple(Backend)
# Session-level facts the fixtures learn (host control, batches, plan notes).
EXTRAS: dict[str, object] = {}
_RESULTS: dict[str, dict[str, Any]] = {}
_SYMBOL: Final = {"passed": "pass", "failed": "FAIL", "xfailed": "xfail", "skipped": "skip",
                  "error": "ERROR", "xpassed": "XPASS", COULD_NOT_RUN: "COULD NOT RUN"}
_CSS: Final = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px;text-align:left;vertical-align:top}
th{background:#f0f0f0}
td.passed{background:#d9f2d9}td.failed,td.error,td.xpassed{background:#f7c6c6;font-weight:bold}
td.xfailed{background:#fbeec1}div.why{font-size:85%}td.skipped{background:#e8e8e8;color:#666}
td.could-not-run{background:#d6dcf5;font-weight:bold}div.proven{font-size:85%;color:#185c18}
pre{white-space:pre-wrap;font-size:12px;margin:0}
"""


def default_report_dir() -> Path:
    """Where the reports go unless --conformance-report-dir says: the
    checkout's reports/, or $KVMCPUID_REPORTS."""
    return Path(os.environ.get("KVMCPUID_REPORTS") or REPO / "reports")


def addoption(parser: pytest.Parser) -> None:
    parser.addoption("--conformance-report-dir", default=None,
                     help="where conformance.{json,md,html} go, and the JUnit XML unless "
                     "--junitxml says (default: $KVMCPUID_REPORTS, else the checkout's "
                     "reports/; '' to write none)")  # fmt: skip


def _report_dir(config: pytest.Config) -> Path | None:
    out = config.getoption("--conformance-report-dir")
    if out == "":
        return None
    directory = default_report_dir() if out is None else Path(out)
    return Path(config.invocation_params.dir) / directory  # relative: to where pytest ran


def configure(config: pytest.Config) -> None:
    """Reset the session's results; put the JUnit XML beside the reports
    unless --junitxml was given (before pytest's junitxml plugin reads it)."""
    EXTRAS.clear()
    _RESULTS.clear()
    directory = _report_dir(config)
    if directory is not None and not getattr(config.option, "xmlpath", None):
        config.option.xmlpath = str(directory / "conformance.xml")


def record(request: pytest.FixtureRequest, **details: object) -> None:
    """Attach a test's details (backend, kind, subject, issues, ...) to its report."""
    # Enum members (Backend) as their plain str value: pytest-xdist's execnet
    # sends only builtin types, and the JSON report reads the same either way.
    plain = {k: v.value if isinstance(v, enum.Enum) else v for k, v in details.items()}
    request.node.user_properties.append((KEY, plain))


def mark_could_not_run(report: pytest.TestReport, why: str) -> None:
    """This test's guest could not be run by the suite's machinery (CouldNotRun)."""
    report.user_properties.append((COULD_NOT_RUN, why))


def _outcome(report: pytest.TestReport) -> str:
    if hasattr(report, "wasxfail"):
        return "xfailed" if report.skipped else "xpassed"
    if report.when != "call" and report.failed:
        return "error"
    return str(report.outcome)


def logreport(report: pytest.TestReport) -> None:
    entry = _RESULTS.setdefault(report.nodeid, {"nodeid": report.nodeid, "outcome": "passed",
                                                "details": {}})
    could_not_run = None
    for key, value in report.user_properties:
        if key == KEY and isinstance(value, dict):
            entry["details"] = value
        elif key == COULD_NOT_RUN:
            could_not_run = str(value)
    if could_not_run is not None:
        # Not a verdict on the host, whatever phase raised it.
        entry["outcome"] = COULD_NOT_RUN
        entry["reason"] = could_not_run
        return
    if entry["outcome"] == COULD_NOT_RUN:
        return
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


_LABELS: Final = {"test_full_config": "full configuration", "test_baseline": "cluster baseline"}


def _label(test: str, subject: str) -> str:
    if test in _LABELS:
        return _LABELS[test]
    return {"test_model": f"model {subject}", "test_feature_off": f"off: {subject}"}.get(
        test, f"{test} {subject}")


def _matrix() -> tuple[list[str], dict[str, dict[str, dict[str, Any]]]]:
    """Rows (test/subject) -> backend -> entry, for the backend tests."""
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for entry in _RESULTS.values():
        test, backend, subject = _param(entry["nodeid"])
        if not backend or "test_backends" not in entry["nodeid"]:
            continue
        rows.setdefault(_label(test, subject), {})[backend] = entry

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


def _names(labels: list[str]) -> list[str]:
    """"pni (0x1.0:ecx[0])" -> "pni"; an unnamed bit keeps its position."""
    return [label.split(" (", 1)[0] for label in labels]


def _proven(entry: dict[str, Any]) -> str:
    """What the check proved: "1101/1101 controlled bits match", plus the
    bits this host does not control that differed; '' before any check."""
    details = entry["details"]
    if "controlled_bits" not in details:
        return ""
    text = f"{details['controlled_matched']}/{details['controlled_bits']} controlled bits match"
    differ = _names(details.get("uncontrolled_differ") or [])
    if differ:
        text += (f"; {len(differ)} not controlled by this host differ: "
                 + ", ".join(differ[:6]) + (", ..." if len(differ) > 6 else ""))
    return text


def _all_controlled_match(entry: dict[str, Any]) -> bool:
    d = entry["details"]
    return (entry["outcome"] in ("passed", "xfailed") and "controlled_bits" in d
            and d["controlled_bits"] > 0 and d["controlled_matched"] == d["controlled_bits"])


def _cell(entry: dict[str, Any] | None) -> tuple[str, str, str]:
    """(symbol, what was proven, why: the reason and the per-bit issues)."""
    if entry is None:
        return "-", "", ""
    issues = entry["details"].get("issues") or []
    why = entry.get("reason", "")
    tip = "\n".join([why, *issues]).strip()
    return _SYMBOL.get(entry["outcome"], entry["outcome"]), _proven(entry), tip


def _glance() -> list[str]:
    """Per kind of configuration and backend: did every bit this host
    controls match? (the full configuration first, by name)."""
    order, rows = _matrix()
    lines = []
    full = rows.get(_LABELS["test_full_config"], {})
    if full:
        parts = []
        for b in BACKENDS:
            e = full.get(b)
            if e is None:
                continue
            d = e["details"]
            if _all_controlled_match(e):
                parts.append(f"{b}: yes, {d['controlled_bits']} bits")
            else:
                parts.append(f"{b}: NO ({_SYMBOL.get(e['outcome'], e['outcome'])}"
                             + (f", {_proven(e)}" if _proven(e) else "") + ")")
        lines.append("full configuration, every bit this host controls matched: "
                     + "; ".join(parts))
    for kind, prefix in (("feature off", "off: "), ("named models", "model "),
                         ("cluster baseline", "cluster")):
        labels = [label for label in order if label.startswith(prefix)]
        if not labels:
            continue
        parts = []
        for b in BACKENDS:
            entries = [rows[label][b] for label in labels if b in rows[label]]
            checked = [e for e in entries if "controlled_bits" in e["details"]]
            if not entries:
                continue
            good = sum(_all_controlled_match(e) for e in checked)
            rest = Counter(e["outcome"] for e in entries if e not in checked)
            extra = ", ".join(f"{n} {_SYMBOL.get(o, o)}" for o, n in sorted(rest.items()))
            parts.append(f"{b}: {good}/{len(checked)}" + (f" ({extra})" if extra else ""))
        lines.append(f"{kind}, configurations whose every controlled bit matched: "
                     + "; ".join(parts))
    lines += _whole_cpuid_lines()
    stuck = [e for e in _RESULTS.values() if e["outcome"] == COULD_NOT_RUN]
    lines.append(f"could not run (the suite's machinery, not the host): {len(stuck)}")
    return lines


# The checks beyond the feature words: (test file and function, what it proves).
_WHOLE_CPUID: Final = (
    ("test_identity.py::test_identity_is_qemus",
     "identity and max leaves equal QEMU's own expansion"),
    ("test_topology.py::test_topology", "multi-vCPU topology consistent"),
    ("test_caches.py::test_libvirt_host_passthrough_caches_are_the_hosts",
     "libvirt host-passthrough caches are the host's"),
    ("test_mutants.py::test_mutant_vmm_changing_one_field", "field mutants caught"),
    ("test_topology.py::test_mutant_vmm_booting_another_topology", "topology mutants caught"),
    ("test_msrs.py::test_msrs_as_configured", "feature MSRs read as configured"),
    ("test_msrs.py::test_msr_feature", "feature-MSR bits, one at a time"),
    ("test_msrs.py::test_ucode_rev_reaches_the_guest", "microcode revision reaches the guest"),
)


def _whole_cpuid_lines() -> list[str]:
    """One line per check beyond the feature words: passed / run."""
    lines = []
    for test, what in _WHOLE_CPUID:
        entries = [e for e in _RESULTS.values() if test in e["nodeid"]]
        if entries:
            count = Counter(e["outcome"] for e in entries)
            lines.append(f"{what}: " + ", ".join(
                f"{n} {_SYMBOL.get(o, o)}" for o, n in sorted(count.items())))
    return lines


def _retry_lines() -> list[str]:
    """libvirt's transient refusals retried, and guests the batch could not
    run that were run once more alone."""
    lines = []
    retries = EXTRAS.get("libvirt_retries")
    if isinstance(retries, dict):
        lines.append(f"libvirt: {retries.get('summary', '')}")
        messages = retries.get("messages") or {}
        if isinstance(messages, dict):
            lines += [f"libvirt, last {cause}: {text}" for cause, text in messages.items()]
    batches = EXTRAS.get("batches")
    for backend, info in (batches.items() if isinstance(batches, dict) else ()):
        reruns = info.get("reruns") if isinstance(info, dict) else None
        if reruns:
            lines += [f"{backend}: {case} re-run alone after: {why}"
                      for case, why in sorted(reruns.items())]
    return lines


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown(doc: dict[str, Any]) -> str:
    lines = ["# KVM CPUID conformance", ""]
    lines += ["| host | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in doc["fingerprint"].items()]
    lines += ["", "## At a glance", "", *[f"- {line}" for line in _glance()]]
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
            sym, proven, tip = _cell(rows[label].get(b))
            parts = [sym, proven]
            if tip and sym not in ("pass", "xfail"):
                parts.append(tip.splitlines()[0][:160])
            cells.append(_md(" · ".join(p for p in parts if p)))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    retry = _retry_lines()
    if retry:
        lines += ["", "## Retries", "", *[f"- {r}" for r in retry]]
    hc = EXTRAS.get("host_control")
    if isinstance(hc, list) and hc:
        lines += ["", "## Bits this host does not let KVM_SET_CPUID2 control", ""]
        lines += [f"- {line}" for line in hc]
    stuck = [e for e in doc["tests"] if e["outcome"] == COULD_NOT_RUN]
    if stuck:
        lines += ["", "## Could not run (the suite's machinery, not the host)", ""]
        lines += [f"- {e['nodeid']}: {e.get('reason', '')}" for e in stuck]
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
    S(body, "h2").text = "At a glance"
    ul = S(body, "ul")
    for line in _glance():
        S(ul, "li").text = line
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
            sym, proven, tip = _cell(entry)
            td = S(tr, "td", {"class": entry["outcome"] if entry else "none"})
            if tip:
                td.set("title", tip)
            td.text = sym
            if proven:
                S(td, "div", {"class": "proven"}).text = proven
            if tip and sym != "pass":
                # The first line says why in a few words; the per-bit detail
                # folds away so the matrix stays readable at a glance.
                first, _, rest = tip.partition("\n")
                S(td, "div", {"class": "why"}).text = first
                if rest.strip():
                    det = S(td, "details")
                    S(det, "summary").text = "bits"
                    S(det, "pre").text = rest.strip()[:2000]
    retry = _retry_lines()
    if retry:
        S(body, "h2").text = "Retries"
        ul = S(body, "ul")
        for line in retry:
            S(ul, "li").text = line
    hc = EXTRAS.get("host_control")
    if isinstance(hc, list) and hc:
        S(body, "h2").text = "Bits this host does not let KVM_SET_CPUID2 control"
        ul = S(body, "ul")
        for line in hc:
            S(ul, "li").text = str(line)
    stuck = [e for e in doc["tests"] if e["outcome"] == COULD_NOT_RUN]
    if stuck:
        S(body, "h2").text = "Could not run (the suite's machinery, not the host)"
        ul = S(body, "ul")
        for e in stuck:
            S(ul, "li").text = f"{e['nodeid']}: {e.get('reason', '')}"
    S(body, "h2").text = "Session"
    S(body, "pre").text = json.dumps(EXTRAS, indent=1, default=str)
    text: str = etree.tostring(html, encoding="unicode", method="html", doctype="<!DOCTYPE html>")
    return text + "\n"


def sessionfinish(session: pytest.Session, exitstatus: int | pytest.ExitCode) -> None:
    directory = _report_dir(session.config)
    if directory is None or not _RESULTS or hasattr(session.config, "workerinput"):
        return  # nothing ran, or an xdist worker (the controller writes)
    os.makedirs(directory, exist_ok=True)
    doc = _document(int(exitstatus))
    atomic_write(str(directory / "conformance.json"),
                 json.dumps(doc, indent=1, default=str) + "\n")
    atomic_write(str(directory / "conformance.md"), _markdown(doc))
    atomic_write(str(directory / "conformance.html"), _html(doc))
