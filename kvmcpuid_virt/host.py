"""Facts about the machine a table was read on: the metadata every dump carries
and the fingerprint caches are keyed by."""

from __future__ import annotations

import os
import time
from functools import cache

from kvmcpuid_virt import __version__

TYPE_CHECKING = False  # the fast path's typing stand-in: docs/ARCHITECTURE.md, Start-up
if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping
    from contextlib import AbstractContextManager

__all__ = [
    "boot_id",
    "cpuinfo_fields",
    "host_metadata",
    "is_this_host",
    "libvirt_version",
    "pinned",
    "qemu_version",
]

# Where the versions are read from without running anything (`kvmcpuid dump`
# must stay within 1.5x of a bare import; a QEMU process costs ~50 ms):
# - libvirt: the library's file name, libvirt.so.0.MAJOR*1000+MINOR.MICRO,
#   found by readlink of the soname link (a few microseconds);
# - QEMU: the first line of Debian's changelog for the package that owns
#   /usr/bin/qemu-system-x86_64 (~1 ms with zlib). Scanning the 18 MB binary
#   for "QEMU emulator version" was measured at ~28 ms, too slow for every dump.
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
_QEMU_CHANGELOGS = (
    "/usr/share/doc/qemu-system-x86/changelog.Debian.amd64.gz",  # binNMU: exact version
    "/usr/share/doc/qemu-system-x86/changelog.Debian.gz",
)
_QEMU_DEBIAN_BINARY = "/usr/bin/qemu-system-x86_64"


def libvirt_version(lib_dirs: tuple[str, ...] = _LIB_DIRS) -> str:
    """'9.0.0' from libvirt.so.0.9000.0; 'unknown' when libvirt is not installed."""
    for d in lib_dirs:
        try:
            target = os.readlink(os.path.join(d, "libvirt.so.0"))
        except OSError:
            continue
        tail = os.path.basename(target).removeprefix("libvirt.so.0.")
        major_minor, _, micro = tail.partition(".")
        if major_minor.isdigit() and (micro.isdigit() or not micro):
            n = int(major_minor)
            return f"{n // 1000}.{n % 1000}.{micro or 0}"
    return "unknown"


def qemu_version(
    changelogs: tuple[str, ...] = _QEMU_CHANGELOGS, binary: str = _QEMU_DEBIAN_BINARY
) -> str:
    """'7.2 (Debian 1:7.2+dfsg-7+deb12u18+b3)': the upstream release and the
    package version of Debian's qemu-system-x86, when its binary is installed;
    'unknown' otherwise (the stable micro release, 7.2.22, is only in the
    binary itself)."""
    if not os.path.exists(binary):
        return "unknown"
    import zlib

    for path in changelogs:
        try:
            with open(path, "rb") as f:
                head = f.read(4096)
            # 31: gzip framing; only the first line is needed.
            text = zlib.decompressobj(31).decompress(head, 256)
        except (OSError, zlib.error):
            continue
        line = text.split(b"\n", 1)[0].decode("ascii", "replace")
        # "qemu (1:7.2+dfsg-7+deb12u18+b3) bookworm; urgency=low"
        start, end = line.find("("), line.find(")")
        if line.startswith("qemu ") and 0 < start < end:
            package = line[start + 1 : end]
            upstream = package.partition(":")[2] or package
            for sep in ("+", "~", "-"):
                upstream = upstream.split(sep, 1)[0]
            return f"{upstream} (Debian {package})"
    return "unknown"


def cpuinfo_fields(*names: str, path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first CPU's values of `names` in /proc/cpuinfo, read in one pass
    ('' for one absent or unreadable)."""
    found = dict.fromkeys(names, "")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                key = key.strip()
                if sep and key in found and not found[key]:
                    found[key] = value.strip()
                if not line.strip():
                    break  # the first CPU's block is enough
    except OSError:
        pass
    return found


def host_metadata(kvm_api_version: int | None = None) -> dict[str, str]:
    """Kernel, KVM API, CPU model and microcode, QEMU and libvirt versions,
    time and tool version: the host's fingerprint, shown by `kvmcpuid diff`."""
    cpu = cpuinfo_fields("model name", "vendor_id", "microcode")
    meta = {
        "kernel": os.uname().release,
        "cpu_model": cpu["model name"],
        "cpu_vendor": cpu["vendor_id"],
        "microcode": cpu["microcode"],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tool_version": __version__,
        "hostname": os.uname().nodename,
        "qemu_version": qemu_version(),
        "libvirt_version": libvirt_version(),
    }
    if kvm_api_version is not None:
        meta["kvm_api_version"] = str(kvm_api_version)
    return meta


# What makes a dump "of this machine as it runs now": what QEMU's start trial
# (toolfacts/learn.trial_start) depends on besides QEMU itself.
_SAME_HOST_KEYS = ("kernel", "cpu_model", "microcode", "hostname")


def is_this_host(meta: Mapping[str, str]) -> bool:
    """Whether a dump's host metadata describes this machine now: the same
    kernel release, CPU model, microcode and hostname."""
    # Microcode may be absent on both sides (some VMs do not show it).
    if not all(meta.get(k) for k in _SAME_HOST_KEYS if k != "microcode"):
        return False
    now = _this_host()
    return all(meta.get(k, "") == now[k] for k in _SAME_HOST_KEYS)


@cache
def _this_host() -> dict[str, str]:
    # Read once per process: `baseline` asks this of every input dump.
    uname = os.uname()
    cpu = cpuinfo_fields("model name", "microcode")
    return {"kernel": uname.release, "cpu_model": cpu["model name"],
            "microcode": cpu["microcode"], "hostname": uname.nodename}  # fmt: skip


def boot_id(path: str = "/proc/sys/kernel/random/boot_id") -> str:
    """This boot's random id ('' when unreadable): caches of anything that
    follows the running kernel and KVM are keyed by it."""
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def pinned(cpu: int | None = None) -> AbstractContextManager[int]:
    """Run the calling thread on one CPU (the lowest it may run on by default)
    inside the `with` block, which gets the CPU number; the old affinity is
    restored on exit. KVM_GET_SUPPORTED_CPUID and the CPUID instruction answer
    for the CPU the thread runs on (APIC IDs, topology), so repeated reads are
    comparable only when pinned."""
    from contextlib import contextmanager

    @contextmanager
    def pin() -> Iterator[int]:
        old = os.sched_getaffinity(0)
        target = min(old) if cpu is None else cpu
        os.sched_setaffinity(0, {target})
        try:
            yield target
        finally:
            os.sched_setaffinity(0, old)

    return pin()
