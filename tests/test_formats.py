"""Dump formats: round trips on real CPUs' dumps and the live table, readers
checked against independent sources (the `cpuid` tool's own output, the raw
XML attributes), and malformed input reported with file and line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from lxml import etree

from kvmcpuid_virt.cpuid.formats import FORMATS, Dump, Format, dumps, loads
from kvmcpuid_virt.cpuid.table import CpuidEntry, CpuidTable, EntryFlag
from kvmcpuid_virt.errors import DumpFormatError
from kvmcpuid_virt.fsutil import load_dump
from kvmcpuid_virt.kvm import Kvm
from tests.conftest import REPO, cpu_dump_paths

DUMPS = cpu_dump_paths()


@pytest.mark.parametrize("path", DUMPS, ids=lambda p: p.stem)
def test_cpudata_reader_matches_raw_attributes(path: Path) -> None:
    # Independent reading: the attributes straight from the file.
    raw = [
        tuple(int(el.get(k, "0"), 16) for k in ("eax_in", "ecx_in", "eax", "ebx", "ecx", "edx"))
        for el in etree.parse(str(path)).getroot().iter("cpuid")
    ]
    table = load_dump(str(path)).table
    assert [(e.function, e.index, *e.regs()) for e in table] == raw
    assert len(table) > 10


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("path", DUMPS, ids=lambda p: p.stem)
def test_round_trip_real_dumps(path: Path, fmt: Format) -> None:
    dump = load_dump(str(path))
    again = loads(dumps(dump, fmt), f"round-trip.{fmt}")
    assert again.table == dump.table


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_live_table_with_flags(kvm: Kvm, fmt: Format) -> None:
    dump = Dump(kvm.supported_cpuid(), "supported", {"kernel": "x"})
    again = loads(dumps(dump, fmt))
    if fmt == "json":
        assert again.table == dump.table
        assert again.host == dump.host and again.kind == "supported"
        return
    # Flag-less formats restore SIGNIFICANT_INDEX from the leaf number, which
    # KVM leaves off some all-zero indexed leaves; what CPUID answers survives.
    assert [(e.key, e.regs()) for e in again.table] == [(e.key, e.regs()) for e in dump.table]
    for e in dump.table:
        for sub in (e.index, e.index + 1):
            mine, theirs = again.table.lookup(e.function, sub), dump.table.lookup(e.function, sub)
            if any(e2.function == e.function and e2.index == sub for e2 in dump.table):
                assert mine is not None and theirs is not None
                assert mine.regs() == theirs.regs()


def test_json_is_versioned_with_hex_strings() -> None:
    dump = Dump(CpuidTable([CpuidEntry(7, 0, EntryFlag.SIGNIFICANT_INDEX, 1, 2, 3, 4)]))
    doc = json.loads(dumps(dump, "json"))
    assert doc["format"] == "kvmcpuid-dump" and doc["version"] == 2
    assert doc["entries"] == [
        {"function": "0x00000007", "index": "0x00", "flags": "0x1",
         "eax": "0x00000001", "ebx": "0x00000002", "ecx": "0x00000003", "edx": "0x00000004"}
    ]


@pytest.mark.skipif(shutil.which("cpuid") is None, reason="the `cpuid` tool is not installed")
def test_reads_real_cpuid_tool_output() -> None:
    text = subprocess.run(["cpuid", "-1r"], capture_output=True, text=True, check=True).stdout
    table = loads(text, "cpuid -1r").table
    leaf0 = table.lookup(0)
    assert leaf0 is not None
    vendor = b"".join(r.to_bytes(4, "little") for r in (leaf0.ebx, leaf0.edx, leaf0.ecx))
    cpuinfo = Path("/proc/cpuinfo").read_text()
    assert f"vendor_id\t: {vendor.decode()}" in cpuinfo
    # Our writer's text is what the tool prints, line for line.
    assert dumps(Dump(table, "cpu"), "cpuid").splitlines() == [
        line for line in text.splitlines() if line.strip()
    ]


def test_cpuid_text_reads_first_cpu_only() -> None:
    line = "   0x00000000 0x00: eax=0x0000000d ebx=0x756e6547 ecx=0x6c65746e edx=0x49656e69"
    other = line.replace("0x0000000d", "0x00000001")
    table = loads(f"CPU 0:\n{line}\nCPU 1:\n{other}\n").table
    assert len(table) == 1 and table.entries[0].eax == 0xD


def _cpu_blocks(text: str) -> list[list[tuple[int, ...]]]:
    """`cpuid -r` output cut at its `CPU N:` headers, each line read with
    split() and int(): independent of the reader under test."""
    blocks: list[list[tuple[int, ...]]] = []
    for line in text.splitlines():
        if line.startswith("CPU"):
            blocks.append([])
        elif line.strip():
            words = line.replace(":", " ").replace("=", " ").split()
            blocks[-1].append(tuple(int(w, 16) for w in words if w.startswith("0x")))
    return blocks


@pytest.mark.skipif(shutil.which("cpuid") is None, reason="the `cpuid` tool is not installed")
def test_reads_real_multi_cpu_cpuid_output() -> None:
    # `cpuid -r` (no -1) prints one block per CPU; CPUs differ in their APIC
    # IDs, so each block is a valid table and the first one is read.
    text = subprocess.run(["cpuid", "-r"], capture_output=True, text=True, check=True).stdout
    blocks = _cpu_blocks(text)
    if len(blocks) < 2:
        pytest.skip("this machine has one CPU: `cpuid -r` prints one block")
    table = loads(text, "cpuid -r").table
    assert [(e.function, e.index, *e.regs()) for e in table] == blocks[0]
    # Every block is a table of its own (the reader checked them all).
    chunks = text.split("CPU ")[1:]
    assert len(chunks) == len(blocks)
    for chunk, block in zip(chunks, blocks, strict=True):
        one = loads("CPU " + chunk, "one CPU").table
        assert [(e.function, e.index, *e.regs()) for e in one] == block


def test_flag_less_formats_index_a_leaf_listed_at_a_subleaf() -> None:
    # Leaf 0x27 is not in INDEXED_LEAVES; a file that lists it at subleaf 1
    # read that subleaf on purpose, so subleaf 2 must not answer with it.
    text = ("CPU:\n   0x00000000 0x00: eax=0x00000027 ebx=0x756e6547 ecx=0x6c65746e "
            "edx=0x49656e69\n   0x00000027 0x00: eax=0x1 ebx=0x0 ecx=0x0 edx=0x0\n"
            "   0x00000027 0x01: eax=0x2 ebx=0x0 ecx=0x0 edx=0x0\n")  # fmt: skip
    table = loads(text, "new-leaf.txt").table
    assert table.get(0x27, 1, "eax") == 2
    assert table.lookup(0x27, 2) is None
    assert all(e.indexed for e in table if e.function == 0x27)
    # A leaf listed once at subleaf 0 answers every subleaf, as before.
    assert table.lookup(0, 5) is not None


def test_identical_entries_twice_are_refused_but_stateful_runs_are_not() -> None:
    leaf0 = {"function": "0x0", "eax": "0x2", "ebx": "0x756e6547", "ecx": "0x6c65746e",
             "edx": "0x49656e69"}  # fmt: skip
    leaf2 = {"function": "0x2", "flags": "0x2", "eax": "0x1"}
    run = [dict(leaf2, flags="0x6"), leaf2]  # KVM's old leaf 2: STATEFUL_FUNC, READ_NEXT first
    doc = {"format": "kvmcpuid-dump", "version": 1, "entries": [leaf0, *run]}
    assert len(loads(json.dumps(doc), "stateful.json").table.stateful(2)) == 2
    plain = {"function": "0x2", "eax": "0x1"}
    doc["entries"] = [leaf0, plain, plain]
    with pytest.raises(DumpFormatError, match="listed again, with the same values"):
        loads(json.dumps(doc), "twice.json")


def test_emulated_dump_needs_no_vendor() -> None:
    # KVM_GET_EMULATED_CPUID's leaf 0 has only the max leaf (eax=7, measured
    # on this project's hosts): the one kind without a vendor string.
    entries = [{"function": "0x0", "eax": "0x7"}, {"function": "0x1", "ecx": "0x400000"}]
    doc = {"format": "kvmcpuid-dump", "version": 1, "kind": "emulated", "entries": entries}
    assert loads(json.dumps(doc), "emulated.json").kind == "emulated"
    doc["kind"] = "supported"
    with pytest.raises(DumpFormatError, match="leaf 0 has no vendor string"):
        loads(json.dumps(doc), "supported.json")


def test_byte_order_mark_is_ignored() -> None:
    text = "\ufeffCPU:\n   0x00000000 0x00: eax=0x0 ebx=0x756e6547 ecx=0x6c65746e edx=0x49656e69\n"
    assert len(loads(text, "bom.txt").table) == 1


BAD = [
    ("json", '{"format": "kvmcpuid-dump", "version": 1,\n "entries": [\n'
     '  {"function": "0x1", "eax": "0x100000000"}]}', 3, "does not fit 32 bits"),
    ("json", '{"format": "kvmcpuid-dump", "version": 1, "entries": [\n'
     '  {"function": "0x1"},\n  {"function": "zz"}]}', 3, "expected a hex string"),
    ("json", '{"format": "kvmcpuid-dump",\n "version": 1, "entries": [}', 2, "not valid JSON"),
    ("json", '{"format": "kvmcpuid-dump", "version": 9, "entries": []}', None, "version 9"),
    ("json", '{"return": {"model": {}}}', None, "QMP reply"),
    ("json", '{"format": "kvmcpuid-dump", "version": 1, "entries": [\n'
     ' {"function": "0x1", "flags": "0x8"}]}', 2, "unknown bits"),
    ("cpudata", "<cpudata arch='x86'>\n<cpuid eax_in='0x1' eax='0x1'/>\n"
     "<cpuid eax_in='0x2' eax='-1'/>\n</cpudata>", 3, "expected a hex string"),
    ("cpudata", "<cpudata arch='x86'>\n<cpuid ecx_in='0x1'/>\n</cpudata>", 2, "lacks eax_in"),
    ("cpudata", "<cpudata arch='x86'>\n<cpuid eax_in='0x1'>\n</cpudata>", 3, "malformed XML"),
    ("cpudata", "<cpudata arch='arm'/>", 1, "not x86"),
    ("cpudata", "<!DOCTYPE x [<!ENTITY e SYSTEM 'file:///etc/passwd'>]>\n"
      "<cpudata><cpuid eax_in='&e;'/></cpudata>", 2, "malformed XML"),
    ("cpuid", "CPU:\n   0x00000000 0x00: eax=0x0 ebx=0x0 ecx=0x0 edx=0x0\n   garbage\n", 3,
     "expected"),
    ("cpuid", "", None, "no CPUID lines"),
    ("json", '{"format": "kvmcpuid-dump", "version": 1, "entries": []}', None, "no entries"),
    ("json", '{"format": "kvmcpuid-dump", "version": 1, "entries": [\n'
     ' {"function": "0x1"}]}', None, "no leaf 0"),
    ("json", '{"format": "kvmcpuid-dump", "version": 1, "entries": [\n'
     ' {"function": "0x0", "eax": "0x1", "ebx": "0x1"},\n {"function": "0x1", "eax": "0x1"},\n'
     ' {"function": "0x1", "eax": "0x2"}]}', 4, "entry 2: leaf 0x1 subleaf 0x0 listed again"),
    ("json", '{"format": "kvmcpuid-dump", "version": 1, "entries": [\n'
     ' {"function": "0x0", "eax": "0x1", "ebx": "0x1", "eax": "0x2"}]}', 2,
     "entry 0: key 'eax' given twice"),
    ("json", '{"format": "kvmcpuid-dump", "version": 1, "entries": [\n'
     ' {"function": "0x0", "eax": "0x1", "ebx": "0x1"},\n {"function": "0x5"}]}', 3,
     "entry 1: leaf 0x5 is beyond the max basic leaf 0x1 (leaf 0 EAX, entry 0 at line 2)"),
    ("json", '{"format": "kvmcpuid-dump", "version": true, "entries": []}', None,
     "dump version True"),
    ("json", '{"format": "kvmcpuid-dump", "version": 1, "entries": [], "Entries": []}', None,
     "unknown keys ['Entries']"),
    ("json", '{"format": "kvmcpuid-dump", "version": 1, "entries": [\n'
     ' {"function": "0x0", "eax": "0x1", "ebx": "0x1"},\n'
     ' {"function": "0x80000001"}]}', 3, "entry 1: leaf 0x80000001 without leaf 0x80000000"),
    ("cpudata", "<cpudata arch='x86'>\n<cpuid eax_in='0x0' eax='0x1' ebx='0x1'/>\n"
     "<cpuid eax_in='0x1' eax='0x1'/>\n<cpuid eax_in='0x1' eax='0x1'/>\n</cpudata>", 4,
     "leaf 0x1 subleaf 0x0 listed again, with the same values as at line 3"),
    ("cpudata", "<cpudata arch='x86'>\n<cpuid eax_in='0x0' eax='0x1' ebx='0x1' edx_in='0x1'/>"
     "\n</cpudata>", 2, "<cpuid> has unknown attribute 'edx_in'"),
    ("cpudata", "<cpudata arch='x86'>\n<cpuid eax_in='0x0' ebx='0x1'>0x1</cpuid>\n</cpudata>",
     2, "<cpuid> has content"),
    ("cpuid", "CPU:\n   0x00000000 0x00: eax=0x1 ebx=0x1 ecx=0x0 edx=0x0\n"
     "   0x00000000 0x00: eax=0x1 ebx=0x1 ecx=0x0 edx=0x0\n", 3, "listed again"),
    ("cpuid", "CPU 0:\n   0x00000000 0x00: eax=0x1 ebx=0x1 ecx=0x0 edx=0x0\n"
     "CPU 0:\n   0x00000000 0x00: eax=0x1 ebx=0x1 ecx=0x0 edx=0x0\n", 3,
     "a second 'CPU 0:' block (the first at line 1)"),
    ("cpuid", "   0x00000000 0x00: eax=0x1 ebx=0x1 ecx=0x0 edx=0x0\n"
     "CPU 1:\n   0x00000000 0x00: eax=0x1 ebx=0x1 ecx=0x0 edx=0x0\n", 2,
     "a 'CPU' header after lines without one"),
    ("cpuid", "CPU:\n   0x00000000 0x00: eax=0x1 ebx=0x1 ecx=0x0 edx=0x0\n"
     "CPU 1:\n   0x00000000 0x00: eax=0x1 ebx=0x1 ecx=0x0 edx=0x0\n", 3,
     "'CPU:' and 'CPU N:' headers mixed"),
    ("cpuid", "CPU:\n   0x00000000 0x00: eax=0x1\u3000ebx=0x1 ecx=0x0 edx=0x0\n", 2,
     "expected '0xLEAF"),
    ("cpuid", "CPU:\n   0x00000000 0x00: eax=0x1 ebx=0x0 ecx=0x0 edx=0x0\n", 2,
     "leaf 0 has no vendor string"),
]


@pytest.mark.parametrize(("kind", "text", "line", "message"), BAD)
def test_malformed_input_names_file_and_line(
    kind: str, text: str, line: int | None, message: str
) -> None:
    with pytest.raises(DumpFormatError) as info:
        loads(text, f"bad.{kind}")
    assert info.value.line == line
    assert message in str(info.value)
    assert str(info.value).startswith(f"bad.{kind}" + (f":{line}" if line else ""))
    assert "\n" not in str(info.value)


def test_cli_dump_round_trips_and_writes_atomically(kvm: Kvm, tmp_path: Path) -> None:
    out = tmp_path / "host.json"
    for fmt in FORMATS:
        r = subprocess.run(
            [sys.executable, "-m", "kvmcpuid_virt.cli", "dump", "--format", fmt, "-o", str(out)],
            capture_output=True, text=True, cwd=REPO,
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout == ""
        loaded = load_dump(str(out))
        assert loaded.table.lookup(0) is not None
        assert sorted(p.name for p in tmp_path.iterdir()) == ["host.json"]  # no temp left


def test_cli_bad_input_is_one_line_error(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "kvmcpuid_virt.cli", "dump", "-o", str(tmp_path / "no" / "x")],
        capture_output=True, text=True, cwd=REPO,
    )
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize("text", ["+1", "0x_1", "0x", "", "0x\u0661", "1 ", "0x1g", "-0x1"])
def test_hex_fields_are_strict(text: str) -> None:
    # int(x, 16) alone would take signs, underscores and non-ASCII digits.
    doc = {"format": "kvmcpuid-dump", "version": 1, "entries": [{"function": text}]}
    with pytest.raises(DumpFormatError, match="expected a hex string"):
        loads(json.dumps(doc), "strict.json")


DEEP_JSON = '{"a": ' + "[" * 100_000


def test_json_nested_too_deeply_is_a_dump_error() -> None:
    # json's decoder recurses per bracket: a RecursionError, not a format error.
    with pytest.raises(DumpFormatError) as info:
        loads(DEEP_JSON, "deep.json")
    assert str(info.value) == "deep.json: JSON nested too deeply"


def test_cli_json_nested_too_deeply_is_one_line_error(tmp_path: Path) -> None:
    f = tmp_path / "deep.json"
    f.write_text(DEEP_JSON)
    r = subprocess.run(
        [sys.executable, "-m", "kvmcpuid_virt.cli", "features", "--from", str(f)],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr == f"kvmcpuid: {f}: JSON nested too deeply\n"


@pytest.mark.parametrize(
    "text",
    [
        "<cpudata arch='x86'><cpuid eax_in='0x" + "1" * 100_000 + "'/></cpudata>",
        "<cpudata arch='x86'><cpuid eax_in='" + "z" * 100_000 + "'/></cpudata>",
        json.dumps({"format": "kvmcpuid-dump", "version": 1,
                    "entries": [{"function": "0x1", "eax": "q" * 100_000}]}),
        json.dumps({"format": "kvmcpuid-dump", "version": 1,
                    "entries": [{"function": 10 ** 1000}]}),
    ],
    ids=["long-hex", "long-garbage", "long-json-register", "huge-json-int"],
)  # fmt: skip
def test_bad_hex_values_are_cut_in_messages(text: str) -> None:
    # A hostile dump must not turn a one-line error into a 100 kB one.
    with pytest.raises(DumpFormatError) as info:
        loads(text, "long")
    message = str(info.value)
    assert len(message) < 150, message
    assert "..." in message


def test_short_bad_hex_values_are_shown_whole() -> None:
    with pytest.raises(DumpFormatError, match=r"got 'xyz'$"):
        loads("<cpudata arch='x86'><cpuid eax_in='xyz'/></cpudata>", "short")


def test_load_read_errors_stay_dump_errors(tmp_path: Path) -> None:
    # Callers (features, diff, baseline, --from) catch DumpFormatError.
    missing = tmp_path / "missing.json"
    with pytest.raises(DumpFormatError) as info:
        load_dump(str(missing))
    assert str(info.value) == f"{missing}: cannot read: No such file or directory"
    assert info.value.source == str(missing) and info.value.line is None
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"CPU:\n# caf\xe9\n")
    with pytest.raises(DumpFormatError, match=r"latin1\.txt: not UTF-8 text") as info2:
        load_dump(str(latin1))
    assert info2.value.source == str(latin1)


def test_load_dump_caps_what_it_reads(tmp_path: Path) -> None:
    from kvmcpuid_virt.fsutil import MAX_INPUT_BYTES

    big = tmp_path / "big.json"
    big.write_bytes(b" " * (MAX_INPUT_BYTES + 1))
    with pytest.raises(DumpFormatError) as info:
        load_dump(str(big))
    assert str(info.value) == (f"{big}: larger than 16 MiB; refusing (dumps and XML inputs "
                               "are far smaller)")  # fmt: skip


def test_xml_errors_are_one_line() -> None:
    # libxml2's messages end in a newline mid-text ("...range\n, line 1").
    with pytest.raises(DumpFormatError) as info:
        loads("<cpudata>\x00</cpudata>", "nul.xml")
    assert "\n" not in str(info.value) and str(info.value).startswith("nul.xml:1: malformed XML")


def test_baseline_json_with_its_notes_reads_back(tmp_path: Path) -> None:
    # `kvmcpuid baseline --format json` adds a "notes" list to the dump: the
    # reader knows that key (and refuses any other it does not know).
    if len(DUMPS) < 2:
        pytest.skip("fewer than two real CPU dumps")
    out = tmp_path / "baseline.json"
    amd = [str(p) for p in DUMPS if "EPYC" in p.name or "Ryzen" in p.name]
    if len(amd) < 2:
        pytest.skip("fewer than two AMD dumps")
    r = subprocess.run([sys.executable, "-m", "kvmcpuid_virt.cli", "baseline", "--format",
                        "json", "-o", str(out), *amd], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["notes"]
    assert load_dump(str(out)).table.lookup(0) is not None
    doc = json.loads(out.read_text())
    doc["notes"] = "one string"
    with pytest.raises(DumpFormatError, match="'notes' must be a list of strings"):
        loads(json.dumps(doc), "notes.json")
