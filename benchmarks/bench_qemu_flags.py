"""Issue 4 target: `kvmcpuid-qemu-flags` end to end (default policy: --model
host, live /dev/kvm, warm caches) within 2x of `python -c 'import
kvmcpuid_virt'` measured in the same run, interleaved. Prints the ratio; the
number goes in notes, not in an assert.

    .venv/bin/python -m benchmarks.bench_qemu_flags
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Sequence

from benchmarks.common import paired_ratio, report_ratio, timed_commands


def main() -> int:
    script = shutil.which("kvmcpuid-qemu-flags", path=os.path.dirname(sys.executable))
    direct = [sys.executable, "-c", "from kvmcpuid_virt.commands.qemu_flags import main; main()"]
    # One run first so the QEMU/cpu_map caches are warm, as on any host after
    # the first use; the cold cost is reported separately.
    subprocess.run(direct, check=True, stdout=subprocess.DEVNULL)
    commands: dict[str, Sequence[str]] = {
        "import": [sys.executable, "-c", "import kvmcpuid_virt"],
        "qemu-flags": direct,
    }
    if script is not None:
        commands["console-script"] = [script]
    times = timed_commands(commands, runs=40)
    med = {name: statistics.median(t) for name, t in times.items()}
    labels = {"qemu-flags": "kvmcpuid-qemu-flags", "console-script": "console script"}
    for name, label in labels.items():
        if name in med:
            print(report_ratio(label, med[name], "import floor", med["import"], 2,
                               ratio=paired_ratio(times, name, "import")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
