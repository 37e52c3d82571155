"""Install, remove and check the libvirt hook (libvirt_hook runs inside it).

The hook goes to /etc/libvirt/hooks/qemu.d/kvmcpuid (libvirt >= 6.5 runs
every executable there, after /etc/libvirt/hooks/qemu); someone else's
/etc/libvirt/hooks/qemu is left as it is. With an older libvirt, which runs
only /etc/libvirt/hooks/qemu, the hook is installed as that file when it does
not exist, and installing is refused (with how to call ours from theirs) when
it is someone else's.

The installed file is a /bin/sh script that carries its own manifest
(`#kvmcpuid-hook: KEY=VALUE` lines): the mode, the fail-open/closed choice,
the absolute paths the hook needs (Python, the package, the cache, QEMU, the
log: a hook runs with libvirt's minimal environment, whatever its cwd and
HOME), and what installing created, so that `uninstall` removes exactly
that. Installing learns the tool facts (QEMU is asked once, here, so that the
hook never has to) and then makes libvirt look for hooks again (daemon.reload,
or daemon.restart with `restart=True`); a canary domain proves the hook active.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import sys
import sysconfig
import time
import uuid
from collections.abc import Callable
from typing import Any, Final

import kvmcpuid_virt
from kvmcpuid_virt import daemon as daemons
from kvmcpuid_virt.errors import InputError, OutputError, ToolError
from kvmcpuid_virt.fsutil import atomic_write, cache_dir
from kvmcpuid_virt.libvirt_hook import (
    CANARY_PREFIX,
    MANIFEST_TAG,
    WATCHDOG_SECONDS,
    parse_manifest,
)
from kvmcpuid_virt.probe.libvirt import domain_log
from kvmcpuid_virt.toolfacts.cached import cached_facts
from kvmcpuid_virt.toolfacts.learn import find_qemu
from kvmcpuid_virt.toolfacts.learn import learn as learn_facts

__all__ = [
    "DEFAULT_LOG",
    "HOOKS_DIR",
    "HOOK_NAME",
    "Status",
    "canary",
    "hook_path",
    "install",
    "render_script",
    "status",
    "uninstall",
]

HOOKS_DIR: Final = "/etc/libvirt/hooks"
HOOK_NAME: Final = "kvmcpuid"
DEFAULT_LOG: Final = "/var/log/libvirt/kvmcpuid-hook.log"
QEMU_D_SINCE: Final = (6, 5, 0)  # libvirt runs hooks/qemu.d/* since 6.5.0
CANARY_SECONDS: Final = 10.0

# How the installed script starts Python: -I (no PYTHON* variables, no user
# site, no cwd on sys.path) -S (no site: its .pth processing costs ~14 ms
# here; the paths it would add are written into the script instead).
_SCRIPT: Final = """#!/bin/sh
# kvmcpuid_virt's libvirt hook, installed by `kvmcpuid hook install`
# (`kvmcpuid hook uninstall` removes it). On `prepare begin` (a start),
# `restore begin` and `migrate begin` (incoming) it checks the domain's CPU
# against this host; every other operation ends here, without reading stdin.
{manifest}
case "$2 $3" in
"prepare begin"|"restore begin"|"migrate begin") ;;
*) exit 0 ;;
esac
case "$1" in
{canary}*|{domains}) ;;
*) exit 0 ;;
esac
exec {python} -IS -c {code} "$0" "$@"
"""


def hook_path(hooks_dir: str = HOOKS_DIR, version: tuple[int, ...] = QEMU_D_SINCE) -> str:
    """Where the hook goes for a daemon of libvirt `version`."""
    if tuple(version) >= QEMU_D_SINCE:
        return os.path.join(hooks_dir, "qemu.d", HOOK_NAME)
    return os.path.join(hooks_dir, "qemu")


def _safe(value: str, what: str) -> str:
    if not value or any(c in value for c in "'\n\r\0"):
        raise InputError(f"{what} {value!r}: the hook cannot carry it (empty, a quote or a "
                         "line break)")  # fmt: skip
    return value


def python_paths() -> list[str]:
    """What sys.path needs under `python -IS`: the directory holding this
    package (an editable install's source tree too) and site-packages."""
    top = os.path.dirname(os.path.dirname(os.path.abspath(kvmcpuid_virt.__file__)))
    paths = [top]
    for key in ("purelib", "platlib"):
        p = sysconfig.get_paths()[key]
        if p not in paths:
            paths.append(p)
    return paths


# A --domains pattern goes into a `case` unquoted (so that it globs): only
# characters that cannot end the pattern or start another command.
_PATTERN_CHARS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-+:@*?[]!"
)


def render_script(manifest: list[tuple[str, str]], python: str, paths: list[str],
                  domains: str = "*") -> str:  # fmt: skip
    """The hook's text: the manifest lines, the operation and domain-name
    filters (`domains`: a shell glob), and the exec of `python` with `paths`
    on sys.path."""
    if not domains or not set(domains) <= _PATTERN_CHARS:
        raise InputError(f"--domains {domains!r}: a glob of letters, digits and _.-+:@*?[]!")
    for key, value in manifest:
        _safe(value, key)
    code = (f"import sys; sys.path[:0] = {[_safe(p, 'path') for p in paths]!r}; "
            "from kvmcpuid_virt.libvirt_hook import main; sys.exit(main())")  # fmt: skip
    lines = "\n".join(f"{MANIFEST_TAG}{k}={v}" for k, v in manifest)
    return _SCRIPT.format(manifest=lines, python=shlex.quote(_safe(python, "python")),
                          code=shlex.quote(code), canary=CANARY_PREFIX,
                          domains=domains)  # fmt: skip


def read_manifest(path: str) -> dict[str, list[str]] | None:
    """The manifest of our hook at `path`; None when there is no file; an
    empty dict when it is someone else's."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse_manifest(f.read())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None


# --- the daemon: is the hook active, make it so ---------------------------------------


def _libvirt() -> object:
    try:
        import libvirt
    except ImportError:
        raise ToolError("the hook's activation check needs libvirt-python "
                        "(pip install libvirt-python)") from None  # fmt: skip
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def _canary_xml(name: str) -> str:
    # TCG, no devices: if no hook refuses it, it starts (paused) even where
    # libvirt's QEMU cannot open /dev/kvm, and is destroyed at once.
    return (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>16</memory>"
            "<vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os>"
            "<devices><memballoon model='none'/><controller type='usb' model='none'/>"
            "</devices></domain>")  # fmt: skip


def canary(uri: str) -> bool:
    """Whether libvirt at `uri` runs the hook now: a transient domain named
    CANARY_PREFIX... is refused by the hook at `prepare begin`, before any
    QEMU starts. Without the hook it starts (paused, autodestroy) and is
    destroyed again."""
    libvirt: Any = _libvirt()
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise ToolError(f"{uri}: {' '.join(str(exc).split())}") from None
    name = CANARY_PREFIX + uuid.uuid4().hex[:12]
    try:
        flags = libvirt.VIR_DOMAIN_START_PAUSED | libvirt.VIR_DOMAIN_START_AUTODESTROY
        try:
            dom = conn.createXML(_canary_xml(name), flags)
        except libvirt.libvirtError as exc:
            if "kvmcpuid hook: active" in str(exc):
                return True
            raise ToolError(f"{uri}: cannot tell whether the hook runs: "
                            f"{' '.join(str(exc).split())}") from None  # fmt: skip
        with contextlib.suppress(libvirt.libvirtError):
            dom.destroy()  # autodestroy removes it with the connection anyway
        return False
    finally:
        conn.close()
        # libvirt opens the domain's log even for a start the hook refuses:
        # a canary must leave nothing behind.
        log = domain_log(uri, name)
        if log is not None:
            with contextlib.suppress(OSError):
                log.unlink()


def _answers(uri: str) -> Callable[[], bool]:
    def check() -> bool:
        libvirt: Any = _libvirt()
        try:
            conn = libvirt.open(uri)
        except libvirt.libvirtError:
            return False
        conn.close()
        return True

    return check


def _activate(uri: str, restart: bool, want: bool) -> list[str]:
    """Make libvirt at `uri` (re)scan for hooks and wait until the canary
    says the hook is `want` (active or not). A reload first; if the daemon
    still does not see it, a restart."""
    said: list[str] = []
    d = daemons.find_daemon()
    if d is None:
        return ["no libvirt daemon runs: it looks for hooks when it starts"]
    if restart:
        said.append(daemons.restart(d, _answers(uri)))
    else:
        said.append(daemons.reload(d))
    end = time.monotonic() + CANARY_SECONDS
    while canary(uri) != want:
        if time.monotonic() > end:
            if restart:
                raise ToolError(f"libvirt at {uri} still {'does not run' if want else 'runs'} "
                                "the hook after a restart")  # fmt: skip
            return [*said, *_activate(uri, True, want)]  # the reload did not do it
        time.sleep(0.2)
    return said


# --- install, uninstall, status --------------------------------------------------------


def _daemon_version(uri: str) -> tuple[int, int, int]:
    libvirt: Any = _libvirt()
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise ToolError(f"{uri}: {' '.join(str(exc).split())}") from None
    try:
        v = int(conn.getLibVersion())
    finally:
        conn.close()
    return (v // 1_000_000, v // 1000 % 1000, v % 1000)


def install(*, mode: str = "enforce", fail_closed: bool = False, uri: str = "qemu:///system",
            hooks_dir: str = HOOKS_DIR, log: str = DEFAULT_LOG, restart: bool = False,
            version: tuple[int, int, int] | None = None, activate: bool = True,
            domains: str = "*",
            learn: Callable[[], object] | None = None) -> list[str]:  # fmt: skip
    """Install (or reinstall) the hook and make it active; what was done, one
    line each. `domains`: judge only domains whose name matches this shell
    glob (the others pass untouched). `learn` refreshes the tool facts the
    hook reads (default: toolfacts.learn.learn, which may ask QEMU once)."""
    if mode not in ("enforce", "warn"):
        raise InputError(f"--mode {mode!r}: enforce or warn")
    if not os.path.isdir(os.path.dirname(log)):
        raise InputError(f"--log {log}: no directory {os.path.dirname(log)}")
    version = version or _daemon_version(uri)
    path = hook_path(hooks_dir, version)
    said: list[str] = []
    old = read_manifest(path)
    if old == {}:
        raise InputError(
            f"{path} is someone else's hook, and libvirt {'.'.join(map(str, version))} runs only "
            f"that one (qemu.d/ needs libvirt >= 6.5): not replacing it. Install with "
            f"--hooks-dir elsewhere and call it from {path}: `HOOK \"$@\" || exit $?` with "
            "the domain XML passed on stdin"
        )
    # The facts the hook reads, learned first (QEMU asked once, here): an
    # error here leaves nothing written.
    (learn or learn_facts)()
    created = list(old.get("created", [])) if old else []
    for d in (hooks_dir, os.path.dirname(path)):
        if not os.path.isdir(d):
            try:
                os.mkdir(d, 0o755)
            except OSError as exc:
                raise OutputError(f"cannot create {d}: {exc.strerror}") from None
            created.append(d)
            said.append(f"created {d}")
    theirs = os.path.join(hooks_dir, "qemu")
    if path != theirs and os.path.exists(theirs) and read_manifest(theirs) == {}:
        said.append(f"left {theirs} (someone else's hook) as it is: libvirt runs it first, "
                    f"then every executable in {os.path.dirname(path)}/")  # fmt: skip
    log_existed = old.get("log_existed", ["no"])[-1] if old else (
        "yes" if os.path.exists(log) else "no")  # fmt: skip
    manifest = [
        ("mode", mode),
        ("fail", "closed" if fail_closed else "open"),
        ("cache", os.path.dirname(cache_dir())),
        ("qemu", find_qemu() or "-"),
        ("log", log),
        ("log_existed", log_existed),
        ("activate", "restart" if restart else "reload"),
        ("domains", domains),
        *(("created", d) for d in created),
    ]
    script = render_script(manifest, sys.executable, python_paths(), domains)
    atomic_write(path, script, mode=0o755)
    try:
        os.chmod(path, 0o755)  # atomic_write keeps an old file's mode
    except OSError as exc:
        raise OutputError(f"cannot make {path} executable: {exc.strerror}") from None
    scope = "" if domains == "*" else f", only domains matching {domains}"
    said.append(f"{'reinstalled' if old else 'installed'} {path} (mode {mode}, "
                f"fail-{'closed' if fail_closed else 'open'}, log {log}{scope})")  # fmt: skip
    if activate:
        said.extend(_activate(uri, restart, True))
        said.append(f"active: libvirt at {uri} runs it")
    return said


def uninstall(*, uri: str = "qemu:///system", hooks_dir: str = HOOKS_DIR,
              version: tuple[int, int, int] | None = None,
              activate: bool = True) -> list[str]:  # fmt: skip
    """Remove the hook and everything installing it created (the log and the
    verdict memo it wrote, the directories it made, if empty), and make
    libvirt look for hooks again, as installing did."""
    version = version or _daemon_version(uri)
    path = hook_path(hooks_dir, version)
    manifest = read_manifest(path)
    if manifest is None:
        return [f"not installed: no {path}"]
    if not manifest:
        raise InputError(f"{path} is not kvmcpuid's hook: not removing it")
    said = []
    _remove(path)
    said.append(f"removed {path}")
    if activate:
        restart = manifest.get("activate", ["reload"])[-1] == "restart"
        said.extend(_activate(uri, restart, False))
    # A hook started before the unlink may still write its log or memo.
    _wait_for_running_hooks()
    log = manifest.get("log", [DEFAULT_LOG])[-1]
    if manifest.get("log_existed", ["no"])[-1] == "no" and os.path.exists(log):
        _remove(log)
        said.append(f"removed {log}")
    memo = os.path.join(manifest.get("cache", [""])[-1], "kvmcpuid_virt", "hook-memo")
    if os.path.isdir(memo):
        for entry in os.listdir(memo):
            _remove(os.path.join(memo, entry))
        _remove(memo, directory=True)
        said.append(f"removed {memo}")
    for d in reversed(manifest.get("created", [])):
        try:
            os.rmdir(d)
            said.append(f"removed {d}")
        except OSError:
            said.append(f"kept {d}: not empty (someone else's files)")
    return said


def _remove(path: str, *, directory: bool = False) -> None:
    try:
        (os.rmdir if directory else os.unlink)(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise OutputError(f"cannot remove {path}: {exc.strerror}") from None


def _running_hooks() -> list[int]:
    """Pids of hook processes running now (libvirt_hook.main under -IS)."""
    mine = b"kvmcpuid_virt.libvirt_hook import main"
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if mine in f.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


def _wait_for_running_hooks() -> None:
    # Bounded by the hook's own watchdog.
    end = time.monotonic() + WATCHDOG_SECONDS + 1
    while _running_hooks() and time.monotonic() < end:
        time.sleep(0.05)


@dataclasses.dataclass(frozen=True)
class Status:
    active: bool
    lines: tuple[str, ...]


def status(*, uri: str = "qemu:///system", hooks_dir: str = HOOKS_DIR,
           version: tuple[int, int, int] | None = None) -> Status:  # fmt: skip
    """Whether the hook is installed and libvirt runs it (the canary), and
    what it will judge with (fresh or stale tool facts, host control)."""
    version = version or _daemon_version(uri)
    path = hook_path(hooks_dir, version)
    manifest = read_manifest(path)
    if not manifest:
        return Status(False, (f"not installed: {path} " + (
            "does not exist" if manifest is None else "is someone else's hook"),))  # fmt: skip
    lines = [f"installed: {path} (mode {manifest['mode'][-1]}, fail-{manifest['fail'][-1]}, "
             f"log {manifest['log'][-1]})"]  # fmt: skip
    lines.append(_facts_line(manifest))
    theirs = os.path.join(hooks_dir, "qemu")
    if path != theirs and os.path.exists(theirs):
        lines.append(f"also present: {theirs} (libvirt runs it first)")
    active = canary(uri)
    lines.append(f"active: libvirt at {uri} runs it" if active else
                 f"not active: libvirt at {uri} does not run it (kvmcpuid hook install "
                 "makes it look for hooks again)")  # fmt: skip
    return Status(active, tuple(lines))


def _facts_line(manifest: dict[str, list[str]]) -> str:
    """Whether the tool facts the hook reads are fresh (learned for this
    QEMU, kernel and boot)."""
    qemu = manifest.get("qemu", ["-"])[-1]
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = manifest.get("cache", [""])[-1]
    try:
        stale = cached_facts(None if qemu == "-" else qemu).stale
    finally:
        if old is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = old
    if stale is None:
        return f"tool facts: fresh (QEMU {qemu}, this kernel and boot)"
    return (f"tool facts: stale ({stale}): the hook judges without QEMU's facts until "
            "`kvmcpuid hook install` runs again")  # fmt: skip

