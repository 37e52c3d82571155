"""Which feature-MSR values this host can really deliver to a guest.

KVM reports a value for each feature MSR on /dev/kvm, but a vCPU may still
refuse it: a VMM that writes KVM's value (QEMU's `-cpu host` does, when it
creates the vCPU) then aborts with "failed to set MSR 0x10a to 0x69". This
module asks a vCPU instead of starting QEMU: one VM, one vCPU given KVM's
supported CPUID, then KVM_SET_MSRS with each feature MSR's value, and for an
MSR of independent flags (IA32_ARCH_CAPABILITIES, IA32_CORE_CAPABILITIES)
with each of its set bits alone. Writes that take are read back. Why a value
is refused is decided from what decides it in KVM (the vCPU's CPUID after
KVM_SET_CPUID2, cpuid/msr_features.refusal_reason).

Bounded: at most 2 + 66 KVM_SET_MSRS/KVM_GET_MSRS per feature MSR, on one
vCPU that never runs (a few ms here).
"""

from __future__ import annotations

import time
from collections.abc import Mapping

# Kvm.create_vm() imports vm.py lazily (ctypes, ~10 ms); imported here, that
# cost is not counted in MsrDelivery.seconds, which is the trial's own time.
import kvmcpuid_virt.kvm.vm  # noqa: F401
from kvmcpuid_virt.cpuid.features import registry
from kvmcpuid_virt.cpuid.msr_features import MsrDelivery, MsrTrial, msr_registry, refusal_reason
from kvmcpuid_virt.cpuid.table import CpuidTable
from kvmcpuid_virt.kvm.system import Kvm

__all__ = ["msr_delivery"]


def msr_delivery(
    kvm: Kvm, *, table: CpuidTable | None = None, values: Mapping[int, int] | None = None
) -> MsrDelivery:
    """Try every feature MSR value on a fresh vCPU of `kvm`.

    `values` defaults to kvm.feature_msrs() (an empty delivery on a kernel
    without KVM_CAP_GET_MSR_FEATURES), `table` to kvm.supported_cpuid()."""
    offered = kvm.feature_msrs() if values is None else dict(values)
    if not offered:
        return MsrDelivery((), (), 0.0)
    given = kvm.supported_cpuid() if table is None else table
    reg = msr_registry()
    cpuid_reg = registry()
    start = time.perf_counter()
    trials = []
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid2(given)
        kept = vcpu.get_cpuid2()
        for index, value in offered.items():
            info = reg.msr(index)
            accepted = vcpu.set_msrs({index: value}) == 1
            read_back = vcpu.get_msrs([index]).get(index) if accepted else None
            note = None
            if accepted:
                deliverable = value if read_back is None else value & read_back
                if read_back != value:
                    note = f"KVM took {value:#x} but reads back {read_back}"
            elif info is not None and info.per_bit_trial:
                deliverable = 0
                for bit in range(64):
                    if value >> bit & 1 and vcpu.set_msrs({index: 1 << bit}) == 1:
                        deliverable |= 1 << bit
            else:
                deliverable = 0
            if deliverable != value and note is None:
                note = refusal_reason(info, given, kept, cpuid_reg)
            trials.append(MsrTrial(index, value, accepted, read_back, deliverable, note))
    lost = []
    for name in dict.fromkeys(
        m.enumerated_by for i in offered if (m := reg.msr(i)) and m.enumerated_by
    ):
        feat = cpuid_reg.lookup(name)
        if feat.present(given) and not feat.present(kept):
            lost.append(feat.name)
    return MsrDelivery(tuple(trials), tuple(lost), time.perf_counter() - start)
