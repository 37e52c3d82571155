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

from kvmcpuid_virt.errors import InputError

__all__ = ["MAX_VCPUS", "Topology"]

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
