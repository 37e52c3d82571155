"""kvmcpuid_virt: what this host's KVM can give a guest, rendered for QEMU and
libvirt, and verified inside a booted guest.

Imports stay light here on purpose: ``kvmcpuid dump`` must not pay for lxml or
libvirt (see benchmarks/bench_dump.py).
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
