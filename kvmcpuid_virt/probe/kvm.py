"""The raw-KVM probe backend: boot the CPUID image in a bare vCPU, no QEMU.

A vCPU starts at the reset vector in real mode (CS base 0xFFFF0000, IP
0xFFF0), so the only setup is one read-only memory slot holding the image at
4 GiB - 64 KiB, KVM_SET_CPUID2 with the table under test, and a loop that
collects COM1 writes until the guest writes to isa-debug-exit (0xF4) or halts.

Speed (nested KVM here: a userspace exit costs ~10 us, so one exit per serial
byte would cost 12-25 ms per run):
- COM1 is a 1-byte coalesced PIO zone: KVM queues the guest's bytes in a ring
  and exits to userspace only when the ring (170 entries) is full;
- a KvmProbe session reuses one VM for many configurations, each on a fresh
  vCPU (CPUID is per vCPU; KVM refuses to change it after the first KVM_RUN),
  because destroying a VM with a coalesced zone waits for an SRCU grace period
  (~15 ms here);
- the image is built once per query list and rewritten in place only when
  the list changes.

Timeout: a watchdog thread, armed around every run, sets kvm_run.immediate_exit
and sends SIGURG to the vCPU thread. SIGURG is blocked in that thread outside
KVM_RUN and unblocked inside it (KVM_SET_SIGNAL_MASK), so the signal cannot be
lost (a blocked signal is never discarded, even with SIGURG's default "ignore")
and is never delivered: KVM_RUN returns EINTR and the pending signal is
consumed with sigtimedwait. No Python signal handler is needed, so any thread
may probe; SIGINT and SIGTERM stay unblocked during KVM_RUN and interrupt it
(cli raises KeyboardInterrupt or Terminated for them). The steps that must
not be cut in two by them (the signal mask and the kick put back, the vCPU,
VM, memory and watchdog released) run in process.signals_deferred().
"""

from __future__ import annotations

import errno
import logging
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import Final

from kvmcpuid_virt.analysis.backend import Backend
from kvmcpuid_virt.cpuid.table import CpuidTable
from kvmcpuid_virt.errors import KvmIoctlError, ProbeError, ProbeTimeoutError
from kvmcpuid_virt.kvm.abi import EXIT_REASONS, KVM_EXIT_IO_OUT, Cap, ExitReason
from kvmcpuid_virt.kvm.system import Kvm
from kvmcpuid_virt.kvm.vm import GuestMemory, Vcpu, Vm
from kvmcpuid_virt.probe import image, smp_image
from kvmcpuid_virt.probe.result import ProbeResult
from kvmcpuid_virt.process import signals_deferred

__all__ = ["IMAGE_BASE", "KICK_SIGNAL", "KvmProbe", "run_kvm", "run_kvm_smp"]

log = logging.getLogger(__name__)

IMAGE_BASE: Final = (1 << 32) - image.IMAGE_SIZE
# Three pages of unused guest-physical space for Intel's real-mode TSS (a
# no-op on AMD); below 2 GiB because fcntl.ioctl passes it as a C int.
TSS_ADDR: Final = 0x7FFF_C000
KICK_SIGNAL: Final = signal.SIGURG
# Ports the image writes to end its run (isa-debug-exit, keyboard-controller
# and PCI reset requests).
_STOP_PORTS: Final = frozenset({image.DEBUG_EXIT_PORT, 0x64, 0xCF9})
# A guest that keeps writing is broken; bound the memory it can make us use.
_SERIAL_SLACK: Final = 1 << 16
DEFAULT_VCPUS_PER_VM: Final = 64
# How long close() waits for the watchdog thread to stop.
_JOIN_TIMEOUT: Final = 2.0


class _Watchdog:
    """One daemon thread that kicks an armed vCPU out of KVM_RUN at its
    deadline. arm() and disarm() bracket a run; no kick is sent after
    disarm() returns."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: tuple[float, int, Vcpu] | None = None
        self.fired = False
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="kvm-probe-watchdog",
                                        daemon=True)
        self._thread.start()

    # signals_deferred() around `with self._cond`: a signal's exception
    # raised inside Condition.__enter__, once the lock is taken, would leave
    # it taken, and the watchdog (and close()'s join) waiting on it forever.

    def arm(self, deadline: float, vcpu: Vcpu) -> None:
        with signals_deferred(), self._cond:
            self._armed = (deadline, threading.get_ident(), vcpu)
            self.fired = False
            self._cond.notify()

    def disarm(self) -> bool:
        """Stop watching; True if the watchdog fired during this run."""
        with signals_deferred(), self._cond:
            self._armed = None
            return self.fired

    def _loop(self) -> None:
        with self._cond:
            while not self._stop:
                if self._armed is None:
                    self._cond.wait()
                    continue
                deadline, tid, vcpu = self._armed
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    self._cond.wait(remaining)
                    continue
                # immediate_exit covers a thread between runs; the signal one
                # inside KVM_RUN (it stays pending until consumed).
                vcpu.set_immediate_exit(True)
                signal.pthread_kill(tid, KICK_SIGNAL)
                self.fired = True
                self._armed = None

    def close(self) -> None:
        with signals_deferred():
            with self._cond:
                self._stop = True
                self._armed = None
                self._cond.notify()
            # Bounded: the thread is a daemon, and a close() that cannot
            # finish must not hang the tool on its way out.
            self._thread.join(_JOIN_TIMEOUT)
            if self._thread.is_alive():
                log.warning("the raw-KVM probe's watchdog thread did not stop")


class KvmProbe:
    """A raw-KVM probe session: reuses the /dev/kvm fd, one VM (for up to
    `vcpus_per_vm` runs), the guest memory and the watchdog thread across
    runs. A context manager; close() releases every fd, mapping and thread.

    `coalesce=False` takes one userspace exit per serial byte (slower runs,
    but the VM closes in ~0.5 ms instead of an SRCU grace period).
    Not thread-safe: one session per thread (sessions may run in parallel)."""

    def __init__(self, *, kvm: Kvm | None = None, vcpus_per_vm: int = DEFAULT_VCPUS_PER_VM,
                 coalesce: bool = True) -> None:
        self._own_kvm = kvm is None
        self._kvm: Kvm | None = None
        self._memory: GuestMemory | None = None
        self._watchdog: _Watchdog | None = None
        self._vm: Vm | None = None
        self._loaded: bytes | None = None
        self._next_vcpu = 0
        self.coalesce = coalesce
        try:
            self._kvm = kvm if kvm is not None else Kvm()
            limit = self._kvm.check_extension(Cap.MAX_VCPUS) or 1
            self.vcpus_per_vm = max(1, min(vcpus_per_vm, limit))
            self._memory = GuestMemory(image.IMAGE_SIZE)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> KvmProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with signals_deferred():  # a watchdog left running would kick a closed vCPU
            vm, self._vm = self._vm, None
            watchdog, self._watchdog = self._watchdog, None
            memory, self._memory = self._memory, None
            kvm, self._kvm = self._kvm, None
            try:
                if vm is not None:
                    vm.close()
                if watchdog is not None:
                    watchdog.close()
            finally:
                if memory is not None:
                    memory.close()
                if kvm is not None and self._own_kvm:
                    kvm.close()

    def _ensure_vm(self, img: bytes) -> Vm:
        if self._kvm is None or self._memory is None:
            raise ProbeError("KvmProbe is closed")
        if self._vm is not None and self._next_vcpu >= self.vcpus_per_vm:
            vm, self._vm = self._vm, None
            vm.close()
        if self._vm is None:
            vm = self._kvm.create_vm()
            try:
                vm.set_tss_addr(TSS_ADDR)
                vm.set_user_memory_region(0, IMAGE_BASE, self._memory, readonly=True)
                if self.coalesce:
                    vm.register_coalesced_pio(image.COM1, 1)
            except BaseException:
                vm.close()
                raise
            self._vm = vm
            self._next_vcpu = 0
        if self._loaded is not img and self._loaded != img:
            if len(img) != image.IMAGE_SIZE:
                raise ValueError(f"a guest image is {image.IMAGE_SIZE} bytes, not {len(img)}")
            # No vCPU runs now; KVM sees the new bytes through the same pages.
            self._memory.buffer[:] = img
            self._loaded = img
        return self._vm

    def run(self, table: CpuidTable, queries: Sequence[tuple[int, int]],
            timeout: float = 5.0, *, msrs: Mapping[int, int] | None = None,
            msr_queries: Sequence[image.MsrQuery] = ()) -> ProbeResult:  # fmt: skip
        """Boot the image on a fresh vCPU configured with `table`; the guest's
        answers to `queries` and KVM_GET_CPUID2 of that vCPU. `msrs` are
        written with KVM_SET_MSRS before it runs (and read back); the guest
        reads the MSRs of `msr_queries` its CPUID says exist."""
        start = time.perf_counter()
        qs = tuple((int(leaf), int(sub)) for leaf, sub in queries)
        held: dict[int, int] = {}
        limit = image.frame_size(len(qs), len(msr_queries)) + _SERIAL_SLACK
        serial, vmm_view = self.run_image(table, image.build(qs, msr_queries), timeout,
                                          limit=limit, msrs=msrs, held=held)  # fmt: skip
        observed, read = image.parse_msrs(serial, qs, msr_queries)
        return ProbeResult(observed=observed, vmm_view=vmm_view,
                           seconds=time.perf_counter() - start, backend=Backend.KVM,
                           msrs=read, msr_set=None if msrs is None else dict(msrs),
                           msr_vmm=None if msrs is None else held)  # fmt: skip

    def run_image(self, table: CpuidTable, img: bytes, timeout: float = 5.0,
                  *, limit: int = _SERIAL_SLACK, msrs: Mapping[int, int] | None = None,
                  held: dict[int, int] | None = None) -> tuple[bytes, CpuidTable]:  # fmt: skip
        """Boot any 64 KiB image (see image.flat_image) on a fresh vCPU with
        `table`: its COM1 bytes and KVM_GET_CPUID2. ProbeTimeoutError if it
        runs longer than `timeout` seconds, ProbeError past `limit` bytes.
        `msrs`: KVM_SET_MSRS after KVM_SET_CPUID2 (a refused value is a
        ProbeError naming it); `held` receives KVM_GET_MSRS of them."""
        vm = self._ensure_vm(img)
        if self._watchdog is None:
            self._watchdog = _Watchdog()
        with signals_deferred():
            vcpu = vm.create_vcpu(self._next_vcpu)
            self._next_vcpu += 1
        try:
            vcpu.set_cpuid2(table)
            if msrs:
                order = list(msrs)
                took = vcpu.set_msrs(msrs)
                if took < len(order):
                    raise ProbeError(f"KVM_SET_MSRS refused MSR {order[took]:#x} = "
                                     f"{msrs[order[took]]:#x} on this vCPU")  # fmt: skip
                if held is not None:
                    held.update(vcpu.get_msrs(order))
            serial = self._run_vcpu(vcpu, self._watchdog, timeout, limit)
            return serial, vcpu.get_cpuid2()
        finally:
            with signals_deferred():
                vcpu.close()

    @staticmethod
    def _run_vcpu(vcpu: Vcpu, watchdog: _Watchdog, timeout: float, limit: int) -> bytes:
        with signals_deferred():
            old = signal.pthread_sigmask(signal.SIG_BLOCK, {KICK_SIGNAL})
        try:
            vcpu.set_signal_mask(old - {KICK_SIGNAL})
            deadline = time.monotonic() + timeout
            watchdog.arm(deadline, vcpu)
            try:
                return _run_loop(vcpu, watchdog, deadline, timeout, limit)
            finally:
                with signals_deferred():
                    if watchdog.disarm():
                        signal.sigtimedwait({KICK_SIGNAL}, 0)  # consume the kick
        finally:
            with signals_deferred():
                if KICK_SIGNAL not in old:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {KICK_SIGNAL})


def _run_loop(vcpu: Vcpu, watchdog: _Watchdog, deadline: float, timeout: float,
              limit: int) -> bytes:
    serial = bytearray()

    def timed_out() -> ProbeTimeoutError:
        return ProbeTimeoutError(
            f"raw-KVM guest did not finish within {timeout:g} s "
            f"({len(serial)} bytes of serial output)"
        )

    while True:
        try:
            reason = vcpu.run()
        except KvmIoctlError as exc:
            if exc.errno != errno.EINTR:
                raise
            serial += vcpu.drain_coalesced()
            if watchdog.fired or time.monotonic() >= deadline:
                raise timed_out() from None
            continue  # another signal; Python runs its handler (Ctrl-C) now
        serial += vcpu.drain_coalesced()
        if reason == ExitReason.IO:
            direction, _size, port, data = vcpu.exit_io()
            if direction == KVM_EXIT_IO_OUT:
                if port == image.COM1:
                    serial += data
                elif port in _STOP_PORTS:
                    return bytes(serial)
            # Other ports: ignored; an IN reads the zeroed data area.
        elif reason in (ExitReason.HLT, ExitReason.SHUTDOWN):
            return bytes(serial)
        else:
            rip = vcpu.get_regs().rip
            name = EXIT_REASONS.get(reason, str(reason))
            raise ProbeError(f"raw-KVM guest stopped with exit {name} at rip {rip:#x}")
        if len(serial) > limit:
            raise ProbeError(f"raw-KVM guest wrote more than {limit} bytes to COM1")
        if time.monotonic() >= deadline:
            raise timed_out()


def run_kvm(table: CpuidTable, queries: Sequence[tuple[int, int]], timeout: float = 5.0,
            *, probe: KvmProbe | None = None, msrs: Mapping[int, int] | None = None,
            msr_queries: Sequence[image.MsrQuery] = ()) -> ProbeResult:  # fmt: skip
    """Boot the image on raw KVM with `table` set by KVM_SET_CPUID2 (and
    `msrs` by KVM_SET_MSRS; the guest reads `msr_queries`: KvmProbe.run).

    Without `probe`: a fresh /dev/kvm fd, VM and vCPU, all closed before
    returning. Pass a KvmProbe to reuse them across many configurations."""
    if probe is not None:
        return probe.run(table, queries, timeout, msrs=msrs, msr_queries=msr_queries)
    # One run: skip the coalesced zone, whose VM teardown would cost more
    # than the per-byte exits it saves.
    with KvmProbe(vcpus_per_vm=1, coalesce=False) as one:
        return one.run(table, queries, timeout, msrs=msrs, msr_queries=msr_queries)


# The multi-vCPU image's RAM (its data segment at 0x1000, 64 KiB): 128 KiB from 0.
_SMP_RAM: Final = 0x2_0000


def run_kvm_smp(tables: Sequence[CpuidTable], queries: Sequence[tuple[int, int]],
                timeout: float = 5.0) -> smp_image.SmpResult:
    """The multi-vCPU image (probe/smp_image.py) on raw KVM, vCPU i with
    `tables[i]` (KVM_SET_CPUID2): no in-kernel irqchip, so there is no SIPI
    to send; each AP is started at the image's AP entry (KVM_SET_REGS) and
    run to its HLT, one after the other on this thread, then the BSP, which
    finds them done and writes every answer to COM1. A fresh VM, closed
    before returning; every vCPU run is bounded by `timeout`."""
    start = time.perf_counter()
    qs = [(int(leaf), int(sub)) for leaf, sub in queries]
    n = len(tables)
    blob = smp_image.build(qs, n, sipi=False)
    entry = smp_image.ap_entry(qs, n)
    limit = 16 * len(qs) * n + 64 + _SERIAL_SLACK
    with ExitStack() as stack:
        kvm = stack.enter_context(Kvm())
        rom = stack.enter_context(GuestMemory(image.IMAGE_SIZE, blob))
        ram = stack.enter_context(GuestMemory(_SMP_RAM))
        vm = stack.enter_context(kvm.create_vm())
        vm.set_tss_addr(TSS_ADDR)
        vm.set_user_memory_region(0, IMAGE_BASE, rom, readonly=True)
        vm.set_user_memory_region(1, 0, ram)
        watchdog = _Watchdog()
        stack.callback(watchdog.close)
        vcpus = []
        for i, table in enumerate(tables):
            with signals_deferred():
                vcpu = vm.create_vcpu(i)
                stack.callback(vcpu.close)
            vcpu.set_cpuid2(table)
            vcpus.append(vcpu)
        for vcpu in vcpus[1:]:
            regs = vcpu.get_regs()
            regs.rip = entry  # CS base stays the reset vector's 0xFFFF0000
            vcpu.set_regs(regs)
            KvmProbe._run_vcpu(vcpu, watchdog, timeout, _SERIAL_SLACK)
        serial = KvmProbe._run_vcpu(vcpus[0], watchdog, timeout, limit)
    found = smp_image.parse(serial, qs, n)
    return smp_image.SmpResult(tuple(found), n, time.perf_counter() - start)
