"""A synthetic fleet for the scale benchmarks: N `kvmcpuid dump` JSON files
made from the real CPU dumps of one vendor (tests/data/cpuid or
$KVMCPUID_DATA), each copy with up to 8 random named feature bits cleared (a
fixed seed), as hosts of a few models with different microcode and BIOS
settings would be. `distinct` bounds how many different tables there are
(hosts of one configuration share one): None makes nearly every host
different, the worst case for the per-table work."""

from __future__ import annotations

import os
import random
from pathlib import Path

from kvmcpuid_virt.cpuid.features import registry
from kvmcpuid_virt.cpuid.formats import Dump, dumps
from kvmcpuid_virt.cpuid.table import CpuidTable
from kvmcpuid_virt.fsutil import load_dump

__all__ = ["DATA", "real_dumps", "variants", "write_fleet"]

DATA = Path(os.environ.get("KVMCPUID_DATA", Path(__file__).resolve().parents[1] / "tests"
                           / "data" / "cpuid"))  # fmt: skip


def real_dumps(vendor: str) -> list[Dump]:
    ebx = int.from_bytes(vendor[:4].encode(), "little")  # leaf 0 EBX: vendor[0:4]
    real = [load_dump(str(p)) for p in sorted(DATA.glob("*.xml"))]
    return [d for d in real if d.table.get(0, 0, "ebx") == ebx]


def variants(n: int, vendor: str = "AuthenticAMD", seed: int = 7) -> list[Dump]:
    """n perturbed copies of the vendor's real dumps (see the module)."""
    rng = random.Random(seed)
    reg = registry()
    group = real_dumps(vendor)
    hosts = []
    for i in range(n):
        src = group[i % len(group)]
        table = src.table
        for f in rng.sample(reg.features, 8):  # clear up to 8 named bits
            e = table.lookup(f.leaf, f.subleaf)
            if e is not None and e.reg(f.reg) & f.mask:
                table = table.replace_entry(e.replace(**{f.reg: e.reg(f.reg) & ~f.mask}))
        hosts.append(Dump(CpuidTable(table), "supported", {"hostname": f"h{i}"},
                          f"{src.source}#{i}"))  # fmt: skip
    return hosts


def write_fleet(directory: Path, n: int, distinct: int | None = None,
                vendor: str = "AuthenticAMD") -> list[str]:  # fmt: skip
    """Write n dump files into `directory`; their paths."""
    kinds = variants(n if distinct is None else min(n, distinct), vendor)
    paths = []
    for i in range(n):
        d = kinds[i % len(kinds)]
        path = directory / f"h{i:05d}.json"
        path.write_text(dumps(Dump(d.table, "supported", {"hostname": f"h{i}"}, d.source)))
        paths.append(str(path))
    return paths
