"""A libvirt host's CPU as a baseline input: the host-model CPU its domain
capabilities report (`kvmcpuid baseline --connect qemu+ssh://host/system`),
turned into a feature-only Dump (kind "config") through the local cpu_map
(libvirt_caps.connect_dump asks a libvirt host for its domain capabilities).
Its feature-MSR features (mds-no, ...) become the table's feature MSRs: the
bits of the MSRs they name, taken as what that host's vCPUs accept (libvirt
lists in host-model only what the host can run)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

from kvmcpuid_virt.cpuid.features import registry
from kvmcpuid_virt.cpuid.fields import LIBVIRT_VENDOR
from kvmcpuid_virt.cpuid.formats import Dump
from kvmcpuid_virt.cpuid.msr_features import msr_registry
from kvmcpuid_virt.cpuid.msr_values import FeatureMsrs
from kvmcpuid_virt.cpuid.table import INDEXED_LEAVES, CpuidEntry, CpuidTable, EntryFlag
from kvmcpuid_virt.errors import InputError
from kvmcpuid_virt.toolfacts.facts import ToolFacts
from kvmcpuid_virt.xmlutil import parse_xml

if TYPE_CHECKING:
    from lxml import etree

__all__ = ["HostModel", "host_model_dump"]

_LIBVIRT_VENDORS: Final = {short: full for full, short in LIBVIRT_VENDOR.items()}


@dataclasses.dataclass(frozen=True)
class HostModel:
    """A host-model CPU as a baseline input, and what of it has no CPUID bit."""

    dump: Dump
    # cpu_map features defined by an MSR (IA32_ARCH_CAPABILITIES bits and the
    # like), not by CPUID: outside what a CPUID baseline compares.
    msr_features: tuple[str, ...]
    # Names neither the registry nor cpu_map's MSR features know (a newer
    # libvirt than this registry was made from).
    unknown: tuple[str, ...]
    # Of msr_features, those the feature-MSR registry cannot place in the
    # table's MSRs (dump.table.msrs carries the others).
    msr_left_out: tuple[str, ...] = ()


def host_model_dump(domcaps_xml: str, source: str, facts: ToolFacts) -> HostModel:
    """A feature-only Dump (kind "config") from a libvirt domain capabilities
    document: `<mode name='host-model'>`'s model (expanded through the local
    cpu_map) plus its require features minus its disable features, with the
    names that have no CPUID bit in the registry set apart."""
    mode = _host_model_mode(parse_xml(domcaps_xml, source), source)
    names = _feature_names(mode, source, facts)
    vendor = _vendor(mode, source)
    words, by_msr, unknown = _cpuid_words(names, facts.msr_features)
    msrs, left_out = _msr_values(by_msr) if facts.msr_features else (None, by_msr)
    table = _feature_table(vendor, words).with_msrs(msrs)
    dump = Dump(table, "config", {"libvirt_uri": source}, source)
    return HostModel(dump, tuple(by_msr), tuple(unknown), tuple(left_out))


def _msr_values(names: list[str]) -> tuple[FeatureMsrs, list[str]]:
    """The feature MSRs the host-model's MSR features set (each MSR with
    at least one of them; every bit deliverable), and the names the
    feature-MSR registry does not know."""
    reg = msr_registry()
    values: dict[int, int] = {}
    left_out = []
    for name in names:
        f = reg.by_libvirt(name)
        if f is None:
            left_out.append(name)
            continue
        values[f.msr] = values.get(f.msr, 0) | f.mask
    return FeatureMsrs.of(values, values), left_out


def _host_model_mode(root: etree._Element, source: str) -> etree._Element:
    """The first `<mode name='host-model'>`; absent or unsupported is an error,
    as there is then no host CPU to take part in a baseline."""
    mode = next((m for m in root.iter("mode") if m.get("name") == "host-model"), None)
    if mode is None or mode.get("supported") == "no":
        raise InputError(f"{source}: domain capabilities have no supported host-model CPU")
    return mode


def _feature_names(mode: etree._Element, source: str, facts: ToolFacts) -> set[str]:
    """libvirt feature names of the mode: its model's cpu_map features, then its
    own <feature>s added or removed by policy, in document order (libvirt's)."""
    names: set[str] = set()
    model_el = mode.find("model")
    if model_el is not None and model_el.text:
        m = facts.cpu_map.get(model_el.text.strip())
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
    return names


def _vendor(mode: etree._Element, source: str) -> str:
    """The CPUID vendor string of the mode's <vendor>: required, since a
    baseline checks vendors and leaf 0 must carry one."""
    vendor_el = mode.find("vendor")
    vendor = _LIBVIRT_VENDORS.get((vendor_el.text or "").strip() if vendor_el is not None else "")
    if vendor is None:
        raise InputError(f"{source}: host-model has no known <vendor>")
    return vendor


def _cpuid_words(
    names: set[str], msr: frozenset[str]
) -> tuple[dict[tuple[int, int], dict[str, int]], list[str], list[str]]:
    """(leaf, subleaf) -> register -> bits of the names the registry knows;
    the rest, sorted, split into MSR-defined ones and unknown ones."""
    reg = registry()
    words: dict[tuple[int, int], dict[str, int]] = {}
    unknown: list[str] = []
    by_msr: list[str] = []
    for name in sorted(names):
        feat = reg.by_libvirt(name)
        if feat is None:
            (by_msr if name in msr else unknown).append(name)
            continue
        regs = words.setdefault((feat.leaf, feat.subleaf), {})
        regs[feat.reg] = regs.get(feat.reg, 0) | feat.mask
    return words, by_msr, unknown


def _feature_table(vendor: str, words: Mapping[tuple[int, int], dict[str, int]]) -> CpuidTable:
    """The feature-only table: the vendor in leaf 0, the feature words, and max
    leaves that cover them (see below)."""
    vb = vendor.encode()
    leaf0 = {
        "ebx": int.from_bytes(vb[0:4], "little"),
        "edx": int.from_bytes(vb[4:8], "little"),
        "ecx": int.from_bytes(vb[8:12], "little"),
    }
    # Max leaves just high enough for the features' own leaves, so that the
    # table reads consistently on its own (a baseline of feature-only inputs
    # keeps them); with full dumps beside it, theirs decide (analysis/baseline).
    basic = [leaf for leaf, _ in words if leaf < 0x4000_0000]
    extended = [leaf for leaf, _ in words if leaf >= 0x8000_0000]
    entries = [CpuidEntry(0, 0, EntryFlag.NONE, eax=max(basic, default=0), **leaf0)]
    if extended:
        entries.append(CpuidEntry(0x8000_0000, 0, EntryFlag.NONE, eax=max(extended)))
    for (leaf, subleaf), regs in sorted(words.items()):
        flags = EntryFlag.SIGNIFICANT_INDEX if leaf in INDEXED_LEAVES else EntryFlag.NONE
        if leaf == 0:
            continue
        entries.append(CpuidEntry(leaf, subleaf, flags, **regs))
    return CpuidTable(entries)
