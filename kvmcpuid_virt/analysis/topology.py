"""Is what every vCPU of a guest reports consistent with the configured
topology? The rules are the CPUID definitions (Intel SDM Vol. 2A "CPUID":
leaf 1 EBX, leaf 4 EAX, leaf 0xB; AMD APM Vol. 3 Appendix E: 0x80000008
ECX, 0x8000001E), applied to the topology the guest was started with, not
to any table of this project:

- every vCPU reported, with distinct initial APIC IDs (1 EBX[31:24]);
- leaf 1: EBX[23:16] (addressable logical processors per package) at least
  cores x threads, HTT (EDX[28]) set when that is more than one;
- leaf 0xB (where the guest has it): EDX the vCPU's x2APIC ID on every
  subleaf, equal to its initial APIC ID; level 0 of type SMT with threads
  logical processors, level 1 of type core with cores x threads, then an
  invalid level; the shifts wide enough, and each x2APIC ID split by them
  into (package, core, thread) in range and distinct;
- leaf 4 (where it describes a cache): EAX[31:26] + 1 at least the cores;
- 0x80000008 ECX[7:0] (AMD: threads in the package - 1) equal to
  cores x threads - 1;
- 0x8000001E (where the guest has it): EAX the x2APIC ID, EBX[15:8] + 1 the
  threads per core, each (package, core ID) shared by exactly `threads`
  vCPUs;
- everything else every vCPU answers the same (the per-vCPU fields above
  are the only ones allowed to differ).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Final

from kvmcpuid_virt.config.topology import Topology
from kvmcpuid_virt.cpuid import fields
from kvmcpuid_virt.cpuid.table import REGISTERS, CpuidTable, Register

__all__ = ["PER_VCPU", "TOPOLOGY_QUERIES", "check_topology", "smp_queries"]

_ALL: Final = 0xFFFF_FFFF
# (leaf, register, mask) of the fields that differ per vCPU; a None subleaf
# in the lookup below means every subleaf.
PER_VCPU: Final[tuple[tuple[int, Register, int], ...]] = (
    (0x1, "ebx", 0xFF00_0000),  # initial APIC ID
    (0xB, "edx", _ALL),  # x2APIC ID
    (0x1F, "edx", _ALL),
    (0x8000_001E, "eax", _ALL),  # extended APIC ID
    (0x8000_001E, "ebx", 0x0000_00FF),  # core ID
    (0x8000_001E, "ecx", 0x0000_00FF),  # node ID (one node per socket, say)
)
# The (leaf, subleaf) pairs the checks read: asked of every vCPU beside the
# configuration's own queries.
TOPOLOGY_QUERIES: Final[tuple[tuple[int, int], ...]] = (
    (0x1, 0), *((0x4, s) for s in range(4)), *((0xB, s) for s in range(3)),
    *((0x1F, s) for s in range(4)), (0x8000_0008, 0), *((0x8000_001D, s) for s in range(4)),
    (0x8000_001E, 0),
)


def smp_queries(queries: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """`queries` and TOPOLOGY_QUERIES, each once, in that order."""
    return list(dict.fromkeys([*queries, *TOPOLOGY_QUERIES]))


def _bits(n: int) -> int:
    """ceil(log2(n)): bits to number n things."""
    return (n - 1).bit_length()


def _shared_mask(leaf: int, reg: str) -> int:
    mask = _ALL
    for lf, r, m in PER_VCPU:
        if lf == leaf and r == reg:
            mask &= ~m
    return mask


def check_topology(topology: Topology, tables: Sequence[CpuidTable]) -> list[str]:
    """Every way `tables` (each vCPU's answers) contradict `topology`, one
    line each naming the field (and the vCPU); empty when consistent."""
    out: list[str] = []
    n, per = topology.vcpus, topology.per_package
    if len(tables) != n:
        out.append(f"vCPUs: the topology has {n}, {len(tables)} reported")
    if not tables:
        return out
    apic = [t.get(1, 0, "ebx") >> 24 for t in tables]
    if len(set(apic)) != len(apic):
        out.append(f"initial APIC ID (1 EBX[31:24]): not distinct: {apic}")

    def who(i: int) -> str:
        return f"vCPU {i} (APIC ID {apic[i]})"

    for i, t in enumerate(tables):
        count = t.get(1, 0, "ebx") >> 16 & 0xFF
        if per > 1 and count < per:
            out.append(f"{who(i)}: logical processor count (1 EBX[23:16]): the topology needs "
                       f"at least {per}, guest sees {count}")  # fmt: skip
        # HTT 0 says one logical processor per package; with one, HTT is the
        # configuration's feature bit (QEMU passes it on as configured).
        if per > 1 and not t.get(1, 0, "edx") >> 28 & 1:
            out.append(f"{who(i)}: HTT (1 EDX[28]): the topology has {per} logical "
                       "processors per package, guest sees 0")  # fmt: skip
    out += _leaf_b(topology, tables, apic, who)
    top = fields.max_basic_leaf(tables[0]) or 0
    for i, t in enumerate(tables):
        eax = t.get(4, 0, "eax")
        if top >= 4 and eax & 0x1F and (eax >> 26) + 1 < topology.cores:
            out.append(f"{who(i)}: cores per package (4 EAX[31:26]): the topology needs at "
                       f"least {topology.cores}, guest sees {(eax >> 26) + 1}")  # fmt: skip
    out += _amd(topology, tables, apic, who)
    out += _same_elsewhere(tables, who)
    return out


def _leaf_b(topology: Topology, tables: Sequence[CpuidTable], apic: list[int],
            who: Callable[[int], str]) -> list[str]:  # fmt: skip
    out: list[str] = []
    if (fields.max_basic_leaf(tables[0]) or 0) < 0xB or not tables[0].get(0xB, 0, "ebx"):
        return out
    name = who
    ids: list[tuple[int, int, int]] = []
    for i, t in enumerate(tables):
        x2 = {t.get(0xB, s, "edx") for s in (0, 1, 2) if t.lookup(0xB, s) is not None}
        if len(x2) != 1 or next(iter(x2)) & 0xFF != apic[i]:
            out.append(f"{name(i)}: x2APIC ID (0xB EDX): {sorted(x2)} across subleaves, "
                       f"initial APIC ID {apic[i]}")  # fmt: skip
        want = ((1, topology.threads), (2, topology.per_package))
        shifts = []
        for level, (kind, count) in enumerate(want):
            eax, ebx, ecx = (t.get(0xB, level, r) for r in ("eax", "ebx", "ecx"))
            got = (ecx >> 8 & 0xFF, ebx & 0xFFFF, ecx & 0xFF)
            if got != (kind, count, level):
                out.append(f"{name(i)}: topology level {level} (0xB.{level}): type, count, "
                           f"level should be {(kind, count, level)}, guest sees {got}")
            shifts.append(eax & 0x1F)
        end = t.get(0xB, 2, "ecx") >> 8 & 0xFF
        if t.lookup(0xB, 2) is not None and end != 0:
            out.append(f"{name(i)}: topology level 2 (0xB.2): type should be 0 (invalid) "
                       f"after the core level, guest sees {end}")  # fmt: skip
        smt, core = shifts
        if smt < _bits(topology.threads) or core - smt < _bits(topology.cores):
            out.append(f"{name(i)}: topology shifts (0xB EAX[4:0]): {smt}, {core} cannot "
                       f"number {topology.threads} threads and {topology.cores} cores")
            continue
        x = t.get(0xB, 0, "edx")
        parts = (x >> core, x >> smt & ((1 << (core - smt)) - 1), x & ((1 << smt) - 1))
        if parts[0] >= topology.sockets or parts[1] >= topology.cores or \
                parts[2] >= topology.threads:  # fmt: skip
            out.append(f"{name(i)}: x2APIC ID {x} splits into (package, core, thread) "
                       f"{parts}, out of the topology's range")  # fmt: skip
        ids.append(parts)
    if len(set(ids)) != len(ids):
        out.append(f"x2APIC IDs: (package, core, thread) not distinct: {ids}")
    return out


def _amd(topology: Topology, tables: Sequence[CpuidTable], apic: list[int],
         who: Callable[[int], str]) -> list[str]:  # fmt: skip
    out: list[str] = []
    name = who
    top = fields.max_extended_leaf(tables[0]) or 0
    if fields.vendor(tables[0]) != "AuthenticAMD":
        return out
    for i, t in enumerate(tables):
        if top >= 0x8000_0008:
            nc = t.get(0x8000_0008, 0, "ecx") & 0xFF
            if nc + 1 != topology.per_package:
                out.append(f"{name(i)}: core count (0x80000008 ECX[7:0]): the topology needs "
                           f"{topology.per_package - 1}, guest sees {nc}")  # fmt: skip
    if top < 0x8000_001E or not any(t.get(0x8000_001E, 0, "ebx") for t in tables):
        return out
    cores: Counter[tuple[int, int]] = Counter()
    for i, t in enumerate(tables):
        eax, ebx = t.get(0x8000_001E, 0, "eax"), t.get(0x8000_001E, 0, "ebx")
        x2 = t.get(0xB, 0, "edx") if t.lookup(0xB, 0) is not None else apic[i]
        if eax != x2:
            out.append(f"{name(i)}: extended APIC ID (0x8000001E EAX): {eax}, the vCPU's "
                       f"x2APIC ID is {x2}")  # fmt: skip
        if (ebx >> 8 & 0xFF) + 1 != topology.threads:
            out.append(f"{name(i)}: threads per core (0x8000001E EBX[15:8]): the topology "
                       f"needs {topology.threads - 1}, guest sees {ebx >> 8 & 0xFF}")
        cores[(x2 >> _bits(topology.per_package), ebx & 0xFF)] += 1
    wrong = {k: v for k, v in cores.items() if v != topology.threads}
    if wrong:
        out.append(f"core IDs (0x8000001E EBX[7:0]): (package, core) shared by other than "
                   f"{topology.threads} vCPUs: {wrong}")  # fmt: skip
    return out


def _same_elsewhere(tables: Sequence[CpuidTable], who: Callable[[int], str]) -> list[str]:
    """Outside PER_VCPU, every vCPU answers as the BSP does."""
    out: list[str] = []
    name = who
    bsp = tables[0]
    for i, t in enumerate(tables[1:], start=1):
        for e in bsp:
            for reg in REGISTERS:
                mask = _shared_mask(e.function, reg)
                a, b = e.reg(reg) & mask, t.get(e.function, e.index, reg) & mask
                if a != b:
                    out.append(f"{name(i)}: {e.function:#x}.{e.index} {reg}: {b:#010x}, the "
                               f"BSP {a:#010x} (bits {a ^ b:#010x} differ)")  # fmt: skip
    return out
