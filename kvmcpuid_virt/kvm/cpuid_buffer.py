"""Reading a CPUID table out of a kvm_cpuid2 buffer, shared by
KVM_GET_SUPPORTED_CPUID and KVM_GET_EMULATED_CPUID (the /dev/kvm fd,
kvm/system.py) and KVM_GET_CPUID2 (a vCPU fd, kvm/vm.py): the nent negotiation
(kvm/sizing.py, which the feature-MSR list shares) and the decoding of the
buffer into CpuidEntry.

Both system.py and vm.py import this module and it imports neither, so the
two never import each other. It stays free of ctypes and typing at run time:
`kvmcpuid dump` reads its table through here.
"""

from __future__ import annotations

from kvmcpuid_virt.cpuid.table import CpuidEntry, CpuidTable, EntryFlag
from kvmcpuid_virt.kvm.abi import KVM_MAX_CPUID_ENTRIES, kvm_cpuid2
from kvmcpuid_virt.kvm.sizing import MAX_COUNT, MAX_TRIES, negotiate

TYPE_CHECKING = False  # the fast path's typing stand-in: docs/ARCHITECTURE.md, Start-up
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Final

__all__ = ["DEFAULT_NENT", "MAX_NENT", "MAX_TRIES", "entries_from_buffer", "read_cpuid"]

# A first guess that fits every kernel seen so far in one call (this host
# needs ~60 entries; KVM's own cap is 256).
DEFAULT_NENT: Final = KVM_MAX_CPUID_ENTRIES
# The bounds of the nent negotiation (kvm/sizing.py): never allocate absurd
# buffers, never loop forever on a kernel that keeps saying E2BIG.
MAX_NENT: Final = MAX_COUNT


def entries_from_buffer(buf: kvm_cpuid2, count: int) -> list[CpuidEntry]:
    """The first `count` kvm_cpuid_entry2 of a kvm_cpuid2 buffer as CpuidEntry."""
    end = kvm_cpuid2.HEADER.size + count * kvm_cpuid2.ENTRY.size
    if count > buf.capacity:
        raise ValueError(f"{count} entries asked of a kvm_cpuid2 with room for {buf.capacity}")
    return [
        CpuidEntry(
            function=function,
            index=index,
            flags=EntryFlag(flags & 7),
            eax=eax,
            ebx=ebx,
            ecx=ecx,
            edx=edx,
        )
        for function, index, flags, eax, ebx, ecx, edx in kvm_cpuid2.ENTRY.iter_unpack(
            memoryview(buf)[kvm_cpuid2.HEADER.size : end]
        )
    ]


def read_cpuid(
    ioctl: Callable[[int, kvm_cpuid2], int], request: int, first_nent: int = DEFAULT_NENT
) -> CpuidTable:
    """The table a kvm_cpuid2-filling `request` returns, nent negotiated by
    kvm/sizing.py (E2BIG: grow; 2010-API ENOMEM: retry at the kernel's nent;
    at most MAX_TRIES calls up to MAX_NENT entries, then CpuidSizeError).

    `ioctl` is the KvmFd.ioctl of the fd the request goes to (so it raises
    KvmIoctlError, and a simulated kernel can stand in through IoctlFn)."""
    buf = negotiate(ioctl, request, kvm_cpuid2, first_nent, max_count=MAX_NENT)
    return CpuidTable(entries_from_buffer(buf, buf.nent))
