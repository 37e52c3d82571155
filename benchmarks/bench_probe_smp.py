"""What `verify --topology` costs per topology: the multi-vCPU QEMU guest
(probe/smp_image.py, run_qemu_smp) against the single-vCPU QEMU probe of the
same queries (run_qemu), the floor, measured in the same run, interleaved
round-robin. Prints medians and ratios; no asserts."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

from benchmarks.common import probe_inputs
from kvmcpuid_virt.analysis.topology import smp_queries
from kvmcpuid_virt.config.topology import Topology
from kvmcpuid_virt.probe.qemu import run_qemu, run_qemu_smp

CPU = "host,arch-capabilities=off"  # this AMD host's nested KVM refuses MSR 0x10a
RUNS = 15
WARMUP = 2
TOPOLOGIES = ("sockets=1,cores=1,threads=1", "sockets=1,cores=2,threads=2",
              "sockets=2,cores=2,threads=2")


def main() -> int:
    inputs = probe_inputs()
    if inputs is None:
        return 1
    qemu, base, _ = inputs
    queries = smp_queries(base)
    variants: dict[str, Callable[[], object]] = {
        "run_qemu (1 vCPU)": lambda: run_qemu(CPU, queries, qemu=qemu),
    }
    def smp(t: Topology) -> Callable[[], object]:
        return lambda: run_qemu_smp(CPU, queries, t.qemu_smp(), t.vcpus, 30.0, qemu)

    for spec in TOPOLOGIES:
        variants[f"smp {spec}"] = smp(Topology.parse(spec))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(WARMUP + RUNS):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            if i >= WARMUP:
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    floor = med["run_qemu (1 vCPU)"]
    print(f"{len(queries)} queries, {RUNS} runs each, interleaved; -cpu {CPU}")
    print(f"floor (run_qemu, 1 vCPU): {floor * 1000:.1f} ms")
    for name, value in med.items():
        print(f"{name}: {value * 1000:.1f} ms; ratio to the floor {value / floor:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
