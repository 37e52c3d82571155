"""The multi-vCPU guest image: every vCPU runs CPUID for the queries the
host embedded, and the bootstrap processor writes all the answers to COM1.

Same 64 KiB flat firmware as probe/image.py (its encoder helpers and
`flat_image`), 16-bit real mode, plus RAM (a data segment at DS = 0x0100,
physical 0x1000) for the other vCPUs' answers. Flow:

  every vCPU: DS = 0x0100; RDMSR IA32_APIC_BASE (0x1B): bit 8 says BSP.
  BSP: when the image says so (QEMU, libvirt: the APs wait for a SIPI),
       turn on x2APIC mode (IA32_APIC_BASE bits 10-11) and send INIT, then
       SIPI twice, with vector 0xF0 to all but itself through the x2APIC
       ICR (MSR 0x830; Intel SDM Vol. 3A 10.12.9, 8.4.4.1): the APs start
       in real mode at CS:IP = F000:0000, physical 0xF0000, where QEMU's pc
       machine maps the last 64 KiB of the BIOS (the isa-bios alias), which
       is offset 0 of this image, the entry the BSP also starts from.
       Then wait (bounded, `pause` in the loop) until `aps` APs reported.
       Then write: START_MARKER, count, digest, the number of vCPUs that
       reported (u32, the BSP included), the BSP's own answers, each AP's
       (4 x u32 per query, in the order the APs took their slots), a
       checksum over every answer dword, END_MARKER; then exit as
       probe/image.py does.
  AP:  take a slot (LOCK XADD on a ticket in RAM), write its answers there,
       count itself done (LOCK INC), halt with interrupts off.

Each vCPU's answers carry its own APIC IDs (CPUID 1 EBX[31:24], 0xB EDX,
0x8000001E EAX), so the host tells them apart without trusting the order.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib
from collections.abc import Sequence
from functools import lru_cache
from typing import Final

from kvmcpuid_virt.cpuid.table import REGISTERS, CpuidEntry, CpuidTable, EntryFlag
from kvmcpuid_virt.errors import ProbeError
from kvmcpuid_virt.probe import image
from kvmcpuid_virt.probe.image import (
    AX,
    BP,
    BX,
    CX,
    DI,
    DX,
    SI,
    Asm,
    add_r16_imm8,
    add_r32_r32,
    cli,
    cmp_r16_imm16,
    cpuid,
    hlt,
    mov_al_cs_si,
    mov_r16_imm16,
    mov_r32_cs_si_disp8,
    mov_r32_imm32,
    mov_r32_r32,
    out_dx_al,
    rdmsr,
    rol_r32_1,
    shr_r32_imm8,
    xor_r32_r32,
)

__all__ = ["MAX_VCPUS", "START_MARKER", "SmpResult", "ap_entry", "build", "encode", "parse"]

START_MARKER: Final = b"\x7fKCPSMP\x01"
END_MARKER: Final = image.END_MARKER
MAX_VCPUS: Final = 64
_U32: Final = 0xFFFF_FFFF

DATA_SEGMENT: Final = 0x0100  # DS: physical 0x1000, RAM on every backend
TICKET: Final = 0x0000  # u32 in DS: the next AP slot
DONE: Final = 0x0004  # u32 in DS: APs that finished
SNAP: Final = 0x0008  # u32 in DS: APs the BSP reports (DONE when it started writing)
AP_BASE: Final = 0x0010  # the AP slots, 16 bytes per query each
SIPI_VECTOR: Final = 0xF0  # the APs start at physical 0xF0000 (image offset 0)
# The BSP waits for the APs until the TSC's high half has moved on by this
# much (2^33 to 2^34 cycles: about 3 to 9 s at 2 to 3 GHz; the APs of a
# healthy guest report within milliseconds), then reports whoever answered.
# Counted in TSC, not polls: under nested virtualization one `pause` costs an
# exit, and 2^26 polls took over 30 s here.
WAIT_TSC_HIGH: Final = 2
APIC_BASE_MSR: Final = 0x1B
X2APIC_ICR_MSR: Final = 0x830
ICR_INIT_ALL_BUT_SELF: Final = 0x000C_4500  # INIT, level assert, shorthand 11
ICR_SIPI_ALL_BUT_SELF: Final = 0x000C_4600 | SIPI_VECTOR

CONST_OFFSET: Final = 0x0400  # constants: prefix, AP count, flags, markers, IDT pointer
QUERY_OFFSET: Final = 0x0600
MAX_QUERIES: Final = 0x200

Query = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class SmpResult:
    """What each vCPU of a multi-vCPU guest saw (the BSP's first), by
    reporting order; `vcpus`: how many the guest was started with."""

    tables: tuple[CpuidTable, ...]
    vcpus: int
    seconds: float
    diagnostics: tuple[str, ...] = ()


class _Asm(Asm):
    def jb_near(self, target: str) -> None:
        self._rel(b"\x0f\x82", 2, target)  # jb rel16  (0F 82 cw)


def _u16(v: int) -> bytes:
    return (v & 0xFFFF).to_bytes(2, "little")


def _u32(v: int) -> bytes:
    return (v & _U32).to_bytes(4, "little")


def mov_ds_ax() -> bytes:
    return b"\x8e\xd8"  # mov ds, ax  (8E /r)


def wrmsr() -> bytes:
    return b"\x0f\x30"  # wrmsr: MSR[ecx] = edx:eax


def test_eax_imm32(v: int) -> bytes:
    return b"\x66\xa9" + _u32(v)  # test eax, imm32  (66 A9 id)


def or_eax_imm32(v: int) -> bytes:
    return b"\x66\x0d" + _u32(v)  # or eax, imm32  (66 0D id)


def cmp_cs_byte_imm8(offset: int, v: int) -> bytes:
    return b"\x2e\x80\x3e" + _u16(offset) + bytes([v])  # cmp byte cs:[disp16], imm8  (80 /7 ib)


def mov_eax_ds_disp16(offset: int) -> bytes:
    return b"\x66\xa1" + _u16(offset)  # mov eax, ds:[moffs16]  (66 A1)


def mov_ds_disp16_eax(offset: int) -> bytes:
    return b"\x66\xa3" + _u16(offset)  # mov ds:[moffs16], eax  (66 A3)


def cmp_eax_cs_disp16(offset: int) -> bytes:
    return b"\x2e\x66\x3b\x06" + _u16(offset)  # cmp eax, cs:[disp16]  (66 3B /r)


def pause() -> bytes:
    return b"\xf3\x90"  # pause


def rdtsc() -> bytes:
    return b"\x0f\x31"  # rdtsc: edx:eax = TSC


def sub_r32_r32(dst: int, src: int) -> bytes:
    return bytes([0x66, 0x29, 0xC0 | src << 3 | dst])  # sub r32, r32  (66 29 /r)


def cmp_r32_imm8(reg: int, v: int) -> bytes:
    return bytes([0x66, 0x83, 0xF8 | reg, v])  # cmp r32, imm8  (66 83 /7 ib)


def lock_xadd_ds_disp16_eax(offset: int) -> bytes:
    return b"\xf0\x66\x0f\xc1\x06" + _u16(offset)  # lock xadd ds:[disp16], eax  (0F C1 /r)


def lock_inc_ds_dword(offset: int) -> bytes:
    return b"\xf0\x66\xff\x06" + _u16(offset)  # lock inc dword ds:[disp16]  (FF /0)


def imul_r16_r16_imm16(dst: int, src: int, v: int) -> bytes:
    return bytes([0x69, 0xC0 | dst << 3 | src]) + _u16(v)  # imul r16, r/m16, imm16  (69 /r iw)


def add_r16_imm16(reg: int, v: int) -> bytes:
    return bytes([0x81, 0xC0 | reg]) + _u16(v)  # add r16, imm16  (81 /0 iw)


def mov_ds_di_disp8_r32(disp: int, reg: int) -> bytes:
    return bytes([0x66, 0x89, 0x40 | reg << 3 | 0b101, disp])  # mov ds:[di+disp8], r32


def mov_eax_ds_si() -> bytes:
    return b"\x66\x8b\x04"  # mov eax, ds:[si]  (66 8B /r, mod=00 rm=100)


def cmp_r16_r16(a: int, b: int) -> bytes:
    return bytes([0x39, 0xC0 | b << 3 | a])  # cmp a, b  (39 /r: r/m16 - r16)


def _emit_eax(a: Asm, *, checksum: bool) -> None:
    """EAX to the port in DX, little-endian; folded into EBP (as image.py)."""
    if checksum:
        a.emit(rol_r32_1(BP))  # rol ebp, 1
        a.emit(add_r32_r32(BP, AX))  # add ebp, eax
    for i in range(4):
        a.emit(out_dx_al())  # out dx, al
        if i < 3:
            a.emit(shr_r32_imm8(AX, 8))  # shr eax, 8


def _emit_cs_bytes(a: Asm, name: str, start: int, end: int) -> None:
    a.emit(mov_r16_imm16(SI, start))  # mov si, start
    a.label(name)
    a.emit(mov_al_cs_si())  # mov al, cs:[si]
    a.emit(out_dx_al())  # out dx, al
    a.emit(b"\x46")  # inc si
    a.emit(cmp_r16_imm16(SI, end))  # cmp si, end
    a.jb_short(name)  # jb name


class _Layout:
    def __init__(self, count: int, digest: int, aps: int, sipi: bool) -> None:
        self.prefix = START_MARKER + struct.pack("<II", count, digest)
        self.prefix_at = CONST_OFFSET
        self.aps_at = self.prefix_at + len(self.prefix)
        self.sipi_at = self.aps_at + 4
        self.end_at = self.sipi_at + 4
        self.idt_at = self.end_at + len(END_MARKER)
        self.consts = self.prefix + struct.pack("<II", aps, int(sipi)) + END_MARKER + \
            struct.pack("<HI", 0, 0)  # fmt: skip
        self.queries = (QUERY_OFFSET, QUERY_OFFSET + 8 * count)
        self.slot = 16 * count
        self.sipi = sipi


def _program(lay: _Layout) -> tuple[bytes, int]:
    a = _Asm(org=0)
    a.label("start")
    a.emit(cli())  # cli: no IDT
    a.emit(mov_r16_imm16(AX, DATA_SEGMENT))  # mov ax, 0x100
    a.emit(mov_ds_ax())  # mov ds, ax
    if not lay.sipi:
        # Raw KVM: the host starts each AP at ap_entry(); whoever starts here
        # is the BSP (without an in-kernel APIC there is no BSP flag to read).
        a.jmp_near("wait")
    a.emit(mov_r32_imm32(CX, APIC_BASE_MSR))  # mov ecx, 0x1b
    a.emit(rdmsr())  # rdmsr: IA32_APIC_BASE
    a.emit(test_eax_imm32(1 << 8))  # test eax, BSP
    a.jz_near("ap")  # jz ap
    # --- the BSP
    a.emit(cmp_cs_byte_imm8(lay.sipi_at, 0))  # cmp byte cs:[sipi], 0
    a.jz_near("wait")  # jz wait: the APs run already (raw KVM)
    a.emit(or_eax_imm32(0xC00))  # or eax, EN | EXTD: x2APIC mode
    a.emit(wrmsr())  # wrmsr (ecx = 0x1b, edx as read)
    a.emit(mov_r32_imm32(CX, X2APIC_ICR_MSR))  # mov ecx, 0x830
    a.emit(xor_r32_r32(DX, DX))  # xor edx, edx
    a.emit(mov_r32_imm32(AX, ICR_INIT_ALL_BUT_SELF))  # mov eax, INIT
    a.emit(wrmsr())  # wrmsr
    a.emit(mov_r32_imm32(AX, ICR_SIPI_ALL_BUT_SELF))  # mov eax, SIPI
    a.emit(wrmsr())  # wrmsr
    a.emit(wrmsr())  # wrmsr: the second SIPI, as the SDM's sequence has it
    a.label("wait")
    a.emit(rdtsc())  # rdtsc
    a.emit(mov_r32_r32(SI, DX))  # mov esi, edx: the TSC's high half at the start
    a.label("poll")
    a.emit(mov_eax_ds_disp16(DONE))  # mov eax, ds:[done]
    a.emit(cmp_eax_cs_disp16(lay.aps_at))  # cmp eax, cs:[aps]
    a.jae_near("report")  # jae report
    a.emit(pause())  # pause
    a.emit(rdtsc())  # rdtsc
    a.emit(sub_r32_r32(DX, SI))  # sub edx, esi
    a.emit(cmp_r32_imm8(DX, WAIT_TSC_HIGH))  # cmp edx, 2
    a.jb_near("poll")  # jb poll
    a.label("report")
    a.emit(mov_r16_imm16(DX, image.COM1))  # mov dx, 0x3f8
    _emit_cs_bytes(a, "prefix", lay.prefix_at, lay.prefix_at + len(lay.prefix))
    a.emit(mov_eax_ds_disp16(DONE))  # mov eax, ds:[done]
    a.emit(mov_ds_disp16_eax(SNAP))  # mov ds:[snap], eax: the APs reported
    a.emit(b"\x66\x40")  # inc eax: and the BSP
    _emit_eax(a, checksum=False)
    a.emit(xor_r32_r32(BP, BP))  # xor ebp, ebp: checksum = 0
    a.emit(mov_r16_imm16(SI, lay.queries[0]))  # mov si, first query
    a.label("next")
    a.emit(cmp_r16_imm16(SI, lay.queries[1]))  # cmp si, end of queries
    a.jae_near("aps")  # jae aps
    a.emit(mov_r32_cs_si_disp8(AX, 0))  # mov eax, cs:[si]
    a.emit(mov_r32_cs_si_disp8(CX, 4))  # mov ecx, cs:[si+4]
    a.emit(cpuid())  # cpuid
    a.emit(mov_r32_r32(DI, DX))  # mov edi, edx
    a.emit(mov_r16_imm16(DX, image.COM1))  # mov dx, 0x3f8
    _emit_eax(a, checksum=True)  # eax
    a.emit(mov_r32_r32(AX, BX))  # mov eax, ebx
    _emit_eax(a, checksum=True)
    a.emit(mov_r32_r32(AX, CX))  # mov eax, ecx
    _emit_eax(a, checksum=True)
    a.emit(mov_r32_r32(AX, DI))  # mov eax, edi
    _emit_eax(a, checksum=True)
    a.emit(add_r16_imm8(SI, image.QUERY_SIZE))  # add si, 8
    a.jmp_near("next")
    a.label("aps")
    a.emit(mov_eax_ds_disp16(SNAP))  # mov eax, ds:[snap]
    a.emit(mov_r32_r32(BX, AX))  # mov ebx, eax
    a.emit(imul_r16_r16_imm16(BX, BX, lay.slot))  # imul bx, bx, slot: bytes of AP answers
    a.emit(add_r16_imm16(BX, AP_BASE))  # add bx, AP_BASE: their end
    a.emit(mov_r16_imm16(SI, AP_BASE))  # mov si, AP_BASE
    a.label("apnext")
    a.emit(cmp_r16_r16(SI, BX))  # cmp si, bx
    a.jae_near("sum")  # jae sum
    a.emit(mov_eax_ds_si())  # mov eax, ds:[si]
    _emit_eax(a, checksum=True)
    a.emit(add_r16_imm8(SI, 4))  # add si, 4
    a.jmp_near("apnext")
    a.label("sum")
    a.emit(mov_r32_r32(AX, BP))  # mov eax, ebp
    _emit_eax(a, checksum=False)  # the checksum
    _emit_cs_bytes(a, "suffix", lay.end_at, lay.end_at + len(END_MARKER))
    image._exit_sequence(a, lay.idt_at)
    # --- an AP
    a.label("ap")
    a.emit(mov_r32_imm32(AX, 1))  # mov eax, 1
    a.emit(lock_xadd_ds_disp16_eax(TICKET))  # lock xadd ds:[ticket], eax: eax = my slot
    a.emit(imul_r16_r16_imm16(DI, AX, lay.slot))  # imul di, ax, slot
    a.emit(add_r16_imm16(DI, AP_BASE))  # add di, AP_BASE
    a.emit(mov_r16_imm16(SI, lay.queries[0]))  # mov si, first query
    a.label("apq")
    a.emit(cmp_r16_imm16(SI, lay.queries[1]))  # cmp si, end of queries
    a.jae_near("apdone")
    a.emit(mov_r32_cs_si_disp8(AX, 0))  # mov eax, cs:[si]
    a.emit(mov_r32_cs_si_disp8(CX, 4))  # mov ecx, cs:[si+4]
    a.emit(cpuid())  # cpuid
    for i, reg in enumerate((AX, BX, CX, DX)):
        a.emit(mov_ds_di_disp8_r32(4 * i, reg))  # mov ds:[di+4i], reg
    a.emit(add_r16_imm8(DI, 16))  # add di, 16
    a.emit(add_r16_imm8(SI, image.QUERY_SIZE))  # add si, 8
    a.jmp_near("apq")
    a.label("apdone")
    a.emit(lock_inc_ds_dword(DONE))  # lock inc dword ds:[done]
    a.label("aphalt")
    a.emit(cli())  # cli
    a.emit(hlt())  # hlt
    a.jmp_short("aphalt")
    a.label("ap_entry")  # raw KVM's APs start here (CS base as at reset)
    a.emit(cli())  # cli
    a.emit(mov_r16_imm16(AX, DATA_SEGMENT))  # mov ax, 0x100
    a.emit(mov_ds_ax())  # mov ds, ax
    a.jmp_near("ap")
    return a.assemble(), a.labels["ap_entry"]


def _digest(queries: Sequence[Query], aps: int) -> int:
    packed = b"".join(struct.pack("<II", leaf, sub) for leaf, sub in queries)
    return zlib.crc32(packed + struct.pack("<I", aps))


def build(queries: Sequence[Query], vcpus: int, *, sipi: bool) -> bytes:
    """The image for `vcpus` vCPUs (the BSP and vcpus-1 APs); sipi: the BSP
    starts the APs (QEMU, libvirt), else they run from reset (raw KVM)."""
    qs = tuple((int(a), int(b)) for a, b in queries)
    if not 1 <= vcpus <= MAX_VCPUS:
        raise ValueError(f"{vcpus} vCPUs: 1 to {MAX_VCPUS}")
    if not qs or len(qs) > MAX_QUERIES or len(set(qs)) != len(qs):
        raise ValueError(f"1 to {MAX_QUERIES} distinct queries, not {len(qs)}")
    if AP_BASE + 16 * len(qs) * (vcpus - 1) > 0xFFFF:
        raise ValueError("the APs' answers do not fit in the data segment")
    return _build(qs, vcpus, sipi)


@lru_cache(maxsize=16)
def _build(qs: tuple[Query, ...], vcpus: int, sipi: bool) -> bytes:
    return _assembled(qs, vcpus, sipi)[0]


def ap_entry(queries: Sequence[Query], vcpus: int) -> int:
    """Where raw KVM starts each AP of build(..., sipi=False): the image
    offset, which is the IP with the reset-state CS base 0xFFFF0000."""
    return _assembled(tuple((int(a), int(b)) for a, b in queries), vcpus, False)[1]


@lru_cache(maxsize=16)
def _assembled(qs: tuple[Query, ...], vcpus: int, sipi: bool) -> tuple[bytes, int]:
    lay = _Layout(len(qs), _digest(qs, vcpus - 1), vcpus - 1, sipi)
    code, entry = _program(lay)
    if len(code) > CONST_OFFSET:
        raise AssertionError(f"code is {len(code)} bytes, overlaps the constants")
    table = b"".join(struct.pack("<II", leaf, sub) for leaf, sub in qs)
    return image.flat_image(code, data=[(CONST_OFFSET, lay.consts),
                                        (QUERY_OFFSET, table)]), entry  # fmt: skip


def _checksum(words: Sequence[int]) -> int:
    c = 0
    for w in words:
        c = (((c << 1) | (c >> 31)) + w) & _U32
    return c


def encode(queries: Sequence[Query], vcpus: int, tables: Sequence[CpuidTable]) -> bytes:
    """What the guest writes when its vCPUs answer from `tables` (the BSP's
    first): for testing the parser."""
    qs = tuple(queries)
    words = [t.get(leaf, sub, reg) for t in tables for leaf, sub in qs for reg in REGISTERS]
    return b"".join((START_MARKER, struct.pack("<III", len(qs), _digest(qs, vcpus - 1),
                                               len(tables)),
                     struct.pack(f"<{len(words)}I", *words), struct.pack("<I", _checksum(words)),
                     END_MARKER))  # fmt: skip


def parse(serial: bytes, queries: Sequence[Query], vcpus: int) -> list[CpuidTable]:
    """Each reporting vCPU's answers (the BSP's first); ProbeError for a
    missing marker, a short or damaged frame. Fewer vCPUs than `vcpus` is
    not an error here: the caller says what it means."""
    qs = tuple(queries)
    start = serial.find(START_MARKER)
    if start < 0:
        raise ProbeError(f"no SMP start marker in {len(serial)} bytes of guest serial output")
    head = serial[start + len(START_MARKER): start + len(START_MARKER) + 12]
    if len(head) < 12:
        raise ProbeError("the SMP guest's output ends inside its header")
    count, digest, n = struct.unpack("<III", head)
    if count != len(qs) or digest != _digest(qs, vcpus - 1):
        raise ProbeError("the SMP guest's header does not match the queries it was given")
    if not 1 <= n <= vcpus:
        raise ProbeError(f"the SMP guest says {n} vCPUs reported, of {vcpus}")
    body_at = start + len(START_MARKER) + 12
    size = 16 * count * n
    body = serial[body_at: body_at + size + 4 + len(END_MARKER)]
    if len(body) < size + 4 + len(END_MARKER):
        raise ProbeError(f"the SMP guest's output is short ({len(body)} of "
                         f"{size + 4 + len(END_MARKER)} bytes after the header)")  # fmt: skip
    words = struct.unpack(f"<{4 * count * n}I", body[:size])
    if struct.unpack("<I", body[size:size + 4])[0] != _checksum(words) or \
            body[size + 4:] != END_MARKER:  # fmt: skip
        raise ProbeError("the SMP guest's output fails its checksum or end marker")
    out = []
    for cpu in range(n):
        entries = []
        for i, (leaf, sub) in enumerate(qs):
            w = words[4 * (cpu * count + i): 4 * (cpu * count + i) + 4]
            entries.append(CpuidEntry(leaf, sub, EntryFlag.SIGNIFICANT_INDEX, *w))
        out.append(CpuidTable(entries))
    return out
