"""Cluster baseline: the CPUID every given host can give a guest.

Inputs are Dumps: `kvmcpuid dump` files of KVM hosts (KVM_GET_SUPPORTED_CPUID),
raw CPU dumps (libvirt <cpudata>, `cpuid -1r`; read as "what that host's CPU
could give", an upper bound of what its KVM gives), or feature-only views of a
host (kind "config", e.g. a libvirt host-model from domain capabilities, see
config/host_model.py).

Rules:
- feature bits (every bit the registry names) are ANDed: a bit is on only if
  every input has it; a leaf beyond an input's max leaf counts as all zeros;
- with mixed vendors only vendor-neutral bits take part (VENDOR_NEUTRAL), the
  rest are off; without allow_mixed_vendors mixed vendors are a PolicyError;
- non-flag fields take the minimum (max basic/extended/hypervisor leaf, leaf 7
  max subleaf, physical/virtual/guest address bits); XSAVE masks are ANDed and
  the XSAVE sizes are recomputed for the components that remain;
- feature MSRs (the table's `msrs`): each flag MSR every input lists,
  its named bits ANDed (each cut to what that host's vCPU accepts); none
  available when some input's are unknown (_common_msrs);
- everything else (vendor, family/model/stepping, brand, cache and topology
  leaves) comes from the oldest host of the first input's vendor, the
  "template"; an entry is kept only if every full input has it.
Every such decision is reported in `Baseline.notes`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Final, TypeAlias

from kvmcpuid_virt.adapters.msr_values import guest_msr_values
from kvmcpuid_virt.analysis.hostbits import NAMED, Profile, pack, profiles, unpack
from kvmcpuid_virt.config.cpuconfig import vendor_of
from kvmcpuid_virt.cpuid import fields
from kvmcpuid_virt.cpuid.formats import Dump
from kvmcpuid_virt.cpuid.msr_features import MsrLayout, msr_registry
from kvmcpuid_virt.cpuid.msr_values import FeatureMsrs
from kvmcpuid_virt.cpuid.table import (
    INDEXED_LEAVES,
    REGISTERS,
    CpuidEntry,
    CpuidTable,
    EntryFlag,
    Register,
)
from kvmcpuid_virt.errors import InputError, PolicyError

__all__ = [
    "VENDOR_NEUTRAL",
    "Baseline",
    "baseline",
    "neutral_mask",
    "require_vendor",
    "word_value",
]

_U32: Final = 0xFFFF_FFFF
_ALL: Final = _U32

# Feature words whose bits mean the same on Intel and AMD (Intel SDM vol. 2A
# CPUID, AMD APM vol. 3 appendix E), as (leaf, subleaf or None for every
# subleaf, register) -> mask of neutral bits. Leaves 1 and 7 are the shared
# architectural feature leaves; 6 EAX[2] is ARAT on both; 0xD.1 EAX is the
# XSAVE extensions; 0x40000001 is KVM's own paravirtual leaf, the same
# whatever the CPU. In the extended range only the bits Intel adopted from
# AMD with the same meaning: 0x80000001 ECX LAHF_LM(0) LZCNT/ABM(5)
# PREFETCHW(8), EDX SYSCALL(11) NX(20) PDPE1GB(26) RDTSCP(27) LM(29);
# 0x80000007 EDX invariant TSC(8); 0x80000008 EBX WBNOINVD(9). Everything
# else in 0x8000_0000+ (SVM 0x8000000A, SEV 0x8000001F, AMD's leaf 1 EDX
# aliases in 0x80000001 EDX, 0x80000008 EBX speculation bits, ...) is AMD's
# alone, and Centaur's 0xC0000001 is Centaur's alone.
VENDOR_NEUTRAL: Final[Mapping[tuple[int, int | None, str], int]] = {
    (0x1, 0, "ecx"): _ALL,
    (0x1, 0, "edx"): _ALL,
    (0x6, 0, "eax"): 1 << 2,
    (0x7, None, "eax"): _ALL,
    (0x7, None, "ebx"): _ALL,
    (0x7, None, "ecx"): _ALL,
    (0x7, None, "edx"): _ALL,
    (0xD, 1, "eax"): _ALL,
    (0x40000001, 0, "eax"): _ALL,
    (0x40000001, 0, "edx"): _ALL,
    (0x80000001, 0, "ecx"): 1 << 0 | 1 << 5 | 1 << 8,
    (0x80000001, 0, "edx"): 1 << 11 | 1 << 20 | 1 << 26 | 1 << 27 | 1 << 29,
    (0x80000007, 0, "edx"): 1 << 8,
    (0x80000008, 0, "ebx"): 1 << 9,
}

_HYPERVISOR: Final = fields.HYPERVISOR_BASE
_EXTENDED: Final = fields.EXTENDED_BASE
_CENTAUR: Final = fields.CENTAUR_BASE
# Legacy FXSAVE area (512 bytes) plus the XSAVE header (64): the smallest
# XSAVE area whatever the components.
_XSAVE_LEGACY: Final = 576


def neutral_mask(leaf: int, subleaf: int, reg: str) -> int:
    """The vendor-neutral bits of a feature word (0 for a vendor-specific one)."""
    return VENDOR_NEUTRAL.get((leaf, subleaf, reg), VENDOR_NEUTRAL.get((leaf, None, reg), 0))


# VENDOR_NEUTRAL packed (hostbits), for the mixed-vendor AND.
_NEUTRAL: Final = pack({(leaf, sub, r): neutral_mask(leaf, sub, r)
                        for leaf, sub, r in unpack(0)})  # fmt: skip

def require_vendor(dump: Dump) -> str:
    """The dump's vendor string; a table without leaf 0 is not a CPUID dump
    (every word would read as 0 beyond its missing max leaf)."""
    vendor = vendor_of(dump.table)
    if not vendor:
        raise InputError(f"{dump.source}: no leaf 0 (vendor), not a CPUID dump")
    return vendor


def word_value(dump: Dump, leaf: int, subleaf: int, reg: Register,
               limits: dict[int, int] | None = None) -> int:  # fmt: skip
    """A register as a guest would read it: 0 beyond the dump's max leaf. A
    feature-only input (kind "config") announces no max leaves: its words
    count as they are. `limits`: fields.leaf_limits(dump.table), when the
    caller reads many words of one dump."""
    if dump.kind != "config" and not fields.in_range(
        leaf, fields.leaf_limits(dump.table) if limits is None else limits, strict=True
    ):
        return 0
    return dump.table.get(leaf, subleaf, reg)


@dataclasses.dataclass(frozen=True)
class Baseline:
    """The baseline table and how it was decided.

    table:    a supported-style CPUID table (usable wherever a dump is);
    vendor:   its vendor string (the template's);
    template: source of the input whose non-flag fields were taken;
    notes:    one line per decision an operator should know about;
    sources:  every input's source, in order."""

    table: CpuidTable
    vendor: str
    template: str
    notes: tuple[str, ...]
    sources: tuple[str, ...]


# (leaf, subleaf, register) of a feature word -> its bits; (leaf, subleaf) -> entry.
_Words: TypeAlias = dict[tuple[int, int, Register], int]
_Entries: TypeAlias = dict[tuple[int, int], CpuidEntry]

_RANGE_NAMES: Final[Mapping[int, str]] = {
    0: "basic",
    _HYPERVISOR: "hypervisor (KVM)",
    _EXTENDED: "extended",
    _CENTAUR: "Centaur",
}


def baseline(dumps: Sequence[Dump], *, allow_mixed_vendors: bool = False) -> Baseline:
    """The table every input can give (see the module docstring)."""
    if not dumps:
        raise InputError("a baseline needs at least one host")
    notes: list[str] = []
    # Each distinct table is read once (hostbits.profiles); every rule below
    # is an AND or a minimum, which a repeated table does not change.
    profs = profiles(dumps)
    vendors, mixed = _check_vendors(dumps, profs, allow_mixed_vendors, notes)
    template = _pick_template(dumps, profs, vendors[0])
    _note_inputs(dumps, template, notes)
    masks = unpack(NAMED)
    words = _intersect_words(profs, mixed)
    distinct = {id(p): (d, p) for d, p in zip(dumps, profs, strict=True) if d.kind != "config"}
    full = [d for d, _ in distinct.values()]
    uniq = [p for _, p in distinct.values()]
    top = _common_ranges(uniq, template, notes)
    entries = _template_entries(template, uniq, top, masks, words, notes)
    _add_uncovered_words(entries, words)
    _min_fields(entries, top, full, notes)
    _xsave_fix(entries, notes)
    return _assemble(entries, dumps, vendors[0], template, notes)


def _check_vendors(
    dumps: Sequence[Dump], profs: Sequence[Profile], allow_mixed_vendors: bool,
    notes: list[str],
) -> tuple[list[str], bool]:
    """Every input's vendor, and whether they are mixed: an error unless allowed,
    since vendor-specific bits mean different things (or nothing) elsewhere."""
    vendors = [p.vendor or require_vendor(d) for d, p in zip(dumps, profs, strict=True)]
    mixed = len(set(vendors)) > 1
    if mixed:
        by_vendor: dict[str, list[str]] = {}
        for d, v in zip(dumps, vendors, strict=True):
            by_vendor.setdefault(v, []).append(d.source)
        listing = "; ".join(f"{v}: {', '.join(s)}" for v, s in by_vendor.items())
        if not allow_mixed_vendors:
            raise PolicyError(
                f"hosts of different CPU vendors ({listing}); a guest cannot move between "
                "them safely (--allow-mixed-vendors keeps only vendor-neutral features)"
            )
        notes.append(
            f"mixed vendors ({listing}): only vendor-neutral features (leaves 1, 6 ARAT, 7, "
            "0xD.1, KVM PV and the extended bits both vendors define) are kept"
        )
    return vendors, mixed


def _pick_template(dumps: Sequence[Dump], profs: Sequence[Profile], first_vendor: str) -> Dump:
    """The input whose non-flag leaves are kept: the oldest full input of the
    first input's vendor (the most conservative model to show a guest; by
    family, model, stepping, none first; the first such input on a tie)."""
    full = [(d, p) for d, p in zip(dumps, profs, strict=True) if d.kind != "config"]
    if not full:
        return dumps[0]
    candidates = [(d, p) for d, p in full if p.vendor == first_vendor] or full
    return min(candidates, key=lambda dp: dp[1].signature)[0]


def _note_inputs(dumps: Sequence[Dump], template: Dump, notes: list[str]) -> None:
    """Notes on where the non-flag leaves came from and which inputs had no
    leaf data, so an operator knows what the table does not reflect."""
    tsig = fields.signature(template.table)
    if tsig is not None and len(dumps) > 1:
        notes.append(
            f"vendor, family {tsig.family:#x} model {tsig.model:#x} stepping {tsig.stepping}, "
            f"brand, cache and topology leaves: from the oldest host, {template.source}"
        )
    configs_only = [d.source for d in dumps if d.kind == "config"]
    if configs_only:
        notes.append(
            "feature-only inputs (no max leaves, address sizes or XSAVE data): "
            + ", ".join(configs_only)
        )


def _intersect_words(profs: Sequence[Profile], mixed: bool) -> _Words:
    """Each feature word's named bits ANDed over every input, as a guest on any
    of them would read it (each within its own leaf range; a feature-only
    input has none: its leaf 0 carries only the vendor); with mixed vendors
    only the vendor-neutral bits can be on."""
    value = NAMED & _NEUTRAL if mixed else NAMED
    for p in {id(p): p for p in profs}.values():
        value &= p.words
    return unpack(value)


def _common_ranges(full: Sequence[Profile], template: Dump, notes: list[str]) -> dict[int, int]:
    """Range base -> the smallest max leaf over the full inputs; a range some
    full input lacks is dropped (raw CPU dumps have no KVM leaves)."""
    full_limits = [p.limits for p in full] or [fields.leaf_limits(template.table)]
    top: dict[int, int] = {}
    for base in (0, _HYPERVISOR, _EXTENDED, _CENTAUR):
        values = [lim.get(base) for lim in full_limits]
        present = [v for v in values if v is not None]
        if len(present) == len(values) and present:
            top[base] = min(present)
        elif present:
            notes.append(f"{_RANGE_NAMES[base]} leaves dropped: not every host has them")
    tmpl_limits = fields.leaf_limits(template.table)
    for base, value in top.items():
        if tmpl_limits.get(base) != value:
            notes.append(f"max leaf {base:#x} range: {value:#x} (the smallest of the hosts)")
    return top


def _template_entries(
    template: Dump,
    full: Sequence[Profile],
    top: Mapping[int, int],
    masks: _Words,
    words: _Words,
    notes: list[str],
) -> _Entries:
    """The template's entries within the common ranges that every full input
    has, their feature bits replaced by the intersected words."""
    entries: _Entries = {}
    dropped_leaves: set[tuple[int, int]] = set()
    wanted = frozenset(template.table.keys())
    missing: set[tuple[int, int]] = set()
    for p in full:
        missing |= p.table.unanswered(wanted)
    for e in template.table:
        base = fields.range_base(e.function)
        if base not in top or e.function > top[base]:
            continue
        if e.key in missing:
            dropped_leaves.add(e.key)
            continue
        changes: dict[str, int] = {}
        for r in REGISTERS:
            word_mask = masks.get((e.function, e.index, r))
            if word_mask is not None:
                new = (e.reg(r) & ~word_mask) | words[(e.function, e.index, r)]
                if new != e.reg(r):
                    changes[r] = new
        if changes:
            e = e.replace(**changes)
        if e.key in entries:
            continue  # first entry of a stateful run wins, as in CpuidTable
        entries[e.key] = e
    if dropped_leaves:
        notes.append(
            "(sub)leaves not every host has, dropped: "
            + ", ".join(f"{leaf:#x}.{sub}" for leaf, sub in sorted(dropped_leaves))
        )
    return entries


def _add_uncovered_words(entries: _Entries, words: _Words) -> None:
    """Feature words the template has no entry for (a feature-only template):
    one entry per (sub)leaf, every register of it filled in, so no bit is lost."""
    from_template = set(entries)
    for (leaf, subleaf, r), value in words.items():
        key = (leaf, subleaf if leaf in INDEXED_LEAVES else 0)
        if not value or key in from_template:
            continue
        entry = entries.get(key)
        if entry is None:
            flags = EntryFlag.SIGNIFICANT_INDEX if leaf in INDEXED_LEAVES else EntryFlag.NONE
            entries[key] = CpuidEntry(leaf, key[1], flags, **{r: value})
        else:
            entries[key] = entry.replace(**{r: entry.reg(r) | value})


def _assemble(
    entries: _Entries, dumps: Sequence[Dump], vendor: str, template: Dump, notes: list[str]
) -> Baseline:
    """The Baseline of the final entries, in (leaf, subleaf) order; its vendor
    is the table's leaf 0, else the first input's."""
    table = CpuidTable(sorted(entries.values(), key=lambda e: e.key),
                       _common_msrs(dumps, notes))
    return Baseline(
        table=table,
        vendor=vendor_of(table) or vendor,
        template=template.source,
        notes=tuple(notes),
        sources=tuple(d.source for d in dumps),
    )


def _common_msrs(full: Sequence[Dump], notes: list[str]) -> FeatureMsrs | None:
    """The feature MSRs every host can give: for each flag MSR every input
    lists (a libvirt host-model's too: host_model_dump gives it the MSR
    features it names), its named bits ANDed over the inputs (each cut to
    what a vCPU of that host accepts, where its dump recorded a trial), as
    Firecracker's export does. VMX control and value MSRs are left out (not flags to
    intersect). Where some input carries no feature MSRs (a version-1 dump,
    `cpuid -1r` text) they are unknown there, so none can be promised: none
    is available (not None, which a config of this host would fill in with
    this host's own)."""
    if not full:
        return None
    per_host = [guest_msr_values(d.table) for d in full]
    if all(v is None for v in per_host):
        return None
    unknown = [d.source for d, v in zip(full, per_host, strict=True) if v is None]
    if unknown:
        notes.append("feature MSRs: none promised, unknown on " + ", ".join(unknown))
        return FeatureMsrs((), available=False, why="not every host's feature MSRs are known")
    known = [v for v in per_host if v is not None]
    mreg = msr_registry()
    items = []
    left_out = []
    for index in sorted(set.intersection(*(set(v) for v in known))):
        info = mreg.msr(index)
        if info is None or info.layout is not MsrLayout.FLAGS:
            if info is None or info.layout is MsrLayout.CONTROLS:
                left_out.append(f"{index:#x}")  # a number (microcode) is no feature
            continue
        care = 0
        for f in mreg.in_msr(index):
            care |= f.mask
        value = care
        for v in known:
            value &= v[index]
        items.append((index, value))
    if left_out:
        notes.append("feature MSRs that are not flags (VMX controls, unknown ones), left "
                     "out: " + ", ".join(left_out))  # fmt: skip
    return FeatureMsrs(items, available=True)


def _min_fields(
    entries: _Entries,
    top: Mapping[int, int],
    full: Sequence[Dump],
    notes: list[str],
) -> None:
    """Max leaves, leaf 7's max subleaf, address sizes and XSAVE masks: the
    minimum (or AND) over the full inputs."""
    for base, value in top.items():
        e = entries.get((base, 0))
        # KVM's 0 in 0x40000000 EAX means 0x40000001: leave such a 0 alone.
        if e is not None and (base != _HYPERVISOR or e.eax != 0):
            entries[(base, 0)] = e.replace(eax=value)
    if not full:
        return
    _min_leaf7(entries, full)
    _min_address_sizes(entries, full, notes)
    _common_xsave_masks(entries, full)


def _min_leaf7(entries: _Entries, full: Sequence[Dump]) -> None:
    """Leaf 7's max subleaf: the smallest over the full inputs, and the
    subleaves beyond it dropped, as not every host has them."""
    leaf7 = entries.get((7, 0))
    if leaf7 is None:
        return
    sub_max = min(d.table.get(7, 0, "eax") for d in full)
    entries[(7, 0)] = leaf7.replace(eax=sub_max)
    for key in [k for k in entries if k[0] == 7 and k[1] > sub_max]:
        del entries[key]


def _min_address_sizes(entries: _Entries, full: Sequence[Dump], notes: list[str]) -> None:
    """0x80000008 EAX address sizes: the smallest of the full inputs that
    report them, as a guest may not use bits some host lacks."""
    addr = entries.get((0x80000008, 0))
    if addr is None:
        return
    sizes = [fields.address_sizes(d.table) for d in full]
    known = [s for s in sizes if s is not None]
    if not known:
        return
    phys = min(s.physical for s in known)
    virt = min(s.virtual for s in known)
    guest = min((s.guest_physical or s.physical) for s in known)
    eax = addr.eax & 0xFF000000 | (0 if guest == phys else guest) << 16 | virt << 8 | phys
    entries[(0x80000008, 0)] = addr.replace(eax=eax)
    notes.append(f"address sizes: {phys} physical, {virt} virtual bits (the smallest)")


def _common_xsave_masks(entries: _Entries, full: Sequence[Dump]) -> None:
    """XSAVE components every host has: XCR0 in 0xD.0 EAX:EDX, IA32_XSS in
    0xD.1 ECX:EDX, ANDed (a host without the leaf has none)."""
    for subleaf, regs in ((0, ("eax", "edx")), (1, ("ecx", "edx"))):
        entry = entries.get((0xD, subleaf))
        if entry is None:
            continue
        common = {r: _U32 for r in regs}
        for d in full:
            e = d.table.lookup(0xD, subleaf)
            for r in regs:
                common[r] &= 0 if e is None else e.reg(r)  # type: ignore[arg-type]
        entries[(0xD, subleaf)] = entry.replace(**common)


# XCR0 state components -> the feature bit that needs them (Intel SDM 13.2).
_XSAVE_OWNERS: Final[Mapping[int, tuple[int, int, Register, int]]] = {
    1 << 2: (0x1, 0, "ecx", 28),  # YMM: avx
    1 << 3 | 1 << 4: (0x7, 0, "ebx", 14),  # BNDREGS, BNDCSR: mpx
    1 << 5 | 1 << 6 | 1 << 7: (0x7, 0, "ebx", 16),  # opmask, ZMM: avx512f
    1 << 9: (0x7, 0, "ecx", 3),  # PKRU: pku
    1 << 17 | 1 << 18: (0x7, 0, "edx", 24),  # TILECFG, TILEDATA: amx-tile
}


def _xsave_fix(entries: _Entries, notes: list[str]) -> None:
    """Leaf 0xD after the masks were ANDed: drop components no longer enabled
    and recompute the sizes from the remaining components' own subleaves
    (standard-format offsets are architectural, so the template's serve)."""
    main = entries.get((0xD, 0))
    if main is None:
        return
    sub1 = entries.get((0xD, 1))
    xcr0 = _xcr0_with_owners(entries, main.eax | main.edx << 32)
    if (main.eax | main.edx << 32) != xcr0:
        main = main.replace(eax=xcr0 & _U32, edx=xcr0 >> 32)
    xss = 0 if sub1 is None else sub1.ecx | sub1.edx << 32
    for key in [k for k in entries if k[0] == 0xD and k[1] >= 2]:
        if not (xcr0 | xss) >> key[1] & 1:
            del entries[key]
    std, compacted = _xsave_sizes(entries, xcr0, xss)
    # KVM reports EBX (size for the XCR0 in use) as the size for every
    # supported component, since a guest may enable them all; do the same.
    entries[(0xD, 0)] = main.replace(ebx=std, ecx=std)
    if sub1 is not None:
        uses_compacted = sub1.eax & (1 << 1 | 1 << 3)  # XSAVEC or XSAVES
        entries[(0xD, 1)] = sub1.replace(ebx=compacted if uses_compacted else 0)
    notes.append(
        f"XSAVE: components XCR0={xcr0:#x} XSS={xss:#x} (common to every host); "
        f"sizes recomputed: standard {std} bytes"
    )


def _xcr0_with_owners(entries: _Entries, xcr0: int) -> int:
    """XCR0 without the state components whose feature is off: a state
    component goes with the feature that uses it (no AVX, no YMM state),
    whatever the hosts' XCR0 masks say."""
    for bits, (leaf, subleaf, r, bit) in _XSAVE_OWNERS.items():
        entry = entries.get((leaf, subleaf))
        if entry is None or not entry.reg(r) >> bit & 1:
            xcr0 &= ~bits
    return xcr0


def _xsave_sizes(entries: _Entries, xcr0: int, xss: int) -> tuple[int, int]:
    """The standard (XCR0 components) and compacted (XCR0 | XSS components)
    XSAVE area sizes, from each remaining component's own size and offset."""
    std = _XSAVE_LEGACY
    compacted = _XSAVE_LEGACY
    for i in range(2, 63):
        comp = entries.get((0xD, i))
        if comp is None or not (xcr0 | xss) >> i & 1:
            continue
        if xcr0 >> i & 1:
            std = max(std, comp.ebx + comp.eax)
        if comp.ecx & 2:  # ECX[1]: 64-byte aligned in the compacted format
            compacted = (compacted + 63) & ~63
        compacted += comp.eax
    return std, compacted
