"""Files in and out: writing output files so that nobody ever sees half of
one, reading text input with one-line errors, and the cache directory.

This module is on the path of `kvmcpuid dump` (benchmarks/bench_dump.py):
module-level imports stay stdlib-light (no tempfile, logging, typing,
pathlib or hashlib here)."""

from __future__ import annotations

import contextlib
import os
import stat
import sys

from kvmcpuid_virt.errors import InputError, OutputError

TYPE_CHECKING = False  # the fast path's typing stand-in: docs/ARCHITECTURE.md, Start-up
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    from lxml import etree

    from kvmcpuid_virt.cpuid.formats import Dump

__all__ = [
    "MAX_INPUT_BYTES",
    "atomic_write",
    "cache_dir",
    "load_dump",
    "parse_xml_file",
    "read_text",
    "write_cache",
]


def atomic_write(path: str, data: str | bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` through a temporary file in the same directory and
    a rename, so readers see the old file or the new one, never a torn one.
    `-` writes to standard output; a path that is not a regular file (a
    device or FIFO) is written into, never replaced. A symlink is followed:
    the file it points to is replaced and the link stays. An existing file
    keeps its permission bits; a new one gets `mode`."""
    raw = data.encode() if isinstance(data, str) else data
    if path == "-":
        sys.stdout.buffer.write(raw)
        sys.stdout.buffer.flush()
        return
    # Renaming over a symlink would replace the link with a regular file and
    # leave its target stale; write beside the target instead.
    target = os.path.realpath(path)
    try:
        st: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror}") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        # A device, FIFO or socket (/dev/null, /dev/stdout, a pipe): write
        # into it. Renaming over it would replace /dev/null with a file.
        try:
            with open(target, "wb") as f:
                f.write(raw)
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror}") from None
        return
    if st is not None:
        mode = stat.S_IMODE(st.st_mode)  # a chmod 0600 secret must stay 0600
    directory = os.path.dirname(target)
    # Not tempfile.mkstemp: it imports random and hashlib, which the fast
    # `kvmcpuid dump` path cannot afford. O_EXCL gives the same safety.
    name = f".{os.path.basename(target)}.{os.getpid()}.{os.urandom(4).hex()}"
    tmp = os.path.join(directory, name)
    # One try around creating the file too: a signal can land between
    # os.open returning and the next statement (seen in the interrupt sweep),
    # and the temporary file must go then as well.
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror}") from None
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as exc:
        if not isinstance(exc, OutputError):  # OutputError: os.open made nothing
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    # The rename is durable only once the directory entry is on disk; without
    # this a crash can bring back the old file (or no file) after we said it
    # was written. Best effort: some filesystems refuse fsync on a directory,
    # and the data itself is already safe.
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def cache_dir() -> str:
    """This package's cache directory: $XDG_CACHE_HOME/kvmcpuid_virt, or
    ~/.cache/kvmcpuid_virt when it is unset or relative (the XDG base
    directory spec says to ignore a relative value). Not created here."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kvmcpuid_virt")


def write_cache(path: str, text: str, *, warn: bool = False) -> bool:
    """Write a cache file (creating its directory), best effort: a cache that
    cannot be written only costs speed, so failure is logged (at debug, or at
    warning when `warn`: for caches whose loss is expensive) and reported as
    False, never raised."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, text)
    except (OSError, OutputError) as exc:
        # Imported only here: logging costs ~10 ms, more than the budget of
        # the fast commands that call this on success.
        import logging

        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        logging.getLogger(__name__).log(
            logging.WARNING if warn else logging.DEBUG, "cannot write cache %s: %s", path, reason
        )
        return False
    return True


# What read_text takes at most. The biggest real input is a dump of
# MAX_ENTRIES (4096) entries, ~0.6 MB as JSON; a domain XML is a few KiB.
# Without a cap, `--from /dev/zero` or a runaway pipe would eat memory.
MAX_INPUT_BYTES = 16 * 1024 * 1024
_CHUNK = 64 * 1024


def _read_upto(f: Any, limit: int) -> bytes:
    """At most `limit` bytes of an unbuffered file, to its end. Each read
    allocates what it asks for, so a read of `limit` at once cost all 16 MiB
    for every small dump (a 2000-dump baseline paid ~40 ms for it): a
    regular file is asked for its own size plus one byte (to see the end, or
    that it grew), then, like a device or a pipe, in 64 KiB pieces."""
    try:
        size = os.fstat(f.fileno()).st_size
    except OSError:
        size = 0
    parts: list[bytes] = []
    got = 0
    want = size + 1 if size else _CHUNK
    while got < limit:
        more = f.read(min(want, limit - got))
        if not more:
            break
        parts.append(more)
        got += len(more)
        want = _CHUNK
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _read_capped(path: str, source: str, *, stdin: bool = False) -> bytes:
    """At most MAX_INPUT_BYTES of `path` (or of standard input), else InputError."""
    try:
        if stdin:
            # Bytes, not sys.stdin's text layer: its encoding follows the
            # locale, and a non-UTF-8 stdin must get the same error as a file.
            raw = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
        else:
            with open(path, "rb", buffering=0) as f:
                raw = _read_upto(f, MAX_INPUT_BYTES + 1)
    except OSError as exc:
        raise InputError(f"{source}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_INPUT_BYTES:
        raise InputError(
            f"{source}: larger than {MAX_INPUT_BYTES >> 20} MiB; refusing (dumps and XML "
            "inputs are far smaller)"
        )  # fmt: skip
    return raw


def read_text(path: str) -> tuple[str, str]:
    """(text, source name) of a UTF-8 text file, or of standard input for
    `-` (named `<stdin>`), of at most MAX_INPUT_BYTES, as it is (a byte
    order mark too: `--patch` keeps every byte outside <cpu>). Errors are
    one-line InputErrors naming the source: `SOURCE: cannot read: STRERROR`,
    `SOURCE: larger than 16 MiB...`, `SOURCE: not UTF-8 text (byte B at offset N)`."""
    source = "<stdin>" if path == "-" else path
    raw = _read_capped(path, source, stdin=path == "-")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        # The byte offset locates it (tests/test_fsutil.py pins this message).
        raise InputError(
            f"{source}: not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start})"
        ) from None
    return text, source


def load_dump(path: str) -> Dump:
    """Read a dump in any supported format (`-` is standard input). Every
    error, reading included, is a DumpFormatError naming the source."""
    from kvmcpuid_virt.cpuid.canonical import loads
    from kvmcpuid_virt.errors import DumpFormatError

    try:
        text, source = read_text(path)
    except InputError as exc:
        # read_text's message is "SOURCE: REASON", which is exactly what
        # DumpFormatError(SOURCE, None, REASON) prints; keep the type callers
        # catch (and its .source) without changing the message.
        source = "<stdin>" if path == "-" else path
        raise DumpFormatError(source, None, str(exc).removeprefix(f"{source}: ")) from None
    return loads(text, source)


def parse_xml_file(path: str | Path) -> etree._Element:
    """Parse an XML file with the hardened parser (see xmlutil.parse_xml)."""
    from kvmcpuid_virt.errors import DumpFormatError
    from kvmcpuid_virt.xmlutil import parse_xml

    try:
        data = _read_capped(str(path), str(path))
    except InputError as exc:
        raise DumpFormatError(str(path), None, str(exc).removeprefix(f"{path}: ")) from None
    return parse_xml(data, str(path))
