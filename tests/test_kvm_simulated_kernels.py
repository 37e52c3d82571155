"""Kernel behaviours this machine's kernel does not have, simulated through
Kvm's injectable ioctl function. Each test is named for the behaviour it
simulates; everything else in the suite uses the real ioctl."""

from __future__ import annotations

import errno
import json
import mmap
import os
from typing import Any

import pytest

from kvmcpuid_virt.cpuid.table import CpuidEntry, CpuidTable, EntryFlag
from kvmcpuid_virt.errors import (
    CpuidSizeError,
    KvmApiVersionError,
    KvmCapabilityError,
    KvmError,
    KvmIoctlError,
)
from kvmcpuid_virt.kvm import Kvm
from kvmcpuid_virt.kvm.abi import Cap, Ioctl, kvm_msrs
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
        feature_msrs: dict[int, int] | None = None,  # None: no KVM_CAP_GET_MSR_FEATURES
        msr_list_count_on_e2big: bool = True,  # current kernels write the count needed
        msr_list_always_e2big: bool = False,
        unreadable_msrs: frozenset[int] = frozenset(),
    ) -> None:
        self.table = table
        self.too_large = too_large
        self.spurious = spurious_e2big_at_exact
        self.always_e2big = always_e2big
        self.version = api_version
        self.caps = {Cap.EXT_CPUID: int(ext_cpuid), Cap.EXT_EMUL_CPUID: int(emul_cpuid),
                     Cap.GET_MSR_FEATURES: int(feature_msrs is not None)}  # fmt: skip
        self.max_nent = max_nent
        self.msrs = feature_msrs or {}
        self.msr_count_on_e2big = msr_list_count_on_e2big
        self.msr_always_e2big = msr_list_always_e2big
        self.unreadable = unreadable_msrs
        self.calls: list[int] = []
        self.requests: list[int] = []

    def __call__(self, fd: int, request: int, arg: Any) -> int:
        self.requests.append(request)
        if request == Ioctl.GET_MSR_FEATURE_INDEX_LIST:
            return self._msr_list(arg)
        if request == Ioctl.GET_MSRS:
            return self._get_msrs(arg)
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


    def _msr_list(self, buf: Any) -> int:
        # kvm_arch_dev_ioctl: a kernel without the capability does not know
        # the ioctl (EINVAL); E2BIG below the count, which current kernels
        # write back into nmsrs.
        if not self.caps[Cap.GET_MSR_FEATURES]:
            raise OSError(errno.EINVAL, "simulated: no feature MSRs")
        self.calls.append(buf.nmsrs)
        n = buf.nmsrs
        if self.msr_always_e2big or n < len(self.msrs):
            if self.msr_count_on_e2big:
                buf.nmsrs = len(self.msrs)
            raise OSError(errno.E2BIG, "simulated E2BIG")
        for i, index in enumerate(self.msrs):
            buf.set_index(i, index)
        buf.nmsrs = len(self.msrs)
        return 0

    def _get_msrs(self, buf: Any) -> int:
        # msr_io(): in order, stopping at the first MSR it cannot read.
        for i, (index, _) in enumerate(buf.entries()):
            if index not in self.msrs or index in self.unreadable:
                return i
            kvm_msrs.ENTRY.pack_into(
                buf, kvm_msrs.HEADER.size + i * kvm_msrs.ENTRY.size, index, self.msrs[index]
            )
        return int(buf.nmsrs)

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


# --- feature MSRs -------------------------------------------------------------

# What this AMD host's KVM reports (the real values are tested against a C
# program in tests/test_kvm_msrs.py); here only their shape matters.
AMD_FEATURE_MSRS = {0x8B: 0x1000065, 0x10A: 0x4000_0000_0C00_0069, 0x345: 0, 0xCE: 0x8000_0000}


def test_kernel_without_msr_features_capability_reports_feature_msrs_absent() -> None:
    """A kernel before 4.17 (no KVM_CAP_GET_MSR_FEATURES): the CPUID side
    works, the feature MSRs are "absent" (not "empty"), no MSR ioctl and no
    VM is tried, and `features` says so."""
    from kvmcpuid_virt.commands import features
    from kvmcpuid_virt.cpuid.features import registry
    from kvmcpuid_virt.cpuid.msr_features import FeatureMsrs, msr_registry
    from kvmcpuid_virt.kvm.msrs import msr_delivery

    kernel = SimulatedKernel(feature_msrs=None)
    with _kvm(kernel) as kvm:
        assert kvm.supported_cpuid() == TABLE
        assert not kvm.has_feature_msrs()
        assert kvm.feature_msr_indices() == []
        assert kvm.feature_msrs() == {}
        snapshot = kvm.read_feature_msrs()
        assert snapshot == FeatureMsrs.absent() and not snapshot.available
        assert msr_delivery(kvm, table=TABLE).trials == ()
        view = features.live_msr_view(kvm, TABLE)
    assert Ioctl.GET_MSR_FEATURE_INDEX_LIST not in kernel.requests
    assert Ioctl.GET_MSRS not in kernel.requests and Ioctl.CREATE_VM not in kernel.requests
    msrs, delivery, note = view
    assert (msrs.available, delivery, note) == (False, None, features.NO_MSR_CAP)
    full = (msrs, delivery, note, msr_registry())
    text = features.render_table(TABLE, registry(), "qemu", "simulated", msr_view=full)
    assert "feature MSRs  this kernel has no KVM_CAP_GET_MSR_FEATURES" in text
    doc = json.loads(features.render_json(TABLE, registry(), "qemu", "simulated", msr_view=full))
    assert doc["feature_msrs"]["available"] is False
    assert doc["feature_msrs"]["msrs"] == [] and doc["feature_msrs"]["note"] == features.NO_MSR_CAP


def test_kernel_with_msr_features_capability_but_no_feature_msr_is_empty_not_absent() -> None:
    from kvmcpuid_virt.cpuid.msr_features import FeatureMsrs

    with _kvm(SimulatedKernel(feature_msrs={})) as kvm:
        assert kvm.has_feature_msrs()
        assert kvm.feature_msrs() == {}
        snapshot = kvm.read_feature_msrs()
    assert snapshot == FeatureMsrs.of({}) and snapshot.available and len(snapshot) == 0


@pytest.mark.parametrize("first", [1, 3, 4, 5, 1000])
def test_kernel_that_does_not_say_the_count_on_e2big_still_lists_feature_msrs(first: int) -> None:
    # A kernel that leaves nmsrs alone on E2BIG (as KVM_GET_SUPPORTED_CPUID
    # does): the negotiation grows the list as for CPUID.
    kernel = SimulatedKernel(feature_msrs=AMD_FEATURE_MSRS, msr_list_count_on_e2big=False)
    with _kvm(kernel) as kvm:
        assert kvm.feature_msrs() == AMD_FEATURE_MSRS
    assert kernel.calls[-1] >= len(AMD_FEATURE_MSRS)


def test_kernel_whose_msr_list_always_says_e2big_gives_up_bounded() -> None:
    for count in (True, False):
        kernel = SimulatedKernel(feature_msrs=AMD_FEATURE_MSRS, msr_list_always_e2big=True,
                                 msr_list_count_on_e2big=count)  # fmt: skip
        with _kvm(kernel) as kvm, pytest.raises(
            CpuidSizeError, match="KVM_GET_MSR_FEATURE_INDEX_LIST: gave up"
        ):
            kvm.feature_msr_indices(1)
        assert 1 < len(kernel.calls) <= 24


def test_kernel_that_lists_a_feature_msr_it_cannot_read_names_it() -> None:
    kernel = SimulatedKernel(feature_msrs=AMD_FEATURE_MSRS, unreadable_msrs=frozenset({0x345}))
    with _kvm(kernel) as kvm, pytest.raises(KvmError, match="refused MSR 0x345"):
        kvm.feature_msrs()


# An Intel host with nested VMX (this host is AMD): feature MSR values written
# from the Intel SDM, not from the registry. IA32_VMX_PROCBASED_CTLS2 (A.3.3)
# allows control 1 (enable EPT) and 7 (unrestricted guest); the true
# pin-based controls (A.3.1) must have 1, 2 and 4 set (the default1 class)
# and allow 0 (external-interrupt exiting) and 3 (NMI exiting) besides;
# IA32_VMX_BASIC (A.1) bit 54 (INS/OUTS information) and 55 (true controls);
# IA32_VMX_EPT_VPID_CAP (A.10) bits 16 (2-MB pages) and 41 (single-context
# INVVPID, without bit 25: QEMU's vmx-invept-single-context is then off).
SDM_INTEL_VMX_MSRS = {
    0x48B: (1 << 1 | 1 << 7) << 32,
    0x48D: (0x16 | 1 << 0 | 1 << 3) << 32 | 0x16,
    0x480: 1 << 54 | 1 << 55,
    0x48C: 1 << 16 | 1 << 41,
    0x10A: 1 << 0 | 1 << 5,  # rdctl-no, mds-no (SDM Vol. 4, Table 2-2)
}
SDM_INTEL_VMX_NAMES = {"vmx-ept", "vmx-unrestricted-guest", "vmx-intr-exit", "vmx-nmi-exit",
                       "vmx-ins-outs", "vmx-true-ctls", "vmx-ept-2mb", "rdctl-no", "mds-no"}


def test_simulated_intel_kvm_with_nested_vmx_names_the_vmx_feature_msrs() -> None:
    from kvmcpuid_virt.commands import features
    from kvmcpuid_virt.cpuid.features import registry
    from kvmcpuid_virt.cpuid.msr_features import msr_registry

    with _kvm(SimulatedKernel(feature_msrs=SDM_INTEL_VMX_MSRS)) as kvm:
        snapshot = kvm.read_feature_msrs()
    assert snapshot.as_dict() == SDM_INTEL_VMX_MSRS
    reg = msr_registry()
    assert {f.name for f in reg.present(snapshot.as_dict())} == SDM_INTEL_VMX_NAMES
    # bits 1, 2, 4 of the pin-based controls must be 1: no feature, no "unnamed"
    assert reg.unnamed(0x48D, SDM_INTEL_VMX_MSRS[0x48D]) == 0x16 << 32
    view = (snapshot, None, None, reg)
    text = features.render_table(TABLE, registry(), "qemu", "simulated", msr_view=view)
    assert "MSR 48BH IA32_VMX_PROCBASED_CTLS2 = 0x8200000000" in text
    assert "  bit 33 (control 1)  vmx-ept\n" in text
    assert "  bit 39 (control 7)  vmx-unrestricted-guest\n" in text
    assert "  bit 54  vmx-ins-outs\n" in text
    assert "vmx-invept-single-context" not in text
    doc = json.loads(features.render_json(TABLE, registry(), "libvirt", "simulated",
                                          msr_view=view))  # fmt: skip
    ept = next(f for f in doc["feature_msrs"]["features"] if f["qemu"] == "vmx-ept")
    assert (ept["msr"], ept["bit"], ept["control"], ept["refused"]) == ("0x48b", 33, 1, None)
