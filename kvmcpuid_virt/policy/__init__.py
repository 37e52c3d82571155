"""Policy: from a CPUID table and the operator's choices to a CpuConfig.

- config.py: CpuConfig, what the guest should see;
- qemu_adjust.py: what QEMU actually hands over under KVM;
- models.py: named CPU models from libvirt's cpu_map or the QEMU binary (cached);
- select.py: build a CpuConfig from a table and a Policy.

Imports stay light (no lxml, no libvirt, no QEMU process) so that
``kvmcpuid-qemu-flags`` on the default path stays cheap.
"""

from kvmcpuid_virt.policy.config import CpuConfig

__all__ = ["CpuConfig"]
