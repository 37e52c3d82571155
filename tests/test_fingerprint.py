"""The dump fingerprint's QEMU and libvirt versions, read without running
anything, against what the tools themselves say."""

from __future__ import annotations

import re
import subprocess

import pytest

from kvmcpuid_virt.host import host_metadata, libvirt_version, qemu_version


def test_libvirt_version_matches_the_library() -> None:
    libvirt = pytest.importorskip("libvirt")
    v = libvirt.getVersion()
    assert libvirt_version() == f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"


def test_qemu_version_matches_the_binary(qemu_binary: str) -> None:
    out = subprocess.run([qemu_binary, "--version"], capture_output=True, text=True,
                         check=True).stdout
    m = re.match(r"QEMU emulator version (\d+\.\d+)\S* \(Debian ([^)]+)\)", out)
    if m is None:
        pytest.skip(f"not a Debian QEMU: {out.splitlines()[0]}")
    assert qemu_version() == f"{m.group(1)} (Debian {m.group(2)})"


def test_missing_tools_are_unknown(tmp_path: object) -> None:
    assert libvirt_version(("/nonexistent",)) == "unknown"
    assert qemu_version(binary="/nonexistent/qemu") == "unknown"


def test_metadata_carries_the_fingerprint() -> None:
    meta = host_metadata(12)
    for key in ("kernel", "kvm_api_version", "qemu_version", "libvirt_version", "cpu_model",
                "microcode"):
        assert key in meta
