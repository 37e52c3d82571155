"""Verify from inside a booted guest what CPUID it sees.

`image` builds the tiny firmware that answers CPUID queries on COM1; the
backends (`kvm`: raw KVM, `qemu`, `libvirt`) boot it and return a
`ProbeResult`; `hostcontrol` finds which bits KVM_SET_CPUID2 really controls
on this host; `compare` checks the guest's answer bit by bit and `verify`
ties it all together for `kvmcpuid verify` and the conformance suite.

The backends are imported on first use: `from kvmcpuid_virt.probe import image`
must stay cheap for callers that only build or parse images.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kvmcpuid_virt.probe.result import ProbeResult

if TYPE_CHECKING:
    from kvmcpuid_virt.probe.hostcontrol import HostControl, host_control, probe_host_control
    from kvmcpuid_virt.probe.kvm import KvmProbe, run_kvm
    from kvmcpuid_virt.probe.libvirt import LibvirtProbe, run_libvirt
    from kvmcpuid_virt.probe.qemu import run_qemu

__all__ = [
    "HostControl",
    "KvmProbe",
    "LibvirtProbe",
    "ProbeResult",
    "host_control",
    "probe_host_control",
    "run_kvm",
    "run_libvirt",
    "run_qemu",
]

_LAZY = {
    "KvmProbe": "kvmcpuid_virt.probe.kvm",
    "run_kvm": "kvmcpuid_virt.probe.kvm",
    "HostControl": "kvmcpuid_virt.probe.hostcontrol",
    "host_control": "kvmcpuid_virt.probe.hostcontrol",
    "probe_host_control": "kvmcpuid_virt.probe.hostcontrol",
    "run_qemu": "kvmcpuid_virt.probe.qemu",
    "LibvirtProbe": "kvmcpuid_virt.probe.libvirt",
    "run_libvirt": "kvmcpuid_virt.probe.libvirt",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
