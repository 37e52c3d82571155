"""The migration matrix (analysis/matrix.py) as a terminal table, JSON and a
self-contained HTML page; and the verdicts of one guest on many hosts.

Rows are the guest's host (a guest configured with that host's full CPU),
columns the host it would run on. Hosts that read the same for every rule
share a row and a column (a group); each lists its hosts. The reasons of a
cell are compat()'s, asked only for the group pairs that do not fit.

The HTML page is built with lxml (no template, no external asset): hosts as
rows and columns, a colour per verdict, the missing features on hover (the
cell's title) and every reason below, each cell linking to its reasons.

Pure: a function of the matrix.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final

from lxml import etree

from kvmcpuid_virt.analysis.compat import Verdict
from kvmcpuid_virt.analysis.matrix import Matrix

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "fleet_json",
    "fleet_table",
    "matrix_html",
    "matrix_json",
    "matrix_table",
    "short_names",
]

FORMAT_NAME: Final = "kvmcpuid-compat-matrix"
FORMAT_VERSION: Final = 1
_FITS: Final = "fits"
_NO: Final = "does-not-fit"


def _label(m: Matrix, g: int, names: Sequence[str] | None = None) -> str:
    """A group's name: its one host, or its first host and how many more."""
    members = m.groups[g].members
    first = (names or m.hosts)[members[0]]
    return first if len(members) == 1 else f"{first} (+{len(members) - 1})"


def short_names(hosts: Sequence[str]) -> list[str]:
    """Hosts as the page's headers show them: a dump file by its name
    without the directory, when that is unambiguous (a URI as it is)."""
    short = [h if "://" in h else h.rsplit("/", 1)[-1] for h in hosts]
    return short if len(set(short)) == len(set(hosts)) else list(hosts)


def _misfits(m: Matrix) -> list[tuple[int, int, Verdict]]:
    return [(g, h, m.verdict(g, h)) for g in range(len(m.groups)) for h in range(len(m.groups))
            if not m.fits(g, h)]  # fmt: skip


def matrix_json(m: Matrix) -> str:
    """Every host and its group; every ordered pair of groups with its
    verdict and compat()'s reasons; the counts over hosts."""
    reasons = {(g, h): v for g, h, v in _misfits(m)}
    cells = []
    for g in range(len(m.groups)):
        for h in range(len(m.groups)):
            v = reasons.get((g, h))
            cells.append({
                "guest": g, "host": h, "fits": v is None,
                "missing": "" if v is None else v.missing(),
                "reasons": [] if v is None else [r.as_json() for r in v.reasons],
                "unjudged": m.unjudged(g, h),
            })  # fmt: skip
    group_of = m.group_of()
    doc: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "hosts": [{"name": name, "group": group_of[i]} for i, name in enumerate(m.hosts)],
        "groups": [{"id": g, "hosts": [m.hosts[i] for i in grp.members]}
                   for g, grp in enumerate(m.groups)],
        "summary": {"hosts": len(m.hosts), "groups": len(m.groups),
                    "pairs": len(m.hosts) ** 2, "fitting_pairs": m.fitting_pairs()},
    }
    # The cells one a line, after the rest: json's indenting encoder is pure
    # Python, several times slower than its compact one, and a 50-group
    # matrix has 2500 cells.
    head = json.dumps(doc, indent=2).removesuffix("\n}")
    body = ",\n".join("    " + json.dumps(c) for c in cells)
    return f'{head},\n  "cells": [\n{body}\n  ]\n}}\n'



def matrix_table(m: Matrix) -> str:
    """Rows: the guest's host; columns: numbered as the rows; `ok` fits,
    `--` does not; then what is missing for each cell that does not fit."""
    n = len(m.groups)
    labels = [f"{g + 1}  {_label(m, g)}" for g in range(n)]
    width = max(len(s) for s in labels)
    cols = [str(g + 1) for g in range(n)]
    cw = max(2, *(len(c) for c in cols))
    out = ["guest's host (rows) on host (columns): ok fits, -- does not", ""]
    out.append(" " * width + "  " + " ".join(c.rjust(cw) for c in cols))
    for g in range(n):
        cells = " ".join(("ok" if m.fits(g, h) else "--").rjust(cw) for h in range(n))
        out.append(f"{labels[g].ljust(width)}  {cells}")
    groups = [(g, grp) for g, grp in enumerate(m.groups) if len(grp.members) > 1]
    if groups:
        out.append("")
        for g, grp in groups:
            out.append(f"{g + 1}: {', '.join(m.hosts[i] for i in grp.members)}")
    misfits = _misfits(m)
    if misfits:
        out.append("")
        for g, h, v in misfits:
            out.append(f"{g + 1} on {h + 1}: {_short(v)}")
    unjudged = _unjudged(m)
    if unjudged:
        out.append("")
        for g, h, names in unjudged:
            out.append(f"{g + 1} on {h + 1}: ok as far as known, {h + 1}'s feature MSRs are "
                       f"unknown: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''} "
                       "not judged")  # fmt: skip
    out.append("")
    out.append(f"{len(m.hosts)} hosts, {len(m.groups)} distinct; {m.fitting_pairs()} of "
               f"{len(m.hosts) ** 2} ordered pairs fit")  # fmt: skip
    return "\n".join(out) + "\n"


_CSS: Final = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table.matrix { border-collapse: collapse; }
table.matrix th, table.matrix td { border: 1px solid #999; padding: 0.3em 0.5em; }
table.matrix th { background: #eee; font-weight: normal; text-align: left; }
table.matrix th.col { writing-mode: vertical-rl; transform: rotate(180deg); }
td.fits { background: #8fd18f; text-align: center; }
td.does-not-fit { background: #e88; text-align: center; }
td a { color: inherit; text-decoration: none; display: block; }
.legend span { padding: 0.2em 0.6em; margin-right: 1em; }
li { margin-bottom: 0.4em; }
code { font-size: 90%; }
"""


def matrix_html(m: Matrix, title: str = "kvmcpuid compat --matrix") -> str:
    """One self-contained page (see the module)."""
    n = len(m.groups)
    misfits = _misfits(m)
    missing = {(g, h): v for g, h, v in misfits}
    names = short_names(m.hosts)
    html = etree.Element("html", lang="en")
    head = etree.SubElement(html, "head")
    etree.SubElement(head, "meta", charset="utf-8")
    etree.SubElement(head, "title").text = title
    etree.SubElement(head, "style").text = _CSS
    body = etree.SubElement(html, "body")
    etree.SubElement(body, "h1").text = title
    etree.SubElement(body, "p").text = (
        f"{len(m.hosts)} hosts, {n} distinct; {m.fitting_pairs()} of {len(m.hosts) ** 2} "
        "ordered pairs fit. Row: a guest with that host's full CPU; column: the host it "
        "would run on.")  # fmt: skip
    legend = etree.SubElement(body, "p", {"class": "legend"})
    etree.SubElement(legend, "span", {"class": _FITS}).text = "fits"
    etree.SubElement(legend, "span", {"class": _NO}).text = "does not fit (hover: what is missing)"
    table = etree.SubElement(body, "table", {"class": "matrix"})
    top = etree.SubElement(table, "tr")
    etree.SubElement(top, "th").text = "guest's host \\ host"
    for h in range(n):
        etree.SubElement(top, "th", {"class": "col", "title": _members(m, h)}).text = \
            _label(m, h, names)  # fmt: skip
    for g in range(n):
        row = etree.SubElement(table, "tr")
        etree.SubElement(row, "th", {"class": "row", "title": _members(m, g)}).text = \
            _label(m, g, names)  # fmt: skip
        for h in range(n):
            v = missing.get((g, h))
            if v is None:
                title = f"{_label(m, g)} fits {_label(m, h)}"
                unjudged = m.unjudged(g, h)
                if unjudged:
                    title += (" as far as known: its feature MSRs are unknown, so "
                              f"{', '.join(unjudged)} not judged")  # fmt: skip
                cell = etree.SubElement(row, "td", {"class": _FITS, "title": title})
                cell.text = "\u2713?" if unjudged else "\u2713"
            else:
                cell = etree.SubElement(row, "td", {"class": _NO, "title": v.missing()})
                etree.SubElement(cell, "a", href=f"#c{g}-{h}").text = "\u2717"
    if misfits:
        etree.SubElement(body, "h2").text = "Why not"
        ul = etree.SubElement(body, "ul")
        for g, h, v in misfits:
            li = etree.SubElement(ul, "li", id=f"c{g}-{h}")
            etree.SubElement(li, "b").text = f"{_label(m, g)} on {_label(m, h)}"
            inner = etree.SubElement(li, "ul")
            for r in v.reasons:
                item = etree.SubElement(inner, "li")
                etree.SubElement(item, "code").text = r.where
                item[-1].tail = f" {r.field}: guest {r.guest}, host {r.host} ({r.detail})"
    groups = [(g, grp) for g, grp in enumerate(m.groups) if len(grp.members) > 1]
    if groups:
        etree.SubElement(body, "h2").text = "Hosts that read the same"
        ul = etree.SubElement(body, "ul")
        for g, _ in groups:
            etree.SubElement(ul, "li").text = f"{_label(m, g)}: {_members(m, g)}"
    text: str = etree.tostring(html, method="html", encoding="unicode", doctype="<!DOCTYPE html>")
    return text + "\n"


def _unjudged(m: Matrix) -> list[tuple[int, int, list[str]]]:
    n = range(len(m.groups))
    return [(g, h, names) for g in n for h in n if (names := m.unjudged(g, h))]


def _short(v: Verdict, most: int = 8) -> str:
    """What does not fit, the first `most` names (JSON and HTML have all)."""
    names = list(dict.fromkeys(r.field for r in v.reasons))
    more = len(names) - most
    return ", ".join(names[:most]) + (f" and {more} more" if more > 0 else "")


def _members(m: Matrix, g: int) -> str:
    return ", ".join(m.hosts[i] for i in m.groups[g].members)


def fleet_table(guest: str, verdicts: Sequence[Verdict]) -> str:
    """One line per host: fits, or what it cannot give; then the count."""
    fit = [v for v in verdicts if v.fits]
    width = max(len(v.host) for v in verdicts)
    out = [f"guest: {guest}", ""]
    for v in verdicts:
        if v.fits and v.unjudged:
            verdict = f"fits as far as known (feature MSRs unknown: {', '.join(v.unjudged)})"
        else:
            verdict = "fits" if v.fits else "does not fit: " + v.missing()
        out.append(f"{v.host.ljust(width)}  {verdict}")
    out.append("")
    out.append(f"{len(fit)} of {len(verdicts)} hosts can take it"
               + (f": {', '.join(v.host for v in fit)}" if fit else ""))
    return "\n".join(out) + "\n"


def fleet_json(guest: str, verdicts: Sequence[Verdict]) -> str:
    doc = {"guest": guest, "fits": [v.host for v in verdicts if v.fits],
           "hosts": [v.as_json() for v in verdicts]}  # fmt: skip
    return json.dumps(doc, indent=2) + "\n"
