"""The Linux KVM API through ctypes: one class per file descriptor."""

from kvmcpuid_virt.kvm.system import KVM_PATH, Kvm

__all__ = ["KVM_PATH", "Kvm"]
