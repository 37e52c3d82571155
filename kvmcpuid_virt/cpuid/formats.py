"""CPUID table file formats, each read and written:

- ``json``: this project's versioned dump (hex strings) with host metadata;
- ``cpudata``: libvirt's ``<cpudata arch='x86'><cpuid eax_in=.../></cpudata>``;
- ``cpuid``: the text ``cpuid -1r`` prints.

Dumps come from other hosts, so every reader validates ranges and reports the
file and line of the first problem as a DumpFormatError.
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
)
from kvmcpuid_virt.errors import DumpFormatError

TYPE_CHECKING = False  # the fast path's typing stand-in: docs/ARCHITECTURE.md, Start-up
if TYPE_CHECKING:
    from typing import Any, Final, Literal

__all__ = [
    "FORMATS",
    "JSON_FORMAT_NAME",
    "JSON_FORMAT_VERSION",
    "Dump",
    "DumpKind",
    "Format",
    "dumps",
    "loads",
    "sniff",
]

if TYPE_CHECKING:
    Format = Literal["json", "cpudata", "cpuid"]
    DumpKind = Literal["supported", "emulated", "cpu", "guest", "config"]
FORMATS: Final[tuple[Format, ...]] = ("json", "cpudata", "cpuid")
_KINDS: Final = ("supported", "emulated", "cpu", "guest", "config")
JSON_FORMAT_NAME: Final = "kvmcpuid-dump"
JSON_FORMAT_VERSION: Final = 1
_U32: Final = 0xFFFF_FFFF
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


def _flags_for(function: int) -> EntryFlag:
    return EntryFlag.SIGNIFICANT_INDEX if function in INDEXED_LEAVES else EntryFlag.NONE


def sniff(text: str) -> Format:
    head = text.lstrip()[:1]
    if head == "{":
        return "json"
    if head == "<":
        return "cpudata"
    return "cpuid"


def loads(text: str, source: str = "<string>") -> Dump:
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


def _entry_line(text: str, n: int) -> int | None:
    """The line of the n-th entry object, found by its "function" key."""
    pos = text.find('"entries"')
    for _ in range(n + 1):
        pos = text.find('"function"', pos + 1)
        if pos < 0:
            return None
    return text.count("\n", 0, pos) + 1


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


def _load_json(text: str, source: str) -> Dump:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DumpFormatError(source, exc.lineno, f"not valid JSON: {exc.msg}") from None
    except RecursionError:
        # json's decoder recurses per '[' or '{'; 100000 of them used to
        # crash the CLI with a traceback.
        raise DumpFormatError(source, None, "JSON nested too deeply") from None
    if not isinstance(doc, dict):
        raise DumpFormatError(source, 1, "expected a JSON object")
    if "return" in doc and "entries" not in doc:
        raise DumpFormatError(
            source, None, "this is a QEMU QMP reply, not a CPUID dump (use `kvmcpuid dump`)"
        )
    if doc.get("format") != JSON_FORMAT_NAME:
        raise DumpFormatError(source, 1, f"not a {JSON_FORMAT_NAME} file (no 'format' key)")
    version = doc.get("version")
    if version != JSON_FORMAT_VERSION:
        raise DumpFormatError(
            source, None, f"dump version {version!r}; this tool reads version {JSON_FORMAT_VERSION}"
        )
    kind = doc.get("kind", "supported")
    if kind not in _KINDS:
        raise DumpFormatError(source, None, f"unknown kind {kind!r}")
    host = doc.get("host", {})
    if not isinstance(host, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in host.items()
    ):
        raise DumpFormatError(source, None, "'host' must map strings to strings")
    raw_entries = doc.get("entries")
    if not isinstance(raw_entries, list):
        raise DumpFormatError(source, None, "'entries' must be a list")
    if len(raw_entries) > MAX_ENTRIES:
        raise DumpFormatError(source, None, f"{len(raw_entries)} entries (limit {MAX_ENTRIES})")
    entries = []
    for n, raw in enumerate(raw_entries):
        try:
            if not isinstance(raw, dict):
                raise ValueError("entry is not an object")
            unknown = set(raw) - {"function", "index", "flags", *REGISTERS}
            if unknown:
                raise ValueError(f"unknown keys {sorted(unknown)}")
            if "function" not in raw:
                raise ValueError("entry has no 'function'")
            flags = _hex32(raw.get("flags", "0"), "flags")
            if flags & ~7:
                raise ValueError(f"flags {flags:#x} has unknown bits")
            entries.append(
                CpuidEntry(
                    function=_hex32(raw["function"], "function"),
                    index=_hex32(raw.get("index", "0"), "index"),
                    flags=EntryFlag(flags),
                    **{r: _hex32(raw.get(r, "0"), r) for r in REGISTERS},
                )
            )
        except ValueError as exc:
            raise DumpFormatError(source, _entry_line(text, n), f"entry {n}: {exc}") from None
    return Dump(CpuidTable(entries), kind, host, source)


# --- libvirt <cpudata> --------------------------------------------------------


def _line(el: Any) -> int | None:
    line = el.sourceline
    return line if isinstance(line, int) else None


def _load_cpudata(text: str, source: str) -> Dump:
    from kvmcpuid_virt.xmlutil import parse_xml

    root = parse_xml(text, source)
    if root.tag != "cpudata":
        raise DumpFormatError(source, _line(root), f"expected <cpudata>, found <{root.tag}>")
    arch = root.get("arch")
    if arch not in (None, "x86"):
        raise DumpFormatError(source, _line(root), f"arch {arch!r} is not x86")
    entries = []
    for el in root:
        if not isinstance(el.tag, str):
            continue  # comments and processing instructions
        if el.tag == "msr":
            continue  # MSR values are not CPUID; libvirt keeps them beside it
        if el.tag != "cpuid":
            raise DumpFormatError(source, _line(el), f"unexpected element <{el.tag}>")
        try:
            function = _hex32(_required(el, "eax_in"), "eax_in")
            index = _hex32(el.get("ecx_in", "0"), "ecx_in")
            regs = {r: _hex32(el.get(r, "0"), r) for r in REGISTERS}
        except ValueError as exc:
            raise DumpFormatError(source, _line(el), str(exc)) from None
        entries.append(CpuidEntry(function, index, _flags_for(function), **regs))
        if len(entries) > MAX_ENTRIES:
            raise DumpFormatError(source, _line(el), f"more than {MAX_ENTRIES} entries")
    return Dump(CpuidTable(entries), "cpu", {}, source)


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
    out: bytes = etree.tostring(root, pretty_print=True, encoding="utf-8")
    return out.decode()


# --- `cpuid -1r` text -----------------------------------------------------------

_CPUID_LINE: Final = (
    r"^\s*(0x[0-9a-fA-F]{1,8})\s+(0x[0-9a-fA-F]{1,8}):"
    r"\s+eax=(0x[0-9a-fA-F]{1,8})\s+ebx=(0x[0-9a-fA-F]{1,8})"
    r"\s+ecx=(0x[0-9a-fA-F]{1,8})\s+edx=(0x[0-9a-fA-F]{1,8})\s*$"
)
_CPU_HEADER: Final = r"^CPU(\s+\d+)?:\s*$"


def _load_cpuid_text(text: str, source: str) -> Dump:
    """Reads the first CPU's block; `cpuid -r` without -1 prints one per CPU."""
    import re

    cpuid_line, cpu_header = re.compile(_CPUID_LINE), re.compile(_CPU_HEADER)
    entries = []
    seen_header = False
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if cpu_header.match(line.strip()):
            if seen_header:
                break
            seen_header = True
            continue
        m = cpuid_line.match(line)
        if not m:
            raise DumpFormatError(
                source, lineno, "expected '0xLEAF 0xSUB: eax=0x... ebx=0x... ecx=0x... edx=0x...'"
            )
        values = [int(g, 16) for g in m.groups()]
        function, index = values[0], values[1]
        entries.append(CpuidEntry(function, index, _flags_for(function), *values[2:]))
        if len(entries) > MAX_ENTRIES:
            raise DumpFormatError(source, lineno, f"more than {MAX_ENTRIES} entries")
    if not entries:
        raise DumpFormatError(source, None, "no CPUID lines found")
    return Dump(CpuidTable(entries), "cpu", {}, source)


def _dump_cpuid_text(dump: Dump) -> str:
    lines = ["CPU:"]
    for e in dump.table:
        lines.append(
            f"   {e.function:#010x} {e.index:#04x}: eax={e.eax:#010x} ebx={e.ebx:#010x} "
            f"ecx={e.ecx:#010x} edx={e.edx:#010x}"
        )
    return "\n".join(lines) + "\n"
