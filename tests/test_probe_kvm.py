"""The raw-KVM probe on the real /dev/kvm: the guest must see what
KVM_SET_CPUID2 was given (on leaves every host here honours), the timeout
must stop a guest that spins, and nothing may leak."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from kvmcpuid_virt.analysis.backend import Backend
from kvmcpuid_virt.cpuid.table import CpuidTable
from kvmcpuid_virt.errors import ProbeError, ProbeTimeoutError
from kvmcpuid_virt.kvm import Kvm
from kvmcpuid_virt.probe import image
from kvmcpuid_virt.probe.kvm import KvmProbe, run_kvm
from tests.conftest import spin_image

LAHF_LM = 1 << 0  # CPUID 0x80000001 ECX[0]
KVM_FEATURE_CLOCKSOURCE = 1 << 0  # CPUID 0x40000001 EAX[0]


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def supported(kvm: Kvm) -> CpuidTable:
    return kvm.supported_cpuid()


@pytest.fixture
def probe(kvm: Kvm) -> Iterator[KvmProbe]:
    with KvmProbe(kvm=kvm) as p:
        yield p


def _with(table: CpuidTable, leaf: int, sub: int, **regs: int) -> CpuidTable:
    entry = table.lookup(leaf, sub)
    assert entry is not None, f"table has no leaf {leaf:#x}"
    return table.replace_entry(entry.replace(**regs))




def _chatter_image() -> bytes:
    a = image.Asm()
    a.emit(image.mov_r16_imm16(image.DX, image.COM1))
    a.label("loop")
    a.emit(image.out_dx_al())
    a.jmp_short("loop")
    return image.flat_image(a.assemble())


def test_guest_sees_the_supported_table(probe: KvmProbe, supported: CpuidTable) -> None:
    queries = image.default_queries(supported)
    result = probe.run(supported, queries)
    assert result.backend is Backend.KVM
    assert result.observed.keys() == queries
    assert result.vmm_view is not None
    # What the guest read equals what KVM says the vCPU answers from, for
    # every queried leaf KVM_GET_CPUID2 holds.
    for leaf, sub in queries:
        entry = result.vmm_view.lookup(leaf, sub)
        if entry is not None and leaf not in (1, 0xB, 0x8000001E):  # APIC IDs
            assert result.observed.lookup(leaf, sub).regs() == entry.regs(), hex(leaf)  # type: ignore[union-attr]


def test_leaf0_vendor_and_max_leaf_follow_table(probe: KvmProbe, supported: CpuidTable) -> None:
    vendor = b"GenuineIntel"
    ebx, edx, ecx = (int.from_bytes(vendor[i : i + 4], "little") for i in (0, 4, 8))
    table = _with(supported, 0, 0, eax=0xB, ebx=ebx, ecx=ecx, edx=edx)
    leaf0 = probe.run(table, [(0, 0)]).observed.lookup(0)
    assert leaf0 is not None
    assert (leaf0.eax, leaf0.ebx, leaf0.ecx, leaf0.edx) == (0xB, ebx, ecx, edx)


@pytest.mark.parametrize("on", [False, True])
def test_extended_bit_follows_table(probe: KvmProbe, supported: CpuidTable, on: bool) -> None:
    ecx = supported.get(0x80000001, 0, "ecx")
    ecx = ecx | LAHF_LM if on else ecx & ~LAHF_LM
    result = probe.run(_with(supported, 0x80000001, 0, ecx=ecx), [(0x80000001, 0)])
    assert bool(result.observed.get(0x80000001, 0, "ecx") & LAHF_LM) is on
    assert result.observed.get(0x80000001, 0, "ecx") == ecx


def test_kvm_paravirt_bit_follows_table(probe: KvmProbe, supported: CpuidTable) -> None:
    if supported.lookup(0x40000001) is None:
        pytest.skip("this KVM reports no leaf 0x40000001")
    eax = supported.get(0x40000001, 0, "eax") & ~KVM_FEATURE_CLOCKSOURCE
    result = probe.run(_with(supported, 0x40000001, 0, eax=eax), [(0x40000001, 0)])
    assert result.observed.get(0x40000001, 0, "eax") == eax


def test_one_shot_run_kvm(supported: CpuidTable) -> None:
    before = _fds()
    ecx = supported.get(0x80000001, 0, "ecx") & ~LAHF_LM
    result = run_kvm(_with(supported, 0x80000001, 0, ecx=ecx), [(0, 0), (0x80000001, 0)])
    assert result.observed.get(0x80000001, 0, "ecx") & LAHF_LM == 0
    assert _fds() == before


def test_many_configurations_across_vm_recycling(kvm: Kvm, supported: CpuidTable) -> None:
    # 3 vCPUs per VM: runs 4 and 7 land in fresh VMs; each run gets its table.
    with KvmProbe(kvm=kvm, vcpus_per_vm=3) as probe:
        for i in range(8):
            eax = 0x80000000 + 8 + (i % 3)
            result = probe.run(_with(supported, 0x80000000, 0, eax=eax), [(0x80000000, 0)])
            assert result.observed.get(0x80000000, 0, "eax") == eax


def test_query_list_change_rewrites_image(probe: KvmProbe, supported: CpuidTable) -> None:
    a = probe.run(supported, [(0, 0)]).observed
    b = probe.run(supported, [(0x80000000, 0), (0, 0)]).observed
    assert a.keys() == [(0, 0)] and b.keys() == [(0x80000000, 0), (0, 0)]


def test_timeout_stops_a_spinning_guest(probe: KvmProbe, supported: CpuidTable) -> None:
    start = time.monotonic()
    with pytest.raises(ProbeTimeoutError, match=r"did not finish within 0\.3 s"):
        probe.run_image(supported, spin_image(), timeout=0.3)
    assert time.monotonic() - start < 2.0
    # The session still works after a timeout, and no kick is left pending.
    assert probe.run(supported, [(0, 0)], timeout=2.0).observed.lookup(0) is not None
    assert signal.SIGURG not in signal.sigpending()
    assert signal.SIGURG not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_timeout_in_a_worker_thread(supported: CpuidTable) -> None:
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with KvmProbe() as p:
                p.run_image(supported, spin_image(), timeout=0.2)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=work)
    t.start()
    t.join(5)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], ProbeTimeoutError)


def test_guest_that_never_stops_writing(probe: KvmProbe, supported: CpuidTable) -> None:
    with pytest.raises(ProbeError, match="more than"):
        probe.run_image(supported, _chatter_image(), timeout=5.0, limit=10_000)


def test_ctrl_c_interrupts_a_spinning_guest(supported: CpuidTable) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("SIGINT reaches Python handlers only in the main thread")
    before = _fds()
    main = threading.get_ident()
    timer = threading.Timer(0.2, signal.pthread_kill, (main, signal.SIGINT))
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt), KvmProbe() as p:
        timer.start()
        p.run_image(supported, spin_image(), timeout=30)
    timer.join()
    assert time.monotonic() - start < 5
    assert _fds() == before


def test_nothing_leaks(supported: CpuidTable) -> None:
    with KvmProbe() as warm:  # threads and caches that live for the process
        warm.run(supported, [(0, 0)])
    before = _fds()
    threads = threading.active_count()
    for _ in range(3):
        with KvmProbe(vcpus_per_vm=2) as p:
            for _ in range(5):
                p.run(supported, image.default_queries(supported))
            with pytest.raises(ProbeTimeoutError):
                p.run_image(supported, spin_image(), timeout=0.05)
    assert _fds() == before
    assert threading.active_count() == threads
