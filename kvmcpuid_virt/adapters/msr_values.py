"""The feature-MSR bits a guest of a host gets, as the exports read them
from a table (`CpuidTable.msrs`, which a format-2 dump carries)."""

from __future__ import annotations

from kvmcpuid_virt.cpuid.table import CpuidTable

__all__ = ["guest_msr_values"]


def guest_msr_values(table: CpuidTable) -> dict[int, int] | None:
    """MSR index -> its value, cut to the bits a vCPU of that host accepts
    when a vCPU trial is recorded; None when the table carries no feature
    MSRs (unknown, which is not zero)."""
    msrs = table.msrs
    if msrs is None or not msrs.available:
        return None
    values = dict(msrs.items)
    if msrs.deliverable is not None:
        accepted = dict(msrs.deliverable)
        values = {i: v & accepted.get(i, 0) for i, v in values.items()}
    return values
