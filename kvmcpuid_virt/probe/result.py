"""ProbeResult: what one guest boot observed, whichever backend booted it."""

from __future__ import annotations

import dataclasses

from kvmcpuid_virt.analysis.backend import Backend
from kvmcpuid_virt.cpuid.table import CpuidTable

__all__ = ["ProbeResult"]


@dataclasses.dataclass(slots=True)
class ProbeResult:
    """observed: the CPUID answers the guest itself read (one entry per query).
    vmm_view: what the VMM says it configured (KVM_GET_CPUID2 on raw KVM, QMP
    on QEMU), or None when the backend cannot tell.
    seconds: wall time of the boot, from VM creation to the parsed result.
    backend: which backend booted it (Backend.KVM, .QEMU or .LIBVIRT).
    diagnostics: things worth showing a user (QEMU warnings, retries).
    msrs: the guest's RDMSR answers, MSR index -> value, None where its own
    CPUID said the MSR does not exist (probe/image.parse_msrs); empty when
    the probe read no MSR.
    msr_set: what the VMM was told to write (raw KVM: KVM_SET_MSRS), None
    when the backend cannot tell.
    msr_vmm: what the VMM holds (raw KVM: KVM_GET_MSRS after the write), None
    when the backend cannot tell."""

    observed: CpuidTable
    vmm_view: CpuidTable | None
    seconds: float
    backend: Backend
    diagnostics: list[str] = dataclasses.field(default_factory=list)
    msrs: dict[int, int | None] = dataclasses.field(default_factory=dict)
    msr_set: dict[int, int] | None = None
    msr_vmm: dict[int, int] | None = None
