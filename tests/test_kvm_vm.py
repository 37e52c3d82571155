"""Vm and Vcpu on the real /dev/kvm: lifecycle, registers, CPUID tables,
a first KVM_RUN, and that closing releases every fd and mapping."""

from __future__ import annotations

import os

import pytest

from kvmcpuid_virt.cpuid.table import CpuidTable
from kvmcpuid_virt.errors import KvmIoctlError
from kvmcpuid_virt.kvm import Kvm
from kvmcpuid_virt.kvm.abi import ExitReason
from kvmcpuid_virt.kvm.vm import GuestMemory, Vcpu, Vm
from kvmcpuid_virt.probe import image

# KVM keeps leaf 1 (APIC, OSXSAVE), 7 (OSPKE) and 0xD (XSAVE sizes) in step
# with vCPU state, and the outer hypervisor of some hosts here rewrites those
# leaves in KVM_GET_CPUID2 too (see hostcontrol.py): compare the others exactly.
RUNTIME_LEAVES = {1, 7, 0xD}


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def test_vm_and_vcpu_are_kvm_fds(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        assert isinstance(vm, Vm)
        vcpu = vm.create_vcpu(0)
        assert isinstance(vcpu, Vcpu)
        assert vcpu.fd != vm.fd
        assert vm.vcpu_mmap_size >= 4096
        # The kernel opens both anon-inode fds O_CLOEXEC.
        for fd in (vm.fd, vcpu.fd):
            assert not os.get_inheritable(fd)
    assert vm.closed and vcpu.closed


def test_reset_state_is_the_reset_vector(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        regs = vcpu.get_regs()
        sregs = vcpu.get_sregs()
        assert regs.rip == 0xFFF0
        assert sregs.cs.base == 0xFFFF0000
        assert sregs.cs.selector == 0xF000
        regs.rax = 0x1234_5678_9ABC_DEF0
        vcpu.set_regs(regs)
        assert vcpu.get_regs().rax == 0x1234_5678_9ABC_DEF0
        sregs.ds.base = 0x5000
        vcpu.set_sregs(sregs)
        assert vcpu.get_sregs().ds.base == 0x5000


def test_cpuid2_roundtrip_and_nent_negotiation(kvm: Kvm) -> None:
    supported = kvm.supported_cpuid()
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid2(supported)
        back_big = vcpu.get_cpuid2()
        back_small = vcpu.get_cpuid2(first_nent=1)  # E2BIG, then grow
        assert back_big == back_small
        assert back_big.keys() == supported.keys()
        for got, want in zip(back_big, supported, strict=True):
            if got.function not in RUNTIME_LEAVES:
                assert got == want


def test_get_cpuid2_of_fresh_vcpu_is_empty(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        assert vm.create_vcpu(0).get_cpuid2() == CpuidTable()


def test_run_to_hlt(kvm: Kvm) -> None:
    code = image.hlt()
    with GuestMemory(image.IMAGE_SIZE, image.flat_image(code)) as mem, kvm.create_vm() as vm:
        vm.set_user_memory_region(0, (1 << 32) - image.IMAGE_SIZE, mem, readonly=True)
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid2(kvm.supported_cpuid())
        assert vcpu.run() == ExitReason.HLT
        assert vcpu.get_regs().rip == 1  # after the hlt at offset 0


def test_run_reports_port_writes(kvm: Kvm) -> None:
    a = image.Asm()
    a.emit(image.mov_r16_imm16(image.DX, image.COM1))
    a.emit(image.mov_al_imm8(0x5A))
    a.emit(image.out_dx_al())
    a.emit(image.hlt())
    with GuestMemory(image.IMAGE_SIZE, image.flat_image(a.assemble())) as mem, \
            kvm.create_vm() as vm:
        vm.set_user_memory_region(0, (1 << 32) - image.IMAGE_SIZE, mem, readonly=True)
        vcpu = vm.create_vcpu(0)
        assert vcpu.run() == ExitReason.IO
        direction, size, port, data = vcpu.exit_io()
        assert (direction, size, port, data) == (1, 1, image.COM1, b"\x5a")
        assert vcpu.run() == ExitReason.HLT


def test_coalesced_pio_collects_bytes(kvm: Kvm) -> None:
    a = image.Asm()
    a.emit(image.mov_r16_imm16(image.DX, image.COM1))
    for byte in b"coalesced":
        a.emit(image.mov_al_imm8(byte))
        a.emit(image.out_dx_al())
    a.emit(image.hlt())
    with GuestMemory(image.IMAGE_SIZE, image.flat_image(a.assemble())) as mem, \
            kvm.create_vm() as vm:
        if not vm.register_coalesced_pio(image.COM1, 1):
            pytest.skip("this KVM lacks KVM_CAP_COALESCED_PIO")
        vm.set_user_memory_region(0, (1 << 32) - image.IMAGE_SIZE, mem, readonly=True)
        vcpu = vm.create_vcpu(0)
        assert vcpu.run() == ExitReason.HLT  # no exit per byte
        assert vcpu.drain_coalesced() == b"coalesced"
        assert vcpu.drain_coalesced() == b""


def test_set_tss_addr_range(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        vm.set_tss_addr(0x7FFF_C000)
        with pytest.raises(ValueError, match="below 2 GiB"):
            vm.set_tss_addr(0xFFFB_D000)


def test_ioctl_errors_are_kvm_errors(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        vm.create_vcpu(0)
        with pytest.raises(KvmIoctlError, match="KVM_CREATE_VCPU"):
            vm.create_vcpu(0)  # the same id twice: EEXIST


def test_close_releases_fds_and_mappings(kvm: Kvm) -> None:
    before_fds, before_maps = _fds(), _maps()
    for _ in range(5):
        vm = kvm.create_vm()
        with GuestMemory(image.IMAGE_SIZE) as mem:
            vm.set_user_memory_region(0, 0x10000, mem)
            for i in range(3):
                vm.create_vcpu(i)
            assert _fds() > before_fds
            vm.close()
    assert _fds() == before_fds
    assert _maps() == before_maps


def test_close_with_a_live_kvm_run_view(kvm: Kvm) -> None:
    before = _fds()
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    view = vcpu.kvm_run
    vm.close()  # must not raise although `view` pins the mapping
    assert vcpu.closed
    del view
    assert _fds() == before
