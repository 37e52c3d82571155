"""`kvmcpuid baseline` of a fleet of dump files, as a whole command, against
its floor measured in the same run: a Python process that json-loads the
same files (what any reader of them must pay). Runs alternate command and
floor and the ratio is the median of per-pair ratios. Two fleets of 2000
hosts: every host different (the worst case for per-table work) and 20
configurations (hosts of one model share a table). Issue 14's target: within
2x of the floor. The ratio of CPU times is printed too: on a busy machine it
moves less than the wall time's. Also times baseline() alone in memory. No asserts: the
numbers go in notes.

    python -m benchmarks.bench_baseline [N] [RUNS]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import paired_ratio, timed_commands_cpu
from benchmarks.fleet import variants, write_fleet
from kvmcpuid_virt.analysis.baseline import baseline

_FLOOR = ("import json, sys\n"
          "for p in sys.argv[1:]:\n"
          "    with open(p) as f:\n"
          "        json.load(f)\n")  # fmt: skip


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 2000
    runs = int(argv[1]) if len(argv) > 1 else 11
    hosts = variants(n)
    best = min(_time(lambda: baseline(hosts)) for _ in range(3))
    print(f"baseline() of {n} different AMD tables in memory: {best * 1e3:.0f} ms")
    for distinct in (None, 20):
        with tempfile.TemporaryDirectory(prefix="kvmcpuid-bench-") as tmp:
            paths = write_fleet(Path(tmp), n, distinct)
            commands = {
                "baseline": [sys.executable, "-m", "kvmcpuid_virt.cli", "baseline", *paths],
                "floor": [sys.executable, "-c", _FLOOR, *paths],
            }
            times, cpu = timed_commands_cpu(commands, runs=runs, warmup=2)
        what = "every host different" if distinct is None else f"{distinct} configurations"
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"kvmcpuid baseline of {n} dumps ({what}): {med['baseline'] * 1e3:.0f} ms; "
              f"json.load of the same files: {med['floor'] * 1e3:.0f} ms; paired ratio "
              f"{paired_ratio(times, 'baseline', 'floor'):.2f} (target 2x); CPU time "
              f"{paired_ratio(cpu, 'baseline', 'floor'):.2f}")
    return 0


def _time(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
