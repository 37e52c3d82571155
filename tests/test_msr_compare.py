"""analysis/msr_compare: a guest's RDMSR answers against the configuration,
each mismatch named and attributed to a layer; and the wired-up verify,
whose raw-KVM guest must read what KVM_SET_MSRS wrote (checked against a C
program's own reading of KVM's value)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvmcpuid_virt.analysis.backend import Backend
from kvmcpuid_virt.analysis.compare import Layer
from kvmcpuid_virt.analysis.msr_compare import (
    PROBED,
    compare_msrs,
    expectations,
    gate_of,
    msr_queries,
)
from kvmcpuid_virt.config.build import build
from kvmcpuid_virt.cpuid.msr_values import FeatureMsrs
from kvmcpuid_virt.fsutil import load_dump
from tests.conftest import FACTS, REPO, cpu_dump_paths

# IA32_ARCH_CAPABILITIES: rdctl-no is bit 0, mds-no bit 5 (Intel SDM vol. 4).
RDCTL_NO, MDS_NO = 1 << 0, 1 << 5


def test_gates_are_the_sdm_enumeration_bits() -> None:
    assert gate_of(0x10A) == (7, 0, "edx", 29)  # CPUID.07H.0:EDX[29]
    assert gate_of(0xCF) == (7, 0, "edx", 30)  # CPUID.07H.0:EDX[30]
    assert gate_of(0x345) == (1, 0, "ecx", 15)  # CPUID.01H:ECX[15] PDCM
    assert gate_of(0x8B) == (1, 0, "edx", 5)  # CPUID.01H:EDX[5] MSR
    assert [q[0] for q in msr_queries()] == list(PROBED)


def test_matching_answers_are_ok_and_unset_ones_not_modelled() -> None:
    cmp = compare_msrs({0x10A: RDCTL_NO}, {0x10A: RDCTL_NO, 0x8B: 0x1000065, 0xCF: None},
                       Backend.QEMU)  # fmt: skip
    assert cmp.ok and cmp.not_modelled == ("MSR 8BH IA32_BIOS_SIGN_ID reads 0x1000065: "
                                           "the configuration sets no value",)  # fmt: skip
    assert "2 feature MSR(s) read" in cmp.summary() and "all as configured" in cmp.summary()


@pytest.mark.parametrize(("vmm", "offered", "layer"), [
    (None, None, Layer.HOST),
    ({0x10A: RDCTL_NO}, None, Layer.VMM),
    ({0x10A: RDCTL_NO | MDS_NO}, None, Layer.KVM),
    ({0x10A: RDCTL_NO | MDS_NO}, {0x10A: RDCTL_NO}, Layer.CONFIG),
])  # fmt: skip
def test_a_differing_bit_is_named_and_attributed(vmm: dict[int, int] | None,
                                                 offered: dict[int, int] | None,
                                                 layer: Layer) -> None:  # fmt: skip
    cmp = compare_msrs({0x10A: RDCTL_NO | MDS_NO}, {0x10A: RDCTL_NO}, Backend.KVM, vmm=vmm,
                       offered=offered)  # fmt: skip
    (m,) = cmp.mismatches
    assert (m.index, m.name, m.expected, m.guest, m.layer) == (0x10A, "mds-no", 1, 0, layer)
    assert not cmp.ok and "mds-no" in cmp.summary()
    assert json.loads(json.dumps(cmp.as_json()))["mismatches"][0]["layer"] == str(layer)


def test_an_msr_the_guest_cannot_see_is_a_host_mismatch() -> None:
    cmp = compare_msrs({0x10A: RDCTL_NO}, {0x10A: None}, Backend.LIBVIRT)
    (m,) = cmp.mismatches
    assert m.layer is Layer.HOST and m.guest is None and "does not exist" in m.explanation


def test_value_msrs_compare_whole() -> None:
    cmp = compare_msrs({0x8B: 0x1000065}, {0x8B: 0x1000066}, Backend.KVM, vmm={0x8B: 0x1000066})
    (m,) = cmp.mismatches
    assert m.name == "MSR 8BH IA32_BIOS_SIGN_ID" and m.layer is Layer.VMM


def test_simulated_intel_expectations_follow_the_recorded_msr_bits() -> None:
    """The recorded Atom (Intel; this host is AMD): every backend expects
    IA32_ARCH_CAPABILITIES with the bits that are on; raw KVM writes exactly
    that, plus KVM's IA32_BIOS_SIGN_ID when a vCPU accepts it."""
    atom = next(p for p in cpu_dump_paths() if "Atom-P5362" in p.name and p.suffix == ".xml")
    config = build(load_dump(str(atom)).table, facts=FACTS, source=str(atom))
    assert config.expected_msrs[0x10A] & RDCTL_NO
    expected, to_set = expectations(config, Backend.QEMU, None)
    assert expected == dict(config.expected_msrs) and to_set is None
    host = FeatureMsrs.of({0x8B: 0x1000065}, {0x8B: 0x1000065})
    expected, to_set = expectations(config, Backend.KVM, host)
    assert to_set == expected == {**config.expected_msrs, 0x8B: 0x1000065}
    refused = FeatureMsrs.of({0x8B: 0x1000065}, {0x8B: 0})
    assert 0x8B not in expectations(config, Backend.KVM, refused)[1]  # type: ignore[operator]


# --- live ------------------------------------------------------------------------


@pytest.mark.kvm
def test_raw_kvm_guest_reading_another_value_than_configured_is_caught() -> None:
    """A real guest: KVM_SET_MSRS writes one value, the configuration says
    another (a mutant VMM): the comparison fails naming the MSR and the VMM."""
    from kvmcpuid_virt.kvm import Kvm
    from kvmcpuid_virt.probe import image
    from kvmcpuid_virt.probe.kvm import run_kvm

    with Kvm() as kvm:
        table = kvm.supported_cpuid()
    result = run_kvm(table, image.default_queries(table), msrs={0x8B: 0x2222_0000_0000},
                     msr_queries=msr_queries())  # fmt: skip
    assert result.msrs[0x8B] == 0x2222_0000_0000
    cmp = compare_msrs({0x8B: 0x1111_0000_0000}, result.msrs, Backend.KVM, vmm=result.msr_vmm)
    (m,) = cmp.mismatches
    assert m.layer is Layer.VMM and m.guest == 0x2222_0000_0000
    good = compare_msrs({0x8B: 0x2222_0000_0000}, result.msrs, Backend.KVM, vmm=result.msr_vmm)
    assert good.ok


@pytest.mark.kvm
def test_verify_raw_kvm_guest_reads_kvms_own_microcode_value() -> None:
    """`kvmcpuid verify --backend kvm`: its guest read IA32_BIOS_SIGN_ID as
    the C program reads KVM's feature-MSR value, and the MSRs its CPUID does
    not enumerate were not read."""
    from tests.kvm_msr_c import c_msr_reading

    c = c_msr_reading()
    proc = subprocess.run([sys.executable, "-m", "kvmcpuid_virt.cli", "verify", "--backend", "kvm",
                           "--format", "json"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    doc = json.loads(proc.stdout)
    (report,) = doc["backends"]
    msrs = report["msrs"]
    assert msrs is not None and msrs["mismatches"] == []
    if c.cap and 0x8B in c.values and c.set_result.get(0x8B) == 1:
        assert int(msrs["read"]["0x8b"], 16) == c.values[0x8B]


def test_perf_capabilities_is_not_modelled_for_the_vmm_backends() -> None:
    """QEMU writes IA32_PERF_CAPABILITIES only with pmu=on: no expectation
    for QEMU and libvirt, raw KVM writes and expects it."""
    import dataclasses

    atom = next(p for p in cpu_dump_paths() if "Atom-P5362" in p.name and p.suffix == ".xml")
    base = build(load_dump(str(atom)).table, facts=FACTS, source=str(atom))
    config = dataclasses.replace(base, expected_msrs={**base.expected_msrs, 0x345: 1 << 13})
    for backend in (Backend.QEMU, Backend.LIBVIRT):
        assert 0x345 not in expectations(config, backend, None)[0]
    expected, to_set = expectations(config, Backend.KVM, None)
    assert expected[0x345] == (to_set or {})[0x345] == 1 << 13
