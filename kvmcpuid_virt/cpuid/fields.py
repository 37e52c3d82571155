"""Decoders for the CPUID fields that are not feature flags.

Every function is a pure function of a CpuidTable and returns None (or an
empty list) where the table does not carry the leaf, so that partial tables
(KVM's supported list, a dump cut short) decode as far as they go. Leaf
numbers beyond a range's max leaf are not consulted: CPUs answer those with
another leaf's data (Intel) or zeros (AMD), so reading them would invent fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Final

from kvmcpuid_virt.cpuid.table import CpuidTable

__all__ = [
    "LIBVIRT_VENDOR",
    "AddressSizes",
    "CacheInfo",
    "Signature",
    "TopologyLevel",
    "XsaveComponent",
    "XsaveInfo",
    "address_sizes",
    "brand_string",
    "caches",
    "decode",
    "hypervisor_signature",
    "in_range",
    "leaf_limits",
    "max_basic_leaf",
    "max_extended_leaf",
    "max_hypervisor_leaf",
    "range_base",
    "signature",
    "topology",
    "vendor",
    "xsave",
]

# libvirt (cpu_map, domain capabilities) names vendors by these short names.
LIBVIRT_VENDOR: Final = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD", "HygonGenuine": "Hygon"}
HYPERVISOR_BASE: Final = 0x40000000
EXTENDED_BASE: Final = 0x80000000
CENTAUR_BASE: Final = 0xC0000000
# Indexed leaves are walked subleaf by subleaf until a terminator; a table
# whose entry answers every subleaf (no SIGNIFICANT_INDEX) must not loop forever.
_MAX_SUBLEAVES: Final = 64


def _regs_text(*values: int) -> str:
    """Registers read as little-endian ASCII, NULs dropped (vendor, brand)."""
    raw = b"".join(v.to_bytes(4, "little") for v in values)
    return raw.replace(b"\0", b"").decode("ascii", errors="replace")


def max_basic_leaf(table: CpuidTable) -> int | None:
    entry = table.lookup(0, 0)
    return None if entry is None else entry.eax


def vendor(table: CpuidTable) -> str | None:
    """Leaf 0 vendor string: EBX, EDX, ECX in that order ("GenuineIntel")."""
    entry = table.lookup(0, 0)
    return None if entry is None else _regs_text(entry.ebx, entry.edx, entry.ecx)


def max_extended_leaf(table: CpuidTable) -> int | None:
    """0x80000000 EAX, None if absent or not a valid extended max leaf."""
    entry = table.lookup(EXTENDED_BASE, 0)
    if entry is None or entry.eax & 0xFFFF0000 != EXTENDED_BASE:
        return None
    return entry.eax


def max_hypervisor_leaf(table: CpuidTable) -> int | None:
    """0x40000000 EAX. KVM reports 0 there on old kernels, meaning 0x40000001."""
    entry = table.lookup(HYPERVISOR_BASE, 0)
    if entry is None:
        return None
    if entry.eax == 0:
        return HYPERVISOR_BASE + 1
    return entry.eax if entry.eax & 0xFFFF0000 == HYPERVISOR_BASE else None


def leaf_limits(table: CpuidTable) -> dict[int, int]:
    """The max leaf of each range the table announces (basic 0, hypervisor
    0x40000000, extended 0x80000000, Centaur 0xC0000000), keyed by base."""
    out: dict[int, int] = {}
    for base, limit in (
        (0, max_basic_leaf(table)),
        (HYPERVISOR_BASE, max_hypervisor_leaf(table)),
        (EXTENDED_BASE, max_extended_leaf(table)),
    ):
        if limit is not None:
            out[base] = limit
    centaur = table.lookup(CENTAUR_BASE, 0)
    if centaur is not None and centaur.eax & 0xFFFF0000 == CENTAUR_BASE:
        out[CENTAUR_BASE] = centaur.eax
    return out


def in_range(leaf: int, limits: dict[int, int], *, strict: bool = False) -> bool:
    """Whether CPUID answers `leaf` from its own entry under `limits`. A range
    the table does not announce is out of range when `strict` (a full dump
    without 0x80000000 has no extended leaves), unlimited otherwise (a table
    from KVM need not carry 0x40000000 before QEMU adds it)."""
    limit = limits.get(range_base(leaf))
    if limit is None:
        return not strict
    return leaf <= limit


def range_base(leaf: int) -> int:
    """The base leaf of `leaf`'s range (0, 0x40000000, 0x80000000, 0xC0000000)."""
    top = leaf & 0xF0000000
    return top if top in (HYPERVISOR_BASE, EXTENDED_BASE, CENTAUR_BASE) else 0


def hypervisor_signature(table: CpuidTable) -> str | None:
    """0x40000000 EBX, ECX, EDX ("KVMKVMKVM", "TCGTCGTCGTCG", "Microsoft Hv")."""
    entry = table.lookup(HYPERVISOR_BASE, 0)
    if entry is None:
        return None
    return _regs_text(entry.ebx, entry.ecx, entry.edx) or None


def _extended(table: CpuidTable, leaf: int) -> int | None:
    """Index of `leaf` if within the extended max leaf, else None."""
    top = max_extended_leaf(table)
    return leaf if top is not None and leaf <= top else None


def brand_string(table: CpuidTable) -> str | None:
    """0x80000002..4, 48 bytes; leading/trailing padding stripped (Intel pads
    on the left)."""
    if _extended(table, 0x80000004) is None:
        return None
    regs: list[int] = []
    for leaf in (0x80000002, 0x80000003, 0x80000004):
        entry = table.lookup(leaf, 0)
        if entry is None:
            return None
        regs.extend(entry.regs())
    return _regs_text(*regs).strip()


@dataclass(frozen=True, slots=True)
class Signature:
    """Leaf 1 EAX decoded. `family` and `model` are the display values: the
    extended family is added only when the base family is 0xF, the extended
    model is prefixed when the base family is 6 or 0xF (Intel SDM and AMD APM
    agree on this; AMD CPUs never report base family 6 with an extended model)."""

    family: int
    model: int
    stepping: int
    base_family: int
    base_model: int
    ext_family: int
    ext_model: int
    raw: int


def signature(table: CpuidTable) -> Signature | None:
    entry = table.lookup(1, 0)
    if entry is None:
        return None
    eax = entry.eax
    stepping = eax & 0xF
    base_model = (eax >> 4) & 0xF
    base_family = (eax >> 8) & 0xF
    ext_model = (eax >> 16) & 0xF
    ext_family = (eax >> 20) & 0xFF
    family = base_family + ext_family if base_family == 0xF else base_family
    model = (ext_model << 4) | base_model if base_family in (0x6, 0xF) else base_model
    return Signature(family, model, stepping, base_family, base_model, ext_family, ext_model, eax)


@dataclass(frozen=True, slots=True)
class AddressSizes:
    physical: int
    virtual: int
    guest_physical: int | None  # 0x80000008 EAX[23:16]; 0 means "same as physical"


def address_sizes(table: CpuidTable) -> AddressSizes | None:
    if _extended(table, 0x80000008) is None:
        return None
    entry = table.lookup(0x80000008, 0)
    if entry is None:
        return None
    guest = (entry.eax >> 16) & 0xFF
    return AddressSizes(entry.eax & 0xFF, (entry.eax >> 8) & 0xFF, guest or None)


@dataclass(frozen=True, slots=True)
class XsaveComponent:
    index: int
    size: int
    offset: int  # in the standard (non-compacted) format; 0 for supervisor states
    supervisor: bool  # managed through IA32_XSS rather than XCR0


@dataclass(frozen=True, slots=True)
class XsaveInfo:
    """Leaf 0xD. `enabled_size` follows the current XCR0 (so it differs between
    a KVM table and a running guest); `max_size` covers every supported XCR0
    component; `compacted_size` (subleaf 1 EBX) follows XCR0 | IA32_XSS."""

    xcr0_mask: int
    xss_mask: int
    enabled_size: int
    max_size: int
    compacted_size: int
    components: tuple[XsaveComponent, ...]


def xsave(table: CpuidTable) -> XsaveInfo | None:
    top = max_basic_leaf(table)
    main = table.lookup(0xD, 0)
    if top is None or top < 0xD or main is None:
        return None
    sub1 = table.lookup(0xD, 1)
    xcr0 = main.eax | main.edx << 32
    xss = 0 if sub1 is None else sub1.ecx | sub1.edx << 32
    comps = []
    for i in range(2, 63):
        if not (xcr0 | xss) >> i & 1:
            continue
        entry = table.lookup(0xD, i)
        if entry is None or entry.index != i:
            continue
        # ECX[0] set: the component is a supervisor state (in IA32_XSS).
        comps.append(XsaveComponent(i, entry.eax, entry.ebx, bool(entry.ecx & 1)))
    return XsaveInfo(
        xcr0_mask=xcr0,
        xss_mask=xss,
        enabled_size=main.ebx,
        max_size=main.ecx,
        compacted_size=0 if sub1 is None else sub1.ebx,
        components=tuple(comps),
    )


@dataclass(frozen=True, slots=True)
class CacheInfo:
    leaf: int
    level: int
    type: str  # data, instruction, unified
    size: int  # bytes
    ways: int
    line_size: int
    sets: int
    partitions: int
    shared_by: int  # max logical processors sharing it (EAX[25:14] + 1)
    fully_associative: bool


_CACHE_TYPES: Final = {1: "data", 2: "instruction", 3: "unified"}


def _walk(table: CpuidTable, leaf: int) -> list[tuple[int, int, int, int, int]]:
    """(subleaf, eax, ebx, ecx, edx) of an indexed leaf up to its terminator."""
    out = []
    for sub in range(_MAX_SUBLEAVES):
        entry = table.lookup(leaf, sub)
        if entry is None:
            break
        out.append((sub, *entry.regs()))
    return out


def caches(table: CpuidTable) -> list[CacheInfo]:
    """Deterministic cache parameters: leaf 4 (Intel; also Zhaoxin) or
    0x8000001D (AMD with TOPOEXT), same encoding. Leaf 4 wins if both exist,
    since AMD CPUs report leaf 4 as zeros."""
    sources: list[int] = []
    top = max_basic_leaf(table)
    if top is not None and top >= 4:
        sources.append(4)
    if _extended(table, 0x8000001D) is not None:
        sources.append(0x8000001D)
    for leaf in sources:
        found = []
        for _sub, eax, ebx, ecx, _edx in _walk(table, leaf):
            ctype = eax & 0x1F
            if ctype == 0:
                break
            ways = (ebx >> 22) + 1
            parts = ((ebx >> 12) & 0x3FF) + 1
            line = (ebx & 0xFFF) + 1
            sets = ecx + 1
            found.append(
                CacheInfo(
                    leaf=leaf,
                    level=(eax >> 5) & 0x7,
                    type=_CACHE_TYPES.get(ctype, f"type{ctype}"),
                    size=ways * parts * line * sets,
                    ways=ways,
                    line_size=line,
                    sets=sets,
                    partitions=parts,
                    shared_by=((eax >> 14) & 0xFFF) + 1,
                    fully_associative=bool(eax & (1 << 9)),
                )
            )
        if found:
            return found
    return []


@dataclass(frozen=True, slots=True)
class TopologyLevel:
    leaf: int
    subleaf: int
    type: str  # smt, core, module, tile, die
    shift: int  # x2APIC ID bits to shift right to get the next level's ID
    logical: int  # logical processors at this level (informational only)


_LEVEL_TYPES: Final = {1: "smt", 2: "core", 3: "module", 4: "tile", 5: "die"}


def topology(table: CpuidTable) -> list[TopologyLevel]:
    """Extended topology: leaf 0x1F (V2) if present and non-empty, else 0xB.
    A subleaf with level type 0 ends the list."""
    top = max_basic_leaf(table)
    for leaf in (0x1F, 0xB):
        if top is None or top < leaf:
            continue
        levels = []
        for sub, eax, ebx, ecx, _edx in _walk(table, leaf):
            ltype = (ecx >> 8) & 0xFF
            if ltype == 0:
                break
            levels.append(
                TopologyLevel(
                    leaf=leaf,
                    subleaf=sub,
                    type=_LEVEL_TYPES.get(ltype, f"type{ltype}"),
                    shift=eax & 0x1F,
                    logical=ebx & 0xFFFF,
                )
            )
        if levels:
            return levels
    return []


def decode(table: CpuidTable) -> dict[str, Any]:
    """Every decoded field, JSON-ready (for `kvmcpuid features --format json`)."""
    sig = signature(table)
    addr = address_sizes(table)
    xs = xsave(table)
    return {
        "vendor": vendor(table),
        "max_basic_leaf": max_basic_leaf(table),
        "max_extended_leaf": max_extended_leaf(table),
        "max_hypervisor_leaf": max_hypervisor_leaf(table),
        "hypervisor_signature": hypervisor_signature(table),
        "signature": None if sig is None else dataclasses.asdict(sig),
        "brand": brand_string(table),
        "address_sizes": None if addr is None else dataclasses.asdict(addr),
        "xsave": None if xs is None else dataclasses.asdict(xs),
        "caches": [dataclasses.asdict(c) for c in caches(table)],
        "topology": [dataclasses.asdict(t) for t in topology(table)],
    }
