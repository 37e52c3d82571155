"""Kvm: the /dev/kvm system file descriptor and the CPUID ioctls on it."""

from __future__ import annotations

import errno
import os
import stat

from kvmcpuid_virt.cpuid.table import CpuidEntry, CpuidTable, EntryFlag
from kvmcpuid_virt.errors import (
    CpuidSizeError,
    KvmApiVersionError,
    KvmCapabilityError,
    KvmIoctlError,
    KvmPermissionError,
    KvmUnavailableError,
    NotKvmDeviceError,
)
from kvmcpuid_virt.kvm.abi import (
    KVM_API_VERSION,
    KVM_MAX_CPUID_ENTRIES,
    Cap,
    Ioctl,
    kvm_cpuid2,
)
from kvmcpuid_virt.kvm.fd import IoctlFn, KvmFd
from kvmcpuid_virt.kvm.xstate import request_for_table, wants_dynamic_xfeatures

# typing costs ~2.5 ms to import and `kvmcpuid dump` must start fast (see
# benchmarks/bench_dump.py); mypy treats this name as always true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final, Literal

    from kvmcpuid_virt.kvm.vm import Vm

__all__ = ["DEFAULT_NENT", "KVM_PATH", "MAX_NENT", "MAX_TRIES", "Kvm", "entries_from_buffer"]


def _debug(message: str, *args: object) -> None:
    # logging costs ~10 ms to import; only the rare retry paths need it.
    import logging

    logging.getLogger(__name__).debug(message, *args)

KVM_PATH: Final = "/dev/kvm"
# A first guess that fits every kernel seen so far in one call (this host
# needs ~60 entries; KVM's own cap is 256).
DEFAULT_NENT: Final = KVM_MAX_CPUID_ENTRIES
# Hard bounds on the nent negotiation: never allocate absurd buffers, never
# loop forever on a kernel that keeps saying E2BIG.
MAX_NENT: Final = 1 << 16
MAX_TRIES: Final = 24

if TYPE_CHECKING:
    CpuidKind = Literal["supported", "emulated"]


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


class Kvm(KvmFd):
    """The KVM system fd (/dev/kvm). Use as a context manager.

    `ioctl` replaces fcntl.ioctl; the tests use it to simulate kernels whose
    behaviour this machine cannot produce.
    """

    def __init__(self, path: str = KVM_PATH, *, ioctl: IoctlFn | None = None) -> None:
        self.path = path
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailableError(
                f"{path} does not exist: load kvm_intel or kvm_amd and enable "
                "VT-x/AMD-V in the firmware (or pass the device into this container)"
            ) from None
        except PermissionError:
            raise KvmPermissionError(
                f"permission denied opening {path}: add this user to the group that owns it "
                "(usually 'kvm': usermod -aG kvm $USER, then log in again) or run as root"
            ) from None
        except IsADirectoryError:
            raise NotKvmDeviceError(f"{path} is a directory, not a KVM device") from None
        except OSError as exc:
            raise KvmUnavailableError(f"cannot open {path}: {exc.strerror}") from None
        super().__init__(fd, ioctl)
        try:
            self._check_device()
        except BaseException:
            self.close()
            raise

    def _check_device(self) -> None:
        try:
            version = self.ioctl(Ioctl.GET_API_VERSION)
        except KvmIoctlError as exc:
            if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EBADF):
                mode = os.fstat(self.fd).st_mode
                kind = "a character device" if stat.S_ISCHR(mode) else "not a device"
                raise NotKvmDeviceError(
                    f"{self.path} is not a KVM device ({kind} that does not answer "
                    "KVM_GET_API_VERSION)"
                ) from None
            raise
        if version != KVM_API_VERSION:
            raise KvmApiVersionError(
                f"{self.path}: KVM API version {version}, this tool speaks {KVM_API_VERSION}"
            )
        self.api_version_value = version

    def api_version(self) -> int:
        return self.ioctl(Ioctl.GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 when absent, else a capability-specific value."""
        return self.ioctl(Ioctl.CHECK_EXTENSION, cap)

    def vcpu_mmap_size(self) -> int:
        return self.ioctl(Ioctl.GET_VCPU_MMAP_SIZE)

    def create_vm(self) -> Vm:
        """KVM_CREATE_VM: a new, empty VM (see kvm/vm.py), owned by the caller."""
        from kvmcpuid_virt.kvm.vm import Vm  # lazy: `kvmcpuid dump` never needs it

        return Vm.create(self)

    def supported_cpuid(self, first_nent: int = DEFAULT_NENT) -> CpuidTable:
        """KVM_GET_SUPPORTED_CPUID: what this KVM can give a guest."""
        if not self.check_extension(Cap.EXT_CPUID):
            raise KvmCapabilityError(
                f"{self.path}: KVM_CAP_EXT_CPUID is missing (kernel older than 2.6.25?)"
            )
        table = self._get_cpuid("supported", first_nent)
        # KVM shows AMX tile data in leaf 0xD only to a process that asked for
        # it, as a VMM does (kvm/xstate.py); read again once granted.
        if wants_dynamic_xfeatures(table) and request_for_table(table):
            table = self._get_cpuid("supported", first_nent)
        return table

    def emulated_cpuid(self, first_nent: int = DEFAULT_NENT) -> CpuidTable:
        """KVM_GET_EMULATED_CPUID: what KVM emulates in software (slowly)."""
        if not self.check_extension(Cap.EXT_EMUL_CPUID):
            raise KvmCapabilityError(
                f"{self.path}: KVM_CAP_EXT_EMUL_CPUID is missing (kernel older than 3.15)"
            )
        return self._get_cpuid("emulated", first_nent)

    def _get_cpuid(self, kind: CpuidKind, first_nent: int) -> CpuidTable:
        """Negotiate nent. E2BIG: grow. ENOMEM with nent lowered (the original
        2010 API for a too-large buffer): retry at the size the kernel named.
        Current kernels clamp a large nent and succeed. The pre-5.13 spurious
        E2BIG of KVM_GET_EMULATED_CPUID at exactly the right size is just
        another E2BIG: growing past it succeeds."""
        request = Ioctl.GET_SUPPORTED_CPUID if kind == "supported" else Ioctl.GET_EMULATED_CPUID
        nent = min(max(int(first_nent), 1), MAX_NENT)
        for attempt in range(1, MAX_TRIES + 1):
            buf = kvm_cpuid2(nent)
            try:
                self.ioctl(request, buf)
            except KvmIoctlError as exc:
                if exc.errno == errno.E2BIG:
                    if nent >= MAX_NENT:
                        break
                    _debug("%s: E2BIG at nent=%d (try %d)", exc.request, nent, attempt)
                    nent = min(nent * 2, MAX_NENT)
                    continue
                if exc.errno == errno.ENOMEM:
                    adjusted = int(buf.nent)
                    if 0 < adjusted < nent:
                        _debug("%s: ENOMEM, kernel wants nent=%d", exc.request, adjusted)
                        nent = adjusted
                        continue
                raise
            got = int(buf.nent)
            if got > nent:
                raise CpuidSizeError(
                    Ioctl.name(request), 0,
                    f"{Ioctl.name(request)} reported nent={got} for a buffer of {nent}",
                )
            return CpuidTable(entries_from_buffer(buf, got))
        raise CpuidSizeError(
            Ioctl.name(request),
            errno.E2BIG,
            f"{Ioctl.name(request)}: gave up after {MAX_TRIES} tries (last nent={nent})",
        )
