"""Malformed and ambiguous input, end to end: every class gets one line on
stderr that names the file (and line or entry), exit status 2, no
traceback, nothing on stdout and, with -o, no output file.

Each case is run through the real command line (`python -m
kvmcpuid_virt.cli`): dumps through `features --from`, `qemu-flags --from`,
`diff` and `baseline -o`; configurations through `verify --libvirt-xml
--backend kvm` (which fails before it needs /dev/kvm), `verify --qemu-flags`
and `diff --from`. The reasons asserted are the ones each rule states
(cpuid/table.first_problem, the readers' docstrings), written here by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kvmcpuid_virt.fsutil import MAX_INPUT_BYTES
from tests.conftest import REPO, cpu_dump_paths

CLI = [sys.executable, "-m", "kvmcpuid_virt.cli"]
# Leaf 0 of an AMD CPU (max basic leaf 0xd, "AuthenticAMD"), as cpuid -1r prints it.
LEAF0 = "   0x00000000 0x00: eax=0x0000000d ebx=0x68747541 ecx=0x444d4163 edx=0x69746e65"
LEAF1 = "   0x00000001 0x00: eax=0x00a10f11 ebx=0x00020800 ecx=0x7ef8320b edx=0x178bfbff"
VENDOR = {"ebx": "0x68747541", "ecx": "0x444d4163", "edx": "0x69746e65"}


def _json(*entries: dict[str, str], **top: object) -> str:
    """A kvmcpuid-dump JSON text, one entry per line (as `kvmcpuid dump` writes)."""
    head = {"format": "kvmcpuid-dump", "version": 1, "kind": "supported", "host": {}, **top}
    lines = ["{"] + [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
    body = ",\n".join("    " + json.dumps(e) for e in entries)
    return "\n".join([*lines, '  "entries": [', body, "  ]", "}"]) + "\n"


def _leaf0(eax: str = "0xd") -> dict[str, str]:
    return {"function": "0x0", "index": "0x0", "flags": "0x0", "eax": eax, **VENDOR}


def _cpudata(*rows: str) -> str:
    return "<cpudata arch='x86'>\n" + "\n".join(rows) + "\n</cpudata>\n"


CPUDATA_LEAF0 = ("  <cpuid eax_in='0x00000000' ecx_in='0x00' eax='0x0000000d' ebx='0x68747541'"
                 " ecx='0x444d4163' edx='0x69746e65'/>")  # fmt: skip


def _deep_xml(depth: int) -> str:
    return "<cpudata arch='x86'>" + "<a>" * depth + "</a>" * depth + "</cpudata>"


# (id, file name, content, what the message must say)
DUMPS: list[tuple[str, str, str | bytes, str]] = [
    # --- empty, or without the leaves everything else depends on
    ("json-no-entries", "d.json", _json(), "no entries: a CPUID table needs at least leaf 0"),
    ("json-no-leaf-0", "d.json", _json({"function": "0x1", "eax": "0x1"}), "no leaf 0"),
    ("cpuid-no-leaf-0", "d.txt", "CPU:\n" + LEAF1 + "\n", "no leaf 0"),
    ("cpudata-empty", "d.xml", "<cpudata arch='x86'/>", "no entries"),
    ("no-vendor", "d.json", _json({"function": "0x0", "eax": "0xd"}), "no vendor string"),
    ("empty-cpu-block", "d.txt", "CPU 0:\nCPU 1:\n" + LEAF0 + "\n", "no entries"),
    # --- duplicate and conflicting entries
    ("json-dup-conflict", "d.json", _json(_leaf0(), {"function": "0x1", "eax": "0x1"},
                                          {"function": "0x1", "eax": "0x2"}),
     "d.json:9: entry 2: leaf 0x1 subleaf 0x0 listed again, with other values than at "
     "entry 1 at line 8"),
    ("json-dup-identical", "d.json", _json(_leaf0(), {"function": "0x1"}, {"function": "0x1"}),
     "listed again, with the same values as at entry 1"),
    ("cpudata-dup", "d.xml", _cpudata(CPUDATA_LEAF0, "<cpuid eax_in='0x1' eax='0x1'/>",
                                      "<cpuid eax_in='0x1' eax='0x2'/>"),
     "d.xml:4: leaf 0x1 subleaf 0x0 listed again, with other values than at line 3"),
    ("cpuid-dup", "d.txt", f"CPU:\n{LEAF0}\n{LEAF1}\n{LEAF1}\n",
     "d.txt:4: leaf 0x1 subleaf 0x0 listed again, with the same values as at line 3"),
    ("cpuid-two-runs", "d.txt", f"CPU:\n{LEAF0}\nCPU:\n{LEAF0}\n",
     "d.txt:3: a second 'CPU:' block (the first at line 1)"),
    ("cpuid-bad-second-cpu", "d.txt", f"CPU 0:\n{LEAF0}\nCPU 1:\n{LEAF0}\n   garbage\n",
     "d.txt:5: expected '0xLEAF 0xSUB"),
    ("json-key-twice", "d.json",
     _json(_leaf0()).replace('"eax": "0xd"', '"eax": "0xd", "eax": "0x1"'),
     "d.json:7: entry 0: key 'eax' given twice"),
    ("json-top-key-twice", "d.json", _json(_leaf0()).replace('"version": 1,', '"version": 1,'
                                                              ' "version": 1,'),
     "key 'version' given twice"),
    ("json-mixed-index-flags", "d.json",
     _json(_leaf0(), {"function": "0x7", "index": "0x0", "flags": "0x1"},
           {"function": "0x7", "index": "0x1", "flags": "0x0"}),
     "entry 2: leaf 0x7 subleaf 0x1 without SIGNIFICANT_INDEX"),
    ("json-mixed-leaf-flags", "d.json",
     _json(_leaf0(), {"function": "0x4", "flags": "0x0"},
           {"function": "0x4", "index": "0x1", "flags": "0x1"}),
     "entry 2: leaf 0x4: flags 0x1 here, 0x0 at entry 1 at line 8"),
    # --- values out of range for their field
    ("json-register-33-bits", "d.json", _json(_leaf0(), {"function": "0x1", "ecx": "0x1ffffffff"}),
     "entry 1: ecx: '0x1ffffffff' does not fit 32 bits"),
    ("cpudata-leaf-33-bits", "d.xml", _cpudata(CPUDATA_LEAF0, "<cpuid eax_in='0x100000000'/>"),
     "d.xml:3: eax_in: '0x100000000' does not fit 32 bits"),
    ("cpuid-subleaf-too-wide", "d.txt", f"CPU:\n{LEAF0}\n   0x00000007 0x100000000: eax=0x0 "
     "ebx=0x0 ecx=0x0 edx=0x0\n", "d.txt:3: expected '0xLEAF 0xSUB"),
    ("json-flags-unknown-bits", "d.json", _json(_leaf0(), {"function": "0x1", "flags": "0x8"}),
     "entry 1: flags 0x8 has unknown bits"),
    ("json-read-next-alone", "d.json", _json(_leaf0(), {"function": "0x2", "flags": "0x4"}),
     "STATE_READ_NEXT without STATEFUL_FUNC"),
    # --- entries beyond the table's own max leaf
    ("beyond-max-basic", "d.txt", f"CPU:\n{LEAF0}\n   0x00000014 0x00: eax=0x1 ebx=0x0 "
     "ecx=0x0 edx=0x0\n", "d.txt:3: leaf 0x14 is beyond the max basic leaf 0xd (leaf 0 EAX, "
     "line 2)"),
    ("beyond-max-extended", "d.json", _json(_leaf0(), {"function": "0x80000000",
                                                       "eax": "0x80000008"},
                                            {"function": "0x8000001f", "eax": "0x1"}),
     "entry 2: leaf 0x8000001f is beyond the max extended leaf 0x80000008"),
    ("extended-without-0x80000000", "d.xml",
     _cpudata(CPUDATA_LEAF0, "<cpuid eax_in='0x80000001' ecx='0x1'/>"),
     "d.xml:3: leaf 0x80000001 without leaf 0x80000000"),
    # --- wrong JSON types and keys
    ("json-version-bool", "d.json", _json(_leaf0(), version=True), "dump version True"),
    ("json-version-float", "d.json", _json(_leaf0(), version=1.0), "dump version 1.0"),
    ("json-kind-list", "d.json", _json(_leaf0(), kind=["cpu"]), "unknown kind ['cpu']"),
    ("json-host-number", "d.json", _json(_leaf0(), host={"kernel": 6}),
     "'host' must map strings to strings"),
    ("json-host-newline", "d.json", _json(_leaf0(), host={"kernel": "6.1\nevil"}),
     "host 'kernel': '6.1\\nevil' has a control or unprintable character"),
    ("json-host-surrogate", "d.json",
     _json(_leaf0(), host={"kernel": "x"}).replace('"kernel": "x"', '"kernel": "\\ud800"'),
     "unprintable character"),
    ("json-entries-object", "d.json", _json().replace('"entries": [\n\n  ]', '"entries": {}'),
     "'entries' must be a list"),
    ("json-register-float", "d.json", _json(_leaf0()).replace('"eax": "0xd"', '"eax": 13.0'),
     "entry 0: eax: expected a hex string like '0x1f', got 13.0"),
    ("json-unknown-top-key", "d.json", _json(_leaf0(), entrys=[]), "unknown keys ['entrys']"),
    ("json-unknown-entry-key", "d.json", _json({**_leaf0(), "Eax": "0x1"}),
     "entry 0: unknown keys ['Eax']"),
    ("json-long-number", "d.json", _json(_leaf0()).replace('"eax": "0xd"', '"eax": ' + "9" * 5000),
     "not valid JSON: a number too long to read"),
    # --- XML: unknown or namespaced parts, text, entities, several roots
    ("cpudata-unknown-attribute", "d.xml", _cpudata(CPUDATA_LEAF0.replace("ebx=", "EBX=")),
     "d.xml:2: <cpuid> has unknown attribute 'EBX'"),
    ("cpudata-root-attribute", "d.xml", _cpudata(CPUDATA_LEAF0).replace("arch='x86'",
                                                                       "arch='x86' mode='x'"),
     "d.xml:1: <cpudata> has unknown attribute 'mode'"),
    ("cpudata-namespaced", "d.xml",
     "<cpudata arch='x86' xmlns:x='urn:x'>\n" + CPUDATA_LEAF0 + "\n<x:cpuid eax_in='0x1'/>"
     "\n</cpudata>", "d.xml:3: unexpected element <{urn:x}cpuid>"),
    ("cpudata-text", "d.xml", _cpudata(CPUDATA_LEAF0, "0x1"), "unexpected text"),
    ("cpudata-nested-root", "d.xml", _cpudata(CPUDATA_LEAF0, "<cpudata/>"),
     "d.xml:3: unexpected element <cpudata>"),
    ("cpudata-two-roots", "d.xml", _cpudata(CPUDATA_LEAF0) + "<cpudata arch='x86'/>\n",
     "malformed XML: Extra content at the end of the document"),
    ("cpudata-entity", "d.xml", "<!DOCTYPE c [<!ENTITY e '0x7'>]>\n" + _cpudata(CPUDATA_LEAF0),
     "XML with a DOCTYPE is refused"),
    ("cpudata-undeclared-entity", "d.xml", _cpudata(CPUDATA_LEAF0.replace("0x0000000d", "&e;")),
     "malformed XML: Entity 'e' not defined"),
    # --- too big, too deep, not UTF-8
    ("too-many-json-entries", "d.json",
     _json(_leaf0("0x1000"), *({"function": hex(i)} for i in range(1, 4097))),
     "4097 entries (limit 4096)"),
    ("too-many-cpuid-lines", "d.txt", "CPU:\n" + "\n".join(
        f"   {i:#010x} 0x00: eax=0x0 ebx=0x1 ecx=0x0 edx=0x0" for i in range(4097)) + "\n",
     "d.txt:4098: more than 4096 entries"),
    ("oversized", "d.json", b" " * (MAX_INPUT_BYTES + 1), "larger than 16 MiB"),
    ("deep-json", "d.json", '{"entries": ' + "[" * 100_000, "JSON nested too deeply"),
    ("deep-xml", "d.xml", _deep_xml(300), "Excessive depth in document"),
    ("not-utf-8", "d.txt", b"CPU:\n# caf\xe9\n", "not UTF-8 text (byte 0xe9 at offset 10)"),
]  # fmt: skip


def _run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*CLI, *args], input=stdin, capture_output=True, cwd=REPO,
                       timeout=120)  # fmt: skip
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(),
                                       r.stderr.decode("utf-8", "backslashreplace"))


def _refused(r: subprocess.CompletedProcess[str], named: str, reason: str) -> None:
    """Exit 2, exactly one stderr line `kvmcpuid: NAMED...REASON`, no traceback,
    nothing on stdout."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.endswith("\n") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith(f"kvmcpuid: {named}"), r.stderr
    assert reason in r.stderr, r.stderr
    assert r.stdout == ""


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _good_dump(tmp_path: Path) -> Path:
    """A valid dump written here (a real CPU's leaf 0 and 1), for diff's
    other operand."""
    return _write(tmp_path, "good.txt", f"CPU:\n{LEAF0}\n{LEAF1}\n")


@pytest.mark.parametrize(("name", "content", "reason"), [c[1:] for c in DUMPS],
                         ids=[c[0] for c in DUMPS])  # fmt: skip
def test_bad_dump_is_refused_by_every_command(
    tmp_path: Path, name: str, content: str | bytes, reason: str
) -> None:
    bad = _write(tmp_path, name, content)
    good = _good_dump(tmp_path)
    for args in (["features", "--from", str(bad)], ["qemu-flags", "--from", str(bad)],
                 ["diff", str(good), str(bad)]):  # fmt: skip
        r = _run(*args)
        _refused(r, str(bad), reason)
    out = tmp_path / "out" / "baseline.txt"
    out.parent.mkdir()
    r = _run("baseline", "-o", str(out), str(good), str(bad))
    _refused(r, str(bad), reason)
    assert list(out.parent.iterdir()) == []  # no output, no temporary file


def test_oversized_stdin_is_refused() -> None:
    r = _run("features", "--from", "-", stdin=b"{" + b" " * MAX_INPUT_BYTES)
    _refused(r, "<stdin>", "larger than 16 MiB")


def test_a_dump_of_exactly_the_cap_is_read(tmp_path: Path) -> None:
    # The cap is a limit, not an off-by-one: a valid dump padded to exactly
    # MAX_INPUT_BYTES is read.
    text = f"CPU:\n{LEAF0}\n{LEAF1}\n".encode()
    path = _write(tmp_path, "big.txt", text + b"\n" * (MAX_INPUT_BYTES - len(text)))
    assert path.stat().st_size == MAX_INPUT_BYTES
    r = _run("features", "--from", str(path), "--format", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)


# --- configurations: libvirt <cpu> and domain XML ------------------------------------

CPU = "<cpu mode='custom' match='exact' check='full'>\n  <model fallback='forbid'>qemu64</model>\n"
DOMAIN = "<domain type='kvm'>\n  <name>g</name>\n{}</domain>\n"

LIBVIRT: list[tuple[str, str | bytes, str]] = [
    ("two-cpus", DOMAIN.format(CPU + "</cpu>\n<cpu mode='host-passthrough'/>\n"),
     "a second <cpu> in the domain (the first: line 3): which one is meant? (line 6)"),
    ("two-features", DOMAIN.format("<features><acpi/></features>\n<features/>\n" + CPU
                                   + "</cpu>\n"),
     "a second <features> in the domain (the first: line 3): which one is meant? (line 4)"),
    ("two-models", CPU + "  <model>Nehalem</model>\n</cpu>\n",
     "a second <model> in <cpu> (the first: line 2): which one is meant? (line 3)"),
    ("two-vendors", CPU + "  <vendor>AMD</vendor>\n  <vendor>Intel</vendor>\n</cpu>\n",
     "a second <vendor> in <cpu>"),
    ("unknown-cpu-attribute", CPU.replace("check=", "chek=") + "</cpu>\n",
     "<cpu> has unknown attribute 'chek' (line 1)"),
    ("unknown-mode", CPU.replace("'custom'", "'passthrough'") + "</cpu>\n",
     "<cpu mode='passthrough'>: not one of custom, host-model, host-passthrough, maximum"),
    ("unknown-policy", CPU + "  <feature policy='want' name='sse2'/>\n</cpu>\n",
     "feature 'sse2': unknown policy 'want' (not one of force, require, optional, disable, "
     "forbid) (line 3)"),
    ("unknown-feature-attribute", CPU + "  <feature policy='require' name='sse2' on='1'/>\n"
     "</cpu>\n", "<feature> has unknown attribute 'on' (line 3)"),
    ("unknown-child", CPU + "  <features policy='require' name='sse2'/>\n</cpu>\n",
     "unexpected <features> in <cpu>"),
    ("namespaced-feature", CPU.replace("<cpu ", "<cpu xmlns:x='urn:x' ")
     + "  <x:feature policy='require' name='sse2'/>\n</cpu>\n",
     "unexpected <{urn:x}feature> in <cpu>"),
    ("feature-twice", CPU + "  <feature policy='require' name='sse2'/>\n"
     "  <feature policy='disable' name='sse2'/>\n</cpu>\n",
     "feature 'sse2' given twice (the first: line 3); libvirt refuses that too (line 4)"),
    ("feature-twice-same-policy", CPU + "  <feature policy='require' name='lahf_lm'/>\n"
     "  <feature policy='require' name='lahf_lm'/>\n</cpu>\n", "feature 'lahf_lm' given twice"),
    ("qemu-spelling", CPU + "  <feature policy='require' name='pclmulqdq'/>\n</cpu>\n",
     "libvirt does not know the feature 'pclmulqdq'; did you mean 'pclmuldq'? (line 3)"),
    ("feature-without-name", CPU + "  <feature policy='require'/>\n</cpu>\n",
     "<feature> without a name= (line 3)"),
    ("match-minimum", CPU.replace("'exact'", "'minimum'") + "</cpu>\n",
     "match='minimum': libvirt adds host-model features"),
    ("vendor-id", CPU.replace("fallback='forbid'", "vendor_id='GenuineIntel'") + "</cpu>\n",
     "<model vendor_id='GenuineIntel'> changes the CPUID vendor string"),
    ("migratable-custom", CPU.replace("check='full'", "migratable='on'") + "</cpu>\n",
     "migratable= is only for mode='host-passthrough' or 'maximum'"),
    ("no-model", "<cpu mode='custom'>\n  <feature policy='require' name='sse2'/>\n</cpu>\n",
     "<cpu mode='custom'> without a <model> (line 1)"),
    ("bad-model-name", CPU.replace(">qemu64<", ">qemu64,kvm=off<") + "</cpu>\n",
     "refusing CPU model name 'qemu64,kvm=off'"),
    ("text-in-cpu", CPU + "  sse2\n</cpu>\n", "unexpected text in <cpu>: 'sse2'"),
    ("entity", "<!DOCTYPE cpu [<!ENTITY m 'qemu64'>]>\n<cpu><model>&m;</model></cpu>\n",
     "XML with a DOCTYPE is refused"),
    ("not-a-cpu", "<cpudata arch='x86'/>\n", "no <cpu> element"),
    ("no-cpu-in-domain", DOMAIN.format(""), "no <cpu> element"),
    ("deep", DOMAIN.format("<a>" * 300 + "</a>" * 300), "Excessive depth in document"),
    ("not-utf-8", b"<cpu mode='custom'><model>caf\xe9</model></cpu>", "not UTF-8 text"),
    ("oversized", b" " * (MAX_INPUT_BYTES + 1), "larger than 16 MiB"),
]  # fmt: skip


@pytest.mark.parametrize(("content", "reason"), [c[1:] for c in LIBVIRT],
                         ids=[c[0] for c in LIBVIRT])  # fmt: skip
def test_bad_libvirt_xml_is_refused_before_any_guest(
    tmp_path: Path, content: str | bytes, reason: str
) -> None:
    bad = _write(tmp_path, "guest.xml", content)
    r = _run("verify", "--libvirt-xml", str(bad), "--backend", "kvm")
    _refused(r, str(bad), reason)


def _base_dump() -> str:
    paths = cpu_dump_paths()
    if not paths:
        pytest.skip("no real CPU dumps (set KVMCPUID_DATA)")
    return str(paths[0])


@pytest.mark.parametrize(("content", "reason"),
                         [c[1:] for c in LIBVIRT if c[0] in ("two-cpus", "two-features",
                                                             "feature-twice", "qemu-spelling",
                                                             "match-minimum", "deep")],
                         ids=["two-cpus", "two-features", "feature-twice", "qemu-spelling",
                              "match-minimum", "deep"])  # fmt: skip
def test_bad_libvirt_xml_is_refused_by_diff(tmp_path: Path, content: str, reason: str) -> None:
    bad = _write(tmp_path, "guest.xml", content)
    good = _good_dump(tmp_path)
    r = _run("diff", "--from", _base_dump(), str(bad), str(good))
    _refused(r, str(bad), reason)


QEMU: list[tuple[str, str, str]] = [
    ("empty-name", "-cpu host,=on\n", "-cpu option '=on': no feature name"),
    ("bare-plus", "-cpu host,+,enforce\n", "-cpu option '+': no feature name"),
    ("equals-without-value", "-cpu host,lahf-lm=\n",
     "-cpu option 'lahf-lm=': lahf-lm takes on or off"),
    ("odd-separator", "-cpu host;lahf-lm=on\n", "refusing CPU model name 'host;lahf-lm=on'"),
    ("nbsp", "-cpu host,lahf-lm=on\u00a0-m\n", "expected one -cpu value"),
    ("unicode-name", "-cpu host,lahf-lmé=on\n", "QEMU does not know the -cpu feature 'lahf-lmé'"),
    ("long-name", "-cpu host," + "a" * 200 + "=on\n", "longer than 64 characters"),
    ("two-values", "-cpu host -cpu qemu64\n", "expected one -cpu value"),
    ("json-argv-twice", '{"argv": ["-cpu", "host"], "argv": ["-cpu", "qemu64"]}\n',
     "key 'argv' given twice"),
    ("json-disagrees", json.dumps({"argv": ["-cpu", "host,lahf-lm=on,enforce"], "model": "host",
                                   "enabled": [], "disabled": ["lahf-lm"]}),
     "\"argv\" and \"enabled\" disagree"),
    ("json-bad-argv", json.dumps({"argv": ["-cpu"]}), '"argv" must be ["-cpu", VALUE]'),
]  # fmt: skip


@pytest.mark.parametrize(("content", "reason"), [c[1:] for c in QEMU], ids=[c[0] for c in QEMU])
def test_bad_qemu_flags_file_is_refused_by_diff(tmp_path: Path, content: str, reason: str) -> None:
    bad = _write(tmp_path, "guest.args", content)
    r = _run("diff", "--from", _base_dump(), str(bad), str(_good_dump(tmp_path)))
    _refused(r, str(bad), reason)


@pytest.mark.parametrize(("value", "reason"), [
    ("host,=on", "-cpu option '=on': no feature name"),
    ("host,lahf-lm=", "lahf-lm takes on or off"),
    ("host,lahf-lm=on,,+", "-cpu option '+': no feature name"),
    ("host\u00a0lahf-lm", "expected one -cpu value"),
])  # fmt: skip
def test_bad_qemu_flags_option_is_refused(value: str, reason: str) -> None:
    r = _run("verify", "--qemu-flags", value, "--backend", "kvm")
    _refused(r, "--qemu-flags", reason)


# --- -o: nothing written ---------------------------------------------------------------


@pytest.mark.parametrize(("content", "reason"), [
    (b" " * (MAX_INPUT_BYTES + 1), "larger than 16 MiB"),
    (b"<domain><name>caf\xe9</name></domain>", "not UTF-8 text"),
])  # fmt: skip
def test_libvirt_xml_patch_of_unreadable_domain_writes_nothing(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    bad = _write(tmp_path, "dom.xml", content)
    out = tmp_path / "out"
    out.mkdir()
    r = _run("libvirt-xml", "--from", _base_dump(), "--patch", str(bad), "-o",
             str(out / "patched.xml"))  # fmt: skip
    _refused(r, str(bad), reason)
    assert list(out.iterdir()) == []


@pytest.mark.libvirt  # libvirt's cpu_map names the model before the domain is patched
def test_libvirt_xml_patch_of_a_domain_with_two_cpus_writes_nothing(
    tmp_path: Path, libvirt_conn_uri: str
) -> None:
    bad = _write(tmp_path, "dom.xml", DOMAIN.format(CPU + "</cpu>\n" + CPU + "</cpu>\n"))
    out = tmp_path / "out"
    out.mkdir()
    r = _run("libvirt-xml", "--from", _base_dump(), "--patch", str(bad), "-o",
             str(out / "patched.xml"))  # fmt: skip
    _refused(r, str(bad), "more than one <cpu>")
    assert list(out.iterdir()) == []


# --- libvirt's own verdict on what parse refuses ----------------------------------------

SCHEMA = Path("/usr/share/libvirt/schemas/domain.rng")
# A domain libvirt's schema accepts, but for its <cpu> (line 2 on).
SCHEMA_DOMAIN = ("<domain type='kvm'><name>g</name><memory unit='MiB'>64</memory>\n{}"
                 "<os><type arch='x86_64' machine='pc'>hvm</type></os></domain>")  # fmt: skip
# The cases libvirt 9.0's RelaxNG schema itself refuses.
SCHEMA_REFUSES = ("two-cpus", "two-features", "two-models", "two-vendors",
                  "unknown-cpu-attribute", "unknown-mode", "unknown-policy",
                  "unknown-feature-attribute", "unknown-child", "namespaced-feature",
                  "feature-without-name", "text-in-cpu")  # fmt: skip


def _in_schema_domain(content: str) -> str:
    if content.startswith("<domain"):  # the case is about the domain itself
        inner = content[content.index(">") + 1 : content.rindex("</domain>")]
        return SCHEMA_DOMAIN.format(inner.replace("<name>g</name>", ""))
    return SCHEMA_DOMAIN.format(content)


def test_libvirt_schema_refuses_what_parse_refuses() -> None:
    if not SCHEMA.exists():
        pytest.skip("libvirt's RelaxNG schemas are not installed")
    from lxml import etree

    rng = etree.RelaxNG(etree.parse(str(SCHEMA)))
    good = _in_schema_domain(CPU + "  <feature policy='require' name='sse2'/>\n</cpu>\n")
    assert rng.validate(etree.fromstring(good)), rng.error_log.last_error  # the control
    cases = {name: content for name, content, _ in LIBVIRT}
    for name in SCHEMA_REFUSES:
        content = cases[name]
        assert isinstance(content, str)
        assert not rng.validate(etree.fromstring(_in_schema_domain(content))), name


@pytest.mark.libvirt
def test_libvirt_refuses_what_parse_refuses(libvirt_conn_uri: str) -> None:
    """The refusals past the schema: libvirtd's own errors for a feature
    named twice, migratable= on a custom CPU and a QEMU-only spelling; and
    what it makes of match='minimum' (another model, host-model features)."""
    import uuid

    import libvirt

    conn = libvirt.open(libvirt_conn_uri)

    def define(cpu: str) -> libvirt.virDomain:
        name = f"kvmcpuid-test-{uuid.uuid4().hex[:12]}"
        return conn.defineXML(SCHEMA_DOMAIN.format(cpu).replace("<name>g</name>",
                                                                f"<name>{name}</name>"))

    try:
        cases = {name: content for name, content, _ in LIBVIRT}
        for name, says in (("feature-twice", "specified more than once"),
                           ("feature-twice-same-policy", "specified more than once"),
                           ("migratable-custom", "migratable is only allowed")):  # fmt: skip
            with pytest.raises(libvirt.libvirtError, match=says):
                define(str(cases[name])).undefine()  # undefine only if it was defined
        with pytest.raises(libvirt.libvirtError, match="Unknown CPU feature pclmulqdq"):
            conn.compareHypervisorCPU(None, "x86_64", None, "kvm", str(cases["qemu-spelling"]), 0)
        dom = define(str(cases["match-minimum"]))
        try:
            updated = _cpu_of(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_UPDATE_CPU))
        finally:
            dom.undefine()
        # Not the qemu64 written: libvirt's update rewrote the model and added
        # host-model features.
        assert (updated.findtext("model"), len(updated.findall("feature"))) != ("qemu64", 0)
    finally:
        conn.close()


def _cpu_of(domain_xml: str) -> Any:
    from lxml import etree

    cpu = etree.fromstring(domain_xml.encode()).find("cpu")
    assert cpu is not None
    return cpu
