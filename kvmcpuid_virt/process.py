"""Helpers the QEMU and libvirt probe backends share: one private temporary
directory per run, a deadline, and killing a child process for sure.

Every backend run owns exactly one `tempfile.TemporaryDirectory`; the image,
the serial log and any socket live in it, so removing it on exit (normal,
error, timeout or Ctrl-C) leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Final

__all__ = [
    "PREFIX",
    "Deadline",
    "dies_with_us",
    "kill_process",
    "private_tempdir",
    "qemu_opt_value",
    "read_serial",
]

log = logging.getLogger(__name__)

# Every temporary directory and libvirt domain name of the probe starts with
# this, so a test (or an operator) can tell ours from anything else.
PREFIX: Final = "kvmcpuid-probe-"
# A guest that writes without end is broken; bound what we read back.
_SERIAL_LIMIT: Final = 1 << 20


@contextmanager
def private_tempdir(mode: int = 0o700) -> Iterator[Path]:
    """A fresh directory (removed on exit, whatever happens). `mode` 0o711 lets
    another user (libvirt's QEMU user) reach files inside it by name without
    being able to list it."""
    with tempfile.TemporaryDirectory(prefix=PREFIX) as name:
        path = Path(name)
        os.chmod(path, mode)
        yield path


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


def kill_process(proc: subprocess.Popen[bytes], grace: float = 0.5) -> None:
    """Make sure `proc` is gone and reaped: SIGTERM, then SIGKILL after
    `grace` seconds; then close our ends of its pipes (a timed-out run never
    got to communicate()). Safe to call on a process that already exited."""
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
