"""Kvm: the /dev/kvm system file descriptor, and the CPUID and feature-MSR
ioctls on it."""

from __future__ import annotations

import errno
import os
import stat

from kvmcpuid_virt.errors import (
    KvmApiVersionError,
    KvmCapabilityError,
    KvmError,
    KvmIoctlError,
    KvmPermissionError,
    KvmUnavailableError,
    NotKvmDeviceError,
)
from kvmcpuid_virt.kvm.abi import KVM_API_VERSION, Cap, Ioctl
from kvmcpuid_virt.kvm.cpuid_buffer import (
    DEFAULT_NENT,
    MAX_NENT,
    MAX_TRIES,
    entries_from_buffer,
    read_cpuid,
)
from kvmcpuid_virt.kvm.fd import IoctlFn, KvmFd
from kvmcpuid_virt.kvm.msr_buffer import DEFAULT_NMSRS, msr_io, read_msr_list
from kvmcpuid_virt.kvm.xstate import request_for_table, wants_dynamic_xfeatures

TYPE_CHECKING = False  # the fast path's typing stand-in: docs/ARCHITECTURE.md, Start-up
if TYPE_CHECKING:
    from typing import Final, Literal

    from kvmcpuid_virt.cpuid.msr_values import FeatureMsrs
    from kvmcpuid_virt.cpuid.table import CpuidTable
    from kvmcpuid_virt.kvm.vm import Vm

    CpuidKind = Literal["supported", "emulated"]

# The nent bounds and the buffer decoding live in kvm/cpuid_buffer.py (vm.py
# shares them); re-exported for callers that import them from here.
__all__ = [
    "DEFAULT_NENT",
    "DEFAULT_NMSRS",
    "KVM_PATH",
    "MAX_NENT",
    "MAX_TRIES",
    "NO_MSR_FEATURES_CAP",
    "Kvm",
    "entries_from_buffer",
]

KVM_PATH: Final = "/dev/kvm"
# Why a KVM's feature MSRs are absent (FeatureMsrs.why).
NO_MSR_FEATURES_CAP: Final = "this kernel has no KVM_CAP_GET_MSR_FEATURES (before Linux 4.17)"
# KVM_CREATE_VM can fail with EINTR when a signal arrives during VM setup;
# retry a few times, never forever.
_CREATE_TRIES: Final = 5
# The same for every VM of a kernel: ask once per process (per device and
# ioctl function, so a simulated kernel never answers for the real one).
_mmap_size_cache: dict[tuple[str, object], int] = {}


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
        """KVM_CREATE_VM (machine type 0): a new, empty VM (see kvm/vm.py),
        owned by the caller; it uses this Kvm's ioctl function."""
        # Lazy: vm.py costs ~10 ms to import (ctypes, structs, logging) and
        # `kvmcpuid dump` never needs it. Imported before the ioctl so a
        # failing import cannot leak the new VM fd.
        from kvmcpuid_virt.kvm.vm import Vm

        key = (self.path, self._ioctl_fn)
        size = _mmap_size_cache.get(key)
        if size is None:
            size = _mmap_size_cache[key] = self.vcpu_mmap_size()
        for attempt in range(1, _CREATE_TRIES + 1):
            try:
                fd = self.ioctl(Ioctl.CREATE_VM, 0)
            except KvmIoctlError as exc:
                if exc.errno == errno.EINTR and attempt < _CREATE_TRIES:
                    continue
                raise
            return Vm(fd, vcpu_mmap_size=size, ioctl=self._ioctl_fn)
        raise AssertionError("unreachable")

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
        request = Ioctl.GET_SUPPORTED_CPUID if kind == "supported" else Ioctl.GET_EMULATED_CPUID
        return read_cpuid(self.ioctl, request, first_nent)

    def has_feature_msrs(self) -> bool:
        """KVM_CAP_GET_MSR_FEATURES (Linux 4.17+): whether this KVM can report
        feature MSRs at all. False tells "absent" from an empty list."""
        return self.check_extension(Cap.GET_MSR_FEATURES) > 0

    def feature_msr_indices(self, first: int = DEFAULT_NMSRS) -> list[int]:
        """KVM_GET_MSR_FEATURE_INDEX_LIST: the MSRs whose values say what this
        KVM can give a guest (the MSR twin of KVM_GET_SUPPORTED_CPUID), in the
        kernel's order; [] on a kernel without KVM_CAP_GET_MSR_FEATURES. The
        list size is negotiated (kvm/sizing.py; `first` is the first guess)."""
        if not self.has_feature_msrs():
            return []
        return read_msr_list(self.ioctl, Ioctl.GET_MSR_FEATURE_INDEX_LIST, first)

    def feature_msrs(self, first: int = DEFAULT_NMSRS) -> dict[int, int]:
        """KVM_GET_MSRS on /dev/kvm for every feature MSR: index -> value, in
        the kernel's order; {} on a kernel without KVM_CAP_GET_MSR_FEATURES
        (has_feature_msrs() tells that from a KVM with none)."""
        indices = self.feature_msr_indices(first)
        done = msr_io(self.ioctl, Ioctl.GET_MSRS, [(i, 0) for i in indices])
        if len(done) < len(indices):
            raise KvmError(
                f"{self.path}: KVM_GET_MSRS read {len(done)} of the {len(indices)} feature "
                f"MSRs it listed; it refused MSR {indices[len(done)]:#x}"
            )
        return dict(done)

    def read_feature_msrs(self) -> FeatureMsrs:
        """The feature MSRs as plain data (cpuid/msr_values.py), "absent"
        on a kernel without KVM_CAP_GET_MSR_FEATURES."""
        from kvmcpuid_virt.cpuid.msr_values import FeatureMsrs

        if not self.has_feature_msrs():
            return FeatureMsrs.absent(NO_MSR_FEATURES_CAP)
        return FeatureMsrs.of(self.feature_msrs())
