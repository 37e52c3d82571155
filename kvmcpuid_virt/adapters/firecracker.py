"""Firecracker: a baseline (or any target table) as a custom CPU template.

Firecracker's custom CPU template (docs/cpu_templates/cpu-templates.md and
schema.json in the firecracker repository) is JSON with `cpuid_modifiers`
(leaf, subleaf as hex strings, KVM entry flags, and per register a bitmap
`0b` + 32 characters, bit 31 first: `0` clears, `1` sets, `x` leaves the
bit as the host's KVM gives it) and `msr_modifiers` (addr, a 64-character
bitmap). Firecracker applies it to KVM_GET_SUPPORTED_CPUID, refusing a
modifier whose (leaf, subleaf) KVM does not list, and then normalizes some
bits itself (docs/cpu_templates/cpuid-normalization.md).

What the template sets:
- every named feature bit of the registry, in every feature word present
  on every input host: `1` when the target has it, `0` when not;
- the XSAVE component masks (CPUID.0DH.0:EAX/EDX, CPUID.0DH.1:ECX/EDX)
  exactly, as Firecracker's own T2S template does, so that a guest cannot
  enable a state component whose feature the template turned off;
- the max basic leaf, leaf 7's max subleaf and the max extended leaf,
  exactly (GATES; on AMD Firecracker then puts the last at 0x8000001F);
- feature-MSR flag bits (IA32_ARCH_CAPABILITIES, ...) when every input
  carries its feature-MSR values: `1` where every host has (and a vCPU
  accepts) the bit, `0` where not.
What it leaves `x`: unnamed and reserved bits; bits that follow the guest's
CR4 (OSXSAVE, OSPKE); bits Firecracker normalizes after applying a template
(FIRECRACKER_SETS); whole leaves it rewrites (topology, caches, brand).
Nothing here touches the machine: the result is a dict, serialized with json.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from kvmcpuid_virt.adapters.msr_values import guest_msr_values
from kvmcpuid_virt.config.cpuconfig import vendor_of
from kvmcpuid_virt.cpuid import fields
from kvmcpuid_virt.cpuid.features import FeatureKind, Registry, registry
from kvmcpuid_virt.cpuid.formats import Dump
from kvmcpuid_virt.cpuid.msr_features import MsrLayout, MsrRegistry, msr_registry
from kvmcpuid_virt.cpuid.table import REGISTERS, CpuidTable, EntryFlag, Register

__all__ = [
    "FIRECRACKER_SETS", "GATES", "XSAVE_WORDS", "Template", "bitmap", "render", "template",
    "without",
]  # fmt: skip

_U32: Final = 0xFFFF_FFFF
_INTEL: Final = "GenuineIntel"
_AMD: Final = "AuthenticAMD"
# What Firecracker sets 80000000H EAX to on AMD (cpuid-normalization.md).
_AMD_MAX_EXTENDED: Final = 0x8000001F

# Bits Firecracker sets itself after the template (cpuid-normalization.md):
# (leaf, subleaf, register) -> mask, per vendor ("" for every vendor).
# Common: leaf 1 ECX[15] PDCM off, ECX[24] TSC_DEADLINE on, ECX[31]
# HYPERVISOR on, EDX[28] HTT from the vCPU count. Intel: leaf 6 EAX[1]
# turbo boost off, ECX[3] frequency selection off. AMD: leaf 7 EDX[29]
# (IA32_ARCH_CAPABILITIES present) off, 0x80000001 ECX[22] topology
# extensions on.
FIRECRACKER_SETS: Final[Mapping[str, Mapping[tuple[int, int, str], int]]] = {
    "": {(0x1, 0, "ecx"): 1 << 15 | 1 << 24 | 1 << 31, (0x1, 0, "edx"): 1 << 28},
    _INTEL: {(0x6, 0, "eax"): 1 << 1, (0x6, 0, "ecx"): 1 << 3},
    _AMD: {(0x7, 0, "edx"): 1 << 29, (0x80000001, 0, "ecx"): 1 << 22},
}
# The MSR Firecracker hides on AMD (the leaf 7 EDX[29] normalization above).
_HIDDEN_MSRS: Final[Mapping[str, frozenset[int]]] = {_AMD: frozenset({0x10A})}
# The XSAVE state-component masks: XCR0 in 0DH.0 EAX (low) / EDX (high),
# IA32_XSS in 0DH.1 ECX / EDX (Intel SDM vol. 1, 13.2; AMD APM vol. 3, E.3.9).
XSAVE_WORDS: Final[tuple[tuple[int, int, Register], ...]] = (
    (0xD, 0, "eax"),
    (0xD, 0, "edx"),
    (0xD, 1, "ecx"),
    (0xD, 1, "edx"),
)
# The fields that say which leaves a guest may read at all: the max basic
# leaf (0H EAX), leaf 7's max subleaf (07H.0 EAX) and the max extended leaf
# (80000000H EAX; Firecracker overrides that one on AMD). The target's
# values hide what lies beyond from hosts that have more, where Firecracker
# would refuse a modifier for the entries other hosts lack.
GATES: Final[tuple[tuple[int, int, Register], ...]] = (
    (0x0, 0, "eax"),
    (0x7, 0, "eax"),
    (0x80000000, 0, "eax"),
)


def bitmap(value: int, care: int, width: int = 32) -> str:
    """`0b` then one character per bit, most significant first: the bit of
    `value` where `care` has it, `x` elsewhere (Firecracker's bitmap)."""
    chars = []
    for bit in range(width - 1, -1, -1):
        chars.append(("1" if value >> bit & 1 else "0") if care >> bit & 1 else "x")
    return "0b" + "".join(chars)


@dataclasses.dataclass(frozen=True)
class Template:
    """The template document and what an operator should know about it:
    `notes`, one line each (bits it cannot set, what it leaves alone)."""

    doc: Mapping[str, Any]
    notes: tuple[str, ...]

    def text(self) -> str:
        return json.dumps(self.doc, indent=2) + "\n"


def _vendors(target: CpuidTable, inputs: Sequence[Dump]) -> set[str]:
    return {v for v in (vendor_of(target), *(vendor_of(d.table) for d in inputs)) if v}


def _normalized(vendors: set[str], leaf: int, subleaf: int, reg: str) -> int:
    mask = 0
    for vendor in ("", *sorted(vendors)):
        mask |= FIRECRACKER_SETS.get(vendor, {}).get((leaf, subleaf, reg), 0)
    return mask


def _has_entry(table: CpuidTable, leaf: int, subleaf: int) -> bool:
    """Whether KVM would list (leaf, subleaf) for this host: an entry within
    the max leaf of its range."""
    return table.lookup(leaf, subleaf) is not None and fields.in_range(
        leaf, fields.leaf_limits(table), strict=True
    )


def _hidden(
    target: CpuidTable, limits: dict[int, int], leaf: int, subleaf: int, amd: bool
) -> bool:
    """Whether no guest can read (leaf, subleaf): beyond the target's gates,
    and on AMD also beyond 0x8000001F, where Firecracker puts the max
    extended leaf whatever the template says."""
    if leaf == 0x7 and subleaf > target.get(0x7, 0, "eax"):
        return True
    if fields.in_range(leaf, limits, strict=True):
        return False
    return not (amd and fields.range_base(leaf) == fields.EXTENDED_BASE
                and leaf <= _AMD_MAX_EXTENDED)  # fmt: skip


def _word_mask(reg: Registry, leaf: int, subleaf: int, r: str, vendors: set[str]) -> int:
    """The bits of one feature word the template decides."""
    mask = 0
    for f in reg.in_word(leaf, subleaf, r):
        if f.kind is not FeatureKind.DYNAMIC:
            mask |= f.mask
    return mask & ~_normalized(vendors, leaf, subleaf, r)


def template(
    target: CpuidTable, inputs: Sequence[Dump], *, reg: Registry | None = None,
    mreg: MsrRegistry | None = None,
) -> Template:  # fmt: skip
    """The custom CPU template giving `target`'s feature bits on every host of
    `inputs` (the dumps the target was computed from: a modifier is written
    only for an entry every one of them has, as Firecracker refuses others)."""
    reg = reg or registry()
    mreg = mreg or msr_registry()
    vendors = _vendors(target, inputs)
    tables = [d.table for d in inputs] or [target]
    limits = fields.leaf_limits(target)
    notes: list[str] = []
    words: dict[tuple[int, int], dict[str, tuple[int, int]]] = {}
    absent: dict[tuple[int, int], list[str]] = {}

    amd = _AMD in vendors
    flags: dict[tuple[int, int], int] = {}

    def decide(leaf: int, subleaf: int, r: Register, care: int) -> None:
        if not care or _hidden(target, limits, leaf, subleaf, amd):
            return
        missing = [d.source for d, t in zip(inputs, tables, strict=False)
                   if not _has_entry(t, leaf, subleaf)]  # fmt: skip
        if missing:
            absent.setdefault((leaf, subleaf), missing)
            return
        # Beyond the target's own max leaf (visible on AMD only by
        # Firecracker's doing) the target has nothing: all off.
        value = target.get(leaf, subleaf, r) if _has_entry(target, leaf, subleaf) else 0
        words.setdefault((leaf, subleaf), {})[r] = (value, care)
        entry = target.lookup(leaf, subleaf) or tables[0].lookup(leaf, subleaf)
        flags[(leaf, subleaf)] = int(entry.flags & EntryFlag.SIGNIFICANT_INDEX) if entry else 0

    for leaf, subleaf, r in reg.words():
        decide(leaf, subleaf, r, _word_mask(reg, leaf, subleaf, r, vendors))
    for leaf, subleaf, r in (*GATES, *XSAVE_WORDS):
        decide(leaf, subleaf, r, _U32)

    for (leaf, subleaf), where in sorted(absent.items()):
        # Only worth a note where some host has a named feature there.
        on = sorted({f.name for t in tables for f in reg.present(t)
                     if (f.leaf, f.subleaf) == (leaf, subleaf)})  # fmt: skip
        if on:
            notes.append(
                f"CPUID {leaf:#x}.{subleaf:#x}: not on {', '.join(where)} (Firecracker refuses "
                f"a modifier for an entry KVM does not list), so it stays as each host has it: "
                f"{', '.join(on)}"
            )

    cpuid_modifiers = []
    for (leaf, subleaf), regs in sorted(words.items()):
        cpuid_modifiers.append({
            "leaf": f"{leaf:#x}",
            "subleaf": f"{subleaf:#x}",
            "flags": flags[(leaf, subleaf)],
            "modifiers": [{"register": r, "bitmap": bitmap(v & care, care)}
                          for r in REGISTERS if r in regs for v, care in (regs[r],)],
        })  # fmt: skip

    msr_modifiers, msr_note = _msr_modifiers(tables, mreg, vendors, target, reg)
    if msr_note:
        notes.append(msr_note)
    left = sorted({f.name for f in reg.features if f.kind is FeatureKind.DYNAMIC}
                  | {f.name for f in reg.features
                     if _normalized(vendors, f.leaf, f.subleaf, f.reg) & f.mask})  # fmt: skip
    notes.append(f"left to Firecracker and the guest (normalized after the template, or "
                 f"following the guest's CR4): {', '.join(left)}")  # fmt: skip
    doc = {"cpuid_modifiers": cpuid_modifiers, "msr_modifiers": msr_modifiers}
    return Template(doc, tuple(notes))


def _msr_modifiers(
    tables: Sequence[CpuidTable], mreg: MsrRegistry, vendors: set[str],
    target: CpuidTable, reg: Registry,
) -> tuple[list[dict[str, str]], str | None]:  # fmt: skip
    per_host = [guest_msr_values(t) for t in tables]
    if any(v is None for v in per_host):
        return [], "no feature-MSR values in every input, so no msr_modifiers"
    known = [v for v in per_host if v is not None]
    hidden = frozenset().union(*(_HIDDEN_MSRS.get(v, frozenset()) for v in vendors))
    common = set.intersection(*(set(v) for v in known)) if known else set()
    out = []
    for index in sorted(common - hidden):
        info = mreg.msr(index)
        if info is None or info.layout is not MsrLayout.FLAGS:
            continue  # a number or VMX controls: not feature flags to intersect
        if info.enumerated_by is not None and not reg.lookup(info.enumerated_by).present(target):
            continue  # the template's CPUID says the MSR is not there
        care = 0
        for f in mreg.in_msr(index):
            care |= f.mask
        value = care
        for v in known:
            value &= v[index]
        if care:
            out.append({"addr": f"{index:#x}", "bitmap": bitmap(value, care, 64)})
    return out, None


def without(table: CpuidTable, names: Iterable[str], reg: Registry | None = None) -> CpuidTable:
    """`table` with the named features' bits cleared (--max-model's cap)."""
    reg = reg or registry()
    clear: dict[tuple[int, int], dict[Register, int]] = {}
    for name in names:
        f = reg.lookup(name)
        word = clear.setdefault((f.leaf, f.subleaf), {})
        word[f.reg] = word.get(f.reg, 0) | f.mask
    out = table
    for (leaf, subleaf), regs in clear.items():
        entry = out.lookup(leaf, subleaf)
        if entry is None:
            continue
        changes = {r: entry.reg(r) & ~m & _U32 for r, m in regs.items()}
        out = out.replace_entry(entry.replace(**changes))
    return out


def render(
    target: CpuidTable, inputs: Sequence[Dump], off: Iterable[str] = (),
    keep: Iterable[str] | None = None,
) -> tuple[str, tuple[str, ...]]:  # fmt: skip
    """The template for `target` with the features `off` cleared and, given
    `keep` (a capped configuration's features that are on), every named
    feature outside it too; as JSON text, and its notes."""
    if keep is not None:
        kept = set(keep)
        off = {*off, *(f.name for f in registry().features
                       if f.kind is not FeatureKind.DYNAMIC and f.name not in kept)}  # fmt: skip
    t = template(without(target, off), inputs)
    return t.text(), t.notes
