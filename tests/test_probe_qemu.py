"""The QEMU probe backend against a real qemu-system-x86_64 with KVM: what the
guest sees, QEMU's own view over QMP, that every run (normal, timeout,
Ctrl-C, SIGTERM) leaves no process and no temporary directory behind, and
that only transient failures are tried again."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmcpuid_virt.analysis.backend import Backend
from kvmcpuid_virt.errors import ProbeError, ProbeTimeoutError, ToolError
from kvmcpuid_virt.probe import image
from kvmcpuid_virt.probe import qemu as qemu_backend
from kvmcpuid_virt.probe.qemu import run_qemu
from kvmcpuid_virt.probe.qom import vmm_view_from_qom
from kvmcpuid_virt.process import PREFIX
from kvmcpuid_virt.qmp import TransientError
from tests.conftest import host_vendor, spin_image

pytestmark = pytest.mark.qemu

QUERIES = [(0x0, 0), (0x1, 0), (0x80000000, 0), (0x80000001, 0)]
# arch-capabilities=off: on this AMD host nested KVM refuses MSR 0x10a and
# `-cpu host` aborts without it; the property exists on every QEMU >= 4.
HOST = "host,arch-capabilities=off"
LAHF_LM = 1 << 0  # CPUID 0x80000001 ECX bit 0; honoured exactly on this host


def vendor_of(table_get: tuple[int, int, int]) -> str:
    ebx, edx, ecx = table_get
    return b"".join(r.to_bytes(4, "little") for r in (ebx, edx, ecx)).decode()






@pytest.fixture
def tracked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Every QEMU the backend starts, and its temporary directories under
    tmp_path; after the test: none of either may remain."""
    started: list[subprocess.Popen[bytes]] = []
    real_popen = subprocess.Popen

    def popen(*args: object, **kwargs: object) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = real_popen(*args, **kwargs)  # type: ignore[call-overload]
        started.append(proc)
        return proc

    # The backend calls subprocess.Popen by attribute at run time.
    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    yield started
    for proc in started:
        assert proc.returncode is not None, f"QEMU pid {proc.pid} was not reaped"
        assert not _is_our_qemu(proc.pid), f"QEMU pid {proc.pid} still running"
    assert not list(tmp_path.glob(PREFIX + "*")), "temporary directory left behind"


def _is_our_qemu(pid: int) -> bool:
    """A live (non-zombie) QEMU of ours at `pid` (pids are reused: check the
    command line names our temporary directory)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return b"qemu-system" in cmdline and PREFIX.encode() in cmdline


def test_guest_sees_host_vendor(qemu_binary: str, tracked: list[subprocess.Popen[bytes]]) -> None:
    result = run_qemu(HOST, QUERIES, qemu=qemu_binary)
    assert result.backend is Backend.QEMU
    assert result.vmm_view is None
    e = result.observed
    leaf0 = (e.get(0, 0, "ebx"), e.get(0, 0, "edx"), e.get(0, 0, "ecx"))
    assert vendor_of(leaf0) == host_vendor()
    assert len(tracked) == 1


def test_feature_off_is_off_in_guest(
    qemu_binary: str, tracked: list[subprocess.Popen[bytes]]
) -> None:
    on = run_qemu(HOST, QUERIES, qemu=qemu_binary)
    off = run_qemu(HOST + ",lahf-lm=off", QUERIES, qemu=qemu_binary)
    if not on.observed.get(0x80000001, 0, "ecx") & LAHF_LM:
        pytest.skip("this host gives no LAHF/SAHF in 64-bit mode to guests")
    assert not off.observed.get(0x80000001, 0, "ecx") & LAHF_LM
    # Nothing else in that register changed.
    assert on.observed.get(0x80000001, 0, "ecx") & ~LAHF_LM == off.observed.get(
        0x80000001, 0, "ecx"
    )


def test_vmm_view_matches_guest(qemu_binary: str, tracked: list[subprocess.Popen[bytes]]) -> None:
    result = run_qemu(HOST + ",lahf-lm=off", QUERIES, qemu=qemu_binary, want_vmm_view=True)
    assert result.vmm_view is not None
    vmm = result.vmm_view.lookup(0x80000001)
    assert vmm is not None
    assert not vmm.ecx & LAHF_LM
    # QEMU's feature word for 0x80000001 ECX is what the guest read.
    assert vmm.ecx == result.observed.get(0x80000001, 0, "ecx")


def test_unsupported_feature_warning_is_a_diagnostic(
    qemu_binary: str, tracked: list[subprocess.Popen[bytes]]
) -> None:
    # KVM never gives a guest MONITOR/MWAIT (leaf 1 ECX bit 3), so asking for
    # it makes QEMU warn "host doesn't support requested feature".
    result = run_qemu("qemu64,monitor=on", QUERIES, qemu=qemu_binary, want_vmm_view=True)
    assert any("monitor" in d for d in result.diagnostics), result.diagnostics


def test_spinning_guest_times_out_and_is_killed(
    qemu_binary: str, tracked: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(image, "build", lambda queries: spin_image())
    with pytest.raises(ProbeTimeoutError):
        run_qemu(HOST, QUERIES, timeout=0.5, qemu=qemu_binary)
    assert len(tracked) == 1


def test_spinning_guest_times_out_with_vmm_view(
    qemu_binary: str, tracked: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(image, "build", lambda queries: spin_image())
    with pytest.raises(ProbeTimeoutError):
        run_qemu(HOST, QUERIES, timeout=0.5, qemu=qemu_binary, want_vmm_view=True)


def test_ctrl_c_kills_qemu(
    qemu_binary: str, tracked: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("SIGINT reaches only the main thread")
    monkeypatch.setattr(image, "build", lambda queries: spin_image())
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_qemu(HOST, QUERIES, timeout=10.0, qemu=qemu_binary)
    finally:
        timer.cancel()
    assert len(tracked) == 1


class _Terminated(BaseException):
    """What cli's SIGTERM handler raises (cli.Terminated): not an Exception."""


@pytest.mark.parametrize("want_vmm_view", [False, True], ids=["plain", "vmm-view"])
def test_sigterm_kills_qemu(
    qemu_binary: str, tracked: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch,
    want_vmm_view: bool,
) -> None:
    """SIGTERM unwinds like Ctrl-C when a handler raises a BaseException for
    it (cli's does): QEMU killed and reaped, the directory gone (tracked)."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers run in the main thread only")

    def terminated(signum: int, frame: object) -> None:
        raise _Terminated

    monkeypatch.setattr(image, "build", lambda queries: spin_image())
    old = signal.signal(signal.SIGTERM, terminated)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        with pytest.raises(_Terminated):
            run_qemu(HOST, QUERIES, timeout=10.0, qemu=qemu_binary, want_vmm_view=want_vmm_view)
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, old)
    assert len(tracked) == 1


def test_qemu_dying_before_it_connects_is_seen_at_once(
    qemu_binary: str, tracked: list[subprocess.Popen[bytes]]
) -> None:
    """With a vmm view QEMU connects to our QMP socket; one that dies first
    (a bad -cpu) is its own error message at once, not a wait for the timeout."""
    start = time.monotonic()
    with pytest.raises(ProbeError, match="no-such-model"):
        run_qemu("no-such-model", QUERIES, timeout=10.0, qemu=qemu_binary, want_vmm_view=True)
    assert time.monotonic() - start < 5
    assert len(tracked) == 1  # deterministic: not tried again


def _killed_once(tmp_path: Path, qemu_binary: str, *, every_time: bool = False) -> str:
    """A QEMU whose first start (or every one) is SIGKILLed before the guest
    runs: the OOM killer, which this machine cannot produce on demand."""
    once = tmp_path / "started-once"
    script = tmp_path / "qemu-system-x86_64"
    condition = "true" if every_time else f'[ ! -e "{once}" ]'
    script.write_text("#!/bin/sh\n"
                      f'if {condition}; then touch "{once}"; kill -KILL $$; fi\n'
                      f'exec "{qemu_binary}" "$@"\n')  # fmt: skip
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize("want_vmm_view", [False, True], ids=["plain", "vmm-view"])
def test_qemu_killed_by_the_oom_killer_simulated_is_tried_again(
    qemu_binary: str, tracked: list[subprocess.Popen[bytes]], tmp_path: Path,
    want_vmm_view: bool,
) -> None:
    result = run_qemu(HOST, QUERIES, qemu=_killed_once(tmp_path, qemu_binary),
                      want_vmm_view=want_vmm_view)  # fmt: skip
    assert vendor_of((result.observed.get(0, 0, "ebx"), result.observed.get(0, 0, "edx"),
                      result.observed.get(0, 0, "ecx"))) == host_vendor()  # fmt: skip
    assert len(tracked) == 2


def test_qemu_killed_every_time_simulated_gives_up(
    qemu_binary: str, tracked: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    binary = _killed_once(tmp_path, qemu_binary, every_time=True)
    with pytest.raises(TransientError, match=r"status -9 .*\(3 attempts\)") as info:
        run_qemu(HOST, QUERIES, qemu=binary)
    assert len(tracked) == 3
    assert isinstance(info.value.__cause__, TransientError)  # the cause is kept


def test_bad_cpu_model_is_a_probe_error(
    qemu_binary: str, tracked: list[subprocess.Popen[bytes]]
) -> None:
    with pytest.raises(ProbeError, match="no-such-model"):
        run_qemu("no-such-model", QUERIES, qemu=qemu_binary)


def test_missing_qemu_is_a_tool_error(tmp_path: Path) -> None:
    with pytest.raises(ToolError):
        run_qemu(HOST, QUERIES, qemu=str(tmp_path / "no-qemu"))


def test_cpu_arg_cannot_smuggle_options() -> None:
    for bad in ("-daemonize", "host -S", "", "host\0"):
        with pytest.raises(ValueError):
            qemu_backend.qemu_argv("qemu", bad, Path("/i"), Path("/s"))


def test_paths_with_commas_are_escaped() -> None:
    argv = qemu_backend.qemu_argv("qemu", "host", Path("/a,b/i"), Path("/a,b/s"))
    assert "file,id=serial0,path=/a,,b/s" in argv


def test_vmm_view_from_qom_shapes_entries() -> None:
    table = vmm_view_from_qom(
        [
            {"cpuid-register": "ECX", "cpuid-input-eax": 0x80000001, "features": 0x393},
            {"cpuid-register": "EBX", "cpuid-input-eax": 7, "cpuid-input-ecx": 0, "features": 5},
        ]
    )
    assert table.get(0x80000001, 0, "ecx") == 0x393
    assert table.get(7, 0, "ebx") == 5
    assert table.get(7, 1, "ebx") == 0  # indexed: subleaf 1 is not subleaf 0


def test_filtered_features_are_named_by_the_registry_positions() -> None:
    # The positions are the AMD APM's (abm/lzcnt: CPUID 0x80000001 ECX bit 5)
    # and the Intel SDM's (pni/SSE3: CPUID 1 ECX bit 0); the reply has the
    # shape QEMU's X86CPUFeatureWordInfo has in QMP.
    from kvmcpuid_virt.probe.qom import describe_filtered

    words = [
        {"cpuid-input-eax": 0x80000001, "cpuid-register": "ECX", "features": 1 << 5},
        {"cpuid-input-eax": 1, "cpuid-register": "ECX", "features": 0},
        {"cpuid-input-eax": 7, "cpuid-input-ecx": 0, "cpuid-register": "EBX",
         "features": 1 << 5 | 1 << 15},
    ]
    lines = describe_filtered(words)
    assert len(lines) == 2
    assert lines[0].startswith("QEMU filtered out (the host cannot give them): abm ")
    assert "0x80000001 ECX 0x00000020" in lines[0]
    # 7.0 EBX bit 5 is AVX2 (SDM Vol. 2A, CPUID leaf 7); bit 15 (RDT-A) has
    # no name in QEMU 7.2 or libvirt's cpu_map, so it shows as a number.
    assert lines[1].split(": ", 1)[1].startswith("avx2, bit 15 (CPUID 0x7.0 EBX")
