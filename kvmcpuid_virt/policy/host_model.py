"""A libvirt host's CPU as a baseline input: the host-model CPU its domain
capabilities report (`kvmcpuid baseline --connect qemu+ssh://host/system`),
turned into a feature-only Dump (kind "config") through the local cpu_map."""

from __future__ import annotations

from pathlib import Path
from typing import Final

from kvmcpuid_virt.cpuid.features import registry
from kvmcpuid_virt.cpuid.fields import LIBVIRT_VENDOR
from kvmcpuid_virt.cpuid.formats import Dump
from kvmcpuid_virt.cpuid.table import INDEXED_LEAVES, CpuidEntry, CpuidTable, EntryFlag
from kvmcpuid_virt.errors import InputError

__all__ = ["connect_dump", "host_model_dump"]

_LIBVIRT_VENDORS: Final = {short: full for full, short in LIBVIRT_VENDOR.items()}


def host_model_dump(
    domcaps_xml: str, source: str, cpu_map: str | Path | None = None
) -> tuple[Dump, list[str]]:
    """A feature-only Dump (kind "config") from a libvirt domain capabilities
    document: `<mode name='host-model'>`'s model (expanded through the local
    cpu_map) plus its require features minus its disable features. Returns
    the dump and the feature names the registry does not know (skipped)."""
    from kvmcpuid_virt.policy import models
    from kvmcpuid_virt.xmlutil import parse_xml

    root = parse_xml(domcaps_xml, source)
    mode = next(
        (m for m in root.iter("mode") if m.get("name") == "host-model"), None
    )
    if mode is None or mode.get("supported") == "no":
        raise InputError(f"{source}: domain capabilities have no supported host-model CPU")
    names: set[str] = set()
    model_el = mode.find("model")
    if model_el is not None and model_el.text:
        cm = models.cpu_map_models(cpu_map if cpu_map is not None else models.CPU_MAP_DIR)
        m = cm.get(model_el.text.strip())
        if m is None:
            raise InputError(f"{source}: host-model {model_el.text!r} is not in the local cpu_map")
        names |= set(m.features)
    for f in mode.findall("feature"):
        name, policy = f.get("name"), f.get("policy", "require")
        if not name:
            continue
        if policy in ("require", "force", "optional"):
            names.add(name)
        elif policy in ("disable", "forbid"):
            names.discard(name)
    vendor_el = mode.find("vendor")
    vendor = _LIBVIRT_VENDORS.get((vendor_el.text or "").strip() if vendor_el is not None else "")
    if vendor is None:
        raise InputError(f"{source}: host-model has no known <vendor>")
    reg = registry()
    words: dict[tuple[int, int], dict[str, int]] = {}
    unknown = []
    for name in sorted(names):
        feat = reg.by_libvirt(name)
        if feat is None:
            unknown.append(name)
            continue
        regs = words.setdefault((feat.leaf, feat.subleaf), {})
        regs[feat.reg] = regs.get(feat.reg, 0) | feat.mask
    vb = vendor.encode()
    leaf0 = {
        "ebx": int.from_bytes(vb[0:4], "little"),
        "edx": int.from_bytes(vb[4:8], "little"),
        "ecx": int.from_bytes(vb[8:12], "little"),
    }
    entries = [CpuidEntry(0, 0, EntryFlag.NONE, **leaf0)]
    for (leaf, subleaf), regs in sorted(words.items()):
        flags = EntryFlag.SIGNIFICANT_INDEX if leaf in INDEXED_LEAVES else EntryFlag.NONE
        if leaf == 0:
            continue
        entries.append(CpuidEntry(leaf, subleaf, flags, **regs))
    return Dump(CpuidTable(entries), "config", {"libvirt_uri": source}, source), unknown


def connect_dump(uri: str) -> tuple[Dump, list[str]]:
    """host_model_dump of the domain capabilities libvirt at `uri` reports
    (qemu+ssh://host/system for a remote host)."""
    try:
        import libvirt
    except ImportError:
        from kvmcpuid_virt.errors import ToolError

        raise ToolError("--connect needs libvirt-python (pip install libvirt-python)") from None
    from kvmcpuid_virt.errors import ToolError

    # libvirt prints every error to stderr by default; ours carry the message.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        # Read-only connections may not ask for domain capabilities.
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise ToolError(f"{uri}: {' '.join(str(exc).split())}") from None
    try:
        xml = conn.getDomainCapabilities(None, "x86_64", None, "kvm", 0)
    except libvirt.libvirtError as exc:
        raise ToolError(f"{uri}: domain capabilities: {' '.join(str(exc).split())}") from None
    finally:
        conn.close()
    return host_model_dump(str(xml), uri)
