"""Many hosts at once: `baseline` and `compat` with --connect repeated,
against several real libvirtd instances on this machine standing in for a
fleet (each with its own sockets, state and cache directories, in a mount
and UTS namespace of its own: tests/test_hook.second_libvirtd). A daemon
that is stopped (SIGSTOP) stands in for a host that hangs mid-run, one that
was ended (SIGTERM) for a dead host. Every daemon a test starts is stopped on
the way out, failure or not.

Expected values come from libvirt itself (each daemon's own domain
capabilities, asked here over libvirt-python) and from the files' absence;
the progress bar is read from a real pseudo-terminal."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO

libvirt = pytest.importorskip("libvirt")

from tests.test_hook import second_libvirtd  # noqa: E402  (after the libvirt skip)

FLEET = 3


def _daemon_pid(root: Path) -> int:
    return int((root / "libvirtd.pid").read_text())


@pytest.fixture(scope="module")
def fleet(libvirt_conn_uri: str, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[list[tuple[str, Path]]]:  # fmt: skip
    """FLEET libvirtd instances, each its own (URI, state root)."""
    with contextlib.ExitStack() as stack:
        out = []
        for i in range(FLEET):
            root = tmp_path_factory.mktemp(f"fleet{i}")
            uri = stack.enter_context(second_libvirtd(root, lambda _etc: None))
            out.append((uri, root))
        yield out


def _run(*args: str, stderr_tty: bool = False, timeout: float = 180
         ) -> tuple[int, str, str]:  # fmt: skip
    argv = [sys.executable, "-m", "kvmcpuid_virt.cli", *args]
    if not stderr_tty:
        r = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=timeout)
        return r.returncode, r.stdout, r.stderr
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=slave, cwd=REPO,
                                text=True)  # fmt: skip
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out, b"".join(chunks).decode(errors="replace")
    finally:
        os.close(master)


def _host_model_names(uri: str) -> set[str]:
    """The features libvirt's own host-model CPU names (its domain capabilities)."""
    from lxml import etree

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    conn = libvirt.open(uri)
    try:
        xml = conn.getDomainCapabilities(None, "x86_64", None, "kvm", 0)
    finally:
        conn.close()
    root = etree.fromstring(xml.encode())
    return {str(f.get("name")) for f in root.iterfind(".//mode[@name='host-model']/feature")
            if f.get("policy") == "require"}  # fmt: skip


def test_baseline_of_the_fleet_asks_every_daemon(fleet: list[tuple[str, Path]],
                                                 tmp_path: Path) -> None:  # fmt: skip
    uris = [u for u, _ in fleet]
    out = tmp_path / "b.json"
    args = [a for u in uris for a in ("--connect", u)]
    rc, stdout, stderr = _run("baseline", *args, "--format", "json", "-o", str(out))
    assert rc == 0, stderr
    # Piped: nothing on stderr (the notes are in the JSON), no progress bar.
    assert stderr == "" and stdout == ""
    doc = json.loads(out.read_text())
    assert doc["host"]["baseline_of"] == ", ".join(uris)
    # One machine, one host-model: the fleet's baseline is any one daemon's.
    rc, _, stderr = _run("baseline", "--connect", uris[0], "--format", "json",
                         "-o", str(tmp_path / "one.json"))  # fmt: skip
    assert rc == 0, stderr
    one = json.loads((tmp_path / "one.json").read_text())
    assert doc["entries"] == one["entries"]
    # Each daemon's host-model names the same features (libvirt's own answer).
    assert len({frozenset(_host_model_names(u)) for u in uris}) == 1


def test_progress_bar_only_on_a_terminal(fleet: list[tuple[str, Path]]) -> None:
    args = [a for u, _ in fleet for a in ("--connect", u)]
    rc, stdout, stderr = _run("compat", "--matrix", *args, "--format", "json",
                              stderr_tty=True)  # fmt: skip
    assert rc == 0, stderr  # three views of one host: every pair fits
    assert f"host-models [{'#' * 30}] {FLEET}/{FLEET}" in stderr
    doc = json.loads(stdout)
    assert doc["summary"]["hosts"] == FLEET and doc["summary"]["fitting_pairs"] == FLEET**2


def test_which_hosts_take_a_guest(fleet: list[tuple[str, Path]], tmp_path: Path) -> None:
    guest = tmp_path / "guest.xml"
    # qemu64 plus a feature no KVM host here has (AMD's 3DNow!, gone since
    # Bulldozer): fits nowhere. kvm64 without pni (the outer hypervisor here
    # hides SSE3; libvirt's own host-model is kvm64 with pni disabled, see
    # _host_model_names) fits everywhere.
    guest.write_text("<cpu mode='custom' match='exact'><model>qemu64</model>"
                     "<feature policy='require' name='3dnow'/></cpu>")  # fmt: skip
    args = [a for u, _ in fleet for a in ("--connect", u)]
    rc, stdout, stderr = _run("compat", str(guest), *args, "--format", "json")
    assert rc == 1, stderr
    doc = json.loads(stdout)
    assert [v["host"] for v in doc["hosts"]] == [u for u, _ in fleet]
    assert doc["fits"] == []
    assert all("3dnow" in {r["field"] for r in v["reasons"]} for v in doc["hosts"])
    if "pni" in _host_model_names(fleet[0][0]):
        pytest.skip("this host has SSE3: kvm64 without pni is not its host-model")
    guest.write_text("<cpu mode='custom' match='exact'><model>kvm64</model>"
                     "<feature policy='disable' name='pni'/></cpu>")  # fmt: skip
    rc, stdout, stderr = _run("compat", str(guest), *args)
    assert rc == 0, stderr
    assert f"{FLEET} of {FLEET} hosts can take it" in stdout


def test_a_hung_host_is_named_and_fails_the_command(fleet: list[tuple[str, Path]],
                                                    tmp_path: Path) -> None:  # fmt: skip
    uris = [u for u, _ in fleet]
    hung_uri, hung_root = fleet[1]
    pid = _daemon_pid(hung_root)
    out = tmp_path / "b.json"
    args = [a for u in uris for a in ("--connect", u)]
    os.kill(pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        rc, stdout, stderr = _run("baseline", *args, "--connect-timeout", "3",
                                  "--format", "json", "-o", str(out))  # fmt: skip
        took = time.monotonic() - start
        written = out.exists()
        rc2, _, stderr2 = _run("baseline", *args, "--connect-timeout", "3",
                               "--skip-unreachable", "--format", "json",
                               "-o", str(out))  # fmt: skip
    finally:
        os.kill(pid, signal.SIGCONT)
    assert rc == 2 and stdout == ""
    assert stderr.count("\n") == 1 and hung_uri in stderr and "no answer within 3 s" in stderr
    assert "Traceback" not in stderr
    assert not written  # nothing half-written
    assert took < 60  # the bound, not the daemon, ended it
    assert rc2 == 0, stderr2
    assert f"warning: left out 1 of {FLEET} hosts (--skip-unreachable): {hung_uri}" in stderr2
    doc = json.loads(out.read_text())
    assert doc["host"]["baseline_of"] == ", ".join(u for u in uris if u != hung_uri)


def test_a_dead_host_is_named_with_its_cause(libvirt_conn_uri: str, tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        fleet = [stack.enter_context(second_libvirtd(tmp_path / f"d{i}", lambda _e: None))
                 for i in range(2)]  # fmt: skip
        dead = fleet[1]
        pid = _daemon_pid(tmp_path / "d1")
        os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and time.monotonic() < end:
            time.sleep(0.1)
        args = [a for u in (*fleet, "qemu+ssh://host.invalid/system") for a in ("--connect", u)]
        out = tmp_path / "m.html"
        rc, stdout, stderr = _run("compat", "--matrix", *args, "--format", "html",
                                  "-o", str(out))  # fmt: skip
        assert rc == 2 and stdout == "" and not out.exists()
        lines = stderr.splitlines()
        # One line per unreachable host with its cause, then the count.
        assert len(lines) == 3, stderr
        assert lines[0].startswith(f"kvmcpuid compat: {dead}: ") and "connect" in lines[0]
        assert lines[1].startswith("kvmcpuid compat: qemu+ssh://host.invalid/system: ")
        assert "2 of 3 hosts could not be asked" in lines[2]
        rc, _, stderr = _run("compat", "--matrix", *args, "--skip-unreachable",
                             "--format", "html", "-o", str(out))  # fmt: skip
        # One host left: a matrix needs two.
        assert rc == 2 and "at least two hosts" in stderr and not out.exists()


def test_ctrl_c_while_a_host_hangs(fleet: list[tuple[str, Path]], tmp_path: Path) -> None:
    from kvmcpuid_virt.cli import EXIT_INTERRUPTED

    _, hung_root = fleet[2]
    pid = _daemon_pid(hung_root)
    out = tmp_path / "m.json"
    argv = [sys.executable, "-m", "kvmcpuid_virt.cli", "compat", "--matrix",
            *[a for u, _ in fleet for a in ("--connect", u)], "--format", "json",
            "-o", str(out)]  # fmt: skip
    os.kill(pid, signal.SIGSTOP)
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=REPO)  # fmt: skip
        time.sleep(3)  # the others answered; the stopped one cannot
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)  # not the 60 s bound
    finally:
        os.kill(pid, signal.SIGCONT)
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    assert stderr == "kvmcpuid: interrupted\n" and stdout == ""
    assert not out.exists() and not list(tmp_path.iterdir())


def test_a_host_model_is_not_held_to_kvm_paravirtual_features(
    libvirt_conn_uri: str, kvm: object, tmp_path: Path
) -> None:
    # libvirt's host-model names no KVM paravirtual feature (they are the
    # domain's <features>/<clock>), so a guest with this host's full KVM
    # table is not refused for them on the same host seen through libvirt.
    dump = tmp_path / "me.json"
    rc, _, stderr = _run("dump", "-o", str(dump))
    assert rc == 0, stderr
    entries = json.loads(dump.read_text())["entries"]
    pv = next(int(e["eax"], 16) for e in entries if int(e["function"], 16) == 0x4000_0001)
    assert pv & 1  # KVM_FEATURE_CLOCKSOURCE (linux/kvm_para.h): kvmclock
    rc, stdout, stderr = _run("compat", str(dump), "--connect", libvirt_conn_uri,
                              "--format", "json")  # fmt: skip
    assert rc in (0, 1), stderr
    doc = json.loads(stdout)
    assert not [r for r in doc["reasons"] if r["where"].startswith("CPUID.40000001H")]
    assert any("paravirtual features not compared" in n and "kvmclock" in n
               for n in doc["notes"])  # fmt: skip
