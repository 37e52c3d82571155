"""The Linux KVM ABI used here: ioctl numbers, constants and ctypes structs,
declared once. Values come from include/uapi/linux/kvm.h and
arch/x86/include/uapi/asm/kvm.h; each struct's C declaration is in its
docstring so a reader can check the layout against the header.
"""

from __future__ import annotations

import ctypes
from functools import cache

# typing costs ~2.5 ms to import and `kvmcpuid dump` must start fast (see
# benchmarks/bench_dump.py); mypy treats this name as always true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

__all__ = [
    "EXIT_REASONS",
    "KVMIO",
    "KVM_API_VERSION",
    "KVM_EXIT_IO_IN",
    "KVM_EXIT_IO_OUT",
    "KVM_MAX_CPUID_ENTRIES",
    "KVM_MEM_READONLY",
    "KVM_SIGSET_BYTES",
    "Cap",
    "ExitReason",
    "Ioctl",
    "kvm_coalesced_mmio",
    "kvm_coalesced_mmio_zone",
    "kvm_cpuid2",
    "kvm_cpuid_entry2",
    "kvm_dtable",
    "kvm_regs",
    "kvm_run",
    "kvm_run_io",
    "kvm_segment",
    "kvm_sregs",
    "kvm_userspace_memory_region",
    "make_kvm_cpuid2",
]

KVMIO: Final = 0xAE
# KVM_GET_API_VERSION has answered 12 since Linux 2.6.22; anything else is not
# the API this code speaks.
KVM_API_VERSION: Final = 12
# The kernel's own limit (arch/x86/include/asm/kvm_host.h); current kernels
# clamp a larger nent down to it.
KVM_MAX_CPUID_ENTRIES: Final = 256

_IOC_NONE: Final = 0
_IOC_WRITE: Final = 1
_IOC_READ: Final = 2


def _ioc(direction: int, nr: int, size: int) -> int:
    # asm-generic/ioctl.h: dir:2 | size:14 | type:8 | nr:8
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


class kvm_cpuid_entry2(ctypes.Structure):
    """struct kvm_cpuid_entry2 {
        __u32 function; __u32 index; __u32 flags;
        __u32 eax; __u32 ebx; __u32 ecx; __u32 edx;
        __u32 padding[3];
    };"""

    _fields_ = [
        ("function", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("eax", ctypes.c_uint32),
        ("ebx", ctypes.c_uint32),
        ("ecx", ctypes.c_uint32),
        ("edx", ctypes.c_uint32),
        ("padding", ctypes.c_uint32 * 3),
    ]


class kvm_cpuid2(ctypes.Structure):
    """struct kvm_cpuid2 { __u32 nent; __u32 padding; struct kvm_cpuid_entry2 entries[]; };

    The header only; make_kvm_cpuid2(n) builds the type with room for n entries.
    """

    _fields_ = [("nent", ctypes.c_uint32), ("padding", ctypes.c_uint32)]


@cache
def _kvm_cpuid2_type(n: int) -> type[ctypes.Structure]:
    return type(
        f"kvm_cpuid2_{n}",
        (ctypes.Structure,),
        {
            "_fields_": [
                ("nent", ctypes.c_uint32),
                ("padding", ctypes.c_uint32),
                ("entries", kvm_cpuid_entry2 * n),
            ]
        },
    )


def make_kvm_cpuid2(n: int) -> ctypes.Structure:
    """A zeroed kvm_cpuid2 with room for n entries and nent = n."""
    buf = _kvm_cpuid2_type(n)()
    buf.nent = n
    return buf


class kvm_userspace_memory_region(ctypes.Structure):
    """struct kvm_userspace_memory_region {
        __u32 slot; __u32 flags; __u64 guest_phys_addr;
        __u64 memory_size; __u64 userspace_addr;
    };"""

    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    ]


class kvm_coalesced_mmio_zone(ctypes.Structure):
    """struct kvm_coalesced_mmio_zone { __u64 addr; __u32 size;
        union { __u32 pad; __u32 pio; }; };"""

    _fields_ = [
        ("addr", ctypes.c_uint64),
        ("size", ctypes.c_uint32),
        ("pio", ctypes.c_uint32),
    ]


class kvm_coalesced_mmio(ctypes.Structure):
    """One ring entry: struct kvm_coalesced_mmio { __u64 phys_addr; __u32 len;
        union { __u32 pad; __u32 pio; }; __u8 data[8]; };

    The ring (struct kvm_coalesced_mmio_ring { __u32 first, last; entries[]; })
    fills one page at page KVM_CHECK_EXTENSION(KVM_CAP_COALESCED_MMIO) of the
    vcpu mmap; the kernel appends at `last`, userspace consumes from `first`."""

    _fields_ = [
        ("phys_addr", ctypes.c_uint64),
        ("len", ctypes.c_uint32),
        ("pio", ctypes.c_uint32),
        ("data", ctypes.c_uint8 * 8),
    ]


class kvm_regs(ctypes.Structure):
    """struct kvm_regs { __u64 rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
        __u64 r8, ..., r15; __u64 rip, rflags; };"""

    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            *("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp"),
            *("r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"),
            *("rip", "rflags"),
        )
    ]


class kvm_segment(ctypes.Structure):
    """struct kvm_segment { __u64 base; __u32 limit; __u16 selector;
        __u8 type, present, dpl, db, s, l, g, avl; __u8 unusable; __u8 padding; };"""

    _fields_ = [
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8),
        ("s", ctypes.c_uint8),
        ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    ]


class kvm_dtable(ctypes.Structure):
    """struct kvm_dtable { __u64 base; __u16 limit; __u16 padding[3]; };"""

    _fields_ = [
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint16),
        ("padding", ctypes.c_uint16 * 3),
    ]


class kvm_sregs(ctypes.Structure):
    """struct kvm_sregs { struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
        struct kvm_dtable gdt, idt; __u64 cr0, cr2, cr3, cr4, cr8, efer, apic_base;
        __u64 interrupt_bitmap[(KVM_NR_INTERRUPTS + 63) / 64]; };"""

    _fields_ = [
        *((name, kvm_segment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        *(
            (name, ctypes.c_uint64)
            for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")
        ),
        ("interrupt_bitmap", ctypes.c_uint64 * 4),
    ]


class kvm_run_io(ctypes.Structure):
    """The KVM_EXIT_IO member of kvm_run's exit union:
    struct { __u8 direction; __u8 size; __u16 port; __u32 count; __u64 data_offset; } io;"""

    _fields_ = [
        ("direction", ctypes.c_uint8),
        ("size", ctypes.c_uint8),
        ("port", ctypes.c_uint16),
        ("count", ctypes.c_uint32),
        ("data_offset", ctypes.c_uint64),
    ]


class _kvm_run_exit(ctypes.Union):
    # Only the members this package reads; the kernel's union is 256 bytes.
    _fields_ = [("io", kvm_run_io), ("hardware_exit_reason", ctypes.c_uint64),
                ("padding", ctypes.c_char * 256)]


class kvm_run(ctypes.Structure):
    """The head of struct kvm_run (mmap'ed from the vcpu fd):
        __u8 request_interrupt_window; __u8 immediate_exit; __u8 padding1[6];
        __u32 exit_reason; __u8 ready_for_interrupt_injection; __u8 if_flag;
        __u16 flags; __u64 cr8; __u64 apic_base; union { ... } (256 bytes);"""

    _fields_ = [
        ("request_interrupt_window", ctypes.c_uint8),
        ("immediate_exit", ctypes.c_uint8),
        ("padding1", ctypes.c_uint8 * 6),
        ("exit_reason", ctypes.c_uint32),
        ("ready_for_interrupt_injection", ctypes.c_uint8),
        ("if_flag", ctypes.c_uint8),
        ("flags", ctypes.c_uint16),
        ("cr8", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("exit", _kvm_run_exit),
    ]


class Ioctl:
    """The ioctl request numbers, each with the name errors report."""

    GET_API_VERSION: Final = _ioc(_IOC_NONE, 0x00, 0)
    CREATE_VM: Final = _ioc(_IOC_NONE, 0x01, 0)
    CHECK_EXTENSION: Final = _ioc(_IOC_NONE, 0x03, 0)
    GET_VCPU_MMAP_SIZE: Final = _ioc(_IOC_NONE, 0x04, 0)
    GET_SUPPORTED_CPUID: Final = _ioc(_IOC_READ | _IOC_WRITE, 0x05, ctypes.sizeof(kvm_cpuid2))
    GET_EMULATED_CPUID: Final = _ioc(_IOC_READ | _IOC_WRITE, 0x09, ctypes.sizeof(kvm_cpuid2))
    CREATE_VCPU: Final = _ioc(_IOC_NONE, 0x41, 0)
    SET_USER_MEMORY_REGION: Final = _ioc(
        _IOC_WRITE, 0x46, ctypes.sizeof(kvm_userspace_memory_region)
    )
    SET_TSS_ADDR: Final = _ioc(_IOC_NONE, 0x47, 0)
    SET_IDENTITY_MAP_ADDR: Final = _ioc(_IOC_WRITE, 0x48, 8)
    CREATE_IRQCHIP: Final = _ioc(_IOC_NONE, 0x60, 0)
    RUN: Final = _ioc(_IOC_NONE, 0x80, 0)
    GET_REGS: Final = _ioc(_IOC_READ, 0x81, ctypes.sizeof(kvm_regs))
    SET_REGS: Final = _ioc(_IOC_WRITE, 0x82, ctypes.sizeof(kvm_regs))
    GET_SREGS: Final = _ioc(_IOC_READ, 0x83, ctypes.sizeof(kvm_sregs))
    SET_SREGS: Final = _ioc(_IOC_WRITE, 0x84, ctypes.sizeof(kvm_sregs))
    SET_CPUID2: Final = _ioc(_IOC_WRITE, 0x90, ctypes.sizeof(kvm_cpuid2))
    GET_CPUID2: Final = _ioc(_IOC_READ | _IOC_WRITE, 0x91, ctypes.sizeof(kvm_cpuid2))
    REGISTER_COALESCED_MMIO: Final = _ioc(
        _IOC_WRITE, 0x67, ctypes.sizeof(kvm_coalesced_mmio_zone)
    )
    UNREGISTER_COALESCED_MMIO: Final = _ioc(
        _IOC_WRITE, 0x68, ctypes.sizeof(kvm_coalesced_mmio_zone)
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
