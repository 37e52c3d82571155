"""Vm and Vcpu: the VM and vCPU file descriptors for the raw-KVM probe, plus
GuestMemory, an anonymous mapping that backs a memory slot.

Both fds come from anon-inode ioctls that the kernel opens O_CLOEXEC. A Vm
owns the vCPUs it created and closes them with itself; a Vcpu owns its
kvm_run mapping and unmaps it on close.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import struct
from collections.abc import Iterable, Mapping
from typing import Final

from kvmcpuid_virt.cpuid.table import CpuidTable
from kvmcpuid_virt.errors import KvmError
from kvmcpuid_virt.kvm.abi import (
    KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_READONLY,
    KVM_SIGSET_BYTES,
    Cap,
    Ioctl,
    kvm_cpuid2,
)
from kvmcpuid_virt.kvm.cpuid_buffer import DEFAULT_NENT, read_cpuid
from kvmcpuid_virt.kvm.fd import IoctlFn, KvmFd
from kvmcpuid_virt.kvm.msr_buffer import msr_io
from kvmcpuid_virt.kvm.structs import (
    kvm_coalesced_mmio,
    kvm_coalesced_mmio_zone,
    kvm_regs,
    kvm_run,
    kvm_sregs,
    kvm_userspace_memory_region,
)
from kvmcpuid_virt.kvm.xstate import DYNAMIC_XFEATURES, request_for_table, xcr0_of

__all__ = ["GuestMemory", "Vcpu", "Vm"]

log = logging.getLogger(__name__)

# struct kvm_run: exit_reason at offset 8; the exit union at 32, whose io
# member is { __u8 direction, size; __u16 port; __u32 count; __u64 data_offset; }.
_EXIT_REASON_OFFSET: Final = kvm_run.exit_reason.offset
_EXIT_UNION_OFFSET: Final = kvm_run.exit.offset
_U32_AT: Final = struct.Struct("<I")
_IO: Final = struct.Struct("<BBHIQ")
# struct kvm_coalesced_mmio_ring { __u32 first, last; entries[] } in one page.
_RING_HEAD: Final = struct.Struct("<II")
_ENTRY: Final = ctypes.sizeof(kvm_coalesced_mmio)
_RING_MAX: Final = (mmap.PAGESIZE - _RING_HEAD.size) // _ENTRY
_LEN_OFF: Final = kvm_coalesced_mmio.len.offset
_DATA_OFF: Final = kvm_coalesced_mmio.data.offset
_cap_cache: dict[tuple[object, int], int] = {}


class GuestMemory:
    """A page-aligned anonymous mapping to put in a memory slot. Not owned by
    the Vm that maps it: one image buffer may serve many VMs in turn."""

    def __init__(self, size: int, data: bytes = b"") -> None:
        if size <= 0 or size % mmap.PAGESIZE:
            raise ValueError(f"guest memory size {size:#x} is not a positive multiple of a page")
        if len(data) > size:
            raise ValueError(f"{len(data)} bytes do not fit in {size:#x} bytes of guest memory")
        self.size = size
        self._mm: mmap.mmap | None = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._mm[: len(data)] = data
        # The address is taken through a temporary export that is dropped at
        # once, so close() never fails with "exported pointers exist".
        probe = ctypes.c_char.from_buffer(self._mm)
        self.address: int = ctypes.addressof(probe)
        del probe

    @property
    def buffer(self) -> mmap.mmap:
        if self._mm is None:
            raise ValueError("guest memory is closed")
        return self._mm

    @property
    def closed(self) -> bool:
        return self._mm is None

    def close(self) -> None:
        mm, self._mm = self._mm, None
        if mm is not None:
            mm.close()

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Vm(KvmFd):
    """A VM fd from KVM_CREATE_VM. Create with Kvm.create_vm(), which issues
    the ioctl on /dev/kvm (so this module needs nothing of kvm/system.py)."""

    def __init__(self, fd: int, *, vcpu_mmap_size: int, ioctl: IoctlFn | None = None) -> None:
        super().__init__(fd, ioctl)
        self.vcpu_mmap_size = vcpu_mmap_size
        # Page of the vcpu mmap holding the coalesced ring; 0 until registered.
        self.coalesced_page = 0
        # Slots keep their memory alive for as long as the VM may touch it.
        self._regions: dict[int, GuestMemory] = {}
        self._vcpus: list[Vcpu] = []

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (cached per process and ioctl
        function)."""
        key = (self._ioctl_fn, cap)
        value = _cap_cache.get(key)
        if value is None:
            value = _cap_cache[key] = self.ioctl(Ioctl.CHECK_EXTENSION, cap)
        return value

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory: GuestMemory,
                               *, readonly: bool = False) -> None:
        """Map `memory` at `guest_phys_addr`. `readonly` makes guest writes
        exit as KVM_EXIT_MMIO instead of changing the (maybe shared) buffer."""
        flags = 0
        if readonly:
            if not self.check_extension(Cap.READONLY_MEM):
                raise KvmError("this KVM cannot map read-only memory (KVM_CAP_READONLY_MEM)")
            flags |= KVM_MEM_READONLY
        region = kvm_userspace_memory_region(
            slot=slot, flags=flags, guest_phys_addr=guest_phys_addr,
            memory_size=memory.size, userspace_addr=memory.address,
        )
        self.ioctl(Ioctl.SET_USER_MEMORY_REGION, region)
        self._regions[slot] = memory

    def register_coalesced_pio(self, port: int, size: int = 1) -> bool:
        """Let OUTs to [port, port+size) go into the coalesced ring (read with
        Vcpu.drain_coalesced) instead of exiting to userspace each; False if
        this KVM cannot. Only accesses that fit the zone are coalesced, so a
        1-byte zone collects exactly the 1-byte writes. Note: a VM with a
        zone takes an SRCU grace period (~15 ms nested) to destroy."""
        if not self.check_extension(Cap.COALESCED_PIO):
            return False
        zone = kvm_coalesced_mmio_zone(addr=port, size=size, pio=1)
        self.ioctl(Ioctl.REGISTER_COALESCED_MMIO, zone)
        self.coalesced_page = self.check_extension(Cap.COALESCED_MMIO)
        return True

    def set_tss_addr(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR: three pages of guest-physical space Intel VMX
        uses to emulate real mode without unrestricted guest; a no-op on AMD.
        fcntl passes the address as a C int, so it must be below 2 GiB (QEMU's
        0xfffbd000 cannot be expressed)."""
        if not 0 <= addr < 1 << 31 or addr % mmap.PAGESIZE:
            raise ValueError(f"TSS address {addr:#x} must be page-aligned and below 2 GiB")
        self.ioctl(Ioctl.SET_TSS_ADDR, addr)

    def create_vcpu(self, vcpu_id: int = 0) -> Vcpu:
        fd = self.ioctl(Ioctl.CREATE_VCPU, vcpu_id)
        vcpu = Vcpu(fd, self.vcpu_mmap_size, ioctl=self._ioctl_fn,
                    coalesced_page=self.coalesced_page)
        self._vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        vcpus, self._vcpus = self._vcpus, []
        try:
            for vcpu in vcpus:
                vcpu.close()
        finally:
            super().close()
            self._regions = {}


class Vcpu(KvmFd):
    """A vCPU fd from KVM_CREATE_VCPU with its kvm_run mapping."""

    def __init__(self, fd: int, mmap_size: int, ioctl: IoctlFn | None = None,
                 *, coalesced_page: int = 0) -> None:
        super().__init__(fd, ioctl)
        ring = coalesced_page * mmap.PAGESIZE
        self._mm: mmap.mmap | None = None
        if coalesced_page and ring + mmap.PAGESIZE > mmap_size:
            self.close()  # this object owns fd from the start: never leak it
            raise KvmError(f"coalesced ring page {coalesced_page} is outside the vcpu mmap")
        self._ring = ring
        try:
            self._mm = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            self.close()
            raise KvmError(f"cannot mmap kvm_run of a vcpu: {exc.strerror}") from None

    @property
    def kvm_run(self) -> kvm_run:
        """A ctypes view of the shared kvm_run. Every view pins the mapping:
        close() unmaps only once all views are gone, so prefer the accessors."""
        mm = self._mm
        if mm is None:
            raise ValueError("Vcpu is closed")
        return kvm_run.from_buffer(mm)

    def run(self) -> int:
        """KVM_RUN; the exit reason. EINTR (a signal, immediate_exit) raises
        KvmIoctlError with errno EINTR."""
        self.ioctl(Ioctl.RUN)
        return int(_U32_AT.unpack_from(self._map(), _EXIT_REASON_OFFSET)[0])

    def exit_io(self) -> tuple[int, int, int, bytes]:
        """The current KVM_EXIT_IO as (direction, size, port, data); data is
        size * count bytes (count > 1 for string I/O)."""
        mm = self._map()
        direction, size, port, count, off = _IO.unpack_from(mm, _EXIT_UNION_OFFSET)
        n = size * count
        if off + n > len(mm):
            raise KvmError(f"KVM_EXIT_IO data at {off:#x}+{n} is outside kvm_run")
        return direction, size, port, mm[off : off + n]

    def drain_coalesced(self) -> bytes:
        """Consume the coalesced ring (shared by the VM's vcpus) and return
        the data of its entries in order. Call on every exit, before handling
        the exit itself: the ring holds the writes that came before it."""
        if not self._ring:
            return b""
        mm = self._map()
        first, last = _RING_HEAD.unpack_from(mm, self._ring)
        if first == last:
            return b""
        if first >= _RING_MAX or last >= _RING_MAX:
            raise KvmError(f"coalesced ring indices out of range ({first}, {last})")
        # Entries are 1-byte writes (see register_coalesced_pio): read the
        # first data byte of each with one strided slice per contiguous run.
        base = self._ring + _RING_HEAD.size
        runs = [(first, last)] if first < last else [(first, _RING_MAX), (0, last)]
        out = bytearray()
        for a, b in runs:
            lens = mm[base + a * _ENTRY + _LEN_OFF : base + b * _ENTRY : _ENTRY]
            if lens.count(1) != len(lens):
                raise KvmError("coalesced ring holds a write wider than one byte")
            out += mm[base + a * _ENTRY + _DATA_OFF : base + b * _ENTRY : _ENTRY]
        _U32_AT.pack_into(mm, self._ring, last)  # first = last: all consumed
        return bytes(out)

    def _map(self) -> mmap.mmap:
        mm = self._mm
        if mm is None:
            raise ValueError("Vcpu is closed")
        return mm

    def set_immediate_exit(self, value: bool) -> None:
        """kvm_run.immediate_exit: the next (or a signal-interrupted) KVM_RUN
        returns EINTR at once. Safe to call from another thread."""
        mm = self._mm
        if mm is not None:
            mm[1] = 1 if value else 0  # offsetof(struct kvm_run, immediate_exit)

    def set_signal_mask(self, blocked: Iterable[int] | None) -> None:
        """KVM_SET_SIGNAL_MASK: the signal mask in force while in KVM_RUN
        (None: the thread's own mask)."""
        if blocked is None:
            self.ioctl(Ioctl.SET_SIGNAL_MASK, 0)
            return
        bits = 0
        for sig in blocked:
            bits |= 1 << (int(sig) - 1)
        arg = struct.pack("<I", KVM_SIGSET_BYTES) + bits.to_bytes(KVM_SIGSET_BYTES, "little")
        self.ioctl(Ioctl.SET_SIGNAL_MASK, arg)

    def get_regs(self) -> kvm_regs:
        regs = kvm_regs()
        self.ioctl(Ioctl.GET_REGS, regs)
        return regs

    def set_regs(self, regs: kvm_regs) -> None:
        self.ioctl(Ioctl.SET_REGS, regs)

    def get_sregs(self) -> kvm_sregs:
        sregs = kvm_sregs()
        self.ioctl(Ioctl.GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: kvm_sregs) -> None:
        self.ioctl(Ioctl.SET_SREGS, sregs)

    def set_cpuid2(self, table: CpuidTable) -> None:
        """KVM_SET_CPUID2: what CPUID answers in this vCPU (before its first
        KVM_RUN; later calls must repeat the same table on kernels >= 5.16)."""
        if len(table) > KVM_MAX_CPUID_ENTRIES:
            raise KvmError(
                f"{len(table)} CPUID entries exceed KVM's limit of {KVM_MAX_CPUID_ENTRIES}"
            )
        if xcr0_of(table) & DYNAMIC_XFEATURES:
            request_for_table(table)  # else KVM refuses the table (kvm/xstate.py)
        buf = kvm_cpuid2(len(table))
        for i, e in enumerate(table):
            buf.set_entry(i, e.function, e.index, int(e.flags), e.eax, e.ebx, e.ecx, e.edx)
        self.ioctl(Ioctl.SET_CPUID2, buf)

    def get_cpuid2(self, first_nent: int = DEFAULT_NENT) -> CpuidTable:
        """KVM_GET_CPUID2: the table this vCPU answers from. E2BIG means the
        buffer is too small (the kernel does not say how small): grow, bounded,
        by the negotiation Kvm uses too (kvm/cpuid_buffer.py)."""
        return read_cpuid(self.ioctl, Ioctl.GET_CPUID2, first_nent)

    def set_msrs(self, values: Mapping[int, int]) -> int:
        """KVM_SET_MSRS (host-initiated writes): how many of `values` the vCPU
        accepted, in order; the kernel stops at the first it refuses, so
        `values` after that were not written. A refusal is an answer, not an
        error: x86.c refuses e.g. a non-zero IA32_ARCH_CAPABILITIES on a vCPU
        whose CPUID does not enumerate it (and accepts 0 for it)."""
        return len(msr_io(self.ioctl, Ioctl.SET_MSRS, list(values.items())))

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """KVM_GET_MSRS: index -> value, in order, for the MSRs the vCPU would
        read; it stops at the first it refuses, whose index and all after it
        are then missing from the answer."""
        return dict(msr_io(self.ioctl, Ioctl.GET_MSRS, [(i, 0) for i in indices]))

    def close(self) -> None:
        mm, self._mm = self._mm, None
        try:
            if mm is not None:
                mm.close()
        except BufferError:
            # A kvm_run view is still alive: the mapping (and mmap's dup of
            # the fd) goes when the last view does.
            log.debug("kvm_run still referenced; unmapping deferred")
        finally:
            super().close()
