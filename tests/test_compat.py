"""kvmcpuid compat: real CPU dumps of several generations and both vendors,
judged against an independent decoding (libvirt's cpu_map x86_features.xml
and the raw <cpudata>, read here with lxml); the rules on hand-built tables
whose answer follows from the Intel SDM / AMD APM; and this host's own KVM."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from lxml import etree

from kvmcpuid_virt.analysis.compat import (
    RULES,
    Control,
    Host,
    Layer,
    Rule,
    Scope,
    Verdict,
    compat,
    judge_text,
)
from kvmcpuid_virt.cli import main
from kvmcpuid_virt.cpuid.features import registry
from kvmcpuid_virt.cpuid.formats import Dump
from kvmcpuid_virt.cpuid.table import CpuidEntry, CpuidTable, EntryFlag, Register
from kvmcpuid_virt.fsutil import load_dump
from kvmcpuid_virt.kvm import Kvm
from kvmcpuid_virt.toolfacts.facts import NO_TOOLS
from tests.conftest import FACTS

CPU_MAP = Path("/usr/share/libvirt/cpu_map")
Bit = tuple[int, int, str, int]

# Bits a guest sees whatever the host CPU has, so cpu_map's "the host has it"
# is not the question for them: OSXSAVE and OSPKE mirror CR4 bits the guest
# OS sets, HTT follows the guest's topology (Intel SDM vol. 2A, CPUID leaf 1
# ECX[27], EDX[28]; leaf 7 ECX[4]); hypervisor, tsc-deadline and arat are
# set by QEMU for every KVM guest (target/i386/kvm/kvm.c,
# kvm_arch_get_supported_cpuid); x2apic and arch-capabilities are emulated
# by KVM on any CPU (arch/x86/kvm/cpuid.c, kvm_set_cpu_caps: "We emulate
# ARCH_CAPABILITIES in software even if the host doesn't support it").
NOT_FROM_HOST = frozenset({"osxsave", "ospke", "ht", "hypervisor", "tsc-deadline", "arat",
                           "x2apic", "arch-capabilities"})
# The position in a reason's `where`: CPUID.07H.0:EBX[16].
WHERE = re.compile(r"CPUID\.([0-9A-F]+)H\.(\d+):([A-Z]+)\[(\d+)\]\Z")

# Older guest -> newer host of the same vendor, where cpu_map finds every
# feature of the guest on the host (checked below, not assumed).
OLD_ON_NEW = [
    ("Core-i7-5600U", "Xeon-Gold-6148"),  # Broadwell-U on Skylake-SP
    ("Core-i7-5600U", "Ice-Lake-Server"),  # Broadwell-U on Ice Lake-SP
    ("EPYC-7601-32-Core", "EPYC-9334-32-Core"),  # Zen 1 on Zen 4
    ("EPYC-7601-32-Core", "Ryzen-9-3900X-12-Core"),  # Zen 1 on Zen 2
]


@pytest.fixture(scope="module")
def cpu_map_bits() -> dict[str, Bit]:
    """cpu_map's CPUID features: name -> (leaf, subleaf, register, bit)."""
    path = CPU_MAP / "x86_features.xml"
    if not path.exists():
        pytest.skip(f"libvirt's cpu_map is not installed ({CPU_MAP})")
    out: dict[str, Bit] = {}
    for f in etree.parse(str(path)).getroot().iter("feature"):
        for c in f.findall("cpuid"):
            for reg in ("eax", "ebx", "ecx", "edx"):
                mask = int(c.get(reg, "0"), 16)
                if mask:
                    out[str(f.get("name"))] = (int(c.get("eax_in", "0"), 16),
                                               int(c.get("ecx_in", "0"), 16), reg,
                                               mask.bit_length() - 1)  # fmt: skip
    return out


def _path(data_dir: Path, stem: str) -> Path:
    path = data_dir / f"x86_64-cpuid-{stem}.xml"
    if not path.exists():
        pytest.skip(f"no CPU dump {path.name}")
    return path


def _regs(path: Path) -> dict[tuple[int, int], dict[str, int]]:
    """The raw <cpudata>: (leaf, subleaf) -> registers."""
    out = {}
    for c in etree.parse(str(path)).getroot().iter("cpuid"):
        out[(int(c.get("eax_in", "0"), 16), int(c.get("ecx_in", "0"), 16))] = {
            r: int(c.get(r, "0"), 16) for r in ("eax", "ebx", "ecx", "edx")}
    return out


def _cpu_map_features(path: Path, bits: dict[str, Bit]) -> dict[str, Bit]:
    """The cpu_map features a dump has, leaves beyond its max basic or
    extended leaf counting as absent (SDM: such leaves return another leaf's
    data, they do not report features)."""
    regs = _regs(path)
    top = {0: regs[(0, 0)]["eax"], 0x8000_0000: regs.get((0x8000_0000, 0), {}).get("eax", 0)}
    out = {}
    for name, (leaf, sub, reg, bit) in bits.items():
        base = leaf & 0x8000_0000
        if base in top and leaf > top[base]:
            continue
        if regs.get((leaf, sub), {}).get(reg, 0) >> bit & 1:
            out[name] = (leaf, sub, reg, bit)
    return out


def _positions(verdict: Verdict) -> set[Bit]:
    out = set()
    for r in verdict.reasons:
        m = WHERE.match(r.where)
        if m:
            out.add((int(m[1], 16), int(m[2]), m[3].lower(), int(m[4])))
    return out


def _judge(data_dir: Path, guest: str, host: str) -> Verdict:
    return compat(load_dump(str(_path(data_dir, guest))),
                  Host(load_dump(str(_path(data_dir, host)))))  # fmt: skip


@pytest.mark.parametrize(("old", "new"), OLD_ON_NEW, ids=[f"{o}-on-{n}" for o, n in OLD_ON_NEW])
def test_old_guest_fits_a_newer_host_that_has_every_feature(
    data_dir: Path, cpu_map_bits: dict[str, Bit], old: str, new: str
) -> None:
    have = _cpu_map_features(_path(data_dir, old), cpu_map_bits)
    host = _cpu_map_features(_path(data_dir, new), cpu_map_bits)
    assert set(have) - set(host) - NOT_FROM_HOST == set(), "cpu_map: the pair is not old-on-new"
    verdict = _judge(data_dir, old, new)
    assert verdict.fits, verdict.render_table()


@pytest.mark.parametrize(("old", "new"), OLD_ON_NEW, ids=[f"{n}-on-{o}" for o, n in OLD_ON_NEW])
def test_new_guest_on_an_older_host_names_what_cpu_map_says_is_missing(
    data_dir: Path, cpu_map_bits: dict[str, Bit], old: str, new: str
) -> None:
    have = _cpu_map_features(_path(data_dir, new), cpu_map_bits)
    host = _cpu_map_features(_path(data_dir, old), cpu_map_bits)
    missing = {have[n] for n in set(have) - set(host) - NOT_FROM_HOST}
    assert missing, "cpu_map: the newer CPU has nothing the older lacks"
    verdict = _judge(data_dir, new, old)
    assert not verdict.fits
    named = {p for p in _positions(verdict) if p in set(cpu_map_bits.values())}
    assert named == missing
    # Each is named, in the registry's spelling of cpu_map's name.
    by_pos = {_positions(Verdict("", "", (r,), {})).pop(): r for r in verdict.reasons
              if WHERE.match(r.where)}  # fmt: skip
    for n in set(have) - set(host) - NOT_FROM_HOST:
        reason = by_pos[have[n]]
        assert reason.field == registry().lookup(n).name
        assert reason.layer == Layer.KVM and (reason.guest, reason.host) == ("on", "off")
        assert reason.field in verdict.missing()


def test_every_pair_of_dumps_agrees_with_cpu_map_bit_for_bit(
    data_dir: Path, cpu_map_bits: dict[str, Bit]
) -> None:
    """Both directions of every pair: the feature bits compat finds missing,
    where cpu_map names the bit, are exactly cpu_map's difference."""
    stems = sorted(p.name[len("x86_64-cpuid-"):-4] for p in data_dir.glob("*.xml"))
    assert len(stems) >= 4
    positions = set(cpu_map_bits.values())
    for g in stems:
        have = _cpu_map_features(_path(data_dir, g), cpu_map_bits)
        for h in stems:
            host = _cpu_map_features(_path(data_dir, h), cpu_map_bits)
            missing = {have[n] for n in set(have) - set(host) - NOT_FROM_HOST}
            got = {p for p in _positions(_judge(data_dir, g, h)) if p in positions}
            assert got == missing, (g, h)


def test_another_vendor_does_not_fit(data_dir: Path) -> None:
    guest = _path(data_dir, "Xeon-Gold-6148")
    host = _path(data_dir, "EPYC-9334-32-Core")
    verdict = _judge(data_dir, "Xeon-Gold-6148", "EPYC-9334-32-Core")
    vendor = next(r for r in verdict.reasons if r.field == "vendor")
    # Leaf 0 EBX, EDX, ECX spell the vendor (SDM vol. 2A, CPUID leaf 0).
    def spelled(path: Path) -> str:
        r = _regs(path)[(0, 0)]
        return b"".join(r[x].to_bytes(4, "little") for x in ("ebx", "edx", "ecx")).decode()
    assert (vendor.guest, vendor.host) == (spelled(guest), spelled(host))
    assert (vendor.guest, vendor.host) == ("GenuineIntel", "AuthenticAMD")


def test_xsave_layout_must_match_for_the_guests_components(data_dir: Path) -> None:
    """Zen 2's PKRU (XSAVE component 9) sits at offset 832 in the standard
    format; Zen 4's, after the AVX-512 state, elsewhere: a Zen 2 guest's
    XRSTOR image would not fit a Zen 4 host, although Zen 4 has every
    feature bit cpu_map names for Zen 2."""
    guest = _regs(_path(data_dir, "Ryzen-9-3900X-12-Core"))[(0xD, 9)]
    host = _regs(_path(data_dir, "EPYC-9334-32-Core"))[(0xD, 9)]
    assert guest["ebx"] != host["ebx"]
    verdict = _judge(data_dir, "Ryzen-9-3900X-12-Core", "EPYC-9334-32-Core")
    offset = next(r for r in verdict.reasons if r.field == "XSAVE component offset 9")
    assert (offset.guest, offset.host) == (str(guest["ebx"]), str(host["ebx"]))
    assert offset.where == "CPUID.0DH.9:EBX" and offset.rule == Rule.EQUAL


# --- the rules on hand-built tables ---------------------------------------------------

_AMD = (0x6874_7541, 0x6974_6E65, 0x444D_4163)  # "Auth" "enti" "cAMD": ebx, edx, ecx


def _table(max_basic: int = 0x7, max_ext: int = 0x8000_0008, *, leaf1_ecx: int = 0,
           leaf7_edx: int = 0, ext1_ecx: int = 0, phys: int = 48) -> Dump:  # fmt: skip
    ebx, edx, ecx = _AMD
    t = CpuidTable([
        CpuidEntry(0, 0, EntryFlag.NONE, max_basic, ebx, ecx, edx),
        CpuidEntry(1, 0, EntryFlag.NONE, 0x00A1_0F11, 0, leaf1_ecx, 0),
        CpuidEntry(7, 0, EntryFlag.SIGNIFICANT_INDEX, 0, 0, 0, leaf7_edx),
        CpuidEntry(0x8000_0000, 0, EntryFlag.NONE, max_ext),
        CpuidEntry(0x8000_0001, 0, EntryFlag.NONE, 0, 0, ext1_ecx, 0),
        CpuidEntry(0x8000_0008, 0, EntryFlag.NONE, 48 << 8 | phys),
    ])  # fmt: skip
    return Dump(t, "supported", source="t")


def test_each_register_has_one_rule() -> None:
    seen: set[tuple[int, int, str]] = set()
    for rule in RULES:
        if rule.scope == Scope.REGISTER:
            for reg in rule.regs:
                word = (rule.leaf, rule.subleaf, reg)
                assert word not in set(registry().words()), rule.name
                if word not in seen or rule.mask != 0xFFFF_FFFF:
                    seen.add(word)
                else:
                    raise AssertionError(f"{word} twice")
    assert {r.rule for r in RULES} == set(Rule)


def test_leaves_and_address_bits_no_greater() -> None:
    verdict = compat(_table(max_basic=0xD, phys=52), Host(_table(max_basic=0x7, phys=48)))
    got = {r.field: (r.guest, r.host) for r in verdict.reasons}
    assert got == {"max basic leaf": ("0xd", "0x7"), "physical address bits": ("52", "48")}
    assert compat(_table(max_basic=0x7), Host(_table(max_basic=0xD))).fits


def test_a_bit_kvm_lacks_is_kvm_one_qemu_cannot_set_up_is_qemu() -> None:
    # abm: CPUID.80000001H:ECX[5] (AMD APM vol. 3, LZCNT); arch-capabilities:
    # CPUID.7.0:EDX[29] (SDM), which the recorded QEMU's start trial found it
    # cannot set up ("failed to set MSR 0x10a").
    guest = _table(ext1_ecx=1 << 5, leaf7_edx=1 << 29)
    host = Host(_table(leaf7_edx=1 << 29), qemu=FACTS.qemu, this_host=True)
    verdict = compat(guest, host)
    got = {r.field: (r.layer, r.where) for r in verdict.reasons}
    assert got == {"abm": (Layer.KVM, "CPUID.80000001H.0:ECX[5]"),
                   "arch-capabilities": (Layer.QEMU, "CPUID.07H.0:EDX[29]")}  # fmt: skip
    assert "failed to set MSR 0x10a" in next(r.detail for r in verdict.reasons
                                             if r.layer == Layer.QEMU)  # fmt: skip
    # Another host's dump: this machine's QEMU trial does not speak for it.
    assert {r.field for r in compat(guest, Host(_table(leaf7_edx=1 << 29),
                                                qemu=FACTS.qemu)).reasons} == {"abm"}  # fmt: skip


def test_a_bit_this_host_forces_off_or_on() -> None:
    """What the host-control probe found decides over KVM's table: a bit
    forced off (fma, CPUID.1:ECX[12]) is missing although KVM lists it; one
    forced on (sse3, CPUID.1:ECX[0]) is given although KVM does not."""
    word: tuple[int, int, Register] = (1, 0, "ecx")
    control = Control(uncontrolled={word: 1 << 12 | 1}, forced_off={word: 1 << 12},
                      forced_on={word: 1},
                      reasons={(1, 0, "ecx", 12): "forced to host value (0)",
                               (1, 0, "ecx", 0): "forced to host value (1)"})  # fmt: skip
    guest = _table(leaf1_ecx=1 << 12 | 1)
    verdict = compat(guest, Host(_table(leaf1_ecx=1 << 12), control=control))
    assert [(r.field, r.layer) for r in verdict.reasons] == [("fma", Layer.HOST)]
    assert any("pni" in n for n in verdict.notes)


def test_a_configuration_asks_for_what_the_host_lacks(data_dir: Path) -> None:
    """-cpu host,avx512f=on on a Broadwell-U dump: its <cpudata> has no
    CPUID.7.0:EBX[16], so AVX-512F is what does not fit."""
    host = load_dump(str(_path(data_dir, "Core-i7-5600U")))
    assert not _regs(_path(data_dir, "Core-i7-5600U"))[(7, 0)]["ebx"] >> 16 & 1
    verdict = judge_text("-cpu host,avx512f=on\n", "cfg", Host(host), FACTS)
    assert [(r.field, r.where, r.layer) for r in verdict.reasons] == [
        ("avx512f", "CPUID.07H.0:EBX[16]", Layer.KVM)]
    assert judge_text("-cpu host\n", "cfg", Host(host), FACTS).fits


def test_a_domain_that_asks_for_no_cpu_fits_with_a_note(data_dir: Path) -> None:
    host = Host(load_dump(str(_path(data_dir, "Core-i7-5600U"))))
    for xml in ("<domain type='kvm'><name>a</name></domain>",
                "<domain type='kvm'><name>a</name><cpu><topology sockets='1' cores='1' "
                "threads='1'/></cpu></domain>",
                "<domain type='qemu'><name>a</name><cpu mode='custom'><model>EPYC</model>"
                "</cpu></domain>"):  # fmt: skip
        verdict = judge_text(xml, "d.xml", host, NO_TOOLS)
        assert verdict.fits and len(verdict.notes) == 1


# --- the command ---------------------------------------------------------------------


def test_compat_command_exit_status_and_json(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = _path(data_dir, "Core-i7-5600U"), _path(data_dir, "Xeon-Gold-6148")
    assert main(["compat", str(old), "--host", str(new)]) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"fits: {new} can give {old}'s CPU")
    assert main(["compat", str(new), "--host", str(old), "--format", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["fits"] is False
    ebx7 = next(r for r in doc["registers"] if r["register"] == "CPUID.07H.0:EBX")
    assert not ebx7["fits"] and ebx7["rule"] == "subset"
    assert "avx512f" in {r["field"] for r in ebx7["reasons"]}
    assert all(r["layer"] in ("kvm", "qemu", "host") for r in doc["reasons"])


@pytest.mark.parametrize(("args", "error"), [
    (["/nonexistent.xml", "--host", "/nonexistent.json"], "/nonexistent.xml: cannot read"),
    (["-", "--host", "/nonexistent.json"], "/nonexistent.json: cannot read"),
])  # fmt: skip
def test_compat_bad_input_is_one_line_exit_2(args: list[str], error: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from kvmcpuid_virt.cli import main; "
         "sys.exit(main())", "compat", *args],
        input="<domain type='kvm'><cpu mode='custom'><model>qemu64</model></cpu></domain>",
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and error in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_compat_of_a_broken_domain_xml_is_exit_2(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.xml"
    bad.write_text("<domain type='kvm'><cpu mode='custom'><model>qemu64</model></cpu>")
    assert main(["compat", str(bad), "--host", str(_path(data_dir, "Core-i7-5600U"))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err


# --- this host ------------------------------------------------------------------------

# Features whose absence from KVM's table the live tests rely on, with their
# positions (AMD APM vol. 3 appendix E, CPUID Fn8000_0001_ECX): the first one
# this host's KVM lacks is used.
AMD_EXT_FEATURES = {"abm": 5, "sse4a": 6, "xop": 11, "fma4": 16, "tbm": 21}


def missing_on_this_host(kvm: Kvm) -> str:
    """A feature this host's KVM cannot give (abm where it cannot: the
    issue's example), read from the live KVM_GET_SUPPORTED_CPUID."""
    ecx = kvm.supported_cpuid().get(0x8000_0001, 0, "ecx")
    for name, bit in AMD_EXT_FEATURES.items():
        if not ecx >> bit & 1:
            return name
    pytest.skip("this host's KVM gives abm, sse4a, xop, fma4 and tbm")


def test_this_host_cannot_give_the_check_none_domain(
    kvm: Kvm, live_facts: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    feature = missing_on_this_host(kvm)
    dom = tmp_path / "dom.xml"
    dom.write_text(f"<domain type='kvm'><name>x</name><cpu mode='custom' check='none'>"
                   f"<model>qemu64</model><feature policy='require' name='{feature}'/></cpu>"
                   "</domain>")  # fmt: skip
    assert main(["compat", str(dom), "--format", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    reason = next(r for r in doc["reasons"] if r["field"] == feature)
    assert reason["layer"] == "kvm"
    assert reason["where"] == f"CPUID.80000001H.0:ECX[{AMD_EXT_FEATURES[feature]}]"


def test_a_configuration_is_not_held_to_the_leaves_qemu_sets(data_dir: Path) -> None:
    """QEMU's qemu64 raises the max extended leaf to its own xlevel and
    answers those leaves itself: on Broadwell-U (whose <cpudata> stops at a
    lower extended leaf) a qemu64 guest fits, while a dump that saw those
    leaves is held to them."""
    path = _path(data_dir, "Core-i7-5600U")
    host_top = _regs(path)[(0x8000_0000, 0)]["eax"]
    assert FACTS.qemu is not None
    assert FACTS.qemu.identity("qemu64").min_xlevel > host_top
    host = Host(load_dump(str(path)))
    verdict = judge_text("<domain type='kvm'><cpu mode='custom'><model>qemu64</model></cpu>"
                         "</domain>", "d.xml", host, FACTS)  # fmt: skip
    assert verdict.fits, verdict.render_table()
    ext = 'CPUID.80000000H.0:EAX'
    assert ext not in verdict.checked
    seen = compat(load_dump(str(path)), host)
    assert seen.checked[ext] == Rule.NO_GREATER


@pytest.mark.libvirt  # reads libvirt's cpu_map
def test_without_qemu_facts_a_model_is_read_as_qemu_runs_it_under_kvm(data_dir: Path) -> None:
    """Stale facts (no QEMU to ask): cpu_map's qemu64 lists svm, which QEMU
    turns off under KVM (its recorded expansion here has no svm); the
    verdict without QEMU facts is the one with them."""
    cpu_map_qemu64 = etree.parse(str(CPU_MAP / "x86_qemu64.xml")) if (
        CPU_MAP / "x86_qemu64.xml").exists() else None  # fmt: skip
    if cpu_map_qemu64 is None:
        pytest.skip("libvirt's cpu_map is not installed")
    model = next(m for m in cpu_map_qemu64.getroot().iter("model") if m.get("name") == "qemu64")
    assert "svm" in {f.get("name") for f in model.iter("feature")}
    assert FACTS.qemu is not None and "svm" not in FACTS.qemu.expansions["qemu64"]
    stale = dataclasses.replace(FACTS, qemu=None)
    for stem in ("Core-i7-5600U", "Xeon-Gold-6148", "EPYC-7601-32-Core"):
        host = Host(load_dump(str(_path(data_dir, stem))))
        for name in ("qemu64", "kvm64", "Nehalem", "Opteron_G3"):
            xml = f"<domain type='kvm'><cpu mode='custom'><model>{name}</model></cpu></domain>"
            fresh = {(r.field, r.layer) for r in judge_text(xml, "d", host, FACTS).reasons}
            assert {(r.field, r.layer) for r in judge_text(xml, "d", host, stale).reasons} == \
                fresh, (stem, name)  # fmt: skip


def test_compat_against_a_libvirt_host_model(
    libvirt_conn_uri: str, kvm: Kvm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--connect: the daemon's host-model CPU (its domain capabilities) as the
    host; a feature this host's KVM lacks is not in it either."""
    feature = missing_on_this_host(kvm)
    dom = tmp_path / "dom.xml"
    dom.write_text(f"<domain type='kvm'><name>x</name><cpu mode='custom' check='none'>"
                   f"<model>qemu64</model><feature policy='require' name='{feature}'/></cpu>"
                   "</domain>")  # fmt: skip
    assert main(["compat", str(dom), "--connect", libvirt_conn_uri, "--format", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["host"] == libvirt_conn_uri
    assert feature in {r["field"] for r in doc["reasons"]}
    # A host-model names no max leaves: only feature words are compared.
    assert {r["rule"] for r in doc["registers"]} == {"subset"}


def test_cached_facts_are_what_learn_cached(qemu_binary: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """toolfacts.cached reads learn.py's cache file, never QEMU: fresh
    after learn(), stale (with the reason, QEMU's part left out) in an empty
    cache, and QEMU is not started either way."""
    from kvmcpuid_virt.toolfacts import cached, learn

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    empty = cached.cached_facts(qemu_binary)
    assert empty.facts.qemu is None and empty.stale and "no cached QEMU facts" in empty.stale
    learned = learn.learn(qemu_binary)

    def no_qemu(*_a: object, **_k: object) -> None:
        raise AssertionError("cached_facts started QEMU")

    monkeypatch.setattr(learn, "converse", no_qemu)
    fresh = cached.cached_facts(qemu_binary)
    assert fresh.stale is None and fresh.facts.qemu == learned.qemu
    assert fresh.facts.cpu_map == learned.cpu_map


def test_cached_control_reads_what_hostcontrol_caches(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hostview.cached_control finds the host-control probe's cache file by
    its naming (probe/hostcontrol's), and reads forced bits from its reasons."""
    from kvmcpuid_virt import hostview
    from kvmcpuid_virt.probe import hostcontrol

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    table = load_dump(str(_path(data_dir, "EPYC-9334-32-Core"))).table
    assert hostview.cached_control(table) is None
    fp = hostcontrol.fingerprint(table)
    hc = hostcontrol.HostControl(
        fingerprint=fp, controlled={(1, 0, "ecx"): ~(1 << 12 | 1) & 0xFFFF_FFFF},
        reasons={(1, 0, "ecx", 12): f"{hostcontrol.FORCED} (0)",
                 (1, 0, "ecx", 0): f"{hostcontrol.FORCED} (1; KVM reports it unsupported)"},
    )  # fmt: skip
    path = hostcontrol._cache_path(fp, hostcontrol.cache_dir())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(hc.to_json())
    control = hostview.cached_control(table)
    assert control is not None
    assert control.uncontrolled == {(1, 0, "ecx"): 1 << 12 | 1}
    assert control.forced_off == {(1, 0, "ecx"): 1 << 12}
    assert control.forced_on == {(1, 0, "ecx"): 1}
