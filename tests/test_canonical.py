"""cpuid/canonical.py, the fast path of the JSON dump reader: on the writer's
own layout and on every mutation of it, the same answer as the full reader
(formats.loads): the same table, kind, host and feature MSRs, or the same
one-line error. The mutations are of the real dumps (tests/data/cpuid),
written by the writer (formats.dumps) with and without feature MSRs."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmcpuid_virt.cpuid import canonical, formats
from kvmcpuid_virt.cpuid.formats import Dump, dumps
from kvmcpuid_virt.cpuid.msr_values import FeatureMsrs
from kvmcpuid_virt.errors import DumpFormatError
from kvmcpuid_virt.fsutil import load_dump
from tests.conftest import DATA

SOURCE = "fleet.json"


def _texts() -> list[str]:
    out = []
    for i, p in enumerate(sorted(DATA.glob("*.xml"))):
        d = load_dump(str(p))
        msrs = FeatureMsrs([(0x10A, 0x4000_0000_0C00_0069)], deliverable=[(0x10A, 0)]) \
            if i % 2 else None  # fmt: skip
        out.append(dumps(Dump(d.table.with_msrs(msrs), "supported", {"hostname": f"h{i}"})))
    return out


TEXTS = _texts()


def _answer(read: Callable[[str, str], Dump], text: str) -> tuple[Any, ...]:
    try:
        d = read(text, SOURCE)
    except DumpFormatError as exc:
        return ("error", str(exc))
    # Lookups too: the fast path builds its tables from a layout shared by
    # tables of one shape (CpuidTable.from_layout).
    asked = [*d.table.keys(), (0x7, 9), (0x4, 30), (0x8000_0001, 2), (0x1, 1)]
    return ("dump", d.table.entries, d.kind, d.host, d.source, d.table.msrs,
            [d.table.lookup(*k) for k in asked])  # fmt: skip


def _same(text: str) -> None:
    assert _answer(canonical.loads, text) == _answer(formats.loads, text)


@pytest.mark.parametrize("n", range(len(TEXTS)))
def test_the_writers_layout_reads_the_same(n: int) -> None:
    text = TEXTS[n]
    assert canonical.split(text, formats.MAX_ENTRIES) is not None  # the fast path took it
    _same(text)
    _same(text)  # and again, from the memo of lines and tables


def _settings(examples: int) -> Callable[[Any], Any]:
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None)


@_settings(600)
@given(st.sampled_from(TEXTS), st.data())
def test_any_mutation_reads_the_same(text: str, data: st.DataObject) -> None:
    i = data.draw(st.integers(0, len(text) - 1))
    kind = data.draw(st.sampled_from(["replace", "delete", "insert", "dup-line", "swap-lines"]))
    char = data.draw(st.sampled_from(list('0123456789abcdefABx",:{}[] \n\\-+_é')))
    lines = text.split("\n")
    j = data.draw(st.integers(0, len(lines) - 1))
    if kind == "replace":
        mutated = text[:i] + char + text[i + 1:]
    elif kind == "delete":
        mutated = text[:i] + text[i + 1:]
    elif kind == "insert":
        mutated = text[:i] + char + text[i:]
    elif kind == "dup-line":
        mutated = "\n".join([*lines[:j], lines[j], *lines[j:]])
    else:
        k = min(j + 1, len(lines) - 1)
        lines[j], lines[k] = lines[k], lines[j]
        mutated = "\n".join(lines)
    _same(mutated)


@pytest.mark.parametrize("edit", [
    lambda t: t.replace('"flags": "0x1"', '"flags": "0x8"', 1),  # unknown flag bits
    lambda t: t.replace('"index": "0x00"', '"index": "0x01"', 1),  # a subleaf without the flag
    lambda t: t.replace('"function": "0x00000000"', '"function": "0x00000001"', 1),  # no leaf 0
    lambda t: t.replace('"version": 2', '"version": 3', 1),
    lambda t: t.replace('"kind": "supported"', '"kind": "emulated"', 1),
    lambda t: t.replace('"host": {', '"host": {"a": "b", "a": "c", ', 1),  # a key twice
    lambda t: t.replace('"eax": "0x', '"eax": "0X', 1),  # upper-case prefix: full reader
    lambda t: t.replace("\n  ]\n}", ",\n  ]\n}", 1),  # a trailing comma
])  # fmt: skip
def test_targeted_edits_read_the_same(edit: Callable[[str], str]) -> None:
    for text in TEXTS:
        mutated = edit(text)
        assert mutated != text
        _same(mutated)


# The header's "host" line is read apart from the rest (canonical._header):
# edits of that line, and of the lines around it, read as the full reader
# reads them.
@pytest.mark.parametrize("edit", [
    lambda t: t.replace('"host": {', '"host": [{', 1)
    .replace('},\n  "entries"', '}],\n  "entries"', 1),  # a list
    lambda t: t.replace('"host": {', '"host": {"x": {"y": "z"}, ', 1),  # not a string
    lambda t: t.replace('"host": {', '"host": {"x": 1, ', 1),
    lambda t: t.replace('"host": {', '"host": {"x": "a\\u0007b", ', 1),  # unprintable
    lambda t: t.replace('"host": {', '"host": {"x": "\\ud800", ', 1),  # a lone surrogate
    lambda t: t.replace('"host": {', '"host": {"x": "\\u00e9t\\u00e9", ', 1),  # fine
    lambda t: t.replace('"host": {', '"host": {"x": "a", "x": "a", ', 1),  # same value twice
    lambda t: t.replace('"host": {', '"host": {}, "host": {', 1),  # the key twice, one line
    lambda t: t.replace('  "host": {', '  "host": {},\n  "host": {', 1),  # twice, two lines
    lambda t: t.replace('  "kind"', '  "host": {"a": "b"},\n  "kind"', 1),  # twice, apart
    lambda t: t.replace('},\n  "entries"', '}\n  ,"entries"', 1),  # the comma moved
    lambda t: t.replace('},\n  "entries"', '},,\n  "entries"', 1),
    lambda t: t.replace('},\n  "entries"', '} ,\n  "entries"', 1),
    lambda t: t.replace('"host": {', '"host": \n{', 1),  # the value on its own line
    lambda t: t.replace('"host": {', '"host": {"n": "' + "9" * 5000 + '", ', 1),
    lambda t: t.replace('"host": {', '"host": ' + "[" * 100_000, 1),  # nested too deeply
    lambda t: t.replace('"host": {', '"host": null, "x": {', 1),
    lambda t: t.replace('"host": {', '"host": {"host": {"q": "r"}\n}, "x": {', 1),  # nested
    lambda t: t.replace('"host": {', '"host": {"a": "b",\n  "host": {"q": "r"}\n}, "x": {', 1),
    lambda t: t.replace('  "host": {"hostname": "h0"},\n', "", 1),  # no host: {}
    lambda t: t.replace('"host": {', '"host": {"x": "y"} , "notes": ["a"], "z": {', 1),
])  # fmt: skip
def test_host_line_edits_read_the_same(edit: Callable[[str], str]) -> None:
    for text in TEXTS:
        mutated = edit(text)
        if mutated == text:
            continue
        _same(mutated)
        _same(mutated)  # and again, through the memo of headers


def test_hosts_that_differ_in_their_host_line_alone_read_as_written() -> None:
    # Many hosts share one header but for "host": each reads its own.
    for n, text in enumerate(TEXTS):
        for name in ("a", "b", 'q"uote', "\u00e9"):
            mutated = text.replace(f'"hostname": "h{n}"', f'"hostname": {json.dumps(name)}', 1)
            assert canonical.loads(mutated, SOURCE).host == {"hostname": name}
            _same(mutated)


@_settings(400)
@given(st.sampled_from(TEXTS), st.data())
def test_any_header_mutation_reads_the_same(text: str, data: st.DataObject) -> None:
    end = text.index('\n  "entries"') + 2
    i = data.draw(st.integers(0, end))
    kind = data.draw(st.sampled_from(["replace", "delete", "insert"]))
    char = data.draw(st.sampled_from(list('0123456789abx",:{}[] \n\\-+_é\x07')))
    if kind == "replace":
        mutated = text[:i] + char + text[i + 1:]
    elif kind == "delete":
        mutated = text[:i] + text[i + 1:]
    else:
        mutated = text[:i] + char + text[i:]
    _same(mutated)


def test_a_full_memo_of_lines_reads_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    # Past its bound the memo keeps no new line: those are read each time.
    monkeypatch.setattr(canonical, "_MAX_LINES", 0)
    monkeypatch.setattr(canonical, "_LINES", {})
    monkeypatch.setattr(canonical, "_TABLES", {})
    for n, text in enumerate(TEXTS):
        mutated = text.replace('"eax": "0x0000000', f'"eax": "0x{n + 1:07x}', 1)
        assert canonical.split(mutated, formats.MAX_ENTRIES) is not None
        _same(mutated)
    assert canonical._LINES == {}
