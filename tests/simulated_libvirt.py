"""A libvirtd that refuses transiently, which this machine's daemon does only
now and then (the cgroup BPF EAGAIN, seen once in four conformance runs with
16 guests in flight) or not without disturbing other users (a restart).

The simulation wraps a real connection to the real daemon: the first N
createXML calls (or reconnections) raise a real libvirt.libvirtError with
the fields the daemon sends for that refusal; every other call, and every
call after those N, goes to the daemon."""

from __future__ import annotations

import errno
import threading
from typing import Any

import libvirt

from kvmcpuid_virt.probe.libvirt import LibvirtProbe

__all__ = ["BPF_EAGAIN", "CONNECTION_REFUSED", "Refusals", "SimulatedRefusingDaemon",
           "bpf_eagain", "connection_refused", "libvirt_error"]

BPF_EAGAIN = "failed to load cgroup BPF prog: Resource temporarily unavailable"
CONNECTION_REFUSED = "Failed to connect socket to '/run/libvirt/libvirt-sock': Connection refused"


def libvirt_error(code: int, domain: int, message: str, int1: int = -1) -> libvirt.libvirtError:
    """A libvirtError carrying these fields, as libvirt-python builds one
    from virGetLastError() (code, domain, message, level, str1, str2, str3,
    int1, int2)."""
    # libvirtError() takes its message from this thread's last libvirt
    # error, if any: clear it, or the message would be that one's.
    libvirt.virResetLastError()
    exc = libvirt.libvirtError(message)
    exc.err = (code, domain, message, libvirt.VIR_ERR_ERROR, "%s", message, None, int1, -1)
    return exc


def bpf_eagain() -> libvirt.libvirtError:
    """What qemuProcessLaunch's cgroup setup reports when the kernel's BPF
    verifier gives up with EAGAIN: virReportSystemError(errno, ...) from
    vircgroupv2devices.c, errno travelling as int1."""
    return libvirt_error(libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_CGROUP, BPF_EAGAIN,
                         errno.EAGAIN)


def connection_refused() -> libvirt.libvirtError:
    """What opening a connection says while libvirtd restarts (its socket
    is there, nobody accepts yet)."""
    return libvirt_error(libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, CONNECTION_REFUSED,
                         errno.ECONNREFUSED)


class Refusals:
    """How many refusals are left, shared by every connection of a probe."""

    def __init__(self, create: int = 0, reconnect: int = 0) -> None:
        self.create = create
        self.reconnect = reconnect
        self.refused = 0
        self._lock = threading.Lock()

    def take(self, kind: str) -> bool:
        with self._lock:
            left = getattr(self, kind)
            if left <= 0:
                return False
            setattr(self, kind, left - 1)
            self.refused += 1
            return True


class _RefusingConnection:
    def __init__(self, real: Any, refusals: Refusals) -> None:
        self._real = real
        self._refusals = refusals

    def createXML(self, xml: str, flags: int = 0) -> Any:
        if self._refusals.take("create"):
            raise bpf_eagain()
        return self._real.createXML(xml, flags)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class SimulatedRefusingDaemon(LibvirtProbe):
    """A LibvirtProbe on the real daemon whose connections refuse the first
    `refusals.create` domains with the cgroup BPF EAGAIN, and whose
    reconnections (every connection after the first) are refused
    `refusals.reconnect` times as during a restart."""

    def __init__(self, uri: str, refusals: Refusals, **kwargs: Any) -> None:
        self.refusals = refusals
        self.opens = 0
        super().__init__(uri, **kwargs)

    def _libvirt_open(self) -> Any:
        if self.opens and self.refusals.take("reconnect"):
            raise connection_refused()
        self.opens += 1
        return _RefusingConnection(super()._libvirt_open(), self.refusals)
