"""`baseline --format firecracker`: Firecracker custom CPU templates.

Checked against Firecracker's published format, written out here as rules
(not copied): docs/cpu_templates/schema.json and cpu-templates.md of the
firecracker repository, and the serde definitions the schema describes
(src/vmm/src/cpu_config/x86_64/custom_cpu_template.rs: unknown top-level
keys are refused; leaf, subleaf, flags, modifiers, register, bitmap, addr
have no defaults). The bitmaps are applied here as Firecracker documents
(cpu-templates.md: `0` clears, `1` sets, `x` leaves; the leftmost
character is the most significant bit; `_` separates; a short bitmap is
padded with `x` on the left; a modifier for an entry the host's KVM does not
list is an error, CpuConfiguration::apply_template) to each real host's
table, and what the guest then sees must be the baseline's features. Bit
positions are also checked against the Intel SDM / AMD APM on the raw
<cpudata>, read here with lxml, independent of the registry.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from kvmcpuid_virt.adapters.firecracker import bitmap, render, template
from kvmcpuid_virt.analysis.baseline import baseline
from kvmcpuid_virt.cpuid import fields
from kvmcpuid_virt.cpuid.features import FeatureKind, registry
from kvmcpuid_virt.cpuid.formats import Dump
from kvmcpuid_virt.cpuid.table import CpuidTable
from kvmcpuid_virt.fsutil import load_dump

# --- Firecracker's format, as rules ------------------------------------------

# schema.json: "leaf"/"subleaf"/"addr": "a string containing an integer";
# Firecracker's reader takes 0x / 0b / decimal (templates_serde.rs).
_INT_STR = re.compile(r"(0x[0-9a-fA-F]+|0b[01]+|[0-9]+)\Z")
# schema.json: bitmap "Must be in format `0b[01x]{32}`" ({64} for MSRs);
# cpu-templates.md allows `_` separators and shorter (contracted) bitmaps.
_BITMAP = {32: re.compile(r"0b[01x_]{1,}\Z"), 64: re.compile(r"0b[01x_]{1,}\Z")}
_REGISTERS = ("eax", "ebx", "ecx", "edx")  # schema.json's enum
# custom_cpu_template.rs: CustomCpuTemplate is deny_unknown_fields; x86
# templates have cpuid_modifiers, msr_modifiers (and kvm_capabilities in
# newer releases).
_TOP_KEYS = {"cpuid_modifiers", "msr_modifiers", "kvm_capabilities"}


def schema_problems(doc: Any) -> list[str]:
    """Every way `doc` breaks Firecracker's custom-template rules."""
    out: list[str] = []
    if not isinstance(doc, dict):
        return ["not an object"]
    out += [f"unknown key {k!r}" for k in doc if k not in _TOP_KEYS]
    for i, m in enumerate(doc.get("cpuid_modifiers", [])):
        where = f"cpuid_modifiers[{i}]"
        if not isinstance(m, dict) or set(m) != {"leaf", "subleaf", "flags", "modifiers"}:
            out.append(f"{where}: keys {sorted(m) if isinstance(m, dict) else m!r}")
            continue
        for k in ("leaf", "subleaf"):
            if not isinstance(m[k], str) or not _INT_STR.match(m[k]):
                out.append(f"{where}.{k}: {m[k]!r} is not a string holding an integer")
        if not isinstance(m["flags"], int) or isinstance(m["flags"], bool):
            out.append(f"{where}.flags: {m['flags']!r} is not an integer")
        if not isinstance(m["modifiers"], list):
            out.append(f"{where}.modifiers is not an array")
            continue
        for j, r in enumerate(m["modifiers"]):
            if not isinstance(r, dict) or set(r) != {"register", "bitmap"}:
                out.append(f"{where}.modifiers[{j}]: keys {r!r}")
                continue
            if r["register"] not in _REGISTERS:
                out.append(f"{where}.modifiers[{j}].register {r['register']!r}")
            if not isinstance(r["bitmap"], str) or not _bitmap_ok(r["bitmap"], 32):
                out.append(f"{where}.modifiers[{j}].bitmap {r['bitmap']!r}")
    for i, m in enumerate(doc.get("msr_modifiers", [])):
        where = f"msr_modifiers[{i}]"
        if not isinstance(m, dict) or set(m) != {"addr", "bitmap"}:
            out.append(f"{where}: keys {m!r}")
            continue
        if not isinstance(m["addr"], str) or not _INT_STR.match(m["addr"]):
            out.append(f"{where}.addr {m['addr']!r}")
        if not isinstance(m["bitmap"], str) or not _bitmap_ok(m["bitmap"], 64):
            out.append(f"{where}.bitmap {m['bitmap']!r}")
    return out


def _bitmap_ok(text: str, width: int) -> bool:
    return bool(_BITMAP[width].match(text)) and len(text[2:].replace("_", "")) <= width


def parse_bitmap(text: str, width: int) -> tuple[int, int]:
    """(mask of bits the bitmap decides, their values), per cpu-templates.md."""
    body = text[2:].replace("_", "").rjust(width, "x")
    care = value = 0
    for i, ch in enumerate(body):
        bit = width - 1 - i
        if ch != "x":
            care |= 1 << bit
            value |= (ch == "1") << bit
    return care, value


class NotSupported(Exception):
    """Firecracker's CpuidFeatureNotSupported: a modifier for an entry KVM
    does not list."""


def apply(doc: Mapping[str, Any], host: CpuidTable) -> CpuidTable:
    """The host's table after Firecracker applies the template."""
    out = host
    for m in doc["cpuid_modifiers"]:
        leaf, subleaf = int(m["leaf"], 0), int(m["subleaf"], 0)
        entry = host.lookup(leaf, subleaf)
        limits = fields.leaf_limits(host)
        if entry is None or not fields.in_range(leaf, limits, strict=True):
            raise NotSupported(f"{leaf:#x}.{subleaf:#x}")
        changes = {}
        for r in m["modifiers"]:
            care, value = parse_bitmap(r["bitmap"], 32)
            changes[r["register"]] = entry.reg(r["register"]) & ~care | value
        out = out.replace_entry(out.lookup(leaf, subleaf).replace(**changes))  # type: ignore[union-attr]
    if fields.vendor(host) == "AuthenticAMD":
        # cpuid-normalization.md: on AMD, the largest extended function
        # becomes 0x8000001f after the template.
        top = out.lookup(0x80000000, 0)
        assert top is not None
        out = out.replace_entry(top.replace(eax=0x8000001F))
    return out


# --- what a guest sees ---------------------------------------------------------

# Positions the template leaves to Firecracker's normalization
# (cpuid-normalization.md) or to the guest's CR4 (Intel SDM vol. 2A, CPUID:
# OSXSAVE 01H ECX[27], OSPKE 07H ECX[4]): (leaf, subleaf, register, bit).
NOT_THE_TEMPLATES = {
    (0x1, 0, "ecx", 15), (0x1, 0, "ecx", 24), (0x1, 0, "ecx", 31), (0x1, 0, "edx", 28),
    (0x1, 0, "ecx", 27), (0x7, 0, "ecx", 4),
}
AMD_NORMALIZED = {(0x7, 0, "edx", 29), (0x80000001, 0, "ecx", 22)}


def guest_sees(table: CpuidTable) -> set[str]:
    """Named features a guest reading `table` finds: within the max leaf of
    the range, and for leaf 7 within its max subleaf (07H.0 EAX)."""
    limits = fields.leaf_limits(table)
    max7 = table.get(0x7, 0, "eax")
    return {f.name for f in registry().features
            if fields.in_range(f.leaf, limits, strict=True)
            and not (f.leaf == 0x7 and f.subleaf > max7) and f.present(table)}  # fmt: skip


def _path(data_dir: Path, stem: str) -> Path:
    p = data_dir / f"x86_64-cpuid-{stem}.xml"
    if not p.exists():
        pytest.skip(f"no CPU dump {p.name}")
    return p


GROUPS = {
    "intel-broadwell-skylake-icelake": ["Core-i7-5600U", "Xeon-Gold-6148", "Ice-Lake-Server"],
    "intel-atom-skylake": ["Atom-P5362", "Xeon-Gold-6148"],
    "amd-zen1-zen2-zen4": ["EPYC-7601-32-Core", "Ryzen-9-3900X-12-Core", "EPYC-9334-32-Core"],
    "intel-icelake-alone": ["Ice-Lake-Server"],
    "amd-zen4-alone": ["EPYC-9334-32-Core"],
    "mixed-skylake-zen2": ["Xeon-Gold-6148", "Ryzen-9-3900X-12-Core"],
}


def _inputs(data_dir: Path, stems: list[str]) -> list[Dump]:
    return [load_dump(str(_path(data_dir, s))) for s in stems]


@pytest.mark.parametrize("group", list(GROUPS))
def test_template_follows_firecrackers_rules(data_dir: Path, group: str) -> None:
    inputs = _inputs(data_dir, GROUPS[group])
    b = baseline(inputs, allow_mixed_vendors=True)
    text, _ = render(b.table, inputs)
    doc = json.loads(text)
    assert schema_problems(doc) == []
    assert doc["cpuid_modifiers"], "a template that sets nothing"
    for m in doc["cpuid_modifiers"]:
        for r in m["modifiers"]:
            # The template writes full-width bitmaps: nothing left implied.
            assert re.fullmatch(r"0b[01x]{32}", r["bitmap"]), r


def test_rules_catch_what_firecracker_refuses() -> None:
    # The checker above is not vacuous: each of these breaks one rule.
    good = {"leaf": "0x1", "subleaf": "0x0", "flags": 0,
            "modifiers": [{"register": "ecx", "bitmap": "0b" + "x" * 32}]}  # fmt: skip
    assert schema_problems({"cpuid_modifiers": [good], "msr_modifiers": []}) == []
    bad_docs: list[Any] = [
        {"cpuid_modifiers": [good], "notes": []},
        {"cpuid_modifiers": [{**good, "leaf": 1}]},
        {"cpuid_modifiers": [{**good, "flags": "0"}]},
        {"cpuid_modifiers": [{**good, "modifiers": [{"register": "esi", "bitmap": "0b1"}]}]},
        {"cpuid_modifiers": [{**good, "modifiers": [{"register": "eax", "bitmap": "0b2"}]}]},
        {"cpuid_modifiers": [{**good, "modifiers": [{"register": "eax",
                                                     "bitmap": "0b" + "1" * 33}]}]},
        {"msr_modifiers": [{"addr": "0x10a", "bitmap": "0b" + "0" * 65}]},
        {"msr_modifiers": [{"addr": "ten", "bitmap": "0b0"}]},
    ]
    for bad in bad_docs:
        assert schema_problems(bad), bad


def test_bitmap_reads_as_firecracker_documents_it() -> None:
    # cpu-templates.md's own example: 0bxxxx000000000011xx00011011110010
    # clears 0b00001111111111000011100100001101, sets 0b00000000000000110000011011110010
    # and leaves 0b11110000000000001100000000000000.
    care, value = parse_bitmap("0bxxxx000000000011xx00011011110010", 32)
    assert ~care & 0xFFFF_FFFF == 0b11110000000000001100000000000000
    assert value == 0b00000000000000110000011011110010
    assert care & ~value == 0b00001111111111000011100100001101
    # The renderer's bitmap() reads back the same way.
    assert parse_bitmap(bitmap(value, care), 32) == (care, value)
    assert parse_bitmap("0b1_01", 32) == (0b111, 0b101)  # contracted, separated


@pytest.mark.parametrize("group", list(GROUPS))
def test_applied_to_every_host_the_guest_sees_the_baseline(data_dir: Path, group: str) -> None:
    inputs = _inputs(data_dir, GROUPS[group])
    b = baseline(inputs, allow_mixed_vendors=True)
    t = template(b.table, inputs)
    want = guest_sees(b.table)
    amd = any(fields.vendor(d.table) == "AuthenticAMD" for d in inputs)
    free = {f.name for f in registry().features
            if (f.leaf, f.subleaf, f.reg, f.bit) in NOT_THE_TEMPLATES
            or (amd and (f.leaf, f.subleaf, f.reg, f.bit) in AMD_NORMALIZED)}  # fmt: skip
    # Features in an entry some host lacks (the template may not touch it
    # there): each is named in a note.
    noted = {name.strip() for n in t.notes if "stays as each host has it" in n
             for name in n.rsplit(": ", 1)[1].split(",")}  # fmt: skip
    for d in inputs:
        seen = guest_sees(apply(t.doc, d.table))
        wrong = (seen ^ want) - free - noted
        assert not wrong, f"{d.source}: {sorted(wrong)}"
    if len(inputs) > 1:
        # Not vacuous: some host alone would give the guest something else.
        assert any((guest_sees(d.table) ^ want) - free - noted for d in inputs)


def test_each_feature_bit_off_in_the_baseline_is_cleared(data_dir: Path) -> None:
    inputs = _inputs(data_dir, GROUPS["intel-broadwell-skylake-icelake"])
    b = baseline(inputs)
    t = template(b.table, inputs)
    newest = guest_sees(inputs[-1].table)
    cleared = newest - guest_sees(apply(t.doc, inputs[-1].table))
    # Ice Lake-SP has AVX-512 (Intel SDM: CPUID.07H.0:EBX[16]); Broadwell-U
    # has not: the template must take it away from the Ice Lake host.
    assert "avx512f" in cleared
    assert not cleared & guest_sees(b.table)


# --- bit positions from the SDM / APM, on the raw dumps -------------------------

def _raw(path: Path) -> dict[tuple[int, int], dict[str, int]]:
    return {(int(c.get("eax_in", "0"), 16), int(c.get("ecx_in", "0"), 16)):
            {r: int(c.get(r, "0"), 16) for r in _REGISTERS}
            for c in etree.parse(str(path)).getroot().iter("cpuid")}  # fmt: skip


# (leaf, subleaf, register, bit) as the manuals give them: Intel SDM vol. 2A,
# CPUID, Table 3-10 / 3-11 (leaf 1), Table 3-8 (leaf 7); AMD APM vol. 3,
# appendix E.4.2 (80000001H ECX).
SPEC_BITS = {
    "sse4.2": (0x1, 0, "ecx", 20),
    "avx": (0x1, 0, "ecx", 28),
    "avx2": (0x7, 0, "ebx", 5),
    "avx512f": (0x7, 0, "ebx", 16),
    "sha": (0x7, 0, "ebx", 29),
    "svm": (0x80000001, 0, "ecx", 2),
}


@pytest.mark.parametrize("group", [g for g in GROUPS if len(GROUPS[g]) > 1])
def test_bitmaps_at_the_manuals_positions(data_dir: Path, group: str) -> None:
    paths = [_path(data_dir, s) for s in GROUPS[group]]
    inputs = [load_dump(str(p)) for p in paths]
    doc = template(baseline(inputs, allow_mixed_vendors=True).table, inputs).doc
    raws = [_raw(p) for p in paths]
    seen = set()
    for name, (leaf, sub, reg, bit) in SPEC_BITS.items():
        every = all(r.get((leaf, sub), {}).get(reg, 0) >> bit & 1 for r in raws)
        mods = [m for m in doc["cpuid_modifiers"]
                if int(m["leaf"], 16) == leaf and int(m["subleaf"], 16) == sub]  # fmt: skip
        if not mods:
            continue  # an entry some host lacks
        (bm,) = [r["bitmap"] for r in mods[0]["modifiers"] if r["register"] == reg]
        char = bm[2:][31 - bit]
        assert char == ("1" if every else "0"), (name, bm)
        seen.add(char)
    assert seen, "no position checked"


def test_the_checked_positions_include_set_and_cleared_bits(data_dir: Path) -> None:
    # Over the groups, both 1 and 0 occur at the manuals' positions: the
    # check above is not one-sided.
    chars = set()
    for stems in GROUPS.values():
        inputs = _inputs(data_dir, stems)
        doc = template(baseline(inputs, allow_mixed_vendors=True).table, inputs).doc
        for leaf, sub, reg, bit in SPEC_BITS.values():
            for m in doc["cpuid_modifiers"]:
                if (int(m["leaf"], 16), int(m["subleaf"], 16)) == (leaf, sub):
                    for r in m["modifiers"]:
                        if r["register"] == reg:
                            chars.add(r["bitmap"][2:][31 - bit])
    assert chars == {"0", "1"}


def test_firecrackers_own_bits_and_cr4_bits_are_left_alone(data_dir: Path) -> None:
    inputs = _inputs(data_dir, GROUPS["amd-zen1-zen2-zen4"])
    doc = template(baseline(inputs).table, inputs).doc
    for leaf, sub, reg, bit in NOT_THE_TEMPLATES | AMD_NORMALIZED:
        for m in doc["cpuid_modifiers"]:
            if (int(m["leaf"], 16), int(m["subleaf"], 16)) == (leaf, sub):
                for r in m["modifiers"]:
                    if r["register"] == reg:
                        assert r["bitmap"][2:][31 - bit] == "x", (hex(leaf), reg, bit)


def test_dynamic_and_every_other_named_kind_decided(data_dir: Path) -> None:
    # Every named bit the template may decide is decided: unsettable ones
    # too (Firecracker sets any bit; only QEMU and libvirt lack names).
    inputs = _inputs(data_dir, GROUPS["intel-broadwell-skylake-icelake"])
    doc = template(baseline(inputs).table, inputs).doc
    decided = {}
    for m in doc["cpuid_modifiers"]:
        for r in m["modifiers"]:
            decided[(int(m["leaf"], 16), int(m["subleaf"], 16), r["register"])] = \
                parse_bitmap(r["bitmap"], 32)[0]
    for f in registry().features:
        care = decided.get((f.leaf, f.subleaf, f.reg))
        if care is None or (f.leaf, f.subleaf, f.reg, f.bit) in NOT_THE_TEMPLATES:
            continue
        assert bool(care & f.mask) == (f.kind is not FeatureKind.DYNAMIC), f.name


# --- the command --------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmcpuid_virt.cli", *args],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip


def test_cli_baseline_format_firecracker(data_dir: Path, tmp_path: Path) -> None:
    paths = [str(_path(data_dir, s)) for s in GROUPS["amd-zen1-zen2-zen4"]]
    out = tmp_path / "template.json"
    r = _cli("baseline", "--format", "firecracker", "-o", str(out), *paths)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert schema_problems(doc) == []
    assert "left to Firecracker" in r.stderr  # the notes go to stderr, not into the file
    inputs = [load_dump(p) for p in paths]
    assert doc == template(baseline(inputs).table, inputs).doc
    assert [p.name for p in tmp_path.iterdir()] == ["template.json"]  # no temporary left


def test_cli_firecracker_bad_input_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    r = _cli("baseline", "--format", "firecracker", str(bad))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_cli_firecracker_of_this_host_round_trips(kvm: object) -> None:
    # This host alone, live: the template applied to this host's own KVM
    # table gives what KVM lists (the baseline of one host is itself).
    from kvmcpuid_virt.kvm import Kvm

    r = _cli("baseline", "--this-host", "--format", "firecracker")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert schema_problems(doc) == []
    with Kvm() as k:
        table = k.supported_cpuid()
    # Firecracker's own normalization applies either way (an empty template).
    assert guest_sees(apply(doc, table)) == guest_sees(apply({"cpuid_modifiers": []}, table))
    assert guest_sees(apply(doc, table))


# --- feature MSRs ---------------------------------------------------------------

def _raw_msrs(path: Path) -> dict[int, int]:
    return {int(m.get("index", "0"), 16):
            int(m.get("edx", "0"), 16) << 32 | int(m.get("eax", "0"), 16)
            for m in etree.parse(str(path)).getroot().iter("msr")}  # fmt: skip


# IA32_ARCH_CAPABILITIES (10AH) bits as the Intel SDM vol. 4, table 2-2 gives
# them: 0 RDCL_NO, 1 IBRS_ALL, 3 SKIP_L1DFL_VMENTRY, 5 MDS_NO, 8 TAA_NO.
ARCH_CAPABILITIES_BITS = {"RDCL_NO": 0, "IBRS_ALL": 1, "SKIP_L1DFL_VMENTRY": 3, "MDS_NO": 5,
                          "TAA_NO": 8}  # fmt: skip


def test_msr_modifiers_give_every_host_the_common_arch_capabilities(data_dir: Path) -> None:
    paths = [_path(data_dir, s) for s in ("Atom-P5362", "Ice-Lake-Server")]
    inputs = [load_dump(str(p)) for p in paths]
    doc = template(baseline(inputs).table, inputs).doc
    assert schema_problems(doc) == []
    (m,) = [m for m in doc["msr_modifiers"] if int(m["addr"], 16) == 0x10A]
    care, value = parse_bitmap(m["bitmap"], 64)
    raws = [_raw_msrs(p)[0x10A] for p in paths]
    got = set()
    for name, bit in ARCH_CAPABILITIES_BITS.items():
        assert care >> bit & 1, name
        every = all(r >> bit & 1 for r in raws)
        assert value >> bit & 1 == every, name
        for r in raws:  # applied to each host's value, as Firecracker does
            assert (r & ~care | value) >> bit & 1 == every, name
        got.add(every)
    assert got == {True, False}


def test_no_arch_capabilities_modifier_where_firecracker_hides_the_msr(data_dir: Path) -> None:
    # On AMD Firecracker clears CPUID.07H.0:EDX[29], so IA32_ARCH_CAPABILITIES
    # is not there for a template to change.
    inputs = _inputs(data_dir, ["Atom-P5362", "EPYC-9334-32-Core"])
    doc = template(baseline(inputs, allow_mixed_vendors=True).table, inputs).doc
    assert all(int(m["addr"], 16) != 0x10A for m in doc["msr_modifiers"])


def test_no_msr_modifiers_without_values_from_every_host(data_dir: Path) -> None:
    inputs = _inputs(data_dir, ["Xeon-Gold-6148", "Ice-Lake-Server"])  # the first has no <msr>
    t = template(baseline(inputs).table, inputs)
    assert t.doc["msr_modifiers"] == []
    assert any("no feature-MSR values" in n for n in t.notes)


# --- purity ---------------------------------------------------------------------

_PURE_CHILD = r'''
import json, os, sys
texts = [open(p, encoding="utf-8").read() for p in sys.argv[2:]]
recording = json.load(open(sys.argv[1], encoding="utf-8"))
from kvmcpuid_virt.adapters import firecracker, kubevirt
from kvmcpuid_virt.analysis.baseline import baseline
from kvmcpuid_virt.cpuid import formats
from kvmcpuid_virt.toolfacts.facts import ToolFacts
PKG = os.path.dirname(os.path.abspath(__import__("kvmcpuid_virt").__file__))
MACHINE = ("subprocess", "socket", "ctypes", "fcntl", "mmap", "qemu", "libvirt",
           "kvmcpuid_virt.kvm", "kvmcpuid_virt.fsutil", "kvmcpuid_virt.toolfacts.learn")
seen = []
def hook(event, args):
    if event == "open":
        path = args[0]
        if isinstance(path, int) or os.path.abspath(str(path)).startswith(PKG + os.sep):
            return
        if str(path).endswith((".py", ".pyc", ".so")):
            return  # a module being loaded: judged by its import event
        seen.append(f"open {path}")
    elif event == "import" and any(args[0] == m or args[0].startswith(m + ".") for m in MACHINE):
        seen.append(f"import {args[0]}")
    elif event.split(".")[0] in ("subprocess", "socket", "fcntl", "mmap", "ctypes") or \
            event in ("os.system", "os.exec", "os.posix_spawn", "os.fork", "os.listdir"):
        seen.append(event)
facts = ToolFacts.from_json(recording)
dumps = [formats.loads(t, f"dump{i}") for i, t in enumerate(texts)]  # inputs, read first
sys.addaudithook(hook)
for group in ([d] for d in dumps):
    firecracker.render(baseline(group).table, group, ("avx2",))
    kubevirt.node_labels(group[0].table, facts).text()
print(json.dumps(seen))
'''


def test_exports_touch_no_machine(data_dir: Path) -> None:
    # Both exports are pure (docs/ARCHITECTURE.md): run on every real dump
    # under an audit hook (PEP 578) that records files, processes, sockets,
    # ioctls, mmaps and machine-facing imports. Inputs are read first.
    from tests.conftest import RECORDING, cpu_dump_paths

    paths = [str(p) for p in cpu_dump_paths()]
    r = subprocess.run([sys.executable, "-c", _PURE_CHILD, str(RECORDING), *paths],
                       capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []


@pytest.mark.qemu
@pytest.mark.libvirt
def test_cli_max_model_caps_the_template_at_the_models_features(data_dir: Path) -> None:
    # --max-model EPYC on Zen 2 and Zen 4: on each host, the guest sees no
    # named feature beyond libvirt's own x86_EPYC.xml (read here directly),
    # but for the bits left to Firecracker and the guest.
    model_file = Path("/usr/share/libvirt/cpu_map/x86_EPYC.xml")
    if not model_file.exists():
        pytest.skip("libvirt's cpu_map is not installed")
    model = {str(f.get("name")) for f in etree.parse(str(model_file)).getroot().iter("feature")}
    paths = [str(_path(data_dir, s)) for s in ("Ryzen-9-3900X-12-Core", "EPYC-9334-32-Core")]
    r = _cli("baseline", "--format", "firecracker", "--max-model", "EPYC", *paths)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert schema_problems(doc) == []
    reg = registry()
    free = {f.name for f in reg.features
            if (f.leaf, f.subleaf, f.reg, f.bit) in NOT_THE_TEMPLATES | AMD_NORMALIZED}
    for p in paths:
        seen = guest_sees(apply(doc, load_dump(p).table)) - free
        beyond = {n for n in seen if reg.lookup(n).libvirt not in model}
        assert not beyond, (p, sorted(beyond))
        assert len(seen) > 40  # the model's features stay
