"""A short-lived QEMU with a QMP monitor, spoken to through qemu.qmp: the one
way this package asks a QEMU binary questions (CPU models and their
expansions, the QOM properties of a CPU that was created but never ran).

QEMU gets one end of a socket pair as its monitor (`-chardev socket,fd=N
-mon mode=control`) and qemu.qmp speaks on the other end. There is nothing to
connect to, so no retry loop and no socket file; a QEMU that dies before or
during the conversation (a bad -cpu or -machine) is an end of file at once,
not a wait. A watchdog kills QEMU when `timeout` runs out, which ends any
pending read the same way. QEMU's stderr goes to an unnamed temporary file (a
pipe could fill up), and its last lines say why when QEMU exits early.

qemu.qmp costs tens of milliseconds to import, so it is imported inside the
functions: `kvmcpuid-qemu-flags` imports policy.models, which imports this.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import IO, TYPE_CHECKING, Any, Final

from kvmcpuid_virt.errors import ToolError

if TYPE_CHECKING:
    from qemu.qmp.legacy import QEMUMonitorProtocol

__all__ = ["QMP_TIMEOUT", "default_accel", "monitor", "run_commands"]

log = logging.getLogger(__name__)

# Bounds the whole life of one QEMU (start, every command, quit).
QMP_TIMEOUT: Final = 60.0
# How long QEMU may take to exit after answering `quit`.
_EXIT_GRACE: Final = 2.0
# Lines of QEMU's stderr quoted when it exits early ("error: failed to set
# MSR 0x10a" comes one line before the assertion that aborts QEMU).
_STDERR_LINES: Final = 2


def default_accel() -> str:
    """kvm when /dev/kvm is usable by this process, else tcg."""
    return "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


@contextmanager
def monitor(
    binary: str,
    *,
    machine: str = "none",
    cpu: str | None = None,
    accel: str | None = None,
    extra: Sequence[str] = (),
    timeout: float = QMP_TIMEOUT,
) -> Iterator[QEMUMonitorProtocol]:
    """Start `binary` (an argument list: no shell) with a QMP monitor, yield
    the negotiated qemu.qmp connection, then `quit` QEMU and reap it.

    `machine` "none" has no CPU, which is all model queries need (and it
    avoids vCPU realize, which aborts for `-cpu host` on some nested hosts).
    With `cpu`, QEMU is started stopped (-S): the vCPU exists, never runs.
    `accel` defaults to default_accel(); `extra` is appended to the command
    line. Missing binary, QEMU exiting early, a QMP error reply, and the
    timeout all raise ToolError; QEMU never outlives the block."""
    import socket
    import tempfile
    import threading

    from qemu.qmp import ExecuteError, QMPError
    from qemu.qmp.legacy import QEMUMonitorProtocol

    from kvmcpuid_virt.process import dies_with_us

    ours, theirs = socket.socketpair()
    argv = [binary, "-machine", machine, "-accel", accel or default_accel()]
    if cpu is not None:
        argv += ["-cpu", cpu, "-S"]
    argv += [
        "-nodefaults", "-no-user-config", "-display", "none",
        "-chardev", f"socket,id=qmp,fd={theirs.fileno()}", "-mon", "chardev=qmp,mode=control",
        *extra,
    ]  # fmt: skip
    with ours, tempfile.TemporaryFile() as stderr:
        try:
            # Close our copy of QEMU's end at once: only then is QEMU's exit an EOF.
            with theirs:
                proc = subprocess.Popen(
                    dies_with_us(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    pass_fds=(theirs.fileno(),),
                )  # fmt: skip
        except OSError as exc:
            raise ToolError(f"cannot run {binary}: {exc.strerror or exc}") from None
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            proc.kill()

        watchdog = threading.Timer(timeout, expire)
        watchdog.daemon = True
        watchdog.start()
        qmp = QEMUMonitorProtocol(ours)
        try:
            try:
                qmp.connect()
                qmp.settimeout(timeout)  # a backstop: the watchdog ends reads first
                yield qmp
            except ExecuteError as exc:
                name = exc.sent.get("execute", "?")
                raise ToolError(f"{binary}: QMP {name} failed: {exc}") from None
            except (QMPError, EOFError, OSError) as exc:  # OSError includes TimeoutError
                if expired.is_set():
                    raise ToolError(
                        f"{binary}: QMP did not finish within {timeout:g} s (QEMU killed)"
                    ) from None
                raise _failure(binary, proc, stderr, exc) from exc
            try:
                qmp.cmd("quit")
            except (QMPError, EOFError, OSError) as exc:  # QEMU may go before it answers
                log.debug("QMP quit: %r", exc)
            with suppress(subprocess.TimeoutExpired):  # then it is killed below
                proc.wait(timeout=_EXIT_GRACE)
        finally:
            watchdog.cancel()
            try:
                qmp.close()
            except (QMPError, EOFError, OSError) as exc:  # EOF after quit is normal
                log.debug("QMP disconnect: %r", exc)
            _reap(proc)


def run_commands(
    binary: str,
    commands: Sequence[Mapping[str, Any]],
    *,
    machine: str = "none",
    cpu: str | None = None,
    accel: str | None = None,
    extra: Sequence[str] = (),
    timeout: float = QMP_TIMEOUT,
) -> list[Any]:
    """Run `commands` ({"execute": NAME, "arguments": {...}}, arguments
    optional) against one QEMU (see monitor()) and return each one's "return"
    value, in order. A command's error reply is a ToolError naming it."""
    with monitor(
        binary, machine=machine, cpu=cpu, accel=accel, extra=extra, timeout=timeout
    ) as qmp:
        return [qmp.cmd(c["execute"], **c.get("arguments", {})) for c in commands]


def _failure(
    binary: str, proc: subprocess.Popen[bytes], stderr: IO[bytes], exc: BaseException
) -> ToolError:
    """The error for a conversation that broke: QEMU's own words when it exited."""
    try:
        status = proc.wait(timeout=_EXIT_GRACE)  # EOF comes just before the exit
    except subprocess.TimeoutExpired:
        return ToolError(f"{binary}: QMP conversation failed: {exc!r}")
    stderr.seek(0)
    prefix = f"{os.path.basename(binary)}: "
    lines = [
        line.strip().removeprefix(prefix)
        for line in stderr.read().decode(errors="replace").splitlines()
        if line.strip()
    ]
    detail = "; ".join(lines[-_STDERR_LINES:]) or "no message"
    return ToolError(f"{binary} exited with status {status}: {detail}")


def _reap(proc: subprocess.Popen[bytes]) -> None:
    from kvmcpuid_virt.process import kill_process

    kill_process(proc)
