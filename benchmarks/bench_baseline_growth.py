"""`kvmcpuid baseline` as a command from 100 to 10,000 dumps, every host
different (each table read on its own: the worst case), against its floor
measured in the same run: a Python process that json-loads the same files.
Runs alternate command and floor; the ratio is the median of per-pair
ratios. How the cost grows with the number of hosts (issue 14): it should
be linear, the ratio flat or falling as start-up is spread over more hosts.
No asserts: the numbers go in notes.

    python -m benchmarks.bench_baseline_growth [MAX_HOSTS] [RUNS]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.common import paired_ratio, timed_commands_cpu
from benchmarks.fleet import write_fleet

_FLOOR = ("import json, sys\n"
          "for p in sys.argv[1:]:\n"
          "    with open(p) as f:\n"
          "        json.load(f)\n")  # fmt: skip


def main(argv: list[str]) -> int:
    top = int(argv[0]) if argv else 10_000
    runs = int(argv[1]) if len(argv) > 1 else 5
    first: tuple[int, float] | None = None
    for n in (n for n in (100, 1_000, 10_000) if n <= top):
        with tempfile.TemporaryDirectory(prefix="kvmcpuid-bench-") as tmp:
            paths = write_fleet(Path(tmp), n, None)
            commands = {
                "baseline": [sys.executable, "-m", "kvmcpuid_virt.cli", "baseline", *paths],
                "floor": [sys.executable, "-c", _FLOOR, *paths],
            }
            times, cpu = timed_commands_cpu(commands, runs=runs, warmup=1)
        med = {k: statistics.median(v) for k, v in times.items()}
        first = first or (n, med["baseline"])
        print(f"{n:>6} dumps, every host different: baseline {med['baseline'] * 1e3:.0f} ms, "
              f"json.load {med['floor'] * 1e3:.0f} ms, paired ratio "
              f"{paired_ratio(times, 'baseline', 'floor'):.2f} (CPU time "
              f"{paired_ratio(cpu, 'baseline', 'floor'):.2f}); x{med['baseline'] / first[1]:.1f} "
              f"the time of {first[0]} dumps for x{n / first[0]:.0f} the dumps")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
