"""The cluster baseline against libvirt's own: baselineHypervisorCPU (and the
hypervisor-free baselineCPU) over the same real CPUs must name the same
features as kvmcpuid's baseline. The CPUs are given to libvirt as <cpu>
elements listing the features present in each dump, read here with cpu_map's
own bit definitions (independent of the registry)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from lxml import etree

from kvmcpuid_virt.analysis.baseline import baseline
from kvmcpuid_virt.cpuid.features import FeatureKind, registry
from kvmcpuid_virt.fsutil import load_dump
from tests.conftest import cpu_dump_paths

CPU_MAP = Path("/usr/share/libvirt/cpu_map/x86_features.xml")
VENDORS = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD"}


def _cpu_map_bits() -> dict[str, tuple[int, int, str, int]]:
    out = {}
    for f in etree.parse(str(CPU_MAP)).getroot().iter("feature"):
        c = f.find("cpuid")
        if c is None:
            continue
        for reg in ("eax", "ebx", "ecx", "edx"):
            value = c.get(reg)
            if value:
                mask = int(value, 16)
                out[f.get("name", "")] = (int(c.get("eax_in", "0"), 16),
                                          int(c.get("ecx_in", "0"), 16), reg, mask)
    return out


def _features(path: Path, bits: dict[str, tuple[int, int, str, int]]) -> set[str]:
    regs: dict[tuple[int, int], dict[str, int]] = {}
    for c in etree.parse(str(path)).getroot().iter("cpuid"):
        key = (int(c.get("eax_in", "0"), 16), int(c.get("ecx_in", "0"), 16))
        regs[key] = {r: int(c.get(r, "0"), 16) for r in ("eax", "ebx", "ecx", "edx")}
    return {
        name for name, (leaf, sub, reg, mask) in bits.items()
        if regs.get((leaf, sub), {}).get(reg, 0) & mask == mask
    }


def _cpu(vendor: str, features: set[str]) -> str:
    cpu = etree.Element("cpu")
    etree.SubElement(cpu, "arch").text = "x86_64"
    etree.SubElement(cpu, "model").text = "486"  # every x86 CPU has its features
    etree.SubElement(cpu, "vendor").text = vendor
    for name in sorted(features):
        etree.SubElement(cpu, "feature", policy="require", name=name)
    return etree.tostring(cpu).decode()


def _groups() -> list[tuple[str, list[Path]]]:
    out: dict[str, list[Path]] = {}
    for path in cpu_dump_paths():
        vendor = load_dump(str(path)).table.lookup(0)
        assert vendor is not None
        raw = b"".join(r.to_bytes(4, "little") for r in (vendor.ebx, vendor.edx, vendor.ecx))
        out.setdefault(raw.decode(), []).append(path)
    return sorted((v, ps) for v, ps in out.items() if v in VENDORS and len(ps) > 1)


# Bits that are no CPU model content for libvirt: they follow guest state
# (osxsave, ospke) or nobody can set them (cmt, mbm_*: leaf 0xF monitoring).
def _comparable(names: set[str]) -> set[str]:
    reg = registry()
    keep = set()
    for name in names:
        f = reg.by_libvirt(name)
        if f is not None and f.kind in (FeatureKind.PLAIN, FeatureKind.KVM_PV):
            keep.add(name)
    return keep


@pytest.mark.libvirt
@pytest.mark.parametrize("method", ["baselineHypervisorCPU", "baselineCPU"])
@pytest.mark.parametrize(
    ("vendor", "paths"), _groups(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_baseline_names_what_libvirt_names(
    vendor: str, paths: list[Path], method: str, libvirt_conn_uri: str
) -> None:
    import libvirt

    if not CPU_MAP.exists():
        pytest.skip("libvirt's cpu_map is not installed")
    bits = _cpu_map_bits()
    cpus = [_cpu(VENDORS[vendor], _features(p, bits)) for p in paths]
    conn = libvirt.open(libvirt_conn_uri)
    try:
        flags = libvirt.VIR_CONNECT_BASELINE_CPU_EXPAND_FEATURES
        call: Callable[[], str]
        if method == "baselineCPU":
            call = lambda: conn.baselineCPU(cpus, flags)  # noqa: E731
        else:
            call = lambda: conn.baselineHypervisorCPU(  # noqa: E731
                None, "x86_64", None, "kvm", cpus, flags
            )
        answer = etree.fromstring(call().encode())
    finally:
        conn.close()
    theirs = {f.get("name", "") for f in answer.iter("feature")
              if f.get("policy", "require") == "require"}
    ours_table = baseline([load_dump(str(p)) for p in paths]).table
    ours = {f.libvirt for f in registry().present(ours_table) if f.libvirt}
    assert len(_comparable(theirs)) > 30  # a real answer, not an empty one
    assert _comparable(ours) == _comparable(theirs), (
        f"only ours: {sorted(_comparable(ours) - _comparable(theirs))}; "
        f"only libvirt's: {sorted(_comparable(theirs) - _comparable(ours))}"
    )
