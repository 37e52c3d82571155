"""A `host` configuration that is not this host's own CPU (a cluster baseline,
a dump from another host) is rendered as a named cpu_map model with explicit
features, never host-passthrough: the guest's features are then the same on
every host it lands on. Checked against libvirt's own cpu_map files (model
contents, feature bit positions), the raw <cpudata> of real dumps, and the
real libvirtd's QEMU command line (domainXMLToNative)."""

from __future__ import annotations

import itertools
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from lxml import etree

from kvmcpuid_virt.adapters import libvirt as lv
from kvmcpuid_virt.analysis.baseline import baseline
from kvmcpuid_virt.config.build import Policy, build
from kvmcpuid_virt.config.cpuconfig import CpuConfig
from kvmcpuid_virt.fsutil import load_dump
from tests.conftest import FACTS, cpu_dump_paths

CPU_MAP = Path("/usr/share/libvirt/cpu_map")
REGS = ("eax", "ebx", "ecx", "edx")
Raw = dict[tuple[int, int], dict[str, int]]
# Bits a KVM guest gets whatever the hardware has: KVM sets the hypervisor bit
# and emulates x2APIC and the TSC-deadline timer in its local APIC (Linux
# arch/x86/kvm/cpuid.c, kvm_set_cpu_caps / __do_cpuid_func), and QEMU sets
# ARAT (its APIC timer always runs). A raw <cpudata> of the bare CPU lacks them.
SOFTWARE = frozenset({"hypervisor", "x2apic", "tsc-deadline", "arat"})

pytestmark = pytest.mark.skipif(not (CPU_MAP / "x86_features.xml").exists(),
                                reason="libvirt's cpu_map is not installed")  # fmt: skip


def _feature_bits() -> dict[str, tuple[int, int, str, int]]:
    """cpu_map's CPUID features: name -> (leaf, subleaf, register, mask)."""
    out = {}
    for f in etree.parse(str(CPU_MAP / "x86_features.xml")).getroot().iter("feature"):
        c = f.find("cpuid")
        if c is None:
            continue
        for r in REGS:
            if c.get(r):
                out[str(f.get("name"))] = (int(c.get("eax_in", "0"), 16),
                                           int(c.get("ecx_in", "0"), 16), r,
                                           int(str(c.get(r)), 16))  # fmt: skip
    return out


def _model_features(model: str) -> set[str]:
    """A cpu_map model's own features, read from its file (no model there
    inherits from another in libvirt 9.0; one that did would fail here)."""
    root = etree.parse(str(CPU_MAP / f"x86_{model}.xml")).getroot()
    m = root.find("model")
    assert m is not None and m.find("model") is None, model
    return {str(f.get("name")) for f in m.findall("feature")}


def _raw(path: Path) -> Raw:
    return {(int(c.get("eax_in", "0"), 16), int(c.get("ecx_in", "0"), 16)):
            {r: int(c.get(r, "0"), 16) for r in REGS}
            for c in etree.parse(str(path)).getroot().iter("cpuid")}  # fmt: skip


def _has(raw: Raw, bit: tuple[int, int, str, int]) -> bool:
    leaf, sub, reg, mask = bit
    if leaf > raw.get((leaf & 0x8000_0000, 0), {}).get("eax", 0):
        return False
    return raw.get((leaf, sub), {}).get(reg, 0) & mask == mask


def _vendor(raw: Raw) -> str:
    return "amd" if raw[(0, 0)]["ebx"] == 0x68747541 else "intel"


def _pairs() -> list[tuple[Path, Path]]:
    paths = cpu_dump_paths()
    return [(a, b) for a, b in itertools.combinations(paths, 2)
            if _vendor(_raw(a)) == _vendor(_raw(b))]  # fmt: skip


def _baseline_config(paths: tuple[Path, ...]) -> CpuConfig:
    result = baseline([load_dump(str(p)) for p in paths])
    return build(result.table, facts=FACTS, source="baseline", this_host=False)


def _guest_features(cpu: etree._Element) -> set[str]:
    """What libvirt gives a guest of this <cpu mode='custom'>: the model's
    cpu_map features, plus those required, minus those disabled."""
    model = cpu.find("model")
    assert model is not None and model.text
    out = _model_features(model.text)
    for f in cpu.findall("feature"):
        name = str(f.get("name"))
        if f.get("policy") == "require":
            out.add(name)
        elif f.get("policy") == "disable":
            out.discard(name)
    return out


def _pair_id(pair: tuple[Path, Path]) -> str:
    return "+".join(p.stem.removeprefix("x86_64-cpuid-") for p in pair)


@pytest.mark.parametrize("pair", _pairs(), ids=_pair_id)
def test_baseline_renders_a_named_model_every_host_runs(pair: tuple[Path, Path]) -> None:
    """A baseline of two real hosts: mode='custom' on a cpu_map model, and
    every CPUID feature the guest gets (cpu_map's model content plus the
    <feature> lines, bit positions from x86_features.xml) is in both hosts'
    raw <cpudata>: the guest can run, and migrate, on either."""
    config = _baseline_config(pair)
    model = lv.base_model(config, FACTS)
    assert model != lv.HOST_PASSTHROUGH and model in FACTS.cpu_map
    cpu = etree.fromstring(lv.render(config, model))
    assert cpu.get("mode") == "custom" and cpu.get("migratable") is None
    assert cpu.find("cache") is None  # no host cache passthrough either
    bits = _feature_bits()
    raws = [_raw(p) for p in pair]
    cpuid_features = {n for n in _guest_features(cpu) if n in bits} - SOFTWARE
    assert cpuid_features, "no CPUID feature at all: the check below would be empty"
    missing = {n: [p.stem for p, r in zip(pair, raws, strict=True) if not _has(r, bits[n])]
               for n in cpuid_features if not all(_has(r, bits[n]) for r in raws)}
    assert not missing
    note = lv.identity_note(config, model)
    assert note is not None and model in note and "host-passthrough" in note


def test_only_this_hosts_own_cpu_is_host_passthrough() -> None:
    """The same `host` table: host-passthrough when it came from /dev/kvm
    here, a named model from a dump path or as a baseline, and the caller's
    explicit choice either way; a named model never is."""
    path = cpu_dump_paths()[0]
    table = load_dump(str(path)).table
    live = build(table, facts=FACTS, source="/dev/kvm")
    dumped = build(table, facts=FACTS, source=str(path), this_host=False)
    assert lv.own_host(live) and not lv.own_host(dumped)
    assert lv.base_model(live, FACTS) == lv.HOST_PASSTHROUGH
    assert lv.identity_note(live, lv.HOST_PASSTHROUGH) is None
    assert lv.base_model(dumped, FACTS) in FACTS.cpu_map
    assert lv.base_model(dumped, FACTS, passthrough=True) == lv.HOST_PASSTHROUGH
    assert lv.base_model(live, FACTS, passthrough=False) in FACTS.cpu_map
    named = build(table, Policy(model="auto"), facts=FACTS, source="/dev/kvm")
    assert lv.base_model(named, FACTS, passthrough=True) == named.model


@pytest.mark.libvirt
def test_libvirt_starts_the_baseline_on_its_model_not_host(libvirt_conn_uri: str) -> None:
    """The real libvirtd's QEMU command line for a baseline's <cpu>: `-cpu
    MODEL,...` with the cpu_map model base_model chose, never `host`."""
    import libvirt

    pair = _pairs()[0]
    config = _baseline_config(pair)
    model = lv.base_model(config, FACTS)
    domain = etree.fromstring(
        "<domain type='kvm'><name>kvmcpuid-t-baseline</name><memory unit='MiB'>64</memory>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices><emulator>"
        "/usr/bin/qemu-system-x86_64</emulator></devices></domain>")
    domain.insert(3, etree.fromstring(lv.render(config, model)))
    conn = libvirt.open(libvirt_conn_uri)
    try:
        argv = shlex.split(conn.domainXMLToNative(
            "qemu-argv", etree.tostring(domain, encoding="unicode"), 0))
    finally:
        conn.close()
    value = argv[argv.index("-cpu") + 1].split(",")
    assert value[0] == model != "host"
    assert "host-cache-info=on" not in value and "migratable=on" not in value


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmcpuid_virt.cli", *args], capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip


@pytest.mark.qemu
def test_cli_baseline_and_foreign_dump_are_custom(qemu_binary: str) -> None:
    """`baseline --format libvirt` and `libvirt-xml --from` another host's
    dump print a named model (the latter with the warning, one line);
    --host-passthrough asks for host-passthrough explicitly, and is refused
    in one line for a named model."""
    a, b = _pairs()[0]
    base = _cli("baseline", str(a), str(b), "--format", "libvirt")
    assert base.returncode == 0, base.stderr
    assert etree.fromstring(base.stdout.encode()).get("mode") == "custom"
    other = _cli("libvirt-xml", "--from", str(a))
    assert other.returncode == 0, other.stderr
    assert etree.fromstring(other.stdout.encode()).get("mode") == "custom"
    warnings = [ln for ln in other.stderr.splitlines() if "host-passthrough" in ln]
    assert len(warnings) == 1 and "warning" in warnings[0]
    asked = _cli("libvirt-xml", "--from", str(a), "--host-passthrough")
    assert asked.returncode == 0, asked.stderr
    assert etree.fromstring(asked.stdout.encode()).get("mode") == "host-passthrough"
    bad = _cli("libvirt-xml", "--from", str(a), "--model", "auto", "--host-passthrough")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "Traceback" not in bad.stderr and "--host-passthrough" in bad.stderr
