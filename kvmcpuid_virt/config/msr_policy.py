"""The feature-MSR half of a CpuConfig: which MSR features (rdctl-no,
mds-no, full-width-write, vmx-*, ...) are on, and what the guest should read
from each feature MSR.

An MSR feature is on only where KVM offers it (its bits set in KVM's
feature-MSR value), a vCPU of the host accepts it (KVM_SET_MSRS, the
`deliverable` bits of cpuid/msr_values.FeatureMsrs, kvm/msrs.msr_delivery)
and the CPUID feature that enumerates its MSR is on (KVM takes only 0 for
IA32_ARCH_CAPABILITIES from a vCPU whose CPUID lacks 7.0:EDX[29]). Where the
feature MSRs are unknown (a version-1 dump, `cpuid -1r` text), they are left
undecided, with a note, rather than taken for zero.

Pure: a function of its arguments and the registries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Final

from kvmcpuid_virt.cpuid.features import registry
from kvmcpuid_virt.cpuid.msr_features import (
    MsrFeature,
    MsrLayout,
    MsrRegistry,
    msr_registry,
    qemu_written,
)
from kvmcpuid_virt.cpuid.msr_values import FeatureMsrs
from kvmcpuid_virt.cpuid.table import CpuidTable
from kvmcpuid_virt.errors import PolicyError, UnknownFeatureError
from kvmcpuid_virt.toolfacts.facts import CpuModel, ModelSource, ToolFacts

__all__ = [
    "UNKNOWN",
    "MsrDecision",
    "decide",
    "expected_msrs",
    "host_abort_notes",
    "is_msr_feature",
    "is_msr_switch",
    "model_msr_features",
    "msrs_for",
    "relevant",
    "resolve",
    "unknown_note",
    "unmet",
]


@dataclasses.dataclass(frozen=True)
class MsrDecision:
    """features: MSR registry name -> on/off; expected: MSR index -> the value
    the guest should read (only MSRs its CPUID enumerates); missing: asked
    for but not givable; notes: one line each (unknown MSRs, the -cpu host
    abort)."""

    features: Mapping[str, bool]
    expected: Mapping[int, int]
    missing: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def msrs_for(table: CpuidTable, facts: ToolFacts, this_host: bool) -> FeatureMsrs | None:
    """The feature MSRs a config of `table` works from: the table's own (a
    dump's), this host's when the table is this host's (what a vCPU here
    accepts comes from this host's trial), else None (unknown)."""
    own = table.msrs
    mine = facts.host_msrs if this_host else None
    if own is None:
        return mine
    if own.deliverable is None and mine is not None and mine.items == own.items:
        return mine
    return own


def is_msr_switch(name: str) -> bool:
    """Whether a switch's name (--enable, a -cpu or <feature> name) is a
    feature-MSR bit: the CPUID registry does not know it, the MSR one does."""
    try:
        registry().lookup(name)
    except UnknownFeatureError:
        return is_msr_feature(name)
    return False


def is_msr_feature(name: str, reg: MsrRegistry | None = None) -> bool:
    """Whether `name` (any spelling) is a feature-MSR bit."""
    return (reg or msr_registry()).get(name) is not None


def resolve(name: str, reg: MsrRegistry | None = None) -> MsrFeature:
    """The MSR feature `name` names, refusing one QEMU cannot set."""
    f = (reg or msr_registry()).lookup(name)
    if f.qemu is None:
        raise PolicyError(f"feature {f.name!r} ({f.position}) cannot be set: QEMU has no "
                          "property for it")  # fmt: skip
    return f


def relevant(reg: MsrRegistry, qemu_props: frozenset[str] | None) -> dict[str, MsrFeature]:
    """MSR features a config can decide on: QEMU can set them (and this QEMU
    binary knows them, when there is one to ask)."""
    return {f.name: f for f in reg
            if f.qemu is not None and (qemu_props is None or f.qemu in qemu_props)}  # fmt: skip


def model_msr_features(m: CpuModel, reg: MsrRegistry | None = None) -> set[str]:
    """The MSR features a named model turns on (QEMU's expansion lists them
    by property, cpu_map by its libvirt name)."""
    r = reg or msr_registry()
    out = set()
    for name in m.features:
        f = r.by_libvirt(name) if m.source == ModelSource.CPU_MAP else r.by_qemu(name)
        if f is not None:
            out.add(f.name)
    return out


def _givable(f: MsrFeature, msrs: FeatureMsrs, cpuid_on: Mapping[str, bool],
             reg: MsrRegistry) -> bool:  # fmt: skip
    value = msrs.get(f.msr)
    if value is None or not f.present(value):
        return False
    accepts = msrs.deliverable_dict()
    if accepts is not None and accepts.get(f.msr, 0) & f.mask != f.mask:
        return False
    info = reg.msr(f.msr)
    gate = info.enumerated_by if info is not None else None
    return gate is None or cpuid_on.get(gate, True)


def decide(
    msrs: FeatureMsrs | None, cpuid_on: Mapping[str, bool], *,
    qemu_props: frozenset[str] | None, wants: Iterable[str] | None = None,
    enable: Iterable[str] = (), disable: Iterable[str] = (), source: str = "",
    reg: MsrRegistry | None = None,
) -> MsrDecision:  # fmt: skip
    """The MSR features of a config. `cpuid_on`: the CPUID features decided
    (registry name -> on); `wants`: a named model's MSR features (None: the
    base is `host`, everything givable); `enable`/`disable`: MSR registry
    names from --enable/--disable. Decided are the MSR features of the MSRs
    KVM lists, and any a model or a switch names."""
    r = reg or msr_registry()
    known = relevant(r, qemu_props)
    wanted = set(wants or ())
    on_names = {resolve(n, r).name for n in enable}
    off_names = {resolve(n, r).name for n in disable}
    both = on_names & off_names
    if both:
        raise PolicyError(f"feature {sorted(both)[0]!r} is both enabled and disabled")
    for n in on_names | off_names:
        if n not in known:
            raise PolicyError(f"feature {n!r} is not known to this QEMU binary")
    if msrs is None:
        # Unknown: decide only what is asked, and never claim the host gives it.
        features = dict.fromkeys(sorted(off_names), False)
        missing = tuple(sorted(on_names))
        note = unknown_note(source) if wanted or wants is None else None
        return MsrDecision(features, {}, missing, (note,) if note else ())
    offered = {f.name for f in known.values() if f.msr in msrs}
    decided = offered | (wanted & set(known)) | on_names | off_names
    givable = {n for n in decided if _givable(known[n], msrs, cpuid_on, r)}
    base = givable if wants is None else wanted & givable
    lacking = set() if wants is None else (wanted & set(known)) - givable
    lacking = (lacking | (on_names - givable)) - off_names
    on = (base | (on_names & givable)) - off_names
    features = {n: n in on for n in sorted(decided)}
    expected = expected_msrs(features, cpuid_on, msrs, r)
    return MsrDecision(features, expected, tuple(sorted(lacking)))


def expected_msrs(
    features: Mapping[str, bool], cpuid_on: Mapping[str, bool], msrs: FeatureMsrs | None,
    reg: MsrRegistry | None = None,
) -> dict[int, int]:
    """What the guest should read from each flag-layout feature MSR KVM
    lists whose enumerating CPUID feature is on: the bits of the features
    that are on (QEMU writes the MSR from its named bits alone)."""
    r = reg or msr_registry()
    out: dict[int, int] = {}
    for index, _ in msrs.items if msrs is not None else ():
        info = r.msr(index)
        if info is None or info.layout is not MsrLayout.FLAGS:
            continue
        if info.enumerated_by is not None and not cpuid_on.get(info.enumerated_by, False):
            continue  # the guest's CPUID says the MSR does not exist
        value = 0
        for f in r.in_msr(index):
            if features.get(f.name, False):
                value |= f.mask
        out[index] = value
    return out


UNKNOWN: Final = "carries no feature MSRs"


def unmet(wanted: Iterable[str], msrs: FeatureMsrs | None, cpuid_on: Mapping[str, bool],
          reg: MsrRegistry | None = None) -> dict[str, str]:  # fmt: skip
    """Of the MSR features a guest has on (`wanted`, any spelling), those a
    host with `msrs` (and the CPUID features `cpuid_on` it gives) cannot
    give, each with a one-line reason; for compat-style judgements. Unknown
    MSRs (None) give nothing: unknown is not "missing"."""
    r = reg or msr_registry()
    if msrs is None:
        return {}
    out = {}
    accepts = msrs.deliverable_dict()
    for name in wanted:
        f = r.lookup(name)
        info = r.msr(f.msr)
        label = info.label if info else f"MSR {f.msr:X}H"
        value = msrs.get(f.msr)
        gate = info.enumerated_by if info is not None else None
        if value is None or not f.present(value):
            out[f.name] = f"{f.name} ({f.position}): the host's KVM does not offer it"
        elif accepts is not None and accepts.get(f.msr, 0) & f.mask != f.mask:
            out[f.name] = f"{f.name} ({f.position}): a vCPU of the host refuses it in {label}"
        elif gate is not None and not cpuid_on.get(gate, True):
            out[f.name] = (f"{f.name} ({f.position}): the host cannot give {gate}, "
                           f"which enumerates {label}")  # fmt: skip
    return out


def unknown_note(source: str) -> str:
    """The note of a config whose feature MSRs are unknown (it contains UNKNOWN)."""
    where = source or "the input"
    return (f"{where} {UNKNOWN} (a version-1 dump, `cpuid -1r` text, or "
            "<cpudata> without <msr>): MSR features such as mds-no are left to QEMU's "
            "model defaults; take `kvmcpuid dump` on the host for them")  # fmt: skip


def host_abort_notes(msrs: FeatureMsrs | None, qemu_props: frozenset[str] | None,
                     delivery_note: Mapping[int, str], reg: MsrRegistry | None = None,
                     ) -> tuple[str, ...]:  # fmt: skip
    """Why plain `-cpu host` aborts on this host, one line per MSR: QEMU
    writes KVM's value of a feature MSR (its named bits) and a vCPU here
    refuses it. `delivery_note`: MsrDelivery.note per MSR index."""
    r = reg or msr_registry()
    accepts = msrs.deliverable_dict() if msrs is not None else None
    if msrs is None or accepts is None:
        return ()
    out = []
    for index, value in msrs.items:
        written = qemu_written(index, value, qemu_props, r)
        refused = written & ~accepts.get(index, 0)
        if refused:
            names = ", ".join(f.name for f in r.in_msr(index) if refused & f.mask)
            why = delivery_note.get(index) or f"MSR {index:#x}: a vCPU here refuses {written:#x}"
            out.append(f"plain -cpu host aborts here (QEMU: failed to set MSR {index:#x} to "
                       f"{written:#x}): {why}; so {names} are off")  # fmt: skip
    return tuple(out)
