"""Dynamic XSAVE features: state components (today only AMX tile data,
XSAVE component 18) that a process must ask the kernel for with arch_prctl
before it may give them to a guest (Linux 5.16+).

Until the process has asked, KVM_GET_SUPPORTED_CPUID leaves them (and tile
config, component 17) out of leaf 0xD, and KVM_SET_CPUID2 refuses a table
that has them. A VMM asks first (QEMU: kvm_request_xsave_components), so this
package asks too, and only on a host whose KVM offers AMX: the syscall needs
ctypes, which `kvmcpuid dump` does not import otherwise.

The constants are Linux's (arch/x86/include/uapi/asm/prctl.h, the
XFEATURE_XTILE_DATA of arch/x86/include/asm/fpu/types.h) and the x86-64
syscall number of arch_prctl; the AMX-TILE bit is CPUID.(EAX=7,ECX=0):EDX[24]
in the Intel SDM.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from kvmcpuid_virt.errors import KvmError

TYPE_CHECKING = False  # the fast path's typing stand-in: docs/ARCHITECTURE.md, Start-up
if TYPE_CHECKING:
    from typing import Final

    from kvmcpuid_virt.cpuid.table import CpuidTable

__all__ = [
    "DYNAMIC_XFEATURES",
    "XFEATURE_XTILE_DATA",
    "PrctlFn",
    "guest_permitted",
    "request_for_table",
    "wants_dynamic_xfeatures",
    "xcr0_of",
]

SYS_ARCH_PRCTL: Final = 158  # x86-64
ARCH_GET_XCOMP_SUPP: Final = 0x1021
ARCH_GET_XCOMP_GUEST_PERM: Final = 0x1024
ARCH_REQ_XCOMP_GUEST_PERM: Final = 0x1025
XFEATURE_XTILE_CFG: Final = 17
XFEATURE_XTILE_DATA: Final = 18
# XFEATURE_MASK_USER_DYNAMIC: the components a process must request.
DYNAMIC_XFEATURES: Final = 1 << XFEATURE_XTILE_DATA
_AMX_TILE: Final = 1 << 24  # CPUID.7.0:EDX

# (code, arg) -> (return value, the u64 the call wrote when arg was a pointer);
# the real arch_prctl by default, a simulated kernel in the tests.
PrctlFn = Callable[[int, int, bool], tuple[int, int]]


def _real_prctl(code: int, arg: int, out: bool) -> tuple[int, int]:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    value = ctypes.c_uint64(0)
    param = ctypes.byref(value) if out else ctypes.c_ulong(arg)
    rc = libc.syscall(ctypes.c_long(SYS_ARCH_PRCTL), ctypes.c_long(code), param)
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(rc), int(value.value)


_prctl: PrctlFn = _real_prctl


def xcr0_of(table: CpuidTable) -> int:
    """The XCR0 components leaf 0xD.0 lists (EDX:EAX)."""
    return table.get(0xD, 0, "eax") | table.get(0xD, 0, "edx") << 32


def wants_dynamic_xfeatures(table: CpuidTable) -> bool:
    """KVM offers AMX (leaf 7) but left tile data out of leaf 0xD: this
    process has not asked for it yet."""
    return bool(table.get(7, 0, "edx") & _AMX_TILE) and not xcr0_of(table) & DYNAMIC_XFEATURES


def guest_permitted() -> int | None:
    """The XSAVE components this process may give guests (None: the kernel
    predates the guest permission, i.e. has no dynamic features)."""
    try:
        return _prctl(ARCH_GET_XCOMP_GUEST_PERM, 0, True)[1]
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return None
        raise KvmError(f"arch_prctl(ARCH_GET_XCOMP_GUEST_PERM) failed: {exc.strerror}") from None


def request_for_table(table: CpuidTable) -> bool:
    """Ask for every dynamic component that `table` gives the guest (or that
    KVM offers behind AMX-TILE, for a table from KVM_GET_SUPPORTED_CPUID).
    True when something new was granted (a supported table then needs
    reading again)."""
    wanted = xcr0_of(table) & DYNAMIC_XFEATURES
    if wants_dynamic_xfeatures(table):
        wanted |= DYNAMIC_XFEATURES
    if not wanted:
        return False
    permitted = guest_permitted()
    if permitted is None or not wanted & ~permitted:
        return False
    try:
        _, supported = _prctl(ARCH_GET_XCOMP_SUPP, 0, True)
    except OSError as exc:
        raise KvmError(f"arch_prctl(ARCH_GET_XCOMP_SUPP) failed: {exc.strerror}") from None
    granted = False
    for bit in range(64):
        mask = 1 << bit
        if wanted & mask & supported & ~permitted:
            try:
                _prctl(ARCH_REQ_XCOMP_GUEST_PERM, bit, False)
            except OSError as exc:
                raise KvmError(
                    f"arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, {bit}) failed: {exc.strerror} "
                    "(the guest's XSAVE component cannot be enabled for this process)"
                ) from None
            granted = True
    return granted
