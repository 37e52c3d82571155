"""Policy: from a CPUID table and the operator's choices to a CpuConfig.

- config.py: CpuConfig, what the guest should see;
- qemu_adjust.py: what QEMU actually hands over under KVM;
- models.py: named CPU models from libvirt's cpu_map or the QEMU binary (cached);
- select.py: build a CpuConfig from a table and a Policy;
- options.py, memo.py: the CLI's policy options and its output memo.

Nothing is imported eagerly: `kvmcpuid-qemu-flags` answers from the memo
without loading dataclasses-heavy modules (see benchmarks/bench_qemu_flags.py).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kvmcpuid_virt.policy.config import CpuConfig

__all__ = ["CpuConfig"]


def __getattr__(name: str) -> object:
    if name == "CpuConfig":
        from kvmcpuid_virt.policy.config import CpuConfig

        return CpuConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
