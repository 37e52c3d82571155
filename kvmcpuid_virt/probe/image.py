"""The guest image: a 64 KiB flat firmware (`-bios`) that runs CPUID for the
queries the host embedded in it, writes the answers to COM1 and exits.

Built in pure Python at run time: the 16-bit code is hand-assembled below, one
helper per instruction, every instruction's bytes next to its mnemonic.

Execution model. The image is loaded so that its last 16 bytes sit at the
reset vector 0xFFFF_FFF0: the CPU starts in real mode with CS base 0xFFFF0000
and IP 0xFFF0, so image offset == IP. The code only uses near jumps (a far
jump would reload CS base as selector*16) and reads its data with a `cs:`
prefix, so it needs no RAM, no stack and no memory writes: it runs the same
under QEMU/libvirt (ROM at 4 GiB - 64 KiB) and on raw KVM (one read-only
memory slot, nothing else mapped).

Wire format on COM1 (port 0x3F8), all integers little-endian:

    START_MARKER   8 bytes  b"\\x7fKCPUID\\x01"
    count          u32      number of queries
    digest         u32      crc32 of the packed query list (catches a stream
                            parsed against the wrong queries)
    count x        4 x u32  eax, ebx, ecx, edx of CPUID(leaf, subleaf), in
                            query order (the host knows the inputs)
    mcount x       3 x u32  only with MSR queries: status (1 read, 0 not read:
                            the guest's own CPUID says the MSR does not
                            exist), then EAX and EDX of RDMSR(index)
    checksum       u32      c = rol32(c, 1) + dword over every result dword
    END_MARKER     8 bytes  b"\\x7fKCPEND\\x01"

MSR queries (MsrQuery) carry their gate: the CPUID leaf, subleaf and a mask
per register whose bit says the MSR exists (IA32_ARCH_CAPABILITIES: leaf 7.0
EDX[29]). The guest runs that CPUID itself and reads the MSR only when the
masked answer is non-zero, because an RDMSR of an absent MSR raises #GP,
which with no IDT ends in a triple fault. With MSR queries the digest also
covers them (without, the frame is byte for byte the CPUID-only one).

Then the guest exits: `out 0xF4, al` (QEMU isa-debug-exit; raw KVM sees a
KVM_EXIT_IO), a keyboard-controller reset (0xFE to port 0x64) and a PCI reset
(0x06 to port 0xCF9) that libvirt turns into a destroy with
<on_reboot>destroy</on_reboot>, a triple fault (IDT limit 0, then int3), and
a HLT loop as the last resort.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Final

from kvmcpuid_virt.cpuid.table import (
    INDEXED_LEAVES,
    REGISTERS,
    CpuidEntry,
    CpuidTable,
    EntryFlag,
)
from kvmcpuid_virt.errors import ProbeError

__all__ = [
    "COM1",
    "DEBUG_EXIT_PORT",
    "END_MARKER",
    "IMAGE_SIZE",
    "MAX_QUERIES",
    "QUERY_OFFSET",
    "RESET_OFFSET",
    "START_MARKER",
    "Asm",
    "MsrQuery",
    "build",
    "default_queries",
    "encode",
    "flat_image",
    "frame_size",
    "msr_query",
    "parse",
    "parse_msrs",
    "query_digest",
]

Query = tuple[int, int]

IMAGE_SIZE: Final = 0x10000
# Offset of the reset vector inside the image (0xFFFF_FFF0 - 0xFFFF_0000).
RESET_OFFSET: Final = 0xFFF0
COM1: Final = 0x3F8
DEBUG_EXIT_PORT: Final = 0xF4
# The value written to isa-debug-exit: QEMU exits with status (v << 1) | 1 = 3.
DEBUG_EXIT_VALUE: Final = 0x01

START_MARKER: Final = b"\x7fKCPUID\x01"
END_MARKER: Final = b"\x7fKCPEND\x01"

# Layout: code from 0, constants (markers, header, IDT pointer) at
# CONST_OFFSET, the query table (8 bytes each: leaf, subleaf) from QUERY_OFFSET
# up to the reset vector. The code is ~200 bytes; the gaps are generous on
# purpose so the layout never depends on the code's exact size.
CONST_OFFSET: Final = 0x0200
QUERY_OFFSET: Final = 0x0400
QUERY_SIZE: Final = 8
# Every query must fit below the reset vector; the loop compares SI against
# the table's end, so the end must be a 16-bit offset too.
MAX_QUERIES: Final = (RESET_OFFSET - QUERY_OFFSET) // QUERY_SIZE  # 7806
# MSR queries (index, gate leaf, gate subleaf, four register masks: 7 x u32)
# go right after the CPUID queries.
MSR_QUERY_SIZE: Final = 28
MAX_MSR_QUERIES: Final = 64


# An MSR the guest reads: (index, leaf, subleaf, eax/ebx/ecx/edx masks of
# CPUID(leaf, subleaf) of which a set bit says the MSR exists).
MsrQuery = tuple[int, int, int, int, int, int, int]

_U32: Final = 0xFFFF_FFFF

# 16-bit register numbers as ModRM encodes them (also the 32-bit ones with 0x66).
AX, CX, DX, BX, SP, BP, SI, DI = range(8)


# --- the instruction encoder -------------------------------------------------
# One helper per instruction form used; 0x66 is the operand-size prefix that
# makes an instruction 32-bit in real mode, 0x2E the CS segment override.


def _modrm(mod: int, reg: int, rm: int) -> int:
    return (mod << 6) | (reg << 3) | rm


def _u16(value: int) -> bytes:
    return (value & 0xFFFF).to_bytes(2, "little")


def cli() -> bytes:
    return b"\xfa"  # cli


def hlt() -> bytes:
    return b"\xf4"  # hlt


def int3() -> bytes:
    return b"\xcc"  # int3


def cpuid() -> bytes:
    return b"\x0f\xa2"  # cpuid


def out_dx_al() -> bytes:
    return b"\xee"  # out dx, al


def out_imm8_al(port: int) -> bytes:
    return bytes([0xE6, port])  # out imm8, al


def mov_al_imm8(value: int) -> bytes:
    return bytes([0xB0, value])  # mov al, imm8


def mov_r16_imm16(reg: int, value: int) -> bytes:
    return bytes([0xB8 + reg]) + _u16(value)  # mov r16, imm16  (B8+r iw)


def inc_r16(reg: int) -> bytes:
    return bytes([0x40 + reg])  # inc r16  (40+r)


def add_r16_imm8(reg: int, value: int) -> bytes:
    return bytes([0x83, _modrm(3, 0, reg), value])  # add r16, imm8  (83 /0 ib)


def cmp_r16_imm16(reg: int, value: int) -> bytes:
    return bytes([0x81, _modrm(3, 7, reg)]) + _u16(value)  # cmp r16, imm16  (81 /7 iw)


def xor_r32_r32(dst: int, src: int) -> bytes:
    return bytes([0x66, 0x31, _modrm(3, src, dst)])  # xor r32, r32  (66 31 /r)


def mov_r32_r32(dst: int, src: int) -> bytes:
    return bytes([0x66, 0x89, _modrm(3, src, dst)])  # mov r32, r32  (66 89 /r)


def add_r32_r32(dst: int, src: int) -> bytes:
    return bytes([0x66, 0x01, _modrm(3, src, dst)])  # add r32, r32  (66 01 /r)


def rol_r32_1(reg: int) -> bytes:
    return bytes([0x66, 0xD1, _modrm(3, 0, reg)])  # rol r32, 1  (66 D1 /0)


def shr_r32_imm8(reg: int, count: int) -> bytes:
    return bytes([0x66, 0xC1, _modrm(3, 5, reg), count])  # shr r32, imm8  (66 C1 /5 ib)


def mov_r32_cs_si_disp8(reg: int, disp: int) -> bytes:
    # mov r32, cs:[si+disp8]  (2E 66 8B /r, mod=01 rm=100 is [si+disp8])
    return bytes([0x2E, 0x66, 0x8B, _modrm(1, reg, 0b100), disp])


def mov_al_cs_si() -> bytes:
    return bytes([0x2E, 0x8A, _modrm(0, AX, 0b100)])  # mov al, cs:[si]  (2E 8A /r)


def rdmsr() -> bytes:
    return b"\x0f\x32"  # rdmsr: edx:eax = MSR[ecx]


def mov_r32_imm32(reg: int, value: int) -> bytes:
    return bytes([0x66, 0xB8 + reg]) + (value & _U32).to_bytes(4, "little")  # mov r32, imm32


def and_r32_cs_si_disp8(reg: int, disp: int) -> bytes:
    # and r32, cs:[si+disp8]  (2E 66 23 /r, mod=01 rm=100)
    return bytes([0x2E, 0x66, 0x23, _modrm(1, reg, 0b100), disp])


def or_r32_r32(dst: int, src: int) -> bytes:
    return bytes([0x66, 0x09, _modrm(3, src, dst)])  # or r32, r32  (66 09 /r)


def test_rr32(dst: int, src: int) -> bytes:
    return bytes([0x66, 0x85, _modrm(3, src, dst)])  # test r32, r32  (66 85 /r)


def lidt_cs_disp16(offset: int) -> bytes:
    # lidt cs:[disp16]  (2E 0F 01 /3, mod=00 rm=110 is [disp16])
    return bytes([0x2E, 0x0F, 0x01, _modrm(0, 3, 0b110)]) + _u16(offset)


class Asm:
    """A tiny assembler: appends encoded instructions, resolves labels for
    the relative jumps. `org` is the offset of the first byte in CS."""

    def __init__(self, org: int = 0) -> None:
        self.org = org
        self.code = bytearray()
        self.labels: dict[str, int] = {}
        # (position of the displacement, its size, label, offset it is relative to)
        self._fixups: list[tuple[int, int, str, int]] = []

    @property
    def here(self) -> int:
        return self.org + len(self.code)

    def label(self, name: str) -> None:
        if name in self.labels:
            raise ValueError(f"label {name!r} defined twice")
        self.labels[name] = self.here

    def emit(self, data: bytes) -> None:
        self.code += data

    def _rel(self, opcode: bytes, size: int, target: str) -> None:
        self.code += opcode
        pos = len(self.code)
        self.code += bytes(size)
        self._fixups.append((pos, size, target, self.org + pos + size))

    def jmp_short(self, target: str) -> None:
        self._rel(b"\xeb", 1, target)  # jmp rel8  (EB cb)

    def jmp_near(self, target: str) -> None:
        self._rel(b"\xe9", 2, target)  # jmp rel16  (E9 cw)

    def jb_short(self, target: str) -> None:
        self._rel(b"\x72", 1, target)  # jb rel8  (72 cb)

    def jae_near(self, target: str) -> None:
        self._rel(b"\x0f\x83", 2, target)  # jae rel16  (0F 83 cw)

    def jz_near(self, target: str) -> None:
        self._rel(b"\x0f\x84", 2, target)  # jz rel16  (0F 84 cw)

    def assemble(self) -> bytes:
        out = bytearray(self.code)
        for pos, size, target, base in self._fixups:
            if target not in self.labels:
                raise ValueError(f"undefined label {target!r}")
            rel = self.labels[target] - base
            if size == 1 and not -128 <= rel <= 127:
                raise ValueError(f"short jump to {target!r} out of range ({rel})")
            out[pos : pos + size] = (rel & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        return bytes(out)


def flat_image(code: bytes, *, data: Iterable[tuple[int, bytes]] = ()) -> bytes:
    """A 64 KiB image with `code` at offset 0, each (offset, bytes) of `data`
    placed, and a `jmp near 0` at the reset vector."""
    image = bytearray(IMAGE_SIZE)
    image[: len(code)] = code
    for offset, blob in data:
        if offset < len(code) or offset + len(blob) > RESET_OFFSET:
            raise ValueError(f"data at {offset:#x}+{len(blob)} overlaps code or reset vector")
        image[offset : offset + len(blob)] = blob
    reset = Asm(org=RESET_OFFSET)
    reset.labels["start"] = 0
    reset.jmp_near("start")  # the first instruction the CPU runs
    image[RESET_OFFSET : RESET_OFFSET + len(reset.code)] = reset.assemble()
    return bytes(image)


# --- the CPUID program -------------------------------------------------------


def _emit_bytes(a: Asm, name: str, start: int, end: int) -> None:
    """Send image bytes [start, end) to the port in DX."""
    a.emit(mov_r16_imm16(SI, start))  # mov si, start
    a.label(name)
    a.emit(mov_al_cs_si())  # mov al, cs:[si]
    a.emit(out_dx_al())  # out dx, al
    a.emit(inc_r16(SI))  # inc si
    a.emit(cmp_r16_imm16(SI, end))  # cmp si, end
    a.jb_short(name)  # jb name


def _emit_eax(a: Asm, *, checksum: bool) -> None:
    """Send EAX (4 bytes, little-endian) to the port in DX; fold it into EBP."""
    if checksum:
        a.emit(rol_r32_1(BP))  # rol ebp, 1
        a.emit(add_r32_r32(BP, AX))  # add ebp, eax
    for i in range(4):
        a.emit(out_dx_al())  # out dx, al
        if i < 3:
            a.emit(shr_r32_imm8(AX, 8))  # shr eax, 8


def _program(prefix: tuple[int, int], queries: tuple[int, int], end: tuple[int, int],
             idt_ptr: int, msrs: tuple[int, int] | None = None) -> bytes:
    a = Asm(org=0)
    a.label("start")
    a.emit(cli())  # cli: nothing may interrupt a guest without an IDT
    a.emit(mov_r16_imm16(DX, COM1))  # mov dx, 0x3f8
    _emit_bytes(a, "prefix", *prefix)  # start marker, count, digest
    a.emit(xor_r32_r32(BP, BP))  # xor ebp, ebp: checksum = 0
    a.emit(mov_r16_imm16(SI, queries[0]))  # mov si, first query
    a.label("next")
    a.emit(cmp_r16_imm16(SI, queries[1]))  # cmp si, end of queries
    a.jae_near("done")  # jae done
    a.emit(mov_r32_cs_si_disp8(AX, 0))  # mov eax, cs:[si]   (leaf)
    a.emit(mov_r32_cs_si_disp8(CX, 4))  # mov ecx, cs:[si+4] (subleaf)
    a.emit(cpuid())  # cpuid
    a.emit(mov_r32_r32(DI, DX))  # mov edi, edx: DX is needed for the port
    a.emit(mov_r16_imm16(DX, COM1))  # mov dx, 0x3f8
    _emit_eax(a, checksum=True)  # eax
    a.emit(mov_r32_r32(AX, BX))  # mov eax, ebx
    _emit_eax(a, checksum=True)
    a.emit(mov_r32_r32(AX, CX))  # mov eax, ecx
    _emit_eax(a, checksum=True)
    a.emit(mov_r32_r32(AX, DI))  # mov eax, edi (the saved edx)
    _emit_eax(a, checksum=True)
    a.emit(add_r16_imm8(SI, QUERY_SIZE))  # add si, 8
    a.jmp_near("next")  # jmp next
    a.label("done")
    if msrs is not None:
        _msr_loop(a, msrs)
    a.emit(mov_r32_r32(AX, BP))  # mov eax, ebp
    _emit_eax(a, checksum=False)  # the checksum
    _emit_bytes(a, "suffix", *end)  # end marker
    _exit_sequence(a, idt_ptr)
    return a.assemble()


def _msr_loop(a: Asm, msrs: tuple[int, int]) -> None:
    """For each MSR query at cs:[si]: CPUID(gate), mask, RDMSR only if set."""
    a.emit(mov_r16_imm16(SI, msrs[0]))  # mov si, first MSR query
    a.label("mnext")
    a.emit(cmp_r16_imm16(SI, msrs[1]))  # cmp si, end of MSR queries
    a.jae_near("mdone")  # jae mdone
    a.emit(mov_r32_cs_si_disp8(AX, 4))  # mov eax, cs:[si+4]  (gate leaf)
    a.emit(mov_r32_cs_si_disp8(CX, 8))  # mov ecx, cs:[si+8]  (gate subleaf)
    a.emit(cpuid())  # cpuid: the guest's own answer
    a.emit(and_r32_cs_si_disp8(AX, 12))  # and eax, cs:[si+12]
    a.emit(and_r32_cs_si_disp8(BX, 16))  # and ebx, cs:[si+16]
    a.emit(and_r32_cs_si_disp8(CX, 20))  # and ecx, cs:[si+20]
    a.emit(and_r32_cs_si_disp8(DX, 24))  # and edx, cs:[si+24]
    a.emit(or_r32_r32(AX, BX))  # or eax, ebx
    a.emit(or_r32_r32(AX, CX))  # or eax, ecx
    a.emit(or_r32_r32(AX, DX))  # or eax, edx
    a.emit(test_rr32(AX, AX))  # test eax, eax
    a.jz_near("mabsent")  # jz mabsent: CPUID says the MSR does not exist
    a.emit(mov_r32_cs_si_disp8(CX, 0))  # mov ecx, cs:[si]  (MSR index)
    a.emit(rdmsr())  # rdmsr
    a.emit(mov_r32_r32(DI, DX))  # mov edi, edx: DX is needed for the port
    a.emit(mov_r32_r32(BX, AX))  # mov ebx, eax
    a.emit(mov_r16_imm16(DX, COM1))  # mov dx, 0x3f8
    a.emit(mov_r32_imm32(AX, 1))  # mov eax, 1: status "read"
    _emit_eax(a, checksum=True)
    a.emit(mov_r32_r32(AX, BX))  # mov eax, ebx (low half)
    _emit_eax(a, checksum=True)
    a.emit(mov_r32_r32(AX, DI))  # mov eax, edi (high half)
    _emit_eax(a, checksum=True)
    a.jmp_near("mstep")  # jmp mstep
    a.label("mabsent")
    a.emit(mov_r16_imm16(DX, COM1))  # mov dx, 0x3f8
    for _ in range(3):  # status 0, then two zero halves
        a.emit(xor_r32_r32(AX, AX))  # xor eax, eax
        _emit_eax(a, checksum=True)
    a.label("mstep")
    a.emit(add_r16_imm8(SI, MSR_QUERY_SIZE))  # add si, 28
    a.jmp_near("mnext")  # jmp mnext
    a.label("mdone")


def _exit_sequence(a: Asm, idt_ptr: int) -> None:
    a.emit(mov_al_imm8(DEBUG_EXIT_VALUE))  # mov al, 1
    a.emit(out_imm8_al(DEBUG_EXIT_PORT))  # out 0xf4, al: isa-debug-exit / raw KVM stop
    a.emit(mov_al_imm8(0xFE))  # mov al, 0xfe
    a.emit(out_imm8_al(0x64))  # out 0x64, al: keyboard controller pulses RESET
    a.emit(mov_r16_imm16(DX, 0xCF9))  # mov dx, 0xcf9
    a.emit(mov_al_imm8(0x06))  # mov al, 6
    a.emit(out_dx_al())  # out dx, al: PCI hard reset
    a.emit(lidt_cs_disp16(idt_ptr))  # lidt cs:[idt_ptr]: limit 0
    a.emit(int3())  # int3: #GP, #DF, triple fault -> shutdown
    a.label("halt")
    a.emit(hlt())  # hlt
    a.jmp_short("halt")  # jmp halt


def _validate(queries: Sequence[Query]) -> tuple[Query, ...]:
    out = tuple((int(leaf), int(subleaf)) for leaf, subleaf in queries)
    if len(out) > MAX_QUERIES:
        raise ValueError(f"{len(out)} queries do not fit in the image (at most {MAX_QUERIES})")
    for leaf, subleaf in out:
        if not (0 <= leaf <= _U32 and 0 <= subleaf <= _U32):
            raise ValueError(f"query ({leaf:#x}, {subleaf:#x}) is not a pair of 32-bit values")
    if len(set(out)) != len(out):
        raise ValueError("duplicate (leaf, subleaf) queries")
    return out


def _validate_msrs(msrs: Sequence[MsrQuery]) -> tuple[MsrQuery, ...]:
    out: tuple[MsrQuery, ...] = tuple(tuple(int(v) for v in m) for m in msrs)  # type: ignore[misc]
    if len(out) > MAX_MSR_QUERIES:
        raise ValueError(f"{len(out)} MSR queries (at most {MAX_MSR_QUERIES})")
    for m in out:
        if len(m) != 7 or not all(0 <= v <= _U32 for v in m):
            raise ValueError(f"MSR query {m!r} is not seven 32-bit values")
        if not any(m[3:]):
            raise ValueError(f"MSR query {m[0]:#x} has no gate bit (the guest would never "
                             "read it)")  # fmt: skip
    if len({m[0] for m in out}) != len(out):
        raise ValueError("duplicate MSR queries")
    return out


def msr_query(index: int, gate: tuple[int, int, str, int] | None) -> MsrQuery:
    """The query of MSR `index`, read when CPUID(leaf, subleaf).reg[bit] is
    set (gate); None: an MSR every x86 CPU with RDMSR has, gated by
    CPUID.01H:EDX[5] (MSR)."""
    leaf, subleaf, reg, bit = gate if gate is not None else (1, 0, "edx", 5)
    masks = [0, 0, 0, 0]
    masks[REGISTERS.index(reg)] = 1 << bit
    return (index, leaf, subleaf, masks[0], masks[1], masks[2], masks[3])


def query_digest(queries: Sequence[Query], msrs: Sequence[MsrQuery] = ()) -> int:
    """crc32 of the packed query list (and MSR queries, when there are any),
    echoed by the guest in its header."""
    packed = b"".join(struct.pack("<II", leaf, sub) for leaf, sub in queries)
    packed += b"".join(struct.pack("<7I", *m) for m in msrs)
    return zlib.crc32(packed)


def frame_size(count: int, msr_count: int = 0) -> int:
    """Bytes the guest writes for `count` queries and `msr_count` MSR queries."""
    return len(START_MARKER) + 8 + 16 * count + 12 * msr_count + 4 + len(END_MARKER)


def build(queries: Sequence[Query], msrs: Sequence[MsrQuery] = ()) -> bytes:
    """The 64 KiB image that answers `queries` (at most MAX_QUERIES distinct
    (leaf, subleaf) pairs) and reads the MSRs of `msrs` its CPUID says exist.
    Cached: the same lists give the same bytes object."""
    qs, ms = _validate(queries), _validate_msrs(msrs)
    if QUERY_OFFSET + QUERY_SIZE * len(qs) + MSR_QUERY_SIZE * len(ms) > RESET_OFFSET:
        raise ValueError("the queries and MSR queries do not fit in the image")
    return _build(qs, ms)


@lru_cache(maxsize=32)
def _build(queries: tuple[Query, ...], msrs: tuple[MsrQuery, ...] = ()) -> bytes:
    prefix = START_MARKER + struct.pack("<II", len(queries), query_digest(queries, msrs))
    prefix_at = CONST_OFFSET
    end_at = prefix_at + len(prefix)
    idt_at = end_at + len(END_MARKER)
    idt = struct.pack("<HI", 0, 0)  # IDT pointer: limit 0, base 0
    table = b"".join(struct.pack("<II", leaf, sub) for leaf, sub in queries)
    msr_at = QUERY_OFFSET + len(table)
    table += b"".join(struct.pack("<7I", *m) for m in msrs)
    code = _program(
        (prefix_at, prefix_at + len(prefix)),
        (QUERY_OFFSET, msr_at),
        (end_at, end_at + len(END_MARKER)),
        idt_at,
        (msr_at, QUERY_OFFSET + len(table)) if msrs else None,
    )
    if len(code) > CONST_OFFSET:
        raise AssertionError(f"code is {len(code)} bytes, overlaps the constants")
    return flat_image(
        code,
        data=[(prefix_at, prefix), (end_at, END_MARKER), (idt_at, idt), (QUERY_OFFSET, table)],
    )


def _checksum(words: Iterable[int]) -> int:
    c = 0
    for w in words:
        c = (((c << 1) | (c >> 31)) + w) & _U32
    return c


def encode(queries: Sequence[Query], table: CpuidTable, msrs: Sequence[MsrQuery] = (),
           values: Mapping[int, int] | None = None) -> bytes:  # fmt: skip
    """The bytes a guest whose CPUID answers from `table` writes for
    `queries` (0 where the table has no entry) and, for `msrs`, its RDMSR of
    each that `table` gates on (`values`, 0 where missing): for testing
    backends."""
    qs, ms = _validate(queries), _validate_msrs(msrs)
    words = [table.get(leaf, sub, reg) for leaf, sub in qs for reg in REGISTERS]
    for m in ms:
        if _gated_on(m, table):
            v = (values or {}).get(m[0], 0)
            words += [1, v & _U32, v >> 32 & _U32]
        else:
            words += [0, 0, 0]
    return b"".join(
        (
            START_MARKER,
            struct.pack("<II", len(qs), query_digest(qs, ms)),
            struct.pack(f"<{len(words)}I", *words),
            struct.pack("<I", _checksum(words)),
            END_MARKER,
        )
    )


def _gated_on(m: MsrQuery, table: CpuidTable) -> bool:
    return any(table.get(m[1], m[2], r) & mask for r, mask in zip(REGISTERS, m[3:], strict=True))


def parse(serial: bytes, queries: Sequence[Query]) -> CpuidTable:
    """The guest's answers as a CpuidTable, in query order. Bytes before the
    start marker (firmware chatter) are ignored; a missing marker, a short
    stream, a wrong header or a bad checksum raise ProbeError."""
    return parse_msrs(serial, queries, ())[0]


def parse_msrs(serial: bytes, queries: Sequence[Query], msrs: Sequence[MsrQuery]
               ) -> tuple[CpuidTable, dict[int, int | None]]:  # fmt: skip
    """parse(), and the guest's RDMSR answers: MSR index -> value, None
    where its own CPUID said the MSR does not exist (not read)."""
    qs, ms = _validate(queries), _validate_msrs(msrs)
    size = frame_size(len(qs), len(ms))
    start = serial.find(START_MARKER)
    if start < 0:
        raise ProbeError(f"no start marker in {len(serial)} bytes of guest serial output")
    frame = serial[start : start + size]
    if len(frame) < size:
        raise ProbeError(
            f"guest serial output truncated: {len(frame)} of {size} bytes "
            "after the start marker"
        )
    pos = len(START_MARKER)
    count, digest = struct.unpack_from("<II", frame, pos)
    pos += 8
    if count != len(qs) or digest != query_digest(qs, ms):
        raise ProbeError(
            f"guest answered a different query list ({count} queries, digest {digest:#010x}; "
            f"expected {len(qs)}, {query_digest(qs, ms):#010x})"
        )
    words = struct.unpack_from(f"<{4 * count + 3 * len(ms)}I", frame, pos)
    pos += 16 * count + 12 * len(ms)
    (checksum,) = struct.unpack_from("<I", frame, pos)
    pos += 4
    if frame[pos:] != END_MARKER:
        raise ProbeError("no end marker after the guest's answers")
    if checksum != _checksum(words):
        raise ProbeError(
            f"guest output checksum mismatch ({checksum:#010x}, computed "
            f"{_checksum(words):#010x})"
        )
    answers: dict[int, int | None] = {}
    for j, m in enumerate(ms):
        status, low, high = words[4 * count + 3 * j : 4 * count + 3 * j + 3]
        if status not in (0, 1) or (status == 0 and (low or high)):
            raise ProbeError(f"guest's answer for MSR {m[0]:#x} is malformed")
        answers[m[0]] = high << 32 | low if status else None
    multi = {leaf for leaf, sub in qs if sub != 0}
    entries = []
    for i, (leaf, sub) in enumerate(qs):
        indexed = leaf in INDEXED_LEAVES or leaf in multi
        eax, ebx, ecx, edx = words[4 * i : 4 * i + 4]
        entries.append(
            CpuidEntry(
                function=leaf,
                index=sub,
                flags=EntryFlag.SIGNIFICANT_INDEX if indexed else EntryFlag.NONE,
                eax=eax,
                ebx=ebx,
                ecx=ecx,
                edx=edx,
            )
        )
    return CpuidTable(entries), answers


# Ranges are read from tables that may come from other hosts: bound them.
_MAX_RANGE: Final = 0x100


def default_queries(table: CpuidTable) -> list[Query]:
    """Every (function, index) of `table`, plus subleaf 0 of every leaf in the
    basic (0..max), hypervisor (0x40000000..max) and extended
    (0x80000000..max) ranges the table announces; sorted, without duplicates."""
    found: set[Query] = set(table.keys())
    for base in (0x0, 0x40000000, 0x80000000):
        found.add((base, 0))
        top = table.get(base, 0, "eax")
        if base <= top < base + _MAX_RANGE:
            found.update((leaf, 0) for leaf in range(base, top + 1))
    result = sorted(found)
    if len(result) > MAX_QUERIES:
        raise ValueError(f"table needs {len(result)} queries, the image holds {MAX_QUERIES}")
    return result
