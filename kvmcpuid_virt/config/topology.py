"""A guest CPU topology (sockets, cores per socket, threads per core), as
QEMU's `-smp` and libvirt's `<vcpu>` + `<cpu><topology>` take it. Kept
beside CpuConfig, not in it: the CPUID a topology shows (leaf 1 EBX counts,
0xB levels, 0x80000008 ECX, 0x8000001E) is checked by analysis.topology on
a guest with that many vCPUs.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Final

from lxml import etree

from kvmcpuid_virt.cpuid.table import CpuidEntry, CpuidTable, EntryFlag
from kvmcpuid_virt.errors import InputError

__all__ = ["MAX_VCPUS", "Topology", "apic_id", "vcpu_tables"]

# The multi-vCPU probe guest reports at most this many vCPUs (probe/smp_image.py).
MAX_VCPUS: Final = 64
_FORM: Final = re.compile(r"sockets=(\d{1,2}),cores=(\d{1,2}),threads=(\d{1,2})")


@dataclasses.dataclass(frozen=True)
class Topology:
    sockets: int
    cores: int  # per socket
    threads: int  # per core

    def __post_init__(self) -> None:
        if min(self.sockets, self.cores, self.threads) < 1 or self.vcpus > MAX_VCPUS:
            raise InputError(f"topology {self.spec()}: each count at least 1, at most "
                             f"{MAX_VCPUS} vCPUs in all")  # fmt: skip

    @classmethod
    def parse(cls, text: str) -> Topology:
        """From `sockets=S,cores=C,threads=T` (QEMU's -smp spelling)."""
        m = _FORM.fullmatch(text.strip())
        if m is None:
            raise InputError(f"topology {text!r}: expected sockets=S,cores=C,threads=T")
        return cls(*(int(g) for g in m.groups()))

    @property
    def vcpus(self) -> int:
        return self.sockets * self.cores * self.threads

    @property
    def per_package(self) -> int:
        """Logical processors in one package (socket)."""
        return self.cores * self.threads

    def spec(self) -> str:
        return f"sockets={self.sockets},cores={self.cores},threads={self.threads}"

    def qemu_smp(self) -> str:
        """The value of QEMU's -smp."""
        return f"{self.vcpus},{self.spec()}"

    def libvirt_topology(self) -> etree._Element:
        """`<topology sockets= dies='1' cores= threads=/>` for a domain's <cpu>."""
        return etree.Element("topology", sockets=str(self.sockets), dies="1",
                             cores=str(self.cores), threads=str(self.threads))  # fmt: skip


def _bits(n: int) -> int:
    return (n - 1).bit_length()  # ceil(log2(n)): bits to number n things


def apic_id(topology: Topology, vcpu: int) -> int:
    """vCPU `vcpu`'s APIC ID when IDs are laid out as QEMU does (threads
    innermost): package << core shift | core << thread shift | thread."""
    thread = vcpu % topology.threads
    core = vcpu // topology.threads % topology.cores
    package = vcpu // topology.per_package
    smt = _bits(topology.threads)
    return package << (smt + _bits(topology.cores)) | core << smt | thread


def vcpu_tables(table: CpuidTable, topology: Topology) -> list[CpuidTable]:
    """What a VMM gives each vCPU of `topology` on top of `table` (raw KVM,
    where this tool is the VMM), by the CPUID definitions: leaf 1 EBX APIC
    ID and count, HTT; 0xB levels (SMT, core) with the x2APIC ID; leaf 4
    EAX[31:26]; 0x80000008 ECX core count and APIC ID size; 0x8000001E
    (where the table has it) extended APIC ID, core ID, threads per core,
    node ID. analysis.topology checks what the guest then reads."""
    smt, core_shift = _bits(topology.threads), _bits(topology.threads) + _bits(topology.cores)
    per = topology.per_package
    out = []
    for i in range(topology.vcpus):
        apic = apic_id(topology, i)
        entries = []
        for e in table:
            if e.function == 0xB:
                continue
            if e.function == 1:
                ebx = e.ebx & 0x0000_FFFF | apic << 24 | (per & 0xFF) << 16
                e = e.replace(ebx=ebx, edx=e.edx | 1 << 28 if per > 1 else e.edx)
            elif e.function == 4 and e.eax & 0x1F:
                e = e.replace(eax=e.eax & 0x03FF_FFFF | (topology.cores - 1) << 26)
            elif e.function == 0x8000_0008:
                e = e.replace(ecx=e.ecx & ~0xF0FF | core_shift << 12 | (per - 1))
            elif e.function == 0x8000_001E:
                core = i // topology.threads % topology.cores
                e = e.replace(eax=apic, ebx=e.ebx & ~0xFFFF | (topology.threads - 1) << 8 | core,
                              ecx=e.ecx & ~0xFF | i // per)
            entries.append(e)
        if table.lookup(0xB, 0) is not None:
            levels = ((smt, topology.threads, 1), (core_shift, per, 2), (0, 0, 0))
            entries += [CpuidEntry(0xB, n, EntryFlag.SIGNIFICANT_INDEX, shift, count,
                                   kind << 8 | n, apic)
                        for n, (shift, count, kind) in enumerate(levels)]  # fmt: skip
        out.append(CpuidTable(entries))
    return out
