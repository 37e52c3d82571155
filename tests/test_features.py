"""The feature registry against libvirt's installed cpu_map and against the real
CPU dumps, read independently here (lxml on the raw <cpudata>, cpu_map bit
definitions, and the QEMU QMP replies recorded on the same machines)."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from kvmcpuid_virt.cpuid.features import Feature, FeatureKind, load_registry, registry
from kvmcpuid_virt.errors import UnknownFeatureError
from kvmcpuid_virt.fsutil import load_dump
from tests.conftest import cpu_dump_paths, qmp_reply_path

CPU_MAP = Path("/usr/share/libvirt/cpu_map/x86_features.xml")
DUMPS = cpu_dump_paths()
Key = tuple[int, int, str, int]
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True)


def _cpu_map() -> etree._Element:
    if not CPU_MAP.exists():
        pytest.skip(f"libvirt cpu_map not installed ({CPU_MAP})")
    return etree.parse(str(CPU_MAP), _PARSER).getroot()


def _attr(el: etree._Element, name: str) -> str:
    value = el.get(name)
    assert value is not None, f"<{el.tag}> lacks {name}"
    return value


def cpu_map_bits() -> dict[str, Key]:
    """cpu_map CPUID features: name -> the one bit it defines."""
    out: dict[str, Key] = {}
    for feat in _cpu_map().iter("feature"):
        for cpuid in feat.findall("cpuid"):
            for reg in ("eax", "ebx", "ecx", "edx"):
                mask = int(cpuid.get(reg, "0"), 16)
                if mask:
                    assert mask & (mask - 1) == 0, f"{feat.get('name')} spans bits"
                    out[_attr(feat, "name")] = (
                        int(_attr(cpuid, "eax_in"), 16),
                        int(cpuid.get("ecx_in", "0"), 16),
                        reg,
                        mask.bit_length() - 1,
                    )
    return out


def raw_regs(path: Path) -> dict[tuple[int, int], dict[str, int]]:
    """<cpudata> entries as (leaf, subleaf) -> registers, straight from the XML."""
    root = etree.parse(str(path), _PARSER).getroot()
    return {
        (int(_attr(c, "eax_in"), 16), int(_attr(c, "ecx_in"), 16)): {
            r: int(_attr(c, r), 16) for r in ("eax", "ebx", "ecx", "edx")
        }
        for c in root.iter("cpuid")
    }


def qmp_props(xml: Path) -> dict[str, Any]:
    """The first reply in the recorded QMP file: query-cpu-model-expansion of
    the `host` CPU on that machine (`base` plus every property)."""
    path = qmp_reply_path(xml)
    if not path.exists():
        pytest.skip(f"no QMP reply recorded for {xml.name}")
    reply, _ = json.JSONDecoder().raw_decode(path.read_text().lstrip())
    props: dict[str, Any] = reply["return"]["model"]["props"]
    return props


# --- the registry itself -----------------------------------------------------


def test_names_are_safe_and_unique() -> None:
    reg = registry()
    seen: dict[str, Feature] = {}
    for f in reg.features:
        for n in f.names:
            assert re.fullmatch(r"[a-z0-9_.-]+", n), n
            assert seen.setdefault(n, f) is f, f"{n} names two bits"
    assert len(reg) >= 200


def test_registry_is_cached() -> None:
    assert registry() is registry()


def test_loader_rejects_unsafe_names() -> None:
    good = {
        "leaf": "0x1",
        "subleaf": 0,
        "reg": "ecx",
        "bit": 0,
        "qemu": "pni",
        "qemu_aliases": [],
        "libvirt": "pni",
        "kind": "plain",
    }
    assert load_registry(json.dumps({"features": [good]})).lookup("pni").bit == 0
    for bad in ({"qemu": "pni,kvm=off"}, {"libvirt": "x'y"}, {"reg": "esp"}, {"bit": 32}):
        with pytest.raises(ValueError):
            load_registry(json.dumps({"features": [{**good, **bad}]}))
    with pytest.raises(ValueError, match="two features"):
        load_registry(json.dumps({"features": [good, {**good, "qemu": "sse3", "libvirt": None}]}))


def test_spellings_reach_the_same_bit() -> None:
    reg = registry()
    # Known QEMU/libvirt spelling differences (libvirt cpu_map vs QEMU -cpu).
    for a, b in [
        ("pclmuldq", "pclmulqdq"),
        ("lahf_lm", "lahf-lm"),
        ("sse4.1", "sse4_1"),
        ("sse4.1", "sse4-1"),
        ("pni", "sse3"),
        ("nx", "xd"),
        ("lm", "i64"),
        ("fxsr_opt", "ffxsr"),
    ]:
        assert reg.lookup(a) is reg.lookup(b)
    assert reg.lookup("pclmuldq").name == "pclmulqdq"
    assert reg.by_libvirt("pclmuldq") is reg.by_qemu("pclmulqdq")
    assert reg.by_qemu("pclmuldq") is reg.by_qemu("pclmulqdq")  # a QEMU alias too
    assert reg.by_libvirt("pclmulqdq") is None
    f = reg.lookup("avx512f")
    assert (f.leaf, f.subleaf, f.reg, f.bit, f.mask) == (7, 0, "ebx", 16, 1 << 16)
    assert reg.at(7, 0, "ebx", 16) is f
    assert f in reg.in_word(7, 0, "ebx")


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(UnknownFeatureError) as exc:
        registry().lookup("avx512")
    assert "avx512f" in exc.value.suggestions
    assert str(exc.value).startswith("unknown feature 'avx512'; did you mean 'avx512f'")
    with pytest.raises(UnknownFeatureError) as exc:
        registry().lookup("no-such-thing-at-all")
    assert exc.value.suggestions == ()


def test_kinds() -> None:
    reg = registry()
    assert reg.lookup("osxsave").kind is FeatureKind.DYNAMIC
    assert reg.lookup("ospke").kind is FeatureKind.DYNAMIC
    assert reg.lookup("kvm-pv-eoi").kind is FeatureKind.KVM_PV
    assert reg.lookup("kvm-hint-dedicated").libvirt_kvm == "hint-dedicated"
    assert reg.lookup("kvm-poll-control").libvirt_kvm == "poll-control"
    for f in reg.features:
        assert (f.kind is FeatureKind.KVM_PV) == (f.leaf == 0x40000001), f
        if f.kind is FeatureKind.PLAIN:
            assert f.qemu is not None, f
        if f.kind is FeatureKind.UNSETTABLE:
            assert f.qemu is None, f
        if f.libvirt_kvm is not None:
            assert f.kind is FeatureKind.KVM_PV


# --- against libvirt's cpu_map ----------------------------------------------


@pytest.mark.libvirt
def test_every_cpu_map_feature_is_registered_at_its_bit() -> None:
    reg = registry()
    lacking, wrong = [], []
    for name, key in cpu_map_bits().items():
        f = reg.by_libvirt(name)
        if f is None:
            lacking.append(name)
        elif (f.leaf, f.subleaf, f.reg, f.bit) != key:
            wrong.append((name, key, f.position))
    assert lacking == []
    assert wrong == []


@pytest.mark.libvirt
def test_every_registry_libvirt_name_is_in_cpu_map() -> None:
    names = cpu_map_bits()
    extra = [f.libvirt for f in registry().features if f.libvirt and f.libvirt not in names]
    assert extra == []


@pytest.mark.libvirt
def test_cpu_map_qemu_aliases_resolve() -> None:
    # cpu_map records QEMU's spellings as <alias source='qemu'>: a second,
    # independent statement of which QEMU name means which libvirt feature.
    reg = registry()
    checked = 0
    for feat in _cpu_map().iter("feature"):
        for alias in feat.findall("alias"):
            if alias.get("source") == "qemu":
                assert reg.by_qemu(_attr(alias, "name")) is reg.by_libvirt(_attr(feat, "name"))
                checked += 1
    assert checked >= 15


# --- against the real CPU dumps ---------------------------------------------


def expected_libvirt_names(path: Path) -> set[str]:
    """cpu_map features set in the raw dump, within the dump's max leaves."""
    regs = raw_regs(path)
    max_basic = regs[(0, 0)]["eax"]
    max_ext = regs.get((0x80000000, 0), {}).get("eax", 0)
    expected = set()
    for name, (leaf, sub, reg, bit) in cpu_map_bits().items():
        limit = max_ext if leaf >= 0x80000000 else max_basic
        value = regs.get((leaf, sub), {}).get(reg, 0)
        if leaf <= limit and value >> bit & 1:
            expected.add(name)
    return expected


@pytest.mark.libvirt
@pytest.mark.parametrize("path", DUMPS, ids=lambda p: p.stem)
def test_present_matches_cpu_map_reading(path: Path) -> None:
    table = load_dump(str(path)).table
    got = {f.libvirt for f in registry().present(table) if f.libvirt}
    expected = expected_libvirt_names(path)
    assert got == expected
    assert {"fpu", "sse2", "lm"} <= expected  # the reading itself is not vacuous


# Features QEMU's `host` CPU reports although the bare-metal CPUID lacks them,
# because KVM/QEMU add them whatever the silicon says. Exactly the set these
# seven recordings need; anything else reported-but-absent is a decoding bug.
QEMU_SYNTHESIZED = {
    "hypervisor",  # QEMU sets it for every guest
    "tsc-deadline",  # KVM's emulated LAPIC has the TSC-deadline timer
    "x2apic",  # KVM's emulated LAPIC does x2APIC
    "tsc-adjust",  # KVM emulates IA32_TSC_ADJUST
    "arch-capabilities",  # KVM emulates IA32_ARCH_CAPABILITIES, on AMD too
    # KVM fills in the other vendor's speculation-control bits from what the
    # host kernel can do (Intel leaf 7 bits on AMD, AMD 0x80000008 on Intel).
    "spec-ctrl",
    "ssbd",
    "stibp",
    "virt-ssbd",
    "amd-ssbd",
    "amd-stibp",
    "ibpb",
}


@pytest.mark.parametrize("path", DUMPS, ids=lambda p: p.stem)
def test_qemu_host_view_features_are_in_the_dump(path: Path) -> None:
    """Every PLAIN feature QEMU's `host` CPU turned on must be in the raw CPUID,
    except the ones KVM/QEMU add on their own (QEMU_SYNTHESIZED). The other
    direction does not hold (KVM hides vmx, monitor, ds, ... from guests)."""
    props = qmp_props(path)
    reg = registry()
    present = {f.qemu for f in reg.present(load_dump(str(path)).table)}
    missing = sorted(
        f.qemu
        for f in reg.features
        if f.kind is FeatureKind.PLAIN
        and f.qemu is not None
        and props.get(f.qemu) is True
        and f.qemu not in present
        and f.qemu not in QEMU_SYNTHESIZED
    )
    assert missing == []


# Public facts: CPUID family/model/stepping of each CPU in the data set.
KNOWN_SIGNATURES = {
    "Atom-P5362": ("GenuineIntel", 6, 0x86),  # Snow Ridge
    "Core-i7-5600U": ("GenuineIntel", 6, 0x3D),  # Broadwell-U
    "EPYC-7601-32-Core": ("AuthenticAMD", 0x17, 0x01),  # Naples
    "EPYC-9334-32-Core": ("AuthenticAMD", 0x19, 0x11),  # Genoa
    "Ice-Lake-Server": ("GenuineIntel", 6, 0x6A),  # Ice Lake-SP
    "Ryzen-9-3900X-12-Core": ("AuthenticAMD", 0x17, 0x71),  # Matisse
    "Xeon-Gold-6148": ("GenuineIntel", 6, 0x55),  # Skylake-SP
}


def test_known_signatures_cover_every_dump(data_dir: Path) -> None:
    assert {p.stem.removeprefix("x86_64-cpuid-") for p in DUMPS} == set(KNOWN_SIGNATURES)


@pytest.mark.parametrize("path", DUMPS, ids=lambda p: p.stem)
def test_identity_matches_known_values_and_qemu(path: Path) -> None:
    from kvmcpuid_virt.cpuid import fields

    table = load_dump(str(path)).table
    sig = fields.signature(table)
    assert sig is not None
    want_vendor, want_family, want_model = KNOWN_SIGNATURES[path.stem.removeprefix("x86_64-cpuid-")]
    assert (fields.vendor(table), sig.family, sig.model) == (want_vendor, want_family, want_model)
    props = qmp_props(path)
    assert fields.vendor(table) == props["vendor"]
    assert (sig.family, sig.model, sig.stepping) == (
        props["family"],
        props["model"],
        props["stepping"],
    )
    assert fields.brand_string(table) == props["model-id"].strip()


# --- the command ------------------------------------------------------------


def _cli(*argv: str) -> tuple[int, str]:
    from kvmcpuid_virt.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        rc = main(list(argv))
    return rc, out.getvalue()


@pytest.mark.libvirt
@pytest.mark.parametrize("path", DUMPS, ids=lambda p: p.stem)
def test_command_json_names_are_the_cpu_map_reading(path: Path) -> None:
    rc, text = _cli("features", "--from", str(path), "--names", "libvirt", "--format", "json")
    assert rc == 0
    doc = json.loads(text)
    assert {f["name"] for f in doc["features"] if f["libvirt"]} == expected_libvirt_names(path)
    assert doc["fields"]["vendor"] == KNOWN_SIGNATURES[path.stem.removeprefix("x86_64-cpuid-")][0]


@pytest.mark.parametrize("names", ["qemu", "libvirt"])
@pytest.mark.parametrize("path", DUMPS, ids=lambda p: p.stem)
def test_command_table_fits_80_columns(path: Path, names: str) -> None:
    rc, text = _cli("features", "--from", str(path), "--names", names)
    assert rc == 0
    # The source line carries the path as given, which no layout can shorten;
    # everything the command itself lays out must fit.
    source, *rest = text.splitlines()
    assert source.split(maxsplit=1) == ["source", str(path)]
    assert max(len(line) for line in rest) <= 80
    sig = KNOWN_SIGNATURES[path.stem.removeprefix("x86_64-cpuid-")]
    assert f"family {sig[1]:#x} model {sig[2]:#x}" in text
    # sse2 is in every x86-64 CPU; libvirt and QEMU spell it the same.
    assert re.search(r"^  .*\bsse2\b", text, re.M)
    spelled = "pclmuldq" if names == "libvirt" else "pclmulqdq"
    assert re.search(rf"^  .*\b{spelled}\b", text, re.M)


@pytest.mark.parametrize("path", [p for p in DUMPS if "<msr" not in p.read_text()][:2],
                         ids=lambda p: p.stem)  # fmt: skip
def test_command_says_a_dump_has_no_feature_msrs(path: Path) -> None:
    rc, text = _cli("features", "--from", str(path))
    assert rc == 0
    assert "\nfeature MSRs  no feature MSRs in this dump\n" in text
    rc, text = _cli("features", "--from", str(path), "--format", "json")
    assert rc == 0
    msrs = json.loads(text)["feature_msrs"]
    assert msrs == {"available": False, "note": "no feature MSRs in this dump", "msrs": [],
                    "features": [], "vcpu_trial": None}  # fmt: skip


def _c_reading() -> Any:
    from tests.kvm_msr_c import c_msr_reading

    reading = c_msr_reading()
    if not reading.cap:
        pytest.skip("this kernel has no KVM_CAP_GET_MSR_FEATURES")
    return reading


def cpu_map_msr_bits() -> dict[str, tuple[int, int]]:
    """cpu_map's <msr> features: name -> (MSR, bit of edx:eax)."""
    out = {}
    for feat in _cpu_map().iter("feature"):
        for msr in feat.findall("msr"):
            mask = int(msr.get("edx", "0"), 16) << 32 | int(msr.get("eax", "0"), 16)
            out[_attr(feat, "name")] = (int(_attr(msr, "index"), 16), mask.bit_length() - 1)
    return out


@pytest.mark.kvm
@pytest.mark.libvirt
def test_live_command_lists_the_feature_msrs_the_c_program_reads() -> None:
    """`features --format json` live: the feature MSRs and values are what a C
    program reads through the ioctls, every libvirt-named bit is where
    cpu_map puts it and set in the C program's value, and a bit is marked
    refused exactly when the C program's vCPU refused it."""
    c = _c_reading()
    rc, text = _cli("features", "--format", "json", "--names", "libvirt")
    assert rc == 0
    doc = json.loads(text)["feature_msrs"]
    assert doc["available"] is True
    assert {int(m["index"], 16): int(m["value"], 16) for m in doc["msrs"]} == c.values
    cpu_map = cpu_map_msr_bits()
    libvirt_named = [f for f in doc["features"] if f["libvirt"]]
    for f in doc["features"]:
        msr, bit = int(f["msr"], 16), f["bit"]
        assert c.values[msr] >> bit & 1, f
        if f["libvirt"]:
            assert cpu_map[f["libvirt"]] == (msr, bit)
            assert f["name"] == f["libvirt"]
        if c.set_result[msr] == 1:
            assert f["refused"] is False
        else:
            assert f["refused"] is (c.bit_result.get((msr, bit), 0) != 1), f
    # cpu_map's names for the bits the C program saw set are all listed
    expected = {n for n, (msr, bit) in cpu_map.items() if c.values.get(msr, 0) >> bit & 1}
    assert {f["libvirt"] for f in libvirt_named} == expected


@pytest.mark.kvm
def test_live_command_table_shows_each_msr_and_fits_80_columns() -> None:
    c = _c_reading()
    rc, text = _cli("features")
    assert rc == 0
    source, *rest = text.splitlines()
    assert source.startswith("source ")
    assert max(len(line) for line in rest) <= 80
    assert f"feature MSRs  {len(c.values)} listed by KVM_GET_MSR_FEATURE_INDEX_LIST" in text
    for index, value in c.values.items():
        assert re.search(rf"^MSR {index:X}H \S+ = {value:#x}\b", text, re.M), hex(index)


def test_command_bad_dump_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.xml"
    bad.write_text("<cpudata arch='x86'><cpuid eax_in='zz'/></cpudata>")
    rc, _ = _cli("features", "--from", str(bad))
    assert rc == 2


def test_command_module_imports_stay_light() -> None:
    # `kvmcpuid --help` imports the command module; the registry, lxml and
    # the KVM layer must wait until run().
    code = (
        "import sys, kvmcpuid_virt.commands.features; "
        "print([n for n in ('lxml', 'kvmcpuid_virt.cpuid.features', 'kvmcpuid_virt.kvm', "
        "'kvmcpuid_virt.cpuid.msr_features') if n in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
