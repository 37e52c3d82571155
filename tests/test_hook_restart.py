"""`kvmcpuid hook install --restart` against the real daemon: stopped and
started again the way it ran, at install and at uninstall. A module of its
own so that it never runs while tests/test_hook.py's installation is in
place (module fixtures end with their module); it holds the same lock."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmcpuid_virt import daemon, hook_install
from tests.test_hook import LOCK, PREFIX, snapshot


@pytest.fixture(scope="module")
def daemon_lock(libvirt_conn_uri: str) -> Iterator[None]:
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def test_install_with_restart_keeps_the_daemon_running_the_same_way(
    libvirt_conn_uri: str, qemu_binary: str, daemon_lock: None,
) -> None:
    """--restart: the daemon is stopped and started again as it ran (here:
    under `tini -s`, same command line and working directory), both at
    install and at uninstall, and the hook is active in between."""
    d = daemon.find_daemon()
    if d is None:
        pytest.skip("no libvirt daemon runs")
    if d.unit:
        pytest.skip("systemd runs the daemon here: the restart is systemctl's")
    shape = _shape(d)
    hooks = Path(hook_install.HOOKS_DIR)
    pristine = snapshot(hooks)
    try:
        said = hook_install.install(uri=libvirt_conn_uri, restart=True, domains=PREFIX + "*")
        assert any(line.startswith("restarted") for line in said)
        new = daemon.find_daemon()
        assert new is not None and new.pid != d.pid and _shape(new) == shape
        assert hook_install.canary(libvirt_conn_uri)
    finally:
        if hook_install.read_manifest(hook_install.hook_path()):
            said = hook_install.uninstall(uri=libvirt_conn_uri)
            assert any(line.startswith("restarted") for line in said)
    last = daemon.find_daemon()
    assert last is not None and _shape(last) == shape
    assert snapshot(hooks) == pristine


def _shape(d: daemon.Daemon) -> tuple[object, ...]:
    """How a daemon runs: its command line, its parent's (tini) and cwd."""
    parent = int(Path(f"/proc/{d.pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    cmd = Path(f"/proc/{d.pid}/cmdline").read_bytes()
    pcmd = Path(f"/proc/{parent}/cmdline").read_bytes() if parent > 1 else b""
    return cmd, pcmd, os.readlink(f"/proc/{d.pid}/cwd")
