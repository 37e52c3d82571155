"""Helpers the QEMU and libvirt probe backends share: one private temporary
directory per run, a deadline, starting and killing a child process for sure,
and the sections a signal must not cut in two.

Every backend run owns exactly one private directory (private_tempdir); the
image, the serial log and any socket live in it, so removing it on exit
(normal, error, timeout, Ctrl-C or SIGTERM) leaves nothing behind.

Signals. The command line (cli.main) turns SIGINT and SIGTERM into an
exception raised in the main thread, so every `finally` on the way out runs.
An exception can land between any two bytecodes, though: between creating a
resource and registering its cleanup, or in the middle of that cleanup. So:
- creating and registering, and cleaning up, run in signals_deferred(): a
  signal arriving there is raised when the section ends (cli's handler asks
  defer_signal());
- every child start() started and every directory private_tempdir() made is
  registered until it is gone, and cleanup_leftovers() (which cli runs on its
  way out) finishes what an interrupted cleanup did not.
Library callers that keep Python's own SIGINT handler get KeyboardInterrupt
anywhere, as usual; their children still die with them (dies_with_us).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any, Final

__all__ = [
    "PREFIX",
    "Deadline",
    "cleanup_leftovers",
    "defer_signal",
    "dies_with_us",
    "kill_process",
    "private_tempdir",
    "qemu_opt_value",
    "read_serial",
    "signals_deferred",
    "start",
]

log = logging.getLogger(__name__)

# Every temporary directory and libvirt domain name of the probe starts with
# this, so a test (or an operator) can tell ours from anything else.
PREFIX: Final = "kvmcpuid-probe-"
# A guest that writes without end is broken; bound what we read back.
_SERIAL_LIMIT: Final = 1 << 20


# --- sections a signal must not cut in two ---------------------------------------


class _Deferral:
    """The main thread's signals_deferred() depth and the exception it holds back."""

    depth = 0
    pending: BaseException | None = None


_deferral = _Deferral()


def defer_signal(exc: BaseException) -> bool:
    """For a signal handler (Python runs them in the main thread): hold `exc`
    back until the main thread's current signals_deferred() section ends.
    False when the main thread is in none: the handler raises `exc` itself."""
    if _deferral.depth == 0:
        return False
    if _deferral.pending is None:
        _deferral.pending = exc
    return True


@contextmanager
def signals_deferred() -> Iterator[None]:
    """A section a signal must not cut in two (creating a resource and
    registering it, or cleaning it up): an exception defer_signal() held back
    is raised when the outermost section ends. Other threads get no signal
    exceptions, so there it is a no-op. Keep sections short and bounded."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _deferral.depth += 1
    try:
        yield
    finally:
        _deferral.depth -= 1
        if _deferral.depth == 0 and _deferral.pending is not None:
            exc, _deferral.pending = _deferral.pending, None
            raise exc


# What cleanup_leftovers() finishes: children not yet reaped, directories not
# yet removed. Sets: add and discard are atomic, from any thread.
_children: set[subprocess.Popen[bytes]] = set()
_directories: set[str] = set()


def cleanup_leftovers() -> None:
    """Kill and reap every child start() started and remove every
    private_tempdir() still there: the backstop for a cleanup that a signal
    cut short. The command line runs it on its way out, after the work."""
    for proc in list(_children):
        kill_process(proc)
    for path in list(_directories):
        _remove_tree(path)


@contextmanager
def private_tempdir(mode: int = 0o700) -> Iterator[Path]:
    """A fresh directory (removed on exit, whatever happens). `mode` 0o711 lets
    another user (libvirt's QEMU user) reach files inside it by name without
    being able to list it."""
    name: str | None = None
    try:
        with signals_deferred():
            name = tempfile.mkdtemp(prefix=PREFIX)
            _directories.add(name)
        os.chmod(name, mode)
        yield Path(name)
    finally:
        if name is not None:
            _remove_tree(name)


def _remove_tree(path: str) -> None:
    with signals_deferred():
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            pass  # removed already (cleanup_leftovers after a cut-short cleanup)
        except OSError as exc:
            log.warning("cannot remove %s: %s", path, exc)
        _directories.discard(path)


class Deadline:
    """A point on the monotonic clock; `remaining()` never goes below 0."""

    __slots__ = ("end", "start", "timeout")

    def __init__(self, timeout: float) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        self.timeout = timeout
        self.start = time.monotonic()
        self.end = self.start + timeout

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.end

    def elapsed(self) -> float:
        return time.monotonic() - self.start


@cache
def _setpriv() -> str | None:
    return shutil.which("setpriv")


def dies_with_us(argv: Sequence[str]) -> list[str]:
    """`argv` started through util-linux setpriv(1) with --pdeathsig KILL:
    the kernel kills the child when the thread that started it dies, even by
    SIGKILL, where no cleanup of ours runs. A QEMU started with -S would
    otherwise wait for its monitor forever. setpriv execs the program, so the
    pid is QEMU's. The program must exist (OSError otherwise, as Popen would
    raise); without setpriv, `argv` is returned as it is."""
    program = argv[0]
    found = shutil.which(program)
    if found is None:
        raise FileNotFoundError(2, os.strerror(2), program)
    setpriv = _setpriv()
    return [setpriv, "--pdeathsig", "KILL", "--", *argv] if setpriv else list(argv)


def start(argv: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
    """`subprocess.Popen(dies_with_us(argv), **popen)`, registered for
    cleanup_leftovers() in the same breath (a signal cannot come between).
    kill_process() reaps it and ends the registration."""
    command = dies_with_us(argv)
    with signals_deferred():
        proc: subprocess.Popen[bytes] = subprocess.Popen(command, **popen)
        _children.add(proc)
    return proc


def kill_process(proc: subprocess.Popen[bytes], grace: float = 0.5) -> None:
    """Make sure `proc` is gone and reaped: SIGTERM, then SIGKILL after
    `grace` seconds; then close our ends of its pipes (a timed-out run never
    got to communicate()). Safe to call on a process that already exited, and
    not cut short by a signal (bounded: `grace` plus the reaping of a SIGKILL)."""
    with signals_deferred():
        try:
            if proc.poll() is None:
                log.debug("terminating pid %d", proc.pid)
                try:
                    proc.terminate()
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    log.debug("killing pid %d", proc.pid)
                    proc.kill()
                    proc.wait()
                except ProcessLookupError:
                    proc.wait()
        finally:
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
            if proc.returncode is not None:
                _children.discard(proc)


def qemu_opt_value(value: str) -> str:
    """`value` quoted for a QEMU `key=value,...` option: QEMU splits on commas
    and reads ",," as a literal comma."""
    if "\0" in value or "\n" in value:
        raise ValueError(f"{value!r} cannot be passed in a QEMU option")
    return value.replace(",", ",,")


def read_serial(path: Path) -> bytes:
    """What the guest wrote to its serial file, b"" if it wrote nothing."""
    try:
        with open(path, "rb") as f:
            return f.read(_SERIAL_LIMIT)
    except FileNotFoundError:
        return b""
