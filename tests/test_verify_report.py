"""`kvmcpuid -v verify`: the feature MSRs the probe guest read, one line
each, folded into each backend's report; checked on raw KVM against the
kernel's own report of this CPU's microcode revision (/proc/cpuinfo)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvmcpuid_virt.host import cpuinfo_fields
from kvmcpuid_virt.kvm import Kvm
from tests.conftest import REPO


def _verbose_kvm() -> list[str]:
    r = subprocess.run([sys.executable, "-m", "kvmcpuid_virt.cli", "-v", "verify", "--backend",
                        "kvm"], capture_output=True, text=True, cwd=REPO, timeout=120,
                       check=False)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.splitlines()


def test_verbose_report_lists_each_feature_msr(kvm: Kvm) -> None:
    lines = _verbose_kvm()
    [at] = [i for i, ln in enumerate(lines) if ln.startswith("kvm: ") and "feature MSR" in ln]
    msr_lines = [ln for ln in lines[at + 1:] if ln.startswith("  MSR ")]
    assert any("IA32_ARCH_CAPABILITIES" in ln for ln in msr_lines), lines[at:]
    ucode = [ln for ln in msr_lines if ln.startswith("  MSR 8BH")]
    fields = cpuinfo_fields("vendor_id", "microcode")
    if fields.get("vendor_id") != "AuthenticAMD" or not ucode:
        pytest.skip("not an AMD host whose guest reads MSR 8BH (Intel keeps the "
                    "revision in its high half)")
    # AMD's MSR 8BH (patch level) is what Linux prints as "microcode".
    assert ucode[0].endswith(f"guest reads {int(fields['microcode'], 16):#x}"), ucode
