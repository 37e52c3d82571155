"""The libvirt probe backend against the real libvirtd (qemu:///system, or
KVMCPUID_LIBVIRT_URI): what the guest sees, and that every run (normal,
timeout, Ctrl-C) leaves no domain, no QEMU and no temporary directory.

Other runs may use the probe on the same daemon at the same time, so each
test uses its own domain-name prefix and checks only its own domains."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

from kvmcpuid_virt.adapters.libvirt import LIBVIRT_KVM_ACTS_ON
from kvmcpuid_virt.analysis.backend import Backend
from kvmcpuid_virt.errors import InputError, ProbeTimeoutError, ToolError
from kvmcpuid_virt.probe import image
from kvmcpuid_virt.probe.libvirt import (
    DOMAIN_PREFIX,
    DomainRefusedError,
    LibvirtProbe,
    LibvirtUnavailableError,
    Transient,
    domain_log,
    domain_xml,
    run_libvirt,
    transient_cause,
)
from kvmcpuid_virt.probe.retry import AdaptiveLimit, RetryPolicy
from kvmcpuid_virt.process import PREFIX
from tests.conftest import host_vendor, spin_image
from tests.simulated_libvirt import (
    BPF_EAGAIN,
    CONNECTION_REFUSED,
    Refusals,
    SimulatedRefusingDaemon,
    bpf_eagain,
    connection_refused,
    libvirt_error,
)

pytestmark = pytest.mark.libvirt

QUERIES = [(0x0, 0), (0x1, 0), (0x80000000, 0), (0x80000001, 0)]
# arch-capabilities: nested KVM on this AMD host refuses MSR 0x10a.
HOST = (
    "<cpu mode='host-passthrough'>"
    "<feature policy='disable' name='arch-capabilities'/>{extra}</cpu>"
)
LAHF_LM = 1 << 0  # CPUID 0x80000001 ECX bit 0
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")


class Env:
    def __init__(self, uri: str, prefix: str, tmp: Path) -> None:
        self.uri = uri
        self.prefix = prefix
        self.tmp = tmp

    def probe(self) -> LibvirtProbe:
        return LibvirtProbe(self.uri, name_prefix=self.prefix)


def _our_domains(uri: str, prefix: str) -> list[str]:
    import libvirt

    conn = libvirt.open(uri)
    try:
        return [d.name() for d in conn.listAllDomains() if d.name().startswith(prefix)]
    finally:
        conn.close()


def _our_qemus(prefix: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline and prefix.encode() in cmdline:
            found.append(int(pid))
    return found


@pytest.fixture
def env(libvirt_conn_uri: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this machine")
    # libvirt's QEMU user must reach the image: a world-traversable parent
    # (pytest's tmp_path is 0700), removed afterwards.
    tmp = Path(tempfile.mkdtemp(prefix="kvmcpuid-test-", dir="/tmp"))
    tmp.chmod(0o711)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    prefix = f"{DOMAIN_PREFIX}t{uuid.uuid4().hex[:8]}-"
    try:
        yield Env(libvirt_conn_uri, prefix, tmp)
        assert _our_domains(libvirt_conn_uri, prefix) == [], "domain left behind"
        assert _our_qemus(prefix) == [], "QEMU left running"
        assert not list(tmp.glob(PREFIX + "*")), "temporary directory left behind"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for log in _our_logs(libvirt_conn_uri, prefix):  # kept by failing runs
            log.unlink(missing_ok=True)


def _our_logs(uri: str, prefix: str) -> list[Path]:
    probe_log = domain_log(uri, prefix + "x")
    return [] if probe_log is None else list(probe_log.parent.glob(prefix + "*.log"))


def cpu(extra: str = "") -> str:
    return HOST.format(extra=extra)


def test_guest_sees_host_vendor(env: Env) -> None:
    result = run_libvirt(cpu(), QUERIES, uri=env.uri, name_prefix=env.prefix)
    assert result.backend is Backend.LIBVIRT
    t = result.observed
    vendor = b"".join(
        t.get(0, 0, r).to_bytes(4, "little") for r in ("ebx", "edx", "ecx")
    ).decode()
    assert vendor == host_vendor()


def test_feature_off_is_off_in_guest(env: Env) -> None:
    with env.probe() as probe:
        on = probe.run(cpu(), QUERIES)
        off = probe.run(cpu("<feature policy='disable' name='lahf_lm'/>"), QUERIES)
    ecx_on = on.observed.get(0x80000001, 0, "ecx")
    if not ecx_on & LAHF_LM:
        pytest.skip("this host gives no LAHF/SAHF in 64-bit mode to guests")
    assert off.observed.get(0x80000001, 0, "ecx") == ecx_on & ~LAHF_LM


def test_run_many_in_order(env: Env) -> None:
    jobs = [
        (cpu(), QUERIES),
        (cpu("<feature policy='disable' name='lahf_lm'/>"), QUERIES),
        (cpu(), QUERIES),
    ]
    with env.probe() as probe:
        results = probe.run_many(jobs, parallel=2)
    lahf = [r.observed.get(0x80000001, 0, "ecx") & LAHF_LM for r in results]
    if lahf[0]:
        assert lahf == [LAHF_LM, 0, LAHF_LM]


def test_run_many_workers_use_their_own_connections(env: Env) -> None:
    # libvirtd serves at most 5 calls of one connection at a time; each worker
    # thread gets its own, and they are closed when run_many returns.
    with env.probe() as probe:
        seen: set[int] = set()
        real = probe._connection

        def spy() -> object:
            conn = real()
            seen.add(id(conn))
            return conn

        probe._connection = spy  # type: ignore[method-assign]
        probe.run_many([(cpu(), QUERIES)] * 3, parallel=3)
        assert id(probe.conn) not in seen
        assert len(seen) >= 2  # three workers, at least two of them started a guest
        assert probe._extra == {}
        assert probe.run(cpu(), QUERIES).observed.get(0, 0, "ebx") != 0


def test_probe_still_runs_after_a_failed_run_many(env: Env) -> None:
    # A failed batch cancels its own guests, not the probe's later runs.
    jobs = [(cpu(), QUERIES), ("<cpu mode='custom'><model>no-such-model</model></cpu>", QUERIES)]
    with env.probe() as probe:
        with pytest.raises(ToolError):
            probe.run_many(jobs, parallel=2)
        after = probe.run(cpu(), QUERIES)
    assert after.observed.get(0, 0, "ebx") != 0


def test_spinning_guest_times_out_and_is_destroyed(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(image, "build", lambda queries: spin_image())
    with env.probe() as probe, pytest.raises(ProbeTimeoutError) as info:
        probe.run(cpu(), QUERIES, timeout=1.5)
    # A failed run keeps libvirt's log of its domain and says where it is.
    logs = _our_logs(env.uri, env.prefix)
    if logs:
        assert str(logs[0]) in str(info.value)


def test_successful_runs_leave_no_domain_log(env: Env) -> None:
    if domain_log(env.uri, "x") is None or not QEMU_LOG_DIR.is_dir():
        pytest.skip(f"no local libvirt QEMU log directory ({QEMU_LOG_DIR})")
    with env.probe() as probe:
        probe.run_many([(cpu(), QUERIES)] * 2, parallel=2)
        probe.run(cpu(), QUERIES)
    assert _our_logs(env.uri, env.prefix) == []


def test_ctrl_c_destroys_domain(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("SIGINT reaches only the main thread")
    monkeypatch.setattr(image, "build", lambda queries: spin_image())
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with env.probe() as probe, pytest.raises(KeyboardInterrupt):
            probe.run(cpu(), QUERIES, timeout=20.0)
    finally:
        timer.cancel()


def test_ctrl_c_landing_after_libvirt_created_the_domain_destroys_it(env: Env) -> None:
    """Simulates Ctrl-C arriving inside libvirt-python's createXML wrapper
    after libvirtd created the domain but before the handle came back (seen
    with real SIGINTs, but only now and then): the probe finds the domain by
    name and destroys it before the KeyboardInterrupt leaves run(), rather
    than leaving it to AUTODESTROY at disconnect."""
    with env.probe() as probe:
        real = probe._connection()

        class Interrupting:
            def createXML(self, xml: str, flags: int) -> object:
                real.createXML(xml, flags)
                raise KeyboardInterrupt

            def lookupByName(self, name: str) -> object:
                return real.lookupByName(name)

        probe._connection = lambda: Interrupting()  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            probe.run(cpu(), QUERIES)
        # Still connected: the domain is gone because run() destroyed it.
        assert _our_domains(env.uri, env.prefix) == []
        assert _our_logs(env.uri, env.prefix) == []


def test_refused_cpu_is_a_tool_error(env: Env) -> None:
    with env.probe() as probe, pytest.raises(ToolError):
        probe.run("<cpu mode='custom' match='exact'><model>no-such-model</model></cpu>", QUERIES)


def test_failed_run_keeps_and_names_its_log_unless_told_not_to(env: Env) -> None:
    if domain_log(env.uri, "x") is None or not QEMU_LOG_DIR.is_dir():
        pytest.skip(f"no local libvirt QEMU log directory ({QEMU_LOG_DIR})")
    # Required features this host lacks, with libvirt's own check: QEMU
    # starts, libvirt finds the guest CPU short and stops it (a log exists).
    missing = "".join(f"<feature policy='require' name='{n}'/>"
                      for n in ("abm", "sse4a", "xop", "fma4", "tbm", "avx512f", "amx-tile"))
    cpu_xml = f"<cpu mode='custom' match='exact' check='full'><model>qemu64</model>{missing}</cpu>"
    with LibvirtProbe(env.uri, name_prefix=env.prefix) as probe, \
            pytest.raises(ToolError) as info:
        probe.run(cpu_xml, QUERIES)
    [log] = _our_logs(env.uri, env.prefix)
    assert f"(libvirt's log: {log})" in str(info.value)
    log.unlink()
    with LibvirtProbe(env.uri, name_prefix=env.prefix, keep_failed_logs=False) as probe, \
            pytest.raises(ToolError) as info:
        probe.run(cpu_xml, QUERIES)
    assert _our_logs(env.uri, env.prefix) == []
    assert "libvirt's log" not in str(info.value)


def test_cpu_xml_must_be_a_cpu_element() -> None:
    with pytest.raises(InputError):
        domain_xml(DOMAIN_PREFIX + "x", "<domain/>", Path("/i"), Path("/s"))
    with pytest.raises(InputError):
        domain_xml(DOMAIN_PREFIX + "x", "<cpu", Path("/i"), Path("/s"))


def test_domain_xml_shape() -> None:
    from lxml import etree

    xml = etree.fromstring(
        domain_xml(DOMAIN_PREFIX + "x", cpu(), Path("/d/image.bin"), Path("/d/serial.log"))
    )
    assert xml.findtext("os/loader") == "/d/image.bin"
    assert xml.find("os/loader").get("type") == "rom"  # type: ignore[union-attr]
    assert xml.findtext("on_reboot") == "destroy"
    assert xml.find("devices/serial/source").get("path") == "/d/serial.log"  # type: ignore[union-attr]
    assert xml.find("devices/memballoon").get("model") == "none"  # type: ignore[union-attr]
    assert xml.find("cpu").get("mode") == "host-passthrough"  # type: ignore[union-attr]
    # The guest ends by resetting; nothing is passed behind libvirt's back.
    assert not [e for e in xml.iter() if "libvirt.org/schemas/domain/qemu" in str(e.tag)]


def test_probe_domain_is_not_tainted(env: Env) -> None:
    # libvirt writes "Domain id=N is tainted: REASON" into the domain's log
    # for <qemu:commandline> (custom-argv), monitor passthrough
    # (custom-monitor) and the like; a plain probe run must cause none.
    if not env.uri.startswith("qemu:///") or not QEMU_LOG_DIR.is_dir():
        pytest.skip(f"no local libvirt QEMU log directory ({QEMU_LOG_DIR})")
    with LibvirtProbe(env.uri, name_prefix=env.prefix, keep_domain_logs=True) as probe:
        result = probe.run(cpu(), QUERIES)
    assert result.observed.lookup(0, 0) is not None
    logs = list(QEMU_LOG_DIR.glob(env.prefix + "*.log"))
    try:
        assert len(logs) == 1
        text = logs[0].read_text(errors="replace")
        assert "-bios" in text or "image.bin" in text  # the log of this run
        assert "tainted" not in text
    finally:
        for log in logs:
            log.unlink(missing_ok=True)


def test_cpu_xml_with_entities_is_refused() -> None:
    # xmlutil.parse_xml refuses any DOCTYPE, which is where entities live.
    evil = '<!DOCTYPE cpu [<!ENTITY x SYSTEM "file:///etc/passwd">]><cpu><model>&x;</model></cpu>'
    with pytest.raises(InputError, match=r"^<cpu>: XML with a DOCTYPE is refused .*entity"):
        domain_xml(DOMAIN_PREFIX + "x", evil, Path("/i"), Path("/s"))
    # A DOCTYPE without entity references is refused too.
    with pytest.raises(InputError, match=r"^<cpu>: XML with a DOCTYPE is refused"):
        domain_xml(DOMAIN_PREFIX + "x", "<!DOCTYPE cpu><cpu/>", Path("/i"), Path("/s"))


@pytest.mark.parametrize("switch", sorted(LIBVIRT_KVM_ACTS_ON))
def test_kvm_switch_states_libvirt_acts_on(switch: str, env: Env) -> None:
    """LIBVIRT_KVM_ACTS_ON against real guests through libvirt. Bits from
    Linux's kvm_para.h: CPUID.40000001H EAX KVM_FEATURE_PV_SEND_IPI (11) and
    KVM_FEATURE_POLL_CONTROL (12), EDX KVM_HINTS_REALTIME (0)."""
    from lxml import etree

    where = {"pv-ipi": ("eax", 11), "poll-control": ("eax", 12), "hint-dedicated": ("edx", 0)}
    reg_name, bit = where[switch]
    named = "<cpu mode='custom' match='exact' check='none'><model>qemu64</model></cpu>"
    host = ("<cpu mode='host-passthrough' check='none'>"
            "<feature policy='disable' name='arch-capabilities'/></cpu>")

    def seen(cpu: str, state: str | None) -> bool:
        features = None if state is None else etree.fromstring(
            f"<features><kvm><{switch} state='{state}'/></kvm></features>")
        result = run_libvirt(cpu, [(0x4000_0001, 0)], uri=env.uri, features=features,
                             name_prefix=env.prefix)
        entry = result.observed.lookup(0x4000_0001)
        assert entry is not None
        return bool(entry.reg(reg_name) >> bit & 1)  # type: ignore[arg-type]

    acts_on = LIBVIRT_KVM_ACTS_ON[switch]
    # qemu64 leaves every one of these off: "on" reaches the guest only if
    # libvirt passes it.
    assert seen(named, None) is False
    assert seen(named, "on") is acts_on
    # host-passthrough's default is QEMU's `host` default; "off" changes it
    # only if libvirt passes it.
    default = seen(host, None)
    assert seen(host, "off") is (False if not acts_on else default)


# -- transient refusals: retried, counted, and fewer guests in flight ---------

FAST = RetryPolicy(attempts=4, base=0.02, cap=0.1, total=10.0)


def _daemon_error(call: Callable[[], object]) -> libvirt.libvirtError:
    """The libvirtError the real daemon answers `call` with."""
    try:
        call()
    except libvirt.libvirtError as exc:
        return exc
    raise AssertionError("the daemon accepted it")


def _our_clients() -> set[str]:
    """libvirtd's ids of this process's connections (virt-admin)."""
    if shutil.which("virt-admin") is None:
        pytest.skip("virt-admin is not installed")
    listing = subprocess.run(["virt-admin", "srv-clients-list", "libvirtd"],
                             capture_output=True, text=True, timeout=30)
    if listing.returncode != 0:
        pytest.skip(f"virt-admin cannot reach libvirtd's admin socket: {listing.stderr.strip()}")
    ours = set()
    for line in listing.stdout.splitlines()[2:]:
        if not line.strip():
            continue
        client = line.split()[0]
        info = subprocess.run(["virt-admin", "client-info", "libvirtd", client],
                              capture_output=True, text=True, timeout=30).stdout
        if re.search(rf"^unix_process_id\s*:\s*{os.getpid()}$", info, re.M):
            ours.add(client)
    return ours


def _drop_clients_since(before: set[str]) -> None:
    """Make the real libvirtd drop the connections this process opened since
    `before` was listed (virt-admin client-disconnect: what a client sees
    when the daemon restarts or sheds it); only those."""
    new = _our_clients() - before
    if not new:
        pytest.fail("virt-admin lists no connection this test opened")
    for client in sorted(new):
        subprocess.run(["virt-admin", "client-disconnect", "libvirtd", client],
                       capture_output=True, check=True, timeout=30)


def test_transient_cause_of_the_real_daemons_refusals(env: Env) -> None:
    """Deterministic refusals the real daemon gives are not transient; the
    same daemon dropping our connection is."""
    before = _our_clients()
    conn = libvirt.open(env.uri)
    try:
        bad_xml = _daemon_error(lambda: conn.createXML("<domain", 0))
        assert bad_xml.get_error_code() == libvirt.VIR_ERR_XML_DETAIL
        unknown_model = _daemon_error(lambda: conn.createXML(domain_xml(
            env.prefix + "x", "<cpu mode='custom'><model>no-such-model</model></cpu>",
            env.tmp / "image.bin", env.tmp / "serial.log").decode(),
            libvirt.VIR_DOMAIN_START_PAUSED | libvirt.VIR_DOMAIN_START_AUTODESTROY))
        missing_file = _daemon_error(lambda: conn.createXML(domain_xml(
            env.prefix + "x", cpu(), Path("/nonexistent/image.bin"),
            Path("/nonexistent/serial.log")).decode(),
            libvirt.VIR_DOMAIN_START_PAUSED | libvirt.VIR_DOMAIN_START_AUTODESTROY))
        assert missing_file.get_error_code() == libvirt.VIR_ERR_SYSTEM_ERROR
        assert missing_file.get_int1() == errno.ENOENT  # errno travels as int1
        for exc in (bad_xml, unknown_model, missing_file):
            assert transient_cause(exc, conn) is None, exc
        _drop_clients_since(before)
        broken = _daemon_error(conn.getVersion)
        assert broken.get_error_domain() == libvirt.VIR_FROM_RPC
        assert transient_cause(broken, conn) is Transient.CONNECTION
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()
    # No daemon on a socket at all: a connection error, which the probe does
    # not retry when it first connects (there is nothing to wait for).
    nowhere = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
    assert transient_cause(_daemon_error(lambda: libvirt.open(nowhere))) is Transient.CONNECTION
    started = time.monotonic()
    with pytest.raises(LibvirtUnavailableError, match="cannot connect to libvirt"):
        LibvirtProbe(nowhere, retry=RetryPolicy(attempts=5, base=1.0, cap=1.0))
    assert time.monotonic() - started < 1.0  # no backoff happened


def test_transient_cause_reads_libvirts_fields() -> None:
    """The classification by code, domain and errno, on errors shaped as the
    daemon sends them (tests/simulated_libvirt.py)."""
    err = libvirt_error
    system, cgroup = libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_CGROUP
    assert transient_cause(bpf_eagain()) is Transient.CGROUP_BPF
    # The message alone decides only where the errno was not kept.
    assert transient_cause(err(system, 0, BPF_EAGAIN)) is Transient.CGROUP_BPF
    assert transient_cause(err(system, 0, "cannot fork child process: Resource temporarily "
                                          "unavailable", errno.EAGAIN)) is Transient.EAGAIN
    assert transient_cause(err(system, cgroup, "failed to load cgroup BPF prog: "
                                               "Operation not permitted", errno.EPERM)) is None
    assert transient_cause(err(system, cgroup, BPF_EAGAIN, errno.ENOMEM)) is None
    assert transient_cause(connection_refused()) is Transient.CONNECTION
    assert transient_cause(err(libvirt.VIR_ERR_OPERATION_TIMEOUT, libvirt.VIR_FROM_QEMU,
                               "cannot acquire state change lock")) is Transient.BUSY
    assert transient_cause(err(libvirt.VIR_ERR_CONFIG_UNSUPPORTED, libvirt.VIR_FROM_QEMU,
                               "unsupported configuration: CPU model")) is None
    assert transient_cause(err(libvirt.VIR_ERR_AUTH_FAILED, libvirt.VIR_FROM_RPC,
                               "authentication failed")) is None


def test_simulated_daemon_refusing_with_bpf_eagain_is_retried(env: Env) -> None:
    """The daemon refuses the first two domains with the cgroup BPF EAGAIN:
    the third attempt runs the guest, and the statistics say so."""
    refusals = Refusals(create=2)
    with SimulatedRefusingDaemon(env.uri, refusals, name_prefix=env.prefix, retry=FAST,
                                 rng=random.Random(0)) as probe:
        result = probe.run(cpu(), QUERIES)
    assert result.observed.get(0, 0, "ebx") != 0
    assert refusals.refused == 2 and refusals.create == 0
    stats = probe.stats
    assert (stats.guests, stats.attempts) == (1, 3)
    assert stats.retries == {Transient.CGROUP_BPF: 2} and not stats.gave_up
    # Equal jitter: each pause in [c/2, c], c = 0.02 then 0.04.
    assert 0.03 <= stats.backoff_seconds <= 0.06
    assert BPF_EAGAIN in stats.messages[Transient.CGROUP_BPF]
    assert probe.limit.decreases == 2 and probe.limit.lowest == 1
    assert result.diagnostics[-1] == ("libvirt refused 2 time(s) transiently before the guest "
                                      "ran (cgroup-bpf-eagain: 2)")


def test_simulated_daemon_still_refusing_gives_up_with_the_cause(env: Env) -> None:
    """Retries are bounded: after `attempts` tries the error is
    LibvirtUnavailableError (machinery: could not run), carrying libvirt's
    own error, and no domain, log or directory stays behind."""
    with SimulatedRefusingDaemon(env.uri, Refusals(create=100), name_prefix=env.prefix,
                                 retry=FAST) as probe, \
            pytest.raises(LibvirtUnavailableError) as info:
        probe.run(cpu(), QUERIES)
    exc = info.value
    assert exc.cause is Transient.CGROUP_BPF and exc.attempts == FAST.attempts
    assert isinstance(exc.__cause__, libvirt.libvirtError)
    assert exc.__cause__.get_int1() == errno.EAGAIN
    assert "Resource temporarily unavailable" in str(exc)
    assert f"after {FAST.attempts} attempt(s)" in str(exc)
    assert probe.stats.gave_up == {Transient.CGROUP_BPF: 1}
    assert probe.stats.retries == {Transient.CGROUP_BPF: FAST.attempts - 1}


def test_retrying_stops_at_the_time_budget(env: Env) -> None:
    policy = RetryPolicy(attempts=1000, base=0.05, cap=0.05, total=0.3)
    with SimulatedRefusingDaemon(env.uri, Refusals(create=1000), name_prefix=env.prefix,
                                 retry=policy) as probe, \
            pytest.raises(LibvirtUnavailableError) as info:
        probe.run(cpu(), QUERIES)
    # Each pause is at least 0.025 s, and none ends past 0.3 s: 12 pauses at most.
    assert info.value.attempts <= 13
    assert probe.stats.backoff_seconds <= policy.total


def test_deterministic_refusal_is_never_retried(env: Env) -> None:
    with env.probe() as probe, pytest.raises(DomainRefusedError, match="no-such-model"):
        probe.run("<cpu mode='custom' match='exact'><model>no-such-model</model></cpu>",
                  QUERIES)
    assert probe.stats.attempts == 1 and not probe.stats.retries


def test_connection_the_daemon_dropped_is_reopened_and_the_guest_runs(env: Env) -> None:
    """The real libvirtd drops the probe's connection between two guests (as
    a restart does): the next guest's createXML meets the broken connection,
    the probe opens a new one and runs it."""
    before = _our_clients()
    with env.probe() as probe:
        probe.run(cpu(), QUERIES)
        first = probe.conn
        _drop_clients_since(before)
        result = probe.run(cpu(), QUERIES)
        assert probe.conn is not first
    assert result.observed.get(0, 0, "ebx") != 0
    assert probe.stats.retries == {Transient.CONNECTION: 1}
    assert (probe.stats.guests, probe.stats.attempts) == (2, 3)


def test_simulated_daemon_restart_refuses_reconnections_until_it_is_back(env: Env) -> None:
    """The real daemon drops the connection; the simulated restart then
    refuses two reconnections (ECONNREFUSED) before accepting: retried too."""
    refusals = Refusals(reconnect=2)
    before = _our_clients()
    with SimulatedRefusingDaemon(env.uri, refusals, name_prefix=env.prefix,
                                 retry=FAST) as probe:
        probe.run(cpu(), QUERIES)
        _drop_clients_since(before)
        result = probe.run(cpu(), QUERIES)
    assert result.observed.get(0, 0, "ebx") != 0
    assert refusals.reconnect == 0
    # The broken pipe, then the refused reconnections that an attempt met
    # (the look-up of the lost domain met one too, and gave up quietly).
    assert probe.stats.retries == {Transient.CONNECTION: 2}
    assert CONNECTION_REFUSED in probe.stats.messages[Transient.CONNECTION]


def test_refusals_lower_the_number_of_guests_in_flight(env: Env) -> None:
    """Six guests at once; the daemon refuses the first three domains: every
    guest still runs, and the limit on guests in flight was halved (from at
    most six in flight to at most three)."""
    limit = AdaptiveLimit(6)
    refusals = Refusals(create=3)
    with SimulatedRefusingDaemon(env.uri, refusals, name_prefix=env.prefix, retry=FAST,
                                 limit=limit) as probe:
        results = probe.run_many([(cpu(), QUERIES)] * 6, parallel=6)
    assert all(r.observed.get(0, 0, "ebx") != 0 for r in results)
    assert probe.stats.retries == {Transient.CGROUP_BPF: 3}
    assert probe.stats.attempts == 9
    assert limit.decreases >= 1 and limit.lowest <= 3
    assert limit.peak <= 6 and limit.in_flight == 0
