"""The two exports as whole commands, each against its floor measured in the
same run: `baseline --format firecracker` against `baseline --format json`
of the same dumps (the baseline itself: what the template adds is the
rendering), and `features --format kubevirt` against `features --format
json` of the same dump (the feature view: what the labels add is the tool
facts and the model checks). Runs alternate command and floor; the ratio is
the median of per-pair ratios. No asserts: the numbers go in notes.

    python -m benchmarks.bench_exports [RUNS]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from benchmarks.common import paired_ratio, timed_commands

_DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "cpuid"
_CLI = [sys.executable, "-m", "kvmcpuid_virt.cli"]


def main(argv: list[str]) -> int:
    runs = int(argv[0]) if argv else 15
    dumps = [str(p) for p in sorted(_DATA.glob("*.xml")) if "EPYC" in p.name or "Ryzen" in p.name]
    one = str(_DATA / "x86_64-cpuid-EPYC-9334-32-Core.xml")
    pairs = {
        f"baseline --format firecracker ({len(dumps)} AMD dumps)":
            ([*_CLI, "baseline", "--format", "firecracker", *dumps],
             [*_CLI, "baseline", "--format", "json", *dumps]),
        "features --format kubevirt --from EPYC-9334":
            ([*_CLI, "features", "--format", "kubevirt", "--from", one],
             [*_CLI, "features", "--format", "json", "--from", one]),
        "features --format kubevirt (this host's /dev/kvm)":
            ([*_CLI, "features", "--format", "kubevirt"], [*_CLI, "features", "--format", "json"]),
    }  # fmt: skip
    for name, (command, floor) in pairs.items():
        try:
            times = timed_commands({"command": command, "floor": floor}, runs=runs)
        except Exception as exc:  # no /dev/kvm: the live pair cannot run
            print(f"{name}: not measured ({exc})")
            continue
        print(f"{name}: {statistics.median(times['command']) * 1e3:.0f} ms; "
              f"the json format: {statistics.median(times['floor']) * 1e3:.0f} ms; "
              f"ratio {paired_ratio(times, 'command', 'floor'):.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
