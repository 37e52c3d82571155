"""Dynamic XSAVE components (AMX tile data): the process asks the kernel with
arch_prctl before KVM reports or accepts them for a guest.

The real arch_prctl is checked on this machine's kernel; an AMX host (which
this AMD machine is not) is simulated through the injectable prctl and ioctl
functions, and those tests are named for what they simulate. Facts: XCR0 bit 0
(x87) and bit 1 (SSE) are always supported (Intel SDM Vol. 1, 13.3); AMX-TILE
is CPUID.7.0:EDX[24], tile config and data are XSAVE components 17 and 18."""

from __future__ import annotations

import errno

import pytest

from kvmcpuid_virt.cpuid.table import CpuidEntry, CpuidTable, EntryFlag
from kvmcpuid_virt.errors import KvmError
from kvmcpuid_virt.kvm import Kvm, xstate
from tests.test_kvm_simulated_kernels import SimulatedKernel

X87_SSE = 0b11
TILE_CFG, TILE_DATA = 1 << 17, 1 << 18
AMX_TILE = 1 << 24


def test_real_guest_permission_covers_every_static_component(kvm: Kvm) -> None:
    permitted = xstate.guest_permitted()
    if permitted is None:
        pytest.skip("this kernel predates ARCH_GET_XCOMP_GUEST_PERM (Linux 5.16)")
    _, supported = xstate._real_prctl(xstate.ARCH_GET_XCOMP_SUPP, 0, True)
    assert permitted & X87_SSE == X87_SSE
    # Only dynamic components need asking for; every other one is permitted.
    assert supported & ~xstate.DYNAMIC_XFEATURES == permitted & ~xstate.DYNAMIC_XFEATURES
    # What KVM offers a guest in leaf 0xD is what this process may give.
    assert xstate.xcr0_of(kvm.supported_cpuid()) & ~permitted == 0


def test_real_table_without_amx_asks_for_nothing(kvm: Kvm) -> None:
    table = kvm.supported_cpuid()
    if table.get(7, 0, "edx") & AMX_TILE:
        pytest.skip("this host's KVM offers AMX")
    assert not xstate.wants_dynamic_xfeatures(table)
    assert xstate.request_for_table(table) is False


class SimulatedAmxHost:
    """arch_prctl of a kernel on an AMX CPU (components 0-2, 17, 18), and a
    KVM whose leaf 0xD shows tile data only once the process asked."""

    def __init__(self, guest_perm_op: bool = True) -> None:
        self.supported = X87_SSE | 0b100 | TILE_CFG | TILE_DATA
        self.permitted = self.supported & ~TILE_DATA
        self.guest_perm_op = guest_perm_op
        self.requests: list[int] = []

    def prctl(self, code: int, arg: int, out: bool) -> tuple[int, int]:
        if not self.guest_perm_op and code in (xstate.ARCH_GET_XCOMP_GUEST_PERM,
                                               xstate.ARCH_REQ_XCOMP_GUEST_PERM):
            raise OSError(errno.EINVAL, "simulated: no such arch_prctl")
        if code == xstate.ARCH_GET_XCOMP_SUPP:
            return 0, self.supported
        if code == xstate.ARCH_GET_XCOMP_GUEST_PERM:
            return 0, self.permitted
        if code == xstate.ARCH_REQ_XCOMP_GUEST_PERM:
            self.requests.append(arg)
            self.permitted |= 1 << arg
            return 0, 0
        raise OSError(errno.EINVAL, "simulated: unknown arch_prctl")

    def table(self) -> CpuidTable:
        # Tile config is left out with tile data, as Linux does since 6.4.
        shown = self.permitted if self.permitted & TILE_DATA else self.permitted & ~TILE_CFG
        return CpuidTable([
            CpuidEntry(0, 0, EntryFlag.NONE, 0xD, 0x756E6547, 0x6C65746E, 0x49656E69),
            CpuidEntry(7, 0, EntryFlag.SIGNIFICANT_INDEX, 0, 0, 0, AMX_TILE),
            CpuidEntry(0xD, 0, EntryFlag.SIGNIFICANT_INDEX, shown & 0xFFFF_FFFF, 0, 0, 0),
        ])


class _Kernel(SimulatedKernel):
    def __init__(self, host: SimulatedAmxHost) -> None:
        super().__init__(host.table())
        self.host = host

    def _get_cpuid(self, buf: object) -> int:
        self.table = self.host.table()  # leaf 0xD follows the permission
        return super()._get_cpuid(buf)


def test_simulated_amx_host_supported_cpuid_asks_for_tile_data_and_rereads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host = SimulatedAmxHost()
    monkeypatch.setattr(xstate, "_prctl", host.prctl)
    with Kvm("/dev/null", ioctl=_Kernel(host)) as kvm:
        table = kvm.supported_cpuid()
    assert host.requests == [xstate.XFEATURE_XTILE_DATA]
    assert xstate.xcr0_of(table) & (TILE_CFG | TILE_DATA) == TILE_CFG | TILE_DATA
    # Asked once per process: a second read asks nothing more.
    with Kvm("/dev/null", ioctl=_Kernel(host)) as kvm:
        kvm.supported_cpuid()
    assert host.requests == [xstate.XFEATURE_XTILE_DATA]


def test_simulated_kernel_without_guest_permission_op_is_left_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host = SimulatedAmxHost(guest_perm_op=False)
    monkeypatch.setattr(xstate, "_prctl", host.prctl)
    with Kvm("/dev/null", ioctl=_Kernel(host)) as kvm:
        table = kvm.supported_cpuid()
    assert host.requests == [] and not xstate.xcr0_of(table) & TILE_DATA


def test_simulated_amx_guest_table_gets_permission_before_set_cpuid2(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A table with tile data from a dump (another process asked, not this one).
    host = SimulatedAmxHost()
    monkeypatch.setattr(xstate, "_prctl", host.prctl)
    guest = CpuidTable([CpuidEntry(0xD, 0, EntryFlag.SIGNIFICANT_INDEX,
                                   X87_SSE | TILE_CFG | TILE_DATA, 0, 0, 0)])
    assert xstate.request_for_table(guest) is True
    assert host.requests == [xstate.XFEATURE_XTILE_DATA]
    assert xstate.request_for_table(guest) is False  # already granted


def test_simulated_refused_permission_is_one_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host = SimulatedAmxHost()

    def refuse(code: int, arg: int, out: bool) -> tuple[int, int]:
        if code == xstate.ARCH_REQ_XCOMP_GUEST_PERM:
            raise OSError(errno.EPERM, "simulated: sigaltstack too small")
        return host.prctl(code, arg, out)

    monkeypatch.setattr(xstate, "_prctl", refuse)
    guest = CpuidTable([CpuidEntry(0xD, 0, EntryFlag.SIGNIFICANT_INDEX, TILE_DATA, 0, 0, 0)])
    with pytest.raises(KvmError, match=r"ARCH_REQ_XCOMP_GUEST_PERM, 18\) failed"):
        xstate.request_for_table(guest)
