"""`features --format kubevirt`: KubeVirt node labels from KVM's table.

Checked against an independent decoding: libvirt's cpu_map files under
/usr/share/libvirt/cpu_map (x86_features.xml for each feature's CPUID or MSR
bit, the x86_MODEL.xml files for each model's features, x86_vendors.xml for
the vendor names), read here with lxml, applied to the raw <cpudata> of real
CPUs of several generations and both vendors; the label spelling against
KubeVirt's node labeller (pkg/virt-handler/node-labeller: prefixes
cpu-feature/cpu-model/cpu-vendor.node.kubevirt.io/, value "true", its
DefaultObsoleteCPUModels), and live against this host's /dev/kvm.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from lxml import etree

from kvmcpuid_virt.adapters.kubevirt import NodeLabels, node_labels
from kvmcpuid_virt.fsutil import load_dump
from tests.conftest import FACTS, cpu_dump_paths, host_vendor

CPU_MAP = Path("/usr/share/libvirt/cpu_map")
Bit = tuple[int, int, str, int]
REGS = ("eax", "ebx", "ecx", "edx")

# What a KVM guest under QEMU has whatever the CPU says (so a bare-metal
# dump may lack them): hypervisor, tsc-deadline and arat are set by QEMU
# for every KVM guest (target/i386/kvm/kvm.c, kvm_arch_get_supported_cpuid);
# x2apic is emulated by KVM on any CPU (arch/x86/kvm/cpuid.c).
GIVEN_BY_KVM_OR_QEMU = frozenset({"hypervisor", "tsc-deadline", "arat", "x2apic"})
# What a CPU may have that is no node label, and why: osxsave and ospke
# mirror CR4 bits the guest sets (Intel SDM vol. 2A, CPUID 01H ECX[27],
# 07H ECX[4]); topoext needs a matching topology, so QEMU's `host` model,
# libvirt's host-model and hence KubeVirt leave it out (QEMU
# feature_word_info no_autoenable_flags; this host's libvirtd agrees, see
# the live test). cpu_map features QEMU 7.2 has no property for (cmt,
# mbm_total, mbm_local here) cannot be given to a guest either: the test
# asks the recorded QEMU's own property list.
NOT_LABELLED = frozenset({"osxsave", "ospke", "topoext"})
# The CPUID bit that says an MSR exists (Intel SDM vol. 4, table 2-2):
# IA32_ARCH_CAPABILITIES CPUID.07H.0:EDX[29], IA32_CORE_CAPABILITIES
# 07H.0:EDX[30], IA32_PERF_CAPABILITIES 01H:ECX[15] (PDCM); cpu_map's names.
# QEMU drops an MSR's features when the guest lacks that bit.
MSR_ENUMERATED_BY = {0x10A: "arch-capabilities", 0xCF: "core-capability", 0x345: "pdcm"}
LABEL_KEY = re.compile(r"(cpu-feature|cpu-model|cpu-vendor)\.node\.kubevirt\.io/"
                       r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?\Z")  # fmt: skip
# KubeVirt's DefaultObsoleteCPUModels (pkg/virt-handler/node-labeller/util).
KUBEVIRT_OBSOLETE = {"486", "pentium", "pentium2", "pentium3", "pentiumpro", "coreduo", "n270",
                     "core2duo", "Conroe", "athlon", "phenom", "qemu64", "qemu32", "kvm64",
                     "kvm32"}  # fmt: skip
# The model each CPU is (the vendors' and QEMU's naming): it must be labelled.
OWN_MODEL = {
    "Core-i7-5600U": "Broadwell", "Xeon-Gold-6148": "Skylake-Server",
    "Ice-Lake-Server": "Icelake-Server", "EPYC-7601-32-Core": "EPYC",
    "Ryzen-9-3900X-12-Core": "EPYC-Rome", "EPYC-9334-32-Core": "EPYC-Milan",
    "Atom-P5362": "Westmere",
}  # fmt: skip


@dataclass(frozen=True)
class CpuMap:
    cpuid: dict[str, Bit]  # feature -> CPUID position
    msr: dict[str, tuple[int, int]]  # feature -> (MSR index, bit)
    models: dict[str, frozenset[str]]  # model -> its features, parents resolved
    vendors: dict[str, str]  # vendor string -> cpu_map's name


@pytest.fixture(scope="module")
def cpu_map_bits() -> CpuMap:
    """libvirt's cpu_map, read directly (marks the test `libvirt`)."""
    if not (CPU_MAP / "x86_features.xml").exists():
        pytest.skip(f"libvirt's cpu_map is not installed ({CPU_MAP})")
    cpuid: dict[str, Bit] = {}
    msr: dict[str, tuple[int, int]] = {}
    for f in etree.parse(str(CPU_MAP / "x86_features.xml")).getroot().iter("feature"):
        name = str(f.get("name"))
        for c in f.findall("cpuid"):
            for r in REGS:
                mask = int(c.get(r, "0"), 16)
                if mask:
                    cpuid[name] = (int(c.get("eax_in", "0"), 16), int(c.get("ecx_in", "0"), 16),
                                   r, mask.bit_length() - 1)  # fmt: skip
        for m in f.findall("msr"):
            value = int(m.get("edx", "0"), 16) << 32 | int(m.get("eax", "0"), 16)
            if value:
                msr[name] = (int(str(m.get("index")), 16), value.bit_length() - 1)
    raw: dict[str, tuple[set[str], str | None]] = {}
    for path in CPU_MAP.glob("x86_*.xml"):
        for m in etree.parse(str(path)).getroot().findall("model"):
            parent = m.find("model")
            raw[str(m.get("name"))] = ({str(f.get("name")) for f in m.findall("feature")},
                                       None if parent is None else parent.get("name"))  # fmt: skip
    models = {}
    for name in raw:
        feats, cur, seen = set(raw[name][0]), raw[name][1], {name}
        while cur and cur in raw and cur not in seen:
            seen.add(cur)
            feats |= raw[cur][0]
            cur = raw[cur][1]
        models[name] = frozenset(feats)
    vendors = {str(v.get("string")): str(v.get("name"))
               for v in etree.parse(str(CPU_MAP / "x86_vendors.xml")).getroot().iter("vendor")}
    return CpuMap(cpuid, msr, models, vendors)


def _raw(path: Path) -> tuple[dict[tuple[int, int], dict[str, int]], dict[int, int]]:
    root = etree.parse(str(path)).getroot()
    regs = {(int(c.get("eax_in", "0"), 16), int(c.get("ecx_in", "0"), 16)):
            {r: int(c.get(r, "0"), 16) for r in REGS} for c in root.iter("cpuid")}  # fmt: skip
    msrs = {int(str(m.get("index")), 16):
            int(m.get("edx", "0"), 16) << 32 | int(m.get("eax", "0"), 16)
            for m in root.iter("msr")}  # fmt: skip
    return regs, msrs


def decoded(path: Path, cm: CpuMap) -> set[str]:
    """The cpu_map features the raw dump has: CPUID bits (a leaf beyond the
    max basic or extended leaf counts as absent) and MSR bits."""
    regs, msrs = _raw(path)
    top = {0: regs[(0, 0)]["eax"], 0x8000_0000: regs.get((0x8000_0000, 0), {}).get("eax", 0)}
    out = set()
    for name, (leaf, sub, reg, bit) in cm.cpuid.items():
        base = leaf & 0x8000_0000
        if base in top and leaf > top[base]:
            continue
        if regs.get((leaf, sub), {}).get(reg, 0) >> bit & 1:
            out.add(name)
    for name, (index, bit) in cm.msr.items():
        if msrs.get(index, 0) >> bit & 1:
            out.add(name)
    return out


def vendor_name(path: Path, cm: CpuMap) -> str:
    e = _raw(path)[0][(0, 0)]
    text = b"".join(e[r].to_bytes(4, "little") for r in ("ebx", "edx", "ecx")).decode()
    return cm.vendors[text]


def _stem(path: Path) -> str:
    return path.stem.removeprefix("x86_64-cpuid-")


DUMPS = cpu_dump_paths()


def _labels(path: Path) -> NodeLabels:
    return node_labels(load_dump(str(path)).table, FACTS)


def _qemu_knows(name: str) -> bool:
    # QEMU's own property list (every spelling it accepts), as recorded.
    assert FACTS.qemu is not None
    return name in FACTS.qemu.props


@pytest.mark.parametrize("path", DUMPS, ids=[_stem(p) for p in DUMPS])
def test_feature_labels_are_what_the_cpu_has(path: Path, cpu_map_bits: CpuMap) -> None:
    labels = _labels(path)
    have = decoded(path, cpu_map_bits)
    features = set(labels.features)
    # Never a label for a feature the CPU lacks (beyond what KVM/QEMU add).
    assert features - have - GIVEN_BY_KVM_OR_QEMU == set()
    # Feature-MSR bits count too (Atom P5362, EPYC 9334, ... carry <msr>),
    # where the CPUID bit enumerating their MSR is there.
    msr_have = have & set(cpu_map_bits.msr)
    msr_want = {n for n in msr_have if _qemu_knows(n)
                and ((g := MSR_ENUMERATED_BY.get(cpu_map_bits.msr[n][0])) is None or g in have)}
    assert features & set(cpu_map_bits.msr) == msr_want
    # Nothing else the CPU has is lost, but for the documented exceptions.
    lost = have - features - NOT_LABELLED - (msr_have - msr_want)
    assert {n for n in lost if _qemu_knows(n)} == set(), sorted(lost)


@pytest.mark.parametrize("path", DUMPS, ids=[_stem(p) for p in DUMPS])
def test_model_labels_only_where_every_model_feature_is_there(
    path: Path, cpu_map_bits: CpuMap
) -> None:
    labels = _labels(path)
    features = set(labels.features)
    assert labels.models
    for model in labels.models:
        missing = cpu_map_bits.models[model] - features
        assert not missing, (model, sorted(missing))
        assert model not in KUBEVIRT_OBSOLETE
    # And the converse: a model cpu_map says the host has, QEMU defines and
    # KubeVirt does not call obsolete is labelled, or the reason names QEMU.
    assert FACTS.qemu is not None
    for model, feats in cpu_map_bits.models.items():
        if model in KUBEVIRT_OBSOLETE or model not in FACTS.qemu.definitions:
            continue
        if feats <= features and model not in labels.models:
            assert "QEMU" in labels.unlabelled[model], (model, labels.unlabelled[model])


@pytest.mark.parametrize("path", DUMPS, ids=[_stem(p) for p in DUMPS])
def test_the_cpus_own_model_and_vendor(path: Path, cpu_map_bits: CpuMap) -> None:
    labels = _labels(path)
    assert labels.vendor == vendor_name(path, cpu_map_bits)
    own = OWN_MODEL.get(_stem(path))
    if own is None:
        pytest.skip(f"no known model for {path.name}")
    assert own in labels.models
    # ...and nothing newer of its own line where a feature is missing.
    assert not any(m for m in labels.models if not cpu_map_bits.models[m] <= set(labels.features))


@pytest.mark.parametrize("path", DUMPS, ids=[_stem(p) for p in DUMPS])
def test_label_spelling_is_kubevirts(path: Path) -> None:
    labels = _labels(path)
    lines = labels.text().splitlines()
    assert lines[0].startswith("cpu-vendor.node.kubevirt.io/")
    for line in lines:
        key, _, value = line.partition("=")
        assert LABEL_KEY.match(key), key
        assert value == "true"
    assert len(lines) == 1 + len(labels.models) + len(labels.features)


def test_obsolete_models_never_labelled() -> None:
    # A CPU with everything still gets none of KubeVirt's obsolete models:
    # Ice Lake has every feature of kvm64, qemu64, core2duo, ...
    path = next((p for p in DUMPS if "Ice-Lake" in p.name), None)
    if path is None:
        pytest.skip("no Ice Lake dump")
    labels = _labels(path)
    assert not set(labels.models) & KUBEVIRT_OBSOLETE
    for m in KUBEVIRT_OBSOLETE & set(FACTS.cpu_map):
        assert "obsolete" in labels.unlabelled[m]


# --- the command --------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmcpuid_virt.cli", *args],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip


def _parse(text: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {"cpu-feature": set(), "cpu-model": set(), "cpu-vendor": set()}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        assert LABEL_KEY.match(key) and value == "true", line
        family, _, name = key.partition(".node.kubevirt.io/")
        out[family].add(name)
    return out


def test_cli_from_a_dump(cpu_map_bits: CpuMap) -> None:
    path = next((p for p in DUMPS if "EPYC-9334" in p.name), None)
    if path is None:
        pytest.skip("no EPYC 9334 dump")
    r = _cli("features", "--from", str(path), "--format", "kubevirt")
    assert r.returncode == 0, r.stderr
    got = _parse(r.stdout)
    assert got["cpu-vendor"] == {"AMD"}
    assert "EPYC-Milan" in got["cpu-model"]
    assert got["cpu-feature"] - decoded(path, cpu_map_bits) - GIVEN_BY_KVM_OR_QEMU == set()


def test_cli_bad_dump_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.xml"
    bad.write_text("<cpudata><cpuid eax_in='zz'/></cpudata>")
    r = _cli("features", "--from", str(bad), "--format", "kubevirt")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert r.stdout == ""


def _kvm_features(table: object, cm: CpuMap) -> set[str]:
    """cpu_map's features of a live KVM table, decoded with cpu_map's positions."""
    from kvmcpuid_virt.cpuid.table import CpuidTable

    assert isinstance(table, CpuidTable)
    top = {0: table.get(0, 0, "eax"), 0x8000_0000: table.get(0x8000_0000, 0, "eax")}
    out = set()
    for name, (leaf, sub, reg, bit) in cm.cpuid.items():
        base = leaf & 0x8000_0000
        if base in top and leaf > top[base]:
            continue
        if table.get(leaf, sub, reg) >> bit & 1:  # type: ignore[arg-type]
            out.add(name)
    return out


def test_live_labels_of_this_host(kvm: object, cpu_map_bits: CpuMap) -> None:
    from kvmcpuid_virt.kvm import Kvm

    r = _cli("features", "--format", "kubevirt")
    assert r.returncode == 0, r.stderr
    got = _parse(r.stdout)
    # The vendor as /proc/cpuinfo says, in cpu_map's spelling.
    assert got["cpu-vendor"] == {cpu_map_bits.vendors[host_vendor()]}
    with Kvm() as k:
        have = _kvm_features(k.supported_cpuid(), cpu_map_bits)
    cpuid_labels = got["cpu-feature"] - set(cpu_map_bits.msr)
    assert cpuid_labels - have - GIVEN_BY_KVM_OR_QEMU == set()
    assert got["cpu-feature"], "no feature labels"
    for model in got["cpu-model"]:
        assert cpu_map_bits.models[model] <= got["cpu-feature"], model


def test_without_cpu_map_or_qemu_features_and_vendor_only() -> None:
    # A machine with neither tool: labels from the registry alone, no model
    # labels, and a note saying why (the command prints it as a warning).
    from kvmcpuid_virt.toolfacts.facts import NO_TOOLS

    path = next((p for p in DUMPS if "EPYC-9334" in p.name), None)
    if path is None:
        pytest.skip("no EPYC 9334 dump")
    labels = node_labels(load_dump(str(path)).table, NO_TOOLS)
    assert labels.models == () and labels.note and "cpu_map" in labels.note
    assert labels.vendor == "AMD"
    assert "avx512f" in labels.features  # Zen 4 has AVX-512 (CPUID.07H.0:EBX[16])


def _libvirt_host_model(uri: str) -> tuple[set[str], set[str], str]:
    """libvirt's own view, through libvirt-python as KubeVirt's
    node-labeller.sh gets it with virsh: the host-model CPU expanded
    (hypervisor-cpu-baseline --features: policy 'require'), the usable
    models, the vendor."""
    import libvirt

    conn = libvirt.open(uri)
    try:
        caps = etree.fromstring(conn.getDomainCapabilities(None, "x86_64", None, "kvm").encode())
        hm = caps.find(".//mode[@name='host-model']")
        assert hm is not None
        cpu = etree.Element("cpu", mode="custom", match="exact")
        etree.SubElement(cpu, "model").text = hm.findtext("model")
        etree.SubElement(cpu, "vendor").text = hm.findtext("vendor")
        for f in hm.findall("feature"):
            etree.SubElement(cpu, "feature", policy=str(f.get("policy")), name=str(f.get("name")))
        expanded = conn.baselineHypervisorCPU(
            None, "x86_64", None, "kvm", [etree.tostring(cpu).decode()],
            libvirt.VIR_CONNECT_BASELINE_CPU_EXPAND_FEATURES)  # fmt: skip
    finally:
        conn.close()
    feats = {str(f.get("name")) for f in etree.fromstring(expanded.encode()).findall("feature")
             if f.get("policy") == "require"}  # fmt: skip
    usable = {str(m.text) for m in caps.findall(".//mode[@name='custom']/model")
              if m.get("usable") == "yes"}  # fmt: skip
    return feats, usable, str(hm.findtext("vendor"))


def test_live_labels_against_this_hosts_libvirtd(
    kvm: object, libvirt_conn_uri: str, live_facts: object, cpu_map_bits: CpuMap
) -> None:
    # What KubeVirt would label this node with, from libvirtd itself, and
    # ours from KVM's table: every difference is one this tool explains.
    from kvmcpuid_virt.toolfacts.facts import ToolFacts

    assert isinstance(live_facts, ToolFacts) and live_facts.qemu is not None
    r = _cli("features", "--format", "kubevirt")
    assert r.returncode == 0, r.stderr
    ours = _parse(r.stdout)
    feats, usable, vendor = _libvirt_host_model(libvirt_conn_uri)
    assert ours["cpu-vendor"] == {vendor}
    # libvirt's host-model names what QEMU's `-cpu host` start trial here
    # finds it cannot set up (arch-capabilities on this nested AMD host:
    # `-cpu host` aborts on MSR 0x10a), and the feature-MSR bits of that MSR.
    undeliverable = set(live_facts.qemu.undeliverable)
    gated = {n for n, (index, _) in cpu_map_bits.msr.items()
             if MSR_ENUMERATED_BY.get(index) in undeliverable}  # fmt: skip
    assert feats - ours["cpu-feature"] <= undeliverable | gated, sorted(feats - ours["cpu-feature"])
    assert ours["cpu-feature"] - feats == set(), sorted(ours["cpu-feature"] - feats)
    # Models: libvirt's usable ones, less KubeVirt's obsolete list, and less
    # those missing a feature label (KubeVirt's own second test).
    kubevirt_models = {m for m in usable - KUBEVIRT_OBSOLETE
                       if cpu_map_bits.models.get(m, frozenset()) <= feats}  # fmt: skip
    assert ours["cpu-model"] == kubevirt_models
