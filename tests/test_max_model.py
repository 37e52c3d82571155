"""--max-model: never expose more than a named CPU model. The model's content
is read in the test straight from libvirt's installed cpu_map, and the
guest's answer comes from a real QEMU boot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from lxml import etree

from kvmcpuid_virt.cpuid.features import FeatureKind, registry
from kvmcpuid_virt.kvm import Kvm
from tests.conftest import REPO

CPU_MAP = Path("/usr/share/libvirt/cpu_map")
MODEL = "Opteron_G3"
# QEMU adds these to every model under KVM whatever the model says.
QEMU_ADDS = {"hypervisor", "tsc-deadline", "arat", "x2apic"}


def _model_features(name: str) -> set[str]:
    path = CPU_MAP / f"x86_{name}.xml"
    if not path.exists():
        pytest.skip(f"libvirt's cpu_map has no {name} ({path})")
    model = etree.parse(str(path)).getroot().find("model")
    assert model is not None
    return {f.get("name", "") for f in model.iter("feature") if f.get("removed") != "yes"}


def _flags(*args: str) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "kvmcpuid_virt.cli", "qemu-flags", "--format", "json", *args],
        capture_output=True, text=True, cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    value: str = doc["argv"][1]
    return value


def test_max_model_turns_off_everything_outside_the_model(kvm: Kvm) -> None:
    allowed = _model_features(MODEL)
    reg = registry()
    value = _flags("--max-model", MODEL)
    on = {part[: -len("=on")] for part in value.split(",") if part.endswith("=on")}
    assert on, value
    for name in on:
        f = reg.lookup(name)
        if f.kind == FeatureKind.KVM_PV or f.name in QEMU_ADDS:
            continue
        assert f.libvirt in allowed, f"{name} is on but not in cpu_map's {MODEL}"


def test_max_model_guest_sees_nothing_outside_the_model(kvm: Kvm, qemu_binary: str) -> None:
    value = _flags("--max-model", MODEL)
    r = subprocess.run(
        [sys.executable, "-m", "kvmcpuid_virt.cli", "verify", "--qemu-flags", value,
         "--format", "json"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["ok"], r.stdout[-2000:]
