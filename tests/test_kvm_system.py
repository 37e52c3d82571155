"""Kvm on the real /dev/kvm, and its error paths on real non-KVM files."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from kvmcpuid_virt.cpuid.table import INDEXED_LEAVES, EntryFlag
from kvmcpuid_virt.errors import (
    KvmPermissionError,
    KvmUnavailableError,
    NotKvmDeviceError,
)
from kvmcpuid_virt.kvm import Kvm
from kvmcpuid_virt.kvm.abi import Cap


def test_api_version_is_12(kvm: Kvm) -> None:
    assert kvm.api_version() == 12


def test_cpuid_capabilities_present(kvm: Kvm) -> None:
    assert kvm.check_extension(Cap.EXT_CPUID) > 0
    assert kvm.check_extension(Cap.EXT_EMUL_CPUID) > 0


@pytest.mark.usefixtures("pin_cpu0")
@pytest.mark.parametrize("first", [1, 2, 7, 64, 256, 10000])
def test_supported_table_independent_of_first_guess(kvm: Kvm, first: int) -> None:
    assert kvm.supported_cpuid(first) == kvm.supported_cpuid()


@pytest.mark.usefixtures("pin_cpu0")
@pytest.mark.parametrize("first", [1, 2, 3, 4, 10000])
def test_emulated_table_independent_of_first_guess(kvm: Kvm, first: int) -> None:
    assert kvm.emulated_cpuid(first) == kvm.emulated_cpuid()


def _cpuinfo(key: str) -> str:
    text = Path("/proc/cpuinfo").read_text()
    m = re.search(rf"^{key}\s*:\s*(.*)$", text, re.M)
    assert m, key
    return m.group(1).strip()


def test_supported_vendor_matches_proc_cpuinfo(kvm: Kvm) -> None:
    leaf0 = kvm.supported_cpuid().lookup(0)
    assert leaf0 is not None
    vendor = b"".join(r.to_bytes(4, "little") for r in (leaf0.ebx, leaf0.edx, leaf0.ecx))
    assert vendor.decode() == _cpuinfo("vendor_id")


def test_supported_family_matches_proc_cpuinfo(kvm: Kvm) -> None:
    leaf1 = kvm.supported_cpuid().lookup(1)
    assert leaf1 is not None
    base_family = (leaf1.eax >> 8) & 0xF
    family = base_family + ((leaf1.eax >> 20) & 0xFF if base_family == 0xF else 0)
    assert family == int(_cpuinfo("cpu family"))


def test_significant_index_on_indexed_leaves_only(kvm: Kvm) -> None:
    for entry in kvm.supported_cpuid():
        if entry.indexed:
            assert entry.function in INDEXED_LEAVES, hex(entry.function)
        assert EntryFlag.STATE_READ_NEXT not in entry.flags or entry.function == 2


def test_missing_device_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(KvmUnavailableError, match="does not exist"):
        Kvm(str(tmp_path / "kvm"))


def test_character_device_that_is_not_kvm() -> None:
    with pytest.raises(NotKvmDeviceError, match="not a KVM device"):
        Kvm("/dev/null")


def test_regular_file_is_not_kvm(tmp_path: Path) -> None:
    fake = tmp_path / "kvm"
    fake.write_bytes(b"")
    with pytest.raises(NotKvmDeviceError, match="not a device"):
        Kvm(str(fake))


def test_directory_is_not_kvm(tmp_path: Path) -> None:
    with pytest.raises(NotKvmDeviceError):
        Kvm(str(tmp_path))


@pytest.mark.kvm
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to an unprivileged user")
def test_permission_denied_as_unprivileged_user() -> None:
    """A forked child drops to nobody and opens the real /dev/kvm."""
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this machine")
    if os.stat("/dev/kvm").st_mode & 0o006:
        pytest.skip("/dev/kvm is world-accessible here")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        code = 3
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            Kvm()
        except KvmPermissionError as exc:
            os.write(w, str(exc).encode())
            code = 0
        except BaseException as exc:
            os.write(w, repr(exc).encode())
        os._exit(code)
    os.close(w)
    message = os.read(r, 4096).decode()
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, message
    assert "permission denied" in message and "kvm" in message


def test_fd_is_cloexec_and_closed(kvm: Kvm) -> None:
    import fcntl

    assert fcntl.fcntl(kvm.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    fd = kvm.fd
    kvm.close()
    assert kvm.closed
    with pytest.raises(OSError):
        os.fstat(fd)
