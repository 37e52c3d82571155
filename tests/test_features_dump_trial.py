"""`kvmcpuid features --from DUMP` of a format-2 dump taken with `dump
--msr-trial`: the refused marks are the dump's own record of what its
host's vCPU accepted, said as such (not "no vCPU tried them").

Independent sources: the dump's "feature_msrs" object read here with the
json module, and a C program's KVM_SET_MSRS of each IA32_ARCH_CAPABILITIES
bit on this machine (tests/kvm_msr_c.py) for the dump taken here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.kvm_msr_c import c_msr_reading

ARCH_CAPABILITIES = 0x10A


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmcpuid_virt.cli", *args],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip


def _dump(tmp_path: Path, *flags: str) -> tuple[Path, dict[int, int], dict[int, int] | None]:
    path = tmp_path / "here.json"
    r = _cli("dump", *flags, "-o", str(path))
    assert r.returncode == 0, r.stderr
    fm = json.loads(path.read_text())["feature_msrs"]
    values = {int(k, 16): int(v, 16) for k, v in fm["values"].items()}
    rec = fm.get("deliverable")
    return path, values, None if rec is None else {int(k, 16): int(v, 16) for k, v in rec.items()}


def test_a_trial_dump_says_whose_vcpu_refused_what(kvm: object, tmp_path: Path) -> None:
    path, values, accepted = _dump(tmp_path, "--msr-trial")
    assert accepted is not None
    r = _cli("features", "--from", str(path), "--format", "json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)["feature_msrs"]
    assert "no vCPU tried" not in doc["note"] and "--msr-trial" in doc["note"]
    for m in doc["msrs"]:
        index = int(m["index"], 16)
        refused = values[index] & ~accepted.get(index, 0)
        assert m["vcpu"]["recorded"] is True and int(m["vcpu"]["refused"], 16) == refused
    for f in doc["features"]:
        index, bit = int(f["msr"], 16), f["bit"]
        assert f["refused"] == bool((values[index] & ~accepted.get(index, 0)) >> bit & 1)
    # This machine's dump: its record agrees with the C program's own
    # KVM_SET_MSRS of each bit (a bit alone refused is marked refused).
    c = c_msr_reading()
    by_bit = {f["bit"]: f["refused"] for f in doc["features"]
              if int(f["msr"], 16) == ARCH_CAPABILITIES}  # fmt: skip
    if c.set_result.get(ARCH_CAPABILITIES) != 1:
        for (index, bit), result in c.bit_result.items():
            if index == ARCH_CAPABILITIES and result == 0 and bit in by_bit:
                assert by_bit[bit] is True, bit
    table = _cli("features", "--from", str(path)).stdout
    assert "no vCPU tried them here" not in table and "a vCPU there accepted" in table


def test_a_dump_without_the_trial_still_says_nobody_tried(kvm: object, tmp_path: Path) -> None:
    path, _, accepted = _dump(tmp_path)
    assert accepted is None
    r = _cli("features", "--from", str(path), "--format", "json")
    doc = json.loads(r.stdout)["feature_msrs"]
    assert "no vCPU tried them here" in doc["note"]
    assert all(m["vcpu"] is None for m in doc["msrs"])
    assert all(f["refused"] is None for f in doc["features"])
