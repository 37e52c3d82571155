"""Facts about the machine a table was read on: the metadata every dump carries
and the fingerprint caches are keyed by."""

from __future__ import annotations

import os
import time

from kvmcpuid_virt import __version__

__all__ = ["cpuinfo_field", "host_metadata"]


def cpuinfo_field(name: str, path: str = "/proc/cpuinfo") -> str:
    """The first value of `name` in /proc/cpuinfo ('' when absent or unreadable)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == name:
                    return value.strip()
                if not line.strip():
                    break  # the first CPU's block is enough
    except OSError:
        pass
    return ""


def host_metadata(kvm_api_version: int | None = None) -> dict[str, str]:
    """Kernel, KVM API, CPU model and microcode, time and tool version."""
    meta = {
        "kernel": os.uname().release,
        "cpu_model": cpuinfo_field("model name"),
        "cpu_vendor": cpuinfo_field("vendor_id"),
        "microcode": cpuinfo_field("microcode"),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tool_version": __version__,
        "hostname": os.uname().nodename,
    }
    if kvm_api_version is not None:
        meta["kvm_api_version"] = str(kvm_api_version)
    return meta
