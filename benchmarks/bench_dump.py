"""Issue 2 targets: supported_cpuid() median under 1 ms in-process, and
`kvmcpuid dump` wall time within 1.5x of `python -c 'import kvmcpuid_virt'`
measured in the same run."""

from __future__ import annotations

import os
import sys

from benchmarks.common import median_call, median_commands, report_ratio
from kvmcpuid_virt.kvm import Kvm


def main() -> int:
    with Kvm() as kvm:
        per_call = median_call(kvm.supported_cpuid)
    print(f"supported_cpuid(): median {per_call * 1e3:.3f} ms in-process (target < 1 ms)")
    bindir = os.path.dirname(sys.executable)
    kvmcpuid = os.path.join(bindir, "kvmcpuid")
    med = median_commands(
        {
            "import": [sys.executable, "-c", "import kvmcpuid_virt"],
            "dump": [kvmcpuid, "dump", "-o", os.devnull],
        }
    )
    print(report_ratio("kvmcpuid dump", med["dump"], "import floor", med["import"], 1.5))
    return 0


if __name__ == "__main__":
    sys.exit(main())
