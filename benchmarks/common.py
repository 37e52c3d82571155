"""Timing helpers shared by the benchmark scripts: wall time of commands,
interleaved with their floor so both see the same machine state."""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence

__all__ = [
    "bare_qemu_argv",
    "median_call",
    "median_commands",
    "paired_ratio",
    "probe_inputs",
    "report_ratio",
    "timed_commands",
    "timed_commands_cpu",
]


def timed_commands(
    commands: Mapping[str, Sequence[str]], runs: int = 30, warmup: int = 3
) -> dict[str, list[float]]:
    """Wall seconds of each run of each command, runs interleaved round-robin
    so that every command sees the same drift of a noisy machine."""
    times: dict[str, list[float]] = {name: [] for name in commands}
    for i in range(warmup + runs):
        for name, argv in commands.items():
            start = time.perf_counter()
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed)
    return times


def timed_commands_cpu(
    commands: Mapping[str, Sequence[str]], runs: int = 30, warmup: int = 3
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(wall seconds, CPU seconds: user + system) of each run of each
    command, runs interleaved. The CPU time is what a busy machine (other
    engineers' guests and tests on 2 cores) disturbs least: waiting for a
    core counts in the wall time only."""
    import resource

    wall: dict[str, list[float]] = {name: [] for name in commands}
    cpu: dict[str, list[float]] = {name: [] for name in commands}
    for i in range(warmup + runs):
        for name, argv in commands.items():
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            elapsed = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if i >= warmup:
                wall[name].append(elapsed)
                cpu[name].append(after.ru_utime - before.ru_utime
                                 + after.ru_stime - before.ru_stime)  # fmt: skip
    return wall, cpu


def median_commands(
    commands: dict[str, Sequence[str]], runs: int = 30, warmup: int = 3
) -> dict[str, float]:
    """Median wall seconds per command, runs interleaved round-robin."""
    times = timed_commands(commands, runs, warmup)
    return {name: statistics.median(t) for name, t in times.items()}


def paired_ratio(times: dict[str, list[float]], name: str, floor: str) -> float:
    """The median of per-round ratios name/floor: each round ran both back to
    back, so a slow stretch of the machine slows both and cancels out."""
    return statistics.median(a / b for a, b in zip(times[name], times[floor], strict=True))


def median_call(fn: Callable[[], object], runs: int = 200, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def report_ratio(
    name: str, value: float, floor_name: str, floor: float, target: float,
    ratio: float | None = None,
) -> str:
    """One line: both medians and their ratio (or `ratio`, e.g. a paired
    one), and whether it meets `target`."""
    ratio = value / floor if ratio is None else ratio
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


def probe_inputs() -> tuple[str, list[tuple[int, int]], bytes] | None:
    """What the probe benchmarks boot: the QEMU binary, the queries for this
    host's supported table, and the image; None (after saying why) without
    QEMU."""
    import shutil

    from kvmcpuid_virt.kvm import Kvm
    from kvmcpuid_virt.probe import image

    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        print("qemu-system-x86_64 not installed")
        return None
    with Kvm() as kvm:
        queries = image.default_queries(kvm.supported_cpuid())
    return qemu, queries, image.build(queries)
