"""Expected CPUID against what a guest saw, per bit, with names, and each
mismatch attributed to the layer that changed it.

Views, from the top down:
  requested  the CpuConfig's expected table (what the guest should see);
  supported  KVM_GET_SUPPORTED_CPUID (what KVM says it can give);
  vmm        what the VMM configured (KVM_GET_CPUID2 on raw KVM, QEMU's
             feature-words over QMP), when the backend can tell;
  guest      what CPUID answered inside the guest.
A bit that differs between two adjacent views was changed by the layer
between them. Bits that legitimately follow guest state are masked by the
documented list GUEST_STATE_MASKS, never by skipping whole leaves.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from kvmcpuid_virt.analysis.backend import Backend
from kvmcpuid_virt.cpuid.features import Registry, registry
from kvmcpuid_virt.cpuid.table import REGISTERS, CpuidTable, Register

__all__ = [
    "COMPARED_FIELDS",
    "FIELD_RULES",
    "GUEST_STATE_MASKS",
    "Comparison",
    "Field",
    "FieldMismatch",
    "Ignore",
    "Layer",
    "Mismatch",
    "Rule",
    "compare",
    "feature_words",
]

Word = tuple[int, int, Register]


@dataclasses.dataclass(frozen=True, slots=True)
class Ignore:
    """One rule of the ignore grammar: (leaf, subleaf or None for every
    subleaf, register, mask), and why those bits may legitimately differ."""

    leaf: int
    subleaf: int | None
    reg: Register
    mask: int
    reason: str

    def applies(self, leaf: int, subleaf: int, reg: str) -> bool:
        return self.leaf == leaf and self.reg == reg and self.subleaf in (None, subleaf)


class Rule(enum.StrEnum):
    """How a field of the CPUID is held to the configuration (docs/field-rules.md)."""

    FEATURE = "feature"  # a named feature bit: per bit, by its name
    IDENTITY = "identity"  # vendor, family/model/stepping, brand, signature: equal
    MAX_LEAF = "max leaf"  # the last leaf (or subleaf) of a range: equal
    SIZE = "size"  # address bits, XSAVE sizes and offsets, caches and TLBs: equal
    MASKED = "masked"  # follows guest state, the vCPU or the topology: not compared
    RAW = "raw"  # every other bit: per bit, unnamed


_ALL: Final = 0xFFFF_FFFF
_EVERY: Final = (0, 0xFFFF_FFFF)  # every subleaf


@dataclasses.dataclass(frozen=True, slots=True)
class Field:
    """One row of FIELD_RULES: a named field, the (leaf, register, mask)
    parts that hold it (in the order its value reads: a string's bytes come
    from its registers in that order), the subleaves it has, and how its
    value is shown ("dec", "hex", "text")."""

    name: str
    rule: Rule
    parts: tuple[tuple[int, Register, int], ...]
    subleaves: tuple[int, int] = (0, 0)  # first, last
    show: str = "hex"
    reason: str = ""  # MASKED: why the bits may differ

    @property
    def leaf(self) -> int:
        return self.parts[0][0]

    def has_subleaf(self, subleaf: int) -> bool:
        return self.subleaves[0] <= subleaf <= self.subleaves[1]

    def render(self, values: Sequence[int]) -> str:
        if self.show == "text":
            raw = b"".join(v.to_bytes(4, "little") for v in values)
            return repr(raw.rstrip(b"\0").decode("latin-1"))
        if self.show == "dec":
            return " ".join(str(v) for v in values)
        return " ".join(f"{v:#x}" for v in values)

    def value(self, table: CpuidTable, subleaf: int) -> tuple[int, ...]:
        return tuple((table.get(leaf, subleaf, reg) & mask) >> _shift(mask)
                     for leaf, reg, mask in self.parts)  # fmt: skip


def _shift(mask: int) -> int:
    return (mask & -mask).bit_length() - 1


def _one(name: str, rule: Rule, leaf: int, reg: Register, mask: int, *, sub: tuple[int, int] =
         (0, 0), show: str = "hex", reason: str = "") -> Field:  # fmt: skip
    return Field(name, rule, ((leaf, reg, mask),), sub, show, reason)


def _regs(name: str, rule: Rule, leaves: Sequence[int], regs: Sequence[Register], *,
          show: str = "hex") -> Field:  # fmt: skip
    return Field(name, rule, tuple((leaf, r, _ALL) for leaf in leaves for r in regs), show=show)


_I, _M, _S, _X = Rule.IDENTITY, Rule.MAX_LEAF, Rule.SIZE, Rule.MASKED
_TOPOLOGY_REGS: Final[tuple[tuple[str, Register], ...]] = (
    ("shift", "eax"), ("processor count", "ebx"), ("number and type", "ecx"),
)  # leaf 0xB / 0x1F, per level
_XSAVE_COMPONENTS: Final = (2, 63)  # 0xD subleaves 2..63: one per state component
_CACHES: Final = (0, 63)  # leaf 4 / 0x8000001D: one subleaf per cache, then type 0

# The one table of field rules (docs/field-rules.md has it with sources):
# every bit of a probed (leaf, subleaf) that no row names is a named feature
# bit (cpuid/data/features.json) or compared raw. Layouts: Intel SDM Vol. 2A
# "CPUID", AMD APM Vol. 3 Appendix E.
FIELD_RULES: Final[tuple[Field, ...]] = (
    _regs("vendor", _I, (0x0,), ("ebx", "edx", "ecx"), show="text"),
    _one("max basic leaf", _M, 0x0, "eax", _ALL),
    _one("stepping", _I, 0x1, "eax", 0x0000_000F, show="dec"),
    _one("model", _I, 0x1, "eax", 0x0000_00F0, show="dec"),
    _one("family", _I, 0x1, "eax", 0x0000_0F00, show="dec"),
    _one("processor type", _I, 0x1, "eax", 0x0000_3000, show="dec"),
    _one("extended model", _I, 0x1, "eax", 0x000F_0000, show="dec"),
    _one("extended family", _I, 0x1, "eax", 0x0FF0_0000, show="dec"),
    _one("CLFLUSH line size (8-byte units)", _S, 0x1, "ebx", 0x0000_FF00, show="dec"),
    _regs("cache/TLB descriptors", _S, (0x2,), ("eax", "ebx", "ecx", "edx")),
    _one("cache type and level", _S, 0x4, "eax", 0x0000_3FFF, sub=_CACHES),
    _one("cache line size, partitions, ways", _S, 0x4, "ebx", _ALL, sub=_CACHES),
    _one("cache sets", _S, 0x4, "ecx", _ALL, sub=_CACHES, show="dec"),
    _one("cache flags", _S, 0x4, "edx", _ALL, sub=_CACHES),
    _regs("MONITOR/MWAIT line sizes and extensions", _S, (0x5,), ("eax", "ebx", "ecx", "edx")),
    _one("max leaf 7 subleaf", _M, 0x7, "eax", _ALL),
    _one("XSAVE size of every supported component", _S, 0xD, "ecx", _ALL, show="dec"),
    _one("XSAVE component size", _S, 0xD, "eax", _ALL, sub=_XSAVE_COMPONENTS, show="dec"),
    _one("XSAVE component offset", _S, 0xD, "ebx", _ALL, sub=_XSAVE_COMPONENTS, show="dec"),
    _one("max hypervisor leaf", _M, 0x4000_0000, "eax", _ALL),
    _regs("hypervisor signature", _I, (0x4000_0000,), ("ebx", "ecx", "edx"), show="text"),
    _one("max extended leaf", _M, 0x8000_0000, "eax", _ALL),
    _one("extended signature (AMD)", _I, 0x8000_0001, "eax", _ALL),
    _one("brand ID and package type (AMD)", _I, 0x8000_0001, "ebx", _ALL),
    _regs("brand string", _I, (0x8000_0002, 0x8000_0003, 0x8000_0004),
          ("eax", "ebx", "ecx", "edx"), show="text"),
    _regs("L1 cache and TLB", _S, (0x8000_0005,), ("eax", "ebx", "ecx", "edx")),
    _regs("L2/L3 cache and TLB", _S, (0x8000_0006,), ("eax", "ebx", "ecx", "edx")),
    _one("physical address bits", _S, 0x8000_0008, "eax", 0x0000_00FF, show="dec"),
    _one("linear address bits", _S, 0x8000_0008, "eax", 0x0000_FF00, show="dec"),
    _one("guest physical address bits", _S, 0x8000_0008, "eax", 0x00FF_0000, show="dec"),
    _one("performance optimization identifiers (AMD)", _S, 0x8000_001A, "eax", _ALL),
    _one("cache type and level (AMD)", _S, 0x8000_001D, "eax", 0x0000_3FFF, sub=_CACHES),
    _one("cache line size, partitions, ways (AMD)", _S, 0x8000_001D, "ebx", _ALL, sub=_CACHES),
    _one("cache sets (AMD)", _S, 0x8000_001D, "ecx", _ALL, sub=_CACHES, show="dec"),
    _one("cache flags (AMD)", _S, 0x8000_001D, "edx", _ALL, sub=_CACHES),
    # Bits that follow guest state, the vCPU or the topology (one vCPU per
    # probe guest: issue 15 item 3 turns the topology ones into checks).
    _one("initial APIC ID", _X, 0x1, "ebx", 0xFF00_0000, reason="differs per vCPU"),
    _one("logical processor count", _X, 0x1, "ebx", 0x00FF_0000,
         reason="follows the topology"),
    _one("OSXSAVE", _X, 0x1, "ecx", 1 << 27,
         reason="mirrors CR4.OSXSAVE, set by the guest OS"),
    _one("HTT", _X, 0x1, "edx", 1 << 28,
         reason="follows the topology (threads per package)"),
    _one("threads sharing the cache, cores per package", _X, 0x4, "eax", 0xFFFF_C000,
         sub=_EVERY, reason="follows the topology"),
    _one("OSPKE", _X, 0x7, "ecx", 1 << 4, reason="mirrors CR4.PKE, set by the guest OS"),
    *(_one(f"topology level {what}", _X, leaf, r, _ALL, sub=_EVERY, reason="follows the topology")
      for leaf in (0xB, 0x1F)
      for what, r in _TOPOLOGY_REGS),
    _one("x2APIC ID", _X, 0xB, "edx", _ALL, sub=_EVERY, reason="differs per vCPU"),
    _one("x2APIC ID", _X, 0x1F, "edx", _ALL, sub=_EVERY, reason="differs per vCPU"),
    _one("XSAVE size for XCR0", _X, 0xD, "ebx", _ALL,
         reason="XSAVE area size for the features enabled in XCR0"),
    _one("XSAVE size for XCR0 | IA32_XSS", _X, 0xD, "ebx", _ALL, sub=(1, 1),
         reason="XSAVE area size for XCR0 | IA32_XSS"),
    _one("core count and APIC ID size (AMD)", _X, 0x8000_0008, "ecx", 0x0000_FFFF,
         reason="follows the topology"),
    _one("cores sharing the cache (AMD)", _X, 0x8000_001D, "eax", 0x03FF_C000, sub=_EVERY,
         reason="follows the topology"),
    _one("extended APIC ID", _X, 0x8000_001E, "eax", _ALL, sub=_EVERY,
         reason="differs per vCPU"),
    _one("compute unit / core ID", _X, 0x8000_001E, "ebx", _ALL, sub=_EVERY,
         reason="topology"),
    _one("node ID", _X, 0x8000_001E, "ecx", _ALL, sub=_EVERY, reason="topology"),
)

COMPARED_FIELDS: Final[tuple[Field, ...]] = tuple(
    f for f in FIELD_RULES if f.rule is not Rule.MASKED
)

# The ignore grammar's rules, from the MASKED rows.
GUEST_STATE_MASKS: Final[tuple[Ignore, ...]] = tuple(
    Ignore(leaf, None if f.subleaves == _EVERY else f.subleaves[0], reg, mask,
           f"{f.name}: {f.reason}")
    for f in FIELD_RULES if f.rule is Rule.MASKED
    for leaf, reg, mask in f.parts
)


class Layer(enum.StrEnum):
    """Where a mismatching bit was changed. A StrEnum: Mismatch.as_json and
    the JSON report carry the value ("vmm"), as they did when it was a str."""

    CONFIG = "config"  # the configuration asks for what KVM cannot give
    VMM = "vmm"  # QEMU or libvirt set something else than requested
    HOST = "host"  # below KVM: the outer hypervisor or the CPU itself
    KVM = "kvm"  # KVM was told one thing and the guest sees another


@dataclasses.dataclass(frozen=True, slots=True)
class Mismatch:
    leaf: int
    subleaf: int
    reg: Register
    bit: int
    name: str | None
    requested: bool
    guest: bool
    supported: bool | None
    vmm: bool | None
    layer: Layer
    controlled: bool  # False: the host-control probe says this host ignores the bit
    explanation: str

    @property
    def label(self) -> str:
        pos = f"{self.leaf:#x}.{self.subleaf}:{self.reg}[{self.bit}]"
        return f"{self.name} ({pos})" if self.name else pos

    def as_json(self) -> dict[str, object]:
        out = dataclasses.asdict(self)
        out["label"] = self.label
        return out


@dataclasses.dataclass(frozen=True, slots=True)
class FieldMismatch:
    """A field (FIELD_RULES) or a range of leaves that differs, decoded."""

    name: str
    rule: Rule
    leaf: int
    subleaf: int
    requested: str
    guest: str
    vmm: str | None
    supported: str | None
    layer: Layer
    controlled: bool
    explanation: str
    # False: the configuration does not model this field for the backend
    # (compare()'s `unmodelled`): reported, never failing.
    modelled: bool = True

    @property
    def label(self) -> str:
        return f"{self.name} ({self.leaf:#x}.{self.subleaf})"

    def text(self) -> str:
        return f"{self.name}: configured {self.requested}, guest sees {self.guest} " \
               f"({self.explanation})"  # fmt: skip

    def as_json(self) -> dict[str, object]:
        out = dataclasses.asdict(self)
        out["label"] = self.label
        out["text"] = self.text()
        return out


@dataclasses.dataclass(frozen=True, slots=True)
class Comparison:
    backend: Backend
    mismatches: tuple[Mismatch, ...]
    bits_compared: int
    words_missing: tuple[Word, ...]  # requested words the guest was not asked for
    field_mismatches: tuple[FieldMismatch, ...] = ()
    fields_compared: int = 0

    @property
    def ok(self) -> bool:
        """True when every bit and field this host controls matches and the
        guest was asked for every word that has a requested bit."""
        return not self.words_missing and not self.failures and not self.field_failures

    @property
    def failures(self) -> tuple[Mismatch, ...]:
        return tuple(m for m in self.mismatches if m.controlled)

    @property
    def field_failures(self) -> tuple[FieldMismatch, ...]:
        return tuple(m for m in self.field_mismatches if m.controlled and m.modelled)

    def summary(self) -> str:
        failing = len(self.failures) + len(self.field_failures)
        unmodelled = sum(1 for m in self.field_mismatches if m.controlled and not m.modelled)
        known = len(self.mismatches) + len(self.field_mismatches) - failing - unmodelled
        text = f"{self.backend}: {self.bits_compared} bits and {self.fields_compared} fields " \
               "compared, "  # fmt: skip
        if not self.mismatches and not self.field_mismatches:
            text += "all match"
        else:
            text += f"{failing} mismatch(es)"
            if known:
                text += f", {known} on bits this host does not control"
            if unmodelled:
                text += f", {unmodelled} on fields the configuration does not model here"
        if self.words_missing:
            words = ", ".join(f"{leaf:#x}.{sub} {reg}" for leaf, sub, reg in self.words_missing)
            text += f"; NOT CHECKED (the guest was not asked): {words}"
        return text

    def as_json(self) -> dict[str, object]:
        return {
            "backend": self.backend,
            "ok": self.ok,
            "bits_compared": self.bits_compared,
            "mismatches": [m.as_json() for m in self.mismatches],
            "words_missing": [
                {"leaf": f"{leaf:#x}", "subleaf": sub, "reg": reg}
                for leaf, sub, reg in self.words_missing
            ],
            "fields_compared": self.fields_compared,
            "field_mismatches": [m.as_json() for m in self.field_mismatches],
        }

    def table(self, include_host: bool = False) -> str:
        """The fields that fail, one line each, then a per-bit table of the
        bits that fail (with include_host, also those on bits and fields this
        host does not control), then the summary line."""
        shown = self.mismatches if include_host else self.failures
        fields = self.field_mismatches if include_host else self.field_failures
        lines = [f.text() if f.controlled and f.modelled
                 else f"({'host' if not f.controlled else 'not modelled'}) {f.text()}"
                 for f in fields]  # fmt: skip
        if shown:
            rows = [("feature", "req", "kvm", "vmm", "guest", "where")]
            for m in shown:
                rows.append(
                    (
                        m.label,
                        _onoff(m.requested),
                        _onoff(m.supported),
                        _onoff(m.vmm),
                        _onoff(m.guest),
                        m.explanation if m.controlled else f"(host) {m.explanation}",
                    )
                )
            widths = [max(len(r[i]) for r in rows) for i in range(5)]
            lines += ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True))
                      + "  " + r[5] for r in rows]  # fmt: skip
        return "\n".join([*lines, self.summary()])


def _onoff(value: bool | None) -> str:
    return "-" if value is None else ("on" if value else "off")


def feature_words(reg: Registry | None = None) -> list[Word]:
    """The registers that hold named feature bits: what compare() checks."""
    return (reg or registry()).words()


def _uncontrolled_mask(
    uncontrolled: Mapping[Word, int] | None, word: Word
) -> int:
    return 0 if uncontrolled is None else uncontrolled.get(word, 0)


def compare(
    requested: CpuidTable,
    guest: CpuidTable,
    *,
    backend: Backend,
    supported: CpuidTable | None = None,
    vmm: CpuidTable | None = None,
    uncontrolled: Mapping[Word, int] | None = None,
    uncontrolled_reasons: Mapping[tuple[int, int, Register, int], str] | None = None,
    words: Sequence[Word] | None = None,
    ignore: Iterable[Ignore] = GUEST_STATE_MASKS,
    vmm_complete: bool | None = None,
    unmodelled: Mapping[str, str] | None = None,
) -> Comparison:
    """Compare what the guest was asked for with what was requested.

    With `words`, only those registers, per bit. Without, every register of
    every (leaf, subleaf) the guest was asked for within the configuration's
    max leaves: the FIELD_RULES fields as values, every other bit not under
    an `ignore` mask per bit (named where the registry names it), and leaves
    above the guest's own max leaf reported as absent. `uncontrolled` marks
    bits the host-control probe found this host does not let KVM_SET_CPUID2
    control: mismatches there are reported but do not fail. `vmm_complete`:
    whether `vmm` holds every register (raw KVM's KVM_GET_CPUID2, the
    default for that backend) or only the feature words (QEMU's QOM view).
    `unmodelled`: FIELD_RULES names the configuration does not model for
    this backend, with why: their mismatches are reported, never failing."""
    ctx = _Context(
        registry(), tuple(ignore), supported, vmm, uncontrolled, uncontrolled_reasons or {},
        backend is Backend.KVM if vmm_complete is None else vmm_complete, unmodelled or {},
    )
    if words is not None:
        mismatches, missing, compared = [], [], 0
        for leaf, subleaf, r in words:
            if guest.lookup(leaf, subleaf) is None:
                if requested.get(leaf, subleaf, r):
                    missing.append((leaf, subleaf, r))
                continue
            mask = ctx.state_mask(leaf, subleaf, r)
            compared += bin(mask).count("1")
            mismatches += ctx.bits(requested, guest, leaf, subleaf, r, mask)
        return Comparison(backend, tuple(mismatches), compared, tuple(missing))
    return _compare_all(requested, guest, backend, ctx)


_RANGES: Final = {0x0: "basic", 0x4000_0000: "hypervisor", 0x8000_0000: "extended"}
_RANGE_SPAN: Final = 0x1_0000  # a max leaf beyond its base + this is not a max leaf


def _limits(table: CpuidTable) -> dict[int, int]:
    """Each range's max leaf, where the table announces a plausible one."""
    out = {}
    for base in _RANGES:
        entry = table.lookup(base, 0)
        if entry is not None and base <= entry.eax < base + _RANGE_SPAN:
            out[base] = entry.eax
    return out


def _range_base(leaf: int) -> int | None:
    base = leaf & 0xF000_0000
    return base if base in _RANGES else None


def _compare_all(requested: CpuidTable, guest: CpuidTable, backend: Backend,
                 ctx: _Context) -> Comparison:  # fmt: skip
    asked = set(guest.keys())
    want_limits, seen_limits = _limits(requested), _limits(guest)
    mismatches: list[Mismatch] = []
    missing: list[Word] = []
    absent: dict[int, set[int]] = {}
    present: set[tuple[int, int]] = set()
    compared = 0
    # A range whose max leaf is configured below its base (QEMU's xlevel=0 for
    # old models): the configuration has none of it, its base leaf's other
    # registers included; only the max leaf itself is compared.
    empty = {b for b in _RANGES if b and requested.lookup(b, 0) is not None
             and requested.get(b, 0, "eax") < b}  # fmt: skip
    for leaf, subleaf in sorted(set(requested.keys()) | asked):
        base = _range_base(leaf)
        if base in empty and (leaf, subleaf) in asked:
            if leaf == base and subleaf == 0:
                present.add((leaf, subleaf))
            continue
        if base is not None and leaf > want_limits.get(base, leaf):
            continue  # beyond the configuration's own max leaf: CPUID answers another leaf
        if (leaf, subleaf) not in asked:
            missing += [(leaf, subleaf, r) for r in REGISTERS if requested.get(leaf, subleaf, r)]
            continue
        if base is not None and leaf > seen_limits.get(base, base):
            absent.setdefault(base, set()).add(leaf)
            continue
        present.add((leaf, subleaf))
        for r in REGISTERS:
            mask = ctx.state_mask(leaf, subleaf, r)
            compared += bin(mask).count("1")
            per_bit = mask & ~_field_mask(leaf, subleaf, r)
            mismatches += ctx.bits(requested, guest, leaf, subleaf, r, per_bit)
    fields: list[FieldMismatch] = []
    fields_compared = 0
    for f in COMPARED_FIELDS:
        for subleaf in sorted({s for leaf, s in present if leaf == f.leaf and f.has_subleaf(s)}):
            if not all((leaf, subleaf) in present for leaf, _, _ in f.parts):
                continue
            fields_compared += 1
            found = ctx.field(f, subleaf, requested, guest)
            if found is not None:
                fields.append(found)
    for base, leaves in sorted(absent.items()):
        fields.append(ctx.absent(base, sorted(leaves), requested, guest))
    return Comparison(backend, tuple(mismatches), compared, tuple(missing), tuple(fields),
                      fields_compared)


def _field_mask(leaf: int, subleaf: int, reg: Register) -> int:
    mask = 0
    for f in COMPARED_FIELDS:
        if f.has_subleaf(subleaf):
            for part_leaf, part_reg, part_mask in f.parts:
                if (part_leaf, part_reg) == (leaf, reg):
                    mask |= part_mask
    return mask


@dataclasses.dataclass(frozen=True, slots=True)
class _Context:
    """What every comparison of one guest shares."""

    reg: Registry
    rules: tuple[Ignore, ...]
    supported: CpuidTable | None
    vmm: CpuidTable | None
    uncontrolled: Mapping[Word, int] | None
    reasons: Mapping[tuple[int, int, Register, int], str]
    vmm_complete: bool
    unmodelled: Mapping[str, str]

    def state_mask(self, leaf: int, subleaf: int, r: Register) -> int:
        mask = _ALL
        for rule in self.rules:
            if rule.applies(leaf, subleaf, r):
                mask &= ~rule.mask
        return mask

    def vmm_for(self, leaf: int, subleaf: int, r: Register) -> CpuidTable | None:
        """The VMM's view, where it holds this register (QEMU's: feature words only)."""
        if self.vmm is None or self.vmm.lookup(leaf, subleaf) is None:
            return None
        if self.vmm_complete or self.reg.in_word(leaf, subleaf, r):
            return self.vmm
        return None

    def free(self, leaf: int, subleaf: int, r: Register) -> int:
        return _uncontrolled_mask(self.uncontrolled, (leaf, subleaf, r))

    def bits(self, requested: CpuidTable, guest: CpuidTable, leaf: int, subleaf: int,
             r: Register, mask: int) -> list[Mismatch]:  # fmt: skip
        want = requested.get(leaf, subleaf, r) & mask
        seen = guest.get(leaf, subleaf, r) & mask
        diff = want ^ seen
        if not diff:
            return []
        free = self.free(leaf, subleaf, r)
        vmm = self.vmm_for(leaf, subleaf, r)
        out = []
        for bit in range(32):
            if not diff >> bit & 1:
                continue
            feature = self.reg.at(leaf, subleaf, r, bit)
            out.append(
                _attribute(
                    leaf, subleaf, r, bit,
                    feature.name if feature else None,
                    requested=bool(want >> bit & 1),
                    guest=bool(seen >> bit & 1),
                    supported=_bit(self.supported, leaf, subleaf, r, bit),
                    vmm=_bit(vmm, leaf, subleaf, r, bit),
                    controlled=not free >> bit & 1,
                    reason=self.reasons.get((leaf, subleaf, r, bit)),
                    host_known=self.uncontrolled is not None,
                )
            )
        return out

    def _view(self, f: Field, subleaf: int, table: CpuidTable | None) -> tuple[int, ...] | None:
        if table is None or any(table.lookup(leaf, subleaf) is None for leaf, _, _ in f.parts):
            return None
        return f.value(table, subleaf)

    def field(self, f: Field, subleaf: int, requested: CpuidTable,
              guest: CpuidTable) -> FieldMismatch | None:  # fmt: skip
        want, seen = f.value(requested, subleaf), f.value(guest, subleaf)
        if want == seen:
            return None
        changed = [(leaf, r, (requested.get(leaf, subleaf, r) ^ guest.get(leaf, subleaf, r)) & m)
                   for leaf, r, m in f.parts]  # fmt: skip
        controlled = not any(diff & self.free(leaf, subleaf, r) for leaf, r, diff in changed)
        vmm_ok = all(self.vmm_for(leaf, subleaf, r) is not None for leaf, r, _ in f.parts)
        vmm = self._view(f, subleaf, self.vmm) if vmm_ok else None
        supported = self._view(f, subleaf, self.supported)
        if not controlled:
            layer, where = Layer.HOST, "below KVM: this host does not control the field"
        elif vmm is not None and vmm != want:
            layer, where = Layer.VMM, "changed in the VMM"
        elif vmm is not None:
            layer, where = Layer.KVM, "lost below KVM: the VMM set it as configured"
        elif self.uncontrolled is not None:
            # The host-control probe says KVM_SET_CPUID2 sets these bits here:
            # the guest sees what the VMM set.
            layer, where = Layer.VMM, "changed in the VMM"
        else:
            layer, where = Layer.HOST, "changed between the configuration and the guest"
        why = self.unmodelled.get(f.name)
        if why is not None:
            where += f"; not modelled here: {why}"
        return FieldMismatch(
            f.name, f.rule, f.leaf, subleaf, f.render(want), f.render(seen),
            None if vmm is None else f.render(vmm),
            None if supported is None else f.render(supported), layer, controlled, where,
            why is None,
        )

    def absent(self, base: int, leaves: Sequence[int], requested: CpuidTable,
               guest: CpuidTable) -> FieldMismatch:  # fmt: skip
        """The configured leaves above the guest's max leaf, as one finding,
        attributed as the max leaf that cut them."""
        [top] = [f for f in COMPARED_FIELDS if f.rule is Rule.MAX_LEAF and f.leaf == base]
        cut = self.field(top, 0, requested, guest)
        span = f"{leaves[0]:#x}" if len(leaves) == 1 else f"{leaves[0]:#x}..{leaves[-1]:#x}"
        seen = guest.get(base, 0, "eax")
        return FieldMismatch(
            f"{_RANGES[base]} leaves {span}", Rule.MAX_LEAF, leaves[0], 0, "present",
            f"them absent in the guest (its max {_RANGES[base]} leaf is {seen:#x})",
            None, None,
            Layer.HOST if cut is None else cut.layer,
            True if cut is None else cut.controlled,
            "changed between the configuration and the guest" if cut is None
            else cut.explanation,
            True if cut is None else cut.modelled,
        )


def _bit(table: CpuidTable | None, leaf: int, subleaf: int, reg: Register, bit: int) -> bool | None:
    if table is None or table.lookup(leaf, subleaf) is None:
        return None
    return bool(table.get(leaf, subleaf, reg) >> bit & 1)


def _attribute(
    leaf: int, subleaf: int, reg: Register, bit: int, name: str | None, *,
    requested: bool, guest: bool, supported: bool | None, vmm: bool | None,
    controlled: bool, reason: str | None, host_known: bool = False,
) -> Mismatch:
    want, seen = _onoff(requested), _onoff(guest)
    kvm = "" if supported is None else (
        "supported by KVM, " if supported else "not supported by KVM, "
    )
    if not controlled:
        # The host-control probe saw this bit ignore KVM_SET_CPUID2: whatever
        # the views above say, the guest's answer comes from below KVM.
        layer = Layer.HOST
        where = "below KVM: this host does not control the bit" + (f" ({reason})" if reason else "")
    elif requested and supported is False and (vmm is None or not vmm):
        layer = Layer.CONFIG
        where = "the configuration asks for more than KVM gives"
    elif vmm is not None and vmm != requested:
        layer = Layer.VMM
        where = "changed in the VMM (QEMU/libvirt)"
    elif vmm is None and host_known:
        # No view of the VMM's register, but the host-control probe says
        # KVM_SET_CPUID2 sets this bit here: the guest sees what the VMM set.
        layer = Layer.VMM
        where = "changed in the VMM (QEMU/libvirt)"
    else:
        layer = Layer.KVM if vmm is not None else Layer.HOST
        where = "lost below KVM" if vmm is not None else "lost between the VMM and the guest"
    set_by = "" if vmm is None else f"set {_onoff(vmm)} by the VMM, "
    text = f"requested {want}, {kvm}{set_by}guest sees {seen} -> {where}"
    return Mismatch(leaf, subleaf, reg, bit, name, requested, guest, supported, vmm, layer,
                    controlled, text)
