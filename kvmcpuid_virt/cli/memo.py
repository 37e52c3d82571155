"""A memo of rendered outputs, so that `kvmcpuid-qemu-flags` on an unchanged
host answers in little more than Python's start-up time.

The output is a pure function of: the CPUID table (read live every time, or
the dump's bytes), the policy options, the QEMU binary (path, mtime, size),
the kernel and boot (QEMU's trial start and host expansion depend on them),
libvirt's cpu_map (named models), and this package's own code and registry
data (every *.py and *.json file in it). The key hashes all of them, so a
change to any one recomputes. Only successful runs are memoized; errors are
always recomputed and reported.
Imports here are stdlib-only and cheap; nothing of lxml, libvirt or QEMU.
"""

from __future__ import annotations

import os
import sys

from kvmcpuid_virt.fsutil import cache_dir, write_cache
from kvmcpuid_virt.host import boot_id
from kvmcpuid_virt.stamps import file_stamps, stamp

TYPE_CHECKING = False  # the fast path's typing stand-in: docs/ARCHITECTURE.md, Start-up
if TYPE_CHECKING:
    from hashlib import sha256
else:
    try:
        # The builtin SHA-256 costs ~0.1 ms to import; hashlib loads OpenSSL
        # (~3 ms), a tenth of the whole time budget of this command.
        from _sha256 import sha256
    except ImportError:  # other Python builds (3.12 renamed it _sha2)
        from hashlib import sha256

__all__ = ["key", "load", "store"]

_PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CPU_MAP = "/usr/share/libvirt/cpu_map"


def _package_files(top: str) -> list[tuple[str, int, int]]:
    """The stamps of every *.py and *.json file under the package. All of
    them, not a hand-kept list of what the output depends on: that list went
    stale (it missed analysis/baseline.py behind --max-model, host.py, this
    module, cpuid/fields.py)."""
    return file_stamps(top, (".py", ".json"))


def _which(name: str) -> str:
    explicit = os.environ.get("KVMCPUID_QEMU")
    if explicit:
        return explicit
    for d in os.environ.get("PATH", os.defpath).split(os.pathsep):
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return os.path.realpath(p)
    return ""


def key(command: str, options: tuple[object, ...], table_bytes: bytes) -> str:
    """The memo key of one invocation."""
    h = sha256()
    parts: list[object] = [
        command, options, sys.version_info[:2], os.uname().release, boot_id(),
        stamp(_which("qemu-system-x86_64")), stamp(_CPU_MAP),
        stamp(os.path.join(_CPU_MAP, "index.xml")), os.environ.get("XDG_CACHE_HOME", ""),
        os.access("/dev/kvm", os.R_OK | os.W_OK),
    ]  # fmt: skip
    parts += _package_files(_PKG)
    h.update(repr(parts).encode())
    h.update(table_bytes)
    digest: str = h.hexdigest()
    return digest[:40]


def _path(k: str) -> str:
    return os.path.join(cache_dir(), "memo", k)


def load(k: str) -> tuple[str, str] | None:
    """(stdout, stderr) of an earlier successful run with this key."""
    try:
        with open(_path(k), encoding="utf-8") as f:
            data = f.read()
    except (OSError, UnicodeDecodeError):
        return None
    out, sep, err = data.partition("\0")
    return (out, err) if sep else None


def store(k: str, stdout: str, stderr: str) -> None:
    """Remember a successful run, best effort: an unwritable cache directory
    only costs speed (fsutil.write_cache logs it at debug level)."""
    write_cache(_path(k), stdout + "\0" + stderr)
