"""The libvirt hook: the installed script run exactly as libvirt runs it
(argv `DOMAIN OPERATION SUB-OPERATION EXTRA`, the domain XML on stdin,
libvirt's minimal environment), and the real libvirtd running it at `virsh
start`, restore and incoming migration (qemu:///system, or
KVMCPUID_LIBVIRT_URI).

The tests that install the hook into the real daemon share one module-scoped
installation (installed once, uninstalled at the end, always uninstalled on
failure), hold /run/lock/kvmcpuid-libvirtd.lock while it exists, and judge
only their own domains (`--domains kvmcpuid-hooktest-*`), so that other
runs' domains on the same daemon are never refused by it."""

from __future__ import annotations

import ast
import contextlib
import fcntl
import io
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from kvmcpuid_virt import daemon, hook_install, libvirt_hook
from kvmcpuid_virt.errors import InputError, OutputError
from kvmcpuid_virt.kvm import Kvm
from tests.test_compat import missing_on_this_host

REPO = Path(__file__).resolve().parent.parent
PREFIX = "kvmcpuid-hooktest-"
LOCK = "/run/lock/kvmcpuid-libvirtd.lock"
# What libvirt passes a hook (virCommandAddEnvPassCommon): LC_ALL=C and the
# daemon's PATH and HOME; the hook must not need more.
LIBVIRT_ENV = {"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


def run_hook(path: str, name: str, op: str, sub: str, xml: bytes | None,
             timeout: float = 30.0) -> subprocess.CompletedProcess[bytes]:  # fmt: skip
    """The hook as libvirt runs it: from / with libvirt's environment."""
    return subprocess.run([path, name, op, sub, "-"], input=xml or b"", env=LIBVIRT_ENV,
                          cwd="/", capture_output=True, timeout=timeout, check=False)  # fmt: skip


def domain_xml(name: str, cpu: str) -> str:
    """A tiny domain: no disk, SeaBIOS looks for a boot device until destroyed."""
    return (f"<domain type='kvm'><name>{name}</name><memory unit='MiB'>32</memory>"
            "<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>"
            f"{cpu}<on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot>"
            "<devices><memballoon model='none'/><controller type='usb' model='none'/>"
            "</devices></domain>")  # fmt: skip


def unfit_cpu(feature: str) -> str:
    """The issue's check='none' CPU: libvirt and QEMU start it silently."""
    return (f"<cpu mode='custom' check='none'><model>qemu64</model>"
            f"<feature policy='require' name='{feature}'/></cpu>")


def snapshot(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every path under `root` (root itself included) -> (mode, content)."""
    if not root.exists():
        return {}
    out: dict[str, tuple[int, bytes | None]] = {}
    for dirpath, _dirs, files in os.walk(root):
        st = os.lstat(dirpath)
        out[dirpath] = (st.st_mode, None)
        for f in files:
            p = os.path.join(dirpath, f)
            out[p] = (os.lstat(p).st_mode, Path(p).read_bytes())
    return out


# --- the installed script, in a directory of its own (no daemon) ---------------------


@pytest.fixture
def script(tmp_path: Path, kvm: Kvm, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """The hook installed into a scratch hooks directory (libvirt 9.0's
    layout) with a cache of its own, its tool facts not learned: the stale
    case, judged from KVM's table and cpu_map."""
    hooks = tmp_path / "hooks"
    log = tmp_path / "hook.log"
    if not Path("/usr/share/libvirt/cpu_map").is_dir():
        pytest.skip("libvirt's cpu_map is not installed")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    hook_install.install(hooks_dir=str(hooks), log=str(log), version=(9, 0, 0),
                         activate=False, learn=lambda: None)  # fmt: skip
    yield {"path": str(hooks / "qemu.d" / "kvmcpuid"), "log": log, "hooks": hooks,
           "feature": missing_on_this_host(kvm)}  # fmt: skip


def _reinstall(s: dict[str, Any], **kw: Any) -> None:
    hook_install.install(hooks_dir=str(s["hooks"]), log=str(s["log"]), version=(9, 0, 0),
                         activate=False, learn=lambda: None, **kw)  # fmt: skip


def test_other_operations_end_at_once_without_reading_stdin(script: dict[str, Any]) -> None:
    for op, sub in (("start", "begin"), ("started", "begin"), ("stopped", "end"),
                    ("release", "end"), ("migrate", "end"), ("reconnect", "begin")):  # fmt: skip
        # stdin stays open and unwritten: a hook that read it would hang.
        proc = subprocess.Popen([script["path"], "x", op, sub, "-"], stdin=subprocess.PIPE,
                                env=LIBVIRT_ENV, cwd="/")  # fmt: skip
        try:
            assert proc.wait(timeout=5) == 0, (op, sub)
        finally:
            proc.kill()
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait()


def test_refuses_with_one_line_naming_the_feature_and_writes_no_stdout(
    script: dict[str, Any],
) -> None:
    feature = script["feature"]
    xml = domain_xml("vm1", unfit_cpu(feature)).encode()
    for op, verb in (("prepare", "start"), ("restore", "restore"), ("migrate", "migrate in")):
        proc = run_hook(script["path"], "vm1", op, "begin", xml)
        assert proc.returncode == 1
        err = proc.stderr.decode()
        assert err.count("\n") == 1 and f"refusing to {verb} vm1" in err and feature in err
        assert proc.stdout == b""  # libvirt would read it as a new domain XML
    log = script["log"].read_text()
    # The facts were never learned: said in the log, judged without them.
    assert "no cached QEMU facts" in log and "refused: this host cannot give vm1's CPU" in log


def test_warn_mode_logs_and_lets_go(script: dict[str, Any]) -> None:
    _reinstall(script, mode="warn")
    xml = domain_xml("vm2", unfit_cpu(script["feature"])).encode()
    proc = run_hook(script["path"], "vm2", "prepare", "begin", xml)
    assert proc.returncode == 0 and proc.stderr == b"" and proc.stdout == b""
    line = next(x for x in script["log"].read_text().splitlines() if "warn mode, let go" in x)
    assert "this host cannot give vm2's CPU: " in line and script["feature"] in line


def test_a_domain_asking_nothing_passes(script: dict[str, Any]) -> None:
    for xml in (domain_xml("vm3", ""), domain_xml("vm3", "<cpu mode='host-passthrough'/>")):
        proc = run_hook(script["path"], "vm3", "prepare", "begin", xml.encode())
        assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("fail_closed", [False, True], ids=["fail-open", "fail-closed"])
@pytest.mark.parametrize("stdin", [b"<domain type='kvm'><cpu", b"\xff\xfe", b""],
                         ids=["truncated", "not-utf8", "empty"])  # fmt: skip
def test_unreadable_xml_fails_open_unless_fail_closed(
    script: dict[str, Any], fail_closed: bool, stdin: bytes
) -> None:
    _reinstall(script, fail_closed=fail_closed)
    proc = run_hook(script["path"], "vm4", "prepare", "begin", stdin)
    assert proc.stdout == b""
    log = script["log"].read_text()
    if fail_closed:
        assert proc.returncode == 1
        assert proc.stderr.decode().count("\n") == 1 and "cannot check vm4's CPU" in \
            proc.stderr.decode()  # fmt: skip
        assert "error, refused (fail-closed)" in log
    else:
        assert proc.returncode == 0 and proc.stderr == b""
        assert "error, let go (fail-open)" in log


def _in_process(path: str, name: str, xml: bytes, monkeypatch: pytest.MonkeyPatch) -> int:
    """main() as the installed script calls it, in this process (stdin
    replaced, the watchdog's alarm cancelled afterwards)."""
    stdin = io.TextIOWrapper(io.BytesIO(xml))
    monkeypatch.setattr(sys, "stdin", stdin)
    old = signal.getsignal(signal.SIGALRM)
    try:
        return libvirt_hook.main([path, name, "prepare", "begin", "-"])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("fail_closed", [False, True], ids=["fail-open", "fail-closed"])
def test_a_bug_in_the_check_fails_open_unless_fail_closed_simulated(
    script: dict[str, Any], fail_closed: bool, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Simulates a bug: the verdict raises an exception nobody expected."""
    _reinstall(script, fail_closed=fail_closed)

    def broken(*_args: object, **_kw: object) -> libvirt_hook.Decision:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(libvirt_hook, "judge", broken)
    xml = domain_xml("vm5", unfit_cpu(script["feature"])).encode()
    assert _in_process(script["path"], "vm5", xml, monkeypatch) == (1 if fail_closed else 0)
    assert "ZeroDivisionError: a bug at " in script["log"].read_text()
    err = capsys.readouterr().err
    assert (err.count("\n") == 1) if fail_closed else err == ""


def test_a_hung_check_is_ended_by_the_watchdog_simulated(script: dict[str, Any]) -> None:
    """Simulates a check that never returns: libvirt would wait for it
    forever; the watchdog lets the domain go (fail-open) after its time."""
    code = (f"import sys, time; sys.path[:0] = {[str(REPO)]!r}; "
            "from kvmcpuid_virt import libvirt_hook as h; h.WATCHDOG_SECONDS = 1; "
            "h.judge = lambda *a, **k: time.sleep(60); sys.exit(h.main())")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-IS", "-c", code, script["path"], "vm6", "prepare",
                           "begin", "-"], input=domain_xml("vm6", unfit_cpu("abm")).encode(),
                          capture_output=True, timeout=30, env=LIBVIRT_ENV, cwd="/",
                          check=False)  # fmt: skip
    assert proc.returncode == 0 and time.monotonic() - start < 10
    assert "no verdict within 1 s" in script["log"].read_text()


def test_the_verdict_is_memoized_and_the_memo_is_used(
    script: dict[str, Any], monkeypatch: pytest.MonkeyPatch, qemu_binary: str,
) -> None:
    """With fresh tool facts the verdict is stored; the next start with the
    same <cpu> (another name, another id) takes it from the memo: the check
    itself is not run again (here: it would raise)."""
    from kvmcpuid_virt.toolfacts.learn import learn

    learn(qemu_binary)  # into the script's cache: the facts are fresh now
    feature = script["feature"]
    first = domain_xml("vm7", unfit_cpu(feature)).replace("<domain type='kvm'>",
                                                           "<domain type='kvm' id='3'>")
    assert _in_process(script["path"], "vm7", first.encode(), monkeypatch) == 1
    memo = Path(os.environ["XDG_CACHE_HOME"]) / "kvmcpuid_virt" / "hook-memo"
    assert len(list(memo.iterdir())) == 1

    def never(*_args: object, **_kw: object) -> libvirt_hook.Decision:
        raise AssertionError("the memo was not used")

    monkeypatch.setattr(libvirt_hook, "judge", never)
    again = first.replace("vm7", "vm8").replace("id='3'", "id='41'")
    assert _in_process(script["path"], "vm8", again.encode(), monkeypatch) == 1


def test_the_canary_is_refused_before_reading_anything(script: dict[str, Any]) -> None:
    proc = subprocess.Popen([script["path"], libvirt_hook.CANARY_PREFIX + "x", "prepare", "begin",
                             "-"], stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=LIBVIRT_ENV, cwd="/")  # fmt: skip
    try:
        assert proc.wait(timeout=10) == 1
        assert proc.stderr is not None
        assert proc.stderr.read().startswith(b"kvmcpuid hook: active (mode enforce, fail-open)")
    finally:
        proc.kill()
        for f in (proc.stdin, proc.stderr):
            if f is not None:
                f.close()
        proc.wait()


def test_only_domains_matching_the_glob_are_judged(script: dict[str, Any]) -> None:
    _reinstall(script, domains=PREFIX + "*")
    xml = domain_xml("x", unfit_cpu(script["feature"])).encode()
    assert run_hook(script["path"], "someone-elses-vm", "prepare", "begin", xml).returncode == 0
    assert run_hook(script["path"], PREFIX + "a", "prepare", "begin", xml).returncode == 1
    for bad in ("a'; rm -rf /; '", "a;reboot", "a) exit 0;; *", ""):
        with pytest.raises(InputError, match="--domains"):
            _reinstall(script, domains=bad)


def test_masked_kvm_table_is_kvms_table(kvm: Kvm, pin_cpu0: None) -> None:
    """The hook's own ioctl reads what kvm.system reads, the per-CPU APIC ID
    fields (leaf 1 EBX[31:24], 0xB/0x1F EDX, 0x8000001E EAX) zeroed."""
    words = ast.literal_eval(libvirt_hook.masked_kvm_table().decode())
    mask = {(0x1, 4): 0x00FF_FFFF, (0xB, 6): 0, (0x1F, 6): 0, (0x8000_001E, 3): 0}
    expected = []
    for e in kvm.supported_cpuid():
        row = [e.function, e.index, int(e.flags), e.eax, e.ebx, e.ecx, e.edx]
        for (leaf, i), m in mask.items():
            if e.function == leaf:
                row[i] &= m
        expected.append(row)
    got = [words[i:i + 7] for i in range(0, len(words), 10)]
    assert got == expected
    assert _iowr(0xAE, 0x05, 8) == libvirt_hook.KVM_GET_SUPPORTED_CPUID


def _iowr(kind: int, nr: int, size: int) -> int:
    # linux/ioctl.h: _IOC(dir=_IOC_READ|_IOC_WRITE=3, type, nr, size)
    return 3 << 30 | size << 16 | kind << 8 | nr


def test_reduce_domain_keeps_only_what_the_verdict_reads() -> None:
    xml = ("<?xml version='1.0'?>\n<!-- <cpu mode='host-passthrough'/> -->\n"
           "<domain type='kvm' id='7' xmlns:q='urn:x'><name>a&gt;b</name>"
           "<description><![CDATA[<cpu>not this</cpu>]]></description>"
           "<cputune><vcpupin vcpu='0' cpuset='1'/></cputune>"
           "<features><acpi/><kvm><poll-control state='on'/></kvm></features>"
           "<cpu mode='custom' check='none'><model attr='>'>qemu64</model></cpu>"
           "<devices><disk><cpu/></disk></devices></domain>")  # fmt: skip
    assert libvirt_hook.reduce_domain(xml) == (
        "<domain type='kvm' xmlns:q='urn:x'>"
        "<features><acpi/><kvm><poll-control state='on'/></kvm></features>"
        "<cpu mode='custom' check='none'><model attr='>'>qemu64</model></cpu></domain>")
    with pytest.raises(Exception, match=r"no complete root element|unterminated"):
        libvirt_hook.reduce_domain("<domain type='kvm'><cpu>")


# --- installing next to someone else's hook, and on an old libvirt --------------------


def _foreign(path: Path) -> bytes:
    text = b"#!/bin/sh\n# someone else's hook\nexit 0\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text)
    path.chmod(0o755)
    return text


def test_install_leaves_someone_elses_qemu_hook_and_uninstall_leaves_nothing(
    tmp_path: Path,
) -> None:
    hooks = tmp_path / "hooks"
    theirs = _foreign(hooks / "qemu")
    before = snapshot(hooks)
    said = hook_install.install(hooks_dir=str(hooks), log=str(tmp_path / "l"),
                                version=(9, 0, 0), activate=False, learn=lambda: None)  # fmt: skip
    assert (hooks / "qemu").read_bytes() == theirs
    assert any("someone else's hook" in line for line in said)
    assert stat.S_IMODE((hooks / "qemu.d" / "kvmcpuid").stat().st_mode) == 0o755
    hook_install.uninstall(hooks_dir=str(hooks), version=(9, 0, 0), activate=False)
    assert snapshot(hooks) == before


def test_old_libvirt_without_qemu_d(tmp_path: Path) -> None:
    """libvirt < 6.5 runs only hooks/qemu: installed there when free,
    refused when it is someone else's (nothing changed then)."""
    hooks = tmp_path / "hooks"
    hook_install.install(hooks_dir=str(hooks), log=str(tmp_path / "l"), version=(6, 4, 0),
                         activate=False, learn=lambda: None)  # fmt: skip
    assert libvirt_hook.MANIFEST_TAG in (hooks / "qemu").read_text()
    hook_install.uninstall(hooks_dir=str(hooks), version=(6, 4, 0), activate=False)
    assert not hooks.exists()
    _foreign(hooks / "qemu")
    before = snapshot(hooks)
    with pytest.raises(InputError, match="someone else's hook"):
        hook_install.install(hooks_dir=str(hooks), log=str(tmp_path / "l"), version=(6, 4, 0),
                             activate=False, learn=lambda: None)  # fmt: skip
    assert snapshot(hooks) == before


def test_restart_under_systemd_runs_systemctl_simulated(tmp_path: Path) -> None:
    """Simulates a host where systemd runs the daemon (this one has no
    systemd): the restart is `systemctl restart UNIT`, then a wait for the
    daemon to answer."""
    calls: list[list[str]] = []
    said = daemon.restart(daemon.Daemon(1, "virtqemud", 0, "virtqemud.service"), lambda: True,
                          run=lambda argv: calls.append(list(argv)))  # fmt: skip
    assert calls == [["systemctl", "restart", "virtqemud.service"]]
    assert "virtqemud.service" in said


# --- the real daemon ---------------------------------------------------------------------


_LOG_DIR = Path("/var/log/libvirt/qemu")
_OUR_LOGS = ("kvmcpuid-hooktest-*.log", "kvmcpuid-migtest*.log", "kvmcpuid-hook-canary-*.log")


def _our_logs() -> set[Path]:
    return {p for pattern in _OUR_LOGS for p in _LOG_DIR.glob(pattern)}


@pytest.fixture(scope="module", autouse=True)
def _no_domain_logs_left() -> Iterator[None]:
    """The domains these tests start leave libvirt's per-domain logs; remove
    the ones this module made, so a test run leaves none behind."""
    before = _our_logs()
    yield
    for log in _our_logs() - before:
        log.unlink(missing_ok=True)


def _virt(uri: str) -> Any:
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt.open(uri)


def _cleanup(conn: Any, name: str) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        dom = conn.lookupByName(name)
        with contextlib.suppress(libvirt.libvirtError):
            dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)


def _good_cpu() -> str:
    """This host's <cpu> as `kvmcpuid libvirt-xml` renders it: check='full',
    so libvirt and QEMU themselves refuse it if this host could not give it."""
    proc = subprocess.run([sys.executable, "-c", "import sys; from kvmcpuid_virt.cli import "
                           "main; sys.exit(main())", "libvirt-xml"], capture_output=True,
                          text=True, timeout=120, check=True)  # fmt: skip
    return proc.stdout


@pytest.fixture(scope="module")
def daemon_lock(libvirt_conn_uri: str) -> Iterator[None]:
    """Held while a test of this module changes how the daemon runs hooks:
    other suites that change the daemon can take the same lock."""
    os.makedirs(os.path.dirname(LOCK), exist_ok=True)  # a bare root has no /run/lock
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="module")
def hooked(libvirt_conn_uri: str, tmp_path_factory: pytest.TempPathFactory,
           qemu_binary: str, daemon_lock: None) -> Iterator[dict[str, Any]]:  # fmt: skip
    """The hook installed (enforce, fail-open, our domains only) into the
    real daemon, beside a foreign /etc/libvirt/hooks/qemu that records its
    calls; before that, one domain of the unfit CPU started without the
    hook and saved, another left running (for the migration test)."""
    uri = libvirt_conn_uri
    hooks = Path(hook_install.HOOKS_DIR)
    pristine = snapshot(hooks)
    conn = _virt(uri)
    with Kvm() as kvm:
        feature = missing_on_this_host(kvm)
    tag = uuid.uuid4().hex[:8]
    names = {k: f"{PREFIX}{k}-{tag}" for k in ("saved", "running", "refused", "good")}
    work = tmp_path_factory.mktemp("hook")
    work.chmod(0o755)  # libvirt writes and reads the save image
    save = work / "saved.img"
    calls = work / "foreign-calls"
    foreign = hooks / "qemu"
    created_hooks = not hooks.exists()
    try:
        for key in ("saved", "running"):
            dom = conn.defineXML(domain_xml(names[key], unfit_cpu(feature)))
            dom.create()  # check='none': starts without a word
            assert dom.isActive()
        conn.lookupByName(names["saved"]).save(str(save))
        foreign.parent.mkdir(exist_ok=True)
        foreign.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\nexit 0\n")
        foreign.chmod(0o755)
        before = snapshot(hooks)
        said = hook_install.install(uri=uri, domains=PREFIX + "*")
        yield {"uri": uri, "conn": conn, "names": names, "feature": feature, "save": save,
               "calls": calls, "before": before, "said": said}  # fmt: skip
    finally:
        with contextlib.suppress(Exception):
            if hook_install.read_manifest(hook_install.hook_path()):
                hook_install.uninstall(uri=uri)
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()
        conn = _virt(uri)  # a fresh one: a restart in between ends the old
        for name in names.values():
            _cleanup(conn, name)
        conn.close()
        save.unlink(missing_ok=True)
        foreign.unlink(missing_ok=True)
        if created_hooks:
            shutil.rmtree(hooks, ignore_errors=True)
        d = daemon.find_daemon()
        if d is not None:
            daemon.reload(d)  # it no longer finds the foreign hook either
        assert snapshot(hooks) == pristine


def test_install_said_what_it_did(hooked: dict[str, Any]) -> None:
    said = "\n".join(hooked["said"])
    assert "/etc/libvirt/hooks/qemu (someone else's hook) as it is" in said
    assert "reloaded" in said and said.endswith(f"active: libvirt at {hooked['uri']} runs it")


def test_virsh_start_of_the_unfit_domain_is_refused_naming_the_feature(
    hooked: dict[str, Any],
) -> None:
    conn = hooked["conn"]
    name = hooked["names"]["refused"]
    dom = conn.defineXML(domain_xml(name, unfit_cpu(hooked["feature"])))
    with pytest.raises(libvirt.libvirtError) as exc:
        dom.create()
    message = str(exc.value)
    assert f"kvmcpuid hook: refusing to start {name}" in message
    assert hooked["feature"] in message
    assert not dom.isActive()
    # Someone else's hook still ran, before ours (libvirt: hooks/qemu first).
    assert f"{name} prepare begin -" in hooked["calls"].read_text()


def test_a_domain_this_host_can_give_starts(hooked: dict[str, Any]) -> None:
    conn = hooked["conn"]
    name = hooked["names"]["good"]
    dom = conn.defineXML(domain_xml(name, _good_cpu()))
    dom.create()
    try:
        assert dom.isActive()
    finally:
        dom.destroy()


def test_a_domain_saved_without_the_hook_is_refused_on_restore(hooked: dict[str, Any]) -> None:
    conn = hooked["conn"]
    with pytest.raises(libvirt.libvirtError) as exc:
        conn.restore(str(hooked["save"]))
    message = str(exc.value)
    assert f"refusing to restore {hooked['names']['saved']}" in message
    assert hooked["feature"] in message


def test_the_hook_fed_libvirts_migration_xml_refuses_it(hooked: dict[str, Any]) -> None:
    """`migrate begin` on the incoming side, the hook invoked as libvirt
    invokes it (argv NAME migrate begin -, the XML on stdin), fed the XML
    libvirt itself produced for the migration of the running domain."""
    name = hooked["names"]["running"]
    dom = hooked["conn"].lookupByName(name)
    assert dom.isActive()
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE).encode()
    proc = run_hook(hook_install.hook_path(), name, "migrate", "begin", xml)
    assert proc.returncode == 1 and proc.stdout == b""
    err = proc.stderr.decode()
    assert f"refusing to migrate in {name}" in err and hooked["feature"] in err
    assert err.count("\n") == 1


def test_status_says_active(hooked: dict[str, Any]) -> None:
    st = hook_install.status(uri=hooked["uri"])
    assert st.active
    assert any(line.startswith("tool facts: fresh") for line in st.lines)


def test_uninstall_returns_the_host_to_how_it_was(hooked: dict[str, Any]) -> None:
    """Last of the module: /etc/libvirt/hooks as before the install (the
    foreign hook alone), the daemon running and answering, the domain that
    was refused starting again."""
    before = daemon.find_daemon()
    said = hook_install.uninstall(uri=hooked["uri"])
    assert snapshot(Path(hook_install.HOOKS_DIR)) == hooked["before"]
    assert not Path(hook_install.DEFAULT_LOG).exists()
    assert any(line.startswith("removed /etc/libvirt/hooks/qemu.d") for line in said)
    after = daemon.find_daemon()
    assert after is not None and before is not None
    assert after.pid == before.pid and after.alive()  # reloaded, not restarted
    conn = hooked["conn"]
    dom = conn.lookupByName(hooked["names"]["refused"])
    dom.create()
    try:
        assert dom.isActive()
    finally:
        dom.destroy()
    assert not hook_install.status(uri=hooked["uri"]).active


# --- incoming migration into a second libvirtd on this machine ----------------------


@contextlib.contextmanager
def second_libvirtd(root: Path, prepare: Callable[[Path], object]) -> Iterator[str]:
    """Another libvirtd on this machine, the destination of migrations: in a
    mount and UTS namespace of its own (its own hostname; its own
    /etc/libvirt, with a host UUID and without the first daemon's domains,
    /run/libvirt, /var/lib/libvirt, /var/log/libvirt, /var/cache/libvirt),
    its socket under `root`; `prepare(etc)` runs on its /etc/libvirt before
    it starts. Yields its URI; on the way out its domains are destroyed and
    it is stopped."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare (util-linux) to give a second libvirtd its namespaces")
    if subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                      capture_output=True, check=False).returncode != 0:
        # A chroot (/ is no mount point): its mounts would reach the host.
        pytest.skip("no private mount namespace here for a second libvirtd (a chroot?)")
    dirs = {"/etc/libvirt": root / "etc", "/run/libvirt": root / "run",
            "/var/lib/libvirt": root / "lib", "/var/log/libvirt": root / "log",
            "/var/cache/libvirt": root / "cache"}  # fmt: skip
    shutil.copytree("/etc/libvirt", dirs["/etc/libvirt"], symlinks=True,
                    ignore=shutil.ignore_patterns("*.xml"))  # the first daemon's domains
    for d in dirs.values():
        d.mkdir(exist_ok=True)
    (root / "log" / "qemu").mkdir(exist_ok=True)
    sock = root / "sock"
    sock.mkdir()
    root.chmod(0o755)
    (dirs["/etc/libvirt"] / "libvirtd.conf").write_text(
        f'unix_sock_dir = "{sock}"\nhost_uuid = "{uuid.uuid4()}"\n')
    with open(dirs["/etc/libvirt"] / "qemu.conf", "a") as f:
        f.write('\n# its own daemon has no virtlogd\nstdio_handler = "file"\n')
    prepare(dirs["/etc/libvirt"])
    mounts = "; ".join(f"mount --bind {src} {dst}" for dst, src in dirs.items())
    script = (f"set -e; hostname kvmcpuid-dst-{uuid.uuid4().hex[:6]}; {mounts}; "
              f"exec libvirtd --pid-file {root}/libvirtd.pid")  # fmt: skip
    with open(root / "libvirtd.out", "wb") as out:
        proc = subprocess.Popen(["unshare", "--mount", "--uts", "--fork", "--propagation",
                                 "private", "sh", "-c", script], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, start_new_session=True)  # fmt: skip
    uri = f"qemu:///system?socket={sock}/libvirt-sock"
    try:
        end = time.monotonic() + 30
        while True:
            try:
                _virt(uri).close()
                break
            except libvirt.libvirtError:
                if proc.poll() is not None or time.monotonic() > end:
                    pytest.fail("the second libvirtd did not start: "
                                + (root / "libvirtd.out").read_text()[-500:])
                time.sleep(0.1)
        yield uri
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn = _virt(uri)
            for dom in conn.listAllDomains():
                with contextlib.suppress(libvirt.libvirtError):
                    dom.destroy()
            conn.close()
        pid = int((root / "libvirtd.pid").read_text()) if (root / "libvirtd.pid").exists() else 0
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def destination(libvirt_conn_uri: str, qemu_binary: str,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:  # fmt: skip
    """The second libvirtd with the hook installed (enforce) in its own
    /etc/libvirt/hooks before it starts."""
    root = tmp_path_factory.mktemp("dst")
    log = root / "hook.log"

    def hook(etc: Path) -> object:
        return hook_install.install(hooks_dir=str(etc / "hooks"), log=str(log),
                                    version=(9, 0, 0), activate=False)  # fmt: skip

    with second_libvirtd(root, hook) as uri:
        yield {"uri": uri, "log": log}


def _migrate(src_uri: str, dst_uri: str, name: str, cpu: str) -> tuple[Any, str | None]:
    """Start `name` on the first daemon and migrate it live into the second;
    (the source domain, the error or None)."""
    src, dst = _virt(src_uri), _virt(dst_uri)
    dom = src.createXML(domain_xml(name, cpu), 0)
    try:
        moved = dom.migrate(dst, libvirt.VIR_MIGRATE_LIVE, None, "tcp://127.0.0.1", 0)
    except libvirt.libvirtError as exc:
        return dom, str(exc)
    finally:
        dst.close()
    assert moved is not None
    return dom, None


def test_incoming_migration_of_the_unfit_domain_is_refused(
    destination: dict[str, Any], libvirt_conn_uri: str, kvm: Kvm,
) -> None:
    """A real live migration into the second libvirtd: its `migrate begin`
    hook refuses, the guest keeps running where it was."""
    feature = missing_on_this_host(kvm)
    name = f"kvmcpuid-migtest-{uuid.uuid4().hex[:8]}"
    dom, error = _migrate(libvirt_conn_uri, destination["uri"], name, unfit_cpu(feature))
    try:
        assert error is not None
        assert f"kvmcpuid hook: refusing to migrate in {name}" in error and feature in error
        assert dom.isActive()  # still on the source
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            dom.destroy()
    assert f"{name} migrate: refused" in destination["log"].read_text()


def test_a_domain_this_host_can_give_migrates_in(
    destination: dict[str, Any], libvirt_conn_uri: str,
) -> None:
    name = f"kvmcpuid-migtest-{uuid.uuid4().hex[:8]}"
    _, error = _migrate(libvirt_conn_uri, destination["uri"], name, _good_cpu())
    assert error is None
    dst = _virt(destination["uri"])
    try:
        moved = dst.lookupByName(name)
        assert moved.isActive()
        moved.destroy()
    finally:
        dst.close()


def test_install_errors_are_one_line_and_leave_nothing(tmp_path: Path) -> None:
    """A hooks directory that cannot be created (its parent is a file, which
    stops root too): an OutputError naming it, which the CLI prints on one
    line with exit 2; nothing written."""
    blocker = tmp_path / "etc-libvirt"
    blocker.write_text("not a directory\n")
    hooks = blocker / "hooks"
    with pytest.raises(OutputError, match=f"cannot create {hooks}"):
        hook_install.install(hooks_dir=str(hooks), log=str(tmp_path / "l"),
                             version=(9, 0, 0), activate=False, learn=lambda: None)  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "kvmcpuid_virt.cli", "hook", "--hooks-dir",
                           str(hooks), "install"], capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["etc-libvirt"]
