"""What a libvirt daemon reports about its host: the host-model CPU of its
domain capabilities, asked over a connection (`baseline --connect`). The one
place outside probe/ that talks to libvirt; config.host_model turns the
answer into a table."""

from __future__ import annotations

from kvmcpuid_virt.config.host_model import HostModel, host_model_dump
from kvmcpuid_virt.errors import ToolError
from kvmcpuid_virt.toolfacts.facts import ToolFacts

__all__ = ["connect_dump", "domain_capabilities"]


def domain_capabilities(uri: str) -> str:
    """The domain capabilities XML of libvirt at `uri` (x86_64, kvm)."""
    try:
        import libvirt
    except ImportError:
        raise ToolError("--connect needs libvirt-python (pip install libvirt-python)") from None
    # libvirt prints every error to stderr by default; ours carry the message.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        # Read-only connections may not ask for domain capabilities.
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise ToolError(f"{uri}: {' '.join(str(exc).split())}") from None
    try:
        return str(conn.getDomainCapabilities(None, "x86_64", None, "kvm", 0))
    except libvirt.libvirtError as exc:
        raise ToolError(f"{uri}: domain capabilities: {' '.join(str(exc).split())}") from None
    finally:
        conn.close()


def connect_dump(uri: str, facts: ToolFacts) -> HostModel:
    """host_model_dump of the domain capabilities libvirt at `uri` reports
    (qemu+ssh://host/system for a remote host), through the local cpu_map."""
    return host_model_dump(domain_capabilities(uri), uri, facts)
