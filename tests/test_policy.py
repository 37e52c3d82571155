"""Policy: building CpuConfig from tables, QEMU's adjustments, model choice.
Unit tests use hand-made tables; live tests cross-check against QEMU's own
answers on this host."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmcpuid_virt.config import build as select
from kvmcpuid_virt.config import qemu_adjust
from kvmcpuid_virt.config.cpuconfig import CpuConfig, vendor_of
from kvmcpuid_virt.cpuid.features import registry
from kvmcpuid_virt.cpuid.table import CpuidEntry, CpuidTable
from kvmcpuid_virt.errors import PolicyError, UnknownFeatureError, UnsupportedFeatureError
from kvmcpuid_virt.kvm import Kvm
from kvmcpuid_virt.toolfacts.facts import ToolFacts
from tests.conftest import FACTS

AMD = (0x68747541, 0x69746E65, 0x444D4163)  # "Auth" "enti" "cAMD" as ebx, edx, ecx
INTEL = (0x756E6547, 0x49656E69, 0x6C65746E)


def table(vendor: tuple[int, int, int] = AMD, leaf1_edx: int = 0x0789FBFF) -> CpuidTable:
    ebx, edx, ecx = vendor
    return CpuidTable([
        CpuidEntry(0, eax=0xD, ebx=ebx, ecx=ecx, edx=edx),
        CpuidEntry(1, ecx=1 << 13, edx=leaf1_edx),  # cx16; fpu..sse2 without ht
        CpuidEntry(6),
        CpuidEntry(0x80000000, eax=0x80000008),
        CpuidEntry(0x80000001, ecx=1, edx=(1 << 11) | (1 << 29)),  # syscall, lm
        CpuidEntry(0x40000000, eax=0x40000001),
        CpuidEntry(0x40000001, eax=1),  # kvmclock
    ])  # fmt: skip


def test_vendor_of() -> None:
    assert vendor_of(table()) == "AuthenticAMD"
    assert vendor_of(table(INTEL)) == "GenuineIntel"


def test_qemu_adjustments() -> None:
    t = qemu_adjust.qemu_supported(table())
    assert t.get(1, 0, "ecx") & (1 << 31), "hypervisor is always added"
    assert t.get(1, 0, "ecx") & (1 << 24), "tsc-deadline with the in-kernel irqchip"
    assert t.get(6, 0, "eax") & (1 << 2), "arat is always added"
    assert t.get(0x80000001, 0, "edx") & qemu_adjust.AMD_ALIASES == 0x0789FBFF & 0x0183F3FF
    assert t.get(0x40000001, 0, "edx") & 1, "kvm-hint-dedicated may always be asked for"
    x2 = table().replace_entry(CpuidEntry(1, ecx=(1 << 21), edx=0))
    no_irqchip = qemu_adjust.qemu_supported(x2, kernel_irqchip=False)
    assert not no_irqchip.get(1, 0, "ecx") & ((1 << 21) | (1 << 24))


def test_amd_alias_fixup_follows_vendor() -> None:
    t = qemu_adjust.qemu_supported(table(INTEL))
    assert (
        qemu_adjust.amd_alias_fixup(t, "GenuineIntel").get(0x80000001, 0, "edx")
        & (qemu_adjust.AMD_ALIASES)
        == 0
    )
    t = qemu_adjust.qemu_supported(table(AMD))
    fixed = qemu_adjust.amd_alias_fixup(t, "AuthenticAMD").get(0x80000001, 0, "edx")
    assert fixed & qemu_adjust.AMD_ALIASES == 0x0789FBFF & qemu_adjust.AMD_ALIASES


def test_host_policy_every_feature_explicit() -> None:
    c = select.build(table(), facts=FACTS)
    reg = registry()
    assert c.model == "host"
    assert set(c.enabled()) | set(c.disabled()) == set(c.features)
    assert not set(c.enabled()) & set(c.disabled())
    for name in ("fpu", "sse2", "cx16", "lm", "syscall", "hypervisor", "kvmclock"):
        assert c.features[name], name
    for name in ("avx", "sse4.2", "x2apic", "topoext"):
        assert not c.features[name], name
    # Every key is a registry canonical name of a settable kind.
    for name in c.features:
        assert reg.lookup(name).name == name
        assert reg.lookup(name).kind in select.SETTABLE_KINDS


def test_expected_follows_features() -> None:
    c = select.build(table(), select.Policy(disable=("sse2", "kvmclock")), facts=FACTS)
    assert not c.features["sse2"]
    assert not c.expected.get(1, 0, "edx") & (1 << 26)
    # kvmclock owns two bits (0 and 3) in QEMU: both follow it.
    assert c.expected.get(0x40000001, 0, "eax") & 0b1001 == 0
    c2 = select.build(table(), facts=FACTS)
    assert c2.expected.get(1, 0, "edx") & (1 << 26)
    assert c2.expected.get(0x40000001, 0, "eax") & 0b1001 == 0b1001


def test_enable_unsupported_is_an_error_naming_it() -> None:
    with pytest.raises(UnsupportedFeatureError, match="avx2"):
        select.build(table(), select.Policy(enable=("avx2",)), facts=FACTS)
    c = select.build(table(), select.Policy(enable=("avx2",), allow_unsupported=True),
                     facts=FACTS)
    assert c.dropped == ("avx2",)
    assert c.features["avx2"] is False


def test_enable_either_spelling() -> None:
    # lahf_lm is libvirt's spelling of QEMU's lahf-lm.
    t = table().replace_entry(CpuidEntry(0x80000001, ecx=1, edx=1 << 29))
    c = select.build(t, select.Policy(disable=("lahf_lm",)), facts=FACTS)
    assert c.features["lahf-lm"] is False


def test_unknown_and_conflicting_names() -> None:
    with pytest.raises(UnknownFeatureError, match=r"sse4\.2"):
        select.build(table(), select.Policy(enable=("sse4.3",)), facts=FACTS)
    with pytest.raises(PolicyError, match="both"):
        select.build(table(), select.Policy(enable=("sse2",), disable=("sse2",)), facts=FACTS)
    with pytest.raises(PolicyError, match="cannot be set"):
        select.build(table(), select.Policy(enable=("osxsave",)), facts=FACTS)


def test_config_is_frozen() -> None:
    c = select.build(table(), facts=FACTS)
    assert isinstance(c, CpuConfig)
    with pytest.raises(TypeError):
        c.features["fpu"] = False  # type: ignore[index]


def test_named_model_missing_features_error_or_off() -> None:
    # cpu_map's Skylake-Server has avx512f; this table does not.
    with pytest.raises(UnsupportedFeatureError, match="avx512f"):
        select.build(table(INTEL), select.Policy(model="Skylake-Server"), facts=FACTS)
    c = select.build(table(INTEL), select.Policy(model="Skylake-Server", allow_unsupported=True),
                     facts=FACTS)
    assert c.model == "Skylake-Server"
    assert "avx512f" in c.dropped and c.features["avx512f"] is False
    assert c.features["sse2"] is True


# --- live: this host, its QEMU ---------------------------------------------------------


@pytest.mark.kvm
@pytest.mark.qemu
def test_cross_check_against_qemu_host_expansion(kvm: Kvm, live_facts: ToolFacts) -> None:
    """Our model of QEMU (qemu_supported + the trial start) against QEMU's own
    `host` expansion: every difference must carry an explanation."""
    info = live_facts.require_qemu()
    reg = registry()
    relevant = select.relevant_features(reg, info.props)
    sup = select.supported_features(
        reg, qemu_adjust.qemu_supported(kvm.supported_cpuid()), relevant
    )
    sup -= set(info.undeliverable)
    diffs = qemu_adjust.cross_check(sup, info.host, [f.name for f in relevant],
                                    info.undeliverable)  # fmt: skip
    unexplained = [d for d in diffs if not d.reason]
    assert unexplained == []


@pytest.mark.kvm
@pytest.mark.qemu
def test_auto_model_agrees_with_qemu_usability(kvm: Kvm, live_facts: ToolFacts) -> None:
    """`auto` picks a model QEMU itself reports usable here (no
    unavailable-features in query-cpu-definitions), an independent check."""
    c = select.build(kvm.supported_cpuid(), select.Policy(model="auto"), source="/dev/kvm",
                     facts=live_facts)
    info = live_facts.require_qemu()
    assert info.definitions[c.model] == ()


@pytest.mark.parametrize(
    ("dump", "family", "model", "stepping"),
    [
        # Published signatures; the raw leaf-1 EAX of the same CPUs' dumps is
        # the independent check of the encoding.
        ("x86_64-cpuid-Ice-Lake-Server.xml", 6, 0x6A, 0),
        ("x86_64-cpuid-EPYC-9334-32-Core.xml", 0x19, 0x11, 1),
        ("x86_64-cpuid-Core-i7-5600U.xml", 6, 0x3D, 4),
    ],
)
def test_model_identity_signature_encoding(
    data_dir: Path, dump: str, family: int, model: int, stepping: int
) -> None:
    from lxml import etree

    from kvmcpuid_virt.config.build import with_model_identity
    from kvmcpuid_virt.toolfacts.facts import ModelIdentity

    raw = next(
        int(c.get("eax", "0"), 16)
        for c in etree.parse(str(data_dir / dump)).getroot().iter("cpuid")
        if int(c.get("eax_in", "0"), 16) == 1
    )
    t = table()
    ident = ModelIdentity(min_level=7, min_xlevel=0x8000_0001, family=family, model=model,
                          stepping=stepping)
    out = with_model_identity(t, ident, [])
    assert out.get(1, 0, "eax") & 0x0FFF_3FFF == raw & 0x0FFF_3FFF
    # Leaves beyond the model's max leaves are gone, and leaf 0 says so.
    assert out.get(0, 0, "eax") == 7 and out.get(0x8000_0000, 0, "eax") == 0x8000_0001
    assert all(e.function <= 7 or e.function >= 0x4000_0000 for e in out)
    assert all(e.function <= 0x8000_0001 for e in out if e.function >= 0x8000_0000)


def test_model_identity_raised_by_enabled_features() -> None:
    from kvmcpuid_virt.config.build import with_model_identity
    from kvmcpuid_virt.toolfacts.facts import ModelIdentity

    reg = registry()
    ident = ModelIdentity(min_level=1, min_xlevel=0, family=6, model=7, stepping=3)
    out = with_model_identity(table(), ident, [reg.lookup("avx2"), reg.lookup("lm")])
    # QEMU's full-cpuid-auto-level: avx2 lives in leaf 7, lm in 0x80000001.
    assert out.get(0, 0, "eax") == 7 and out.get(0x8000_0000, 0, "eax") == 0x8000_0001
