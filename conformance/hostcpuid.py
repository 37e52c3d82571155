"""Execute the CPUID instruction on this host from Python, to compare with
what KVM_GET_SUPPORTED_CPUID reports.

A 27-byte x86-64 function in an anonymous executable mapping, called through
ctypes (System V ABI: leaf in edi, subleaf in esi, result pointer in rdx):

    53           push rbx            ; rbx is callee-saved, cpuid clobbers it
    49 89 d0     mov  r8, rdx        ; cpuid clobbers rdx too
    89 f8        mov  eax, edi
    89 f1        mov  ecx, esi
    0f a2        cpuid
    41 89 00     mov  [r8], eax
    41 89 58 04  mov  [r8+4], ebx
    41 89 48 08  mov  [r8+8], ecx
    41 89 50 0c  mov  [r8+12], edx
    5b           pop  rbx
    c3           ret

Answers depend on the CPU the thread runs on (APIC IDs, topology), exactly
like KVM_GET_SUPPORTED_CPUID: callers pin the thread (`pinned`, from
kvmcpuid_virt.host).
"""

from __future__ import annotations

import ctypes
import mmap
import platform
from typing import Final

from kvmcpuid_virt.host import pinned  # re-exported: the suite pins with it

__all__ = ["CODE", "HostCpuid", "pinned"]

CODE: Final = bytes.fromhex(
    "53" "4989d0" "89f8" "89f1" "0fa2" "418900" "41895804" "41894808" "4189500c" "5b" "c3"
)

_Regs = ctypes.c_uint32 * 4
_Fn = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(_Regs))


class HostCpuid:
    """cpuid(leaf, subleaf) -> (eax, ebx, ecx, edx) on the calling CPU.
    A context manager; close() unmaps the code page."""

    def __init__(self) -> None:
        if platform.machine() not in ("x86_64", "AMD64"):
            raise OSError(f"CPUID needs an x86-64 host, not {platform.machine()}")
        # W^X would be nicer (write, then mprotect), but Python's mmap has no
        # mprotect; the page is private, anonymous and lives for one session.
        self._page: mmap.mmap | None = mmap.mmap(
            -1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC
        )
        self._page.write(CODE)
        self._anchor = ctypes.c_char.from_buffer(self._page)
        self._fn = _Fn(ctypes.addressof(self._anchor))

    def __call__(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        if self._page is None:
            raise ValueError("HostCpuid is closed")
        out = _Regs()
        self._fn(leaf & 0xFFFF_FFFF, subleaf & 0xFFFF_FFFF, ctypes.byref(out))
        return out[0], out[1], out[2], out[3]

    def close(self) -> None:
        page, self._page = self._page, None
        if page is not None:
            del self._fn, self._anchor  # the buffer export must end before close
            page.close()

    def __enter__(self) -> HostCpuid:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
