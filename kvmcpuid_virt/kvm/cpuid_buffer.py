"""Reading a CPUID table out of a kvm_cpuid2 buffer: the one nent negotiation
shared by KVM_GET_SUPPORTED_CPUID and KVM_GET_EMULATED_CPUID (the /dev/kvm fd,
kvm/system.py) and KVM_GET_CPUID2 (a vCPU fd, kvm/vm.py), and the decoding of
the buffer into CpuidEntry.

Both system.py and vm.py import this module and it imports neither, so the
two never import each other. It stays free of ctypes and typing at run time:
`kvmcpuid dump` reads its table through here.
"""

from __future__ import annotations

import errno

from kvmcpuid_virt.cpuid.table import CpuidEntry, CpuidTable, EntryFlag
from kvmcpuid_virt.errors import CpuidSizeError, KvmIoctlError
from kvmcpuid_virt.kvm.abi import KVM_MAX_CPUID_ENTRIES, Ioctl, kvm_cpuid2

TYPE_CHECKING = False  # the fast path's typing stand-in: docs/ARCHITECTURE.md, Start-up
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Final

__all__ = ["DEFAULT_NENT", "MAX_NENT", "MAX_TRIES", "entries_from_buffer", "read_cpuid"]

# A first guess that fits every kernel seen so far in one call (this host
# needs ~60 entries; KVM's own cap is 256).
DEFAULT_NENT: Final = KVM_MAX_CPUID_ENTRIES
# Hard bounds on the nent negotiation: never allocate absurd buffers, never
# loop forever on a kernel that keeps saying E2BIG.
MAX_NENT: Final = 1 << 16
MAX_TRIES: Final = 24


def _debug(message: str, *args: object) -> None:
    # fast path: logging only where it logs (docs/ARCHITECTURE.md, Start-up)
    import logging

    logging.getLogger(__name__).debug(message, *args)


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
    """The table a kvm_cpuid2-filling `request` returns, nent negotiated.

    `ioctl` is the KvmFd.ioctl of the fd the request goes to (so it raises
    KvmIoctlError, and a simulated kernel can stand in through IoctlFn).

    E2BIG: grow (the kernel does not say how far), doubling up to MAX_NENT.
    ENOMEM with nent lowered (the original 2010 API for a too-large buffer):
    retry at the size the kernel named. Current kernels clamp a large nent and
    succeed. The pre-5.13 spurious E2BIG of KVM_GET_EMULATED_CPUID at exactly
    the right size is just another E2BIG: growing past it succeeds. At most
    MAX_TRIES calls, then CpuidSizeError; any other error is raised as is."""
    name = Ioctl.name(request)
    nent = min(max(int(first_nent), 1), MAX_NENT)
    for attempt in range(1, MAX_TRIES + 1):
        buf = kvm_cpuid2(nent)
        try:
            ioctl(request, buf)
        except KvmIoctlError as exc:
            if exc.errno == errno.E2BIG:
                if nent >= MAX_NENT:
                    break
                _debug("%s: E2BIG at nent=%d (try %d)", exc.request, nent, attempt)
                nent = min(nent * 2, MAX_NENT)
                continue
            if exc.errno == errno.ENOMEM:
                adjusted = int(buf.nent)
                # Only a strictly smaller size is progress: anything else
                # (unchanged nent, 0) would retry the same call forever.
                if 0 < adjusted < nent:
                    _debug("%s: ENOMEM, kernel wants nent=%d", exc.request, adjusted)
                    nent = adjusted
                    continue
            raise
        got = int(buf.nent)
        if got > nent:
            raise CpuidSizeError(name, 0, f"{name} reported nent={got} for a buffer of {nent}")
        return CpuidTable(entries_from_buffer(buf, got))
    raise CpuidSizeError(
        name, errno.E2BIG, f"{name}: gave up after {MAX_TRIES} tries (last nent={nent})"
    )
