"""What finding out the `-cpu host` abort costs now: the feature-MSR vCPU
trial (kvm/msrs.msr_delivery, in-process) against what it replaced, a real
QEMU start with `-cpu host` stopped before the first instruction (the old
toolfacts trial start), measured in the same run; and `kvmcpuid dump`
(which now carries the feature MSRs) and `dump --msr-trial` against the
`import kvmcpuid_virt` floor, paired round by round.

    .venv/bin/python -m benchmarks.bench_msrs
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from benchmarks.common import median_call, paired_ratio, timed_commands
from kvmcpuid_virt.kvm import Kvm
from kvmcpuid_virt.kvm.msrs import msr_delivery
from kvmcpuid_virt.toolfacts.learn import find_qemu


def _qemu_trial_start(qemu: str, runs: int = 10) -> float:
    """Median wall seconds of `qemu -cpu host,arch-capabilities=off -S` up to
    its QMP greeting and quit (the start the old trial made, which succeeds)."""
    import subprocess

    argv = [qemu, "-accel", "kvm", "-machine", "pc", "-nodefaults", "-display", "none",
            "-no-user-config", "-S", "-qmp", "stdio",
            "-cpu", "host,arch-capabilities=off"]  # fmt: skip
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, input='{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
                       capture_output=True, text=True, check=True, timeout=60)  # fmt: skip
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> int:
    with Kvm() as kvm:
        table = kvm.supported_cpuid()
        values = kvm.feature_msrs()
        trial = median_call(lambda: msr_delivery(kvm, table=table, values=values), runs=50)
    print(f"msr_delivery (vCPU trial of {len(values)} feature MSRs): {trial * 1e3:.2f} ms")
    qemu = find_qemu()
    if qemu is not None:
        start = _qemu_trial_start(qemu)
        print(f"QEMU -cpu host start (the old trial): {start * 1e3:.1f} ms; "
              f"the vCPU trial takes {trial / start:.3f}x of it")  # fmt: skip
    kvmcpuid = os.path.join(os.path.dirname(sys.executable), "kvmcpuid")
    times = timed_commands(
        {
            "import": [sys.executable, "-c", "import kvmcpuid_virt"],
            "dump": [kvmcpuid, "dump", "-o", os.devnull],
            "dump --msr-trial": [kvmcpuid, "dump", "--msr-trial", "-o", os.devnull],
        },
        runs=40,
        warmup=5,
    )
    floor = statistics.median(times["import"])
    print(f"import floor: {floor * 1e3:.1f} ms")
    for name in ("dump", "dump --msr-trial"):
        print(f"kvmcpuid {name}: {statistics.median(times[name]) * 1e3:.1f} ms; "
              f"ratio {paired_ratio(times, name, 'import'):.2f} to the floor")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
