"""kvmcpuid diff on real dumps; expected bits read from the raw <cpudata> here."""

from __future__ import annotations

import json
from pathlib import Path

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
