"""Field decoders on hand-built tables whose expected values are worked out
from the SDM/APM encodings by hand, plus the real dumps' caches and sizes."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmcpuid_virt.cpuid import fields
from kvmcpuid_virt.cpuid.table import CpuidEntry, CpuidTable, EntryFlag
from kvmcpuid_virt.fsutil import load_dump
from tests.conftest import cpu_dump_paths

IDX = EntryFlag.SIGNIFICANT_INDEX


def _ascii_regs(text: str) -> list[int]:
    raw = text.encode().ljust(4 * ((len(text) + 3) // 4), b"\0")
    return [int.from_bytes(raw[i : i + 4], "little") for i in range(0, len(raw), 4)]


def test_vendor_and_max_leaves() -> None:
    # "Genu" "ineI" "ntel" in EBX, EDX, ECX
    t = CpuidTable(
        [
            CpuidEntry(0, eax=0x16, ebx=0x756E6547, edx=0x49656E69, ecx=0x6C65746E),
            CpuidEntry(0x80000000, eax=0x80000008),
        ]
    )
    assert fields.vendor(t) == "GenuineIntel"
    assert fields.max_basic_leaf(t) == 0x16
    assert fields.max_extended_leaf(t) == 0x80000008
    assert fields.max_hypervisor_leaf(t) is None
    assert fields.hypervisor_signature(t) is None
    # An extended max leaf that is not in the extended range is garbage.
    assert fields.max_extended_leaf(CpuidTable([CpuidEntry(0x80000000, eax=0x16)])) is None
    empty = CpuidTable()
    assert fields.vendor(empty) is None
    assert fields.signature(empty) is None
    assert fields.decode(empty)["caches"] == []


def test_hypervisor_leaf() -> None:
    kvm = _ascii_regs("KVMKVMKVM")  # EBX, ECX, EDX = "KVMK" "VMKV" "M\0\0\0"
    t = CpuidTable([CpuidEntry(0x40000000, eax=0x40000001, ebx=kvm[0], ecx=kvm[1], edx=kvm[2])])
    assert fields.hypervisor_signature(t) == "KVMKVMKVM"
    assert fields.max_hypervisor_leaf(t) == 0x40000001
    # Old KVM put 0 in EAX, meaning "0x40000001".
    t0 = CpuidTable([CpuidEntry(0x40000000, eax=0, ebx=kvm[0], ecx=kvm[1], edx=kvm[2])])
    assert fields.max_hypervisor_leaf(t0) == 0x40000001


@pytest.mark.parametrize(
    ("eax", "family", "model", "stepping"),
    [
        (0x00050654, 6, 0x55, 4),  # Skylake-SP: ext model 5, base model 5
        (0x000606A6, 6, 0x6A, 6),  # Ice Lake-SP
        (0x00A10F11, 0x19, 0x11, 1),  # Genoa: base family F + ext family 0xA
        (0x00800F12, 0x17, 0x01, 2),  # Naples
        (0x00000F29, 0xF, 0x2, 9),  # Pentium 4: base family F, ext family 0
        (0x00000543, 5, 4, 3),  # Pentium MMX: no extended fields used
        (0x00010543, 5, 4, 3),  # ext model ignored below family 6
    ],
)
def test_signature(eax: int, family: int, model: int, stepping: int) -> None:
    sig = fields.signature(CpuidTable([CpuidEntry(1, eax=eax)]))
    assert sig is not None
    assert (sig.family, sig.model, sig.stepping, sig.raw) == (family, model, stepping, eax)


def test_brand_string_needs_the_extended_leaves() -> None:
    brand = "  Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz".ljust(48, "\0")
    regs = _ascii_regs(brand)
    entries = [CpuidEntry(0x80000000, eax=0x80000004)]
    for i, leaf in enumerate((0x80000002, 0x80000003, 0x80000004)):
        a, b, c, d = regs[4 * i : 4 * i + 4]
        entries.append(CpuidEntry(leaf, eax=a, ebx=b, ecx=c, edx=d))
    assert fields.brand_string(CpuidTable(entries)) == "Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz"
    lower = [CpuidEntry(0x80000000, eax=0x80000001), *entries[1:]]
    assert fields.brand_string(CpuidTable(lower)) is None


def test_address_sizes() -> None:
    t = CpuidTable([CpuidEntry(0x80000000, eax=0x80000008), CpuidEntry(0x80000008, eax=0x3934)])
    assert fields.address_sizes(t) == fields.AddressSizes(0x34, 0x39, None)
    assert fields.address_sizes(CpuidTable([CpuidEntry(0x80000008, eax=0x3034)])) is None


def test_xsave() -> None:
    # x87|SSE|AVX in XCR0, PT (bit 8) in XSS; AVX state: 256 bytes at 576.
    t = CpuidTable(
        [
            CpuidEntry(0, eax=0xD),
            CpuidEntry(0xD, 0, IDX, eax=0x7, ebx=832, ecx=832, edx=0),
            CpuidEntry(0xD, 1, IDX, eax=0xF, ebx=960, ecx=0x100, edx=0),
            CpuidEntry(0xD, 2, IDX, eax=256, ebx=576),
            CpuidEntry(0xD, 8, IDX, eax=128, ebx=0, ecx=1),
        ]
    )
    xs = fields.xsave(t)
    assert xs is not None
    assert (xs.xcr0_mask, xs.xss_mask, xs.enabled_size, xs.max_size, xs.compacted_size) == (
        7,
        0x100,
        832,
        832,
        960,
    )
    assert xs.components == (
        fields.XsaveComponent(2, 256, 576, False),
        fields.XsaveComponent(8, 128, 0, True),
    )
    assert fields.xsave(CpuidTable([CpuidEntry(0, eax=0xC), *t.entries[1:]])) is None


def test_caches_leaf4() -> None:
    # L1d: 8 ways, 1 partition, 64-byte lines, 64 sets = 32 KiB, 2 threads.
    l1d = CpuidEntry(
        4, 0, IDX, eax=0x1 | 1 << 5 | 1 << 8 | 1 << 14, ebx=7 << 22 | 63, ecx=63, edx=0
    )
    # L3: 11 ways, 64-byte lines, 40960 sets = 27.5 MiB, 64 threads.
    l3 = CpuidEntry(4, 1, IDX, eax=0x3 | 3 << 5 | 63 << 14, ebx=10 << 22 | 63, ecx=40959)
    end = CpuidEntry(4, 2, IDX)
    got = fields.caches(CpuidTable([CpuidEntry(0, eax=0xB), l1d, l3, end]))
    assert [(c.level, c.type, c.size, c.ways, c.shared_by) for c in got] == [
        (1, "data", 32 * 1024, 8, 2),
        (3, "unified", 27 * 1024 * 1024 + 512 * 1024, 11, 64),
    ]


def test_caches_amd_leaf_8000001d_and_no_infinite_walk() -> None:
    # An entry without SIGNIFICANT_INDEX answers every subleaf: the walk must stop.
    every = CpuidEntry(0x8000001D, eax=0x1 | 1 << 5, ebx=7 << 22 | 63, ecx=63)
    t = CpuidTable([CpuidEntry(0, eax=1), CpuidEntry(0x80000000, eax=0x8000001F), every])
    got = fields.caches(t)
    assert 1 <= len(got) <= 64
    assert got[0].leaf == 0x8000001D
    assert got[0].size == 32 * 1024


def test_topology_prefers_1f() -> None:
    def levels(leaf: int) -> list[CpuidEntry]:
        return [
            CpuidEntry(leaf, 0, IDX, eax=1, ebx=2, ecx=1 << 8 | 0),
            CpuidEntry(leaf, 1, IDX, eax=6, ebx=56, ecx=2 << 8 | 1),
            CpuidEntry(leaf, 2, IDX, eax=7, ebx=56, ecx=5 << 8 | 2),
            CpuidEntry(leaf, 3, IDX, ecx=3),
        ]

    t = CpuidTable([CpuidEntry(0, eax=0x1F), *levels(0xB)[:2], *levels(0x1F)])
    got = fields.topology(t)
    assert [(x.leaf, x.type, x.shift) for x in got] == [
        (0x1F, "smt", 1),
        (0x1F, "core", 6),
        (0x1F, "die", 7),
    ]
    only_b = CpuidTable([CpuidEntry(0, eax=0x1F), *levels(0xB)[:2]])
    assert [x.type for x in fields.topology(only_b)] == ["smt", "core"]


# Public cache sizes of the CPUs in the data set: L1d and L3 per the vendor's
# specifications (L3 per sharing domain as CPUID reports it).
KNOWN_CACHES_KIB = {
    "Core-i7-5600U": (32, 4 * 1024),
    "Xeon-Gold-6148": (32, 27.5 * 1024),
    "EPYC-7601-32-Core": (32, 8 * 1024),  # 8 MiB per CCX
    "Ryzen-9-3900X-12-Core": (32, 16 * 1024),  # 16 MiB per CCX
    "EPYC-9334-32-Core": (32, 32 * 1024),  # 32 MiB per CCD
}


@pytest.mark.parametrize(
    "path",
    [p for p in cpu_dump_paths() if p.stem.removeprefix("x86_64-cpuid-") in KNOWN_CACHES_KIB],
    ids=lambda p: p.stem,
)
def test_real_caches(path: Path) -> None:
    l1d, l3 = KNOWN_CACHES_KIB[path.stem.removeprefix("x86_64-cpuid-")]
    got = {(c.level, c.type): c.size for c in fields.caches(load_dump(str(path)).table)}
    assert got[(1, "data")] == l1d * 1024
    assert got[(3, "unified")] == l3 * 1024


@pytest.mark.parametrize("path", cpu_dump_paths(), ids=lambda p: p.stem)
def test_real_xsave_sizes_are_consistent(path: Path) -> None:
    """The standard-format maximum is the end of the last user component
    (offset + size), or the 512-byte legacy area plus the 64-byte header when
    there is none beyond x87/SSE (the Atom P5362 has no AVX)."""
    xs = fields.xsave(load_dump(str(path)).table)
    assert xs is not None
    user = [c for c in xs.components if not c.supervisor]
    assert xs.max_size == max([512 + 64, *(c.offset + c.size for c in user)])
    assert xs.xcr0_mask & 0x3 == 0x3  # x87 and SSE are always there
