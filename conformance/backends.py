"""Boot many configurations on one backend in a batch: the suite computes
every guest of a backend once per session (session fixtures) and each test
only looks its result up.

A Case is one configuration in every form a backend takes (the table raw
KVM sets, the -cpu value, the <cpu> element) plus the table the guest should
see. Errors are kept per case (a QEMU that refuses a configuration fails that
case's test, not the batch).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import os
import time
from collections.abc import Callable, Sequence
from typing import Final

from kvmcpuid_virt.analysis.backend import Backend
from kvmcpuid_virt.config.cpuconfig import CpuConfig
from kvmcpuid_virt.cpuid.table import CpuidTable
from kvmcpuid_virt.errors import KvmcpuidError
from kvmcpuid_virt.probe import image
from kvmcpuid_virt.probe.result import ProbeResult
from kvmcpuid_virt.toolfacts.facts import ToolFacts

__all__ = ["BACKENDS", "Batch", "Case", "make_case", "run_kvm_cases", "run_libvirt_cases",
           "run_qemu_cases"]

BACKENDS: Final[tuple[Backend, ...]] = tuple(Backend)
TIMEOUT: Final = 20.0


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    config: CpuConfig
    expected: CpuidTable
    qemu_cpu: str
    libvirt_cpu: str
    queries: tuple[tuple[int, int], ...]
    # backend -> why the adapter could not render this configuration
    render_errors: dict[Backend, str] = dataclasses.field(default_factory=dict)


def make_case(case_id: str, config: CpuConfig, facts: ToolFacts) -> Case:
    """Render `config` with the adapters, looked up at call time so that a
    mutant adapter patched into the module is what gets rendered."""
    errors: dict[Backend, str] = {}

    def render(backend: Backend, module: str) -> str:
        adapter = importlib.import_module(module)
        try:
            if backend == Backend.QEMU:
                text: str = adapter.cpu_value(config)
            else:
                text = adapter.render(config, adapter.base_model(config, facts))
        except KvmcpuidError as exc:
            errors[backend] = f"the {backend} adapter cannot render it: {exc}"
            return ""
        return text

    qemu_cpu = render(Backend.QEMU, "kvmcpuid_virt.adapters.qemu")
    libvirt_cpu = render(Backend.LIBVIRT, "kvmcpuid_virt.adapters.libvirt")
    return Case(case_id, config, config.expected, qemu_cpu, libvirt_cpu,
                tuple(image.default_queries(config.expected)), errors)


@dataclasses.dataclass
class Batch:
    """Per case id: the guest's result, or why there is none."""

    backend: Backend
    results: dict[str, ProbeResult] = dataclasses.field(default_factory=dict)
    errors: dict[str, str] = dataclasses.field(default_factory=dict)
    render_errors: dict[str, str] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)

    def get(self, case_id: str) -> ProbeResult:
        """The result, or AssertionError naming why the guest did not run."""
        if case_id in self.results:
            return self.results[case_id]
        if case_id in self.render_errors:
            from conformance.checks import KNOWN_RENDER_GAPS, KnownGap

            why = self.render_errors[case_id]
            known = any(b == self.backend and text in why for b, text in KNOWN_RENDER_GAPS)
            raise (KnownGap if known else AssertionError)(f"{self.backend}: {case_id}: {why}")
        raise AssertionError(f"{self.backend}: {case_id}: the guest did not run: "
                             f"{self.errors.get(case_id, 'not in the batch')}")


def run_kvm_cases(cases: Sequence[Case]) -> Batch:
    """Raw KVM: KVM_SET_CPUID2 with each case's expected table, one VM
    session, vCPUs pinned to one CPU (per-CPU fields then agree between runs)."""
    from conformance.hostcpuid import pinned
    from kvmcpuid_virt.probe.kvm import KvmProbe

    batch = Batch(Backend.KVM)
    start = time.perf_counter()
    with pinned(), KvmProbe() as probe:
        for case in cases:
            try:
                batch.results[case.id] = probe.run(case.expected, case.queries, TIMEOUT)
            except KvmcpuidError as exc:
                batch.errors[case.id] = str(exc)
    batch.seconds = time.perf_counter() - start
    return batch


def _renderable(batch: Batch, cases: Sequence[Case]) -> list[Case]:
    for c in cases:
        if batch.backend in c.render_errors:
            batch.render_errors[c.id] = c.render_errors[batch.backend]
    return [c for c in cases if batch.backend not in c.render_errors]


def _parallel(backend: Backend, cases: Sequence[Case], run: Callable[[Case], ProbeResult],
              workers: int) -> Batch:
    batch = Batch(backend)
    cases = _renderable(batch, cases)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(run, case): case.id for case in cases}
        for fut in concurrent.futures.as_completed(futures):
            case_id = futures[fut]
            try:
                batch.results[case_id] = fut.result()
            except KvmcpuidError as exc:
                batch.errors[case_id] = f"{type(exc).__name__}: {exc}"
    batch.seconds = time.perf_counter() - start
    batch.notes.append(f"{len(cases)} guests, {workers} at a time, {batch.seconds:.1f} s")
    return batch


def workers() -> int:
    """Guests booted at a time: one per CPU (a QEMU start is CPU-bound)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


def run_qemu_cases(cases: Sequence[Case], qemu: str) -> Batch:
    from kvmcpuid_virt.probe.qemu import run_qemu

    return _parallel(Backend.QEMU, cases,
                     lambda c: run_qemu(c.qemu_cpu, c.queries, TIMEOUT, qemu), workers())


# Each libvirt guest spends ~0.2 s in libvirt's stop poll and ~0.3 s of its
# start in libvirt's per-property CPU read-back, both mostly waiting: many
# guests in flight hide that (each worker thread has its own connection, see
# LibvirtProbe._connection). Whole suite on 2 CPUs: 6 at a time 19.2 s,
# 8: 18.8 s, 16: 17.8 s.
LIBVIRT_PARALLEL: Final = 16


def run_libvirt_cases(cases: Sequence[Case], uri: str, *,
                      keep_failed_logs: bool = True) -> Batch:
    """libvirt: LIBVIRT_PARALLEL transient domains in flight. keep_failed_logs:
    False where failures are the point (the mutants), so no libvirt log of
    them stays behind."""
    from kvmcpuid_virt.probe.libvirt import LibvirtProbe

    with LibvirtProbe(uri, keep_failed_logs=keep_failed_logs) as probe:
        return _parallel(Backend.LIBVIRT, cases,
                         lambda c: probe.run(c.libvirt_cpu, c.queries, TIMEOUT),
                         LIBVIRT_PARALLEL)
