"""The fast path of the JSON dump reader: a dump in exactly the layout
`kvmcpuid dump` writes (one entry a line, lowercase hex, keys in the
writer's order) has its entries read line by line through a memo of the
lines seen, and only its header goes through the full reader.

A fleet's dumps share almost every line (hosts of one model report the same
leaves), so a baseline of thousands of dumps parses each distinct line once
and checks each distinct table shape once. Every line taken here is one the
full reader (formats.loads) would accept: the pattern admits only the
writer's keys, once each, in its order, with at most 8 hex digits (32 bits)
and flags 0..7; the table passes table.first_problem. Anything else, any
deviation at all, goes to the full reader, which names what is wrong with
it: every malformed-input check stays where it is, with its message.

Pure: a function of the text.
"""

from __future__ import annotations

import json
import re

from kvmcpuid_virt.cpuid import formats
from kvmcpuid_virt.cpuid.table import CpuidEntry, CpuidTable, EntryFlag, first_problem
from kvmcpuid_virt.errors import DumpFormatError

TYPE_CHECKING = False  # the fast path's typing stand-in: docs/ARCHITECTURE.md, Start-up
if TYPE_CHECKING:
    from typing import Final

    from kvmcpuid_virt.cpuid.formats import Dump, DumpKind
    from kvmcpuid_virt.cpuid.msr_values import FeatureMsrs
    from kvmcpuid_virt.cpuid.table import TableLayout

__all__ = ["loads", "split"]

# Where the writer's header ends and its entries begin, and how it closes the
# document. JSON strings cannot hold a raw newline, so the first occurrence
# of START is the "entries" key itself whenever the header is valid JSON
# (which the full reader then checks on the header alone).
_START: Final = '\n  "entries": [\n'
_END: Final = "\n  ]\n}\n"

_HEX8: Final = "0x([0-9a-f]{8})"
# One entry as the writer prints it, without the ",\n" that joins entries.
_LINE: Final = re.compile(
    r' {4}\{"function": ' + f'"{_HEX8}"' + r', "index": "0x([0-9a-f]{2,8})", '
    r'"flags": "0x([0-7])", "eax": ' + f'"{_HEX8}", "ebx": "{_HEX8}", "ecx": "{_HEX8}", '
    f'"edx": "{_HEX8}"' + r"\}"
)
_FLAGS: Final = tuple(EntryFlag(i) for i in range(8))

# Each distinct line -> (its entry, the line as first seen, its shape token;
# see _SHAPES). Both strings are kept as first seen so their hashes are
# computed once, which makes the keys of _TABLES and _SHAPES cheap. Bounded:
# a stream of all-different dumps must not grow these without end.
_Line = tuple[CpuidEntry, str, str]
_LINES: dict[str, _Line] = {}
_MAX_LINES: Final = 200_000
# A table's lines -> the table: hosts of one configuration share one
# (immutable) CpuidTable, which the baseline and the matrix then see as one.
_TABLES: dict[tuple[str, ...], CpuidTable] = {}
# A table's shape -> whether it is one CPUID table (table.first_problem
# finds nothing). What first_problem looks at is each entry's leaf, subleaf
# and flags, and the values of leaves 0 and 0x80000000 only: the shape token
# of a line is "leaf.subleaf.flags", or the whole line for those two leaves.
# Hosts whose tables differ in feature bits alone share one shape. Its value:
# the layout of such tables (CpuidTable.layout), None when they are not one.
_SHAPES: dict[tuple[str, ...], TableLayout | None] = {}
_UNSEEN: Final[TableLayout] = ({}, {})
_WHOLE_LINE: Final = frozenset({0x0, 0x8000_0000})
# (id of a table, feature MSRs) -> (that table, kept alive so that its id
# stays its own; the table carrying the MSRs).
_WITH_MSRS: dict[tuple[int, FeatureMsrs], tuple[CpuidTable, CpuidTable]] = {}
_TOKENS: dict[str, str] = {}
# A header with its "host" value emptied -> (kind, feature MSRs): see _header.
_HOST: Final = '\n  "host": '
_HEADS: dict[str, tuple[DumpKind, FeatureMsrs | None]] = {}
_MAX_TABLES: Final = 20_000


def _entry(line: str) -> _Line | None:
    m = _LINE.fullmatch(line)
    if m is None:
        return None
    f, i, fl, a, b, c, d = m.groups()
    entry = CpuidEntry(int(f, 16), int(i, 16), _FLAGS[int(fl)], int(a, 16), int(b, 16),
                       int(c, 16), int(d, 16))  # fmt: skip
    shape = line if entry.function in _WHOLE_LINE else f"{f}.{i}.{fl}"
    hit = (entry, line, _TOKENS.setdefault(shape, shape))
    if len(_LINES) < _MAX_LINES:
        _LINES[line] = hit
    return hit


def loads(text: str, source: str = "<string>") -> Dump:
    """formats.loads(text, source), faster for the writer's own layout."""
    fast = split(text, formats.MAX_ENTRIES)
    if fast is None:
        return formats.loads(text, source)
    head, table = fast
    # The header through the full reader (its keys, version, kind, host,
    # repeated keys), closed with the table's own leaf 0 as the only entry.
    # Any error is the whole text's to report: where the document goes wrong
    # (a bracket never closed) is not always inside the header.
    shell = _header(head, source)
    if shell is None:
        try:
            got = formats.loads(head, source)
        except DumpFormatError:
            return formats.loads(text, source)
        shell = (got.kind, got.host, got.table.msrs)
    kind, host, msrs = shell
    if msrs is not None:
        # The header's feature MSRs ride on the table; hosts with the same
        # table and MSRs still share one.
        key = (id(table), msrs)
        hit = _WITH_MSRS.get(key)
        if hit is None:
            hit = (table, table.with_msrs(msrs))
            if len(_WITH_MSRS) < _MAX_TABLES:
                _WITH_MSRS[key] = hit
        table = hit[1]
    return formats.Dump(table, kind, host, source)


def _header(head: str, source: str) -> tuple[DumpKind, dict[str, str], FeatureMsrs | None] | None:
    """(kind, host, feature MSRs) of a header, None where the full reader
    must judge it. Hosts of a fleet differ in their "host" line alone: the
    header with that value emptied ({}) is read once by the full reader and
    memoized, and the value is read on its own. That answers as the full
    reader does: a JSON value in a value's place parses independently of the
    rest, the "host" key's other rules (an object, no key twice, printable
    strings) are checked here, and anything else falls back. The memo entry
    says host {}, so what was emptied was the top-level "host" (a second
    one would be a key given twice)."""
    at = head.find(_HOST)
    if at < 0:
        return None
    start = at + len(_HOST)
    end = head.find("\n", start)
    if end < 0:
        return None
    if head[end - 1] == ",":
        end -= 1
    key = f"{head[:start]}{{}}{head[end:]}"
    known = _HEADS.get(key)
    if known is None:
        try:
            got = formats.loads(key, source)
        except DumpFormatError:
            return None
        if got.host:
            return None
        known = (got.kind, got.table.msrs)
        if len(_HEADS) < _MAX_TABLES:
            _HEADS[key] = known
    repeated: list[bool] = []

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        obj = dict(items)
        if len(obj) != len(items):
            repeated.append(True)
        return obj

    try:
        host = json.loads(head[start:end], object_pairs_hook=pairs)
    except ValueError:  # JSONDecodeError, or a number too long to read
        return None
    except RecursionError:
        return None
    if repeated or not isinstance(host, dict):
        return None
    try:
        return known[0], formats.read_host(host, source), known[1]
    except DumpFormatError:
        return None


def split(text: str, max_entries: int) -> tuple[str, CpuidTable] | None:
    """(the header closed with the table's leaf 0 as its only entry, the
    table) of a dump in the writer's exact layout, of at most `max_entries`
    entries that make one CPUID table with a vendor (table.first_problem
    finds nothing); None for anything else."""
    start = text.find(_START)
    if start < 0 or not text.endswith(_END):
        return None
    # The writer joins entries with ",\n"; a missing or extra comma, or a
    # line break inside an entry, leaves a piece the pattern refuses.
    lines = text[start + len(_START) : len(text) - len(_END)].split(",\n")
    if len(lines) > max_entries:
        return None
    hits = list(map(_LINES.get, lines))
    if None in hits:
        # Only the new lines through the pattern, which memoizes them; the
        # lines' hashes are cached, so asking the memo again costs little.
        if any(_entry(line) is None for line in set(lines).difference(_LINES)):
            return None
        hits = list(map(_LINES.get, lines))
        if None in hits:  # the memo is full: its new lines were not kept
            hits = [hit or _entry(line) for hit, line in zip(hits, lines, strict=True)]
    entries, seen, shape = zip(*hits, strict=True)  # type: ignore[misc]
    table = _TABLES.get(seen)
    if table is None:
        layout = _SHAPES.get(shape, _UNSEEN)
        if layout is _UNSEEN:
            # need_vendor: a table that passes with it passes without (an
            # emulated dump's leaf 0 may lack the vendor; the full reader judges).
            layout = None
            if first_problem(entries, str) is None:
                layout = CpuidTable(entries).layout()
            if len(_SHAPES) < _MAX_TABLES:
                _SHAPES[shape] = layout
        if layout is None:
            return None
        # The shape fixes each position's leaf, subleaf and flags, which is
        # all a layout depends on.
        table = CpuidTable.from_layout(entries, layout)
        if len(_TABLES) < _MAX_TABLES:
            _TABLES[seen] = table
    leaf0 = next(line for e, line in zip(entries, seen, strict=True) if e.key == (0, 0))
    return f"{text[:start]}{_START}{leaf0}{_END}", table
