"""Per VMM backend (QEMU, libvirt) and per topology: the full configuration
booted on a multi-vCPU guest (probe/smp_image.py), every vCPU's answers
checked against the topology by the CPUID definitions
(analysis.topology.check_topology: APIC IDs distinct and split into
(package, core, thread) as 0xB's shifts say, leaf 1 counts, 0x80000008 ECX,
0x8000001E, all else the same on every vCPU). On raw KVM the suite is the
VMM: config.topology.vcpu_tables lays the topology out per vCPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conformance.plan import Plan
from kvmcpuid_virt.adapters import libvirt as lv
from kvmcpuid_virt.analysis.backend import Backend
from kvmcpuid_virt.analysis.topology import check_topology, smp_queries
from kvmcpuid_virt.config.topology import Topology, vcpu_tables
from kvmcpuid_virt.probe.image import default_queries
from kvmcpuid_virt.probe.kvm import run_kvm_smp
from kvmcpuid_virt.probe.libvirt import LibvirtProbe
from kvmcpuid_virt.probe.qemu import run_qemu_smp
from kvmcpuid_virt.probe.smp_image import SmpResult

TOPOLOGIES = ("sockets=1,cores=2,threads=2", "sockets=2,cores=2,threads=1")
TIMEOUT = 30.0


def boot(vmm: Backend, the_plan: Plan, topology: Topology, qemu: str,
         libvirt_uri: str | None, *, smp: str | None = None) -> SmpResult:
    """The full configuration on `vmm` with `topology` (`smp`: the -smp
    value QEMU gets, default the topology's)."""
    full = the_plan.full
    queries = smp_queries(default_queries(full.expected))
    if vmm == Backend.KVM:
        return run_kvm_smp(vcpu_tables(full.expected, topology), queries, TIMEOUT)
    if vmm == Backend.QEMU:
        return run_qemu_smp(full.qemu_cpu, queries, smp or topology.qemu_smp(),
                            topology.vcpus, TIMEOUT, qemu)
    assert libvirt_uri is not None
    with LibvirtProbe(libvirt_uri, keep_failed_logs=False) as probe:
        return probe.run_smp(full.libvirt_cpu, queries, topology.vcpus,
                             topology.libvirt_topology(), TIMEOUT,
                             features=lv.kvm_features_element(full.config))


@pytest.mark.parametrize("spec", TOPOLOGIES)
@pytest.mark.parametrize("vmm", (Backend.KVM, Backend.QEMU, Backend.LIBVIRT))
def test_topology(request: pytest.FixtureRequest, vmm: Backend, spec: str, the_plan: Plan,
                  qemu_binary: str) -> None:
    uri = request.getfixturevalue("libvirt_uri") if vmm == Backend.LIBVIRT else None
    if vmm == Backend.KVM:
        request.getfixturevalue("kvm")
    topology = Topology.parse(spec)
    result = boot(vmm, the_plan, topology, qemu_binary, uri)
    problems = check_topology(topology, result.tables)
    assert not problems, f"{vmm} {spec}:\n  " + "\n  ".join(problems)


def test_mutant_vmm_booting_another_topology(the_plan: Plan, qemu_binary: str,
                                             tmp_path: Path) -> None:
    """A QEMU wrapper that swaps the -smp value (sockets=2,cores=1,threads=2
    for the configured sockets=1,cores=2,threads=2): the suite's check fails
    naming the fields the guest shows differently."""
    topology = Topology.parse(TOPOLOGIES[0])
    wrapper = tmp_path / "qemu-smp-mutant"
    wrapper.write_text(
        "#!/bin/bash\nargs=(); next=0\n"
        'for a in "$@"; do\n'
        '  if [ $next = 1 ]; then a="4,sockets=2,cores=1,threads=2"; next=0; fi\n'
        '  [ "$a" = "-smp" ] && next=1; args+=("$a")\n'
        "done\n"
        f'exec {qemu_binary} "${{args[@]}}"\n'
    )
    wrapper.chmod(0o755)
    assert check_topology(topology, boot(Backend.QEMU, the_plan, topology, qemu_binary,
                                         None).tables) == [], "the unbroken QEMU fails"
    problems = check_topology(topology, boot(Backend.QEMU, the_plan, topology, str(wrapper),
                                             None).tables)
    assert any(p.endswith("logical processor count (1 EBX[23:16]): the topology needs at "
                          "least 4, guest sees 2") for p in problems), problems
    assert any("topology level 1 (0xB.1)" in p for p in problems), problems
