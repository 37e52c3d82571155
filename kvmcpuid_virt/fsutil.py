"""Writing output files so that nobody ever sees half of one."""

from __future__ import annotations

import contextlib
import os
import stat
import sys

from kvmcpuid_virt.errors import OutputError

__all__ = ["atomic_write"]


def atomic_write(path: str, data: str | bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` through a temporary file in the same directory and
    a rename, so readers see the old file or the new one, never a torn one.
    `-` writes to standard output; a path that is not a regular file (a
    device or FIFO) is written into, never replaced."""
    raw = data.encode() if isinstance(data, str) else data
    if path == "-":
        sys.stdout.buffer.write(raw)
        sys.stdout.buffer.flush()
        return
    try:
        special = not stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        special = False
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror}") from None
    if special:
        # A device, FIFO or socket (/dev/null, /dev/stdout, a pipe): write
        # into it. Renaming over it would replace /dev/null with a file.
        try:
            with open(path, "wb") as f:
                f.write(raw)
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror}") from None
        return
    directory = os.path.dirname(os.path.abspath(path))
    # Not tempfile.mkstemp: it imports random and hashlib, which the fast
    # `kvmcpuid dump` path cannot afford. O_EXCL gives the same safety.
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{os.urandom(4).hex()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise
