"""This host's full CPU under libvirt is host-passthrough with
`<cache mode='passthrough'/>` (QEMU's host-cache-info=on): the guest's cache
leaves (4, 0x80000005, 0x80000006, 0x8000001D) must be the host CPU's own, as
the CPUID instruction answers them on this host (conformance/hostcpuid.py),
an independent source; only the documented topology masks (sharing counts,
which follow the guest's vCPUs) are left out.
"""

from __future__ import annotations

import pytest

from conformance.backends import Batch
from conformance.hostcpuid import HostCpuid, pinned
from conformance.plan import Plan
from kvmcpuid_virt.analysis.compare import FIELD_RULES, GUEST_STATE_MASKS
from kvmcpuid_virt.cpuid.table import REGISTERS, CpuidEntry, CpuidTable, EntryFlag

# Leaves QEMU's host-cache-info=on passes on from the host (leaf 2 is
# Intel's descriptor list, and asked only where the guest has it).
CACHE_LEAVES = (0x2, 0x4, 0x8000_0005, 0x8000_0006, 0x8000_001D)


def _host_table(keys: list[tuple[int, int]]) -> CpuidTable:
    with pinned(), HostCpuid() as cpuid:
        return CpuidTable([CpuidEntry(leaf, sub, EntryFlag.SIGNIFICANT_INDEX, *cpuid(leaf, sub))
                           for leaf, sub in keys])


def test_libvirt_host_passthrough_caches_are_the_hosts(the_plan: Plan,
                                                       batch_libvirt: Batch) -> None:
    full = the_plan.full
    if "mode=\"passthrough\"" not in full.libvirt_cpu.split("<feature", 1)[0]:
        pytest.skip("the full configuration's <cpu> does not pass the host's caches on")
    batch_libvirt.require([full.id])
    guest = batch_libvirt.get(full.id).observed
    keys = [(e.function, e.index) for e in guest if e.function in CACHE_LEAVES]
    assert keys, "the guest was asked no cache leaf"
    host = _host_table(keys)
    compared, differ = 0, []
    for leaf, sub in keys:
        for reg in REGISTERS:
            mask = 0xFFFF_FFFF
            for rule in GUEST_STATE_MASKS:
                if rule.applies(leaf, sub, reg):
                    mask &= ~rule.mask
            h, g = host.get(leaf, sub, reg) & mask, guest.get(leaf, sub, reg) & mask
            compared += bin(mask).count("1")
            if h != g:
                differ.append(f"{leaf:#x}.{sub} {reg}: host {h:#010x}, guest {g:#010x}")
    assert compared > 0
    assert not differ, "the guest's cache leaves are not the host's:\n  " + "\n  ".join(differ)
    # Every compared word is one FIELD_RULES names (the rows verify holds).
    named = {(leaf, reg) for f in FIELD_RULES for leaf, reg, _ in f.parts}
    assert all((leaf, reg) in named for leaf, _ in keys for reg in REGISTERS)
