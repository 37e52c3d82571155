"""Issue 7 target: a baseline of 1000 host dumps in under 1 s.

The hosts are the real CPU dumps (same vendor, AuthenticAMD and GenuineIntel
separately) perturbed with a fixed seed: each copy has random feature bits
cleared, as hosts of one model with different microcode/BIOS settings would.
Prints the time of baseline() alone and of reading 1000 JSON dump texts plus
baseline(); no asserts (numbers go in notes)."""

from __future__ import annotations

import functools
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

from kvmcpuid_virt.analysis.baseline import baseline
from kvmcpuid_virt.cpuid.features import registry
from kvmcpuid_virt.cpuid.formats import Dump, dumps, loads
from kvmcpuid_virt.cpuid.table import CpuidTable
from kvmcpuid_virt.fsutil import load_dump

DATA = Path(os.environ.get("KVMCPUID_DATA", Path(__file__).resolve().parents[1] / "tests"
                           / "data" / "cpuid"))  # fmt: skip
N = 1000


def perturbed(seed: int = 7) -> dict[str, list[Dump]]:
    rng = random.Random(seed)
    reg = registry()
    real = [load_dump(str(p)) for p in sorted(DATA.glob("*.xml"))]
    out: dict[str, list[Dump]] = {}
    for vendor in ("AuthenticAMD", "GenuineIntel"):
        ebx = int.from_bytes(vendor[:4].encode(), "little")  # leaf 0 EBX: vendor[0:4]
        group = [d for d in real if d.table.get(0, 0, "ebx") == ebx]
        hosts = []
        for i in range(N):
            src = group[i % len(group)]
            table = src.table
            for f in rng.sample(reg.features, 8):  # clear up to 8 named bits
                e = table.lookup(f.leaf, f.subleaf)
                if e is not None and e.reg(f.reg) & f.mask:
                    table = table.replace_entry(e.replace(**{f.reg: e.reg(f.reg) & ~f.mask}))
            hosts.append(Dump(CpuidTable(table), "cpu", {}, f"{src.source}#{i}"))
        out[vendor] = hosts
    return out


def main() -> int:
    groups = perturbed()
    for vendor, hosts in groups.items():
        texts = [dumps(d, "json") for d in hosts]
        best = min(_time(functools.partial(baseline, hosts)) for _ in range(5))
        with_parse = min(_time(functools.partial(_parse_and_baseline, texts)) for _ in range(3))
        print(f"baseline of {N} {vendor} dumps: {best * 1e3:.0f} ms (in memory); "
              f"{with_parse * 1e3:.0f} ms including parsing {N} JSON dumps (target < 1000 ms)")
    return 0


def _parse_and_baseline(texts: list[str]) -> object:
    return baseline([loads(t) for t in texts])


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    sys.exit(main())
