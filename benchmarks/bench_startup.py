"""What the fast paths' start-up tricks save (docs/ARCHITECTURE.md, Start-up):
the wall time of each module they avoid importing, measured as a fresh
interpreter importing it minus one that does not, paired run by run; and the
three budgeted commands against the `import kvmcpuid_virt` floor.

A trick pays only where its module costs more than 1 ms; the note prints
which do.

    .venv/bin/python -m benchmarks.bench_startup
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys

from benchmarks.common import paired_ratio, report_ratio, timed_commands

# What the fast path imports lazily or never, and the trick that avoids it.
AVOIDED = {
    "typing": "TYPE_CHECKING = False instead of `from typing import ...`",
    "logging": "logging imported where a rare path logs",
    "hashlib": "memo's builtin _sha256",
    "dataclasses": "no dataclass on the memo-hit path",
    "lxml.etree": "lxml imported only when XML is read or written",
    "qemu.qmp": "qemu.qmp imported only when QEMU is asked",
    "kvmcpuid_virt.config.build": "the CpuConfig builder only on a memo miss",
}
THRESHOLD_MS = 1.0


def import_costs(runs: int = 30) -> dict[str, float]:
    """Median extra wall ms of `import MODULE` in a fresh interpreter."""
    commands = {"floor": [sys.executable, "-c", "pass"]}
    commands |= {m: [sys.executable, "-c", f"import {m}"] for m in AVOIDED}
    times = timed_commands(commands, runs=runs)
    return {m: 1000 * statistics.median(a - b for a, b in zip(times[m], times["floor"],
                                                                strict=True))
            for m in AVOIDED}  # fmt: skip


def _verdict(ms: float) -> str:
    return "pays" if ms > THRESHOLD_MS else "does NOT pay (under 1 ms)"


def main() -> int:
    os.environ["LC_ALL"] = "C"  # the locale users' scripts and CI run in
    for module, ms in sorted(import_costs().items(), key=lambda kv: -kv[1]):
        print(f"import {module}: {ms:.2f} ms -> {AVOIDED[module]}: {_verdict(ms)}")
    # (cli's stand-in for argparse's gettext was measured at 0.73 ms and removed.)
    bindir = os.path.dirname(sys.executable)
    kvmcpuid = shutil.which("kvmcpuid", path=bindir)
    flags = shutil.which("kvmcpuid-qemu-flags", path=bindir)
    if kvmcpuid is None or flags is None:
        print("console scripts not installed; skipping the command ratios")
        return 0
    commands = {
        "import": [sys.executable, "-c", "import kvmcpuid_virt"],
        "qemu-flags": [flags],
        "libvirt-xml": [kvmcpuid, "libvirt-xml"],
        "dump": [kvmcpuid, "dump"],
    }
    for argv in commands.values():  # warm the memo and the caches
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    times = timed_commands(commands, runs=30)
    med = {name: statistics.median(t) for name, t in times.items()}
    targets = {"qemu-flags": 2.0, "libvirt-xml": 1.5, "dump": 1.5}
    for name, target in targets.items():
        print(report_ratio(name, med[name], "import floor", med["import"], target,
                           ratio=paired_ratio(times, name, "import")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
