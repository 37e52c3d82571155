"""kvmcpuid diff on real dumps; expected bits read from the raw <cpudata> here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from kvmcpuid_virt.cli import main
from tests.conftest import cpu_dump_paths


def _leaf7_ebx(path: str) -> int:
    for c in etree.parse(path).getroot().iter("cpuid"):
        if int(c.get("eax_in", "0"), 16) == 7 and int(c.get("ecx_in", "0"), 16) == 0:
            return int(c.get("ebx", "0"), 16)
    return 0


def test_diff_exit_status_and_named_bits(capsys: pytest.CaptureFixture[str]) -> None:
    a = next((str(p) for p in cpu_dump_paths() if "Xeon-Gold" in p.name), None)
    b = next((str(p) for p in cpu_dump_paths() if "Ice-Lake" in p.name), None)
    if a is None or b is None:
        pytest.skip("Xeon Gold and Ice Lake dumps not found")
    assert main(["diff", a, a]) == 0
    capsys.readouterr()
    assert main(["diff", "--format", "json", a, b]) == 1
    doc = json.loads(capsys.readouterr().out)
    word = next(w for w in doc["features"] if w["leaf"] == "0x7" and w["reg"] == "ebx")
    only_b_bits = _leaf7_ebx(b) & ~_leaf7_ebx(a)
    assert len(word["only_b"]) == bin(only_b_bits).count("1")
    assert "sha-ni" in word["only_b"]  # SHA-NI: CPUID.7.0:EBX[29], Ice Lake only
    assert only_b_bits >> 29 & 1
    assert any(f["name"] == "physical/virtual address bits" for f in doc["fields"])


def test_diff_error_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diff", "/nonexistent-a", "/nonexistent-b"]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_diff_refuses_a_table_without_leaf_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Without leaf 0 every word reads as beyond the max leaf: two different
    # such tables would otherwise compare "identical".
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("   0x00000001 0x00: eax=0x1 ebx=0x0 ecx=0x0 edx=0x1\n")
    b.write_text("   0x00000001 0x00: eax=0x1 ebx=0x0 ecx=0x0 edx=0x0\n")
    assert main(["diff", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert "no leaf 0" in err and err.count("\n") == 1


def _dump(stem: str) -> str:
    path = next((str(p) for p in cpu_dump_paths() if stem in p.name and p.suffix == ".xml"), None)
    if path is None:
        pytest.skip(f"no {stem} dump")
    return path


def _diff_configs(base: str, a_text: str, b_text: str, tmp_path: Path,
                  capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    a, b = tmp_path / "a.args", tmp_path / "b.args"
    a.write_text(a_text)
    b.write_text(b_text)
    rc = main(["diff", "--from", base, "--format", "json", str(a), str(b)])
    doc: dict[str, Any] = json.loads(capsys.readouterr().out)
    return rc, doc


def test_diff_of_two_qemu_configurations_names_exactly_the_switched_feature(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # LAHF/SAHF in 64-bit mode is CPUID.80000001H:ECX[0] (Intel SDM, AMD
    # APM); Skylake-SP (Xeon Gold 6148) has it. Applied to that dump, the two
    # -cpu strings differ in that bit and nothing else.
    rc, doc = _diff_configs(_dump("Xeon-Gold-6148"), "-cpu host,lahf-lm=on,enforce\n",
                            "-cpu\nhost,lahf-lm=off,enforce\n",  # argv: one per line
                            tmp_path, capsys)  # fmt: skip
    assert rc == 1
    assert doc["features"] == [
        {"leaf": "0x80000001", "subleaf": 0, "reg": "ecx", "only_a": ["lahf-lm"], "only_b": []}
    ]
    assert doc["fields"] == [] and doc["notes"] == []
    assert "QEMU -cpu applied to" in doc["a"]


@pytest.mark.qemu  # the CLI applies the <cpu> with what this machine's QEMU says
def test_diff_of_a_libvirt_cpu_and_the_domain_holding_it_is_identical(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = _dump("Xeon-Gold-6148")
    cpu = ("<cpu mode='custom' match='exact' check='full'><model fallback='forbid'>"
           "Skylake-Server</model><feature policy='disable' name='avx512f'/></cpu>")
    (tmp_path / "cpu.xml").write_text(cpu)
    (tmp_path / "dom.xml").write_text(
        f"<domain type='kvm'><name>x</name><memory>65536</memory>{cpu}</domain>"
    )
    assert main(["diff", "--from", base, str(tmp_path / "cpu.xml"),
                 str(tmp_path / "dom.xml")]) == 0  # fmt: skip
    assert capsys.readouterr().out.rstrip().endswith("identical CPUID")


def test_diff_notes_what_a_configuration_asks_beyond_the_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Broadwell-U (Core i7-5600U) has no AVX-512 (CPUID.7.0:EBX[16] clear in
    # its dump); a configuration asking for it is diffed without it, and the
    # output says so.
    rc, doc = _diff_configs(_dump("Core-i7-5600U"), "-cpu host,avx512f=on\n", "-cpu host\n",
                            tmp_path, capsys)  # fmt: skip
    assert rc == 0
    assert len(doc["notes"]) == 1 and doc["notes"][0].endswith("avx512f")


def test_diff_of_a_bad_configuration_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.args"
    bad.write_text("-cpu host,avx2=on -m 1G\n")
    assert main(["diff", "--from", _dump("Xeon-Gold-6148"), str(bad), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "expected one -cpu value" in err
    bad.write_text("-cpu host,avx2=maybe\n")
    assert main(["diff", "--from", _dump("Xeon-Gold-6148"), str(bad), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}: -cpu option 'avx2=maybe'" in err
    (tmp_path / "nocpu.xml").write_text("<domain type='kvm'><name>x</name></domain>")
    assert main(["diff", "--from", _dump("Xeon-Gold-6148"), str(tmp_path / "nocpu.xml"),
                 str(bad)]) == 2  # fmt: skip
    assert "no <cpu> element" in capsys.readouterr().err


def test_diff_table_puts_each_feature_in_its_host_column(
    capsys: pytest.CaptureFixture[str],
) -> None:
    a, b = _dump("Xeon-Gold-6148"), _dump("Ice-Lake-Server")
    assert main(["diff", a, b]) == 1
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("leaf/register"))
    col_b = header.index("only in B")
    row = next(line for line in lines if line.startswith("CPUID.07H.0:EBX"))
    # SHA-NI (CPUID.7.0:EBX[29]) is Ice Lake's only: it sits in B's column.
    assert row.index("sha-ni") >= col_b
    assert lines[-1].endswith("differ")


@pytest.mark.parametrize("b", cpu_dump_paths(), ids=lambda p: p.stem)
@pytest.mark.parametrize("a", cpu_dump_paths(), ids=lambda p: p.stem)
def test_diff_table_fits_100_columns(
    a: Path, b: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Everything the command lays out fits (the A:/B: lines hold the paths as
    # given); long values such as brand strings go on lines of their own.
    main(["diff", str(a), str(b)])
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if len(line) > 100 and not line.startswith(("A: ", "B: "))] \
        == []


def test_diff_reads_every_qemu_flags_output_format(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvmcpuid_virt.commands.qemu_flags import main as qemu_flags_main

    base = _dump("Xeon-Gold-6148")
    files = []
    for fmt in ("arg", "argv", "json"):
        assert qemu_flags_main(["--from", base, "--disable", "avx2", "--format", fmt]) == 0
        path = tmp_path / f"flags.{fmt}"
        path.write_text(capsys.readouterr().out)
        files.append(str(path))
    for other in files[1:]:
        assert main(["diff", "--from", base, files[0], other]) == 0, other
    capsys.readouterr()
    # And the configuration really is the dump less avx2 (CPUID.7.0:EBX[5]).
    assert main(["diff", "--from", base, "--format", "json", base, files[2]]) == 1
    doc = json.loads(capsys.readouterr().out)
    word = next(w for w in doc["features"] if w["leaf"] == "0x7" and w["reg"] == "ebx")
    assert "avx2" in word["only_a"]
