"""Build a CpuConfig from a CPUID table and the operator's policy.

Policy, in order:
1. the base: `host` (every feature QEMU hands over under KVM), `auto` (the
   newest named model this host fully supports, plus every remaining
   supported feature) or a named model (its features, nothing else);
2. `--enable F` turns F on: the host must be able to give it;
3. `--disable F` turns F off (always possible).
A feature the host cannot give is an UnsupportedFeatureError naming it;
allow_unsupported turns each into a `dropped` entry (the caller warns) and
leaves the feature off, so `enforce` never meets a feature QEMU cannot give.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping

from kvmcpuid_virt.config import msr_policy, qemu_adjust
from kvmcpuid_virt.config.cpuconfig import CpuConfig, vendor_of
from kvmcpuid_virt.cpuid.features import Feature, FeatureKind, Registry, registry
from kvmcpuid_virt.cpuid.fields import LIBVIRT_VENDOR
from kvmcpuid_virt.cpuid.msr_features import msr_registry
from kvmcpuid_virt.cpuid.table import CpuidTable
from kvmcpuid_virt.errors import PolicyError, UnknownFeatureError, UnsupportedFeatureError
from kvmcpuid_virt.toolfacts.facts import (
    CpuModel,
    ModelIdentity,
    ModelSource,
    ToolFacts,
)

__all__ = [
    "SETTABLE_KINDS",
    "Policy",
    "build",
    "expected_table",
    "relevant_features",
    "supported_features",
]

log = logging.getLogger(__name__)

# Kinds a -cpu string or <feature> element can set. DYNAMIC bits (osxsave,
# ospke) follow CR4 inside the guest; UNSETTABLE ones have no QEMU property.
SETTABLE_KINDS = frozenset({FeatureKind.PLAIN, FeatureKind.KVM_PV})

# Bits QEMU sets under another bit's property: QEMU names both
# KVM_FEATURE_CLOCKSOURCE (bit 0) and KVM_FEATURE_CLOCKSOURCE2 (bit 3) of
# 0x40000001 EAX "kvmclock", so bit 3 follows the `kvmclock` feature.
_TWINS: Mapping[tuple[int, int, str, int], str] = {(0x40000001, 0, "eax", 3): "kvmclock"}


@dataclasses.dataclass(frozen=True)
class Policy:
    """The operator's choices (the CLI's policy options)."""

    model: str = "host"
    enable: tuple[str, ...] = ()
    disable: tuple[str, ...] = ()
    allow_unsupported: bool = False
    kernel_irqchip: bool = True
    # Where a named model's content comes from. CPU_MAP (libvirt's, else
    # QEMU's) for configurations we render, which name every feature anyway;
    # QEMU for an existing -cpu string or <cpu> being read back: there QEMU's
    # own definition, with its KVM defaults (kvmclock, x2apic, hypervisor...),
    # is what the guest gets for every feature the configuration leaves out.
    model_source: ModelSource = ModelSource.CPU_MAP


def relevant_features(reg: Registry, qemu_props: frozenset[str] | None) -> list[Feature]:
    """Registry features a config decides on: settable kinds with a QEMU name
    that this QEMU binary knows (all of them when there is no QEMU to ask)."""
    return [
        f
        for f in reg.features
        if f.kind in SETTABLE_KINDS
        and f.qemu is not None
        and (qemu_props is None or f.qemu in qemu_props)
    ]


def supported_features(
    reg: Registry, supported: CpuidTable, features: Iterable[Feature]
) -> set[str]:
    """Names of `features` the table has (leaf limits honoured, see Registry.present)."""
    present = {f.name for f in reg.present(supported)}
    return {f.name for f in features if f.name in present}


def expected_table(
    supported: CpuidTable, reg: Registry, features: Mapping[str, bool], vendor: str
) -> CpuidTable:
    """The CPUID words the guest should see: `supported` with every decided
    feature bit set to its decision, bits of feature words that QEMU cannot set
    (no property, unknown to this QEMU, or named by nobody) cleared, and 0x80000001 EDX's AMD
    aliases as QEMU builds them. DYNAMIC bits are left as they are: they
    follow CR4 in the guest and every comparison masks them."""
    words: dict[tuple[int, int, str], tuple[int, int]] = {}  # -> (set, clear)
    # QEMU builds each of these registers from its feature word alone, so a
    # bit nobody names (a newer KVM's bit this QEMU has no property for, e.g.
    # 0x80000008 EBX bits 17/28/30 on kernel 6.18 with QEMU 7.2) reads 0.
    named: dict[tuple[int, int, str], int] = {}
    for f in reg.features:
        key = (f.leaf, f.subleaf, str(f.reg))
        named[key] = named.get(key, 0) | f.mask
    for key, mask in named.items():
        words[key] = (0, ~mask & 0xFFFF_FFFF)
    for f in reg.features:
        key = (f.leaf, f.subleaf, str(f.reg))
        s, c = words.get(key, (0, 0))
        if f.kind == FeatureKind.DYNAMIC:
            continue
        if features.get(f.name, False):
            s |= f.mask
        else:
            c |= f.mask
        words[key] = (s, c)
    for (leaf, subleaf, reg_name, bit), owner in _TWINS.items():
        key = (leaf, subleaf, reg_name)
        s, c = words.get(key, (0, 0))
        words[key] = (s | (1 << bit), c) if features.get(owner) else (s, c | (1 << bit))
    table = supported
    for entry in supported:
        changes: dict[str, int] = {}
        for reg_name in ("eax", "ebx", "ecx", "edx"):
            rule = words.get((entry.function, entry.index, reg_name))
            if rule is None:
                continue
            s, c = rule
            value = (entry.reg(reg_name) & ~c | s) & 0xFFFF_FFFF  # type: ignore[arg-type]
            if value != entry.reg(reg_name):  # type: ignore[arg-type]
                changes[reg_name] = value
        if changes:
            table = table.replace_entry(entry.replace(**changes))
    return qemu_adjust.amd_alias_fixup(table, vendor)


def with_model_identity(
    table: CpuidTable, ident: ModelIdentity, enabled: Iterable[Feature]
) -> CpuidTable:
    """`table` as QEMU gives it to a guest of a named model: max basic and
    extended leaves from the model, raised to every leaf that holds an enabled
    feature (QEMU's full-cpuid-auto-level), leaves beyond them gone, and leaf
    1's signature from the model's family/model/stepping (encoded with the
    extended fields as in the Intel SDM and AMD APM, CPUID.01H:EAX)."""
    level = max([ident.min_level, *(f.leaf for f in enabled if f.leaf < 0x4000_0000)])
    xlevel = max([ident.min_xlevel,
                  *(f.leaf for f in enabled if 0x8000_0000 <= f.leaf < 0xC000_0000)])  # fmt: skip
    family, model = ident.family, ident.model
    signature = ident.stepping | (model & 0xF) << 4 | (model >> 4 & 0xF) << 16
    signature |= 0xF << 8 | (family - 0xF) << 20 if family > 0xF else family << 8
    out = []
    for e in table:
        if e.function < 0x4000_0000 and e.function > level:
            continue
        if 0x8000_0000 <= e.function < 0xC000_0000 and e.function > max(xlevel, 0x8000_0000):
            continue
        if e.function == 0:
            e = e.replace(eax=level)
        elif e.function == 1:
            e = e.replace(eax=e.eax & ~0x0FFF_3FFF | signature)
        elif e.function == 0x8000_0000:
            e = e.replace(eax=xlevel)
        out.append(e)
    return CpuidTable(out)


def _resolve(reg: Registry, name: str) -> Feature:
    try:
        feature = reg.lookup(name)  # UnknownFeatureError with suggestions
    except UnknownFeatureError as exc:
        # Close names among the feature-MSR bits too (mds-nox: mds-no).
        try:
            msr_registry().lookup(name)
        except UnknownFeatureError as msr_exc:
            both = list(dict.fromkeys((*exc.suggestions, *msr_exc.suggestions)))[:3]
            raise UnknownFeatureError(name, both) from None
        raise
    if feature.kind not in SETTABLE_KINDS or feature.qemu is None:
        raise PolicyError(
            f"feature {feature.name!r} cannot be set ({feature.kind}: "
            + ("it follows the guest's CR4)" if feature.kind == FeatureKind.DYNAMIC else
               "QEMU has no property for it)")
        )  # fmt: skip
    return feature


def _model_features(
    reg: Registry, m: CpuModel, relevant: Mapping[str, Feature]
) -> set[str]:
    """A model's features as registry canonical names, limited to the
    relevant ones (a cpu_map feature QEMU cannot set is not ours to decide)."""
    out = set()
    for name in m.features:
        f = reg.by_libvirt(name) if m.source == ModelSource.CPU_MAP else reg.by_qemu(name)
        if f is not None and f.name in relevant:
            out.add(f.name)
    return out


def _auto_model(
    reg: Registry, facts: ToolFacts, supported: set[str], relevant: Mapping[str, Feature],
    vendor: str,
) -> str:
    """--model auto: the newest named model this host fully supports."""
    best: str | None = None
    for m in facts.models():  # oldest first: the last fit is the newest
        if m.vendor is not None and m.vendor != LIBVIRT_VENDOR.get(vendor, vendor):
            continue
        if facts.qemu is not None and m.name not in facts.qemu.definitions:
            continue  # cpu_map knows models QEMU lacks (pentiumpro): -cpu would fail
        feats = _model_features(reg, m, relevant)
        if feats and feats <= supported:
            best = m.name
    if best is None:
        raise PolicyError("--model auto: this host fully supports no named CPU model")
    return best


@dataclasses.dataclass(frozen=True)
class _Host:
    """What the host can give, as the phases of build() see it."""

    table: CpuidTable  # qemu_adjust.qemu_supported of the input
    relevant: Mapping[str, Feature]  # what a config decides on
    supported: frozenset[str]  # relevant features the host can give
    default: frozenset[str]  # what `host` turns on by itself
    vendor: str


def _host(reg: Registry, table: CpuidTable, policy: Policy, facts: ToolFacts,
          this_host: bool) -> _Host:  # fmt: skip
    qemu = facts.qemu
    supported_table = qemu_adjust.qemu_supported(table, kernel_irqchip=policy.kernel_irqchip)
    relevant = {f.name: f for f in relevant_features(reg, qemu.props if qemu else None)}
    supported = supported_features(reg, supported_table, relevant.values())
    if this_host:
        # Only this host's vCPU trial (kvm/msrs.msr_delivery) speaks for this
        # host's KVM: a feature whose bit the vCPU's CPUID loses cannot be given.
        lost = facts.undeliverable()
        supported -= set(lost)
        for name in lost:
            log.info("%s: a vCPU here cannot be given it (%s)", name, lost[name])
    # What `host` turns on by itself (see qemu_adjust for why these stay off).
    default = supported - qemu_adjust.NO_AUTOENABLE - qemu_adjust.UNMIGRATABLE
    return _Host(supported_table, relevant, frozenset(supported), frozenset(default),
                 vendor_of(table))  # fmt: skip


def _named_model(reg: Registry, policy: Policy, facts: ToolFacts,
                 host: _Host) -> tuple[CpuModel, set[str], list[str]]:  # fmt: skip
    """A named model's base: (the model, the features on, those it asks for
    that the host cannot give)."""
    qemu = facts.qemu
    if policy.model_source == ModelSource.QEMU and qemu is not None:
        m = qemu.model(policy.model)
    else:
        m = facts.model(policy.model)
    if qemu is not None and m.name not in qemu.definitions:
        raise PolicyError(f"QEMU ({qemu.binary}) has no CPU model {m.name!r}")
    wanted = _model_features(reg, m, host.relevant)
    if policy.model_source != ModelSource.QEMU:
        # Paravirtual bits are not cpu_map model content: in a config we
        # render, they follow the host default whatever the model.
        wanted = {n for n in wanted if host.relevant[n].kind != FeatureKind.KVM_PV}
        wanted |= {n for n in host.default if host.relevant[n].kind == FeatureKind.KVM_PV}
    else:
        # QEMU's KVM defaults for a model (kvmclock, kvm-pv-eoi, ...) are
        # not the model's demands: where KVM lacks one, it is just off.
        wanted -= {n for n in wanted - host.supported
                   if host.relevant[n].kind == FeatureKind.KVM_PV}  # fmt: skip
    return m, wanted & host.supported, sorted(wanted - host.supported)


def _switches(reg: Registry, policy: Policy, host: _Host, on: set[str],
              missing: list[str]) -> None:  # fmt: skip
    """--enable and --disable, applied to `on` and `missing` in place."""
    enable = [_resolve(reg, n) for n in policy.enable]
    disable = [_resolve(reg, n) for n in policy.disable]
    both = {f.name for f in enable} & {f.name for f in disable}
    if both:
        raise PolicyError(f"feature {sorted(both)[0]!r} is both enabled and disabled")
    for f in enable:
        if f.name not in host.relevant:
            raise PolicyError(f"feature {f.name!r} is not known to this QEMU binary")
        if f.name in host.supported:
            on.add(f.name)
        elif f.name not in missing:
            missing.append(f.name)
    for f in disable:
        on.discard(f.name)
        if f.name in missing:
            missing.remove(f.name)


def build(table: CpuidTable, policy: Policy = Policy(), *, facts: ToolFacts,
          source: str = "", this_host: bool | None = None) -> CpuConfig:  # fmt: skip
    """The CpuConfig for `table` (KVM's supported CPUID, live or from a dump)
    under `policy`, with what `facts` say of this machine's QEMU and cpu_map.
    this_host: the table is this machine's own KVM as it runs now (default:
    when `source` is /dev/kvm)."""
    reg = registry()
    qemu = facts.qemu
    mine = source == "/dev/kvm" if this_host is None else this_host
    host = _host(reg, table, policy, facts, mine)
    # --enable/--disable of a feature-MSR bit (mds-no, ...) go to msr_policy.
    msr_enable = tuple(n for n in policy.enable if msr_policy.is_msr_switch(n))
    msr_disable = tuple(n for n in policy.disable if msr_policy.is_msr_switch(n))
    cpuid_policy = dataclasses.replace(
        policy, enable=tuple(n for n in policy.enable if n not in msr_enable),
        disable=tuple(n for n in policy.disable if n not in msr_disable),
    )  # fmt: skip
    missing: list[str] = []
    model_msrs: set[str] | None = None
    if policy.model == "host":
        model_name, on = "host", set(host.default)
    elif policy.model == "auto":
        model_name = _auto_model(reg, facts, set(host.supported), host.relevant, host.vendor)
        on = set(host.default)
    else:
        model, on, missing = _named_model(reg, policy, facts, host)
        model_name, model_msrs = model.name, msr_policy.model_msr_features(model)
    _switches(reg, cpuid_policy, host, on, missing)
    cpuid_on = {name: name in on for name in host.relevant}
    msrs = msr_policy.msrs_for(table, facts, mine)
    props = qemu.props if qemu else None
    msr = msr_policy.decide(msrs, cpuid_on, qemu_props=props, wants=model_msrs,
                            enable=msr_enable, disable=msr_disable, source=source)  # fmt: skip
    msr_missing = [n for n in msr.missing if n not in missing]
    notes = list(msr.notes)
    if mine and facts.msr_delivery is not None:
        delivery = facts.msr_delivery
        notes += msr_policy.host_abort_notes(msrs, props, {
            t.index: n for t in delivery.trials if (n := delivery.note(t.index)) is not None})
    for note in notes:
        log.info("%s", note)
    if (missing or msr_missing) and not policy.allow_unsupported:
        named = policy.model not in ("host", "auto")
        why = f"--model {policy.model}" if named else "--enable"
        raise UnsupportedFeatureError(
            f"this host cannot give {', '.join([*missing, *msr_missing])} (asked for by {why}; "
            "--allow-unsupported drops them with a warning)"
        )
    features = {name: name in on for name in host.relevant}
    expected = expected_table(host.table, reg, features, host.vendor)
    if model_name != "host" and qemu is not None and model_name in qemu.definitions:
        expected = with_model_identity(
            expected, qemu.identity(model_name), [host.relevant[n] for n in sorted(on)]
        )
    return CpuConfig(
        model=model_name, features=features, expected=expected, vendor=host.vendor,
        dropped=tuple(missing), source=source, msr_features=msr.features,
        expected_msrs=msr.expected, notes=tuple(notes), msr_dropped=tuple(msr_missing),
    )  # fmt: skip

