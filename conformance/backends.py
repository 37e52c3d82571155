"""Boot many configurations on one backend in a batch: the suite computes
every guest of a backend once per session (session fixtures) and each test
only looks its result up.

A Case is one configuration in every form a backend takes (the table raw
KVM sets, the -cpu value, the <cpu> element) plus the table the guest should
see. Errors are kept per case, in two kinds (kvmcpuid_virt.verify.could_not_run):
a backend refusing a configuration (QEMU exiting over its flags, libvirt
rejecting the domain) fails that case's test; the suite's machinery failing
(libvirtd refusing past its retries, a guest that did not finish in time)
makes it a CouldNotRun, an ERROR of the suite, never a CPUID failure.

libvirt guests share one AdaptiveLimit and one RetryStats per session
(LIBVIRT_LIMIT, LIBVIRT_STATS): the daemon's transient refusals are retried,
lower the number of guests in flight, and are counted for the report.
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
from kvmcpuid_virt.probe.retry import AdaptiveLimit, RetryStats
from kvmcpuid_virt.toolfacts.facts import ToolFacts
from kvmcpuid_virt.verify import could_not_run

__all__ = ["BACKENDS", "LIBVIRT_LIMIT", "LIBVIRT_PARALLEL", "LIBVIRT_STATS", "Batch", "Case",
           "CouldNotRun", "make_case", "run_kvm_cases", "run_libvirt_cases", "run_qemu_cases"]

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
    facts: ToolFacts | None = None  # what the adapters rendered it with


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
                tuple(image.default_queries(config.expected)), errors, facts)


class CouldNotRun(Exception):
    """The suite's machinery could not run a guest (its backend's
    could_not_run: libvirtd unreachable or refusing past its retries, a
    guest that did not finish in time, ...). Not an AssertionError: raised
    from a fixture it is a pytest ERROR, and the report shows the cell as
    "could not run" with the cause, never as a CPUID failure of the host."""


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


@dataclasses.dataclass
class Batch:
    """Per case id: the guest's result, or why there is none."""

    backend: Backend
    results: dict[str, ProbeResult] = dataclasses.field(default_factory=dict)
    errors: dict[str, str] = dataclasses.field(default_factory=dict)
    # case id -> why the suite's machinery could not run its guest
    could_not_run: dict[str, str] = dataclasses.field(default_factory=dict)
    # case id -> why the batch could not run it, for a guest run once more alone
    reruns: dict[str, str] = dataclasses.field(default_factory=dict)
    render_errors: dict[str, str] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)

    def fail(self, case_id: str, exc: BaseException) -> None:
        """Keep why `case_id`'s guest has no result, in its kind."""
        kind = self.could_not_run if could_not_run(exc) else self.errors
        kind[case_id] = _error_text(exc)

    def require(self, case_ids: Sequence[str]) -> None:
        """CouldNotRun when the machinery could not run one of these guests."""
        for case_id in case_ids:
            if case_id in self.could_not_run:
                raise CouldNotRun(f"{self.backend}: {case_id}: the guest could not run: "
                                  f"{self.could_not_run[case_id]}")

    def get(self, case_id: str) -> ProbeResult:
        """The result; CouldNotRun when the suite's machinery could not run
        the guest; else AssertionError naming why the backend did not run it."""
        if case_id in self.results:
            return self.results[case_id]
        self.require([case_id])
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
        def run(case: Case) -> ProbeResult:
            result: ProbeResult = probe.run(case.expected, case.queries, TIMEOUT)
            return result

        for case in cases:
            try:
                batch.results[case.id] = run(case)
            except KvmcpuidError as exc:
                batch.fail(case.id, exc)
        _rerun_alone(batch, cases, run)
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
                batch.fail(case_id, exc)
    batch.notes.append(f"{len(cases)} guests, {workers} at a time, "
                       f"{time.perf_counter() - start:.1f} s")
    _rerun_alone(batch, cases, run)
    batch.seconds = time.perf_counter() - start
    return batch


def _rerun_alone(batch: Batch, cases: Sequence[Case], run: Callable[[Case], ProbeResult]) -> None:
    """Guests the machinery could not run among many (a guest that did not
    finish in time on a loaded host, seen at a load average of 24 on 2 CPUs)
    get one more run each, alone: what the batch found is kept in
    `batch.reruns`, and a guest that fails again stays "could not run"."""
    again = [c for c in cases if c.id in batch.could_not_run]
    for case in again:
        batch.reruns[case.id] = batch.could_not_run.pop(case.id)
        try:
            batch.results[case.id] = run(case)
        except KvmcpuidError as exc:
            batch.fail(case.id, exc)
    if again:
        ran = sum(c.id in batch.results for c in again)
        batch.notes.append(f"{len(again)} guest(s) the machinery could not run in the batch "
                           f"re-run alone: {ran} ran")


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
# 8: 18.8 s, 16: 17.8 s. At most that many: LIBVIRT_LIMIT lowers it while the
# daemon refuses domains for want of resources (the cgroup BPF EAGAIN).
LIBVIRT_PARALLEL: Final = 16
LIBVIRT_LIMIT: Final = AdaptiveLimit(LIBVIRT_PARALLEL)
LIBVIRT_STATS: Final = RetryStats()


def run_libvirt_cases(cases: Sequence[Case], uri: str, *,
                      keep_failed_logs: bool = True) -> Batch:
    """libvirt: up to LIBVIRT_PARALLEL transient domains in flight, as many
    as LIBVIRT_LIMIT admits. keep_failed_logs: False where failures are the
    point (the mutants), so no libvirt log of them stays behind. A probe
    that cannot reach the daemon makes every case "could not run"."""
    from kvmcpuid_virt.probe.libvirt import LibvirtProbe

    try:
        probe = LibvirtProbe(uri, keep_failed_logs=keep_failed_logs, limit=LIBVIRT_LIMIT,
                             stats=LIBVIRT_STATS)
    except KvmcpuidError as exc:
        batch = Batch(Backend.LIBVIRT)
        for case in _renderable(batch, cases):
            batch.fail(case.id, exc)
        return batch
    with probe:
        return _parallel(Backend.LIBVIRT, cases,
                         lambda c: probe.run(c.libvirt_cpu, c.queries, TIMEOUT),
                         LIBVIRT_PARALLEL)
