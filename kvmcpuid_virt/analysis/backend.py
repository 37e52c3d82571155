"""Backend: where a probe guest boots. Pure (no probe machinery), so that both
analysis/ (compare) and probe/ (ProbeResult) can name it without a cycle."""

from __future__ import annotations

import enum

__all__ = ["Backend"]


class Backend(enum.StrEnum):
    """A StrEnum: the value is what JSON output, messages, CLI choices and
    test ids say, byte for byte."""

    KVM = "kvm"  # raw KVM: KVM_SET_CPUID2 on a bare vCPU, no VMM
    QEMU = "qemu"
    LIBVIRT = "libvirt"
