"""KVM_GET_SUPPORTED_CPUID against this host's own CPUID instruction: every
entry is the host's answer with what KVM cannot give masked out, except for a
documented list of bits KVM synthesizes (emulates without the host CPU having
them), each with its reason. Also the entry flags of both ioctls."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

import pytest

from conformance import report as reporting
from conformance.hostcpuid import HostCpuid, pinned
from kvmcpuid_virt.cpuid.features import registry
from kvmcpuid_virt.cpuid.table import REGISTERS, CpuidTable, EntryFlag
from kvmcpuid_virt.kvm import Kvm

Bit = tuple[int, int, str, int]

# Bits KVM reports although the host CPU may lack them, and why
# (arch/x86/kvm/cpuid.c, kvm_set_cpu_caps and __do_cpuid_func).
SYNTHESIZED: Final[dict[Bit, str]] = {
    (0x1, 0, "ecx", 21): "x2apic: the in-kernel LAPIC emulates x2APIC mode",
    (0x1, 0, "ecx", 24): "tsc-deadline: the in-kernel LAPIC emulates the deadline timer",
    (0x1, 0, "ecx", 31): "hypervisor: KVM always tells the guest it runs under a hypervisor",
    (0x6, 0, "eax", 2): "arat: the emulated APIC timer keeps running in deep C-states",
    (0x7, 0, "ebx", 1): "tsc-adjust: KVM emulates the IA32_TSC_ADJUST MSR",
    (0x7, 0, "ecx", 2): "umip: KVM emulates UMIP by intercepting SGDT/SIDT/... on "
                        "hosts without it",
    (0x7, 0, "edx", 26): "spec-ctrl: synthesized from AMD's IBRS (one MSR, both vendors)",
    (0x7, 0, "edx", 27): "stibp: synthesized from AMD's STIBP",
    (0x7, 0, "edx", 29): "arch-capabilities: KVM emulates IA32_ARCH_CAPABILITIES for every "
                         "guest, so mitigations can be reported",
    (0x7, 0, "edx", 31): "ssbd: synthesized from AMD's SSBD / VIRT_SSBD",
    (0x8000_0008, 0, "ebx", 24): "amd-ssbd: synthesized from Intel's SPEC_CTRL_SSBD",
    (0x8000_0008, 0, "ebx", 25): "virt-ssbd: KVM emulates VIRT_SPEC_CTRL",
    (0x8000_0021, 0, "eax", 2): "lfence-always-serializing: KVM sets it where the host's "
                                "LFENCE serializes (mitigation MSR set)",
    (0x8000_0021, 0, "eax", 6): "null-sel-clr-base: KVM emulates it",
}
# Bits KVM_GET_EMULATED_CPUID may report: instructions KVM's emulator handles
# (each traps to the emulator when the host CPU lacks them).
EMULATED: Final[dict[Bit, str]] = {
    (0x1, 0, "ecx", 22): "movbe: the instruction emulator decodes MOVBE",
    (0x7, 0, "ecx", 22): "rdpid: emulated through the TSC_AUX MSR",
    (0x7, 0, "ebx", 14): "mpx: once emulated for migration, removed in 5.x",
}
# Words that carry identity rather than features: passed through unchanged.
IDENTITY: Final = (
    (0x0, 0, ("ebx", "ecx", "edx")),  # vendor
    (0x1, 0, ("eax",)),  # family/model/stepping
    (0x8000_0000, 0, ("ebx", "ecx", "edx")),
    (0x8000_0001, 0, ("eax",)),
    (0x8000_0005, 0, REGISTERS),  # L1 caches and TLBs
    (0x8000_0006, 0, REGISTERS),  # L2/L3
)


@pytest.fixture(scope="module")
def tables() -> Iterator[tuple[CpuidTable, CpuidTable, HostCpuid]]:
    """(supported, emulated, host cpuid), read on one pinned CPU."""
    import os

    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm: the KVM API checks need a KVM host")
    with pinned(), Kvm() as kvm, HostCpuid() as host:
        yield kvm.supported_cpuid(), kvm.emulated_cpuid(), host


def _label(leaf: int, sub: int, reg: str, bit: int) -> str:
    f = registry().at(leaf, sub, reg, bit)
    pos = f"{leaf:#x}.{sub}:{reg}[{bit}]"
    return f"{f.name} ({pos})" if f else pos


def test_supported_is_host_cpuid_masked(request: pytest.FixtureRequest,
                                        tables: tuple[CpuidTable, CpuidTable, HostCpuid]
                                        ) -> None:
    """In every feature word of the CPU's own ranges (not KVM's 0x40000000
    leaves, which are KVM's own), KVM reports only bits the host CPU has,
    plus the documented synthesized ones."""
    supported, _, host = tables
    with pinned():
        own = {(e.function, e.index): host(e.function, e.index) for e in supported}
    synthesized: list[str] = []
    undocumented: list[str] = []
    for leaf, sub, reg in registry().words():
        if leaf & 0xF000_0000 == 0x4000_0000 or supported.lookup(leaf, sub) is None:
            continue
        kvm_value = supported.get(leaf, sub, reg)
        host_value = own[(leaf, sub) if (leaf, sub) in own else (leaf, 0)][
            REGISTERS.index(reg)]
        extra = kvm_value & ~host_value
        for bit in range(32):
            if extra >> bit & 1:
                key = (leaf, sub, reg, bit)
                if key in SYNTHESIZED:
                    synthesized.append(f"{_label(*key)}: {SYNTHESIZED[key]}")
                else:
                    undocumented.append(_label(*key))
    reporting.EXTRAS["synthesized_by_kvm"] = synthesized
    reporting.record(request, issues=synthesized, kind="host")
    assert not undocumented, (
        "KVM reports bits the host CPU lacks, without a documented reason: "
        + ", ".join(undocumented)
    )


def test_identity_words_pass_through(tables: tuple[CpuidTable, CpuidTable, HostCpuid]
                                     ) -> None:
    supported, _, host = tables
    bad = []
    with pinned():
        for leaf, sub, regs in IDENTITY:
            entry = supported.lookup(leaf, sub)
            if entry is None:
                continue
            answer = host(leaf, sub)
            for reg in regs:
                if entry.reg(reg) != answer[REGISTERS.index(reg)]:
                    bad.append(f"{leaf:#x}.{sub}:{reg} kvm {entry.reg(reg):#x} "
                               f"host {answer[REGISTERS.index(reg)]:#x}")
    assert not bad, "identity words differ from the host's: " + "; ".join(bad)


def test_max_leaves_do_not_exceed_host(tables: tuple[CpuidTable, CpuidTable, HostCpuid]
                                       ) -> None:
    supported, _, host = tables
    with pinned():
        for base in (0x0, 0x8000_0000):
            assert supported.get(base, 0, "eax") <= host(base)[0], f"max leaf of {base:#x}"


def test_emulated_bits_are_documented(tables: tuple[CpuidTable, CpuidTable, HostCpuid]
                                      ) -> None:
    _, emulated, _ = tables
    bad = []
    for e in emulated:
        for reg in REGISTERS:
            value = e.reg(reg)
            if e.function in (0x0, 0x8000_0000) and reg == "eax":
                continue  # the max leaf of the range, not a feature word
            bad += [_label(e.function, e.index, reg, bit) for bit in range(32)
                    if value >> bit & 1 and (e.function, e.index, reg, bit) not in EMULATED]
    assert not bad, "KVM_GET_EMULATED_CPUID reports undocumented bits: " + ", ".join(bad)


@pytest.mark.parametrize("kind", ["supported", "emulated"])
def test_entry_flags_mean_what_they_say(tables: tuple[CpuidTable, CpuidTable, HostCpuid],
                                        kind: str) -> None:
    """Unindexed entries answer every subleaf, so they are listed once at
    index 0; STATEFUL_FUNC only on the old leaf 2; no key twice."""
    table = tables[0] if kind == "supported" else tables[1]
    keys = [(e.function, e.index) for e in table]
    assert len(keys) == len(set(keys)), "an entry is listed twice"
    for e in table:
        if not e.flags & EntryFlag.SIGNIFICANT_INDEX:
            assert e.index == 0, f"{e.function:#x}: index {e.index} without SIGNIFICANT_INDEX"
        if e.flags & EntryFlag.STATEFUL_FUNC:
            assert e.function == 2, f"{e.function:#x}: STATEFUL_FUNC outside leaf 2"
