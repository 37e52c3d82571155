"""`kvmcpuid baseline --connect URI`: a libvirt host's host-model CPU (from
its domain capabilities) as a baseline input.

Expected bits come from libvirt's own cpu_map files, read here with lxml (the
model's feature list, each feature's <cpuid> bit), and from the real libvirtd
on this machine; not from the registry under test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from lxml import etree

from kvmcpuid_virt.analysis.baseline import baseline
from kvmcpuid_virt.config.host_model import host_model_dump
from kvmcpuid_virt.toolfacts.facts import ToolFacts
from kvmcpuid_virt.toolfacts.learn import cpu_map_models, msr_features
from tests.conftest import REPO

CPU_MAP = Path("/usr/share/libvirt/cpu_map")


def _cpu_map_facts() -> ToolFacts:
    """The tool facts host_model_dump reads: this machine's cpu_map alone."""
    return ToolFacts(qemu=None, cpu_map=cpu_map_models(CPU_MAP), msr_features=msr_features(CPU_MAP))

Bit = tuple[int, int, str, int]


@pytest.fixture(scope="module")
def cpu_map_bits() -> dict[str, Bit]:
    """cpu_map feature name -> (leaf, subleaf, register, bit), from its <cpuid>."""
    path = CPU_MAP / "x86_features.xml"
    if not path.exists():
        pytest.skip(f"libvirt's cpu_map is not installed ({CPU_MAP})")
    out: dict[str, Bit] = {}
    for f in etree.parse(str(path)).getroot().iter("feature"):
        c = f.find("cpuid")
        if c is None:
            continue
        for reg in ("eax", "ebx", "ecx", "edx"):
            value = int(c.get(reg, "0"), 16)
            if value:
                out[f.get("name", "")] = (int(c.get("eax_in", "0"), 16),
                                          int(c.get("ecx_in", "0"), 16), reg,
                                          value.bit_length() - 1)  # fmt: skip
    return out


def _domcaps(model: str, vendor: str, features: dict[str, str]) -> str:
    """A domain capabilities document shaped like libvirt's (virsh
    domcapabilities), with only the host-model CPU mode filled in."""
    root = etree.Element("domainCapabilities")
    cpu = etree.SubElement(root, "cpu")
    mode = etree.SubElement(cpu, "mode", name="host-model", supported="yes")
    etree.SubElement(mode, "model", fallback="forbid").text = model
    etree.SubElement(mode, "vendor").text = vendor
    for name, policy in features.items():
        etree.SubElement(mode, "feature", policy=policy, name=name)
    return etree.tostring(root, encoding="unicode")


def _set_bits(table_words: dict[tuple[int, int, str], int]) -> set[Bit]:
    return {(leaf, sub, reg, b) for (leaf, sub, reg), v in table_words.items()
            for b in range(32) if v >> b & 1}  # fmt: skip


def test_host_model_is_its_model_plus_required_minus_disabled(
    cpu_map_bits: dict[str, Bit],
) -> None:
    model_file = CPU_MAP / "x86_Opteron_G1.xml"
    if not model_file.exists():
        pytest.skip("no Opteron_G1 in cpu_map")
    model = {f.get("name", "") for f in etree.parse(str(model_file)).getroot().iter("feature")}
    xml = _domcaps("Opteron_G1", "AMD",
                   {"avx2": "require", "sse2": "disable", "mds-no": "require"})  # fmt: skip
    hm = host_model_dump(xml, "synthetic", _cpu_map_facts())
    expected = {cpu_map_bits[n] for n in (model | {"avx2"}) - {"sse2"}}
    words: dict[tuple[int, int, str], int] = {}
    for e in hm.dump.table:
        if e.function == 0:
            assert e.ebx == 0x68747541  # "Auth": the vendor is in leaf 0
            assert e.eax == 7  # the max basic leaf reaches avx2's leaf 7
            continue
        if e.function == 0x8000_0000:
            assert e.eax == 0x8000_0001  # lm, nx, syscall live in 0x80000001
            continue
        for reg in ("eax", "ebx", "ecx", "edx"):
            words[(e.function, e.index, reg)] = e.reg(reg)  # type: ignore[arg-type]
    assert _set_bits(words) == expected
    # mds-no is IA32_ARCH_CAPABILITIES bit 5, an MSR, not a CPUID bit.
    assert hm.msr_features == ("mds-no",) and hm.unknown == ()


@pytest.mark.libvirt
def test_msr_features_are_cpu_maps_msr_definitions() -> None:
    names = msr_features(CPU_MAP)
    if not names:
        pytest.skip("libvirt's cpu_map is not installed or defines no MSR features")
    # IA32_ARCH_CAPABILITIES (MSR 0x10a) bits RDCL_NO and MDS_NO (Intel SDM).
    assert {"rdctl-no", "mds-no"} <= names
    assert "sse2" not in names and "lahf_lm" not in names


def test_feature_only_input_keeps_every_leaf(cpu_map_bits: dict[str, Bit]) -> None:
    # The host-model view carries no max leaves (its leaf 0 has only the
    # vendor): basic-leaf features (sse2: CPUID.1:EDX[26]) must not read as
    # beyond a max basic leaf of 0. A regression: they were all dropped.
    hm = host_model_dump(_domcaps("Opteron_G1", "AMD", {"avx2": "require"}), "s",
                         _cpu_map_facts())
    result = baseline([hm.dump])
    leaf, sub, reg, bit = cpu_map_bits["sse2"]
    assert result.table.get(leaf, sub, reg) >> bit & 1  # type: ignore[arg-type]
    leaf, sub, reg, bit = cpu_map_bits["avx2"]
    assert result.table.get(leaf, sub, reg) >> bit & 1  # type: ignore[arg-type]


def test_connect_alone_renders_the_basic_leaf_features(libvirt_conn_uri: str) -> None:
    # A regression: a baseline of only --connect inputs had max basic leaf 0
    # and so turned every leaf 1 and 7 feature off in its QEMU flags.
    r = subprocess.run([sys.executable, "-m", "kvmcpuid_virt.cli", "baseline", "--connect",
                        libvirt_conn_uri, "--format", "qemu"], capture_output=True, text=True,
                       cwd=REPO, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    flags = r.stdout.strip().split(",")
    assert "fpu=on" in flags and "sse2=on" in flags  # on every x86-64 CPU


def _baseline_json(*args: str) -> tuple[int, dict[str, object], str]:
    r = subprocess.run([sys.executable, "-m", "kvmcpuid_virt.cli", "baseline", *args,
                        "--format", "json"], capture_output=True, text=True, cwd=REPO,
                       timeout=120)  # fmt: skip
    return r.returncode, (json.loads(r.stdout) if r.returncode == 0 else {}), r.stderr


def _words(doc: dict[str, object]) -> dict[tuple[int, int, str], int]:
    out = {}
    for e in doc["entries"]:  # type: ignore[attr-defined]
        for reg in ("eax", "ebx", "ecx", "edx"):
            out[(int(e["function"], 16), int(e["index"], 16), reg)] = int(e[reg], 16)
    return out


def test_connect_and_this_host_give_a_subset_of_both(
    kvm: object, libvirt_conn_uri: str, cpu_map_bits: dict[str, Bit]
) -> None:
    rc, both, err = _baseline_json("--connect", libvirt_conn_uri, "--this-host")
    assert rc == 0, err
    rc, host, err = _baseline_json("--this-host")
    assert rc == 0, err
    # Every feature bit (a cpu_map CPUID bit) of the baseline is one this
    # host's KVM has; and the basic leaves are not lost to the feature-only
    # input (fpu: CPUID.1:EDX[0], present on every x86-64 host).
    feature_bits = set(cpu_map_bits.values())
    both_bits = _set_bits(_words(both)) & feature_bits
    host_bits = _set_bits(_words(host)) & feature_bits
    assert both_bits <= host_bits
    assert cpu_map_bits["fpu"] in both_bits and cpu_map_bits["sse2"] in both_bits


def test_connect_to_an_unreachable_host_is_one_line_exit_2() -> None:
    rc, _, err = _baseline_json("--connect", "qemu+ssh://host.invalid/system")
    assert rc == 2 and err.count("\n") == 1 and "host.invalid" in err


def test_feature_only_dump_without_max_leaves_keeps_every_register() -> None:
    # A feature-only view (kind "config") need not announce max leaves; its
    # words count as they are, and two registers of one leaf both survive.
    from kvmcpuid_virt.cpuid.formats import Dump
    from kvmcpuid_virt.cpuid.table import CpuidEntry, CpuidTable, EntryFlag

    sse3, sse2 = 1 << 0, 1 << 26  # CPUID.1:ECX[0], CPUID.1:EDX[26] (Intel SDM)
    table = CpuidTable([
        CpuidEntry(0, 0, EntryFlag.NONE, 0, 0x756E6547, 0x6C65746E, 0x49656E69),
        CpuidEntry(1, 0, EntryFlag.NONE, 0, 0, sse3, sse2),
    ])
    result = baseline([Dump(table, "config", {}, "view"), Dump(table, "config", {}, "view2")])
    assert result.table.get(1, 0, "ecx") == sse3
    assert result.table.get(1, 0, "edx") == sse2
