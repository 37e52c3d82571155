"""Issue 5 target: a raw-KVM probe under 10 ms per configuration. Prints the
median per-configuration time of a KvmProbe session (fresh vCPU per config,
VM reused), of one-shot run_kvm() (fresh /dev/kvm fd, VM and vCPU), and of
building the image; no asserts: numbers go in notes."""

from __future__ import annotations

import statistics
import sys
import time

from benchmarks.common import median_call
from kvmcpuid_virt.cpuid.table import CpuidTable
from kvmcpuid_virt.kvm import Kvm
from kvmcpuid_virt.probe import image
from kvmcpuid_virt.probe.kvm import KvmProbe, run_kvm


def _variants(table: CpuidTable, n: int) -> list[CpuidTable]:
    # Distinct configurations: toggle bits of leaf 0x80000001 ECX.
    entry = table.lookup(0x80000001)
    if entry is None:
        return [table] * n
    return [table.replace_entry(entry.replace(ecx=entry.ecx ^ (1 << (i % 8)))) for i in range(n)]


def main() -> int:
    with Kvm() as kvm:
        table = kvm.supported_cpuid()
    queries = image.default_queries(table)
    configs = _variants(table, 200)
    with KvmProbe() as probe:
        for cfg in configs[:5]:
            probe.run(cfg, queries)
        samples = []
        start = time.perf_counter()
        for cfg in configs:
            t0 = time.perf_counter()
            probe.run(cfg, queries)
            samples.append(time.perf_counter() - t0)
        total = time.perf_counter() - start
    print(
        f"raw KVM, session: median {statistics.median(samples) * 1e3:.2f} ms per configuration "
        f"(p90 {sorted(samples)[int(len(samples) * 0.9)] * 1e3:.2f} ms; {len(queries)} queries; "
        f"{len(configs)} configs in {total:.2f} s incl. VM recycling)"
    )
    one = median_call(lambda: run_kvm(table, queries), runs=30, warmup=2)
    print(f"raw KVM, one-shot run_kvm(): median {one * 1e3:.2f} ms (fresh /dev/kvm fd, VM, vCPU)")
    build = median_call(lambda: image._build.__wrapped__(tuple(queries)), runs=50)
    print(f"image build (uncached): median {build * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
