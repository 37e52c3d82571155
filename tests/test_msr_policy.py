"""Feature MSRs in the policy, the QEMU flags and diff.

Independent sources: QEMU's own abort message for plain `-cpu host` and its
own property list (this machine's binary), a C program's KVM_SET_MSRS on a
vCPU (tests/kvm_msr_c.py), the SDM's bit positions, and libvirt's test data
of real Intel CPUs (their <msr> elements) with QEMU's recorded answer on the
same machines. This host is AMD: the Intel-only parts (vmx-* controls, an
Intel IA32_ARCH_CAPABILITIES) run on recorded or SDM-written values, and the
tests say so in their names."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvmcpuid_virt.adapters import qemu
from kvmcpuid_virt.analysis.diff import diff
from kvmcpuid_virt.analysis.given import load_operand
from kvmcpuid_virt.config import msr_policy
from kvmcpuid_virt.config.build import Policy, build
from kvmcpuid_virt.config.max_model import limit_to_model
from kvmcpuid_virt.cpuid.formats import Dump, dumps
from kvmcpuid_virt.cpuid.msr_features import MsrDelivery, MsrTrial, msr_registry
from kvmcpuid_virt.cpuid.msr_values import FeatureMsrs
from kvmcpuid_virt.cpuid.table import CpuidTable
from kvmcpuid_virt.errors import UnsupportedFeatureError
from kvmcpuid_virt.fsutil import load_dump
from kvmcpuid_virt.toolfacts.facts import ToolFacts
from tests.conftest import FACTS, REPO, cpu_dump_paths

# libvirt's test data of an Intel Atom P5362 (Snow Ridge): IA32_ARCH_CAPABILITIES
# and IA32_CORE_CAPABILITIES as that host reported them.
ATOM = next(p for p in cpu_dump_paths() if p.stem.endswith("Atom-P5362") and p.suffix == ".xml")
# IA32_ARCH_CAPABILITIES bit positions (Intel SDM vol. 4, table 2-2).
ARCH_CAP_BITS = {
    "rdctl-no": 0, "ibrs-all": 1, "rsba": 2, "skip-l1dfl-vmentry": 3, "ssb-no": 4,
    "mds-no": 5, "pschange-mc-no": 6, "tsx-ctrl": 7, "taa-no": 8,
}  # fmt: skip


def _raw_msrs(path: Path) -> dict[int, int]:
    from lxml import etree

    return {int(str(el.get("index")), 16):
            int(str(el.get("edx")), 16) << 32 | int(str(el.get("eax")), 16)
            for el in etree.parse(str(path)).getroot().iter("msr")}  # fmt: skip


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmcpuid_virt.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


# --- pure: recorded Intel data ----------------------------------------------------


def test_simulated_intel_host_arch_capabilities_follow_the_recorded_msr_bits() -> None:
    """A config of the recorded Atom (an Intel host: this one is AMD) turns
    on exactly the IA32_ARCH_CAPABILITIES bits its <msr> value has, by the
    SDM's positions, and renders them in QEMU's spelling."""
    raw = _raw_msrs(ATOM)[0x10A]
    config = build(load_dump(str(ATOM)).table, facts=FACTS, source=str(ATOM))
    assert config.features["arch-capabilities"] is True
    for name, bit in ARCH_CAP_BITS.items():
        assert config.msr_features[name] == bool(raw >> bit & 1), name
    value = qemu.cpu_value(config)
    assert ",rdctl-no=on," in value and ",tsx-ctrl=off," in value
    expected = sum(1 << b for n, b in ARCH_CAP_BITS.items() if raw >> b & 1)
    assert config.expected_msrs[0x10A] & 0x1FF == expected


def test_simulated_intel_nested_vmx_controls_follow_the_sdm_allowed_1_bits() -> None:
    """SDM-written VMX capability MSRs (Intel-only; SDM vol. 3 appendix A.3:
    allowed-1 settings in bits 63:32) on the Atom's CPUID: vmx-ept is
    secondary control 1 (bit 33 of IA32_VMX_PROCBASED_CTLS2), on because its
    allowed-1 bit is set; a control whose allowed-1 bit is clear is off."""
    from tests.test_kvm_simulated_kernels import SDM_INTEL_VMX_MSRS

    table = load_dump(str(ATOM)).table.with_msrs(FeatureMsrs.of(SDM_INTEL_VMX_MSRS))
    config = build(table, facts=FACTS, source="simulated")
    if not config.features.get("vmx"):
        pytest.skip("the recorded Atom's CPUID has no vmx")
    assert config.msr_features["vmx-ept"] is (SDM_INTEL_VMX_MSRS[0x48B] >> 33 & 1 == 1)
    assert config.msr_features["vmx-unrestricted-guest"] is True  # control 7: bit 39 set
    assert config.msr_features["vmx-vpid"] is False  # control 5: bit 37 clear
    assert "vmx-ept=on" in qemu.cpu_value(config)


def test_msr_features_of_an_msr_whose_cpuid_bit_is_off_are_off() -> None:
    """KVM takes only 0 for IA32_ARCH_CAPABILITIES on a vCPU whose CPUID
    lacks 7.0:EDX[29]: with arch-capabilities disabled, none of its bits is
    on and the guest is not expected to read the MSR at all."""
    config = build(load_dump(str(ATOM)).table, Policy(disable=("arch-capabilities",)),
                   facts=FACTS, source=str(ATOM))  # fmt: skip
    assert not any(config.msr_features[n] for n in ARCH_CAP_BITS)
    assert 0x10A not in config.expected_msrs


def test_named_model_msr_features_are_its_own_and_missing_ones_are_named() -> None:
    """Cooperlake's QEMU definition lists arch-capabilities bits (its
    recorded expansion); on a host that lacks one, the config fails naming
    it, and --allow-unsupported drops it."""
    wanted = msr_policy.model_msr_features(FACTS.require_qemu().model("Cooperlake"))
    assert {"rdctl-no", "mds-no", "taa-no"} <= wanted
    table = load_dump(str(ATOM)).table
    raw = _raw_msrs(ATOM)[0x10A]
    lacking = sorted(n for n in wanted if n in ARCH_CAP_BITS and not raw >> ARCH_CAP_BITS[n] & 1)
    config = build(table, Policy(model="Cooperlake", allow_unsupported=True), facts=FACTS,
                   source=str(ATOM))  # fmt: skip
    for n in wanted:
        assert config.msr_features[n] is (n not in config.msr_dropped), n
    assert set(lacking) <= set(config.msr_dropped)
    if lacking:
        with pytest.raises(UnsupportedFeatureError, match=lacking[0]):
            build(table, Policy(model="Cooperlake"), facts=FACTS, source=str(ATOM))


def test_enable_and_disable_take_msr_feature_names_in_any_spelling() -> None:
    table = load_dump(str(ATOM)).table
    off = build(table, Policy(disable=("RDCTL_NO".lower().replace("_", "-"),)), facts=FACTS)
    assert off.msr_features["rdctl-no"] is False and "rdctl-no=off" in qemu.cpu_value(off)
    with pytest.raises(UnsupportedFeatureError, match="tsx-ctrl"):
        build(table, Policy(enable=("tsx-ctrl",)), facts=FACTS)  # bit 7 clear on this Atom
    with pytest.raises(Exception, match="both enabled and disabled"):
        build(table, Policy(enable=("mds-no",), disable=("mds-no",)), facts=FACTS)


def test_max_model_turns_msr_features_outside_the_model_off() -> None:
    config = build(load_dump(str(ATOM)).table, facts=FACTS, source=str(ATOM))
    on_before = set(config.msr_enabled())
    capped, off = limit_to_model(config, "Cooperlake", FACTS)
    allowed = msr_policy.model_msr_features(FACTS.require_qemu().model("Cooperlake"))
    assert set(capped.msr_enabled()) == on_before & allowed
    assert set(on_before - allowed) <= set(off)
    capped2, _ = limit_to_model(config, "Skylake-Server", FACTS)  # lists no MSR feature
    assert not capped2.msr_enabled()


def test_unknown_feature_msrs_are_left_undecided_with_a_note(tmp_path: Path) -> None:
    """A version-1 dump (no MSRs): nothing decided, not "all off"; the
    command says so on stderr."""
    table = load_dump(str(ATOM)).table.with_msrs(None)
    config = build(table, facts=FACTS, source="old.json", this_host=False)
    assert config.msr_features == {} and config.expected_msrs == {}
    assert any("carries no feature MSRs" in n for n in config.notes)
    doc = json.loads(dumps(Dump(table), "json"))
    doc["version"] = 1
    old = tmp_path / "old.json"
    old.write_text(json.dumps(doc))
    proc = _cli("qemu-flags", "--from", str(old))
    assert proc.returncode == 0, proc.stderr
    assert "rdctl-no" not in proc.stdout
    assert "carries no feature MSRs" in proc.stderr and proc.stderr.count("\n") == 1


def test_a_vcpu_that_refuses_a_value_turns_its_bits_off_and_explains_the_abort() -> None:
    """A simulated host like this one (what the C program sees here): KVM
    offers IA32_ARCH_CAPABILITIES bits, a vCPU accepts none. The -cpu host
    note names the MSR, QEMU's value (the bits it has properties for) and
    what a vCPU accepts."""
    offered = {0x10A: 0x4000_0000_0C00_0069}
    msrs = FeatureMsrs.of(offered, {0x10A: 0})
    delivery = MsrDelivery((MsrTrial(0x10A, offered[0x10A], False, None, 0, "simulated"),))
    table = load_dump(str(ATOM)).table.with_msrs(None)
    facts = dataclasses.replace(FACTS, host_msrs=msrs, msr_delivery=delivery)
    config = build(table, facts=facts, source="/dev/kvm")
    assert not config.msr_enabled() and config.msr_features["mds-no"] is False
    (note,) = [n for n in config.notes if "aborts" in n]
    assert "failed to set MSR 0x10a to 0x69" in note  # bits 0, 3, 5, 6: QEMU's names
    assert "KVM offers 0x400000000c000069" in note and "accepts 0x0" in note


# --- diff ----------------------------------------------------------------------------


def test_diff_names_msr_bits_and_says_when_one_side_has_none() -> None:
    a = Dump(load_dump(str(ATOM)).table, source="a")
    raw = a.table.msrs
    assert raw is not None
    b_msrs = FeatureMsrs.of({**raw.as_dict(), 0x10A: raw.as_dict()[0x10A] & ~(1 << 5)})
    d = diff(a, Dump(a.table.with_msrs(b_msrs), source="b"))
    assert not d.identical and [(m.index, m.only_a, m.only_b) for m in d.msrs] == [
        (0x10A, ("mds-no",), ())]  # fmt: skip
    same = diff(a, Dump(a.table, source="b"))
    assert same.identical and not same.msrs
    unknown = diff(a, Dump(a.table.with_msrs(None), source="old"))
    assert unknown.identical
    assert unknown.notes == ("B carries no feature MSRs: MSR features not compared",)


def test_diff_of_a_dump_and_its_flags_shows_what_the_guest_does_not_get() -> None:
    """`-cpu ...,mds-no=off` applied to the Atom dump: the guest lacks mds-no."""
    dump = load_dump(str(ATOM))
    flags = qemu.render(build(dump.table, Policy(disable=("mds-no",)), facts=FACTS))
    b, _ = load_operand(flags, "flags.txt", (dump.table, str(ATOM), FACTS))
    d = diff(dump, b)
    arch = next(m for m in d.msrs if m.index == 0x10A)
    assert "mds-no" in arch.only_a and "rdctl-no" not in arch.only_a + arch.only_b


# --- live: this host's KVM and QEMU --------------------------------------------------


@pytest.mark.kvm
def test_live_msr_features_on_are_exactly_what_the_c_programs_vcpu_accepted(
    live_facts: ToolFacts,
) -> None:
    from tests.kvm_msr_c import c_msr_reading

    c = c_msr_reading()
    if not c.cap:
        pytest.skip("this kernel has no KVM_CAP_GET_MSR_FEATURES")
    config = build(_live_table(), facts=live_facts, source="/dev/kvm")
    reg = msr_registry()
    for name, on in config.msr_features.items():
        f = reg.lookup(name)
        value = c.values.get(f.msr, 0)
        took = (c.set_result.get(f.msr) == 1
                or all(c.bit_result.get((f.msr, b)) == 1 for b in f.bits))  # fmt: skip
        if on:
            assert value & f.mask == f.mask and took, name


@pytest.mark.qemu
def test_live_cpu_host_abort_note_is_qemus_own_message(qemu_binary: str,
                                                       live_facts: ToolFacts) -> None:  # fmt: skip
    """QEMU itself, with plain `-cpu host`: it aborts with exactly the MSR
    and value our note predicts from the vCPU trial, or it starts and there
    is no note; and our flags start it."""
    proc = subprocess.run(
        [qemu_binary, "-accel", "kvm", "-cpu", "host", "-machine", "pc", "-nodefaults",
         "-display", "none", "-no-user-config", "-S", "-qmp", "stdio"],
        input='{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    config = build(_live_table(), facts=live_facts, source="/dev/kvm")
    notes = [n for n in config.notes if "aborts" in n]
    m = re.search(r"failed to set MSR (0x[0-9a-f]+) to (0x[0-9a-f]+)", proc.stderr)
    if m is None:
        assert proc.returncode == 0 and not notes
    else:
        assert len(notes) == 1 and f"failed to set MSR {m[1]} to {m[2]}" in notes[0]
    ours = subprocess.run(
        [qemu_binary, "-accel", "kvm", *qemu.render_argv(config), "-machine", "pc",
         "-nodefaults", "-display", "none", "-no-user-config", "-S", "-qmp", "stdio"],
        input='{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert ours.returncode == 0, ours.stderr


@pytest.mark.qemu
def test_msr_feature_names_rendered_are_this_qemus_own_properties(
    qemu_binary: str, live_facts: ToolFacts
) -> None:
    """Every MSR feature the registry lets a config set is a boolean CPU
    property of this QEMU binary (its own query-cpu-model-expansion), and
    the configs of the recorded Intel hosts render only such names."""
    from kvmcpuid_virt.qmp import run_commands

    reply = run_commands(qemu_binary, [{"execute": "query-cpu-model-expansion",
                                        "arguments": {"type": "full", "model": {"name": "max"}}}],
                         accel="tcg")  # fmt: skip
    props = {k for k, v in reply[0]["model"]["props"].items() if isinstance(v, bool)}
    settable = {f.qemu for f in msr_registry() if f.qemu is not None}
    assert settable & props, "no MSR feature among QEMU's properties"
    relevant = msr_policy.relevant(msr_registry(), frozenset(live_facts.require_qemu().props))
    assert {f.qemu for f in relevant.values()} <= props
    for path in cpu_dump_paths():
        config = build(load_dump(str(path)).table, facts=live_facts, source=str(path),
                       this_host=False)  # fmt: skip
        assert set(config.msr_features) <= props, path


def _live_table() -> CpuidTable:
    from kvmcpuid_virt.kvm import Kvm

    with Kvm() as k:
        return k.supported_cpuid()


def test_toolfacts_json_keeps_the_msr_facts_and_reads_older_recordings() -> None:
    msrs = FeatureMsrs.of({0x10A: 0x69, 0x8B: 0x1000065}, {0x10A: 0, 0x8B: 0x1000065})
    delivery = MsrDelivery((MsrTrial(0x10A, 0x69, False, None, 0, "why"),
                            MsrTrial(0x8B, 0x1000065, True, 0x1000065, 0x1000065)),
                           ("arch-capabilities",), 0.001)  # fmt: skip
    facts = dataclasses.replace(FACTS, host_msrs=msrs, msr_delivery=delivery)
    back = ToolFacts.from_json(json.loads(json.dumps(facts.to_json())))
    assert back.host_msrs == msrs and back.msr_delivery == delivery
    assert back.undeliverable() == {"arch-capabilities": delivery.note(0x10A)}
    older = facts.to_json()
    older["version"] = 3
    del older["host_msrs"], older["msr_delivery"]
    old = ToolFacts.from_json(older)
    assert old.host_msrs is None and old.undeliverable() == old.require_qemu().undeliverable


@pytest.mark.kvm
@pytest.mark.qemu
def test_compat_reads_qemu_flags_with_msr_features(tmp_path: Path, qemu_binary: str) -> None:
    """This host's own flags (which now switch MSR features) fit this host."""
    flags = _cli("qemu-flags")
    assert flags.returncode == 0 and "mds-no=" in flags.stdout
    path = tmp_path / "flags.txt"
    path.write_text(flags.stdout)
    proc = _cli("compat", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_libvirt_cpu_carries_msr_features_in_cpu_maps_spelling_and_reads_back() -> None:
    """cpu_map names IA32_ARCH_CAPABILITIES bits by <msr>: the rendered
    <cpu> has them as <feature>s, and reading that <cpu> back gives the
    same MSR decisions."""
    from lxml import etree

    from kvmcpuid_virt.adapters import libvirt as lv

    config = build(load_dump(str(ATOM)).table, facts=FACTS, source=str(ATOM))
    cpu = lv.cpu_element(config, lv.base_model(config, FACTS))
    names = {f.get("name"): f.get("policy") for f in cpu.iter("feature")}
    reg = msr_registry()
    for name, on in config.msr_features.items():
        libvirt_name = reg.lookup(name).libvirt
        if libvirt_name is not None:
            assert names[libvirt_name] == ("require" if on else "disable"), name
    _model, enable, disable = lv.parse(etree.fromstring(etree.tostring(cpu)), "cpu.xml")
    assert set(config.msr_enabled()) <= set(enable)
    assert {n for n in config.msr_disabled() if reg.lookup(n).libvirt} <= set(disable)


def test_host_model_msr_features_become_the_inputs_feature_msrs() -> None:
    """A libvirt host-model naming mds-no (cpu_map: IA32_ARCH_CAPABILITIES
    bit 5) carries MSR 0x10A with that bit, deliverable, into a baseline."""
    from kvmcpuid_virt.config.host_model import host_model_dump

    if not FACTS.msr_features or "mds-no" not in FACTS.msr_features:
        pytest.skip("the recording has no cpu_map MSR features")
    xml = ("<domainCapabilities><cpu><mode name='host-model' supported='yes'>"
           "<model fallback='forbid'>qemu64</model><vendor>Intel</vendor>"
           "<feature policy='require' name='mds-no'/><feature policy='require' name='rdctl-no'/>"
           "</mode></cpu></domainCapabilities>")  # fmt: skip
    if "qemu64" not in FACTS.cpu_map:
        pytest.skip("no qemu64 in the recorded cpu_map")
    hm = host_model_dump(xml, "synthetic", FACTS)
    msrs = hm.dump.msrs
    assert msrs is not None and msrs.as_dict() == {0x10A: MDS_NO_BIT | 1}
    assert msrs.deliverable_dict() == {0x10A: MDS_NO_BIT | 1} and hm.msr_left_out == ()


MDS_NO_BIT = 1 << 5  # Intel SDM vol. 4, table 2-2


def test_qemu_flags_memo_tells_dumps_apart_by_their_feature_msrs(tmp_path: Path) -> None:
    """Two dumps with the same CPUID and other feature MSRs, read from the
    same path in turn: the output memo must not answer the second with the
    first's flags (mds-no follows IA32_ARCH_CAPABILITIES bit 5)."""
    table = load_dump(str(ATOM)).table
    path = tmp_path / "host.json"
    outputs = []
    for value in (0x0, 1 << 5):
        msrs = FeatureMsrs.of({0x10A: value})
        path.write_text(dumps(Dump(table.with_msrs(msrs), host={"hostname": "elsewhere"}),
                              "json"))  # fmt: skip
        proc = _cli("qemu-flags", "--from", str(path))
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout)
    assert "mds-no=off" in outputs[0] and "mds-no=on" in outputs[1]


def test_unmet_names_what_a_host_cannot_give_of_a_guests_msr_features() -> None:
    """For compat-style judgements: a guest with mds-no and rdctl-no on, a
    host like this one (KVM offers both, a vCPU accepts neither), one that
    lacks mds-no, and one whose feature MSRs are unknown."""
    here = FeatureMsrs.of({0x10A: 0x69}, {0x10A: 0})
    got = msr_policy.unmet(["mds-no", "RDCTL-NO"], here, {"arch-capabilities": True})
    assert set(got) == {"mds-no", "rdctl-no"} and "refuses" in got["mds-no"]
    other = FeatureMsrs.of({0x10A: 0x1}, {0x10A: 0x1})
    assert set(msr_policy.unmet(["mds-no", "rdctl-no"], other, {})) == {"mds-no"}
    gated = msr_policy.unmet(["rdctl-no"], other, {"arch-capabilities": False})
    assert "enumerates" in gated["rdctl-no"]
    assert msr_policy.unmet(["mds-no"], None, {}) == {}


def test_simulated_kernel_without_msr_features_capability_gives_no_msr_feature() -> None:
    """A kernel before 4.17 (no KVM_CAP_GET_MSR_FEATURES: the MSRs absent,
    not unknown): the config turns no MSR feature on, a model asking for
    one finds it missing, and the flags still render."""
    table = load_dump(str(ATOM)).table.with_msrs(FeatureMsrs.absent("simulated: no capability"))
    config = build(table, facts=FACTS, source="simulated", this_host=False)
    assert not config.msr_enabled() and not any("carries no" in n for n in config.notes)
    assert qemu.cpu_value(config).endswith(",enforce")
    with pytest.raises(UnsupportedFeatureError, match="rdctl-no"):
        build(table, Policy(model="Cooperlake"), facts=FACTS, source="simulated",
              this_host=False)  # fmt: skip


def test_a_misspelt_msr_feature_gets_close_names() -> None:
    from kvmcpuid_virt.errors import UnknownFeatureError

    with pytest.raises(UnknownFeatureError, match="did you mean 'mds-no'"):
        build(load_dump(str(ATOM)).table, Policy(enable=("mds-nox",)), facts=FACTS)


def test_dropped_msr_features_stay_apart_from_the_cpuid_ones(tmp_path: Path) -> None:
    """A domain requiring mds-no on a host without it: the configuration
    drops it as an MSR feature (config.dropped stays CPUID names, which
    verify and compat look up), and compat reads the domain."""
    table = load_dump(str(ATOM)).table.with_msrs(FeatureMsrs.of({0x10A: 1}))
    config = build(table, Policy(enable=("mds-no",), allow_unsupported=True), facts=FACTS)
    assert config.msr_dropped == ("mds-no",) and "mds-no" not in config.dropped
    from kvmcpuid_virt.cli.options import dropped_warnings

    assert "mds-no" in dropped_warnings("prog", config)
