"""Issue 5 target: a libvirt probe guest under 0.6 s, teardown included.

Measured in one run, against libvirtd at KVMCPUID_LIBVIRT_URI (default
qemu:///system):
  floor       bare `qemu-system-x86_64 -accel kvm -bios IMAGE` of the same
              image (what no libvirt path can beat)
  single      run_libvirt(): connect, create, run, teardown, disconnect; the
              latency one verification pays
  reused      LibvirtProbe.run() on one connection, one guest at a time
  run_many/N  per-guest throughput of LibvirtProbe.run_many(parallel=N):
              teardown of one guest overlaps the start of the next
Also splits one guest into createXML / run / teardown from timestamps.
Prints medians; no asserts (numbers go in notes)."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import bare_qemu_argv, probe_inputs
from kvmcpuid_virt.probe.libvirt import LibvirtProbe, run_libvirt

CPU = (
    "<cpu mode='host-passthrough'>"
    "<feature policy='disable' name='arch-capabilities'/></cpu>"
)
RUNS = 10
BATCH = 16


def _floor(qemu: str, blob: bytes, runs: int) -> float:
    with tempfile.TemporaryDirectory(prefix="kvmcpuid-bench-") as tmp:
        bios = Path(tmp) / "image.bin"
        bios.write_bytes(blob)
        argv = bare_qemu_argv(qemu, str(bios))
        samples = []
        for _ in range(runs):
            start = time.perf_counter()
            subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           check=False)
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> int:
    uri = os.environ.get("KVMCPUID_LIBVIRT_URI", "qemu:///system")
    inputs = probe_inputs()
    if inputs is None:
        return 1
    qemu, queries, blob = inputs
    print(f"libvirt at {uri}; {len(queries)} queries")
    run_libvirt(CPU, queries, uri=uri)  # warm libvirt's capability cache

    floor_before = _floor(qemu, blob, RUNS)
    single = []
    for _ in range(RUNS):
        start = time.perf_counter()
        run_libvirt(CPU, queries, uri=uri)
        single.append(time.perf_counter() - start)
    with LibvirtProbe(uri) as probe:
        reused = []
        for _ in range(RUNS):
            start = time.perf_counter()
            probe.run(CPU, queries)
            reused.append(time.perf_counter() - start)
        throughput = {}
        for parallel in (1, 2, 4, 8):
            start = time.perf_counter()
            probe.run_many([(CPU, queries)] * BATCH, parallel=parallel)
            throughput[parallel] = (time.perf_counter() - start) / BATCH
    floor = statistics.median([floor_before, _floor(qemu, blob, RUNS)])

    med_single = statistics.median(single)
    verdict = "meets" if med_single < 0.6 else "MISSES"
    print(f"floor (bare qemu -accel kvm -bios IMAGE): {floor * 1000:.0f} ms")
    print(f"single guest, run_libvirt(): median {med_single * 1000:.0f} ms "
          f"(min {min(single) * 1000:.0f}, max {max(single) * 1000:.0f}; "
          f"{med_single / floor:.1f}x floor; {verdict} the 0.6 s target)")
    print(f"single guest, reused connection: median {statistics.median(reused) * 1000:.0f} ms")
    for parallel, per in throughput.items():
        print(f"throughput, run_many(parallel={parallel}), {BATCH} guests: "
              f"{per * 1000:.0f} ms per guest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
