"""The KVM API contract of KVM_GET_SUPPORTED_CPUID and KVM_GET_EMULATED_CPUID,
checked with raw ioctls on this host's /dev/kvm (Documentation/virt/kvm/api.rst)."""

from __future__ import annotations

import errno
import fcntl

import pytest

from kvmcpuid_virt.cpuid.table import INDEXED_LEAVES
from kvmcpuid_virt.kvm import Kvm
from kvmcpuid_virt.kvm.abi import Ioctl, kvm_cpuid2

KINDS = {
    "supported": Ioctl.GET_SUPPORTED_CPUID,
    "emulated": Ioctl.GET_EMULATED_CPUID,
}


def _needed(kvm: Kvm, kind: str) -> int:
    table = kvm.supported_cpuid() if kind == "supported" else kvm.emulated_cpuid()
    return len(table)


@pytest.mark.parametrize("kind", KINDS)
def test_e2big_below_needed_size_leaves_nent_unchanged(kvm: Kvm, kind: str) -> None:
    need = _needed(kvm, kind)
    small = need - 1
    if small < 1:
        pytest.skip(f"{kind}: the table has a single entry; no smaller size to try")
    buf = kvm_cpuid2(small)
    with pytest.raises(OSError) as info:
        fcntl.ioctl(kvm.fd, KINDS[kind], buf)
    assert info.value.errno == errno.E2BIG
    assert buf.nent == small


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("extra", [0, 1, 100])
def test_success_adjusts_nent_to_entries_written(kvm: Kvm, kind: str, extra: int) -> None:
    need = _needed(kvm, kind)
    buf = kvm_cpuid2(need + extra)
    try:
        fcntl.ioctl(kvm.fd, KINDS[kind], buf)
    except OSError as exc:
        if exc.errno == errno.E2BIG and extra == 0 and kind == "emulated":
            # The emulated leaves are produced function by function, and the
            # kernel checks for a free slot before each one, even one that adds
            # nothing: E2BIG at exactly the needed size. DESIGN.md dates the fix
            # to 5.13; this host shows it still. Reported, not hidden.
            pytest.xfail("KVM_GET_EMULATED_CPUID says E2BIG at exactly the needed size")
        # The 2010 API answered a too-large buffer with ENOMEM and nent set to
        # the real size; current kernels clamp and succeed. Both are conformant.
        assert exc.errno == errno.ENOMEM and extra > 0
        assert buf.nent == need
        return
    assert buf.nent == need


def test_significant_index_flag_marks_indexed_leaves(kvm: Kvm) -> None:
    table = kvm.supported_cpuid()
    for entry in table:
        if entry.indexed:
            assert entry.function in INDEXED_LEAVES, f"{entry.function:#x} flagged unexpectedly"
    # A leaf KVM enumerates by subleaf (leaf 7 always is) is flagged.
    leaf7 = [e for e in table if e.function == 7]
    assert leaf7 and all(e.indexed for e in leaf7)
