"""The CPUID guest image: encoder bytes, wire format, and a real boot under
QEMU (-bios, isa-debug-exit) whose answers must match what QEMU was told."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from kvmcpuid_virt.cpuid.table import CpuidEntry, CpuidTable, EntryFlag
from kvmcpuid_virt.errors import ProbeError
from kvmcpuid_virt.kvm import Kvm
from kvmcpuid_virt.probe import image

QUERIES = [(0, 0), (1, 0), (7, 0), (7, 1), (0xD, 1), (0x80000000, 0), (0x80000001, 0)]


def _table() -> CpuidTable:
    return CpuidTable(
        [
            CpuidEntry(0, eax=0xD, ebx=0x756E6547, ecx=0x6C65746E, edx=0x49656E69),
            CpuidEntry(1, eax=0x806F8, ebx=0x12345678, ecx=0xFEDCBA98, edx=0x0F0F0F0F),
            CpuidEntry(7, 0, EntryFlag.SIGNIFICANT_INDEX, eax=1, ebx=0xF1BF03AB),
            CpuidEntry(7, 1, EntryFlag.SIGNIFICANT_INDEX, eax=0x30),
            CpuidEntry(0x80000000, eax=0x80000008),
            CpuidEntry(0x80000001, ecx=0x121, edx=0x2C100800),
        ]
    )


# --- the encoder: bytes checked against the Intel SDM encodings ----------------


@pytest.mark.parametrize(
    ("encoded", "expected"),
    [
        (image.mov_r32_cs_si_disp8(image.AX, 0), "2e 66 8b 44 00"),
        (image.mov_r32_cs_si_disp8(image.CX, 4), "2e 66 8b 4c 04"),
        (image.shr_r32_imm8(image.AX, 8), "66 c1 e8 08"),
        (image.rol_r32_1(image.BP), "66 d1 c5"),
        (image.add_r32_r32(image.BP, image.AX), "66 01 c5"),
        (image.xor_r32_r32(image.BP, image.BP), "66 31 ed"),
        (image.mov_r32_r32(image.DI, image.DX), "66 89 d7"),
        (image.mov_r32_r32(image.AX, image.BX), "66 89 d8"),
        (image.cmp_r16_imm16(image.SI, 0x1234), "81 fe 34 12"),
        (image.add_r16_imm8(image.SI, 8), "83 c6 08"),
        (image.mov_r16_imm16(image.DX, 0x3F8), "ba f8 03"),
        (image.mov_al_cs_si(), "2e 8a 04"),
        (image.lidt_cs_disp16(0x218), "2e 0f 01 1e 18 02"),
        (image.out_imm8_al(0xF4), "e6 f4"),
        (image.cpuid(), "0f a2"),
    ],
)
def test_encoder_bytes(encoded: bytes, expected: str) -> None:
    assert encoded.hex(" ") == expected


def test_reset_vector_jumps_to_code() -> None:
    img = image.build(QUERIES)
    assert len(img) == image.IMAGE_SIZE
    # jmp rel16 at 0xFFF0: target = 0xFFF3 + rel = 0 (mod 64 KiB)
    assert img[0xFFF0] == 0xE9
    rel = int.from_bytes(img[0xFFF1:0xFFF3], "little")
    assert (0xFFF3 + rel) & 0xFFFF == 0
    assert img[0] == 0xFA  # cli


def test_disassembly_matches_comments(tmp_path: Path) -> None:
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    code = tmp_path / "code.bin"
    code.write_bytes(image.build(QUERIES)[: image.CONST_OFFSET].rstrip(b"\0"))
    out = subprocess.run(
        [objdump, "-D", "-b", "binary", "-mi8086", str(code)],
        capture_output=True, check=True,
    ).stdout.decode()
    for mnemonic in ("cpuid", "out    %al,$0xf4", "lidtw  %cs:", "mov    %cs:0x4(%si),%ecx",
                     "shr    $0x8,%eax", "rol    %ebp", "hlt"):
        assert mnemonic in out, mnemonic


def test_build_is_cached_and_validates() -> None:
    assert image.build(QUERIES) is image.build(list(QUERIES))
    with pytest.raises(ValueError, match="duplicate"):
        image.build([(1, 0), (1, 0)])
    with pytest.raises(ValueError, match="32-bit"):
        image.build([(1 << 32, 0)])
    with pytest.raises(ValueError, match=f"at most {image.MAX_QUERIES}"):
        image.build([(i, 0) for i in range(image.MAX_QUERIES + 1)])
    full = image.build([(i, 0) for i in range(image.MAX_QUERIES)])
    assert len(full) == image.IMAGE_SIZE


# --- wire format ----------------------------------------------------------------


def test_parse_roundtrip_with_firmware_noise() -> None:
    table = _table()
    stream = b"SeaBIOS (version 1.16)\r\n\x00\xff" + image.encode(QUERIES, table) + b"junk"
    observed = image.parse(stream, QUERIES)
    assert observed.keys() == QUERIES
    for leaf, sub in QUERIES:
        for reg in ("eax", "ebx", "ecx", "edx"):
            assert observed.get(leaf, sub, reg) == table.get(leaf, sub, reg)  # type: ignore[arg-type]
    assert observed.lookup(7, 1) is not None and observed.lookup(7, 1).indexed  # type: ignore[union-attr]
    assert not observed.lookup(1, 0).indexed  # type: ignore[union-attr]


def test_parse_rejects_missing_start_marker() -> None:
    with pytest.raises(ProbeError, match="no start marker"):
        image.parse(b"hello" * 100, QUERIES)


@pytest.mark.parametrize("cut", [1, 8, 20, 40])
def test_parse_rejects_truncated_stream(cut: int) -> None:
    stream = image.encode(QUERIES, _table())
    with pytest.raises(ProbeError, match="truncated"):
        image.parse(stream[:-cut], QUERIES)


def test_parse_rejects_bad_checksum() -> None:
    stream = bytearray(image.encode(QUERIES, _table()))
    stream[len(image.START_MARKER) + 8 + 5] ^= 0x40  # one bit of leaf 0 EBX
    with pytest.raises(ProbeError, match="checksum"):
        image.parse(bytes(stream), QUERIES)


def test_parse_rejects_missing_end_marker() -> None:
    stream = bytearray(image.encode(QUERIES, _table()))
    stream[-1] ^= 0xFF
    with pytest.raises(ProbeError, match="end marker"):
        image.parse(bytes(stream), QUERIES)


def test_parse_rejects_other_query_list() -> None:
    stream = image.encode(QUERIES, _table())
    other = [*QUERIES[:-1], (0x80000002, 0)]
    with pytest.raises(ProbeError, match="different query list"):
        image.parse(stream, other)


def test_default_queries_cover_table_and_ranges() -> None:
    qs = image.default_queries(_table())
    assert qs == sorted(set(qs))
    assert set(_table().keys()) <= set(qs)
    assert [(leaf, 0) for leaf in range(0xE)] == [q for q in qs if q[0] < 0x40000000 and q[1] == 0]
    assert (0x80000008, 0) in qs and (0x80000009, 0) not in qs
    assert (0x40000000, 0) in qs


def test_default_queries_bound_hostile_ranges() -> None:
    table = CpuidTable([CpuidEntry(0, eax=0xFFFFFFFF), CpuidEntry(0x80000000, eax=0x8FFFFFFF)])
    assert len(image.default_queries(table)) == 3


# --- a real boot under QEMU -------------------------------------------------------


def _boot(qemu: str, tmp_path: Path, img: bytes, cpu: str) -> tuple[bytes, float, int]:
    bios = tmp_path / "probe.bin"
    out = tmp_path / "serial.out"
    bios.write_bytes(img)
    argv = [
        qemu, "-accel", "kvm", "-nodefaults", "-display", "none", "-machine", "pc",
        "-bios", str(bios), "-chardev", f"file,id=s,path={out}", "-serial", "chardev:s",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-cpu", cpu,
    ]
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, timeout=30)
    seconds = time.perf_counter() - start
    if proc.returncode != 3:
        pytest.fail(f"QEMU exited {proc.returncode}: {proc.stderr.decode(errors='replace')}")
    return out.read_bytes(), seconds, proc.returncode


def test_image_under_qemu_named_model(qemu_binary: str, tmp_path: Path) -> None:
    # A model with every value QEMU derives spelled out: the guest must see
    # exactly the vendor and maximum leaves QEMU was told.
    queries = [(0, 0), (1, 0), (0x80000000, 0), (0x80000001, 0)]
    cpu = "qemu64,vendor=GenuineIntel,level=0xb,xlevel=0x80000007,-lahf-lm"
    serial, seconds, _ = _boot(qemu_binary, tmp_path, image.build(queries), cpu)
    observed = image.parse(serial, queries)
    leaf0 = observed.lookup(0)
    assert leaf0 is not None
    assert leaf0.eax == 0xB
    vendor = b"".join(r.to_bytes(4, "little") for r in (leaf0.ebx, leaf0.edx, leaf0.ecx))
    assert vendor == b"GenuineIntel"
    assert observed.get(0x80000000, 0, "eax") == 0x80000007
    assert observed.get(0x80000001, 0, "ecx") & 1 == 0  # lahf-lm off
    print(f"QEMU boot of the image: {seconds * 1e3:.0f} ms")
    assert seconds < 10


def test_image_under_qemu_host_model(qemu_binary: str, tmp_path: Path) -> None:
    # QEMU 7.2 on this AMD host cannot set up arch-capabilities (MSR 0x10a);
    # it is irrelevant to the image, so switch it off.
    with Kvm() as kvm:
        supported = kvm.supported_cpuid()
    queries = image.default_queries(supported)
    serial, seconds, _ = _boot(qemu_binary, tmp_path, image.build(queries),
                               "host,-arch-capabilities")
    observed = image.parse(serial, queries)
    assert observed.lookup(0) is not None
    assert observed.lookup(0).regs()[1:] == supported.lookup(0).regs()[1:]  # type: ignore[union-attr]
    assert observed.get(0x80000000, 0, "eax") == supported.get(0x80000000, 0, "eax")
    assert seconds < 10


# --- feature MSRs: RDMSR gated by the guest's own CPUID --------------------------

# IA32_BIOS_SIGN_ID (0x8B) exists wherever CPUID.01H:EDX[5] (MSR) is set;
# IA32_ARCH_CAPABILITIES (0x10A) where CPUID.07H.0:EDX[29] is (Intel SDM).
MSR_QUERIES = [image.msr_query(0x8B, None), image.msr_query(0x10A, (7, 0, "edx", 29))]


@pytest.mark.parametrize(
    ("encoded", "expected"),
    [
        (image.rdmsr(), "0f 32"),
        (image.mov_r32_imm32(image.AX, 1), "66 b8 01 00 00 00"),
        (image.and_r32_cs_si_disp8(image.DX, 24), "2e 66 23 54 18"),
        (image.or_r32_r32(image.AX, image.BX), "66 09 d8"),
        (image.test_rr32(image.AX, image.AX), "66 85 c0"),
    ],
)
def test_msr_encoder_bytes(encoded: bytes, expected: str) -> None:
    assert encoded.hex(" ") == expected


def test_msr_query_gates_are_the_spec_bits() -> None:
    assert image.msr_query(0x8B, None) == (0x8B, 1, 0, 0, 0, 0, 1 << 5)
    assert image.msr_query(0x10A, (7, 0, "edx", 29)) == (0x10A, 7, 0, 0, 0, 0, 1 << 29)
    with pytest.raises(ValueError, match="no gate bit"):
        image.build(QUERIES, [(0x10A, 7, 0, 0, 0, 0, 0)])
    with pytest.raises(ValueError, match="duplicate MSR"):
        image.build(QUERIES, [MSR_QUERIES[0], MSR_QUERIES[0]])


def test_cpuid_only_image_is_unchanged_by_the_msr_support() -> None:
    assert image.build(QUERIES) == image.build(QUERIES, ())
    assert image.query_digest(QUERIES) == image.query_digest(QUERIES, ())
    assert image.frame_size(len(QUERIES)) == image.frame_size(len(QUERIES), 0)


def test_msr_image_disassembles_to_rdmsr_behind_the_gate(tmp_path: Path) -> None:
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    code = tmp_path / "code.bin"
    code.write_bytes(image.build(QUERIES, MSR_QUERIES)[: image.CONST_OFFSET].rstrip(b"\0"))
    out = subprocess.run([objdump, "-D", "-b", "binary", "-mi8086", str(code)],
                         capture_output=True, check=True).stdout.decode()  # fmt: skip
    assert "rdmsr" in out and "and    %cs:0x18(%si),%edx" in out and "je" in out
    assert out.index("cpuid", out.index("cmp    $0x")) < out.index("rdmsr")


def test_msr_frame_round_trip_and_absent_msrs() -> None:
    leaf1 = _table().lookup(1)
    assert leaf1 is not None
    # leaf 1 EDX gets bit 5 (MSR); leaf 7 EDX has no bit 29 (arch-capabilities)
    table = _table().replace_entry(leaf1.replace(edx=leaf1.edx | 1 << 5))
    stream = image.encode(QUERIES, table, MSR_QUERIES, {0x8B: 0x1_0000_0065, 0x10A: 0x69})
    observed, read = image.parse_msrs(b"noise" + stream, QUERIES, MSR_QUERIES)
    assert observed == image.parse(image.encode(QUERIES, table), QUERIES)
    assert read == {0x8B: 0x1_0000_0065, 0x10A: None}
    _, none_read = image.parse_msrs(image.encode(QUERIES, _table(), MSR_QUERIES, {0x8B: 1}),
                                    QUERIES, MSR_QUERIES)  # fmt: skip
    assert none_read == {0x8B: None, 0x10A: None}  # no MSR bit: nothing read
    assert len(stream) == image.frame_size(len(QUERIES), len(MSR_QUERIES))
    with pytest.raises(ProbeError, match="different query list"):
        image.parse_msrs(stream, QUERIES, MSR_QUERIES[:1])
    bad = bytearray(stream)
    at = len(image.START_MARKER) + 8 + 16 * len(QUERIES) + 12  # status of 0x10A
    bad[at] = 2
    with pytest.raises(ProbeError, match="checksum"):
        image.parse_msrs(bytes(bad), QUERIES, MSR_QUERIES)


@pytest.mark.kvm
def test_raw_kvm_guest_reads_the_msr_value_kvm_set_msrs_wrote() -> None:
    """Raw KVM: KVM_SET_MSRS writes IA32_BIOS_SIGN_ID, the guest's RDMSR
    reads exactly it back (a value KVM itself would never report), and an
    MSR whose gate the guest's own CPUID lacks is not read."""
    from kvmcpuid_virt.probe.kvm import run_kvm

    with Kvm() as kvm:
        supported = kvm.supported_cpuid()
    queries = image.default_queries(supported)
    value = 0x0BAD_F00D_0000_0000
    result = run_kvm(supported, queries, msrs={0x8B: value}, msr_queries=MSR_QUERIES)
    assert result.msrs[0x8B] == value and result.msr_vmm == {0x8B: value}
    guest_has_arch_caps = result.observed.get(7, 0, "edx") >> 29 & 1
    assert (result.msrs[0x10A] is None) == (not guest_has_arch_caps)


def test_image_under_qemu_reads_the_ucode_rev_qemu_was_given(qemu_binary: str,
                                                            tmp_path: Path) -> None:  # fmt: skip
    """QEMU writes its ucode-rev property to IA32_BIOS_SIGN_ID: the guest's
    RDMSR reads exactly the value on QEMU's command line."""
    queries = [(0, 0), (1, 0), (7, 0)]
    cpu = "qemu64,ucode-rev=0x1234567800000000"
    serial, _, _ = _boot(qemu_binary, tmp_path, image.build(queries, MSR_QUERIES), cpu)
    observed, read = image.parse_msrs(serial, queries, MSR_QUERIES)
    assert read[0x8B] == 0x1234_5678_0000_0000
    assert (read[0x10A] is None) == (not observed.get(7, 0, "edx") >> 29 & 1)
