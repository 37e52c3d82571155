"""Can a guest with this CPU run on this host? The verdict, register by
register, of a guest's CPUID against what a host can give it.

The guest is a table: a dump of what a guest sees, or the table a
configuration (a domain's `<cpu>`, a `-cpu` string) asks for on the host,
features the host cannot give included (`wanted_table`). The host is what
its KVM reports (`KVM_GET_SUPPORTED_CPUID`, live or a dump), what this
machine's QEMU makes of it (when judging this machine: `Host.qemu`) and,
when the host-control probe has run, which bits this host lets
`KVM_SET_CPUID2` decide at all (`Control`).

RULES is the one table of what is compared and how (docs/compat.md says
why); everything it does not name (signature, brand, caches, topology, the
hypervisor signature) is written by the VMM from the model and the
configuration and does not decide whether a guest fits.

Pure: a function of its arguments and of the feature registry.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final

from lxml import etree

from kvmcpuid_virt.adapters import libvirt as lv
from kvmcpuid_virt.adapters import qemu as qemu_adapter
from kvmcpuid_virt.analysis.baseline import word_value
from kvmcpuid_virt.analysis.compare import GUEST_STATE_MASKS, Ignore
from kvmcpuid_virt.analysis.given import classify, qemu_cpu_value
from kvmcpuid_virt.config import msr_policy
from kvmcpuid_virt.config.build import (
    SETTABLE_KINDS,
    Policy,
    build,
    expected_table,
    relevant_features,
    supported_features,
)
from kvmcpuid_virt.config.cpuconfig import CpuConfig, vendor_of
from kvmcpuid_virt.config.qemu_adjust import qemu_supported
from kvmcpuid_virt.cpuid import fields
from kvmcpuid_virt.cpuid.features import Feature, Registry, registry
from kvmcpuid_virt.cpuid.formats import Dump, loads
from kvmcpuid_virt.cpuid.msr_features import MsrRegistry, msr_registry
from kvmcpuid_virt.cpuid.msr_values import FeatureMsrs
from kvmcpuid_virt.cpuid.table import INDEXED_LEAVES, CpuidEntry, CpuidTable, EntryFlag, Register
from kvmcpuid_virt.toolfacts.facts import ModelSource, QemuFacts, ToolFacts
from kvmcpuid_virt.xmlutil import parse_xml

__all__ = [
    "KVM_DEFAULT_OFF",
    "RULES",
    "Control",
    "FieldRule",
    "Host",
    "Layer",
    "Reason",
    "Rule",
    "Scope",
    "Verdict",
    "compat",
    "compat_config",
    "field_value",
    "guest_msr_features",
    "host_msrs",
    "host_offer",
    "ignored_mask",
    "judge_text",
    "msr_gates",
    "wanted_table",
    "xsave_components",
]

_ALL: Final = 0xFFFF_FFFF
Word = tuple[int, int, Register]
Bit = tuple[int, int, Register, int]


class Layer(enum.StrEnum):
    """Why the host cannot give what the guest has."""

    KVM = "kvm"  # KVM cannot give it: not in KVM_GET_SUPPORTED_CPUID (or the host's dump)
    QEMU = "qemu"  # KVM has it, QEMU filters it (no property, its start trial fails)
    HOST = "host"  # this host does not control it (the host-control probe)


class Rule(enum.StrEnum):
    SUBSET = "subset"  # every bit the guest has, the host can give
    NO_GREATER = "no-greater"  # the guest's value is at most the host's
    EQUAL = "equal"  # the guest's value is the host's
    IGNORED = "ignored"  # follows guest state or topology: compare.GUEST_STATE_MASKS


class Scope(enum.Enum):
    REGISTER = "register"  # the register(s) named by leaf, subleaf, regs, mask
    FEATURE_WORDS = "feature words"  # every register the registry names bits in
    XSAVE_COMPONENTS = "XSAVE components"  # CPUID.0DH.i, each component i >= 2 the guest has
    MASKS = "masks"  # the bits of GUEST_STATE_MASKS (or the caller's ignore list)
    FEATURE_MSRS = "feature MSRs"  # each feature-MSR bit the guest has (msr_policy.unmet)


@dataclasses.dataclass(frozen=True, slots=True)
class FieldRule:
    """One row of RULES: a field (the registers `regs` of leaf.subleaf,
    concatenated low first, `mask` of each shifted down to bit 0) and how the
    guest's value must relate to the host's. `show`: how values are printed.
    `qemu_sets`: for a configuration (not a dump) QEMU sets the field from
    the model and the features it enables and answers the leaves itself,
    whatever KVM lists, so only the features in them can be missing (and
    those are compared): the rule applies to guest dumps only."""

    name: str
    rule: Rule
    scope: Scope
    leaf: int = 0
    subleaf: int = 0
    regs: tuple[Register, ...] = ()
    mask: int = _ALL
    show: str = "hex"  # hex | dec | text
    qemu_sets: bool = False


# The one table of what compat() compares (docs/compat.md has the reasons).
RULES: Final[tuple[FieldRule, ...]] = (
    FieldRule("feature bits", Rule.SUBSET, Scope.FEATURE_WORDS),
    FieldRule("vendor", Rule.EQUAL, Scope.REGISTER, 0x0, 0, ("ebx", "edx", "ecx"), show="text"),
    FieldRule("max basic leaf", Rule.NO_GREATER, Scope.REGISTER, 0x0, 0, ("eax",),
              qemu_sets=True),
    FieldRule("max hypervisor leaf", Rule.NO_GREATER, Scope.REGISTER, 0x4000_0000, 0, ("eax",),
              qemu_sets=True),
    FieldRule("max extended leaf", Rule.NO_GREATER, Scope.REGISTER, 0x8000_0000, 0, ("eax",),
              qemu_sets=True),
    FieldRule("leaf 7 subleaves", Rule.NO_GREATER, Scope.REGISTER, 0x7, 0, ("eax",),
              qemu_sets=True),
    FieldRule("leaf 0x14 subleaves (PT)", Rule.NO_GREATER, Scope.REGISTER, 0x14, 0, ("eax",)),
    FieldRule("AMX palettes", Rule.NO_GREATER, Scope.REGISTER, 0x1D, 0, ("eax",)),
    FieldRule("AVX10 version", Rule.NO_GREATER, Scope.REGISTER, 0x24, 0, ("ebx",), 0xFF, "dec"),
    FieldRule("physical address bits", Rule.NO_GREATER, Scope.REGISTER, 0x8000_0008, 0,
              ("eax",), 0xFF, "dec"),
    FieldRule("virtual address bits", Rule.NO_GREATER, Scope.REGISTER, 0x8000_0008, 0,
              ("eax",), 0xFF00, "dec"),
    FieldRule("XCR0 components", Rule.SUBSET, Scope.REGISTER, 0xD, 0, ("eax", "edx")),
    FieldRule("IA32_XSS components", Rule.SUBSET, Scope.REGISTER, 0xD, 1, ("ecx", "edx")),
    FieldRule("XSAVE component size", Rule.EQUAL, Scope.XSAVE_COMPONENTS, 0xD, 0, ("eax",),
              show="dec"),
    FieldRule("XSAVE component offset", Rule.EQUAL, Scope.XSAVE_COMPONENTS, 0xD, 0, ("ebx",),
              show="dec"),
    FieldRule("XSAVE component flags", Rule.EQUAL, Scope.XSAVE_COMPONENTS, 0xD, 0, ("ecx",),
              0x3),
    FieldRule("feature-MSR bits", Rule.SUBSET, Scope.FEATURE_MSRS),
    FieldRule("guest state and topology", Rule.IGNORED, Scope.MASKS),
)

# Features QEMU turns off in every named model under KVM (target/i386/cpu.c,
# kvm_default_props: acpi, monitor, svm off): what cpu_map's copy of a model
# does not say, used when there are no QEMU facts to ask.
KVM_DEFAULT_OFF: Final = ("acpi", "monitor", "svm")

_LEAF_LIMITS: Final = {0x0: fields.max_basic_leaf, 0x4000_0000: fields.max_hypervisor_leaf,
                       0x8000_0000: fields.max_extended_leaf}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Control:
    """What the host-control probe (probe/hostcontrol, its cached result)
    found: per register, the bits KVM_SET_CPUID2 does not decide on this
    host, of those the ones it saw forced on or off, and its reason per bit."""

    uncontrolled: Mapping[Word, int] = dataclasses.field(default_factory=dict)
    forced_on: Mapping[Word, int] = dataclasses.field(default_factory=dict)
    forced_off: Mapping[Word, int] = dataclasses.field(default_factory=dict)
    reasons: Mapping[Bit, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Host:
    """What a host can give. `dump`: its KVM table (KVM_GET_SUPPORTED_CPUID,
    live or a dump; a raw CPU dump stands in as an upper bound). `qemu`: this
    machine's QEMU, when the host judged is this machine (None: no QEMU layer,
    only QEMU's fixed adjustments of KVM's list). `this_host`: the table is
    this machine's KVM as it runs now (QEMU's start trial speaks for it).
    `msrs`: the host's feature MSRs when known beyond the dump's own (this
    machine's, with what its vCPUs accept: msr_policy.msrs_for); None: the
    dump's (`dump.table.msrs`, itself None when unknown)."""

    dump: Dump
    qemu: QemuFacts | None = None
    this_host: bool = False
    control: Control | None = None
    msrs: FeatureMsrs | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Reason:
    """One thing the guest has that the host cannot give."""

    field: str  # the feature name ("abm") or the field ("max basic leaf")
    where: str  # "CPUID.80000001H.0:ECX[5]", "CPUID.0H.0:EAX"
    rule: Rule
    layer: Layer
    guest: str
    host: str
    detail: str

    @property
    def register(self) -> str:
        return self.where.split("[", 1)[0]

    def as_json(self) -> dict[str, str]:
        return {"field": self.field, "where": self.where, "rule": str(self.rule),
                "layer": str(self.layer), "guest": self.guest, "host": self.host,
                "detail": self.detail}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Verdict:
    guest: str
    host: str
    reasons: tuple[Reason, ...]
    # Registers compared, as "CPUID.07H.0:EBX" -> the rule applied.
    checked: Mapping[str, Rule]
    notes: tuple[str, ...] = ()
    # MSR features the guest has that the host's unknown feature MSRs leave
    # unjudged (unknown is not missing, nor given).
    unjudged: tuple[str, ...] = ()

    @property
    def fits(self) -> bool:
        return not self.reasons

    def by_layer(self) -> dict[Layer, list[Reason]]:
        out: dict[Layer, list[Reason]] = {}
        for r in self.reasons:
            out.setdefault(r.layer, []).append(r)
        return out

    def missing(self) -> str:
        """What does not fit, by layer: "abm, svm (KVM cannot give it); ..."
        ('' when it fits)."""
        parts = []
        for layer, reasons in self.by_layer().items():
            names = ", ".join(dict.fromkeys(r.field for r in reasons))
            parts.append(f"{names} ({_LAYER_TEXT[layer]})")
        return "; ".join(parts)

    def line(self) -> str:
        """One line naming every feature and field that does not fit."""
        if self.fits and self.unjudged:
            return (f"fits as far as known: {self.host} can give {self.guest}'s CPUID; its "
                    f"feature MSRs are unknown, so {', '.join(self.unjudged)} not judged")
        if self.fits:
            return f"fits: {self.host} can give {self.guest}'s CPU"
        return f"does not fit: {self.host} cannot give {self.guest}: {self.missing()}"

    def as_json(self) -> dict[str, Any]:
        regs: dict[str, list[Reason]] = {}
        for r in self.reasons:
            regs.setdefault(r.register, []).append(r)
        return {
            "guest": self.guest,
            "host": self.host,
            "fits": self.fits,
            "registers": [
                {"register": name, "rule": str(rule), "fits": name not in regs,
                 "reasons": [r.as_json() for r in regs.get(name, [])]}
                for name, rule in self.checked.items()
            ],
            "reasons": [r.as_json() for r in self.reasons],
            "notes": list(self.notes),
            "unjudged": list(self.unjudged),
        }

    def render_json(self) -> str:
        return json.dumps(self.as_json(), indent=2) + "\n"

    def render_table(self) -> str:
        """The registers that do not fit, each with its reasons, then the
        notes and the one-line verdict."""
        out = [f"guest: {self.guest}", f"host:  {self.host}", ""]
        regs: dict[str, list[Reason]] = {}
        for r in self.reasons:
            regs.setdefault(r.register, []).append(r)
        if regs:
            rows = [("register", "field", "guest", "host", "why")]
            for name, reasons in regs.items():
                for i, r in enumerate(reasons):
                    rows.append((name if i == 0 else "", r.field, r.guest, r.host,
                                 f"{_LAYER_TEXT[r.layer]}: {r.detail}"))  # fmt: skip
            widths = [max(len(row[i]) for row in rows) for i in range(4)]
            for row in rows:
                cells = "  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True))
                out.append(f"{cells}  {row[4]}".rstrip())
            out.append("")
        out.extend(f"note: {n}" for n in self.notes)
        out.append(f"{len(self.checked)} registers compared; {self.line()}")
        return "\n".join(out) + "\n"


_LAYER_TEXT: Final = {
    Layer.KVM: "KVM cannot give it",
    Layer.QEMU: "QEMU filters it",
    Layer.HOST: "this host does not control it",
}


def _pos(leaf: int, subleaf: int, reg: Register, bit: int | None = None) -> str:
    at = f"CPUID.{leaf:02X}H.{subleaf}:{reg.upper()}"
    return at if bit is None else f"{at}[{bit}]"


@functools.lru_cache(maxsize=1024)
def _ignored(rules: tuple[Ignore, ...], leaf: int, subleaf: int, reg: Register) -> int:
    # Cached: the same few rules for every word of every verdict (a matrix).
    mask = 0
    for rule in rules:
        if rule.applies(leaf, subleaf, reg):
            mask |= rule.mask
    return mask


def _has_ranges(dump: Dump) -> bool:
    # A feature-only view (a libvirt host-model, kind "config") announces no
    # max leaves: its non-flag fields say nothing.
    return dump.kind != "config"


def _offer(host: Host, reg: Registry) -> Dump:
    """The table of what the host can give a guest. With QEMU facts: what
    `-cpu host` plus every supported feature would get under this QEMU
    (config.build.expected_table: KVM's table as QEMU patches it, only the
    bits this QEMU has a property for, the AMD aliases and twin bits as QEMU
    builds them, without what its start trial found it cannot set up here).
    Without: KVM's table with QEMU's fixed adjustments (qemu_adjust)."""
    table = host.dump.table
    if host.dump.kind == "cpu":
        table = _kvm_emulated(table)
    adjusted = qemu_supported(table)
    qemu = host.qemu
    if qemu is not None:
        relevant = relevant_features(reg, qemu.props)
        supported = supported_features(reg, adjusted, relevant)
        if host.this_host:
            supported -= set(qemu.undeliverable)
        decided = {f.name: f.name in supported for f in relevant}
        adjusted = expected_table(adjusted, reg, decided, vendor_of(host.dump.table))
    # Its feature MSRs: the bits of the features it can give (None: unknown).
    adjusted = adjusted.with_msrs(_offered_msrs(host_msrs(host), adjusted, reg))
    return Dump(adjusted, host.dump.kind, host.dump.host, host.dump.source)


def host_msrs(host: Host) -> FeatureMsrs | None:
    """The feature MSRs compat judges `host` by (None: unknown)."""
    return host.msrs if host.msrs is not None else host.dump.table.msrs


def _gates(names: Iterable[str], offer: CpuidTable, reg: Registry,
           mreg: MsrRegistry) -> dict[str, bool]:  # fmt: skip
    """The CPUID features enumerating the MSRs of `names`, on where `offer` has them."""
    out: dict[str, bool] = {}
    limits = fields.leaf_limits(offer)
    probe = Dump(offer, "supported")
    for name in names:
        info = mreg.msr(mreg.lookup(name).msr)
        gate = info.enumerated_by if info is not None else None
        if gate is not None and gate not in out:
            f = reg.lookup(gate)
            out[gate] = bool(word_value(probe, f.leaf, f.subleaf, f.reg, limits) & f.mask)
    return out


def msr_gates(names: Iterable[str], offer: CpuidTable) -> dict[str, bool]:
    """The CPUID features enumerating the MSRs of `names` (MSR features),
    on where `offer` (host_offer's table) has them: unmet's `cpuid_on`."""
    return _gates(names, offer, registry(), msr_registry())


def _offered_msrs(msrs: FeatureMsrs | None, offer: CpuidTable,
                  reg: Registry) -> FeatureMsrs | None:  # fmt: skip
    """What a guest given everything can read from each feature MSR: the
    bits of the features QEMU can set that msr_policy.unmet finds givable."""
    if msrs is None:
        return None
    mreg = msr_registry()
    names = [f.name for index, _ in msrs.items for f in mreg.in_msr(index)
             if f.qemu is not None]  # fmt: skip
    lacking = msr_policy.unmet(names, msrs, _gates(names, offer, reg, mreg), mreg)
    values = {index: 0 for index, _ in msrs.items}
    for name in names:
        if name not in lacking:
            f = mreg.lookup(name)
            values[f.msr] |= f.mask
    return FeatureMsrs.of(values)


def guest_msr_features(guest: Dump) -> list[str]:
    """The MSR features a guest dump has on: its feature MSRs' named bits,
    of the MSRs its CPUID enumerates (a guest without 7.0 EDX[29] never
    reads IA32_ARCH_CAPABILITIES, whatever value the dump recorded)."""
    msrs = guest.table.msrs
    if msrs is None:
        return []
    mreg = msr_registry()
    names = [f.name for f in mreg.present(msrs.as_dict())]
    seen = _gates(names, guest.table, registry(), mreg)
    out = []
    for name in names:
        info = mreg.msr(mreg.lookup(name).msr)
        gate = info.enumerated_by if info is not None else None
        if gate is None or seen[gate]:
            out.append(name)
    return out


def _msr_reasons(wanted: list[str], host: Host, offer: Dump, reg: Registry,
                 checked: dict[str, Rule], notes: list[str],
                 unjudged: list[str]) -> Iterator[Reason]:  # fmt: skip
    """The guest's MSR features (`wanted`) the host cannot give, by
    msr_policy.unmet; with the host's feature MSRs unknown, none is judged."""
    if not wanted:
        return
    mreg = msr_registry()
    msrs = host_msrs(host)
    if msrs is None:
        unjudged += wanted
        notes.append(f"{host.dump.source} {msr_policy.UNKNOWN} (a version-1 dump, `cpuid "
                     "-1r` text, <cpudata> without <msr>): the guest's MSR features "
                     f"{', '.join(wanted)} are unknown there, not missing; take `kvmcpuid "
                     "dump` on that host to judge them")  # fmt: skip
        return
    for name in wanted:
        checked[f"MSR {mreg.lookup(name).msr:X}H"] = Rule.SUBSET
    lacking = msr_policy.unmet(wanted, msrs, _gates(wanted, offer.table, reg, mreg), mreg)
    for name, why in lacking.items():
        f = mreg.lookup(name)
        yield Reason(name, f.position, Rule.SUBSET, Layer.KVM, "on", "off", why)


# What KVM reports whatever the CPU has (arch/x86/kvm/cpuid.c,
# kvm_set_cpu_caps): x2APIC and ARCH_CAPABILITIES (7.0 EDX[29]: KVM emulates
# the MSR, on AMD too), in software. A raw CPU dump (kind "cpu") stands in
# for what its KVM supports: these are added to it.
_KVM_EMULATED: Final[tuple[tuple[int, int, Register, int], ...]] = (
    (0x1, 0, "ecx", 1 << 21), (0x7, 0, "edx", 1 << 29))  # fmt: skip


def _kvm_emulated(table: CpuidTable) -> CpuidTable:
    for leaf, subleaf, reg, mask in _KVM_EMULATED:
        entry = table.lookup(leaf, subleaf)
        if entry is not None:
            table = table.replace_entry(entry.replace(**{reg: entry.reg(reg) | mask}))
    return table


def _settable(f: Feature, qemu: QemuFacts | None) -> bool:
    return f.kind in SETTABLE_KINDS and f.qemu is not None and (
        qemu is None or f.qemu in qemu.props)


def host_offer(host: Host) -> Dump:
    """What `host` can give a guest, as compat() reads it (see _offer)."""
    return _offer(host, registry())


def ignored_mask(leaf: int, subleaf: int, reg: Register,
                 rules: tuple[Ignore, ...] = GUEST_STATE_MASKS) -> int:  # fmt: skip
    """The bits of a word compat() does not compare (GUEST_STATE_MASKS)."""
    return _ignored(rules, leaf, subleaf, reg)


def _feature_reasons(guest: Dump, host: Host, reg: Registry, ignore: tuple[Ignore, ...],
                     checked: dict[str, Rule], notes: list[str],
                     offer: Dump | None = None) -> Iterator[Reason]:  # fmt: skip
    offer = _offer(host, reg) if offer is None else offer
    limits = [fields.leaf_limits(d.table) for d in (guest, host.dump, offer)]
    control = host.control or Control()
    table = "KVM's supported CPUID" if host.dump.kind == "supported" else "the host's CPUID"
    shown_on: list[str] = []  # off in the guest, but the host may show them on
    given_on: list[str] = []  # not in KVM's table, but the host forces them on
    unknown_pv: list[str] = []  # KVM's own leaves, which a host-model does not name
    for leaf, subleaf, r in reg.words():
        word: Word = (leaf, subleaf, r)
        mask = ~_ignored(ignore, leaf, subleaf, r) & _ALL
        want = word_value(guest, leaf, subleaf, r, limits[0]) & mask
        if not _has_ranges(host.dump) and fields.range_base(leaf) == fields.HYPERVISOR_BASE:
            unknown_pv += [f.name for f in reg.in_word(leaf, subleaf, r) if want & f.mask]
            continue
        checked[_pos(leaf, subleaf, r)] = Rule.SUBSET
        kvm = word_value(host.dump, leaf, subleaf, r, limits[1])
        free = control.uncontrolled.get(word, 0) & mask
        off = control.forced_off.get(word, 0) & free
        on = control.forced_on.get(word, 0) & free
        # A bit the host forces on reaches the guest whatever KVM and QEMU say.
        can = word_value(offer, leaf, subleaf, r, limits[2]) & ~off | on
        # Without host control only a missing bit has anything to say (the
        # matrix asks for thousands of cells).
        bits = want & ~can if not free else _ALL
        while bits:
            b = bits & -bits
            bits ^= b
            bit = b.bit_length() - 1
            f = reg.at(leaf, subleaf, r, bit)
            name = f.name if f is not None else f"{_pos(leaf, subleaf, r, bit)} (unnamed)"
            why = control.reasons.get((leaf, subleaf, r, bit))
            if want & b and off & b:
                yield Reason(name, _pos(leaf, subleaf, r, bit), Rule.SUBSET, Layer.HOST, "on",
                             "off", f"the guest reads 0 whatever KVM and QEMU say: {why}")
            elif want & b and not can & b:
                if not kvm & b:
                    layer, detail = Layer.KVM, f"not in {table}"
                elif f is None or not _settable(f, host.qemu):
                    layer, detail = Layer.QEMU, "this QEMU has no property for it"
                else:
                    layer = Layer.QEMU
                    trial = host.qemu.undeliverable.get(f.qemu or "") if host.qemu else None
                    detail = f"QEMU cannot set up a vCPU with it here ({trial})" if trial \
                        else "QEMU does not pass it on"  # fmt: skip
                if free & b and why:
                    detail += f"; nor does this host control it ({why})"
                yield Reason(name, _pos(leaf, subleaf, r, bit), Rule.SUBSET, layer, "on",
                             "off", detail)  # fmt: skip
            elif want & b and on & b and not kvm & b:
                given_on.append(name)
            elif not want & b and (on & b or (free & b and kvm & b and not off & b)):
                shown_on.append(name)
    if unknown_pv:
        notes.append("KVM paravirtual features not compared (a libvirt host-model names "
                     "none; libvirt sets them from the domain's <features> and <clock>): "
                     + ", ".join(unknown_pv))  # fmt: skip
    if given_on:
        notes.append("not in KVM's table, but this host forces them on (host-control probe), "
                     f"so the guest gets them: {', '.join(given_on)}")
    if shown_on:
        notes.append("off in the guest, but this host does not control them (host-control "
                     f"probe), so the guest may see them on: {', '.join(shown_on)}")  # fmt: skip


def _value(dump: Dump, rule: FieldRule, subleaf: int | None = None) -> int | None:
    """The rule's field in `dump`, None where the dump does not have it."""
    if not _has_ranges(dump):
        return None
    table = dump.table
    limit = _LEAF_LIMITS.get(rule.leaf)
    if limit is not None and rule.regs == ("eax",):
        return limit(table)  # the decoders know each range's conventions
    sub = rule.subleaf if subleaf is None else subleaf
    entry = table.lookup(rule.leaf, sub)
    if entry is None or (rule.leaf in INDEXED_LEAVES and entry.index != sub):
        return None
    if not fields.in_range(rule.leaf, fields.leaf_limits(table), strict=True):
        return None
    shift = (rule.mask & -rule.mask).bit_length() - 1
    value = 0
    for i, r in enumerate(rule.regs):
        value |= ((entry.reg(r) & rule.mask) >> shift) << (32 * i)
    return value


def field_value(dump: Dump, rule: FieldRule, subleaf: int | None = None) -> int | None:
    """A rule's field in `dump` as compat() reads it (None: not there)."""
    return _value(dump, rule, subleaf)


def xsave_components(dump: Dump) -> list[int]:
    """The XSAVE components (>= 2) the dump enables, as compat() reads them."""
    return _xsave_components(dump)


def _show(rule: FieldRule, value: int | None) -> str:
    if value is None:
        return "none"
    if rule.show == "text":
        raw = b"".join((value >> (32 * i) & _ALL).to_bytes(4, "little") for i in range(3))
        return raw.replace(b"\0", b"").decode("ascii", errors="replace")
    return str(value) if rule.show == "dec" else hex(value)


def _where(rule: FieldRule, subleaf: int) -> str:
    regs = "/".join(r.upper() for r in rule.regs)
    return f"CPUID.{rule.leaf:02X}H.{subleaf}:{regs}"


_FIELD_DETAIL: Final = {
    Rule.NO_GREATER: "the guest's value is greater than the host's",
    Rule.EQUAL: "the guest's value differs from the host's",
    Rule.SUBSET: "the guest has components the host lacks",
}


def _field_reasons(guest: Dump, host: Host, checked: dict[str, Rule],
                   configured: bool) -> Iterator[Reason]:  # fmt: skip
    for rule in RULES:
        if configured and rule.qemu_sets:
            continue
        if rule.scope == Scope.REGISTER:
            g, h = _value(guest, rule), _value(host.dump, rule)
            subs = [(rule.subleaf, g, h)]
        elif rule.scope == Scope.XSAVE_COMPONENTS:
            subs = [(i, _value(guest, rule, i), _value(host.dump, rule, i))
                    for i in _xsave_components(guest)]  # fmt: skip
        else:
            continue
        for sub, g, h in subs:
            if g is None:
                continue  # the guest does not have the field
            if not _has_ranges(host.dump):
                continue  # a feature-only host: the field is unknown
            where = _where(rule, sub)
            checked[where] = rule.rule
            if h is None:
                if rule.scope == Scope.XSAVE_COMPONENTS:
                    continue  # the missing component is the XCR0/XSS reason
                ok = False
            elif rule.rule == Rule.NO_GREATER:
                ok = g <= h
            elif rule.rule == Rule.EQUAL:
                ok = g == h
            else:
                ok = not g & ~h
            if ok:
                continue
            name = rule.name if rule.scope != Scope.XSAVE_COMPONENTS else f"{rule.name} {sub}"
            detail = _FIELD_DETAIL[rule.rule] if h is not None else "the host has no such field"
            if rule.rule == Rule.SUBSET and h is not None:
                detail += f" ({(g & ~h):#x})"
            yield Reason(name, where, rule.rule, Layer.KVM, _show(rule, g), _show(rule, h),
                         detail)  # fmt: skip


def _xsave_components(dump: Dump) -> list[int]:
    info = fields.xsave(dump.table) if _has_ranges(dump) else None
    if info is None:
        return []
    mask = info.xcr0_mask | info.xss_mask
    return [i for i in range(2, 63) if mask >> i & 1]


def compat(guest: Dump, host: Host, *, ignore: Iterable[Ignore] = GUEST_STATE_MASKS,
           notes: Iterable[str] = (), configured: bool = False,
           offer: Dump | None = None, msr_wanted: Iterable[str] | None = None,
           ) -> Verdict:  # fmt: skip
    """Whether `host` can give `guest`'s CPU, by RULES. `configured`: the
    guest table is what a configuration asks for (see FieldRule.qemu_sets).
    `offer`: host_offer(host), when the caller has it already. `msr_wanted`:
    the guest's MSR features (default: those its dump's feature MSRs have)."""
    reg = registry()
    offer = _offer(host, reg) if offer is None else offer
    rules = tuple(ignore)
    checked: dict[str, Rule] = {}
    found = list(notes)
    wanted = guest_msr_features(guest) if msr_wanted is None else list(msr_wanted)
    unjudged: list[str] = []
    reasons = [*_field_reasons(guest, host, checked, configured),
               *_feature_reasons(guest, host, reg, rules, checked, found, offer),
               *_msr_reasons(wanted, host, offer, reg, checked, found, unjudged)]  # fmt: skip
    if host.qemu is None:
        found.append("judged without QEMU facts: KVM's table with QEMU's fixed adjustments "
                     "(no QEMU filter, no start trial)")  # fmt: skip
    return Verdict(guest.source, host.dump.source, tuple(reasons), checked, tuple(found),
                   tuple(unjudged))  # fmt: skip


def wanted_table(config: CpuConfig, extra: Iterable[str] = ()) -> CpuidTable:
    """What a configuration asks a guest to see: its expected table with
    the features it asked for that the host could not give (config.dropped)
    and `extra` (names QEMU cannot set) turned on, each leaf range raised to
    hold them, as QEMU's automatic level would have."""
    reg = registry()
    table = config.expected
    for name in (*config.dropped, *extra):
        f = reg.lookup(name)
        table = _set_bit(table, f)
    return table


def _set_bit(table: CpuidTable, f: Feature) -> CpuidTable:
    entry = table.lookup(f.leaf, f.subleaf)
    if entry is None or (f.leaf in INDEXED_LEAVES and entry.index != f.subleaf):
        flags = EntryFlag.SIGNIFICANT_INDEX if f.leaf in INDEXED_LEAVES else EntryFlag.NONE
        entry = CpuidEntry(f.leaf, f.subleaf, flags)
    table = table.replace_entry(entry.replace(**{f.reg: entry.reg(f.reg) | f.mask}))
    base = fields.range_base(f.leaf)
    top = table.lookup(base, 0)
    if top is not None and base in _LEAF_LIMITS and (_LEAF_LIMITS[base](table) or 0) < f.leaf:
        table = table.replace_entry(top.replace(eax=f.leaf))
    if f.leaf == 0x7 and f.subleaf:
        seven = table.lookup(0x7, 0)
        if seven is not None and seven.eax < f.subleaf:
            table = table.replace_entry(seven.replace(eax=f.subleaf))
    return table


def compat_config(parsed: tuple[str, tuple[str, ...], tuple[str, ...]], source: str,
                  host: Host, facts: ToolFacts) -> Verdict:  # fmt: skip
    """compat() of a configuration (model, enable, disable: a parsed <cpu>
    or -cpu) applied to the host's table as QEMU would (given.applied): the
    guest asks for the model's features and its switches, those the host
    cannot give included. A switch this QEMU has no property for is asked
    for too (and found missing); disabling one is a no-op."""
    model, enable, disable = parsed
    reg = registry()
    # Feature-MSR bits (mds-no, ...) go to build() as they are (config/msr_policy).
    msr_switches = {n for n in (*enable, *disable) if msr_policy.is_msr_switch(n)}
    cpuid_enable = [n for n in enable if n not in msr_switches]
    unknown = tuple(n for n in cpuid_enable if not _settable(reg.lookup(n), facts.qemu))
    enable = tuple(n for n in enable if n not in unknown)
    disable = tuple(n for n in disable
                    if n in msr_switches or _settable(reg.lookup(n), facts.qemu))  # fmt: skip
    if facts.qemu is None and model not in ("host", "auto"):
        # The model comes from cpu_map (QEMU's static definition); QEMU's own
        # expansion under KVM, which the facts would have, turns these off.
        disable += tuple(n for n in KVM_DEFAULT_OFF if n not in enable and n not in disable)
    policy = Policy(model=model, enable=enable, disable=disable, allow_unsupported=True,
                    model_source=ModelSource.QEMU)  # fmt: skip
    table = host.dump.table
    if host.msrs is None and host.this_host:
        # This machine's feature MSRs, with what its vCPUs accept.
        host = dataclasses.replace(host, msrs=msr_policy.msrs_for(table, facts, True))
    if host_msrs(host) is None:
        # Unknown feature MSRs: built as if the host had none, every MSR
        # feature the configuration asks for is in msr_dropped (judged
        # unknown by compat, not missing).
        table = table.with_msrs(FeatureMsrs.of({}))
    config = build(table, policy, facts=facts, source=host.dump.source,
                   this_host=host.this_host)  # fmt: skip
    guest = Dump(wanted_table(config, unknown), "guest", source=source)
    msr_wanted = dict.fromkeys((*config.msr_enabled(), *config.msr_dropped))
    return compat(guest, host, configured=True, msr_wanted=msr_wanted)


def _nothing_asked(guest: str, host: Host, why: str) -> Verdict:
    return Verdict(guest, host.dump.source, (), {}, (why,))


def judge_text(text: str, source: str, host: Host, facts: ToolFacts) -> Verdict:
    """compat() of GUEST given as text: a dump of what a guest sees, a QEMU
    -cpu string (or kvmcpuid-qemu-flags output), a libvirt <cpu> or a domain
    XML (given.classify tells them apart). A domain that asks for no CPU (no
    <cpu>, or one without a model) or that KVM does not run (type other than
    kvm) has nothing this host's KVM table could refuse: it fits, with a note."""
    kind = classify(text)
    if kind == "dump":
        return compat(loads(text, source), host)
    if kind == "qemu":
        parsed = qemu_adapter.parse(qemu_cpu_value(text, source))
        return compat_config(parsed, source, host, facts)
    root = parse_xml(text, source)  # classify: a <cpu> or a <domain>
    cpu: etree._Element | None = root
    if root.tag == "domain":
        kind_attr = root.get("type")
        if kind_attr != "kvm":
            return _nothing_asked(source, host, f"a <domain type='{kind_attr}'>: not run by "
                                  "KVM, so KVM's table does not limit its CPU")  # fmt: skip
        cpu = root.find("cpu")
    if cpu is None or (cpu.get("mode", "custom") == "custom" and cpu.find("model") is None):
        return _nothing_asked(source, host, "the domain asks for no CPU model or feature (no "
                              "<cpu>, or one without a model): QEMU's default model, as this "
                              "host gives it")  # fmt: skip
    return compat_config(lv.parse(cpu, source), source, host, facts)
