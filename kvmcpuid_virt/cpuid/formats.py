"""CPUID table file formats, each read and written:

- ``json``: this project's versioned dump (hex strings) with host metadata;
- ``cpudata``: libvirt's ``<cpudata arch='x86'><cpuid eax_in=.../></cpudata>``;
- ``cpuid``: the text ``cpuid -1r`` prints.

Dumps come from other hosts, so every reader refuses what is malformed or
ambiguous and reports the file and the line (JSON: the entry and its line) of
the first problem as a DumpFormatError: syntax, values out of range (32-bit
registers, leaf and subleaf; flags), wrong JSON types, repeated JSON keys,
unknown keys, attributes or elements, more than MAX_ENTRIES entries, and a
table that is not one CPUID table (table.first_problem: no leaf 0, a
(leaf, subleaf) listed twice, entries beyond their max leaf, ...).

Flag-less formats (<cpudata>, `cpuid -1r`) get SIGNIFICANT_INDEX back for
the leaves INDEXED_LEAVES names and for any leaf the file lists at a subleaf
other than 0 (the tool that wrote it read that subleaf on purpose).

Feature MSRs (CpuidTable.msrs): the JSON dump carries them from version 2 on
("feature_msrs": whether KVM offered KVM_CAP_GET_MSR_FEATURES, index ->
value, and, when a vCPU was tried, the bits of each it accepts); a version-1
dump and `cpuid -1r` text have none (msrs None: unknown, not zero); libvirt's
<cpudata> carries the <msr index= edx= eax=/> elements libvirt writes there
(which MSRs a vCPU accepts is not known from it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from kvmcpuid_virt.cpuid.table import (
    INDEXED_LEAVES,
    REGISTERS,
    CpuidEntry,
    CpuidTable,
    EntryFlag,
    first_problem,
)
from kvmcpuid_virt.errors import DumpFormatError

TYPE_CHECKING = False  # the fast path's typing stand-in: docs/ARCHITECTURE.md, Start-up
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any, Final, Literal

    from kvmcpuid_virt.cpuid.msr_values import FeatureMsrs

__all__ = [
    "FORMATS",
    "JSON_FORMAT_NAME",
    "JSON_FORMAT_VERSION",
    "Dump",
    "DumpKind",
    "Format",
    "dumps",
    "loads",
    "read_host",
    "sniff",
]

if TYPE_CHECKING:
    Format = Literal["json", "cpudata", "cpuid"]
    DumpKind = Literal["supported", "emulated", "cpu", "guest", "config"]
FORMATS: Final[tuple[Format, ...]] = ("json", "cpudata", "cpuid")
_KINDS: Final[tuple[DumpKind, ...]] = ("supported", "emulated", "cpu", "guest", "config")
JSON_FORMAT_NAME: Final = "kvmcpuid-dump"
JSON_FORMAT_VERSION: Final = 2
# Version 1: no feature MSRs (read with msrs None).
READ_VERSIONS: Final = (1, 2)
_U32: Final = 0xFFFF_FFFF
_U64: Final = 0xFFFF_FFFF_FFFF_FFFF
# More than any KVM lists (about 30 with nested VMX): a bound for hostile files.
MAX_MSRS: Final = 1024
# Bigger than any real table by far; a bound so a hostile file cannot make us
# build millions of entries.
MAX_ENTRIES: Final = 4096


class Dump:
    """A CPUID table and what is known about where it came from: the kind of
    table and the host metadata (kernel, KVM API, CPU, microcode, ...)."""

    __slots__ = ("host", "kind", "source", "table")

    def __init__(
        self,
        table: CpuidTable,
        kind: DumpKind = "supported",
        host: Mapping[str, str] | None = None,
        source: str = "<memory>",
    ) -> None:
        self.table = table
        self.kind: DumpKind = kind
        self.host: dict[str, str] = dict(host or {})
        self.source = source

    def __repr__(self) -> str:
        return f"Dump({self.table!r}, kind={self.kind!r}, source={self.source!r})"

    @property
    def msrs(self) -> FeatureMsrs | None:
        """The feature MSRs the dump carries (None: its format has none)."""
        return self.table.msrs


def __getattr__(name: str) -> object:
    # Typing-only aliases (see TYPE_CHECKING above), for run-time importers.
    # Check the name first: the import system probes attributes like __path__.
    if name == "Format":
        from typing import Literal

        return Literal["json", "cpudata", "cpuid"]
    if name == "DumpKind":
        from typing import Literal

        return Literal["supported", "emulated", "cpu", "guest", "config"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _flag_less(rows: Iterable[tuple[int, int, int, int, int, int]]) -> list[CpuidEntry]:
    """Entries of a format without flags: SIGNIFICANT_INDEX for the leaves
    INDEXED_LEAVES names and for every leaf listed at a subleaf other than 0."""
    rows = list(rows)
    indexed = INDEXED_LEAVES | {r[0] for r in rows if r[1]}
    sig, none = EntryFlag.SIGNIFICANT_INDEX, EntryFlag.NONE
    return [CpuidEntry(f, i, sig if f in indexed else none, a, b, c, d)
            for f, i, a, b, c, d in rows]  # fmt: skip


def _check(entries: list[CpuidEntry], source: str, line: Callable[[int], int | None],
           name: Callable[[int], str], need_vendor: bool = True) -> None:  # fmt: skip
    """DumpFormatError at the entry of the table's first problem (first_problem)."""
    problem = first_problem(entries, name, need_vendor=need_vendor)
    if problem is not None:
        at, reason = problem
        raise DumpFormatError(source, None if at is None else line(at), reason)


def _by_line(lines: list[int] | list[int | None]) -> Callable[[int], str]:
    """Names entry i by its line, for table.first_problem's messages."""
    return lambda i: f"line {lines[i]}"


def sniff(text: str) -> Format:
    head = text.lstrip()[:1]
    if head in ("{", "["):
        return "json"
    if head == "<":
        return "cpudata"
    return "cpuid"


def loads(text: str, source: str = "<string>") -> Dump:
    """The dump in `text`, any format (sniffed); DumpFormatError naming
    `source` and the line otherwise. A leading byte order mark is ignored."""
    text = text.removeprefix("\ufeff")
    fmt = sniff(text)
    if fmt == "json":
        return _load_json(text, source)
    if fmt == "cpudata":
        return _load_cpudata(text, source)
    return _load_cpuid_text(text, source)


def dumps(dump: Dump, fmt: Format = "json") -> str:
    if fmt == "json":
        return _dump_json(dump)
    if fmt == "cpudata":
        return _dump_cpudata(dump)
    if fmt == "cpuid":
        return _dump_cpuid_text(dump)
    raise ValueError(f"unknown format {fmt!r}")


# --- JSON -------------------------------------------------------------------


def _dump_json(dump: Dump) -> str:
    # One entry per line: readable in a diff, and a reader can name the line
    # of a bad entry.
    head = {
        "format": JSON_FORMAT_NAME,
        "version": JSON_FORMAT_VERSION,
        "kind": dump.kind,
        "host": dict(dump.host),
    }
    msrs = dump.table.msrs
    if msrs is not None:
        head["feature_msrs"] = _msrs_json(msrs)
    lines = ["{"]
    for key, value in head.items():
        lines.append(f"  {json.dumps(key)}: {json.dumps(value, sort_keys=True)},")
    lines.append('  "entries": [')
    rows = []
    for e in dump.table:
        row: dict[str, str] = {
            "function": f"{e.function:#010x}",
            "index": f"{e.index:#04x}",
            "flags": f"{int(e.flags):#x}",
            **{r: f"{e.reg(r):#010x}" for r in REGISTERS},
        }
        rows.append("    " + json.dumps(row))
    lines.append(",\n".join(rows))
    lines.append("  ]")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _msrs_json(msrs: FeatureMsrs) -> dict[str, object]:
    if not msrs.available:
        return {"available": False, **({"why": msrs.why} if msrs.why else {})}
    doc: dict[str, object] = {
        "available": True, "values": {f"{i:#010x}": f"{v:#018x}" for i, v in msrs.items}
    }  # fmt: skip
    if msrs.deliverable is not None:
        doc["deliverable"] = {f"{i:#010x}": f"{v:#018x}" for i, v in msrs.deliverable}
    return doc


def _repeated_key(pairs: list[tuple[str, object]]) -> str:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return key
        seen.add(key)
    return ""


def _entry_lines(text: str) -> list[int]:
    """The line of each element of the top-level "entries" array of a valid
    JSON text, by a token scan (json keeps no positions; only errors need it)."""
    import re

    token = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}:,]|[^\s\[\]{}:,"]+', re.S)
    lines: list[int] = []
    depth, key, in_entries, expect = 0, "", False, False
    line, last = 1, 0
    for m in token.finditer(text):
        tok = m.group()
        if expect and tok != "]":
            line += text.count("\n", last, m.start())
            last = m.start()
            lines.append(line)
        expect = False
        if tok == "{" or tok == "[":
            depth += 1
            if tok == "[" and depth == 2 and key == "entries":
                in_entries = expect = True
        elif tok == "}" or tok == "]":
            depth -= 1
            if depth == 1:
                in_entries = False
        elif tok == "," and in_entries and depth == 2:
            expect = True
        elif tok[0] == '"' and depth == 1:
            key = json.loads(tok)
    return lines


def _entry_line(text: str, n: int) -> int | None:
    """The line of the n-th entry object (None if the scan cannot tell)."""
    lines = _entry_lines(text)
    return lines[n] if 0 <= n < len(lines) else None


def _show(value: object) -> str:
    """repr() for an error message, cut to ~40 characters: a hostile dump's
    'register' can be megabytes, and the message must stay one short line."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _hex32(value: Any, what: str) -> int:
    """A register or leaf number from a dump: a hex string ('0x1f', '1f') or
    an int, within 32 bits. Stricter than int(x, 16), which also takes signs,
    underscores, spaces and non-ASCII digits; and fast, since a 1000-host
    baseline reads a million of these (benchmarks/bench_baseline.py)."""
    if type(value) is str:
        digits = value[2:] if value[:2] in ("0x", "0X") else value
        if 0 < len(digits) <= 16 and digits.isascii() and digits.isalnum():
            try:
                number = int(digits, 16)
            except ValueError:
                number = -1
            if 0 <= number <= _U32:
                return number
            if number > _U32:
                raise ValueError(f"{what}: {_show(value)} does not fit 32 bits")
        raise ValueError(f"{what}: expected a hex string like '0x1f', got {_show(value)}")
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value <= _U32:
            raise ValueError(f"{what}: {_show(value)} does not fit 32 bits")
        return value
    raise ValueError(f"{what}: expected a hex string like '0x1f', got {_show(value)}")


# "notes": what `kvmcpuid baseline --format json` adds (a list of strings),
# read and not kept.
_TOP_KEYS: Final = frozenset({"format", "version", "kind", "host", "entries", "notes"})
_TOP_KEYS_V2: Final = _TOP_KEYS | {"feature_msrs"}
_MSR_KEYS: Final = frozenset({"available", "why", "values", "deliverable"})
_ENTRY_KEYS: Final = frozenset({"function", "index", "flags", *REGISTERS})


class _Repeats(dict[int, tuple[object, str]]):
    """id(object) -> (the object, a key it has twice). Holding the object
    keeps its id from being reused by another one."""

    def key(self, obj: object) -> str | None:
        found = self.get(id(obj))
        return None if found is None else found[1]


def _parse_json(text: str, source: str) -> tuple[Any, _Repeats]:
    """The document, and its objects that have a key twice (json keeps the
    last one silently)."""
    repeats = _Repeats()

    def pairs_hook(pairs: list[tuple[str, object]]) -> dict[str, object]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            repeats[id(obj)] = (obj, _repeated_key(pairs))
        return obj

    try:
        return json.loads(text, object_pairs_hook=pairs_hook), repeats
    except json.JSONDecodeError as exc:
        raise DumpFormatError(source, exc.lineno, f"not valid JSON: {exc.msg}") from None
    except RecursionError:
        # json's decoder recurses per '[' or '{'; 100000 of them used to
        # crash the CLI with a traceback.
        raise DumpFormatError(source, None, "JSON nested too deeply") from None
    except ValueError:
        # int() refuses more than sys.get_int_max_str_digits() digits.
        raise DumpFormatError(source, None, "not valid JSON: a number too long to read") from None


def _load_json(text: str, source: str) -> Dump:
    doc, repeats = _parse_json(text, source)
    if not isinstance(doc, dict):
        raise DumpFormatError(source, 1, "expected a JSON object")
    if "return" in doc and "entries" not in doc:
        raise DumpFormatError(
            source, None, "this is a QEMU QMP reply, not a CPUID dump (use `kvmcpuid dump`)"
        )
    if doc.get("format") != JSON_FORMAT_NAME:
        raise DumpFormatError(source, 1, f"not a {JSON_FORMAT_NAME} file (no 'format' key)")
    if repeats.key(doc) is not None:
        raise DumpFormatError(source, None, f"key {_show(repeats.key(doc))} given twice")
    version = doc.get("version")
    if type(version) is not int or version not in READ_VERSIONS:  # True == 1 in Python
        raise DumpFormatError(
            source, None, f"dump version {_show(version)}; this tool reads versions "
            f"{', '.join(map(str, READ_VERSIONS))}"
        )  # fmt: skip
    unknown = set(doc) - (_TOP_KEYS if version == 1 else _TOP_KEYS_V2)
    if unknown:
        later = " (feature MSRs came with version 2)" if "feature_msrs" in unknown else ""
        raise DumpFormatError(source, None, f"unknown keys {_show(sorted(unknown))}{later}")
    msrs = _load_msrs(doc["feature_msrs"], repeats, source) if "feature_msrs" in doc else None
    notes = doc.get("notes", [])
    if not (isinstance(notes, list) and all(type(n) is str for n in notes)):
        raise DumpFormatError(source, None, "'notes' must be a list of strings")
    given_kind = doc.get("kind", "supported")
    kind = next((k for k in _KINDS if k == given_kind and type(given_kind) is str), None)
    if kind is None:
        raise DumpFormatError(source, None, f"unknown kind {_show(given_kind)}")
    host = doc.get("host", {})
    if repeats.key(host) is not None:
        raise DumpFormatError(source, None, f"host key {_show(repeats.key(host))} given twice")
    host = read_host(host, source)
    raw_entries = doc.get("entries")
    if not isinstance(raw_entries, list):
        raise DumpFormatError(source, None, "'entries' must be a list")
    if len(raw_entries) > MAX_ENTRIES:
        raise DumpFormatError(source, None, f"{len(raw_entries)} entries (limit {MAX_ENTRIES})")
    entries = []
    hex32 = _hex32
    for n, raw in enumerate(raw_entries):
        # Inline, not a function per entry: see _hex32 on speed.
        try:
            if not isinstance(raw, dict):
                raise ValueError("entry is not an object")
            if repeats and repeats.key(raw) is not None:
                raise ValueError(f"key {_show(repeats.key(raw))} given twice")
            if not raw.keys() <= _ENTRY_KEYS:
                raise ValueError(f"unknown keys {_show(sorted(raw.keys() - _ENTRY_KEYS))}")
            if "function" not in raw:
                raise ValueError("entry has no 'function'")
            flags = hex32(raw.get("flags", "0"), "flags")
            if flags & ~7:
                raise ValueError(f"flags {flags:#x} has unknown bits")
            entries.append(
                CpuidEntry(
                    hex32(raw["function"], "function"), hex32(raw.get("index", "0"), "index"),
                    flags, hex32(raw.get("eax", "0"), "eax"), hex32(raw.get("ebx", "0"), "ebx"),
                    hex32(raw.get("ecx", "0"), "ecx"), hex32(raw.get("edx", "0"), "edx"),
                )
            )  # fmt: skip
        except ValueError as exc:
            raise DumpFormatError(source, _entry_line(text, n), f"entry {n}: {exc}") from None

    def name(n: int) -> str:
        line = _entry_line(text, n)
        return f"entry {n}" if line is None else f"entry {n} at line {line}"

    problem = first_problem(entries, name, need_vendor=kind != "emulated")
    if problem is not None:
        at, reason = problem
        if at is None:
            raise DumpFormatError(source, None, reason)
        raise DumpFormatError(source, _entry_line(text, at), f"entry {at}: {reason}")
    return Dump(CpuidTable(entries, msrs), kind, host, source)


def _hex64(value: Any, what: str, limit: int = _U64) -> int:
    """A 64-bit MSR value (or a 32-bit index, limit _U32) from a dump: a hex
    string only, as the writer writes it."""
    if type(value) is str:
        digits = value[2:] if value[:2] in ("0x", "0X") else ""
        if 0 < len(digits) <= 16 and digits.isascii() and digits.isalnum():
            try:
                number = int(digits, 16)
            except ValueError:
                number = -1
            if 0 <= number <= limit:
                return number
    raise ValueError(f"{what}: expected a hex string like '0x10a' within "
                     f"{limit.bit_length()} bits, got {_show(value)}")  # fmt: skip


def _msr_map(raw: Any, repeats: _Repeats, what: str) -> list[tuple[int, int]]:
    if not isinstance(raw, dict):
        raise ValueError(f"'{what}' must map MSR indices to values")
    if repeats.key(raw) is not None:
        raise ValueError(f"{what}: MSR {_show(repeats.key(raw))} given twice")
    if len(raw) > MAX_MSRS:
        raise ValueError(f"{what}: {len(raw)} MSRs (limit {MAX_MSRS})")
    out: dict[int, int] = {}
    for k, v in raw.items():
        index = _hex64(k, f"{what} MSR index", _U32)
        if index in out:
            raise ValueError(f"{what}: MSR {index:#x} given twice")
        out[index] = _hex64(v, f"{what} of MSR {index:#x}")
    return sorted(out.items())


def _load_msrs(raw: Any, repeats: _Repeats, source: str) -> FeatureMsrs:
    """The 'feature_msrs' object of a version-2 dump."""
    from kvmcpuid_virt.cpuid.msr_values import FeatureMsrs

    try:
        if not isinstance(raw, dict):
            raise ValueError("must be an object")
        if repeats.key(raw) is not None:
            raise ValueError(f"key {_show(repeats.key(raw))} given twice")
        unknown = raw.keys() - _MSR_KEYS
        if unknown:
            raise ValueError(f"unknown keys {_show(sorted(unknown))}")
        available = raw.get("available")
        if type(available) is not bool:
            raise ValueError(f"'available' must be true or false, not {_show(available)}")
        why = raw.get("why", "")
        if type(why) is not str or not why.isprintable():
            raise ValueError("'why' must be a printable string")
        if not available:
            if "values" in raw or "deliverable" in raw:
                raise ValueError("values given although 'available' is false")
            return FeatureMsrs.absent(why)
        if "values" not in raw:
            raise ValueError("'values' missing although 'available' is true")
        values = _msr_map(raw["values"], repeats, "values")
        accepts = (_msr_map(raw["deliverable"], repeats, "deliverable")
                   if "deliverable" in raw else None)  # fmt: skip
        return FeatureMsrs(values, True, accepts, why)
    except ValueError as exc:
        raise DumpFormatError(source, None, f"feature_msrs: {exc}") from None


def read_host(host: Any, source: str) -> dict[str, str]:
    """The 'host' metadata: printable strings only (they reach terminals and
    one-line messages; a lone surrogate could not even be printed)."""
    if not isinstance(host, dict) or not all(
        type(k) is str and type(v) is str for k, v in host.items()
    ):
        raise DumpFormatError(source, None, "'host' must map strings to strings")
    for k, v in host.items():
        if not (k.isprintable() and v.isprintable()):
            raise DumpFormatError(
                source, None, f"host {_show(k)}: {_show(v)} has a control or unprintable character"
            )
    return dict(host)


# --- libvirt <cpudata> --------------------------------------------------------


def _line(el: Any) -> int | None:
    line = el.sourceline
    return line if isinstance(line, int) else None


_CPUID_ATTRS: Final = frozenset({"eax_in", "ecx_in", *REGISTERS})


def _load_cpudata(text: str, source: str) -> Dump:
    from kvmcpuid_virt.xmlutil import parse_xml

    try:
        root = parse_xml(text, source)
    except UnicodeEncodeError:  # a str from elsewhere than a file: lone surrogates
        raise DumpFormatError(source, None, "not Unicode text (a lone surrogate)") from None
    if root.tag != "cpudata":
        raise DumpFormatError(source, _line(root), f"expected <cpudata>, found <{_show_tag(root)}>")
    arch = root.get("arch")
    if arch not in (None, "x86"):
        raise DumpFormatError(source, _line(root), f"arch {_show(arch)} is not x86")
    _only_attrs(root, {"arch"}, source)
    _no_text(root.text, root, source, "in <cpudata>")
    rows = []
    lines: list[int | None] = []
    msrs: dict[int, int] = {}
    for el in root:
        _no_text(el.tail, el, source, "between the elements of <cpudata>")
        if not isinstance(el.tag, str):
            continue  # comments and processing instructions
        if el.tag == "msr":
            # libvirt keeps MSR values beside CPUID: <msr index= edx= eax=/>.
            _only_attrs(el, {"index", "edx", "eax"}, source)
            if len(el) or (el.text or "").strip():
                raise DumpFormatError(source, _line(el), "<msr> has content; it takes attributes")
            try:
                index = _hex32(_required(el, "index"), "index")
                value = _hex32(el.get("edx", "0"), "edx") << 32 | _hex32(el.get("eax", "0"), "eax")
            except ValueError as exc:
                raise DumpFormatError(source, _line(el), str(exc)) from None
            if index in msrs:
                raise DumpFormatError(source, _line(el), f"<msr index='{index:#x}'> listed again")
            if len(msrs) >= MAX_MSRS:
                raise DumpFormatError(source, _line(el), f"more than {MAX_MSRS} <msr> elements")
            msrs[index] = value
            continue
        if el.tag != "cpuid":
            raise DumpFormatError(source, _line(el), f"unexpected element <{_show_tag(el)}>")
        _only_attrs(el, _CPUID_ATTRS, source)
        if len(el) or (el.text or "").strip():
            raise DumpFormatError(source, _line(el), "<cpuid> has content; it takes attributes")
        try:
            function = _hex32(_required(el, "eax_in"), "eax_in")
            index = _hex32(el.get("ecx_in", "0"), "ecx_in")
            eax, ebx, ecx, edx = (_hex32(el.get(r, "0"), r) for r in REGISTERS)
        except ValueError as exc:
            raise DumpFormatError(source, _line(el), str(exc)) from None
        rows.append((function, index, eax, ebx, ecx, edx))
        lines.append(_line(el))
        if len(rows) > MAX_ENTRIES:
            raise DumpFormatError(source, _line(el), f"more than {MAX_ENTRIES} entries")
    entries = _flag_less(rows)
    _check(entries, source, lines.__getitem__, _by_line(lines))
    found = None
    if msrs:
        from kvmcpuid_virt.cpuid.msr_values import FeatureMsrs

        found = FeatureMsrs.of(msrs)
    return Dump(CpuidTable(entries, found), "cpu", {}, source)


def _show_tag(el: Any) -> str:
    return _show(str(el.tag))[1:-1]


def _only_attrs(el: Any, allowed: frozenset[str] | set[str], source: str) -> None:
    unknown = sorted(str(k) for k in el.attrib if k not in allowed)
    if unknown:
        raise DumpFormatError(
            source, _line(el), f"<{el.tag}> has unknown attribute {_show(unknown[0])}"
        )


def _no_text(text: str | None, el: Any, source: str, where: str) -> None:
    if text is not None and text.strip():
        raise DumpFormatError(source, _line(el), f"unexpected text {where}: {_show(text.strip())}")


def _required(el: Any, name: str) -> str:
    value = el.get(name)
    if value is None:
        raise ValueError(f"<{el.tag}> lacks {name}=")
    return str(value)


def _dump_cpudata(dump: Dump) -> str:
    from lxml import etree

    root = etree.Element("cpudata", arch="x86")
    for e in dump.table:
        attrs: dict[str, str] = {"eax_in": f"{e.function:#010x}", "ecx_in": f"{e.index:#04x}"}
        attrs.update((r, f"{e.reg(r):#010x}") for r in REGISTERS)
        etree.SubElement(root, "cpuid", attrs)
    # libvirt's own spelling of an MSR value; what a vCPU accepts has no place.
    for index, value in dump.table.msrs.items if dump.table.msrs is not None else ():
        etree.SubElement(root, "msr", {"index": f"{index:#x}", "edx": f"{value >> 32:#010x}",
                                       "eax": f"{value & _U32:#010x}"})  # fmt: skip
    out: bytes = etree.tostring(root, pretty_print=True, encoding="utf-8")
    return out.decode()


# --- `cpuid -1r` text -----------------------------------------------------------

_CPUID_LINE: Final = (
    r"\s*(0x[0-9a-fA-F]{1,8})\s+(0x[0-9a-fA-F]{1,8}):"
    r"\s+eax=(0x[0-9a-fA-F]{1,8})\s+ebx=(0x[0-9a-fA-F]{1,8})"
    r"\s+ecx=(0x[0-9a-fA-F]{1,8})\s+edx=(0x[0-9a-fA-F]{1,8})\s*"
)
_CPU_HEADER: Final = r"CPU(?:\s+(\d{1,6}))?:\s*"


def _load_cpuid_text(text: str, source: str) -> Dump:
    """`cpuid -1r` prints one block headed `CPU:`; `cpuid -r` one per CPU,
    headed `CPU 0:`, `CPU 1:`...: the first block is the table (CPUs differ
    only in per-CPU fields), every block is checked. Lines are counted at
    '\n' only, as editors do (str.splitlines also splits at \x1c, \u2028...)."""
    import re

    # ASCII: \s must not take U+00A0 or U+3000 for a separator.
    cpuid_line = re.compile(_CPUID_LINE, re.ASCII)
    cpu_header = re.compile(_CPU_HEADER, re.ASCII)
    blocks: list[tuple[list[tuple[int, int, int, int, int, int]], list[int]]] = []
    headers: dict[str, int] = {}
    rows: list[tuple[int, int, int, int, int, int]] = []
    lines: list[int] = []
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        header = cpu_header.fullmatch(line.strip())
        if header:
            label = header.group(1) or ""
            if label in headers:
                raise DumpFormatError(
                    source, lineno, f"a second {line.strip()!r} block (the first at line "
                    f"{headers[label]}): several runs of cpuid in one file?"
                )  # fmt: skip
            if rows and not headers:
                raise DumpFormatError(source, lineno, "a 'CPU' header after lines without one")
            if headers and (label == "") != ("" in headers):
                raise DumpFormatError(source, lineno, "'CPU:' and 'CPU N:' headers mixed")
            headers[label] = lineno
            rows, lines = [], []
            blocks.append((rows, lines))
            continue
        m = cpuid_line.fullmatch(line)
        if not m:
            raise DumpFormatError(
                source, lineno, "expected '0xLEAF 0xSUB: eax=0x... ebx=0x... ecx=0x... edx=0x...'"
            )
        if not blocks:
            blocks.append((rows, lines))
        function, index, eax, ebx, ecx, edx = (int(g, 16) for g in m.groups())
        rows.append((function, index, eax, ebx, ecx, edx))
        lines.append(lineno)
        if len(rows) > MAX_ENTRIES:
            raise DumpFormatError(source, lineno, f"more than {MAX_ENTRIES} entries")
    if not any(block_rows for block_rows, _ in blocks):
        raise DumpFormatError(source, None, "no CPUID lines found")
    tables = []
    for block_rows, block_lines in blocks:
        entries = _flag_less(block_rows)
        _check(entries, source, block_lines.__getitem__, _by_line(block_lines))
        tables.append(entries)
    return Dump(CpuidTable(tables[0]), "cpu", {}, source)


def _dump_cpuid_text(dump: Dump) -> str:
    lines = ["CPU:"]
    for e in dump.table:
        lines.append(
            f"   {e.function:#010x} {e.index:#04x}: eax={e.eax:#010x} ebx={e.ebx:#010x} "
            f"ecx={e.ecx:#010x} edx={e.edx:#010x}"
        )
    return "\n".join(lines) + "\n"
