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
    checksum       u32      c = rol32(c, 1) + dword over every result dword
    END_MARKER     8 bytes  b"\\x7fKCPEND\\x01"

Then the guest exits: `out 0xF4, al` (QEMU isa-debug-exit; raw KVM sees a
KVM_EXIT_IO), a keyboard-controller reset (0xFE to port 0x64) and a PCI reset
(0x06 to port 0xCF9) that libvirt turns into a destroy with
<on_reboot>destroy</on_reboot>, a triple fault (IDT limit 0, then int3), and
a HLT loop as the last resort.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Sequence
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
    "build",
    "default_queries",
    "encode",
    "flat_image",
    "frame_size",
    "parse",
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
             idt_ptr: int) -> bytes:
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
    a.emit(mov_r32_r32(AX, BP))  # mov eax, ebp
    _emit_eax(a, checksum=False)  # the checksum
    _emit_bytes(a, "suffix", *end)  # end marker
    _exit_sequence(a, idt_ptr)
    return a.assemble()


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


def query_digest(queries: Sequence[Query]) -> int:
    """crc32 of the packed query list, echoed by the guest in its header."""
    return zlib.crc32(b"".join(struct.pack("<II", leaf, sub) for leaf, sub in queries))


def frame_size(count: int) -> int:
    """Bytes the guest writes for `count` queries."""
    return len(START_MARKER) + 8 + 16 * count + 4 + len(END_MARKER)


def build(queries: Sequence[Query]) -> bytes:
    """The 64 KiB image that answers `queries` (at most MAX_QUERIES distinct
    (leaf, subleaf) pairs). Cached: the same list gives the same bytes object."""
    return _build(_validate(queries))


@lru_cache(maxsize=32)
def _build(queries: tuple[Query, ...]) -> bytes:
    prefix = START_MARKER + struct.pack("<II", len(queries), query_digest(queries))
    prefix_at = CONST_OFFSET
    end_at = prefix_at + len(prefix)
    idt_at = end_at + len(END_MARKER)
    idt = struct.pack("<HI", 0, 0)  # IDT pointer: limit 0, base 0
    table = b"".join(struct.pack("<II", leaf, sub) for leaf, sub in queries)
    code = _program(
        (prefix_at, prefix_at + len(prefix)),
        (QUERY_OFFSET, QUERY_OFFSET + len(table)),
        (end_at, end_at + len(END_MARKER)),
        idt_at,
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


def encode(queries: Sequence[Query], table: CpuidTable) -> bytes:
    """The bytes a guest whose CPUID answers from `table` writes for
    `queries` (0 where the table has no entry): for testing backends."""
    qs = _validate(queries)
    words = [table.get(leaf, sub, reg) for leaf, sub in qs for reg in REGISTERS]
    return b"".join(
        (
            START_MARKER,
            struct.pack("<II", len(qs), query_digest(qs)),
            struct.pack(f"<{len(words)}I", *words),
            struct.pack("<I", _checksum(words)),
            END_MARKER,
        )
    )


def parse(serial: bytes, queries: Sequence[Query]) -> CpuidTable:
    """The guest's answers as a CpuidTable, in query order. Bytes before the
    start marker (firmware chatter) are ignored; a missing marker, a short
    stream, a wrong header or a bad checksum raise ProbeError."""
    qs = _validate(queries)
    start = serial.find(START_MARKER)
    if start < 0:
        raise ProbeError(f"no start marker in {len(serial)} bytes of guest serial output")
    frame = serial[start : start + frame_size(len(qs))]
    if len(frame) < frame_size(len(qs)):
        raise ProbeError(
            f"guest serial output truncated: {len(frame)} of {frame_size(len(qs))} bytes "
            "after the start marker"
        )
    pos = len(START_MARKER)
    count, digest = struct.unpack_from("<II", frame, pos)
    pos += 8
    if count != len(qs) or digest != query_digest(qs):
        raise ProbeError(
            f"guest answered a different query list ({count} queries, digest {digest:#010x}; "
            f"expected {len(qs)}, {query_digest(qs):#010x})"
        )
    words = struct.unpack_from(f"<{4 * count}I", frame, pos)
    pos += 16 * count
    (checksum,) = struct.unpack_from("<I", frame, pos)
    pos += 4
    if frame[pos:] != END_MARKER:
        raise ProbeError("no end marker after the guest's answers")
    if checksum != _checksum(words):
        raise ProbeError(
            f"guest output checksum mismatch ({checksum:#010x}, computed "
            f"{_checksum(words):#010x})"
        )
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
    return CpuidTable(entries)


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
