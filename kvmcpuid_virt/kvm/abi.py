"""The Linux KVM ABI used here: ioctl numbers, constants and the CPUID and MSR
buffers, declared once. Values come from include/uapi/linux/kvm.h and
arch/x86/include/uapi/asm/kvm.h; tests/test_kvm_abi.py checks every number
and size against the kernel headers installed on the machine.

The VM and vCPU structs (regs, sregs, kvm_run, ...) are ctypes layouts in
kvm/structs.py; this module stays free of ctypes (~2 ms to import) because
the CPUID path, which `kvmcpuid dump` runs, needs nothing else. The MSR
buffers (kvm_msr_list, kvm_msrs) are struct-packed here for the same reason:
the feature MSRs are read on the /dev/kvm fd, beside the CPUID table.
"""

from __future__ import annotations

import struct

TYPE_CHECKING = False  # the fast path's typing stand-in: docs/ARCHITECTURE.md, Start-up
if TYPE_CHECKING:
    from typing import Final

__all__ = [
    "EXIT_REASONS",
    "KVMIO",
    "KVM_API_VERSION",
    "KVM_EXIT_IO_IN",
    "KVM_EXIT_IO_OUT",
    "KVM_MAX_CPUID_ENTRIES",
    "KVM_MAX_IO_MSRS",
    "KVM_MEM_READONLY",
    "KVM_SIGSET_BYTES",
    "Cap",
    "ExitReason",
    "Ioctl",
    "StructSize",
    "kvm_cpuid2",
    "kvm_msr_list",
    "kvm_msrs",
]

KVMIO: Final = 0xAE
# KVM_GET_API_VERSION has answered 12 since Linux 2.6.22; anything else is not
# the API this code speaks.
KVM_API_VERSION: Final = 12
# The kernel's own limit (arch/x86/include/asm/kvm_host.h); current kernels
# clamp a larger nent down to it.
KVM_MAX_CPUID_ENTRIES: Final = 256
# arch/x86/kvm/x86.c: msr_io() refuses a kvm_msrs with nmsrs >= MAX_IO_MSRS
# (E2BIG), on the /dev/kvm fd and on a vCPU alike.
KVM_MAX_IO_MSRS: Final = 256
_U32: Final = 0xFFFF_FFFF
_U64: Final = 0xFFFF_FFFF_FFFF_FFFF

_IOC_NONE: Final = 0
_IOC_WRITE: Final = 1
_IOC_READ: Final = 2


def _ioc(direction: int, nr: int, size: int) -> int:
    # asm-generic/ioctl.h: dir:2 | size:14 | type:8 | nr:8
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


class kvm_cpuid2(bytearray):
    """struct kvm_cpuid2 { __u32 nent; __u32 padding; struct kvm_cpuid_entry2 entries[]; };
    struct kvm_cpuid_entry2 {
        __u32 function; __u32 index; __u32 flags;
        __u32 eax; __u32 ebx; __u32 ecx; __u32 edx;
        __u32 padding[3];
    };

    A zeroed buffer in that layout with room for `capacity` entries and nent
    set to it; fcntl.ioctl reads and writes it in place."""

    __slots__ = ()
    HEADER: Final = struct.Struct("=II")
    # function, index, flags, eax, ebx, ecx, edx, then padding[3]
    ENTRY: Final = struct.Struct("=7I12x")

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("a kvm_cpuid2 cannot hold a negative number of entries")
        super().__init__(self.HEADER.size + capacity * self.ENTRY.size)
        self.nent = capacity

    @property
    def capacity(self) -> int:
        return (len(self) - self.HEADER.size) // self.ENTRY.size

    @property
    def nent(self) -> int:
        value: int = self.HEADER.unpack_from(self)[0]
        return value

    @nent.setter
    def nent(self, value: int) -> None:
        self.HEADER.pack_into(self, 0, value, 0)

    # The name the size negotiation (kvm/sizing.py) reads and writes.
    nitems = nent

    def _offset(self, i: int) -> int:
        if not 0 <= i < self.capacity:
            raise IndexError(f"entry {i} of a kvm_cpuid2 with room for {self.capacity}")
        return self.HEADER.size + i * self.ENTRY.size

    def entry(self, i: int) -> tuple[int, int, int, int, int, int, int]:
        """(function, index, flags, eax, ebx, ecx, edx) of entry i."""
        fields: tuple[int, int, int, int, int, int, int] = self.ENTRY.unpack_from(
            self, self._offset(i)
        )
        return fields

    def set_entry(self, i: int, function: int, index: int, flags: int,
                  eax: int, ebx: int, ecx: int, edx: int) -> None:
        self.ENTRY.pack_into(self, self._offset(i), function, index, flags, eax, ebx, ecx, edx)


def _check_u32(what: str, value: int) -> int:
    if not 0 <= value <= _U32:
        raise ValueError(f"{what} {value:#x} is not a 32-bit unsigned value")
    return value


class kvm_msr_list(bytearray):
    """struct kvm_msr_list { __u32 nmsrs; __u32 indices[]; };

    A zeroed buffer with room for `capacity` indices and nmsrs set to it, for
    KVM_GET_MSR_FEATURE_INDEX_LIST (and KVM_GET_MSR_INDEX_LIST). On E2BIG the
    kernel writes the count it needs into nmsrs."""

    __slots__ = ()
    HEADER: Final = struct.Struct("=I")
    INDEX: Final = struct.Struct("=I")

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("a kvm_msr_list cannot hold a negative number of indices")
        super().__init__(self.HEADER.size + capacity * self.INDEX.size)
        self.nmsrs = capacity

    @property
    def capacity(self) -> int:
        return (len(self) - self.HEADER.size) // self.INDEX.size

    @property
    def nmsrs(self) -> int:
        value: int = self.HEADER.unpack_from(self)[0]
        return value

    @nmsrs.setter
    def nmsrs(self, value: int) -> None:
        self.HEADER.pack_into(self, 0, _check_u32("nmsrs", value))

    nitems = nmsrs

    def indices(self, count: int) -> list[int]:
        """The first `count` indices."""
        if not 0 <= count <= self.capacity:
            raise ValueError(f"{count} indices asked of a kvm_msr_list with room for "
                             f"{self.capacity}")
        end = self.HEADER.size + count * self.INDEX.size
        return [i for (i,) in self.INDEX.iter_unpack(memoryview(self)[self.HEADER.size : end])]

    def set_index(self, i: int, index: int) -> None:
        if not 0 <= i < self.capacity:
            raise IndexError(f"index {i} of a kvm_msr_list with room for {self.capacity}")
        self.INDEX.pack_into(self, self.HEADER.size + i * self.INDEX.size,
                             _check_u32("MSR index", index))


class kvm_msrs(bytearray):
    """struct kvm_msrs { __u32 nmsrs; __u32 pad; struct kvm_msr_entry entries[]; };
    struct kvm_msr_entry { __u32 index; __u32 reserved; __u64 data; };

    The buffer of KVM_GET_MSRS and KVM_SET_MSRS: `entries` (index, data)
    pairs in order, nmsrs set to their number, padding and reserved zero.
    Every index must fit 32 bits and every value 64 bits (ValueError)."""

    __slots__ = ()
    HEADER: Final = struct.Struct("=II")
    # index, reserved, data
    ENTRY: Final = struct.Struct("=I4xQ")

    def __init__(self, entries: list[tuple[int, int]]) -> None:
        super().__init__(self.HEADER.size + len(entries) * self.ENTRY.size)
        self.HEADER.pack_into(self, 0, len(entries), 0)
        for i, (index, data) in enumerate(entries):
            _check_u32("MSR index", index)
            if not 0 <= data <= _U64:
                raise ValueError(f"MSR {index:#x} value {data:#x} is not a 64-bit unsigned value")
            self.ENTRY.pack_into(self, self.HEADER.size + i * self.ENTRY.size, index, data)

    @property
    def capacity(self) -> int:
        return (len(self) - self.HEADER.size) // self.ENTRY.size

    @property
    def nmsrs(self) -> int:
        value: int = self.HEADER.unpack_from(self)[0]
        return value

    def entries(self, count: int | None = None) -> list[tuple[int, int]]:
        """The first `count` (default: all) entries as (index, data)."""
        n = self.capacity if count is None else count
        if not 0 <= n <= self.capacity:
            raise ValueError(f"{n} entries asked of a kvm_msrs with room for {self.capacity}")
        end = self.HEADER.size + n * self.ENTRY.size
        return list(self.ENTRY.iter_unpack(memoryview(self)[self.HEADER.size : end]))


class StructSize:
    """sizeof() of the structs the ioctl numbers encode (the ctypes layouts
    are in kvm/structs.py; tests/test_kvm_abi.py checks both against the
    installed headers)."""

    KVM_CPUID2: Final = kvm_cpuid2.HEADER.size
    KVM_USERSPACE_MEMORY_REGION: Final = 32
    KVM_COALESCED_MMIO_ZONE: Final = 16
    KVM_REGS: Final = 144
    KVM_SREGS: Final = 312
    KVM_MSR_LIST: Final = kvm_msr_list.HEADER.size
    KVM_MSRS: Final = kvm_msrs.HEADER.size


class Ioctl:
    """The ioctl request numbers, each with the name errors report."""

    GET_API_VERSION: Final = _ioc(_IOC_NONE, 0x00, 0)
    CREATE_VM: Final = _ioc(_IOC_NONE, 0x01, 0)
    CHECK_EXTENSION: Final = _ioc(_IOC_NONE, 0x03, 0)
    GET_VCPU_MMAP_SIZE: Final = _ioc(_IOC_NONE, 0x04, 0)
    GET_SUPPORTED_CPUID: Final = _ioc(_IOC_READ | _IOC_WRITE, 0x05, StructSize.KVM_CPUID2)
    GET_EMULATED_CPUID: Final = _ioc(_IOC_READ | _IOC_WRITE, 0x09, StructSize.KVM_CPUID2)
    GET_MSR_FEATURE_INDEX_LIST: Final = _ioc(
        _IOC_READ | _IOC_WRITE, 0x0A, StructSize.KVM_MSR_LIST
    )
    CREATE_VCPU: Final = _ioc(_IOC_NONE, 0x41, 0)
    SET_USER_MEMORY_REGION: Final = _ioc(
        _IOC_WRITE, 0x46, StructSize.KVM_USERSPACE_MEMORY_REGION
    )
    SET_TSS_ADDR: Final = _ioc(_IOC_NONE, 0x47, 0)
    SET_IDENTITY_MAP_ADDR: Final = _ioc(_IOC_WRITE, 0x48, 8)
    CREATE_IRQCHIP: Final = _ioc(_IOC_NONE, 0x60, 0)
    RUN: Final = _ioc(_IOC_NONE, 0x80, 0)
    GET_REGS: Final = _ioc(_IOC_READ, 0x81, StructSize.KVM_REGS)
    SET_REGS: Final = _ioc(_IOC_WRITE, 0x82, StructSize.KVM_REGS)
    GET_SREGS: Final = _ioc(_IOC_READ, 0x83, StructSize.KVM_SREGS)
    SET_SREGS: Final = _ioc(_IOC_WRITE, 0x84, StructSize.KVM_SREGS)
    # Both on a vCPU fd; KVM_GET_MSRS also on /dev/kvm, for the feature MSRs.
    GET_MSRS: Final = _ioc(_IOC_READ | _IOC_WRITE, 0x88, StructSize.KVM_MSRS)
    SET_MSRS: Final = _ioc(_IOC_WRITE, 0x89, StructSize.KVM_MSRS)
    SET_CPUID2: Final = _ioc(_IOC_WRITE, 0x90, StructSize.KVM_CPUID2)
    GET_CPUID2: Final = _ioc(_IOC_READ | _IOC_WRITE, 0x91, StructSize.KVM_CPUID2)
    REGISTER_COALESCED_MMIO: Final = _ioc(
        _IOC_WRITE, 0x67, StructSize.KVM_COALESCED_MMIO_ZONE
    )
    UNREGISTER_COALESCED_MMIO: Final = _ioc(
        _IOC_WRITE, 0x68, StructSize.KVM_COALESCED_MMIO_ZONE
    )
    # struct kvm_signal_mask { __u32 len; __u8 sigset[]; }: 4 bytes of header.
    SET_SIGNAL_MASK: Final = _ioc(_IOC_WRITE, 0x8B, 4)

    @classmethod
    def name(cls, request: int) -> str:
        for key, value in vars(cls).items():
            if key.isupper() and value == request:
                return "KVM_" + key
        return f"ioctl {request:#x}"


class Cap:
    """KVM_CAP_* numbers passed to KVM_CHECK_EXTENSION."""

    IRQCHIP: Final = 0
    EXT_CPUID: Final = 7
    SET_TSS_ADDR: Final = 4
    MAX_VCPUS: Final = 66
    EXT_EMUL_CPUID: Final = 95
    COALESCED_MMIO: Final = 15
    READONLY_MEM: Final = 81
    COALESCED_PIO: Final = 162
    IMMEDIATE_EXIT: Final = 136
    GET_MSR_FEATURES: Final = 153


class ExitReason:
    """kvm_run.exit_reason values this package handles."""

    UNKNOWN: Final = 0
    EXCEPTION: Final = 1
    IO: Final = 2
    HLT: Final = 5
    MMIO: Final = 6
    SHUTDOWN: Final = 8
    FAIL_ENTRY: Final = 9
    INTR: Final = 10
    INTERNAL_ERROR: Final = 17
    SYSTEM_EVENT: Final = 24


EXIT_REASONS: Final = {
    value: key for key, value in vars(ExitReason).items() if key.isupper()
}

KVM_EXIT_IO_OUT: Final = 1
KVM_EXIT_IO_IN: Final = 0
# kvm_userspace_memory_region.flags: guest writes become KVM_EXIT_MMIO.
KVM_MEM_READONLY: Final = 1 << 1
# The kernel's sigset_t for KVM_SET_SIGNAL_MASK on x86-64: 64 signals, 8 bytes.
KVM_SIGSET_BYTES: Final = 8
