"""What QEMU actually hands a guest under KVM, given KVM's supported table.

QEMU does not pass KVM_GET_SUPPORTED_CPUID through unchanged:
kvm_arch_get_supported_cpuid() (target/i386/kvm/kvm.c, QEMU 7.2) patches it,
and x86_cpu_expand_features() (target/i386/cpu.c) then decides which of the
supported bits the `host` model turns on by itself. `qemu_supported` applies
the first step; NO_AUTOENABLE and UNMIGRATABLE describe the second.

The result is cross-checked on a live host against QEMU's own answer
(query-cpu-model-expansion of `host`) by `cross_check`, which also names the
reason for every remaining difference; the live tests fail on any unexplained one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Final

from kvmcpuid_virt.cpuid.table import CpuidEntry, CpuidTable, EntryFlag, Register

__all__ = [
    "AMD_ALIASES",
    "NO_AUTOENABLE",
    "UNMIGRATABLE",
    "Difference",
    "amd_alias_fixup",
    "cross_check",
    "qemu_supported",
]

# Leaf 1 ECX bits QEMU adds or removes (arch/x86 CPUID layout).
_X2APIC: Final = 1 << 21
_TSC_DEADLINE: Final = 1 << 24
_HYPERVISOR: Final = 1 << 31
# Leaf 6 EAX.
_ARAT: Final = 1 << 2
# Leaf 0x40000001 (KVM_CPUID_FEATURES) EAX / EDX (linux/kvm_para.h).
_KVM_FEATURE_PV_UNHALT: Final = 1 << 7
_KVM_FEATURE_MSI_EXT_DEST_ID: Final = 1 << 15
_KVM_HINTS_REALTIME: Final = 1 << 0
KVM_CPUID_FEATURES: Final = 0x40000001

# CPUID_EXT2_AMD_ALIASES: the leaf 1 EDX bits AMD repeats in 0x80000001 EDX
# (fpu vme de pse tsc msr pae mce cx8 apic mtrr pge mca cmov pat pse36 mmx
# fxsr: bits 0-9, 12-17, 23, 24). Intel leaves them 0 there.
AMD_ALIASES: Final = 0x0183F3FF

# Supported, but the `host`/`max` models leave them off unless asked for
# (feature_word_info[].no_autoenable_flags in QEMU): topoext needs a matching
# -smp topology; kvm-hint-dedicated (KVM_HINTS_REALTIME) is a promise that
# vCPUs are pinned, which only the operator can make.
NO_AUTOENABLE: Final = frozenset({"topoext", "kvm-hint-dedicated"})
# Supported, but they block live migration, so `host` (migratable=on by
# default) leaves them off (feature_word_info[].unmigratable_flags).
UNMIGRATABLE: Final = frozenset({"invtsc"})


def _set(
    table: CpuidTable, leaf: int, subleaf: int, reg: Register, set_: int, clear: int
) -> CpuidTable:
    entry = table.lookup(leaf, subleaf)
    if entry is None:
        if not set_:
            return table
        flags = EntryFlag.NONE
        entry = CpuidEntry(leaf, subleaf, flags)
    value = (entry.reg(reg) | set_) & ~clear & 0xFFFF_FFFF
    if value == entry.reg(reg):
        return table
    return table.replace_entry(entry.replace(**{reg: value}))


def qemu_supported(
    kvm: CpuidTable,
    *,
    kernel_irqchip: bool = True,
    split_irqchip: bool = False,
    tsc_deadline_cap: bool = True,
) -> CpuidTable:
    """KVM's supported table as QEMU 7.2 reports it to the CPU model code.

    kernel_irqchip: QEMU's pc/q35 machines use KVM's in-kernel irqchip by
    default; without it x2apic, tsc-deadline and kvm-pv-unhalt cannot work.
    split_irqchip: `kernel-irqchip=split` (IOAPIC in QEMU) adds
    kvm-msi-ext-dest-id. tsc_deadline_cap: KVM_CAP_TSC_DEADLINE_TIMER, present
    since Linux 3.6 on every kernel this tool runs on."""
    t = kvm
    # hypervisor: QEMU sets it even where KVM does not report it (old kernels).
    # tsc-deadline: KVM never listed it in the seed API; QEMU adds it when the
    # in-kernel LAPIC can emulate the deadline timer.
    leaf1_set = _HYPERVISOR
    leaf1_clear = 0
    if kernel_irqchip and tsc_deadline_cap:
        leaf1_set |= _TSC_DEADLINE
    if not kernel_irqchip:
        # The userspace APIC model has no x2APIC mode and no deadline timer.
        leaf1_clear |= _X2APIC | _TSC_DEADLINE
        leaf1_set &= ~_TSC_DEADLINE
    t = _set(t, 1, 0, "ecx", leaf1_set, leaf1_clear)
    # arat: the emulated APIC timer keeps running in deep C-states, always
    # (QEMU ORs it in whether or not KVM listed leaf 6).
    t = _set(t, 6, 0, "eax", _ARAT, 0)
    # AMD aliases: Intel-style KVM answers leave 0x80000001 EDX without the
    # leaf 1 EDX copies; QEMU adds them back (and drops them again for non-AMD
    # vendors when building the guest's CPUID: see amd_alias_fixup).
    ext = t.lookup(0x80000001)
    if ext is not None:
        t = _set(t, 0x80000001, 0, "edx", t.get(1, 0, "edx") & AMD_ALIASES, 0)
    if t.lookup(KVM_CPUID_FEATURES) is not None:
        pv_set = _KVM_FEATURE_MSI_EXT_DEST_ID if split_irqchip else 0
        pv_clear = 0 if kernel_irqchip else _KVM_FEATURE_PV_UNHALT
        t = _set(t, KVM_CPUID_FEATURES, 0, "eax", pv_set, pv_clear)
        # KVM_HINTS_REALTIME is a hint QEMU always allows the user to give.
        t = _set(t, KVM_CPUID_FEATURES, 0, "edx", _KVM_HINTS_REALTIME, 0)
    return t


def amd_alias_fixup(table: CpuidTable, vendor: str) -> CpuidTable:
    """0x80000001 EDX as the guest reads it: AMD vendors get the leaf 1 EDX
    aliases copied over, every other vendor gets them cleared (QEMU
    x86_cpu_realizefn / cpu_x86_cpuid)."""
    if table.lookup(0x80000001) is None:
        return table
    leaf1 = table.get(1, 0, "edx") & AMD_ALIASES
    if vendor == "AuthenticAMD" or vendor == "HygonGenuine":
        return _set(table, 0x80000001, 0, "edx", leaf1, AMD_ALIASES & ~leaf1)
    return _set(table, 0x80000001, 0, "edx", 0, AMD_ALIASES)


@dataclasses.dataclass(frozen=True)
class Difference:
    """One feature where our model of QEMU and QEMU's own `host` answer differ."""

    name: str
    ours: bool
    qemu: bool
    reason: str


def _reason(name: str, ours: bool, qemu: bool, undeliverable: Mapping[str, str]) -> str:
    if qemu and not ours and name in undeliverable:
        return (
            "QEMU's host expansion lists it, but QEMU cannot create a vCPU with it "
            f"on this host ({undeliverable[name]}); the feature-MSR vCPU trial found that out"
        )
    if ours and not qemu:
        if name in NO_AUTOENABLE:
            return "supported but not auto-enabled by QEMU (no_autoenable_flags); =on is accepted"
        if name in UNMIGRATABLE:
            return "supported but unmigratable; -cpu host has migratable=on and leaves it off"
    return ""


def cross_check(
    supported: Iterable[str],
    qemu_host: Mapping[str, bool],
    known: Iterable[str],
    undeliverable: Mapping[str, str] | None = None,
) -> list[Difference]:
    """Differences between the features we call supported (qemu_supported
    applied, canonical QEMU names) and QEMU's `host` expansion props, over the
    names in `known` (registry features this QEMU binary has properties for).
    Each Difference carries its explanation, '' when there is none."""
    ours = set(supported)
    diffs = []
    for name in sorted(set(known)):
        mine = name in ours
        theirs = bool(qemu_host.get(name, False))
        if mine != theirs:
            reason = _reason(name, mine, theirs, undeliverable or {})
            diffs.append(Difference(name, mine, theirs, reason))
    return diffs
