"""ctypes layouts of the VM and vCPU structs the raw-KVM probe passes to
ioctls or maps (kvm_run). Each struct's C declaration is in its docstring so a
reader can check the layout against include/uapi/linux/kvm.h and
arch/x86/include/uapi/asm/kvm.h; tests/test_kvm_abi.py checks every size
against the installed kernel headers.

Only kvm/vm.py imports this module: ctypes costs ~2 ms to import, and the
CPUID path (`kvmcpuid dump`) uses the struct-packed buffer in kvm/abi.py.
"""

from __future__ import annotations

import ctypes

__all__ = [
    "kvm_coalesced_mmio",
    "kvm_coalesced_mmio_zone",
    "kvm_dtable",
    "kvm_regs",
    "kvm_run",
    "kvm_run_io",
    "kvm_segment",
    "kvm_sregs",
    "kvm_userspace_memory_region",
]


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
