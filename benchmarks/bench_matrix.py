"""The migration matrix at scale (issue 14): its cost against the number of
ordered host pairs, from 100 to 10,000 hosts.

Two fleets made by benchmarks/fleet.py from the real AMD dumps:
- every host different (the worst case: 10,000 hosts are 10^8 pairs, each
  its own group): analysis.matrix.matrix() in memory, its time per pair;
- 50 configurations (hosts of one model share a table, as in a real fleet):
  `kvmcpuid compat --matrix FILES --format json` as a whole command, against
  a floor measured in the same run (a Python process that json-loads the
  same files), runs alternating, the median of per-pair ratios.
No asserts: the numbers go in notes.

    python -m benchmarks.bench_matrix [MAX_HOSTS] [RUNS]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import paired_ratio
from benchmarks.fleet import variants, write_fleet
from kvmcpuid_virt.analysis.matrix import matrix

_FLOOR = ("import json, sys\n"
          "for p in sys.argv[1:]:\n"
          "    with open(p) as f:\n"
          "        json.load(f)\n")  # fmt: skip
_CONFIGS = 50


def main(argv: list[str]) -> int:
    top = int(argv[0]) if argv else 10_000
    runs = int(argv[1]) if len(argv) > 1 else 5
    sizes = [n for n in (100, 1_000, 10_000) if n <= top]
    print("every host different (one group each), matrix() in memory:")
    first = None
    for n in sizes:
        hosts = variants(n)
        start = time.perf_counter()
        m = matrix(hosts)
        took = time.perf_counter() - start
        pairs = len(m.groups) ** 2
        first = first or (n, took)
        print(f"  {n:>6} hosts, {len(m.groups)} groups, {pairs:.2e} pairs: {took:.2f} s, "
              f"{took / pairs * 1e9:.0f} ns a pair; x{took / first[1]:.1f} the time of "
              f"{first[0]} hosts for x{pairs / first[0] ** 2:.0f} the pairs")
    print(f"{_CONFIGS} configurations, `kvmcpuid compat --matrix` as a command:")
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="kvmcpuid-bench-") as tmp:
            paths = write_fleet(Path(tmp), n, _CONFIGS)
            commands = {
                "matrix": [sys.executable, "-m", "kvmcpuid_virt.cli", "compat", "--matrix",
                           *paths, "--format", "json", "-o", str(Path(tmp) / "m.json")],
                "floor": [sys.executable, "-c", _FLOOR, *paths],
            }
            times = _timed(commands, runs)
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = paired_ratio(times, "matrix", "floor")
        print(f"  {n:>6} hosts ({n * n:.0e} pairs): {med['matrix']:.2f} s; json.load of the "
              f"files {med['floor']:.2f} s; paired ratio {ratio:.2f}")
    return 0


def _timed(commands: dict[str, list[str]], runs: int) -> dict[str, list[float]]:
    """Wall seconds of each run, commands alternating (one warm-up round);
    compat exits 1 when some pair does not fit, which is an answer."""
    times: dict[str, list[float]] = {name: [] for name in commands}
    for i in range(runs + 1):
        for name, argv in commands.items():
            start = time.perf_counter()
            rc = subprocess.run(argv, stdout=subprocess.DEVNULL, check=False).returncode
            elapsed = time.perf_counter() - start
            if rc not in (0, 1):
                raise SystemExit(f"{name}: exit status {rc}")
            if i:
                times[name].append(elapsed)
    return times


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
