"""The libvirt probe backend against the real libvirtd (qemu:///system, or
KVMCPUID_LIBVIRT_URI): what the guest sees, and that every run (normal,
timeout, Ctrl-C) leaves no domain, no QEMU and no temporary directory.

Other runs may use the probe on the same daemon at the same time, so each
test uses its own domain-name prefix and checks only its own domains."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmcpuid_virt.adapters.libvirt import LIBVIRT_KVM_ACTS_ON
from kvmcpuid_virt.analysis.backend import Backend
from kvmcpuid_virt.errors import InputError, ProbeTimeoutError, ToolError
from kvmcpuid_virt.probe import image
from kvmcpuid_virt.probe.libvirt import (
    DOMAIN_PREFIX,
    LibvirtProbe,
    domain_log,
    domain_xml,
    run_libvirt,
)
from kvmcpuid_virt.process import PREFIX
from tests.conftest import host_vendor, spin_image

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
