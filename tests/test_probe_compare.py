"""compare(): per-bit comparison and layer attribution, on real raw-KVM guests."""

from __future__ import annotations

import json

import pytest

from kvmcpuid_virt.analysis.backend import Backend
from kvmcpuid_virt.analysis.compare import GUEST_STATE_MASKS, Layer, compare
from kvmcpuid_virt.cpuid.features import registry
from kvmcpuid_virt.cpuid.table import CpuidEntry, CpuidTable
from kvmcpuid_virt.kvm import Kvm
from kvmcpuid_virt.probe.image import default_queries
from kvmcpuid_virt.probe.kvm import run_kvm

# CPUID.80000001H:ECX[0] (LAHF/SAHF in 64-bit mode, AMD APM / Intel SDM):
# a word DESIGN.md lists as honoured exactly by this host's outer hypervisor.
LAHF = (0x8000_0001, 0, "ecx", 0)


def _with_bit(table: CpuidTable, leaf: int, sub: int, reg: str, bit: int, on: bool) -> CpuidTable:
    entry = table.lookup(leaf, sub)
    assert entry is not None
    value = entry.reg(reg)  # type: ignore[arg-type]
    value = value | 1 << bit if on else value & ~(1 << bit)
    return table.replace_entry(entry.replace(**{reg: value}))


@pytest.fixture
def supported(kvm: Kvm) -> CpuidTable:
    table = kvm.supported_cpuid()
    if not table.get(*LAHF[:3]) & 1:  # type: ignore[arg-type]
        pytest.skip("this host's KVM does not support lahf_lm")
    return table


def test_supported_table_matches_in_guest(supported: CpuidTable) -> None:
    result = run_kvm(supported, default_queries(supported))
    cmp = compare(supported, result.observed, backend=Backend.KVM, supported=supported,
                  vmm=result.vmm_view)
    assert cmp.bits_compared > 100
    # Every mismatch on the full supported table must be a bit the host
    # overrides; on controllable words (0x80000001) there are none.
    assert not [m for m in cmp.mismatches if m.leaf == 0x8000_0001], cmp.table()


def test_requested_off_but_set_on_is_attributed_to_the_vmm(supported: CpuidTable) -> None:
    # The VMM (here: our own KVM_SET_CPUID2) sets lahf_lm on while the
    # configuration wanted it off: the guest sees on, KVM_GET_CPUID2 says on.
    requested = _with_bit(supported, *LAHF, on=False)  # type: ignore[arg-type]
    result = run_kvm(supported, default_queries(supported))
    cmp = compare(requested, result.observed, backend=Backend.KVM, supported=supported,
                  vmm=result.vmm_view)
    [m] = [m for m in cmp.mismatches if (m.leaf, m.subleaf, m.reg, m.bit) == LAHF]
    assert (m.requested, m.guest, m.vmm, m.supported) == (False, True, True, True)
    assert m.layer == Layer.VMM and m.name == registry().at(*LAHF).name  # type: ignore[union-attr]
    assert not cmp.ok
    assert "lahf" in cmp.table()


def test_unsupported_request_is_attributed_to_the_config(supported: CpuidTable) -> None:
    # Find a leaf-0x80000001 ECX feature bit that KVM does not support.
    word = supported.get(0x8000_0001, 0, "ecx")
    feature = next(
        f for f in registry().in_word(0x8000_0001, 0, "ecx") if not word & f.mask
    )
    requested = _with_bit(supported, 0x8000_0001, 0, "ecx", feature.bit, on=True)
    result = run_kvm(supported, default_queries(supported))
    cmp = compare(requested, result.observed, backend=Backend.KVM, supported=supported,
                  vmm=result.vmm_view)
    [m] = [m for m in cmp.mismatches if m.name == feature.name]
    assert m.layer == Layer.CONFIG and m.supported is False


def test_uncontrolled_bits_are_reported_but_do_not_fail(supported: CpuidTable) -> None:
    requested = _with_bit(supported, *LAHF, on=False)  # type: ignore[arg-type]
    result = run_kvm(supported, default_queries(supported))
    cmp = compare(requested, result.observed, backend=Backend.KVM,
                  uncontrolled={(0x8000_0001, 0, "ecx"): 1}, vmm=None,
                  words=[(0x8000_0001, 0, "ecx")])
    [m] = [m for m in cmp.mismatches if (m.leaf, m.subleaf, m.reg, m.bit) == LAHF]
    assert not m.controlled and m.layer == Layer.HOST
    assert cmp.ok


def test_guest_state_masks_cover_osxsave_and_apic_id() -> None:
    masked = {(i.leaf, i.reg, i.mask) for i in GUEST_STATE_MASKS}
    assert (1, "ecx", 1 << 27) in masked  # OSXSAVE, SDM Vol. 2A CPUID leaf 1
    assert (1, "ebx", 0xFF00_0000) in masked  # initial APIC ID
    assert (7, "ecx", 1 << 4) in masked  # OSPKE


def test_words_the_guest_was_not_asked_for_do_not_pass(supported: CpuidTable) -> None:
    # A requested feature word the probe never read is not a match.
    result = run_kvm(supported, [q for q in default_queries(supported) if q[0] != 0x8000_0001])
    cmp = compare(supported, result.observed, backend=Backend.KVM, vmm=result.vmm_view,
                  words=[(0x8000_0001, 0, "ecx")])
    assert cmp.words_missing == ((0x8000_0001, 0, "ecx"),)
    assert not cmp.ok and "NOT CHECKED" in cmp.summary()


def test_layer_and_backend_serialize_as_the_strings_they_were() -> None:
    # The JSON report's and the messages' contract, unchanged by the enums:
    # "layer": "vmm", "backend": "qemu", "qemu: ..." as when both were str.
    requested = CpuidTable([CpuidEntry(0x8000_0001)])
    guest = CpuidTable([CpuidEntry(0x8000_0001, ecx=1)])
    cmp = compare(requested, guest, backend=Backend.QEMU, vmm=guest,
                  words=[(0x8000_0001, 0, "ecx")])
    [m] = cmp.mismatches
    assert m.layer is Layer.VMM
    text = json.dumps(cmp.as_json())
    assert '"backend": "qemu"' in text and '"layer": "vmm"' in text
    assert cmp.summary().startswith("qemu: 32 bits and 0 fields compared, 1 mismatch(es)")
    assert [str(layer) for layer in Layer] == ["config", "vmm", "host", "kvm"]
    assert [str(b) for b in Backend] == ["kvm", "qemu", "libvirt"]


def _with_eax(table: CpuidTable, leaf: int, eax: int) -> CpuidTable:
    entry = table.lookup(leaf, 0)
    assert entry is not None
    return table.replace_entry(entry.replace(eax=eax))


def test_a_real_guest_given_another_stepping_names_it(supported: CpuidTable) -> None:
    # CPUID.1:EAX[3:0] is the stepping (SDM Vol. 2A); the VMM (our own
    # KVM_SET_CPUID2) sets another one, KVM_GET_CPUID2 shows it.
    eax = supported.get(1, 0, "eax")
    other = eax & ~0xF | (eax + 1) & 0xF
    result = run_kvm(_with_eax(supported, 1, other), default_queries(supported))
    cmp = compare(supported, result.observed, backend=Backend.KVM, supported=supported,
                  vmm=result.vmm_view)
    [m] = [m for m in cmp.field_mismatches if m.name == "stepping"]
    assert (m.requested, m.guest) == (str(eax & 0xF), str(other & 0xF))
    assert m.layer is Layer.VMM and not cmp.ok


def test_a_real_guest_with_a_cut_max_leaf_lacks_the_leaves_above(supported: CpuidTable) -> None:
    top = supported.get(0, 0, "eax")
    if top <= 7:
        pytest.skip(f"this host's KVM gives max basic leaf {top:#x}: nothing above 7 to cut")
    result = run_kvm(_with_eax(supported, 0, 7), default_queries(supported))
    cmp = compare(supported, result.observed, backend=Backend.KVM, supported=supported,
                  vmm=result.vmm_view)
    texts = [m.text() for m in cmp.field_mismatches]
    assert f"max basic leaf: configured {top:#x}, guest sees 0x7 (changed in the VMM)" in texts
    assert any(t.startswith(f"basic leaves 0x8..{top:#x}: configured present") for t in texts)


def test_an_empty_extended_range_compares_only_its_max_leaf() -> None:
    """QEMU's xlevel=0 models (pentium3): the configuration has no extended
    range, so leaf 0x80000000's other registers (KVM's vendor string there)
    are not the guest's to match; its max leaf still is."""
    vendor = (0x6874_7541, 0x444D_4163, 0x6974_6E65)  # 'AuthenticAMD' as EBX, ECX, EDX
    requested = CpuidTable([CpuidEntry(0, eax=2), CpuidEntry(0x8000_0000, 0, 0, 0, *vendor)])
    quiet = CpuidTable([CpuidEntry(0, eax=2), CpuidEntry(0x8000_0000)])
    cmp = compare(requested, quiet, backend=Backend.QEMU)
    assert cmp.ok and not cmp.mismatches and cmp.fields_compared == 3  # vendor, both max leaves
    raised = CpuidTable([CpuidEntry(0, eax=2), CpuidEntry(0x8000_0000, eax=0x8000_0008)])
    [m] = compare(requested, raised, backend=Backend.QEMU).field_mismatches
    assert m.name == "max extended leaf"
