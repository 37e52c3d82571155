"""`kvmcpuid features --from DUMP` shows the feature MSRs a dump carries
(libvirt's <msr> elements of a real CPU's <cpudata>, a format-2 JSON dump),
checked against the raw <msr> values read here with lxml and the Intel SDM's
bit names (vol. 4, table 2-2: IA32_ARCH_CAPABILITIES bit 0 RDCL_NO, 5
MDS_NO; IA32_CORE_CAPABILITIES bit 5 SPLIT_LOCK_DISABLE)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from lxml import etree

from tests.conftest import cpu_dump_paths

WITH_MSRS = [p for p in cpu_dump_paths() if "<msr" in p.read_text()]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmcpuid_virt.cli", *args],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip


def _raw_msrs(path: Path) -> dict[int, int]:
    return {int(str(m.get("index")), 16):
            int(m.get("edx", "0"), 16) << 32 | int(m.get("eax", "0"), 16)
            for m in etree.parse(str(path)).getroot().iter("msr")}  # fmt: skip


@pytest.mark.parametrize("path", WITH_MSRS, ids=lambda p: p.stem)
def test_json_lists_the_dumps_msr_values(path: Path) -> None:
    r = _cli("features", "--from", str(path), "--format", "json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)["feature_msrs"]
    assert doc["available"] is True and doc["vcpu_trial"] is None
    assert {int(m["index"], 16): int(m["value"], 16) for m in doc["msrs"]} == _raw_msrs(path)
    raw = _raw_msrs(path)
    named = {(int(f["msr"], 16), f["bit"]) for f in doc["features"]}
    for index, bit in ((0x10A, 0), (0x10A, 5), (0xCF, 5)):
        if index in raw:
            assert ((index, bit) in named) == bool(raw[index] >> bit & 1), (hex(index), bit)


@pytest.mark.parametrize("path", WITH_MSRS, ids=lambda p: p.stem)
def test_table_shows_them_within_80_columns(path: Path) -> None:
    r = _cli("features", "--from", str(path))
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert "no feature MSRs in this dump" not in text
    for index, value in _raw_msrs(path).items():
        assert f"MSR {index:X}H" in text and f"= {value:#x}" in text
    assert max(len(line) for line in text.splitlines()[1:]) <= 80
