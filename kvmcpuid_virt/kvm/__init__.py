"""The Linux KVM API: one class per file descriptor (ABI facts in abi.py and structs.py)."""

from kvmcpuid_virt.kvm.system import KVM_PATH, Kvm

__all__ = ["KVM_PATH", "Kvm"]
