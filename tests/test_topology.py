"""Topology: the multi-vCPU probe guest (probe/smp_image.py) on QEMU with
`-smp`, and analysis.topology's checks, which follow the CPUID definitions
(Intel SDM leaf 1/4/0xB, AMD APM 0x80000008/0x8000001E), not this project's
tables. A VMM that boots another topology than configured is caught, the
field named."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmcpuid_virt.adapters.qemu import cpu_value
from kvmcpuid_virt.analysis.topology import TOPOLOGY_QUERIES, check_topology, smp_queries
from kvmcpuid_virt.config.build import build
from kvmcpuid_virt.config.topology import Topology
from kvmcpuid_virt.cpuid.table import CpuidEntry, CpuidTable, EntryFlag
from kvmcpuid_virt.errors import InputError, ProbeError
from kvmcpuid_virt.kvm import Kvm
from kvmcpuid_virt.probe import smp_image
from kvmcpuid_virt.probe.image import default_queries
from kvmcpuid_virt.probe.qemu import run_qemu_smp
from kvmcpuid_virt.toolfacts.facts import ToolFacts

TOPOLOGIES = ["sockets=1,cores=1,threads=1", "sockets=1,cores=2,threads=2",
              "sockets=2,cores=2,threads=1", "sockets=2,cores=3,threads=2"]


def test_topology_parse_and_renderings() -> None:
    t = Topology.parse("sockets=2,cores=3,threads=2")
    assert (t.vcpus, t.per_package, t.qemu_smp()) == (12, 6, "12,sockets=2,cores=3,threads=2")
    el = t.libvirt_topology()
    assert [el.get(k) for k in ("sockets", "dies", "cores", "threads")] == ["2", "1", "3", "2"]
    for bad in ("2,2,2", "sockets=0,cores=1,threads=1", "sockets=8,cores=8,threads=2", ""):
        with pytest.raises(InputError):
            Topology.parse(bad)


def _table(i: int) -> CpuidTable:
    return CpuidTable([CpuidEntry(1, 0, EntryFlag.SIGNIFICANT_INDEX, 0xA10F11, i << 24, 0, 0),
                       CpuidEntry(0xB, 1, EntryFlag.SIGNIFICANT_INDEX, 1, 2, 0x201, i)])


def test_smp_frame_round_trip_and_damage() -> None:
    qs = [(1, 0), (0xB, 1)]
    tables = [_table(i) for i in range(3)]
    frame = smp_image.encode(qs, 3, tables)
    back = smp_image.parse(b"firmware chatter" + frame, qs, 3)
    assert [t.get(1, 0, "ebx") >> 24 for t in back] == [0, 1, 2]
    assert back[2].get(0xB, 1, "edx") == 2
    bad = bytearray(frame)
    bad[len(smp_image.START_MARKER) + 20] ^= 1  # one answer bit
    with pytest.raises(ProbeError, match="checksum"):
        smp_image.parse(bytes(bad), qs, 3)
    with pytest.raises(ProbeError, match="header"):
        smp_image.parse(frame, [(1, 0), (0xB, 0)], 3)
    with pytest.raises(ProbeError, match="short"):
        smp_image.parse(frame[:-5], qs, 3)


def test_image_fits_and_is_deterministic() -> None:
    qs = smp_queries([(0, 0)])
    assert set(TOPOLOGY_QUERIES) <= set(qs)
    assert smp_image.build(qs, 4, sipi=True) == smp_image.build(list(qs), 4, sipi=True)
    with pytest.raises(ValueError):
        smp_image.build(qs, smp_image.MAX_VCPUS + 1, sipi=True)


def _host_cpu(kvm: Kvm, facts: ToolFacts) -> tuple[str, list[tuple[int, int]]]:
    config = build(kvm.supported_cpuid(), source="/dev/kvm", facts=facts)
    return cpu_value(config), smp_queries(default_queries(config.expected))


@pytest.mark.parametrize("spec", TOPOLOGIES)
def test_qemu_guest_topology_is_consistent(kvm: Kvm, qemu_binary: str, live_facts: ToolFacts,
                                           spec: str) -> None:
    """Every vCPU reports, with its own APIC IDs, and what each shows of the
    topology is what the definitions say of `-smp spec`."""
    cpu, queries = _host_cpu(kvm, live_facts)
    topology = Topology.parse(spec)
    result = run_qemu_smp(cpu, queries, topology.qemu_smp(), topology.vcpus, 30.0, qemu_binary)
    assert len(result.tables) == topology.vcpus
    assert check_topology(topology, result.tables) == []
    apic = sorted(t.get(1, 0, "ebx") >> 24 for t in result.tables)
    assert len(set(apic)) == topology.vcpus


@pytest.mark.parametrize(("booted", "named"), [
    ("4,sockets=1,cores=4,threads=1", "topology level 0 (0xB.0)"),
    ("4,sockets=2,cores=1,threads=2", "logical processor count (1 EBX[23:16])"),
    ("2,sockets=1,cores=2,threads=1", "vCPUs: the topology has 4, 2 reported"),
])
def test_a_vmm_booting_another_topology_is_caught(kvm: Kvm, qemu_binary: str,
                                                  live_facts: ToolFacts, tmp_path: Path,
                                                  booted: str, named: str) -> None:
    """A QEMU wrapper that swaps the -smp value: configured
    sockets=1,cores=2,threads=2, the check names what the guest shows."""
    wrapper = tmp_path / "qemu-smp-mutant"
    wrapper.write_text(
        "#!/bin/bash\nargs=(); next=0\n"
        'for a in "$@"; do\n'
        f'  if [ $next = 1 ]; then a="{booted}"; next=0; fi\n'
        '  [ "$a" = "-smp" ] && next=1; args+=("$a")\n'
        "done\n"
        f'exec {qemu_binary} "${{args[@]}}"\n'
    )
    wrapper.chmod(0o755)
    cpu, queries = _host_cpu(kvm, live_facts)
    topology = Topology.parse("sockets=1,cores=2,threads=2")
    vcpus = int(booted.split(",", 1)[0])
    result = run_qemu_smp(cpu, queries, topology.qemu_smp(), max(vcpus, topology.vcpus), 30.0,
                          str(wrapper))
    problems = check_topology(topology, result.tables)
    assert any(named in p for p in problems), problems


@pytest.mark.parametrize(("spec", "booted"), [
    ("sockets=1,cores=2,threads=2", "sockets=1,cores=2,threads=2"),
    ("sockets=2,cores=1,threads=1", "sockets=2,cores=1,threads=1"),
    ("sockets=1,cores=2,threads=2", "sockets=1,cores=4,threads=1"),
])
def test_libvirt_guest_topology(kvm: Kvm, libvirt_conn_uri: str, live_facts: ToolFacts,
                                spec: str, booted: str) -> None:
    """libvirt's <vcpu> and <cpu><topology>: consistent when booted as
    configured; another topology with as many vCPUs is caught."""
    from kvmcpuid_virt.adapters import libvirt as lv
    from kvmcpuid_virt.probe.libvirt import LibvirtProbe

    config = build(kvm.supported_cpuid(), source="/dev/kvm", facts=live_facts)
    queries = smp_queries(default_queries(config.expected))
    want, run = Topology.parse(spec), Topology.parse(booted)
    with LibvirtProbe(libvirt_conn_uri, keep_failed_logs=False) as probe:
        result = probe.run_smp(lv.render(config, lv.base_model(config, live_facts)), queries,
                               run.vcpus, run.libvirt_topology(), 30.0,
                               features=lv.kvm_features_element(config))
    assert len(result.tables) == run.vcpus
    problems = check_topology(want, result.tables)
    if spec == booted:
        assert problems == []
    else:
        assert any("topology level 0 (0xB.0)" in p for p in problems), problems


@pytest.mark.parametrize("spec", TOPOLOGIES)
def test_raw_kvm_guest_topology_is_consistent(kvm: Kvm, live_facts: ToolFacts,
                                              spec: str) -> None:
    """Raw KVM, this tool the VMM: vcpu_tables() lays the topology out per
    vCPU; what every vCPU then reads is consistent by the definitions."""
    from kvmcpuid_virt.config.topology import vcpu_tables
    from kvmcpuid_virt.probe.kvm import run_kvm_smp

    config = build(kvm.supported_cpuid(), source="/dev/kvm", facts=live_facts)
    topology = Topology.parse(spec)
    result = run_kvm_smp(vcpu_tables(config.expected, topology),
                         smp_queries(default_queries(config.expected)), 10.0)
    assert len(result.tables) == topology.vcpus
    assert check_topology(topology, result.tables) == []


def test_simulated_vmm_giving_every_vcpu_the_same_ids_is_caught(kvm: Kvm,
                                                                 live_facts: ToolFacts) -> None:
    """A VMM that gives every vCPU the BSP's table (simulated: raw KVM with
    vCPU 0's table on all four): the APIC IDs are not distinct."""
    from kvmcpuid_virt.config.topology import vcpu_tables
    from kvmcpuid_virt.probe.kvm import run_kvm_smp

    config = build(kvm.supported_cpuid(), source="/dev/kvm", facts=live_facts)
    topology = Topology.parse("sockets=1,cores=2,threads=2")
    bsp = vcpu_tables(config.expected, topology)[0]
    result = run_kvm_smp([bsp] * 4, smp_queries(default_queries(config.expected)), 10.0)
    problems = check_topology(topology, result.tables)
    assert any(p.startswith("initial APIC ID (1 EBX[31:24]): not distinct") for p in problems)
