"""`kvmcpuid baseline --this-host` and `--connect` carry their feature MSRs
into the intersection.

Independent sources: a C program's own KVM_GET_MSRS / KVM_SET_MSRS on this
machine (tests/kvm_msr_c.py) for what a vCPU here accepts of
IA32_ARCH_CAPABILITIES; the real libvirtd's domain capabilities (asked
here with libvirt-python) and libvirt's cpu_map `<msr>` features (read here
with lxml) for what the host-model's MSR features set.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from lxml import etree

from tests.conftest import REPO
from tests.kvm_msr_c import c_msr_reading

ARCH_CAPABILITIES = 0x10A
KEY = f"{ARCH_CAPABILITIES:#010x}"
CPU_MAP = Path("/usr/share/libvirt/cpu_map/x86_features.xml")


def _baseline(*args: str) -> tuple[int, dict[str, object], str]:
    r = subprocess.run([sys.executable, "-m", "kvmcpuid_virt.cli", "baseline", *args,
                        "--format", "json"], capture_output=True, text=True, cwd=REPO,
                       timeout=180)  # fmt: skip
    return r.returncode, (json.loads(r.stdout) if r.returncode == 0 else {}), r.stderr


def _msr_values(doc: dict[str, object]) -> dict[str, int]:
    fm = doc["feature_msrs"]
    assert isinstance(fm, dict) and fm["available"]
    return {k: int(v, 16) for k, v in fm["values"].items()}


def _accepted_here() -> int:
    """The bits of KVM's IA32_ARCH_CAPABILITIES a vCPU here takes, by the C program."""
    c = c_msr_reading()
    value = c.values.get(ARCH_CAPABILITIES, 0)
    if c.set_result.get(ARCH_CAPABILITIES) == 1:
        return value
    return sum(1 << b for (i, b), r in c.bit_result.items() if i == ARCH_CAPABILITIES and r == 1)


def test_this_host_brings_its_accepted_feature_msrs(kvm: object) -> None:
    rc, doc, err = _baseline("--this-host")
    assert rc == 0, err
    values = _msr_values(doc)
    if ARCH_CAPABILITIES not in c_msr_reading().values:
        assert KEY not in values
    else:
        assert values[KEY] == _accepted_here()


def _host_model_msr_bits(uri: str) -> tuple[int, list[str]]:
    """IA32_ARCH_CAPABILITIES as the daemon's host-model's required MSR
    features set it (cpu_map's <msr> of each), and their names."""
    import libvirt

    conn = libvirt.open(uri)
    try:
        caps = etree.fromstring(conn.getDomainCapabilities(None, None, None, "kvm", 0).encode())
    finally:
        conn.close()
    by_name = {}
    for f in etree.parse(str(CPU_MAP)).getroot().iter("feature"):
        m = f.find("msr")
        if m is not None and int(m.get("index", "0"), 16) == ARCH_CAPABILITIES:
            by_name[f.get("name")] = int(m.get("edx", "0"), 16) << 32 | int(m.get("eax", "0"), 16)
    bits, names = 0, []
    for f in caps.iterfind("cpu/mode[@name='host-model']/feature[@policy='require']"):
        if f.get("name") in by_name:
            bits |= by_name[f.get("name")]
            names.append(str(f.get("name")))
    return bits, names


def test_connect_host_model_msr_features_are_in_the_baseline(libvirt_conn_uri: str) -> None:
    if not CPU_MAP.exists():
        pytest.skip("libvirt's cpu_map is not installed")
    bits, names = _host_model_msr_bits(libvirt_conn_uri)
    rc, doc, err = _baseline("--connect", libvirt_conn_uri)
    assert rc == 0, err
    notes = doc["notes"]
    assert isinstance(notes, list)
    assert not any("not CPUID bits" in n for n in notes)
    assert not any(name in n for n in notes for name in names)
    values = _msr_values(doc)
    if bits:
        assert values[KEY] == bits
    else:
        assert values.get(KEY, 0) == 0


def test_connect_and_this_host_intersect_the_msrs(kvm: object, libvirt_conn_uri: str) -> None:
    if not CPU_MAP.exists():
        pytest.skip("libvirt's cpu_map is not installed")
    bits, _ = _host_model_msr_bits(libvirt_conn_uri)
    rc, doc, err = _baseline("--connect", libvirt_conn_uri, "--this-host")
    assert rc == 0, err
    assert _msr_values(doc).get(KEY, 0) == bits & _accepted_here()
