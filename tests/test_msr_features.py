"""The MSR feature registry against independent sources: the Intel SDM's bit
positions (written out here), libvirt's installed cpu_map `<msr>` features
(read with lxml), QEMU 7.2's own properties (the recording, and the installed
QEMU asked again), and the QEMU answers recorded on real Intel and AMD hosts
(../shared/data/cpuid). Plus the pure parts: lookups, FeatureMsrs, and the
explanation of a refused value."""

from __future__ import annotations

import json
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from kvmcpuid_virt.cpuid.features import FeatureKind, registry
from kvmcpuid_virt.cpuid.msr_features import (
    FeatureMsrs,
    MsrDelivery,
    MsrLayout,
    MsrTrial,
    explain_set_failure,
    load_msr_registry,
    msr_registry,
    refusal_reason,
)
from kvmcpuid_virt.cpuid.table import CpuidEntry, CpuidTable, EntryFlag
from kvmcpuid_virt.errors import UnknownFeatureError
from tests.conftest import RECORDING, cpu_dump_paths, qmp_reply_path

CPU_MAP = Path("/usr/share/libvirt/cpu_map/x86_features.xml")
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True)

# --- the Intel SDM, written out -----------------------------------------------

# MSR indices and names: Intel SDM Vol. 4, Table 2-2 (IA32_*), Vol. 3
# Appendix A (IA32_VMX_*); AMD APM Vol. 2 (MSR_AMD64_DE_CFG).
SDM_MSRS = {
    0x8B: "IA32_BIOS_SIGN_ID",
    0xCE: "MSR_PLATFORM_INFO",
    0xCF: "IA32_CORE_CAPABILITIES",
    0x10A: "IA32_ARCH_CAPABILITIES",
    0x345: "IA32_PERF_CAPABILITIES",
    0x480: "IA32_VMX_BASIC",
    0x481: "IA32_VMX_PINBASED_CTLS",
    0x482: "IA32_VMX_PROCBASED_CTLS",
    0x483: "IA32_VMX_EXIT_CTLS",
    0x484: "IA32_VMX_ENTRY_CTLS",
    0x485: "IA32_VMX_MISC",
    0x486: "IA32_VMX_CR0_FIXED0",
    0x487: "IA32_VMX_CR0_FIXED1",
    0x488: "IA32_VMX_CR4_FIXED0",
    0x489: "IA32_VMX_CR4_FIXED1",
    0x48A: "IA32_VMX_VMCS_ENUM",
    0x48B: "IA32_VMX_PROCBASED_CTLS2",
    0x48C: "IA32_VMX_EPT_VPID_CAP",
    0x48D: "IA32_VMX_TRUE_PINBASED_CTLS",
    0x48E: "IA32_VMX_TRUE_PROCBASED_CTLS",
    0x48F: "IA32_VMX_TRUE_EXIT_CTLS",
    0x490: "IA32_VMX_TRUE_ENTRY_CTLS",
    0x491: "IA32_VMX_VMFUNC",
    0x492: "IA32_VMX_PROCBASED_CTLS3",
    0xC001_1029: "MSR_AMD64_DE_CFG",
}

# The control capability MSRs: bits 31:0 allowed-0, 63:32 allowed-1 (A.3-A.5).
SDM_CONTROLS = {0x481, 0x482, 0x483, 0x484, 0x48B, 0x48D, 0x48E, 0x48F, 0x490}


def ctl(n: int) -> int:
    """The allowed-1 bit of VMX control n."""
    return 32 + n


# name -> (MSR, bit of its value), each bit from the SDM's own tables.
SDM_BITS: dict[str, tuple[int, int]] = {
    # IA32_ARCH_CAPABILITIES (Vol. 4, Table 2-2)
    "rdctl-no": (0x10A, 0), "ibrs-all": (0x10A, 1), "rsba": (0x10A, 2),
    "skip-l1dfl-vmentry": (0x10A, 3), "ssb-no": (0x10A, 4), "mds-no": (0x10A, 5),
    "pschange-mc-no": (0x10A, 6), "tsx-ctrl": (0x10A, 7), "taa-no": (0x10A, 8),
    "sbdr-ssdp-no": (0x10A, 13), "fbsdp-no": (0x10A, 14), "psdp-no": (0x10A, 15),
    "fb-clear": (0x10A, 17), "rrsba": (0x10A, 19), "bhi-no": (0x10A, 20),
    "pbrsb-no": (0x10A, 24), "gds-no": (0x10A, 26), "rfds-no": (0x10A, 27),
    "rfds-clear": (0x10A, 28), "its-no": (0x10A, 62),
    # IA32_CORE_CAPABILITIES, IA32_PERF_CAPABILITIES (FW_WRITE)
    "split-lock-detect": (0xCF, 5),
    "full-width-write": (0x345, 13),
    # IA32_VMX_BASIC (A.1)
    "vmx-ins-outs": (0x480, 54), "vmx-true-ctls": (0x480, 55),
    # pin-based controls (A.3.1)
    "vmx-intr-exit": (0x48D, ctl(0)), "vmx-nmi-exit": (0x48D, ctl(3)),
    "vmx-vnmi": (0x48D, ctl(5)), "vmx-preemption-timer": (0x48D, ctl(6)),
    "vmx-posted-intr": (0x48D, ctl(7)),
    # primary processor-based controls (A.3.2)
    "vmx-vintr-pending": (0x48E, ctl(2)), "vmx-tsc-offset": (0x48E, ctl(3)),
    "vmx-hlt-exit": (0x48E, ctl(7)), "vmx-invlpg-exit": (0x48E, ctl(9)),
    "vmx-mwait-exit": (0x48E, ctl(10)), "vmx-rdpmc-exit": (0x48E, ctl(11)),
    "vmx-rdtsc-exit": (0x48E, ctl(12)), "vmx-cr3-load-noexit": (0x48E, ctl(15)),
    "vmx-cr3-store-noexit": (0x48E, ctl(16)), "vmx-cr8-load-exit": (0x48E, ctl(19)),
    "vmx-cr8-store-exit": (0x48E, ctl(20)), "vmx-flexpriority": (0x48E, ctl(21)),
    "vmx-vnmi-pending": (0x48E, ctl(22)), "vmx-movdr-exit": (0x48E, ctl(23)),
    "vmx-io-exit": (0x48E, ctl(24)), "vmx-io-bitmap": (0x48E, ctl(25)),
    "vmx-mtf": (0x48E, ctl(27)), "vmx-msr-bitmap": (0x48E, ctl(28)),
    "vmx-monitor-exit": (0x48E, ctl(29)), "vmx-pause-exit": (0x48E, ctl(30)),
    "vmx-secondary-ctls": (0x48E, ctl(31)),
    # secondary processor-based controls (A.3.3)
    "vmx-apicv-xapic": (0x48B, ctl(0)), "vmx-ept": (0x48B, ctl(1)),
    "vmx-desc-exit": (0x48B, ctl(2)), "vmx-rdtscp-exit": (0x48B, ctl(3)),
    "vmx-apicv-x2apic": (0x48B, ctl(4)), "vmx-vpid": (0x48B, ctl(5)),
    "vmx-wbinvd-exit": (0x48B, ctl(6)), "vmx-unrestricted-guest": (0x48B, ctl(7)),
    "vmx-apicv-register": (0x48B, ctl(8)), "vmx-apicv-vid": (0x48B, ctl(9)),
    "vmx-ple": (0x48B, ctl(10)), "vmx-rdrand-exit": (0x48B, ctl(11)),
    "vmx-invpcid-exit": (0x48B, ctl(12)), "vmx-vmfunc": (0x48B, ctl(13)),
    "vmx-shadow-vmcs": (0x48B, ctl(14)), "vmx-encls-exit": (0x48B, ctl(15)),
    "vmx-rdseed-exit": (0x48B, ctl(16)), "vmx-pml": (0x48B, ctl(17)),
    "vmx-xsaves": (0x48B, ctl(20)), "vmx-tsc-scaling": (0x48B, ctl(25)),
    # VM-exit controls (A.4)
    "vmx-exit-nosave-debugctl": (0x48F, ctl(2)),
    "vmx-exit-load-perf-global-ctrl": (0x48F, ctl(12)), "vmx-exit-ack-intr": (0x48F, ctl(15)),
    "vmx-exit-save-pat": (0x48F, ctl(18)), "vmx-exit-load-pat": (0x48F, ctl(19)),
    "vmx-exit-save-efer": (0x48F, ctl(20)), "vmx-exit-load-efer": (0x48F, ctl(21)),
    "vmx-exit-save-preemption-timer": (0x48F, ctl(22)),
    "vmx-exit-clear-bndcfgs": (0x48F, ctl(23)), "vmx-exit-clear-rtit-ctl": (0x48F, ctl(25)),
    "vmx-exit-load-pkrs": (0x48F, ctl(29)),
    # VM-entry controls (A.5)
    "vmx-entry-noload-debugctl": (0x490, ctl(2)), "vmx-entry-ia32e-mode": (0x490, ctl(9)),
    "vmx-entry-load-perf-global-ctrl": (0x490, ctl(13)), "vmx-entry-load-pat": (0x490, ctl(14)),
    "vmx-entry-load-efer": (0x490, ctl(15)), "vmx-entry-load-bndcfgs": (0x490, ctl(16)),
    "vmx-entry-load-rtit-ctl": (0x490, ctl(18)), "vmx-entry-load-pkrs": (0x490, ctl(22)),
    # IA32_VMX_MISC (A.6)
    "vmx-store-lma": (0x485, 5), "vmx-activity-hlt": (0x485, 6),
    "vmx-activity-shutdown": (0x485, 7), "vmx-activity-wait-sipi": (0x485, 8),
    "vmx-vmwrite-vmexit-fields": (0x485, 29), "vmx-zero-len-inject": (0x485, 30),
    # IA32_VMX_EPT_VPID_CAP (A.10)
    "vmx-ept-execonly": (0x48C, 0), "vmx-page-walk-4": (0x48C, 6),
    "vmx-page-walk-5": (0x48C, 7), "vmx-ept-2mb": (0x48C, 16), "vmx-ept-1gb": (0x48C, 17),
    "vmx-invept": (0x48C, 20), "vmx-eptad": (0x48C, 21),
    "vmx-ept-advanced-exitinfo": (0x48C, 22), "vmx-invept-single-context": (0x48C, 25),
    "vmx-invept-all-context": (0x48C, 26), "vmx-invvpid": (0x48C, 32),
    "vmx-invvpid-single-addr": (0x48C, 40), "vmx-invvpid-all-context": (0x48C, 42),
    # QEMU's name for "single-context-retaining-globals INVVPID"
    "vmx-invept-single-context-noglobals": (0x48C, 43),
    # IA32_VMX_VMFUNC (A.11)
    "vmx-eptp-switching": (0x491, 0),
}  # fmt: skip

# The CPUID bit that says each MSR exists (SDM Vol. 2, CPUID): name -> position.
SDM_ENUMERATION = {
    "arch-capabilities": (7, 0, "edx", 29),
    "core-capability": (7, 0, "edx", 30),
    "pdcm": (1, 0, "ecx", 15),
    "vmx": (1, 0, "ecx", 5),
}


def test_every_registered_bit_is_where_the_sdm_puts_it() -> None:
    reg = msr_registry()
    wrong = {f.name: (f.msr, f.bit) for f in reg if SDM_BITS.get(f.name) != (f.msr, f.bit)}
    assert wrong == {}
    assert {f.name for f in reg} == set(SDM_BITS)  # the table covers the registry


def test_qemus_second_bit_of_vmx_invept_single_context_is_the_sdms_invvpid_single_context() -> None:
    # QEMU 7.2 names bit 41 (single-context INVVPID, SDM A.10) a second time
    # vmx-invept-single-context: the one property sets both bits.
    f = msr_registry().lookup("vmx-invept-single-context")
    assert f.bits == (25, 41)
    assert msr_registry().at(0x48C, 41) is f
    assert not f.present(1 << 25) and not f.present(1 << 41) and f.present(1 << 25 | 1 << 41)
    assert [g for g in msr_registry() if g.extra_bits] == [f]


def test_msrs_have_their_sdm_names_and_layouts() -> None:
    reg = msr_registry()
    assert {i: m.name for i, m in reg.msrs.items()} == SDM_MSRS
    for index, m in reg.msrs.items():
        assert (m.layout is MsrLayout.CONTROLS) == (index in SDM_CONTROLS), m
        if m.layout is MsrLayout.CONTROLS:
            assert all(f.bit >= 32 for f in reg.in_msr(index))


def test_enumerating_cpuid_bits_are_where_the_sdm_puts_them() -> None:
    cpuid = registry()
    used = {m.enumerated_by for m in msr_registry().msrs.values() if m.enumerated_by}
    assert used == set(SDM_ENUMERATION)
    for name, pos in SDM_ENUMERATION.items():
        f = cpuid.lookup(name)
        assert (f.leaf, f.subleaf, f.reg, f.bit) == pos
    arch, perf = msr_registry().msr(0x10A), msr_registry().msr(0x345)
    assert arch is not None and arch.enumerated_by == "arch-capabilities"
    assert perf is not None and perf.enumerated_by == "pdcm"


# --- the registry itself -----------------------------------------------------


def test_names_are_safe_unique_and_apart_from_the_cpuid_names() -> None:
    reg = msr_registry()
    seen: dict[str, object] = {}
    for f in reg:
        for n in f.names:
            assert re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", n), n
            assert seen.setdefault(n, f) is f, f"{n} names two bits"
    cpuid_names = {n for f in registry().features for n in f.names}
    assert set(seen) & cpuid_names == set()
    assert len(reg) >= 100


def test_registry_is_cached() -> None:
    assert msr_registry() is msr_registry()


def test_lookups_by_any_spelling_and_by_position() -> None:
    reg = msr_registry()
    mds = reg.lookup("mds-no")
    assert (mds.msr, mds.bit, mds.mask) == (0x10A, 5, 0x20)
    assert reg.lookup("MDS-NO") is mds and reg.get("Mds-No") is mds
    assert reg.by_qemu("mds-no") is reg.by_libvirt("mds-no") is reg.at(0x10A, 5) is mds
    assert reg.lookup("gds-no").sdm == "gds-no" and reg.lookup("gds-no").qemu is None
    assert reg.lookup("gds-no").kind is FeatureKind.UNSETTABLE
    assert reg.by_libvirt("vmx-ept") is None  # libvirt 9.0's cpu_map has no vmx-*
    assert reg.at(0x10A, 9) is None and reg.get("no-such") is None
    ept = reg.lookup("vmx-ept")
    assert (ept.control, ept.position) == (1, "MSR 48BH[33] (control 1)")
    assert [f.bit for f in reg.in_msr(0x10A)] == sorted(f.bit for f in reg.in_msr(0x10A))
    with pytest.raises(UnknownFeatureError) as exc:
        reg.lookup("mds_no")
    assert "mds-no" in exc.value.suggestions


def test_present_reads_controls_as_qemu_does() -> None:
    reg = msr_registry()
    ept = reg.lookup("vmx-ept")
    assert ept.present(1 << 33)
    assert not ept.present(1 << 33 | 1 << 1)  # must be 1: not a choice, not a feature
    assert not ept.present(1 << 1)
    # a value MSR (microcode revision) has no features and no unnamed bits
    assert reg.in_msr(0x8B) == [] and reg.unnamed(0x8B, 0x1000065) == 0
    assert reg.unnamed(0x10A, 1 << 5 | 1 << 9) == 1 << 9
    assert [f.name for f in reg.present({0x10A: 1 << 5 | 1 << 26})] == ["mds-no", "gds-no"]


def _shipped_text() -> str:
    from importlib import resources

    return resources.files("kvmcpuid_virt.cpuid").joinpath("data/msr_features.json").read_text()


def test_loader_rejects_bad_data() -> None:
    good = json.loads(_shipped_text())
    assert len(load_msr_registry(json.dumps(good))) == len(msr_registry())
    first = good["features"][0]

    def with_feature(**change: Any) -> str:
        return json.dumps({**good, "features": [{**first, **change}, *good["features"][1:]]})

    for bad in ({"qemu": "mds-no,kvm=off"}, {"bit": 64}, {"msr": "0x1"}, {"qemu": None,
                "libvirt": None, "sdm": None}, {"kind": "dynamic"}, {"qemu": None}):  # fmt: skip
        with pytest.raises(ValueError):
            load_msr_registry(with_feature(**bad))
    with pytest.raises(ValueError, match="two features"):
        load_msr_registry(json.dumps({**good, "features": [first, {**first, "qemu": "x-y",
                                      "libvirt": None}]}))  # fmt: skip
    vmx = next(f for f in good["features"] if f["qemu"] == "vmx-ept")
    with pytest.raises(ValueError, match="allowed-1"):
        load_msr_registry(json.dumps({**good, "features": [{**vmx, "bit": 1}]}))


# --- against libvirt's cpu_map ----------------------------------------------


def cpu_map_msr_features() -> dict[str, tuple[int, int]]:
    """cpu_map features defined by <msr index= edx= eax=>: name -> (MSR, bit)."""
    if not CPU_MAP.exists():
        pytest.skip(f"libvirt cpu_map not installed ({CPU_MAP})")
    root = etree.parse(str(CPU_MAP), _PARSER).getroot()
    out = {}
    for feat in root.iter("feature"):
        for msr in feat.findall("msr"):
            mask = int(msr.get("edx", "0"), 16) << 32 | int(msr.get("eax", "0"), 16)
            assert mask and mask & (mask - 1) == 0, feat.get("name")
            out[str(feat.get("name"))] = (int(str(msr.get("index")), 16), mask.bit_length() - 1)
    return out


@pytest.mark.libvirt
def test_every_cpu_map_msr_feature_is_registered_at_its_bit() -> None:
    features = cpu_map_msr_features()
    reg = msr_registry()
    got = {n: (f.msr, f.bit) for n in features if (f := reg.by_libvirt(n)) is not None}
    assert got == features
    assert len(features) >= 10  # the reading is not vacuous


@pytest.mark.libvirt
def test_every_registry_libvirt_name_is_a_cpu_map_msr_feature() -> None:
    features = cpu_map_msr_features()
    extra = [f.libvirt for f in msr_registry() if f.libvirt and f.libvirt not in features]
    assert extra == []


def test_the_recorded_cpu_map_msr_features_are_registered() -> None:
    # toolfacts-qemu-7.2.json recorded cpu_map's <msr> feature names.
    recorded = set(json.loads(RECORDING.read_text())["msr_features"])
    assert recorded == {f.libvirt for f in msr_registry() if f.libvirt}


# --- against QEMU's own properties ---------------------------------------------

# QEMU 7.2 CPU properties that set neither a CPUID bit nor a feature-MSR bit:
# options (check, enforce, migratable, pmu, ...), Hyper-V enlightenments
# (hv-*), and experimental x-* knobs.
QEMU_OPTIONS = {
    "check", "cpuid-0xb", "enforce", "fill-mtrr-mask", "full-cpuid-auto-level",
    "host-cache-info", "host-phys-bits", "kvm", "kvm-no-smi-migration",
    "kvm-pv-enforce-cpuid", "l3-cache", "legacy-cache", "lmce", "migratable", "pmu",
    "realized", "start-powered-off", "tcg-cpuid", "vmware-cpuid-freq",
}  # fmt: skip


def _is_option(name: str) -> bool:
    return name in QEMU_OPTIONS or name.startswith(("hv-", "x-"))


def test_every_qemu_property_is_a_cpuid_or_msr_feature_or_a_known_option() -> None:
    """QEMU's recorded properties split exactly into CPUID feature names,
    MSR feature names and options: a QEMU MSR feature the registry lacks
    would be left over."""
    props = set(json.loads(RECORDING.read_text())["qemu"]["props"])
    cpuid = {n for f in registry().features for n in (f.qemu, *f.qemu_aliases) if n}
    msr = {n for f in msr_registry() for n in (f.qemu, *f.qemu_aliases) if n}
    assert msr <= props
    assert msr & cpuid == set()
    assert sorted(p for p in props - cpuid - msr if not _is_option(p)) == []
    assert len([p for p in msr if p.startswith("vmx-")]) == len(
        [p for p in props if p.startswith("vmx-")]
    )


def _host_props(xml: Path) -> dict[str, Any]:
    path = qmp_reply_path(xml)
    if not path.exists():
        pytest.skip(f"no QMP reply recorded for {xml.name}")
    reply, _ = json.JSONDecoder().raw_decode(path.read_text().lstrip())
    props: dict[str, Any] = reply["return"]["model"]["props"]
    return props


DUMPS = cpu_dump_paths()
ATOM = next((p for p in DUMPS if "Atom-P5362" in p.name), None)


@pytest.mark.parametrize("path", DUMPS, ids=lambda p: p.stem)
def test_recorded_hosts_msr_features_are_registered(path: Path) -> None:
    """Every MSR feature QEMU's `host` CPU had on the recorded machines (KVM on
    Intel and AMD hosts; QEMUs older than 7.2 have fewer or none, later ones
    more) that QEMU 7.2 knows is registered; vmx-* ones at an Intel VMX MSR."""
    props = _host_props(path)
    known = set(json.loads(RECORDING.read_text())["qemu"]["props"])
    reg = msr_registry()
    cpuid = registry()
    for name, on in props.items():
        if name not in known or not isinstance(on, bool) or cpuid.by_qemu(name):
            continue
        if _is_option(name):
            continue
        f = reg.by_qemu(name)
        assert f is not None, name
        if name.startswith("vmx-"):
            info = reg.msr(f.msr)
            assert info is not None and info.vendor == "GenuineIntel"
            assert 0x480 <= f.msr <= 0x492 and info.enumerated_by == "vmx"


def test_a_later_qemu_spells_the_sdm_only_names_as_the_registry_does() -> None:
    """QEMU 7.2 and libvirt 9.0 do not name some IA32_ARCH_CAPABILITIES bits
    KVM reports; the registry spells them (from the SDM) as later QEMU
    releases do: the EPYC 9334 recording was made with one."""
    if not DUMPS:
        pytest.skip("no recorded CPU dumps (set KVMCPUID_DATA)")
    later: set[str] = set()
    for path in DUMPS:
        later |= set(_host_props(path))
    sdm_only = {f.sdm for f in msr_registry() if f.sdm}
    # bhi-no, rrsba, its-no came after the QEMU of that recording
    assert sdm_only - later == {"bhi-no", "rrsba", "its-no"}


def test_recorded_intel_host_vmx_features_from_sdm_values_are_what_qemu_saw() -> None:
    """The Atom P5362 (Snow Ridge) recording: QEMU's `host` CPU there had 74
    vmx-* features. MSR values that allow exactly those, written from the
    SDM table above, must name exactly those through the registry."""
    if ATOM is None:
        pytest.skip("no Atom-P5362 recording")
    props = _host_props(ATOM)
    on = {n for n, v in props.items() if v is True and n in SDM_BITS}
    values: dict[int, int] = {}
    for name in on:
        msr, bit = SDM_BITS[name]
        values[msr] = values.get(msr, 0) | 1 << bit
        if name == "vmx-invept-single-context":  # QEMU's second bit, see above
            values[msr] |= 1 << 41
    names = {f.name for f in msr_registry().present(values)}
    assert names == on
    assert len([n for n in on if n.startswith("vmx-")]) > 60
    assert {"rdctl-no", "ibrs-all", "mds-no"} <= on


# --- against the installed QEMU, asked again -----------------------------------

_WARNING = re.compile(r"MSR\(([0-9A-F]+)H\)\.([a-z0-9_.-]+) \[bit (\d+)\]")


def _qemu_says(qemu: str, name: str) -> list[tuple[int, int]]:
    """Where QEMU says `name` lives: asked for alone on an empty `base` CPU,
    which lacks the CPUID bit that enumerates the MSR, QEMU drops it with a
    warning naming the MSR and its own bit number."""
    proc = subprocess.run(
        [qemu, "-accel", "kvm", "-machine", "pc", "-m", "16", "-S", "-display", "none",
         "-nodefaults", "-cpu", f"base,{name}=on", "-qmp", "stdio"],
        input='{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n',
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return [(int(m[1], 16), int(m[3])) for m in _WARNING.finditer(proc.stderr) if m[2] == name]


@pytest.mark.qemu
def test_installed_qemu_puts_every_name_at_the_registry_bit(qemu_binary: str) -> None:
    reg = msr_registry()
    props = json.loads(RECORDING.read_text())["qemu"]["props"]
    cpuid = {n for f in registry().features for n in (f.qemu, *f.qemu_aliases) if n}
    names = sorted(n for n in props if n not in cpuid)
    with ThreadPoolExecutor(16) as pool:
        said = dict(zip(names, pool.map(lambda n: _qemu_says(qemu_binary, n), names),
                        strict=True))  # fmt: skip
    wrong = {}
    for name, places in said.items():
        f = reg.by_qemu(name)
        if f is None:
            if places:
                wrong[name] = places  # an MSR feature the registry lacks
            continue
        layout = reg.msrs[f.msr].layout
        want = [(f.msr, b - 32 if layout is MsrLayout.CONTROLS else b) for b in f.bits]
        if places != want:
            wrong[name] = places
    assert wrong == {}
    assert said["mds-no"] == [(0x10A, 5)]


@pytest.mark.qemu
@pytest.mark.kvm
def test_qemu_cpu_host_abort_is_the_vcpu_refusal(qemu_binary: str) -> None:
    """`-cpu host` makes QEMU write KVM's IA32_ARCH_CAPABILITIES, limited to
    the bits QEMU names, into the vCPU. Where it aborts ("failed to set MSR
    0x10a to V"), V is exactly that value and the vCPU trial refuses it;
    where it starts, the trial accepts the bits."""
    from kvmcpuid_virt.kvm import Kvm
    from kvmcpuid_virt.kvm.msrs import msr_delivery

    with Kvm() as kvm:
        if not kvm.has_feature_msrs():
            pytest.skip("this kernel has no KVM_CAP_GET_MSR_FEATURES")
        delivery = msr_delivery(kvm)
        offered = kvm.feature_msrs().get(0x10A)
    if offered is None:
        pytest.skip("KVM lists no IA32_ARCH_CAPABILITIES")
    proc = subprocess.run(
        [qemu_binary, "-accel", "kvm", "-machine", "pc", "-m", "16", "-S", "-display", "none",
         "-nodefaults", "-cpu", "host", "-qmp", "stdio"],
        input='{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n',
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    named = sum(f.mask for f in msr_registry().in_msr(0x10A) if f.qemu)
    m = re.search(r"failed to set MSR (0x[0-9a-f]+) to (0x[0-9a-f]+)", proc.stderr)
    if m is None:
        assert delivery.deliverable(0x10A) & named == offered & named
        return
    assert (int(m[1], 16), int(m[2], 16)) == (0x10A, offered & named)
    why = explain_set_failure(proc.stderr, delivery)
    assert why is not None and "refused by a vCPU here" in why
    for f in msr_registry().present({0x10A: offered & named}):
        assert f.name in why


# --- the pure parts -----------------------------------------------------------


def test_feature_msrs_tell_absent_from_empty_and_check_ranges() -> None:
    assert not FeatureMsrs.absent().available and len(FeatureMsrs.absent()) == 0
    empty = FeatureMsrs.of({})
    assert empty.available and len(empty) == 0 and empty != FeatureMsrs.absent()
    some = FeatureMsrs.of({0x10A: 0x69, 0x8B: 1})
    assert some.items == ((0x8B, 1), (0x10A, 0x69)) and 0x10A in some and some.get(0x10A) == 0x69
    with pytest.raises(ValueError):
        FeatureMsrs.of({0x10A: 1 << 64})
    with pytest.raises(ValueError):
        FeatureMsrs.of({1 << 32: 0})
    with pytest.raises(ValueError):
        FeatureMsrs(((0x10A, 1), (0x10A, 2)))
    with pytest.raises(ValueError):
        FeatureMsrs(((0x10A, 1),), available=False)


def _table(edx7: int) -> CpuidTable:
    return CpuidTable([CpuidEntry(0, 0, EntryFlag.NONE, 7, 0, 0, 0),
                       CpuidEntry(7, 0, EntryFlag.SIGNIFICANT_INDEX, 0, 0, 0, edx7)])  # fmt: skip


def test_refusal_reason_follows_the_enumerating_cpuid_bit() -> None:
    info = msr_registry().msr(0x10A)
    with_bit, without = _table(1 << 29), _table(0)
    lost = refusal_reason(info, with_bit, without, registry())
    assert "lost arch-capabilities (CPUID.07H.0:EDX[29])" in lost
    assert "lacks arch-capabilities" in refusal_reason(info, without, without, registry())
    assert "although" in refusal_reason(info, with_bit, with_bit, registry())
    assert refusal_reason(msr_registry().msr(0x8B), with_bit, with_bit, registry())


def test_why_refused_and_qemus_message_explained() -> None:
    delivery = MsrDelivery(
        (
            MsrTrial(0x10A, 0x4000_0000_0C00_0069, False, None, 0, "the reason"),
            MsrTrial(0x8B, 0x1000065, True, 0x1000065, 0x1000065),
            MsrTrial(0xCF, 1 << 5 | 1 << 9, False, None, 1 << 5, "core reason"),
        ),
        ("arch-capabilities",),
    )
    assert delivery.deliverable(0x10A) == 0 and delivery.deliverable(0x345) == 0
    arch = delivery.trial(0x10A)
    assert arch is not None and arch.refused == 0x4000_0000_0C00_0069
    why = explain_set_failure("x: error: failed to set MSR 0x10a to 0x69\nmore", delivery)
    assert why == (
        "MSR 10AH IA32_ARCH_CAPABILITIES = 0x69: rdctl-no, skip-l1dfl-vmentry, mds-no, "
        "pschange-mc-no (0x69) refused by a vCPU here: the reason"
    )
    assert delivery.why_refused(0x8B, 0x1000065) is None
    assert delivery.why_refused(0x10A, 0) is None  # 0 is always taken
    assert delivery.why_refused(0xCF, 1 << 5) is None  # accepted alone
    assert "bit 9" in (delivery.why_refused(0xCF, 1 << 9) or "")
    assert "not offered by KVM" in (delivery.why_refused(0x8B, 0x1000065 | 1 << 40) or "")
    assert "not a feature MSR" in (delivery.why_refused(0x345, 1) or "")
    assert explain_set_failure("no such line", delivery) is None


PURE_CHILD = r'''
import os, sys
PKG = os.path.dirname(os.path.abspath(__import__("kvmcpuid_virt").__file__))
seen = []

def hook(event, args):
    if event == "open":
        path = args[0]
        if isinstance(path, int) or os.path.abspath(str(path)).startswith(PKG + os.sep):
            return
        if not str(path).endswith((".py", ".pyc", ".so")):
            seen.append(f"open {path}")
    elif event == "import" and args[0].startswith(("kvmcpuid_virt.kvm", "fcntl", "ctypes")):
        seen.append(f"import {args[0]}")
    elif event.split(".")[0] in ("subprocess", "socket", "fcntl", "mmap", "ctypes"):
        seen.append(event)

sys.addaudithook(hook)
from kvmcpuid_virt.cpuid import features, msr_features as m
from kvmcpuid_virt.cpuid.table import CpuidEntry, CpuidTable, EntryFlag
reg = m.msr_registry()
values = {0x10A: 0x400000000C000069, 0x48B: 1 << 33, 0x8B: 1}
names = [f.name for f in reg.present(values)] + [reg.lookup("mds-no").position]
snap = m.FeatureMsrs.of(values)
t = CpuidTable([CpuidEntry(0, 0, EntryFlag.NONE, 7, 0, 0, 0)])
reason = m.refusal_reason(reg.msr(0x10A), t, t, features.registry())
d = m.MsrDelivery((m.MsrTrial(0x10A, values[0x10A], False, None, 0, reason),))
why = m.explain_set_failure("failed to set MSR 0x10a to 0x69", d)
assert names and snap.available and why, (names, why)
print(repr(seen))
'''


def test_msr_registry_and_explanations_do_no_io() -> None:
    """cpuid/msr_features.py is pure: loaded and used under an audit hook, it
    opens nothing outside the package and touches no device or process."""
    import sys

    out = subprocess.run([sys.executable, "-c", PURE_CHILD], check=True, capture_output=True,
                         text=True).stdout  # fmt: skip
    assert out.strip() == "[]"
