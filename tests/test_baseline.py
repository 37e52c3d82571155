"""Baseline on the real CPU dumps, checked against bits read independently:
cpu_map's x86_features.xml and the raw <cpudata> parsed here with lxml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from lxml import etree

from kvmcpuid_virt.analysis.baseline import baseline
from kvmcpuid_virt.cpuid.formats import Dump
from kvmcpuid_virt.errors import PolicyError
from kvmcpuid_virt.fsutil import load_dump
from kvmcpuid_virt.toolfacts.facts import ToolFacts
from tests.conftest import cpu_dump_paths

CPU_MAP = Path("/usr/share/libvirt/cpu_map/x86_features.xml")
REGS = ("eax", "ebx", "ecx", "edx")


def _cpu_map_bits() -> dict[str, tuple[int, int, str, int]]:
    if not CPU_MAP.exists():
        pytest.skip("libvirt cpu_map is not installed")
    out = {}
    for f in etree.parse(str(CPU_MAP)).getroot().iter("feature"):
        c = f.find("cpuid")
        if c is None:
            continue
        for r in REGS:
            value = c.get(r)
            if value:
                out[f.get("name", "")] = (int(c.get("eax_in", "0"), 16),
                                          int(c.get("ecx_in", "0"), 16), r, int(value, 16))
    return out


def _raw(path: Path) -> dict[tuple[int, int], dict[str, int]]:
    return {
        (int(c.get("eax_in", "0"), 16), int(c.get("ecx_in", "0"), 16)):
            {r: int(c.get(r, "0"), 16) for r in REGS}
        for c in etree.parse(str(path)).getroot().iter("cpuid")
    }


def _has(raw: dict[tuple[int, int], dict[str, int]], leaf: int, sub: int, reg: str,
         mask: int) -> bool:
    base = leaf & 0x80000000
    top = raw.get((base, 0), {}).get("eax", 0)
    if leaf > top:
        return False
    return raw.get((leaf, sub), {}).get(reg, 0) & mask == mask


def _groups() -> dict[str, list[Path]]:
    paths = cpu_dump_paths()
    if not paths:
        pytest.skip("no real CPU dumps")
    out: dict[str, list[Path]] = {}
    for p in paths:
        out.setdefault("amd" if _raw(p)[(0, 0)]["ebx"] == 0x68747541 else "intel", []).append(p)
    return out


@pytest.mark.libvirt
@pytest.mark.parametrize("vendor", ["intel", "amd"])
def test_baseline_is_exactly_the_common_cpu_map_features(vendor: str) -> None:
    """Subset of every input and maximal: a cpu_map feature is on in the
    baseline iff every raw dump has its bits (within that dump's max leaf)."""
    bits = _cpu_map_bits()
    paths = _groups()[vendor]
    raws = [_raw(p) for p in paths]
    result = baseline([load_dump(str(p)) for p in paths])
    mismatched = []
    for name, (leaf, sub, reg, mask) in bits.items():
        if leaf == 7 and sub > 0 and any(r[(7, 0)]["eax"] < sub for r in raws):
            expected = False
        else:
            expected = all(_has(r, leaf, sub, reg, mask) for r in raws)
        got = result.table.get(leaf, sub, reg) & mask == mask  # type: ignore[arg-type]
        if got != expected:
            mismatched.append((name, expected, got))
    assert not mismatched
    assert any(bits[n][0] == 7 for n in bits if _has(_raw(paths[0]), *bits[n]))


def test_min_fields_and_notes() -> None:
    paths = _groups()["intel"]
    raws = [_raw(p) for p in paths]
    result = baseline([load_dump(str(p)) for p in paths])
    assert result.table.get(0, 0, "eax") == min(r[(0, 0)]["eax"] for r in raws)
    phys = min(r[(0x80000008, 0)]["eax"] & 0xFF for r in raws)
    assert result.table.get(0x80000008, 0, "eax") & 0xFF == phys
    assert any("address sizes" in n for n in result.notes)


def test_mixed_vendors_refused_unless_allowed() -> None:
    paths = cpu_dump_paths()
    if not paths:
        pytest.skip("no real CPU dumps")
    dumps = [load_dump(str(p)) for p in paths]
    with pytest.raises(PolicyError, match="vendors"):
        baseline(dumps)
    mixed = baseline(dumps, allow_mixed_vendors=True)
    # lm (0x80000001 EDX[29]) is on every x86-64 dump and vendor-neutral;
    # sse4a (ECX[6]) is AMD-only and must go even if all AMD hosts have it.
    assert mixed.table.get(0x80000001, 0, "edx") >> 29 & 1
    assert not mixed.table.get(0x80000001, 0, "ecx") >> 6 & 1


def test_qemu_starts_with_baseline_of_this_host_and_an_amd_dump(
    kvm: object, qemu_binary: str, live_facts: ToolFacts
) -> None:
    from kvmcpuid_virt.adapters.qemu import render_argv
    from kvmcpuid_virt.config.build import build
    from kvmcpuid_virt.config.cpuconfig import vendor_of
    from kvmcpuid_virt.kvm import Kvm

    with Kvm() as k:
        live = Dump(k.supported_cpuid(), "supported", {}, "/dev/kvm")
    others = [load_dump(str(p)) for p in _groups()["amd"]]
    others = [d for d in others if vendor_of(d.table) == vendor_of(live.table)]
    if not others:
        pytest.skip("no dump of this host's vendor")
    result = baseline([live, others[0]])
    config = build(result.table, facts=live_facts)
    argv = [qemu_binary, "-accel", "kvm", "-machine", "pc", "-nodefaults", "-display", "none",
            "-no-user-config", "-S", "-qmp", "stdio", *render_argv(config)]
    proc = subprocess.run(argv, input='{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr.lower(), proc.stderr


def test_qemu_starts_with_the_baseline_cli_of_this_host_alone(kvm: object,
                                                              qemu_binary: str) -> None:
    # This host among the inputs: what QEMU's start trial found it cannot set
    # up here (arch-capabilities on this AMD host) is not common to every
    # host. It used to come out =on, and QEMU aborted on MSR 0x10a.
    r = subprocess.run([sys.executable, "-m", "kvmcpuid_virt.cli", "baseline", "--this-host",
                        "--format", "qemu"], capture_output=True, text=True, timeout=120,
                       check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    argv = [qemu_binary, "-accel", "kvm", "-machine", "pc", "-nodefaults", "-display", "none",
            "-no-user-config", "-S", "-qmp", "stdio", *r.stdout.split()]
    proc = subprocess.run(argv, input='{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr.lower(), proc.stderr


@pytest.mark.libvirt  # cpu_map picks the model
def test_libvirt_baseline_warns_whose_identity_the_guest_gets() -> None:
    """A cluster's <cpu> names a cpu_map model (never host-passthrough), so the
    guest sees that model's family/model/stepping: the command says which."""
    dumps = [p for p in cpu_dump_paths() if "EPYC" in p.name and p.suffix == ".xml"]
    assert len(dumps) >= 2
    r = subprocess.run([sys.executable, "-m", "kvmcpuid_virt.cli", "baseline", *map(str, dumps),
                        "--format", "libvirt"], capture_output=True, text=True, timeout=120,
                       check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    cpu = etree.fromstring(r.stdout.encode())
    assert cpu.get("mode") == "custom"
    model = cpu.findtext("model")
    assert model
    warnings = [line for line in r.stderr.splitlines() if ": warning: " in line]
    assert len(warnings) == 1 and f"names {model!r}" in warnings[0], r.stderr


@pytest.mark.libvirt  # cpu_map picks the model
def test_qemu_baseline_of_other_hosts_names_the_model_libvirt_names() -> None:
    """-cpu host would give the guest each host's own identity and caches:
    a baseline of other hosts names the same model as its libvirt <cpu>."""
    dumps = [str(p) for p in cpu_dump_paths() if "EPYC" in p.name]
    argv = [sys.executable, "-m", "kvmcpuid_virt.cli", "baseline", *dumps, "--format"]
    q = subprocess.run([*argv, "qemu"], capture_output=True, text=True, timeout=120, check=False)
    lv = subprocess.run([*argv, "libvirt"], capture_output=True, text=True, timeout=120,
                        check=False)  # fmt: skip
    assert q.returncode == 0 and lv.returncode == 0, q.stderr + lv.stderr
    model = etree.fromstring(lv.stdout.encode()).findtext("model")
    value = q.stdout.split()[1]
    assert value.split(",")[0] == model != "host"
    assert "host-cache-info" not in value
    assert f"names {model!r}" in q.stderr


def test_qemu_baseline_without_cpu_map_stays_host_and_says_why() -> None:
    """Where libvirt's cpu_map is missing (a QEMU-only host; the unit subset
    hides it), no model can be chosen: -cpu host, with a warning."""
    if CPU_MAP.exists():
        pytest.skip("cpu_map is installed: the named-model case is tested above")
    dumps = [str(p) for p in cpu_dump_paths() if "EPYC" in p.name]
    r = subprocess.run([sys.executable, "-m", "kvmcpuid_virt.cli", "baseline", *dumps,
                        "--format", "qemu"], capture_output=True, text=True, timeout=120,
                       check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[1].startswith("host,")
    assert "warning: -cpu host" in r.stderr and "cpu_map is not installed" in r.stderr
