"""The baseline's feature MSRs: the flag bits every host can give.

Bit positions from the Intel SDM (vol. 4, IA32_ARCH_CAPABILITIES, MSR 10AH:
RDCL_NO bit 0, IBRS_ALL 1, RSBA 2, SKIP_L1DFL_VMENTRY 3, SSB_NO 4, MDS_NO
5, PSCHANGE_MC_NO 6, TSX_CTRL 7, TAA_NO 8; IA32_BIOS_SIGN_ID, 8BH, holds
the microcode revision, a number), written out here."""

from __future__ import annotations

from kvmcpuid_virt.analysis.baseline import baseline
from kvmcpuid_virt.config.msr_policy import msrs_for
from kvmcpuid_virt.cpuid.formats import Dump
from kvmcpuid_virt.cpuid.msr_values import FeatureMsrs
from kvmcpuid_virt.cpuid.table import CpuidEntry, CpuidTable, EntryFlag
from kvmcpuid_virt.toolfacts.facts import NO_TOOLS

ARCH_CAPABILITIES = 0x10A
BIOS_SIGN_ID = 0x8B
RDCL_NO, IBRS_ALL, RSBA, SSB_NO, MDS_NO, TAA_NO = 1 << 0, 1 << 1, 1 << 2, 1 << 4, 1 << 5, 1 << 8
BIT_13 = 1 << 13  # reserved in the SDM this registry follows: no named feature


def _host(name: str, msrs: FeatureMsrs | None) -> Dump:
    # An Intel-looking table: leaf 0 "GenuineIntel", leaf 7 EDX[29]
    # (IA32_ARCH_CAPABILITIES enumerated), SSE2.
    table = CpuidTable([
        CpuidEntry(0, 0, EntryFlag.NONE, 7, 0x756E6547, 0x6C65746E, 0x49656E69),
        CpuidEntry(1, 0, EntryFlag.NONE, 0x000906EA, 0, 0, 1 << 26),
        CpuidEntry(7, 0, EntryFlag.SIGNIFICANT_INDEX, 0, 0, 0, 1 << 29),
    ], msrs)  # fmt: skip
    return Dump(table, "supported", {}, name)


def _values(msrs: FeatureMsrs | None) -> dict[int, int]:
    assert msrs is not None and msrs.available
    return dict(msrs.items)


def test_flag_bits_are_anded_and_numbers_left_out() -> None:
    a = _host("a", FeatureMsrs([(ARCH_CAPABILITIES, RDCL_NO | IBRS_ALL | MDS_NO | TAA_NO),
                                (BIOS_SIGN_ID, 0x100)]))  # fmt: skip
    b = _host("b", FeatureMsrs([(ARCH_CAPABILITIES, RDCL_NO | MDS_NO | SSB_NO | BIT_13),
                                (BIOS_SIGN_ID, 0x200)]))  # fmt: skip
    result = baseline([a, b])
    assert _values(result.table.msrs) == {ARCH_CAPABILITIES: RDCL_NO | MDS_NO}


def test_only_what_each_hosts_vcpu_accepts() -> None:
    # Host a's KVM lists MDS_NO, but its vCPU refused it (the recorded trial).
    a = _host("a", FeatureMsrs([(ARCH_CAPABILITIES, RDCL_NO | MDS_NO)],
                               deliverable=[(ARCH_CAPABILITIES, RDCL_NO)]))  # fmt: skip
    b = _host("b", FeatureMsrs([(ARCH_CAPABILITIES, RDCL_NO | MDS_NO)]))
    assert _values(baseline([a, b]).table.msrs) == {ARCH_CAPABILITIES: RDCL_NO}


def test_an_msr_one_host_lacks_is_not_promised() -> None:
    a = _host("a", FeatureMsrs([(ARCH_CAPABILITIES, RDCL_NO)]))
    b = _host("b", FeatureMsrs([]))  # KVM answered: no feature MSR at all
    assert _values(baseline([a, b]).table.msrs) == {}


def test_a_host_whose_msrs_are_unknown_leaves_none_available() -> None:
    a = _host("a", FeatureMsrs([(ARCH_CAPABILITIES, RDCL_NO)]))
    old = _host("old.json", None)  # a version-1 dump, `cpuid -1r` text
    result = baseline([a, old])
    msrs = result.table.msrs
    assert msrs is not None and not msrs.available
    assert any("unknown on old.json" in n for n in result.notes)
    # Not None: a configuration of a baseline that includes this machine
    # must not fill the gap with this machine's own MSRs.
    assert msrs_for(result.table, NO_TOOLS, True) is msrs
    assert baseline([old, old]).table.msrs is None  # nobody's known: unknown


def test_a_host_models_msr_features_count_too() -> None:
    # A feature-only input (a libvirt host-model, kind "config") that names
    # MDS_NO but not RDCL_NO: the baseline promises only MDS_NO.
    a = _host("a", FeatureMsrs([(ARCH_CAPABILITIES, RDCL_NO | MDS_NO)]))
    view = _host("qemu+ssh://b/system", FeatureMsrs([(ARCH_CAPABILITIES, MDS_NO)]))
    hm = Dump(view.table, "config", {}, view.source)
    assert _values(baseline([a, hm]).table.msrs) == {ARCH_CAPABILITIES: MDS_NO}
