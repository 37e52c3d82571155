"""The libvirt daemon of this machine as a process: find it, make it look
for hooks again, restart it the way it was started.

libvirt scans for hook scripts when the daemon starts and again on SIGHUP
(remote_daemon.c: the reload handler calls virHookCall(DAEMON, RELOAD),
which re-runs virHookInitialize), so a reload is enough to make a new hook
active, without dropping any client connection. `systemctl reload` does the
same (libvirtd.service: ExecReload=/bin/kill -HUP $MAINPID). A restart is
there for whoever wants one: through systemctl when systemd runs the daemon,
else by starting the same command line (under the same wrapper, e.g.
`tini -s -- libvirtd` here, with the same working directory, environment
and output files) after the old one exited.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Final

from kvmcpuid_virt.errors import ToolError

__all__ = ["DAEMONS", "Daemon", "find_daemon", "reload", "restart"]

# The daemons that run QEMU domains and their hooks: the monolithic one, and
# the modular QEMU driver daemon (libvirt >= 5.6).
DAEMONS: Final = ("libvirtd", "virtqemud")
# Wrappers a daemon may run under without systemd (child subreapers that
# reap at once: docs/libvirt-teardown.md); a restart starts the wrapper again.
WRAPPERS: Final = ("tini", "dumb-init")
STOP_SECONDS: Final = 30.0


@dataclasses.dataclass(frozen=True)
class Daemon:
    """A running daemon: its pid and start time (clock ticks after boot,
    /proc/PID/stat field 22: a pid alone may be reused), and the systemd unit
    that runs it ('' when systemd does not)."""

    pid: int
    name: str
    start_ticks: int
    unit: str = ""

    def alive(self) -> bool:
        """Still this process (not a zombie, not a reused pid)."""
        return not _gone(self.pid, self.start_ticks)


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in ticks) of a process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    # comm (field 2) is parenthesised and may hold spaces: split after it.
    rest = text[text.rfind(")") + 2:].split()
    return rest[0], int(rest[19])


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        text = f.read()
    return int(text[text.rfind(")") + 2:].split()[1])


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def _cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode("utf-8", "surrogateescape") for a in f.read().split(b"\0")[:-1]]


def _unit(pid: int) -> str:
    """The systemd service whose cgroup holds the process, '' if none."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    for line in lines:
        for part in reversed(line.rpartition(":")[2].split("/")):
            if part.endswith(".service"):
                return part
    return ""


def find_daemon(names: Sequence[str] = DAEMONS) -> Daemon | None:
    """The running libvirt daemon that owns QEMU domains (virtqemud where it
    runs, else libvirtd), None when none runs (a socket-activated one starts
    on the next connection and scans for hooks then)."""
    found: dict[str, Daemon] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        name = _comm(pid)
        if name not in names or name in found or not _our_root(pid):
            continue
        info = _stat(pid)
        if info is None or info[0] == "Z":
            continue  # a daemon killed a moment ago lingers as a zombie
        found[name] = Daemon(pid, name, info[1], _unit(pid) if _systemd() else "")
    for name in reversed(DAEMONS):
        if name in found:
            return found[name]
    return None


def _our_root(pid: int) -> bool:
    """Whether process `pid` sees the same root directory as we do: in a
    chroot sharing the host's PID namespace the host's daemon is visible in
    /proc but is not this root's, and must never be signalled."""
    try:
        theirs, ours = os.stat(f"/proc/{pid}/root"), os.stat("/")
    except OSError:
        return False
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def _systemd() -> bool:
    return os.path.isdir("/run/systemd/system") and shutil.which("systemctl") is not None


def reload(daemon: Daemon) -> str:
    """Make the daemon look for hooks again (SIGHUP); what was done, in words."""
    try:
        os.kill(daemon.pid, signal.SIGHUP)
    except OSError as exc:
        raise ToolError(f"cannot signal {daemon.name} (pid {daemon.pid}): {exc.strerror}") from None
    return f"reloaded {daemon.name} (SIGHUP to pid {daemon.pid}), so that it looks for hooks again"


def restart(daemon: Daemon, answers: Callable[[], bool], *,
            run: Callable[[Sequence[str]], object] = subprocess.check_call,
            timeout: float = STOP_SECONDS) -> str:  # fmt: skip
    """Restart the daemon the way it runs now and wait until `answers()` (a
    client connection succeeds); what was done, in words."""
    if daemon.unit:
        try:
            run(["systemctl", "restart", daemon.unit])
        except (OSError, subprocess.CalledProcessError) as exc:
            raise ToolError(f"systemctl restart {daemon.unit}: {exc}") from None
        how = f"restarted {daemon.unit} (systemctl restart)"
    else:
        try:
            how = _relaunch(daemon, timeout)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise ToolError(f"cannot restart {daemon.name} (pid {daemon.pid}): {exc}") from None
    _wait(answers, timeout, f"{daemon.name} did not answer within {timeout:.0f} s of its restart")
    return how


def _launcher(daemon: Daemon) -> int:
    """The process to start again: the wrapper the daemon runs under (tini),
    else the daemon itself."""
    parent = _ppid(daemon.pid)
    if parent > 1 and _comm(parent) in WRAPPERS:
        return parent
    return daemon.pid


def _output(pid: int, fd: int) -> str:
    """Where a process's stdout/stderr goes, when it is a file to reopen
    (appending); /dev/null otherwise (a pipe or terminal of a shell gone)."""
    try:
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return os.devnull
    return target if os.path.isfile(target) else os.devnull


def _gone(pid: int, ticks: int) -> bool:
    info = _stat(pid)
    return info is None or info[1] != ticks or info[0] == "Z"


def _relaunch(daemon: Daemon, timeout: float) -> str:
    top = _launcher(daemon)
    top_ticks = (_stat(top) or ("", -1))[1]
    argv = _cmdline(top)
    cwd = os.readlink(f"/proc/{top}/cwd")
    with open(f"/proc/{top}/environ", "rb") as f:
        env = dict(
            item.decode("utf-8", "surrogateescape").partition("=")[::2]
            for item in f.read().split(b"\0") if b"=" in item
        )  # fmt: skip
    out, err = _output(top, 1), _output(top, 2)
    os.kill(daemon.pid, signal.SIGTERM)
    # The wrapper (tini) exits with its child; a zombie counts as gone.
    _wait(lambda: _gone(daemon.pid, daemon.start_ticks) and _gone(top, top_ticks), timeout,
          f"{daemon.name} (pid {daemon.pid}) did not stop within {timeout:.0f} s")  # fmt: skip
    with open(out, "ab") as stdout, open(err, "ab") as stderr:
        # setsid --fork: a session of its own, parented to init as
        # `setsid tini -s -- libvirtd &` in scripts/setup-host.sh leaves it.
        subprocess.check_call(["setsid", "--fork", *argv], cwd=cwd, env=env,
                              stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                              close_fds=True)  # fmt: skip
    return f"restarted {daemon.name}: stopped pid {daemon.pid}, started `{' '.join(argv)}` again"


def _wait(done: Callable[[], bool], timeout: float, message: str) -> None:
    end = time.monotonic() + timeout
    while not done():
        if time.monotonic() > end:
            raise ToolError(message)
        time.sleep(0.05)
