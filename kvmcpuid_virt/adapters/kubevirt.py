"""KubeVirt node labels of a host, computed from KVM's own table.

KubeVirt's node labeller (pkg/virt-handler/node-labeller in the kubevirt
repository) labels a node with what libvirt says of it:
- `cpu-feature.node.kubevirt.io/NAME=true` for every feature of the
  host-model CPU, expanded (`virsh hypervisor-cpu-baseline --features` of
  the domain capabilities, features with policy "require"), in libvirt's
  cpu_map spelling;
- `cpu-model.node.kubevirt.io/MODEL=true` for every model the domain
  capabilities call usable, minus its obsolete list, and only when each
  feature of the model's cpu_map file is among the feature labels;
- `cpu-vendor.node.kubevirt.io/VENDOR=true`, the host-model's vendor
  (cpu_map's vendor name: Intel, AMD, Hygon).

Here the same three label families come from a CPUID table (KVM's, live or
a dump) and the ToolFacts instead of from a libvirt daemon:
- features: what KVM gives a guest through QEMU (config.build's supported
  set: QEMU's own additions such as x2apic and hypervisor included, what
  QEMU's start trial found undeliverable on this host removed), settable
  plain features only (not the ones that follow the guest's CR4, not
  topoext, which libvirt's host-model leaves out), plus the feature-MSR
  bits the table's MSR values carry and a vCPU accepts, where the guest
  gets the CPUID bit enumerating that MSR;
- models: cpu_map's models (QEMU's when cpu_map is absent), of either
  vendor as in KubeVirt, not obsolete, that QEMU defines, whose every cpu_map feature is a
  feature label, and whose QEMU definition (the expansion libvirt's "usable"
  comes from) asks for no CPUID feature the table lacks;
- vendor: from leaf 0.
Pure: no machine, no files.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Final

from kvmcpuid_virt.adapters.msr_values import guest_msr_values
from kvmcpuid_virt.config import qemu_adjust
from kvmcpuid_virt.config.build import relevant_features, supported_features
from kvmcpuid_virt.config.cpuconfig import vendor_of
from kvmcpuid_virt.cpuid.features import FeatureKind, Registry, registry
from kvmcpuid_virt.cpuid.fields import LIBVIRT_VENDOR
from kvmcpuid_virt.cpuid.msr_features import MsrRegistry, msr_registry
from kvmcpuid_virt.cpuid.table import CpuidTable
from kvmcpuid_virt.errors import InputError
from kvmcpuid_virt.toolfacts.facts import CpuModel, ModelSource, ToolFacts

__all__ = [
    "FEATURE_PREFIX",
    "MODEL_PREFIX",
    "OBSOLETE_MODELS",
    "VENDOR_PREFIX",
    "NodeLabels",
    "node_labels",
]

FEATURE_PREFIX: Final = "cpu-feature.node.kubevirt.io/"
MODEL_PREFIX: Final = "cpu-model.node.kubevirt.io/"
VENDOR_PREFIX: Final = "cpu-vendor.node.kubevirt.io/"
# KubeVirt's DefaultObsoleteCPUModels (pkg/virt-handler/node-labeller/util):
# models it never labels unless the cluster configuration says otherwise.
OBSOLETE_MODELS: Final = frozenset({
    "486", "pentium", "pentium2", "pentium3", "pentiumpro", "coreduo", "n270", "core2duo",
    "Conroe", "athlon", "phenom", "qemu64", "qemu32", "kvm64", "kvm32",
})  # fmt: skip
# A Kubernetes label name (the part after the prefix): at most 63
# characters of [A-Za-z0-9_.-], alphanumeric at both ends.
# What QEMU turns on in every model under KVM (kvm_default_props in
# target/i386/kvm/kvm-cpu.c): not the model's demand. x2apic is the one
# with a registry bit outside the KVM leaf; KVM emulates it on any CPU
# (arch/x86/kvm/cpuid.c), so only a bare-metal dump of an old AMD CPU lacks it.
_QEMU_KVM_DEFAULTS: Final = frozenset({"x2apic"})
_LABEL_NAME: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?\Z")


def _label_name(name: str) -> str:
    if not _LABEL_NAME.match(name):
        raise InputError(f"refusing {name!r} as a Kubernetes label name")
    return name


@dataclasses.dataclass(frozen=True)
class NodeLabels:
    """The labels, and why each other model was left out (`unlabelled`:
    model -> reason)."""

    vendor: str | None
    features: tuple[str, ...]
    models: tuple[str, ...]
    unlabelled: Mapping[str, str]
    note: str | None = None  # why there are no model labels at all

    def labels(self) -> dict[str, str]:
        out = {}
        if self.vendor:
            out[VENDOR_PREFIX + _label_name(self.vendor)] = "true"
        out.update((MODEL_PREFIX + _label_name(m), "true") for m in self.models)
        out.update((FEATURE_PREFIX + _label_name(f), "true") for f in self.features)
        return out

    def text(self) -> str:
        """One `key=value` line per label (vendor, models, features), as
        `kubectl label node NODE $(...)` takes them."""
        return "".join(f"{k}={v}\n" for k, v in self.labels().items())


def _features(
    reg: Registry, table: CpuidTable, facts: ToolFacts, this_host: bool
) -> tuple[set[str], set[str]]:
    """(libvirt names of what a guest can be given, registry names of the same)."""
    qemu = facts.qemu
    relevant = [f for f in relevant_features(reg, qemu.props if qemu else None)
                if f.kind is FeatureKind.PLAIN]  # fmt: skip
    supported = supported_features(reg, qemu_adjust.qemu_supported(table), relevant)
    if qemu is not None and this_host:
        supported -= set(qemu.undeliverable)
    # libvirt's host-model leaves out what QEMU's `host` never turns on by
    # itself (topoext, kvm-hint-dedicated); it keeps invtsc (libvirt 9.0).
    supported -= qemu_adjust.NO_AUTOENABLE
    names = {f.libvirt for f in relevant if f.name in supported and f.libvirt}
    return {n for n in names if n is not None}, supported


def _msr_features(
    reg: Registry, mreg: MsrRegistry, values: Mapping[int, int] | None,
    undeliverable: Iterable[str], supported: set[str],
) -> set[str]:  # fmt: skip
    """libvirt names of the feature-MSR bits `values` (index -> the bits a
    vCPU gets) has that QEMU can set, where the CPUID bit that enumerates
    the MSR is one a guest gets (QEMU drops an MSR's features without it:
    IA32_ARCH_CAPABILITIES needs arch-capabilities)."""
    if not values:
        return set()
    skip = set(undeliverable)
    out = set()
    for f in mreg.present(values):
        info = mreg.msr(f.msr)
        gate = info.enumerated_by if info is not None else None
        if gate is not None and reg.lookup(gate).name not in supported:
            continue
        if f.libvirt and f.kind is FeatureKind.PLAIN and f.name not in skip:
            out.add(f.libvirt)
    return out


def _model_misses(
    m: CpuModel, reg: Registry, facts: ToolFacts, labels: set[str], supported: set[str],
    msr_known: bool,
) -> str | None:  # fmt: skip
    """Why model `m` gets no label, None when it does."""
    if m.name in OBSOLETE_MODELS:
        return "obsolete (KubeVirt's default list)"
    qemu = facts.qemu
    if qemu is not None and m.name not in qemu.definitions:
        return "QEMU does not define it"
    missing = sorted(m.features - labels) if m.source == ModelSource.CPU_MAP else []
    if m.source == ModelSource.QEMU:
        missing = sorted(n for n in m.features if (f := reg.by_qemu(n)) is not None
                         and f.kind is FeatureKind.PLAIN and f.name not in supported)  # fmt: skip
    if missing:
        if not msr_known and all(n in facts.msr_features for n in missing):
            return f"needs feature-MSR bits this input does not carry: {', '.join(missing)}"
        return f"lacks {', '.join(missing)}"
    if qemu is not None and m.name in qemu.expansions:
        # libvirt's usable='yes' is QEMU's verdict on its own definition.
        lacks = sorted(f.name for n in qemu.expansions[m.name] if (f := reg.by_qemu(n))
                       and f.kind is FeatureKind.PLAIN and f.name not in supported
                       and f.name not in qemu_adjust.UNMIGRATABLE | qemu_adjust.NO_AUTOENABLE
                       and f.name not in _QEMU_KVM_DEFAULTS)  # fmt: skip
        if lacks:
            return f"QEMU's definition also asks for {', '.join(lacks)}"
    return None


def node_labels(
    table: CpuidTable, facts: ToolFacts, *, this_host: bool = False,
    msr_values: Mapping[int, int] | None = None, reg: Registry | None = None,
    mreg: MsrRegistry | None = None,
) -> NodeLabels:  # fmt: skip
    """The KubeVirt labels of the host whose KVM gives `table`.
    this_host: the table is this machine's own KVM now (QEMU's start trial
    here speaks for it); msr_values: index -> the feature-MSR bits a vCPU
    gets (default: what the table carries)."""
    reg = reg or registry()
    mreg = mreg or msr_registry()
    labels, supported = _features(reg, table, facts, this_host)
    values = guest_msr_values(table) if msr_values is None else dict(msr_values)
    undeliverable = facts.qemu.undeliverable if facts.qemu and this_host else {}
    labels |= _msr_features(reg, mreg, values, undeliverable, supported)
    vendor_string = vendor_of(table)
    vendor = LIBVIRT_VENDOR.get(vendor_string)
    models: list[str] = []
    unlabelled: dict[str, str] = {}
    if not facts.cpu_map and facts.qemu is None:
        note = f"no cpu-model labels: no libvirt cpu_map and {facts.qemu_missing}"
        return NodeLabels(vendor, tuple(sorted(labels)), (), {}, note)
    # No vendor filter, as in KubeVirt: libvirt calls a model of the other
    # vendor usable where the host has its features, and QEMU runs it.
    for m in facts.models():  # oldest first
        why = _model_misses(m, reg, facts, labels, supported, values is not None)
        if why is None:
            models.append(m.name)
        else:
            unlabelled[m.name] = why
    return NodeLabels(vendor, tuple(sorted(labels)), tuple(models), unlabelled)
