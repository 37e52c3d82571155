"""Per-bit, named differences between two hosts' CPUID (dumps of any format,
or configurations as the table a guest would get from them):
feature bits grouped by leaf/register as "only in A" / "only in B", the
non-flag fields that differ (vendor, family/model, max leaves, address sizes,
XSAVE), the feature-MSR bits (IA32_ARCH_CAPABILITIES' mds-no, ..., named by
cpuid/msr_features; only where both sides carry feature MSRs) and the
fingerprints (kernel, KVM API, QEMU, libvirt, microcode; feature MSRs that
hold a number, such as the microcode revision, are shown with them).

Only feature bits and fields decide whether two hosts differ; fingerprint
differences are shown but do not count (two identical CPUs on different
kernels offer a guest the same CPU). A leaf beyond a dump's max leaf reads as
zeros, as it does for a guest.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Final

from kvmcpuid_virt.analysis.baseline import require_vendor, word_value
from kvmcpuid_virt.cpuid import fields
from kvmcpuid_virt.cpuid.features import registry
from kvmcpuid_virt.cpuid.formats import Dump
from kvmcpuid_virt.cpuid.msr_features import MsrLayout, MsrRegistry, msr_registry
from kvmcpuid_virt.cpuid.table import Register

__all__ = [
    "FieldDiff", "HostDiff", "MsrDiff", "WordDiff", "diff", "render_json", "render_table",
]  # fmt: skip

# Metadata that differs on every run and says nothing about the host.
_VOLATILE: Final = frozenset({"time"})


@dataclasses.dataclass(frozen=True)
class WordDiff:
    leaf: int
    subleaf: int
    reg: Register
    only_a: tuple[str, ...]
    only_b: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"CPUID.{self.leaf:02X}H.{self.subleaf}:{self.reg.upper()}"


@dataclasses.dataclass(frozen=True)
class MsrDiff:
    """The named bits of one feature MSR that only one side has."""

    index: int
    name: str  # the SDM's, e.g. IA32_ARCH_CAPABILITIES
    only_a: tuple[str, ...]
    only_b: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"MSR {self.index:X}H"


@dataclasses.dataclass(frozen=True)
class FieldDiff:
    name: str
    a: str
    b: str


@dataclasses.dataclass(frozen=True)
class HostDiff:
    a: str
    b: str
    words: tuple[WordDiff, ...]
    fields: tuple[FieldDiff, ...]
    fingerprint: tuple[FieldDiff, ...]
    # What the caller wants said with the result (features a configuration
    # asked for that the host it was applied to cannot give).
    notes: tuple[str, ...] = ()
    msrs: tuple[MsrDiff, ...] = ()

    @property
    def identical(self) -> bool:
        return not self.words and not self.fields and not self.msrs


def _fields(d: Dump) -> dict[str, str]:
    t = d.table
    sig = fields.signature(t)
    addr = fields.address_sizes(t)
    xs = fields.xsave(t)

    def hx(v: int | None) -> str:
        return "-" if v is None else f"{v:#x}"

    return {
        "vendor": fields.vendor(t) or "-",
        "family/model/stepping": "-" if sig is None
        else f"{sig.family:#x}/{sig.model:#x}/{sig.stepping}",
        "brand": fields.brand_string(t) or "-",
        "max basic leaf": hx(fields.max_basic_leaf(t)),
        "max extended leaf": hx(fields.max_extended_leaf(t)),
        "max hypervisor leaf": hx(fields.max_hypervisor_leaf(t)),
        "physical/virtual address bits": "-" if addr is None
        else f"{addr.physical}/{addr.virtual}",
        "XCR0 components": "-" if xs is None else f"{xs.xcr0_mask:#x}",
        "XSAVE max size": "-" if xs is None else str(xs.max_size),
    }  # fmt: skip


def diff(a: Dump, b: Dump, *, notes: tuple[str, ...] = ()) -> HostDiff:
    require_vendor(a)
    require_vendor(b)
    reg = registry()
    words = []
    for leaf, subleaf, r in reg.words():
        va, vb = word_value(a, leaf, subleaf, r), word_value(b, leaf, subleaf, r)
        x = va ^ vb
        if not x:
            continue
        only_a: list[str] = []
        only_b: list[str] = []
        for bit in range(32):
            if not x >> bit & 1:
                continue
            f = reg.at(leaf, subleaf, r, bit)
            name = f.name if f is not None else f"bit{bit}"
            (only_a if va >> bit & 1 else only_b).append(name)
        words.append(WordDiff(leaf, subleaf, r, tuple(only_a), tuple(only_b)))
    fa, fb = _fields(a), _fields(b)
    field_diffs = tuple(FieldDiff(k, fa[k], fb[k]) for k in fa if fa[k] != fb[k])
    keys = sorted((set(a.host) | set(b.host)) - _VOLATILE)
    fp = tuple(
        FieldDiff(k, a.host.get(k, "-"), b.host.get(k, "-"))
        for k in keys
        if a.host.get(k) != b.host.get(k)
    )
    msrs, values, more = _msr_diffs(a, b, msr_registry())
    return HostDiff(a.source, b.source, tuple(words), field_diffs, fp + values,
                    notes + more, msrs)  # fmt: skip


def _msr_diffs(a: Dump, b: Dump, reg: MsrRegistry
               ) -> tuple[tuple[MsrDiff, ...], tuple[FieldDiff, ...], tuple[str, ...]]:  # fmt: skip
    """The feature-MSR differences: named bits per flag MSR, the value MSRs
    as fingerprint rows, and a note when only one side carries MSRs (unknown
    is not zero: nothing is compared then)."""
    ma, mb = a.msrs, b.msrs
    known_a = ma is not None and ma.available
    known_b = mb is not None and mb.available
    if not (known_a and known_b):
        if known_a != known_b:
            which = "B" if known_a else "A"
            return (), (), (f"{which} carries no feature MSRs: MSR features not compared",)
        return (), (), ()
    assert ma is not None and mb is not None
    va, vb = ma.as_dict(), mb.as_dict()
    out: list[MsrDiff] = []
    values: list[FieldDiff] = []
    for index in sorted(set(va) | set(vb)):
        info = reg.msr(index)
        x, y = va.get(index), vb.get(index)
        if info is not None and info.layout is MsrLayout.VALUE:
            if x != y:
                values.append(FieldDiff(f"{info.label}",
                                        "-" if x is None else f"{x:#x}",
                                        "-" if y is None else f"{y:#x}"))  # fmt: skip
            continue
        xa, xb = x or 0, y or 0
        if xa == xb:
            continue
        only_a: list[str] = []
        only_b: list[str] = []
        for bit in range(64):
            if (xa ^ xb) >> bit & 1:
                f = reg.at(index, bit)
                name = f.name if f is not None else f"bit{bit}"
                side = only_a if xa >> bit & 1 else only_b
                if name not in side:
                    side.append(name)
        out.append(MsrDiff(index, info.name if info else f"MSR {index:#x}",
                           tuple(only_a), tuple(only_b)))  # fmt: skip
    return tuple(out), tuple(values), ()


def _wrap(names: tuple[str, ...], width: int) -> list[str]:
    """Comma-separated names in lines of at most `width` characters, the
    comma that continues a line included."""
    lines: list[str] = []
    cur = ""
    for n in names:
        piece = n if not cur else f", {n}"
        if cur and len(cur) + len(piece) + 1 > width:
            lines.append(cur + ",")
            cur = n
        else:
            cur += piece
    if cur or not lines:
        lines.append(cur or "-")
    return lines


def render_table(d: HostDiff, width: int = 100) -> str:
    # leaf/register (22) + 2 spaces + A's column + 2 spaces + B's column
    col = max(20, (width - 26) // 2)
    out = [f"A: {d.a}", f"B: {d.b}", *(f"note: {n}" for n in d.notes), ""]
    for title, named in (("leaf/register", d.words), ("feature MSR", d.msrs)):
        if named:
            out.append(f"{title:<22}  {'only in A':<{col}}  only in B")
            for w in named:
                left, right = _wrap(w.only_a, col), _wrap(w.only_b, col)
                for i in range(max(len(left), len(right))):
                    label = w.label if i == 0 else ""
                    lt = left[i] if i < len(left) else ""
                    rt = right[i] if i < len(right) else ""
                    out.append(f"{label:<22}  {lt:<{col}}  {rt}".rstrip())
            out.append("")
    for title, rows in (("field", d.fields), ("fingerprint", d.fingerprint)):
        if rows:
            out.append(f"{title:<30}  {'A':<{col}}  B")
            for r in rows:
                line = f"{r.name:<30}  {r.a:<{col}}  {r.b}".rstrip()
                if len(line) <= width and len(r.a) <= col:
                    out.append(line)
                else:  # a value too long for its column (brand strings)
                    out.extend((r.name, f"  A: {r.a}", f"  B: {r.b}"))
            out.append("")
    msr_bits = sum(len(m.only_a) + len(m.only_b) for m in d.msrs)
    msr_part = f", {msr_bits} feature-MSR bit(s)" if msr_bits else ""
    out.append("identical CPUID" if d.identical else
               f"{sum(len(w.only_a) + len(w.only_b) for w in d.words)} feature bit(s){msr_part} "
               f"and {len(d.fields)} field(s) differ")  # fmt: skip
    return "\n".join(out) + "\n"


def render_json(d: HostDiff) -> str:
    doc: dict[str, Any] = {
        "a": d.a,
        "b": d.b,
        "identical": d.identical,
        "features": [
            {"leaf": f"{w.leaf:#x}", "subleaf": w.subleaf, "reg": w.reg,
             "only_a": list(w.only_a), "only_b": list(w.only_b)}
            for w in d.words
        ],
        "msr_features": [
            {"msr": f"{m.index:#x}", "name": m.name, "only_a": list(m.only_a),
             "only_b": list(m.only_b)}
            for m in d.msrs
        ],
        "fields": [dataclasses.asdict(f) for f in d.fields],
        "fingerprint": [dataclasses.asdict(f) for f in d.fingerprint],
        "notes": list(d.notes),
    }
    return json.dumps(doc, indent=2) + "\n"
