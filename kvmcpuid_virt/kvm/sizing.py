"""The one size negotiation for ioctls that fill a caller-sized array: the
CPUID tables (kvm_cpuid2: KVM_GET_SUPPORTED_CPUID, KVM_GET_EMULATED_CPUID,
KVM_GET_CPUID2) and the feature-MSR list (kvm_msr_list:
KVM_GET_MSR_FEATURE_INDEX_LIST).

The kernels differ in what they say when the array is too small:
- KVM_GET_SUPPORTED_CPUID and KVM_GET_CPUID2 answer E2BIG and leave nent
  alone: grow and retry, the kernel does not say how far;
- KVM_GET_MSR_FEATURE_INDEX_LIST answers E2BIG and writes the count it needs
  into nmsrs: retry at that count;
- the 2010 API (Documentation/kvm/api.txt) answers a too-large nent with
  ENOMEM and nent lowered to the right size: retry at that size.

Imports neither system.py nor vm.py, and stays free of ctypes and typing at
run time: `kvmcpuid dump` reads its table through here.
"""

from __future__ import annotations

import errno

from kvmcpuid_virt.errors import CpuidSizeError, KvmIoctlError
from kvmcpuid_virt.kvm.abi import Ioctl

TYPE_CHECKING = False  # the fast path's typing stand-in: docs/ARCHITECTURE.md, Start-up
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Final, Protocol, TypeVar

    class SizedBuffer(Protocol):
        """A kernel array buffer: `nitems` is the count field (nent, nmsrs)
        the caller sets and the kernel may rewrite; `capacity` its room."""

        @property
        def nitems(self) -> int: ...

        @property
        def capacity(self) -> int: ...

    B = TypeVar("B", bound=SizedBuffer)

__all__ = ["MAX_COUNT", "MAX_TRIES", "negotiate"]

# Hard bounds: never allocate absurd buffers, never loop forever on a kernel
# that keeps saying E2BIG.
MAX_COUNT: Final = 1 << 16
MAX_TRIES: Final = 24


def _debug(message: str, *args: object) -> None:
    # fast path: logging only where it logs (docs/ARCHITECTURE.md, Start-up)
    import logging

    logging.getLogger(__name__).debug(message, *args)


def negotiate(
    ioctl: Callable[[int, B], int],
    request: int,
    new: Callable[[int], B],
    first: int,
    *,
    max_count: int = MAX_COUNT,
) -> B:
    """The buffer `request` filled, its size negotiated: `new(n)` makes a
    buffer with room for n items (and nitems = n), `ioctl` is the KvmFd.ioctl
    of the fd the request goes to (so it raises KvmIoctlError, and a simulated
    kernel can stand in through IoctlFn).

    E2BIG: retry at the count the kernel wrote back if it is larger (the MSR
    list), else at double the size (the CPUID tables), up to `max_count`.
    ENOMEM with the count lowered: retry at that count (2010 API). The
    pre-5.13 spurious E2BIG of KVM_GET_EMULATED_CPUID at exactly the right
    size is just another E2BIG: growing past it succeeds. At most MAX_TRIES
    calls, then CpuidSizeError (the negotiation's error, whatever the array);
    a count back larger than the buffer is CpuidSizeError too; any other
    error is raised as is."""
    name = Ioctl.name(request)
    n = min(max(int(first), 1), max_count)
    for attempt in range(1, MAX_TRIES + 1):
        buf = new(n)
        try:
            ioctl(request, buf)
        except KvmIoctlError as exc:
            if exc.errno == errno.E2BIG:
                if n >= max_count:
                    break
                wanted = int(buf.nitems)
                _debug("%s: E2BIG at %d (try %d, kernel says %d)", exc.request, n, attempt, wanted)
                n = min(wanted if wanted > n else n * 2, max_count)
                continue
            if exc.errno == errno.ENOMEM:
                adjusted = int(buf.nitems)
                # Only a strictly smaller size is progress: anything else
                # (unchanged count, 0) would retry the same call forever.
                if 0 < adjusted < n:
                    _debug("%s: ENOMEM, kernel wants %d", exc.request, adjusted)
                    n = adjusted
                    continue
            raise
        got = int(buf.nitems)
        if got > buf.capacity:
            raise CpuidSizeError(name, 0, f"{name} reported {got} items for a buffer of {n}")
        return buf
    raise CpuidSizeError(
        name, errno.E2BIG, f"{name}: gave up after {MAX_TRIES} tries (last size {n})"
    )
