"""The QEMU probe backend: boot the CPUID image with `qemu-system-x86_64
-cpu ...` and read what the guest saw from its serial port.

Fast path (the default): one QEMU process, no monitor, no QMP library import.
The command line is the bare `-accel kvm -bios IMAGE` run plus what the probe
needs: `-nodefaults -no-user-config -display none` (no VGA/NIC/config files
to set up), COM1 to a file, isa-debug-exit so the guest's `out 0xf4` ends
QEMU at once, and `-no-reboot` so the image's reset fallbacks end it too.

`want_vmm_view=True` adds what QEMU says it configured: QEMU starts paused
(-S) and connects to a QMP server we listen on (so there is no
connect-retry loop); we read the CPU object's `feature-words` and
`filtered-features` QOM properties, then `cont`. The guest cannot exit
before we have asked, and the cost (~tens of ms, mostly the qemu.qmp import
and asyncio) is paid only when asked.

Everything lives in one private temporary directory; QEMU is killed on
timeout, error and Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from kvmcpuid_virt.analysis.backend import Backend
from kvmcpuid_virt.cpuid.table import CpuidTable
from kvmcpuid_virt.errors import InputError, ProbeError, ProbeTimeoutError, ToolError
from kvmcpuid_virt.probe import image
from kvmcpuid_virt.probe.qom import describe_filtered, vmm_view_from_qom
from kvmcpuid_virt.probe.result import ProbeResult
from kvmcpuid_virt.process import (
    Deadline,
    dies_with_us,
    kill_process,
    private_tempdir,
    qemu_opt_value,
    read_serial,
)

if TYPE_CHECKING:
    from qemu.qmp.legacy import QEMUMonitorProtocol

__all__ = ["DEFAULT_MACHINE", "EXIT_STATUS", "qemu_argv", "run_qemu"]

log = logging.getLogger(__name__)

# i440fx: measured no slower than q35 here (benchmarks/bench_probe_qemu.py
# prints both) and it has fewer default devices to realize.
DEFAULT_MACHINE: Final = "pc"
# isa-debug-exit makes QEMU exit with (value << 1) | 1.
EXIT_STATUS: Final = (image.DEBUG_EXIT_VALUE << 1) | 1
# Guest RAM: the image needs none; small RAM is less to map and to tear down.
_MEMORY: Final = "16"

Query = tuple[int, int]



def qemu_argv(
    qemu: str,
    cpu_arg: str,
    bios: Path,
    serial: Path,
    *,
    machine: str = DEFAULT_MACHINE,
    qmp_socket: Path | None = None,
) -> list[str]:
    """The QEMU command line of one probe run (an argument list: no shell)."""
    if not cpu_arg or cpu_arg.startswith("-") or any(c.isspace() or c == "\0" for c in cpu_arg):
        raise ValueError(f"{cpu_arg!r} is not a -cpu value")
    argv = [
        qemu,
        "-accel", "kvm",
        "-machine", machine,
        "-cpu", cpu_arg,
        "-m", _MEMORY,
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-bios", str(bios),
        "-chardev", f"file,id=serial0,path={qemu_opt_value(str(serial))}",
        "-serial", "chardev:serial0",
        "-device", f"isa-debug-exit,iobase={image.DEBUG_EXIT_PORT:#x},iosize=0x04",
        "-no-reboot",
    ]
    if qmp_socket is not None:
        # QEMU is the client: we listen before it starts, so it connects on
        # its first try; -S keeps the vCPU from running until `cont`.
        argv += [
            "-S",
            "-chardev", f"socket,id=qmp,path={qemu_opt_value(str(qmp_socket))}",
            "-mon", "chardev=qmp,mode=control",
        ]
    return argv


def _query_vmm_view(
    qmp: QEMUMonitorProtocol, proc: subprocess.Popen[bytes], deadline: Deadline
) -> tuple[CpuidTable, list[str]]:
    """Accept QEMU's QMP connection, read the CPU's feature words, `cont`."""
    from qemu.qmp import QMPError

    try:
        qmp.accept(timeout=max(deadline.remaining(), 0.001))
        qmp.settimeout(max(deadline.remaining(), 0.001))
        cpus = qmp.cmd("query-cpus-fast")
        if not isinstance(cpus, list) or not cpus:
            raise ToolError(f"QEMU reported no CPUs: {cpus!r}")
        path = str(cpus[0]["qom-path"])
        words = qmp.cmd("qom-get", path=path, property="feature-words")
        filtered = qmp.cmd("qom-get", path=path, property="filtered-features")
    except TimeoutError as exc:
        raise ProbeTimeoutError(
            f"QEMU did not answer on QMP within {deadline.timeout:g} s"
        ) from exc
    except (QMPError, OSError) as exc:
        if proc.poll() is not None:
            # QEMU died (a bad -cpu, usually): its stderr says why.
            raise _QemuExited() from exc
        raise ToolError(f"QMP conversation with QEMU failed: {exc}") from exc
    assert isinstance(words, list) and isinstance(filtered, list)
    try:
        qmp.cmd("cont")
    except (QMPError, OSError, EOFError, TimeoutError) as exc:
        # The guest may run and end QEMU before the reply to `cont` is read;
        # only a QEMU that is still there and still paused is a failure, and
        # that one the caller's wait turns into a timeout.
        log.debug("QMP cont: %r", exc)
    return vmm_view_from_qom(words), describe_filtered(filtered)


def _close_qmp(qmp: QEMUMonitorProtocol) -> None:
    """Disconnect; after `cont` the guest may already have ended QEMU, and
    qemu.qmp then re-raises the reader's EOFError from disconnect()."""
    from qemu.qmp import QMPError

    try:
        qmp.close()
    except (EOFError, OSError, QMPError) as exc:
        log.debug("QMP disconnect: %r", exc)


class _QemuExited(Exception):
    """Internal: QEMU went away during the QMP conversation."""


def _diagnostics(stderr: bytes) -> list[str]:
    """QEMU's stderr as its non-empty lines."""
    return [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]


@dataclasses.dataclass(frozen=True, slots=True)
class _Ended:
    """What a QEMU run left once QEMU is gone: exit status, stderr, the QMP answers."""

    status: int
    stderr: bytes
    vmm_view: CpuidTable | None
    notes: list[str]


def run_qemu(
    cpu_arg: str,
    queries: Sequence[Query],
    timeout: float = 10.0,
    qemu: str = "qemu-system-x86_64",
    *,
    want_vmm_view: bool = False,
    machine: str = DEFAULT_MACHINE,
) -> ProbeResult:
    """Boot the CPUID image under `qemu -cpu cpu_arg` and return what the guest
    saw. Raises ProbeTimeoutError when the guest has not exited after
    `timeout` seconds (QEMU is killed), ProbeError when its output is missing
    or broken, ToolError when QEMU cannot be run."""
    queries = list(queries)
    deadline = Deadline(timeout)
    blob = image.build(queries)
    with private_tempdir() as tmp:
        bios = tmp / "image.bin"
        serial = tmp / "serial.log"
        bios.write_bytes(blob)
        qmp_socket = tmp / "qmp.sock" if want_vmm_view else None
        # The command line first: a bad -cpu value must fail before anything
        # (the QMP server socket) is there to leak.
        argv = _argv(qemu, cpu_arg, bios, serial, machine, qmp_socket)
        qmp = _listen(qmp_socket)
        started = time.monotonic()
        proc = _start(qemu, argv, qmp)
        ended = _run_to_exit(proc, qmp, deadline)
        seconds = time.monotonic() - started
        return _result(ended, read_serial(serial), queries, seconds)


def _argv(qemu: str, cpu_arg: str, bios: Path, serial: Path, machine: str,
          qmp_socket: Path | None) -> list[str]:  # fmt: skip
    """qemu_argv, with a -cpu value it refuses raised as InputError."""
    try:
        return qemu_argv(qemu, cpu_arg, bios, serial, machine=machine, qmp_socket=qmp_socket)
    except ValueError as exc:
        raise InputError(f"cannot run QEMU with -cpu {cpu_arg!r}: {exc}") from None


def _listen(qmp_socket: Path | None) -> QEMUMonitorProtocol | None:
    """The QMP server QEMU will connect to, listening already; None without a vmm view."""
    if qmp_socket is None:
        return None
    from qemu.qmp.legacy import QEMUMonitorProtocol

    return QEMUMonitorProtocol(str(qmp_socket), server=True)


def _start(qemu: str, argv: list[str], qmp: QEMUMonitorProtocol | None) -> subprocess.Popen[bytes]:
    """Start QEMU; ToolError, with the QMP server closed, when it cannot be run."""
    log.debug("starting %s", argv)
    try:
        return subprocess.Popen(
            dies_with_us(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            close_fds=True,
        )
    except OSError as exc:
        if qmp is not None:
            _close_qmp(qmp)
        raise ToolError(f"cannot run {qemu}: {exc}") from exc


def _run_to_exit(
    proc: subprocess.Popen[bytes], qmp: QEMUMonitorProtocol | None, deadline: Deadline
) -> _Ended:
    """Ask QMP (if listening), then wait for QEMU's exit; QEMU is gone however this ends."""
    vmm_view: CpuidTable | None = None
    notes: list[str] = []
    try:
        if qmp is not None:
            vmm_view, notes = _vmm_view(qmp, proc, deadline)
        stderr = _wait_for_exit(proc, deadline)
    finally:
        # Timeout, error or Ctrl-C: no QEMU outlives the run.
        kill_process(proc)
    return _Ended(proc.returncode, stderr, vmm_view, notes)


def _vmm_view(
    qmp: QEMUMonitorProtocol, proc: subprocess.Popen[bytes], deadline: Deadline
) -> tuple[CpuidTable | None, list[str]]:
    """QEMU's configured CPUID and filtered features over QMP, the connection closed after."""
    try:
        return _query_vmm_view(qmp, proc, deadline)
    except _QemuExited:
        return None, []  # _result reports it, with QEMU's stderr and exit status
    finally:
        _close_qmp(qmp)


def _wait_for_exit(proc: subprocess.Popen[bytes], deadline: Deadline) -> bytes:
    """QEMU's stderr once it exits; ProbeTimeoutError when the deadline comes first."""
    try:
        # communicate() drains stderr while waiting, so a chatty QEMU cannot
        # block on a full pipe.
        _, stderr = proc.communicate(timeout=deadline.remaining())
    except subprocess.TimeoutExpired as exc:
        raise ProbeTimeoutError(
            f"QEMU guest did not finish within {deadline.timeout:g} s (killed)"
        ) from exc
    return stderr


def _result(ended: _Ended, serial: bytes, queries: list[Query], seconds: float) -> ProbeResult:
    """The guest's answers from its serial output; ProbeError, with QEMU's last words, if bad."""
    diagnostics = _diagnostics(ended.stderr) + ended.notes
    try:
        observed = image.parse(serial, queries)
    except ProbeError as exc:
        detail = "; ".join(diagnostics[-3:]) or "no message"
        raise ProbeError(f"QEMU exited with status {ended.status} ({detail}): {exc}") from exc
    if ended.status != EXIT_STATUS:
        # The answers are complete and checksummed; an odd exit is worth
        # telling, not failing on.
        diagnostics.append(f"QEMU exited with status {ended.status}, expected {EXIT_STATUS}")
    return ProbeResult(
        observed=observed,
        vmm_view=ended.vmm_view,
        seconds=seconds,
        backend=Backend.QEMU,
        diagnostics=diagnostics,
    )
