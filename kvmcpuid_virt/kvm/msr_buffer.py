"""MSR lists and MSR reads and writes, shared by the /dev/kvm fd (the feature
MSRs: KVM_GET_MSR_FEATURE_INDEX_LIST, then KVM_GET_MSRS, kvm/system.py) and a
vCPU fd (KVM_GET_MSRS, KVM_SET_MSRS, kvm/vm.py).

KVM_GET_MSRS and KVM_SET_MSRS go through arch/x86/kvm/x86.c msr_io(): at most
KVM_MAX_IO_MSRS - 1 entries per call (E2BIG above), processed in order, and
the return value is how many were done: the first refused MSR stops the call.
So a longer request is split into calls of that size, and the answer is the
count done, never an exception for a refused MSR.

Imports neither system.py nor vm.py (like cpuid_buffer.py), and neither ctypes
nor typing at run time.
"""

from __future__ import annotations

from kvmcpuid_virt.errors import KvmError
from kvmcpuid_virt.kvm.abi import KVM_MAX_IO_MSRS, Ioctl, kvm_msr_list, kvm_msrs
from kvmcpuid_virt.kvm.sizing import negotiate

TYPE_CHECKING = False  # the fast path's typing stand-in: docs/ARCHITECTURE.md, Start-up
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Final

__all__ = ["CHUNK", "DEFAULT_NMSRS", "MAX_NMSRS", "msr_io", "read_msr_list"]

# KVM lists 4 feature MSRs on this AMD host and about 30 on an Intel host
# with nested VMX: one call with this first guess fits every kernel seen.
DEFAULT_NMSRS: Final = 64
# The negotiation's bound for an MSR list (x86.c has a few hundred MSRs in all).
MAX_NMSRS: Final = 1 << 12
# Entries per KVM_GET_MSRS / KVM_SET_MSRS call (msr_io: nmsrs < MAX_IO_MSRS).
CHUNK: Final = KVM_MAX_IO_MSRS - 1


def read_msr_list(
    ioctl: Callable[[int, kvm_msr_list], int], request: int, first: int = DEFAULT_NMSRS
) -> list[int]:
    """The indices a kvm_msr_list-filling `request` returns, nmsrs negotiated
    (kvm/sizing.py: E2BIG writes the count needed back; bounded)."""
    buf = negotiate(ioctl, request, kvm_msr_list, first, max_count=MAX_NMSRS)
    return buf.indices(buf.nmsrs)


def msr_io(
    ioctl: Callable[[int, kvm_msrs], int], request: int, entries: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """KVM_GET_MSRS or KVM_SET_MSRS of `entries` ((index, data) pairs; data is
    ignored by a read), in calls of at most CHUNK entries. Returns the entries
    the kernel did, in order, as (index, data) after the call: a prefix of
    `entries`, shorter when the kernel refused the MSR that follows it."""
    done: list[tuple[int, int]] = []
    for start in range(0, len(entries), CHUNK):
        part = list(entries[start : start + CHUNK])
        buf = kvm_msrs(part)
        count = ioctl(request, buf)
        if not 0 <= count <= len(part):
            raise KvmError(f"{Ioctl.name(request)} did {count} of {len(part)} MSRs")
        done += buf.entries(count)
        if count < len(part):
            break
    return done
