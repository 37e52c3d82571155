"""The QEMU probe backend: boot the CPUID image with `qemu-system-x86_64
-cpu ...` and read what the guest saw from its serial port.

Fast path (the default): one QEMU process, no monitor, no QMP library import.
The command line is the bare `-accel kvm -bios IMAGE` run plus what the probe
needs: `-nodefaults -no-user-config -display none` (no VGA/NIC/config files
to set up), COM1 to a file, isa-debug-exit so the guest's `out 0xf4` ends
QEMU at once, and `-no-reboot` so the image's reset fallbacks end it too.

`want_vmm_view=True` adds what QEMU says it configured: QEMU starts paused
(-S) and connects to a QMP server we listen on (so there is no
connect-retry loop); through kvmcpuid_virt.qmp's Session (the package's one
QMP client) we read the CPU object's `feature-words` and `filtered-features`
QOM properties, then `cont`. The guest cannot exit before we have asked, and
the cost (~tens of ms, mostly the qemu.qmp import and asyncio) is paid only
when asked. A QEMU that dies before it connects (a bad -cpu) ends the wait
at once.

A run that failed transiently (QEMU killed from outside or short of a
resource, a monitor that broke while QEMU ran on: qmp.transient_end) is tried
again within the timeout, at most qmp.ATTEMPTS times; a deterministic failure
is reported at once.

Everything lives in one private temporary directory; QEMU is killed on
timeout, error, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import subprocess
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Final

from kvmcpuid_virt.analysis.backend import Backend
from kvmcpuid_virt.cpuid.table import CpuidTable
from kvmcpuid_virt.errors import InputError, ProbeError, ProbeTimeoutError, ToolError
from kvmcpuid_virt.probe import image, smp_image
from kvmcpuid_virt.probe.qom import describe_filtered, vmm_view_from_qom
from kvmcpuid_virt.probe.result import ProbeResult
from kvmcpuid_virt.probe.smp_image import SmpResult
from kvmcpuid_virt.process import (
    Deadline,
    kill_process,
    private_tempdir,
    qemu_opt_value,
    read_serial,
    start,
)
from kvmcpuid_virt.qmp import (
    QemuExited,
    Session,
    TransientError,
    retrying,
    transient_end,
    transient_oserror,
)

__all__ = ["DEFAULT_MACHINE", "EXIT_STATUS", "SmpResult", "qemu_argv", "run_qemu", "run_qemu_smp"]

log = logging.getLogger(__name__)

# i440fx: measured no slower than q35 here (benchmarks/bench_probe_qemu.py
# prints both) and it has fewer default devices to realize.
DEFAULT_MACHINE: Final = "pc"
# isa-debug-exit makes QEMU exit with (value << 1) | 1.
EXIT_STATUS: Final = (image.DEBUG_EXIT_VALUE << 1) | 1
# Guest RAM: the image needs none; small RAM is less to map and to tear down.
_MEMORY: Final = "16"

# How long a QEMU whose monitor broke may take to exit before the break
# counts as a monitor reset (QEMU still running).
_EXIT_GRACE: Final = 2.0

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
    session: Session, proc: subprocess.Popen[bytes], deadline: Deadline
) -> tuple[CpuidTable, list[str]]:
    """Accept QEMU's QMP connection, read the CPU's feature words, `cont`."""
    from qemu.qmp import QMPError

    try:
        session.accept()
        cpus = session.cmd("query-cpus-fast")
        if not isinstance(cpus, list) or not cpus:
            raise ToolError(f"QEMU reported no CPUs: {cpus!r}")
        path = str(cpus[0]["qom-path"])
        words = session.cmd("qom-get", path=path, property="feature-words")
        filtered = session.cmd("qom-get", path=path, property="filtered-features")
    except TimeoutError as exc:
        raise ProbeTimeoutError(
            f"QEMU did not answer on QMP within {deadline.timeout:g} s"
        ) from exc
    except QemuExited as exc:
        # QEMU died (a bad -cpu, usually): its stderr says why.
        raise _QemuExited() from exc
    except (QMPError, OSError, EOFError) as exc:
        if _exits(proc):
            raise _QemuExited() from exc
        # QEMU runs on, paused, but its monitor broke: a new QEMU may answer.
        raise TransientError(f"QMP conversation with QEMU failed: {exc}") from exc
    assert isinstance(words, list) and isinstance(filtered, list)
    try:
        session.cmd("cont")
    except (QMPError, OSError, EOFError, QemuExited) as exc:
        # The guest may run and end QEMU before the reply to `cont` is read;
        # only a QEMU that is still there and still paused is a failure, and
        # that one the caller's wait turns into a timeout.
        log.debug("QMP cont: %r", exc)
    return vmm_view_from_qom(words), describe_filtered(filtered)


def _exits(proc: subprocess.Popen[bytes]) -> bool:
    """Whether QEMU exits soon (its monitor's EOF comes just before its exit)."""
    try:
        proc.wait(timeout=_EXIT_GRACE)
    except subprocess.TimeoutExpired:
        return False
    return True


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
    msr_queries: Sequence[image.MsrQuery] = (),
) -> ProbeResult:
    """Boot the CPUID image under `qemu -cpu cpu_arg` and return what the guest
    saw (and read of the MSRs of `msr_queries` its CPUID says exist). Raises
    ProbeTimeoutError when the guest has not exited after `timeout` seconds
    (QEMU is killed), ProbeError when its output is missing or broken,
    ToolError when QEMU cannot be run (TransientError when it failed
    transiently every time)."""
    queries = list(queries)
    deadline = Deadline(timeout)
    blob = image.build(queries, msr_queries) if msr_queries else image.build(queries)
    with private_tempdir() as tmp:
        bios = tmp / "image.bin"
        bios.write_bytes(blob)
        # The command line first: a bad -cpu value must fail before anything
        # (a QEMU, the QMP server socket) is there to leak.
        _argv(qemu, cpu_arg, bios, tmp / "serial.log", machine, None)
        numbers = itertools.count(1)

        def attempt() -> ProbeResult:
            # Each attempt its own files: nothing of a failed one is read back.
            n = next(numbers)
            suffix = "" if n == 1 else f"-{n}"
            serial = tmp / f"serial{suffix}.log"
            qmp_socket = tmp / f"qmp{suffix}.sock" if want_vmm_view else None
            argv = _argv(qemu, cpu_arg, bios, serial, machine, qmp_socket)
            return _run_once(qemu, argv, serial, qmp_socket, queries, deadline, msr_queries)

        return retrying(attempt, deadline, "QEMU probe")


def _run_once(qemu: str, argv: list[str], serial: Path, qmp_socket: Path | None,
              queries: list[Query], deadline: Deadline,
              msr_queries: Sequence[image.MsrQuery] = ()) -> ProbeResult:  # fmt: skip
    """One QEMU run: listen (with a vmm view), start, ask, wait, read the serial output."""
    with ExitStack() as stack:
        session: Session | None = None
        if qmp_socket is not None:
            session = stack.enter_context(Session(deadline, name="qemu-probe"))
            _listen(session, qmp_socket)
        started = time.monotonic()
        proc = _start(qemu, argv)
        stack.callback(kill_process, proc)  # even if a signal comes before _run_to_exit
        ended = _run_to_exit(proc, session, deadline)
        seconds = time.monotonic() - started
    return _result(ended, read_serial(serial), queries, seconds, msr_queries)


def _argv(qemu: str, cpu_arg: str, bios: Path, serial: Path, machine: str,
          qmp_socket: Path | None) -> list[str]:  # fmt: skip
    """qemu_argv, with a -cpu value it refuses raised as InputError."""
    try:
        return qemu_argv(qemu, cpu_arg, bios, serial, machine=machine, qmp_socket=qmp_socket)
    except ValueError as exc:
        raise InputError(f"cannot run QEMU with -cpu {cpu_arg!r}: {exc}") from None


def _listen(session: Session, qmp_socket: Path) -> None:
    """The QMP server QEMU will connect to, listening before QEMU starts."""
    from qemu.qmp import QMPError

    try:
        session.listen(str(qmp_socket))
    except (QMPError, OSError) as exc:
        raise ToolError(f"cannot listen for QEMU's QMP connection: {exc}") from exc


def _start(qemu: str, argv: list[str]) -> subprocess.Popen[bytes]:
    """Start QEMU; ToolError (TransientError for a moment's lack of
    processes or memory) when it cannot be run."""
    log.debug("starting %s", argv)
    try:
        return start(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            close_fds=True,
        )
    except OSError as exc:
        kind = TransientError if transient_oserror(exc) else ToolError
        raise kind(f"cannot run {qemu}: {exc}") from exc


def _run_to_exit(
    proc: subprocess.Popen[bytes], session: Session | None, deadline: Deadline
) -> _Ended:
    """Ask QMP (if listening), then wait for QEMU's exit; QEMU is gone however this ends."""
    vmm_view: CpuidTable | None = None
    notes: list[str] = []
    try:
        if session is not None:
            vmm_view, notes = _vmm_view(session, proc, deadline)
        stderr = _wait_for_exit(proc, deadline)
    finally:
        # Timeout, error, Ctrl-C or SIGTERM: no QEMU outlives the run.
        kill_process(proc)
    return _Ended(proc.returncode, stderr, vmm_view, notes)


def _vmm_view(
    session: Session, proc: subprocess.Popen[bytes], deadline: Deadline
) -> tuple[CpuidTable | None, list[str]]:
    """QEMU's configured CPUID and filtered features over QMP, the session closed after."""
    try:
        session.watch(proc)  # QEMU's exit ends any wait at once
        return _query_vmm_view(session, proc, deadline)
    except _QemuExited:
        return None, []  # _result reports it, with QEMU's stderr and exit status
    finally:
        session.close()


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


def _result(ended: _Ended, serial: bytes, queries: list[Query], seconds: float,
            msr_queries: Sequence[image.MsrQuery] = ()) -> ProbeResult:  # fmt: skip
    """The guest's answers from its serial output; ProbeError, with QEMU's
    last words, if bad (TransientError when QEMU ended transiently)."""
    diagnostics = _diagnostics(ended.stderr) + ended.notes
    try:
        observed, read = image.parse_msrs(serial, queries, msr_queries)
    except ProbeError as exc:
        detail = "; ".join(diagnostics[-3:]) or "no message"
        message = f"QEMU exited with status {ended.status} ({detail}): {exc}"
        if transient_end(ended.status, diagnostics):
            raise TransientError(message) from exc  # killed from outside, short of a resource
        raise ProbeError(message) from exc
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
        msrs=read,
    )


def run_qemu_smp(
    cpu_arg: str,
    queries: Sequence[Query],
    smp: str,
    vcpus: int,
    timeout: float = 10.0,
    qemu: str = "qemu-system-x86_64",
    *,
    machine: str = DEFAULT_MACHINE,
) -> SmpResult:
    """Boot probe/smp_image.py under `qemu -cpu cpu_arg -smp smp` (`vcpus`
    vCPUs in all) and return every vCPU's answers. Errors as run_qemu's;
    no monitor (QEMU's view is the single-vCPU probe's business)."""
    queries = list(queries)
    deadline = Deadline(timeout)
    blob = smp_image.build(queries, vcpus, sipi=True)
    with private_tempdir() as tmp:
        bios = tmp / "smp.bin"
        bios.write_bytes(blob)
        serial = tmp / "serial.log"
        argv = [*_argv(qemu, cpu_arg, bios, serial, machine, None), "-smp", smp]
        started = time.monotonic()
        with ExitStack() as stack:
            proc = _start(qemu, argv)
            stack.callback(kill_process, proc)
            ended = _run_to_exit(proc, None, deadline)
        seconds = time.monotonic() - started
        raw = read_serial(serial)
    diagnostics = _diagnostics(ended.stderr)
    try:
        tables = smp_image.parse(raw, queries, vcpus)
    except ProbeError as exc:
        detail = "; ".join(diagnostics[-3:]) or "no message"
        raise ProbeError(f"QEMU (-smp {smp}) exited with status {ended.status} ({detail}): "
                         f"{exc}") from exc
    return SmpResult(tuple(tables), vcpus, seconds, tuple(diagnostics))
