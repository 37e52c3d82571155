"""--max-model: cap a CpuConfig at a named CPU model, the way an operator
emulates older hardware (features outside the model off; a `host` config also
takes the model's identity and max leaves)."""

from __future__ import annotations

import dataclasses
from typing import Final

from kvmcpuid_virt.config import msr_policy
from kvmcpuid_virt.config.build import expected_table, with_model_identity
from kvmcpuid_virt.config.cpuconfig import CpuConfig
from kvmcpuid_virt.cpuid.features import FeatureKind, Registry, registry
from kvmcpuid_virt.cpuid.msr_features import msr_registry
from kvmcpuid_virt.toolfacts.facts import CpuModel, ModelSource, ToolFacts

__all__ = ["QEMU_ADDED", "limit_to_model"]

# Bits QEMU gives every model under KVM (qemu_adjust.qemu_supported and QEMU's
# kvm_default_props): virtualization artefacts, not CPU model content, so a
# model cap leaves them alone (cpu_map models never list them).
QEMU_ADDED: Final = frozenset({"hypervisor", "tsc-deadline", "arat", "x2apic"})


def _model_names(reg: Registry, m: CpuModel) -> set[str]:
    out = set()
    for name in m.features:
        f = reg.by_libvirt(name) if m.source == ModelSource.CPU_MAP else reg.by_qemu(name)
        if f is not None:
            out.add(f.name)
    return out


def limit_to_model(config: CpuConfig, name: str, facts: ToolFacts) -> tuple[CpuConfig, list[str]]:
    """`config` with every feature outside CPU model `name` turned off (KVM
    paravirtual features are not model content and stay as they are). A config
    based on `host` takes the model as its base, so the guest also sees the
    model's family/model/stepping and max leaves, as the older CPU would.
    Returns the new config and the names turned off."""
    m = facts.model(name)
    reg = registry()
    allowed = _model_names(reg, m)
    features: dict[str, bool] = {}
    off: list[str] = []
    for fname, on in config.features.items():
        f = reg.lookup(fname)
        keep = on and (
            fname in allowed or f.kind == FeatureKind.KVM_PV or fname in QEMU_ADDED
        )
        if on and not keep:
            off.append(fname)
        features[fname] = keep
    expected = expected_table(config.expected, reg, features, config.vendor)
    model = m.name if config.model == "host" else config.model
    qemu = facts.qemu  # without QEMU to say what the model's leaves are: keep the table's
    if qemu is not None and model in qemu.definitions:
        enabled = [reg.lookup(n) for n, on in features.items() if on]
        expected = with_model_identity(expected, qemu.identity(model), enabled)
    # MSR features outside the model go off too; what the guest reads from
    # each MSR follows (and an MSR whose enumerating CPUID bit went off is gone).
    allowed_msr = msr_policy.model_msr_features(m)
    msr_features: dict[str, bool] = {}
    for fname, on in config.msr_features.items():
        if on and fname not in allowed_msr:
            off.append(fname)
        msr_features[fname] = on and fname in allowed_msr
    expected_msrs = {
        index: value & _kept_bits(msr_features, index)
        for index, value in config.expected_msrs.items()
        if _gate_on(index, features)
    }
    capped = dataclasses.replace(
        config, model=model, features=features, expected=expected,
        msr_features=msr_features, expected_msrs=expected_msrs,
    )  # fmt: skip
    return capped, off


def _kept_bits(msr_features: dict[str, bool], index: int) -> int:
    mask = 0
    for f in msr_registry().in_msr(index):
        if msr_features.get(f.name, False):
            mask |= f.mask
    return mask


def _gate_on(index: int, features: dict[str, bool]) -> bool:
    info = msr_registry().msr(index)
    gate = info.enumerated_by if info is not None else None
    return gate is None or features.get(gate, False)
