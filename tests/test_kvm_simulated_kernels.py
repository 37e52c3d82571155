"""Kernel behaviours this machine's kernel does not have, simulated through
Kvm's injectable ioctl function. Each test is named for the behaviour it
simulates; everything else in the suite uses the real ioctl."""

from __future__ import annotations

import errno
import mmap
import os
from typing import Any

import pytest

from kvmcpuid_virt.cpuid.table import CpuidEntry, CpuidTable, EntryFlag
from kvmcpuid_virt.errors import (
    CpuidSizeError,
    KvmApiVersionError,
    KvmCapabilityError,
    KvmIoctlError,
)
from kvmcpuid_virt.kvm import Kvm
from kvmcpuid_virt.kvm.abi import Cap, Ioctl
from kvmcpuid_virt.kvm.vm import Vcpu

# A plausible table: 40 entries, some indexed, distinct values per entry so a
# misplaced entry cannot go unnoticed.
TABLE = CpuidTable(
    [CpuidEntry(0, 0, EntryFlag.NONE, 0x1F, 0x756E6547, 0x6C65746E, 0x49656E69)]
    + [
        CpuidEntry(
            leaf,
            sub,
            EntryFlag.SIGNIFICANT_INDEX if leaf in (4, 7, 0xD) else EntryFlag.NONE,
            leaf * 16 + sub,
            leaf,
            sub,
            0xA5A5A5A5,
        )
        for leaf in range(1, 0x14)
        for sub in (range(3) if leaf in (4, 7, 0xD) else range(1))
    ]
    + [CpuidEntry(0x80000000 + n, 0, EntryFlag.NONE, n, n, n, n) for n in range(13)]
)


class SimulatedKernel:
    """The KVM CPUID ioctls of a kernel with the given quirks."""

    def __init__(
        self,
        table: CpuidTable = TABLE,
        *,
        too_large: str = "clamp",  # "clamp" (current) or "enomem" (2010 api.txt)
        spurious_e2big_at_exact: bool = False,  # KVM_GET_EMULATED_CPUID before 5.13
        always_e2big: bool = False,
        api_version: int = 12,
        ext_cpuid: bool = True,
        emul_cpuid: bool = True,
        max_nent: int = 256,
    ) -> None:
        self.table = table
        self.too_large = too_large
        self.spurious = spurious_e2big_at_exact
        self.always_e2big = always_e2big
        self.version = api_version
        self.caps = {Cap.EXT_CPUID: int(ext_cpuid), Cap.EXT_EMUL_CPUID: int(emul_cpuid)}
        self.max_nent = max_nent
        self.calls: list[int] = []

    def __call__(self, fd: int, request: int, arg: Any) -> int:
        if request == Ioctl.GET_API_VERSION:
            return self.version
        if request == Ioctl.CHECK_EXTENSION:
            return self.caps.get(arg, 0)
        if request in (Ioctl.GET_SUPPORTED_CPUID, Ioctl.GET_EMULATED_CPUID):
            return self._get_cpuid(arg)
        if request == Ioctl.GET_CPUID2:
            return self._get_cpuid2(arg)
        raise OSError(errno.ENOTTY, "simulated: unknown ioctl")

    def _get_cpuid(self, buf: Any) -> int:
        nent = buf.nent
        self.calls.append(nent)
        need = len(self.table)
        if self.always_e2big or nent < need or (self.spurious and nent == need):
            raise OSError(errno.E2BIG, "simulated E2BIG")  # nent left unchanged
        if nent > self.max_nent:
            if self.too_large == "enomem":
                buf.nent = need
                raise OSError(errno.ENOMEM, "simulated ENOMEM")
            nent = self.max_nent
        if self.too_large == "enomem" and nent > need:
            buf.nent = need
            raise OSError(errno.ENOMEM, "simulated ENOMEM")
        for i, e in enumerate(self.table):
            buf.set_entry(i, e.function, e.index, int(e.flags), *e.regs())
        buf.nent = need
        return 0


    def _get_cpuid2(self, buf: Any) -> int:
        # kvm_vcpu_ioctl_get_cpuid2: E2BIG below the vCPU's nent, header not
        # copied back on error; no ENOMEM and no clamping.
        nent = buf.nent
        self.calls.append(nent)
        if self.always_e2big or nent < len(self.table):
            raise OSError(errno.E2BIG, "simulated E2BIG")
        for i, e in enumerate(self.table):
            buf.set_entry(i, e.function, e.index, int(e.flags), *e.regs())
        buf.nent = len(self.table)
        return 0


def _kvm(kernel: SimulatedKernel) -> Kvm:
    # /dev/null stands in for the device node; every ioctl goes to `kernel`.
    return Kvm("/dev/null", ioctl=kernel)


def _vcpu(kernel: SimulatedKernel) -> Vcpu:
    # A memfd stands in for the vCPU fd (Vcpu maps its kvm_run from it).
    fd = os.memfd_create("simulated-vcpu", os.MFD_CLOEXEC)
    os.ftruncate(fd, mmap.PAGESIZE)
    return Vcpu(fd, mmap.PAGESIZE, ioctl=kernel)


@pytest.mark.parametrize("first", [1, 2, 39, 40, 41, 256, 10000])
def test_current_kernel_clamps_large_nent(first: int) -> None:
    with _kvm(SimulatedKernel()) as kvm:
        assert kvm.supported_cpuid(first) == TABLE


@pytest.mark.parametrize("first", [1, 39, 40, 41, 256, 10000])
def test_2010_kernel_enomem_with_adjusted_nent(first: int) -> None:
    kernel = SimulatedKernel(too_large="enomem")
    with _kvm(kernel) as kvm:
        assert kvm.supported_cpuid(first) == TABLE
    assert kernel.calls[-1] == len(TABLE)


@pytest.mark.parametrize("first", [1, 40, 10000])
def test_pre_5_13_kernel_spurious_e2big_at_exact_size(first: int) -> None:
    kernel = SimulatedKernel(spurious_e2big_at_exact=True)
    with _kvm(kernel) as kvm:
        assert kvm.emulated_cpuid(first) == TABLE


def test_kernel_with_both_enomem_and_spurious_e2big_gives_up_bounded() -> None:
    # No size satisfies such a kernel (larger: ENOMEM naming the exact size;
    # exact: E2BIG). The negotiation must end with a clear error, not loop.
    kernel = SimulatedKernel(spurious_e2big_at_exact=True, too_large="enomem")
    with _kvm(kernel) as kvm, pytest.raises(CpuidSizeError, match="gave up"):
        kvm.emulated_cpuid(len(TABLE))
    assert len(kernel.calls) <= 24


def test_kernel_that_always_says_e2big_gives_up_bounded() -> None:
    kernel = SimulatedKernel(always_e2big=True)
    with _kvm(kernel) as kvm, pytest.raises(CpuidSizeError, match="gave up"):
        kvm.supported_cpuid(1)
    assert 1 < len(kernel.calls) <= 24


def test_kernel_without_ext_cpuid() -> None:
    with _kvm(SimulatedKernel(ext_cpuid=False)) as kvm, pytest.raises(
        KvmCapabilityError, match="KVM_CAP_EXT_CPUID"
    ):
        kvm.supported_cpuid()


def test_kernel_without_ext_emul_cpuid() -> None:
    with _kvm(SimulatedKernel(emul_cpuid=False)) as kvm, pytest.raises(
        KvmCapabilityError, match="KVM_CAP_EXT_EMUL_CPUID"
    ):
        kvm.emulated_cpuid()


def test_kernel_with_other_api_version() -> None:
    with pytest.raises(KvmApiVersionError, match="version 11"):
        _kvm(SimulatedKernel(api_version=11))


def test_kernel_error_other_than_size_is_reported_with_ioctl_name() -> None:
    def efault(fd: int, request: int, arg: Any) -> int:
        if request == Ioctl.GET_API_VERSION:
            return 12
        if request == Ioctl.CHECK_EXTENSION:
            return 1
        raise OSError(errno.EFAULT, "simulated EFAULT")

    with Kvm("/dev/null", ioctl=efault) as kvm, pytest.raises(
        KvmIoctlError, match="KVM_GET_SUPPORTED_CPUID failed: EFAULT"
    ):
        kvm.supported_cpuid()


@pytest.mark.parametrize("first", [1, 39, 40, 41, 10000])
def test_vcpu_get_cpuid2_grows_past_e2big(first: int) -> None:
    kernel = SimulatedKernel()
    with _vcpu(kernel) as vcpu:
        assert vcpu.get_cpuid2(first) == TABLE
    assert kernel.calls[-1] >= len(TABLE)


def test_vcpu_get_cpuid2_that_always_says_e2big_gives_up_bounded() -> None:
    # The same negotiation as Kvm's (kvm/cpuid_buffer.py): bounded, one error.
    kernel = SimulatedKernel(always_e2big=True)
    with _vcpu(kernel) as vcpu, pytest.raises(CpuidSizeError, match="KVM_GET_CPUID2: gave up"):
        vcpu.get_cpuid2(1)
    assert 1 < len(kernel.calls) <= 24
