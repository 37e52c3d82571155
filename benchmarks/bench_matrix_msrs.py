"""What judging feature MSRs costs the migration matrix: matrix() in memory
over the same Intel fleet (benchmarks/fleet.py variants of the real dumps,
Atom and Ice Lake carrying libvirt's `<msr>`) with its feature MSRs and
with them stripped (unknown: no MSR bit asked, none compared), runs
alternating, the median of per-run ratios. No asserts: the numbers go in
docs/fleets.md.

    python -m benchmarks.bench_matrix_msrs [HOSTS] [RUNS]
"""

from __future__ import annotations

import statistics
import sys
import time

from benchmarks.fleet import real_dumps, variants
from kvmcpuid_virt.analysis.matrix import matrix
from kvmcpuid_virt.cpuid.formats import Dump
from kvmcpuid_virt.cpuid.msr_values import FeatureMsrs


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 2000
    runs = int(argv[1]) if len(argv) > 1 else 5
    by_source = {d.source: d.table.msrs for d in real_dumps("GenuineIntel")}
    with_msrs = []
    for i, d in enumerate(variants(n, "GenuineIntel")):
        msrs = by_source[d.source.rsplit("#", 1)[0]]
        if msrs is not None and i % 3 == 0:
            # Every third host without its lowest IA32_ARCH_CAPABILITIES bit.
            values = msrs.as_dict()
            v = values.get(0x10A, 0)
            values[0x10A] = v & (v - 1)
            msrs = FeatureMsrs.of(values)
        with_msrs.append(Dump(d.table.with_msrs(msrs), d.kind, d.host, d.source))
    # The floor: the same tables without feature MSRs (new objects, so
    # matrix() reads each again).
    without = [Dump(d.table.with_msrs(None), d.kind, d.host, d.source) for d in with_msrs]
    carrying = sum(d.table.msrs is not None for d in with_msrs)
    ratios: list[float] = []
    times: dict[str, list[float]] = {"msrs": [], "floor": []}
    for i in range(runs + 1):
        took: dict[str, float] = {}
        for name, hosts in (("msrs", with_msrs), ("floor", without)):
            fresh = [Dump(d.table.with_msrs(d.table.msrs), d.kind, d.host, d.source)
                     for d in hosts]  # fmt: skip
            start = time.perf_counter()
            m = matrix(fresh)
            took[name] = time.perf_counter() - start
        if i:  # the first round warms up
            ratios.append(took["msrs"] / took["floor"])
            for k, secs in took.items():
                times[k].append(secs)
    pairs = len(m.groups) ** 2
    print(f"{n} Intel hosts ({carrying} with feature MSRs), {len(m.groups)} groups, "
          f"{pairs:.2e} group pairs: with MSRs {statistics.median(times['msrs']):.2f} s, "
          f"without {statistics.median(times['floor']):.2f} s; "
          f"ratio {statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
