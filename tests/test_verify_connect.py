"""`kvmcpuid verify --connect URI --connect URI ...`: the libvirt backend on
each daemon, one report per daemon, the exit status the worst; a daemon that
cannot be reached is one line, and fails the command unless
--skip-unreachable. Real extra libvirtd instances on this machine stand in
for the hosts (tests/test_hook.second_libvirtd), each stopped on the way
out; each daemon's own domain list says that no probe domain stayed."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmcpuid_virt.probe.libvirt import DOMAIN_PREFIX
from tests.conftest import REPO

libvirt = pytest.importorskip("libvirt")

from tests.test_hook import second_libvirtd  # noqa: E402  (after the libvirt skip)


@pytest.fixture(scope="module")
def daemons(libvirt_conn_uri: str, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[list[str]]:  # fmt: skip
    """Two libvirtd instances of our own (their URIs)."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(second_libvirtd(tmp_path_factory.mktemp(f"vhost{i}"),
                                                   lambda _etc: None))
               for i in range(2)]  # fmt: skip


def _verify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmcpuid_virt.cli", "verify", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300, check=False)


def _probe_domains(uri: str) -> list[str]:
    conn = libvirt.open(uri)
    try:
        return [d.name() for d in conn.listAllDomains() if d.name().startswith(DOMAIN_PREFIX)]
    finally:
        conn.close()


def test_each_daemon_gets_its_own_report(kvm: object, daemons: list[str]) -> None:
    r = _verify("--backend", "libvirt", "--format", "json",
                *(a for uri in daemons for a in ("--connect", uri)))  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert [(b["backend"], b.get("host")) for b in doc["backends"]] == [
        ("libvirt", uri) for uri in daemons]
    for b in doc["backends"]:
        assert b["ok"] and b["comparison"]["bits_compared"] > 1000, b
    for uri in daemons:
        assert _probe_domains(uri) == []
    text = _verify("--backend", "libvirt", *(a for uri in daemons for a in ("--connect", uri)))
    assert text.returncode == 0, text.stdout + text.stderr
    for uri in daemons:
        assert f"libvirt at {uri}:" in text.stdout


def test_an_unreachable_daemon_is_one_line_and_fails(kvm: object, daemons: list[str],
                                                     tmp_path: Path) -> None:  # fmt: skip
    """A socket nobody listens on: named in one line, exit 3 (no verdict),
    nothing booted on the others; --skip-unreachable verifies the rest and
    warns which was left out."""
    dead = f"qemu:///system?socket={tmp_path}/no-such-sock"
    args = ["--backend", "libvirt", "--connect", daemons[0], "--connect", dead]
    r = _verify(*args)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and dead in lines[0], r.stderr
    skipped = _verify(*args, "--skip-unreachable", "--format", "json")
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr
    assert [b.get("host") for b in json.loads(skipped.stdout)["backends"]] == [daemons[0]]
    warning = [ln for ln in skipped.stderr.splitlines() if "warning" in ln]
    assert len(warning) == 1 and dead in warning[0] and "--skip-unreachable" in warning[0]
    assert _probe_domains(daemons[0]) == []


def test_the_worst_daemon_decides_the_exit_status(kvm: object, daemons: list[str]) -> None:
    """A <cpu> requiring a feature this host lacks: refused on every daemon
    (exit 1), each daemon's report saying so."""
    cpu = ("<cpu mode='host-passthrough' check='full' migratable='on'>"
           "<feature policy='require' name='avx512f'/></cpu>")
    r = subprocess.run([sys.executable, "-m", "kvmcpuid_virt.cli", "verify", "--format", "json",
                        "--libvirt-xml", "-", *(a for u in daemons for a in ("--connect", u))],
                       input=cpu, capture_output=True, text=True, cwd=REPO, timeout=300,
                       check=False)  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert [b.get("host") for b in doc["backends"]] == daemons
    assert all(not b["ok"] for b in doc["backends"])


def test_topology_with_several_daemons_is_refused_in_one_line() -> None:
    r = _verify("--connect", "qemu:///system", "--connect", "qemu:///session",
                "--topology", "sockets=1,cores=2,threads=1")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "--topology" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_run_leaves_no_domain_on_any_daemon(kvm: object, daemons: list[str],
                                                        sig: signal.Signals) -> None:  # fmt: skip
    """Ctrl-C or SIGTERM once a daemon has a probe domain: 130 / 143, and
    every daemon's domains are as before. (Not its guest logs: the probe
    knows where the system and session daemons log, not where a daemon in a
    mount namespace of its own does, so those stay after any run.)"""
    before = {uri: _probe_domains(uri) for uri in daemons}
    proc = subprocess.Popen([sys.executable, "-m", "kvmcpuid_virt.cli", "verify", "--backend",
                             "libvirt", *(a for u in daemons for a in ("--connect", u))],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while (all(len(_probe_domains(u)) == len(before[u]) for u in daemons)
               and time.monotonic() < deadline and proc.poll() is None):  # fmt: skip
            time.sleep(0.005)
        assert proc.poll() is None, "verify ended before any daemon had a domain"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + int(sig), err
    assert "Traceback" not in err
    assert {uri: _probe_domains(uri) for uri in daemons} == before
