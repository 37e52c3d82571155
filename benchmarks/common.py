"""Timing helpers shared by the benchmark scripts: wall time of commands,
interleaved with their floor so both see the same machine state."""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Callable, Sequence

__all__ = ["bare_qemu_argv", "median_call", "median_commands", "report_ratio"]


def median_commands(
    commands: dict[str, Sequence[str]], runs: int = 30, warmup: int = 3
) -> dict[str, float]:
    """Median wall seconds per command, runs interleaved round-robin."""
    times: dict[str, list[float]] = {name: [] for name in commands}
    for i in range(warmup + runs):
        for name, argv in commands.items():
            start = time.perf_counter()
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(t) for name, t in times.items()}


def median_call(fn: Callable[[], object], runs: int = 200, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def report_ratio(name: str, value: float, floor_name: str, floor: float, target: float) -> str:
    ratio = value / floor
    verdict = "meets" if ratio <= target else "MISSES"
    return (
        f"{name}: {value * 1000:.1f} ms; {floor_name}: {floor * 1000:.1f} ms; "
        f"ratio {ratio:.2f} ({verdict} the {target}x target)"
    )


def bare_qemu_argv(qemu: str, bios: str) -> list[str]:
    """The floor every probe backend is measured against: QEMU with the image
    as firmware and nothing else it needs (isa-debug-exit so it ends)."""
    return [qemu, "-accel", "kvm", "-bios", bios, "-display", "none",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]
