"""Feature MSRs and vCPU MSRs on the real /dev/kvm, against an independent
reading: a C program doing the same ioctls (tests/kvm_msr_c.py)."""

from __future__ import annotations

import errno
import fcntl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmcpuid_virt.cpuid.msr_features import FeatureMsrs, explain_set_failure, msr_registry
from kvmcpuid_virt.errors import KvmIoctlError
from kvmcpuid_virt.kvm import Kvm
from kvmcpuid_virt.kvm.abi import Cap, Ioctl
from kvmcpuid_virt.kvm.msrs import msr_delivery
from tests.kvm_msr_c import c_msr_reading

pytestmark = pytest.mark.kvm

IA32_SYSENTER_CS = 0x174
IA32_SYSENTER_ESP = 0x175
IA32_SYSENTER_EIP = 0x176
IA32_BIOS_SIGN_ID = 0x8B
IA32_ARCH_CAPABILITIES = 0x10A
# No MSR has this index (neither Intel's nor AMD's ranges, nor KVM's own).
NO_SUCH_MSR = 0xDEAD0000


class CountingIoctl:
    """fcntl.ioctl, counted per request: the real kernel answers."""

    def __init__(self) -> None:
        self.calls: dict[int, int] = {}

    def __call__(self, fd: int, request: int, arg: Any) -> int:
        self.calls[request] = self.calls.get(request, 0) + 1
        result: int = fcntl.ioctl(fd, request, arg)
        return result


@pytest.fixture
def counted(kvm: Kvm) -> Iterator[tuple[Kvm, CountingIoctl]]:
    counter = CountingIoctl()
    with Kvm(kvm.path, ioctl=counter) as k:
        yield k, counter


def _needs_msr_features(kvm: Kvm) -> None:
    if not c_msr_reading().cap:
        pytest.skip("this kernel has no KVM_CAP_GET_MSR_FEATURES")


def test_capability_matches_the_c_reading(kvm: Kvm) -> None:
    assert kvm.check_extension(Cap.GET_MSR_FEATURES) == c_msr_reading().cap
    assert kvm.has_feature_msrs() == (c_msr_reading().cap > 0)


def test_feature_msr_list_and_values_equal_the_c_reading(kvm: Kvm) -> None:
    _needs_msr_features(kvm)
    c = c_msr_reading()
    assert kvm.feature_msr_indices() == list(c.values)  # the kernel's order
    assert kvm.feature_msrs() == c.values
    assert list(kvm.feature_msrs()) == list(c.values)
    snapshot = kvm.read_feature_msrs()
    assert snapshot == FeatureMsrs.of(c.values) and snapshot.available


def test_every_kvm_lists_arch_capabilities_and_the_microcode_revision(kvm: Kvm) -> None:
    # x86.c lists both on every vendor since Linux 5.x (it emulates
    # IA32_ARCH_CAPABILITIES on AMD too): the reading is not vacuous.
    _needs_msr_features(kvm)
    assert {IA32_ARCH_CAPABILITIES, IA32_BIOS_SIGN_ID} <= set(c_msr_reading().values)


@pytest.mark.parametrize("first", [1, 2, 3, 4, 5, 64, 4096])
def test_list_is_independent_of_the_first_guess(kvm: Kvm, first: int) -> None:
    _needs_msr_features(kvm)
    assert kvm.feature_msr_indices(first) == list(c_msr_reading().values)


def test_e2big_answer_names_the_count_and_the_negotiation_uses_it(
    kvm: Kvm, counted: tuple[Kvm, CountingIoctl]
) -> None:
    """The kernel writes the count it needs on E2BIG (the C program sees it):
    from a guess of 1, one retry at that count suffices."""
    _needs_msr_features(kvm)
    r, err, needed = c_msr_reading().probe or (0, 0, 0)
    assert (r, err, needed) == (-1, errno.E2BIG, len(c_msr_reading().values))
    k, counter = counted
    assert k.feature_msr_indices(1) == list(c_msr_reading().values)
    expected = 1 if needed <= 1 else 2
    assert counter.calls[Ioctl.GET_MSR_FEATURE_INDEX_LIST] == expected


def test_vcpu_msrs_round_trip(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        values = {IA32_SYSENTER_CS: 0x10, IA32_SYSENTER_ESP: 0x1234_5678_9ABC,
                  IA32_SYSENTER_EIP: 0xFFFF_8000_0000_1000}  # fmt: skip
        assert vcpu.set_msrs(values) == 3
        assert vcpu.get_msrs(values) == values


def _ignore_msrs() -> bool:
    p = Path("/sys/module/kvm/parameters/ignore_msrs")
    return p.exists() and p.read_text().strip() in ("Y", "1")


def test_vcpu_set_msrs_stops_at_the_first_refused(kvm: Kvm) -> None:
    if _ignore_msrs():
        pytest.skip("kvm.ignore_msrs=Y: KVM accepts every MSR")
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        accepted = vcpu.set_msrs({IA32_SYSENTER_CS: 5, NO_SUCH_MSR: 1, IA32_SYSENTER_ESP: 7})
        assert accepted == 1
        # the write after the refused one did not happen
        assert vcpu.get_msrs([IA32_SYSENTER_ESP]) == {IA32_SYSENTER_ESP: 0}
        assert vcpu.get_msrs([IA32_SYSENTER_CS, NO_SUCH_MSR, IA32_SYSENTER_ESP]) == {
            IA32_SYSENTER_CS: 5
        }


def test_vcpu_msr_io_longer_than_one_kernel_call(kvm: Kvm) -> None:
    # msr_io() refuses nmsrs >= 256 with E2BIG; 600 entries take three calls.
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        assert vcpu.set_msrs({IA32_SYSENTER_CS: 9}) == 1
        assert vcpu.get_msrs([IA32_SYSENTER_CS] * 600) == {IA32_SYSENTER_CS: 9}
    # The kernel's own limit, seen through the raw ioctl: one call of 256.
    from kvmcpuid_virt.kvm.abi import kvm_msrs

    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        with pytest.raises(KvmIoctlError, match="E2BIG"):
            vcpu.ioctl(Ioctl.GET_MSRS, kvm_msrs([(IA32_SYSENTER_CS, 0)] * 256))


def test_vcpu_trial_equals_the_c_programs(kvm: Kvm) -> None:
    """What a vCPU accepts, value by value and bit by bit, is what the C
    program's vCPU accepted."""
    _needs_msr_features(kvm)
    c = c_msr_reading()
    delivery = msr_delivery(kvm)
    assert [t.index for t in delivery.trials] == list(c.values)
    for t in delivery.trials:
        assert t.offered == c.values[t.index]
        assert t.accepted == (c.set_result[t.index] == 1), hex(t.index)
        assert t.read_back == c.read_back.get(t.index), hex(t.index)
        if t.accepted:
            assert t.deliverable == t.offered and t.reason is None
        else:
            alone = [b for (i, b), r in c.bit_result.items() if i == t.index and r == 1]
            assert t.deliverable == sum(1 << b for b in alone), hex(t.index)
            assert t.reason


def test_vcpu_trial_is_fast_and_bounded(kvm: Kvm, counted: tuple[Kvm, CountingIoctl]) -> None:
    _needs_msr_features(kvm)
    k, counter = counted
    values = k.feature_msrs()
    table = k.supported_cpuid()
    msr_delivery(k, table=table, values=values)  # warm: imports, registries
    counter.calls.clear()
    start = time.perf_counter()
    delivery = msr_delivery(k, table=table, values=values)
    elapsed = time.perf_counter() - start
    # A few ms here; a generous bound for a loaded machine.
    assert delivery.seconds <= elapsed < 0.5
    per_msr = 2 + 64  # the value, its read-back, then each bit alone at most
    assert counter.calls.get(Ioctl.SET_MSRS, 0) + counter.calls.get(Ioctl.GET_MSRS, 0) <= (
        per_msr * len(values)
    )
    assert counter.calls[Ioctl.CREATE_VM] == 1 and counter.calls[Ioctl.CREATE_VCPU] == 1


def test_refused_arch_capabilities_is_explained_by_the_vcpus_cpuid(kvm: Kvm) -> None:
    """Where a vCPU refuses KVM's own IA32_ARCH_CAPABILITIES (this host), the
    reason is the one KVM applies: the vCPU's CPUID, as KVM_GET_CPUID2 reads
    it back, lacks CPUID.07H.0:EDX[29] although the table set had it."""
    _needs_msr_features(kvm)
    delivery = msr_delivery(kvm)
    trial = delivery.trial(IA32_ARCH_CAPABILITIES)
    assert trial is not None
    if trial.accepted:
        assert delivery.why_refused(IA32_ARCH_CAPABILITIES, trial.offered) is None
        return
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        table = kvm.supported_cpuid()
        vcpu.set_cpuid2(table)
        given = table.get(7, 0, "edx") >> 29 & 1
        kept = vcpu.get_cpuid2().get(7, 0, "edx") >> 29 & 1
    assert given == 1
    assert kept == 0
    assert delivery.cpuid_lost == ("arch-capabilities",)
    assert trial.reason is not None and "lost arch-capabilities" in trial.reason
    # QEMU's abort message for the named bits of KVM's value is explained.
    named = sum(f.mask for f in msr_registry().in_msr(IA32_ARCH_CAPABILITIES) if f.qemu)
    message = f"failed to set MSR 0x10a to {trial.offered & named:#x}"
    why = explain_set_failure(message, delivery)
    assert why is not None and "refused by a vCPU here" in why
