"""A memo of rendered outputs, so that `kvmcpuid-qemu-flags` on an unchanged
host answers in little more than Python's start-up time.

The output is a pure function of: the CPUID table (read live every time, or
the dump's bytes), the policy options, the QEMU binary (path, mtime, size),
the kernel and boot (QEMU's trial start and host expansion depend on them),
libvirt's cpu_map (named models), and this package's own code and registry
data. The key hashes all of them, so a change to any one recomputes. Only
successful runs are memoized; errors are always recomputed and reported.
Imports here are stdlib-only and cheap; nothing of lxml, libvirt or QEMU.
"""

from __future__ import annotations

import os
import sys

from kvmcpuid_virt.host import boot_id

TYPE_CHECKING = False
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
# The code and data the output depends on (relative to the package).
_DEPENDS = (
    "policy/select.py", "policy/qemu_adjust.py", "policy/models.py", "policy/config.py",
    "policy/options.py", "adapters/__init__.py", "adapters/qemu.py", "adapters/libvirt.py",
    "cpuid/features.py", "cpuid/table.py", "cpuid/formats.py", "cpuid/data/features.json",
    "commands/qemu_flags.py", "qmp.py",
)  # fmt: skip
_CPU_MAP = "/usr/share/libvirt/cpu_map"


def _stat(path: str) -> tuple[str, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (path, -1, -1)
    return (path, st.st_mtime_ns, st.st_size)


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
        _stat(_which("qemu-system-x86_64")), _stat(_CPU_MAP),
        _stat(os.path.join(_CPU_MAP, "index.xml")), os.environ.get("XDG_CACHE_HOME", ""),
        os.access("/dev/kvm", os.R_OK | os.W_OK),
    ]  # fmt: skip
    parts += [_stat(os.path.join(_PKG, rel)) for rel in _DEPENDS]
    h.update(repr(parts).encode())
    h.update(table_bytes)
    digest: str = h.hexdigest()
    return digest[:40]


def _path(k: str) -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kvmcpuid_virt", "memo", k)


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
    from kvmcpuid_virt.fsutil import atomic_write

    path = _path(k)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, stdout + "\0" + stderr)
    except OSError:
        pass  # a read-only cache directory only costs speed
