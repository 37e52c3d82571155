"""The libvirt probe backend: boot the CPUID image as a transient libvirt
domain with a given <cpu> element and read what the guest saw.

One run:
  1. a private temporary directory (mode 0711: libvirt's QEMU user may open
     the image by name but not list the directory) holding the image;
  2. createXML(START_PAUSED | AUTODESTROY): libvirt finishes its whole start
     sequence (QMP setup, cont is *not* sent) before the guest runs, so a
     guest that exits within microseconds cannot make createXML fail with
     "qemu unexpectedly closed the monitor" (measured here without it: one
     start in three failed); AUTODESTROY makes libvirtd destroy the domain if
     this process dies without cleaning up;
  3. resume(); the image writes its answers to COM1 (a file libvirt opens and
     hands to QEMU), then resets the machine (keyboard controller, then port
     0xCF9), which <on_reboot>destroy</on_reboot> turns into the end of the
     domain. No <qemu:commandline> (libvirt has no element for isa-debug-exit),
     so the domain is not tainted 'custom-argv'; the reset costs the same as
     the debug exit (both end in libvirt's one 200 ms stop poll, measured);
  4. poll the domain until libvirt has stopped it (a transient domain
     vanishes); destroy it ourselves on timeout, error or Ctrl-C.

Teardown time. libvirt starts QEMU daemonized, so QEMU's parent is PID 1 (or
the nearest child subreaper). When QEMU exits, libvirt's stop path
(qemuProcessKill -> virProcessKillPainfullyDelay) polls kill(pid, 0) every
200 ms until the process is gone, and a zombie still answers kill(pid, 0).
On this machine PID 1 reaps orphans only about every 1.6 s, which is the whole
"1.6 s teardown"; under a reaping subreaper it is one 200 ms poll. See
docs/libvirt-teardown.md. `run_many` overlaps guests so that throughput does
not pay the teardown serially.

Waiting: polling virDomainGetState every few ms costs one local RPC per poll
and sees the end within a poll of libvirt noticing it; libvirt's own stop path
dominates, so an event loop thread buys nothing measurable here.

Transient refusals. Under load libvirtd can refuse a domain for reasons that
have nothing to do with it: "failed to load cgroup BPF prog: Resource
temporarily unavailable" (seen here with 16 guests in flight: the kernel's BPF
verifier gives up with EAGAIN when the loading thread has a signal pending,
kernel commit c3494801cd17, bpf(2); libbpf retries it), a fork that hits a
process limit, a connection the daemon dropped (restart, max_clients, a
keepalive timeout). `transient_cause()` tells those apart by libvirt's error
code, domain and errno (libvirtError.get_error_code(), get_error_domain(),
get_int1()) and whether the connection is still alive; each run retries them
under a RetryPolicy (bounded tries and time, jittered backoff) and takes a
slot of an AdaptiveLimit, which lowers the number of guests in flight when
the daemon refuses. Everything else (bad XML, an unknown model, a CPU the
host cannot give) is a DomainRefusedError at once, never retried. Retries
that run out are a LibvirtUnavailableError: the machinery could not run the
guest, which says nothing about the guest's CPUID. `LibvirtProbe.stats`
counts attempts and retries by cause.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import enum
import errno
import logging
import os
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

from lxml import etree

from kvmcpuid_virt.analysis.backend import Backend
from kvmcpuid_virt.cpuid.table import CpuidTable
from kvmcpuid_virt.errors import (
    InputError,
    KvmcpuidError,
    ProbeError,
    ProbeTimeoutError,
    ToolError,
)
from kvmcpuid_virt.probe import image, smp_image
from kvmcpuid_virt.probe.result import ProbeResult
from kvmcpuid_virt.probe.retry import DEFAULT_POLICY, AdaptiveLimit, RetryPolicy, RetryStats
from kvmcpuid_virt.process import PREFIX, Deadline, private_tempdir, read_serial
from kvmcpuid_virt.xmlutil import parse_xml

__all__ = [
    "DOMAIN_PREFIX",
    "MAX_IN_FLIGHT",
    "DomainRefusedError",
    "LibvirtProbe",
    "LibvirtUnavailableError",
    "Transient",
    "domain_log",
    "domain_xml",
    "is_local",
    "run_libvirt",
    "transient_cause",
]

log = logging.getLogger(__name__)
_R = TypeVar("_R")

DOMAIN_PREFIX: Final = PREFIX
# Seconds between state polls: small next to libvirt's 200 ms stop poll.
_POLL: Final = 0.003

Query = tuple[int, int]
# libvirt's QEMU driver logs each domain (command line, taints, QEMU's
# stderr) to LOGDIR/NAME.log through virtlogd, and keeps the file after a
# transient domain is gone: thousands of probe runs would leave thousands of
# files. The probe removes the log of a run that succeeded and names it in
# the error of one that did not. Only for a daemon on this machine.
_SYSTEM_LOG_DIR: Final = Path("/var/log/libvirt/qemu")
# Guests in flight on one probe when the caller sets no AdaptiveLimit of its
# own (its thread pool bounds them first).
MAX_IN_FLIGHT: Final = 64


class DomainRefusedError(ToolError):
    """libvirt refused the probe domain for a reason a retry cannot change
    (bad XML, an unknown model, a CPU the host cannot give, a missing file):
    an answer about the configuration."""


class LibvirtUnavailableError(ToolError):
    """The machinery could not run the guest: libvirtd cannot be reached, or
    kept refusing for transient reasons until the retries ran out. Says
    nothing about the guest's CPUID. `cause`: a Transient (None: the
    daemon could not be reached at all); `attempts`: domains tried;
    __cause__: libvirt's last error."""

    def __init__(self, message: str, cause: Transient | None = None, attempts: int = 0) -> None:
        super().__init__(message)
        self.cause = cause
        self.attempts = attempts


class Transient(enum.StrEnum):
    """Why a libvirt error is worth another try."""

    CGROUP_BPF = "cgroup-bpf-eagain"  # the device cgroup's BPF program load: EAGAIN
    EAGAIN = "eagain"  # another call of libvirtd's said EAGAIN (fork, thread, ...)
    CONNECTION = "connection"  # the connection to libvirtd broke
    BUSY = "daemon-busy"  # libvirtd timed out waiting for a lock or job


_EAGAIN_TEXT: Final = os.strerror(errno.EAGAIN)  # "Resource temporarily unavailable"


def transient_cause(exc: Any, conn: Any = None) -> Transient | None:
    """Why `exc` (a libvirt.libvirtError) is worth another try, or None when
    it is not. `conn`: the connection the call was made on (None: the error
    came from opening one). Decided by libvirt's own fields, never by
    trying again to see:
    - VIR_ERR_SYSTEM_ERROR whose errno (int1, kept over the RPC) is EAGAIN,
      or, where the errno was lost, whose message ends in strerror(EAGAIN):
      the cgroup BPF load when the message or domain (VIR_FROM_CGROUP) says
      so, else another EAGAIN;
    - an RPC or remote-driver error (VIR_FROM_RPC, VIR_FROM_REMOTE) that
      left the connection dead (virConnectIsAlive() is 0): "Cannot write
      data: Broken pipe", "client socket is closed", "End of file while
      reading data", "Failed to connect socket" while the daemon restarts;
    - VIR_ERR_OPERATION_TIMEOUT: a lock or job libvirtd waited for in vain.
    A live connection's RPC error (a message too large, an auth failure) and
    every other code are answers, not accidents."""
    lv = _libvirt()
    code, domain = exc.get_error_code(), exc.get_error_domain()
    message = exc.get_error_message() or str(exc)
    if code == lv.VIR_ERR_SYSTEM_ERROR:
        err = exc.get_int1()
        if err == errno.EAGAIN or (err in (None, -1, 0) and message.endswith(_EAGAIN_TEXT)):
            lowered = message.lower()
            if domain == lv.VIR_FROM_CGROUP or "bpf" in lowered or "cgroup" in lowered:
                return Transient.CGROUP_BPF
            return Transient.EAGAIN
    if (domain in (lv.VIR_FROM_RPC, lv.VIR_FROM_REMOTE)
            and code in (lv.VIR_ERR_SYSTEM_ERROR, lv.VIR_ERR_INTERNAL_ERROR, lv.VIR_ERR_RPC,
                         lv.VIR_ERR_NO_CONNECT)
            and not _alive(conn)):  # fmt: skip
        return Transient.CONNECTION
    if code == lv.VIR_ERR_OPERATION_TIMEOUT:
        return Transient.BUSY
    return None


def _alive(conn: Any) -> bool:
    if conn is None:
        return False
    try:
        return bool(conn.isAlive())
    except Exception:  # a connection too broken to answer is not alive
        return False


class _Retry(Exception):
    """Inside LibvirtProbe: one attempt met a transient error. Not a
    KvmcpuidError, so that no handler of the attempt mistakes it for a
    result; run() retries it or turns it into LibvirtUnavailableError."""

    def __init__(self, cause: Transient, error: Exception, where: str, name: str) -> None:
        super().__init__(f"{where}: {' '.join(str(error).split())}")
        self.cause = cause
        self.error = error
        self.where = where
        self.name = name


def is_local(uri: str) -> bool:
    """Whether libvirtd at `uri` runs on this machine: the probe hands it an
    image and a serial file by local path, so a remote daemon cannot run it."""
    parts = urlsplit(uri)
    driver, _, transport = parts.scheme.partition("+")
    return (driver == "qemu" and transport in ("", "unix")
            and parts.hostname in (None, "", "localhost"))  # fmt: skip


def domain_log(uri: str, name: str) -> Path | None:
    """Where libvirtd at `uri` logs domain `name`, when that is a local file
    (the system or the session daemon, whatever the socket)."""
    if not is_local(uri):
        return None
    path = urlsplit(uri).path
    if path == "/system":
        return _SYSTEM_LOG_DIR / f"{name}.log"
    if path == "/session":
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        return Path(cache) / "libvirt" / "qemu" / "log" / f"{name}.log"
    return None


def _cpu_element(cpu_xml: etree._Element | str | bytes) -> etree._Element:
    if isinstance(cpu_xml, str | bytes):
        cpu = parse_xml(cpu_xml, "<cpu>")  # refuses any DOCTYPE (xmlutil)
    else:
        cpu = copy.deepcopy(cpu_xml)  # the caller's tree stays untouched
    if cpu.tag != "cpu":
        raise InputError(f"expected a <cpu> element, got <{cpu.tag}>")
    return cpu


def domain_xml(
    name: str,
    cpu_xml: etree._Element | str | bytes,
    loader: Path,
    serial: Path,
    *,
    machine: str = "pc",
    emulator: str | None = None,
    features: etree._Element | None = None,
    vcpus: int = 1,
    topology: etree._Element | None = None,
) -> bytes:
    """The transient domain of one probe run, built with lxml. `features`: a
    `<features>` element to include (the KVM paravirtual switches libvirt
    takes there, see adapters.libvirt.kvm_features_element); `vcpus` and
    `topology` (a `<topology>` for the <cpu>, replacing any it has): the
    multi-vCPU guest's."""
    root = etree.Element("domain", type="kvm")
    etree.SubElement(root, "name").text = name
    etree.SubElement(root, "memory", unit="MiB").text = "16"
    etree.SubElement(root, "vcpu").text = str(vcpus)
    os_ = etree.SubElement(root, "os")
    etree.SubElement(os_, "type", arch="x86_64", machine=machine).text = "hvm"
    etree.SubElement(os_, "loader", type="rom", readonly="yes").text = str(loader)
    if features is not None:
        if features.tag != "features":
            raise InputError(f"expected a <features> element, got <{features.tag}>")
        root.append(copy.deepcopy(features))
    cpu = _cpu_element(cpu_xml)
    if topology is not None:
        for old in cpu.findall("topology"):
            cpu.remove(old)
        # libvirt's order: after <model>/<vendor>, before the features.
        at = sum(1 for c in cpu if c.tag in ("model", "vendor"))
        cpu.insert(at, copy.deepcopy(topology))
    root.append(cpu)
    # Every way the guest can end ends the domain: its reset (the normal
    # end here) is a reboot to libvirt, its triple-fault fallback a crash.
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        etree.SubElement(root, event).text = "destroy"
    devices = etree.SubElement(root, "devices")
    if emulator is not None:
        etree.SubElement(devices, "emulator").text = emulator
    console = etree.SubElement(devices, "serial", type="file")
    etree.SubElement(console, "source", path=str(serial))
    etree.SubElement(console, "target", port="0")
    # No balloon (a PCI device and a QMP poll libvirt would set up); USB is
    # off because no <controller type='usb'> is wanted: model='none'.
    etree.SubElement(devices, "memballoon", model="none")
    etree.SubElement(devices, "controller", type="usb", model="none")
    return etree.tostring(root)


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError as exc:
        raise ToolError("libvirt-python is not installed (pip install libvirt-python)") from exc
    global _handler_installed
    if not _handler_installed:
        # libvirt-python's default handler prints every error to stderr,
        # including the expected "Domain not found" of a guest that already
        # ended; errors still raise libvirtError, so only log them.
        libvirt.registerErrorHandler(_log_libvirt_error, None)
        _handler_installed = True
    return libvirt


_handler_installed = False


def _log_libvirt_error(_ctx: object, err: Sequence[object]) -> None:
    log.debug("libvirt: %s", err[2] if len(err) > 2 else err)


def _with_log(exc: ProbeError | ToolError, path: Path) -> ProbeError | ToolError:
    """The same error, naming libvirt's log of the domain."""
    return type(exc)(f"{exc} (libvirt's log: {path})")


class LibvirtProbe:
    """One libvirt connection; runs probe guests on it. A context manager:
    closing it closes the connection (AUTODESTROY then stops any domain a
    crashed run left).

    retry: how transient refusals are retried (RetryPolicy); limit: the
    guests in flight (share one AdaptiveLimit between probes of one daemon);
    stats: where retries are counted (share one RetryStats likewise); rng:
    the backoff's jitter."""

    def __init__(self, uri: str = "qemu:///system", *, machine: str = "pc",
                 emulator: str | None = None, name_prefix: str = DOMAIN_PREFIX,
                 keep_domain_logs: bool = False, keep_failed_logs: bool = True,
                 retry: RetryPolicy = DEFAULT_POLICY, limit: AdaptiveLimit | None = None,
                 stats: RetryStats | None = None, rng: random.Random | None = None) -> None:
        if not name_prefix.startswith(DOMAIN_PREFIX) or not all(
            c.isalnum() or c in "-_" for c in name_prefix
        ):
            raise ValueError(f"domain name prefix {name_prefix!r} must start {DOMAIN_PREFIX!r}")
        if not is_local(uri):
            raise InputError(
                f"{uri}: the libvirt probe needs libvirtd on this machine "
                "(qemu:///system or qemu:///session): it passes the guest image by path"
            )
        self.name_prefix = name_prefix
        # Logs of runs that succeeded / failed (a failure's error names its log).
        self.keep_domain_logs = keep_domain_logs
        self.keep_failed_logs = keep_failed_logs
        self.retry = retry
        self.limit = limit if limit is not None else AdaptiveLimit(MAX_IN_FLIGHT)
        self.stats = stats if stats is not None else RetryStats()
        self._rng = rng if rng is not None else random.Random()
        self._lv = _libvirt()
        self.uri = uri
        self.machine = machine
        self.emulator = emulator
        self._closed = False
        # The first connection is not retried: no daemon at all is an
        # answer to give at once (reconnections are, see _connection).
        self.conn: Any = self._open(reconnect=False)
        self._owner = threading.get_ident()
        # Other threads (run_many, callers' pools) get a connection each:
        # libvirtd serves at most max_client_requests (default 5) calls of one
        # connection at a time and queues the rest with a warning in its log.
        self._local = threading.local()
        self._extra: dict[threading.Thread, Any] = {}
        self._extra_lock = threading.Lock()
        self._cancel = threading.Event()

    def _open(self, *, reconnect: bool = True) -> Any:
        """A new connection. reconnect: the daemon answered before, so a
        refusal now (a restart, max_clients) is transient (_Retry)."""
        try:
            return self._libvirt_open()
        except self._lv.libvirtError as exc:
            cause = transient_cause(exc) if reconnect else None
            if cause is not None:
                raise _Retry(cause, exc, "connect", "") from exc
            raise LibvirtUnavailableError(f"cannot connect to libvirt at {self.uri}: {exc}") \
                from exc

    def _libvirt_open(self) -> Any:
        """libvirt.open(uri): where every connection of the probe is made."""
        return self._lv.open(self.uri)

    def _connection(self) -> Any:
        """This thread's connection: the probe's own in the thread that made
        it, one per other thread (closed by close(), or once its thread has
        ended, at the end of run_many). One that broke is opened anew."""
        if self._closed:
            raise ToolError("the libvirt probe is closed")
        if threading.get_ident() == self._owner:
            if self.conn is None:
                self.conn = self._open()
            return self.conn
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._open()
            with self._extra_lock:
                self._extra[threading.current_thread()] = conn
        return conn

    def _forget_connection(self) -> None:
        """Drop this thread's connection (it broke): the next call opens one."""
        if threading.get_ident() == self._owner:
            conn, self.conn = self.conn, None
        else:
            conn = getattr(self._local, "conn", None)
            self._local.conn = None
            with self._extra_lock:
                self._extra.pop(threading.current_thread(), None)
        if conn is not None:
            with contextlib.suppress(self._lv.libvirtError):
                conn.close()

    def _close_extra(self, *, all_threads: bool) -> None:
        with self._extra_lock:
            done = [t for t in self._extra if all_threads or not t.is_alive()]
            conns = [self._extra.pop(t) for t in done]
        for conn in conns:
            with contextlib.suppress(self._lv.libvirtError):
                conn.close()

    def cancel(self) -> None:
        """Make the runs in progress in other threads stop waiting for their
        guests and destroy their domains (run_many clears this for its next
        batch; verify closes the probe after)."""
        self._cancel.set()

    def close(self) -> None:
        self._closed = True
        self._close_extra(all_threads=True)
        if self.conn is not None:
            with contextlib.suppress(self._lv.libvirtError):
                self.conn.close()
            self.conn = None

    def __enter__(self) -> LibvirtProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one guest ------------------------------------------------------------

    def _refusal(self, exc: Exception, conn: Any, where: str, name: str) -> _Retry | None:
        cause = transient_cause(exc, conn)
        return None if cause is None else _Retry(cause, exc, where, name)

    @contextmanager
    def _domain(self, xml: bytes, name: str) -> Iterator[Any]:
        """The running transient domain, destroyed on the way out unless
        libvirt already stopped it."""
        lv = self._lv
        flags = lv.VIR_DOMAIN_START_PAUSED | lv.VIR_DOMAIN_START_AUTODESTROY
        conn = self._connection()
        try:
            dom = conn.createXML(xml.decode(), flags)
        except lv.libvirtError as exc:
            retry = self._refusal(exc, conn, "createXML", name)
            if retry is not None:
                raise retry from exc
            raise DomainRefusedError(f"libvirt refused the probe domain: {exc}") from exc
        except BaseException:
            # Ctrl-C can land in libvirt-python's wrapper after the domain was
            # created but before its handle got here: find it by its name.
            # (AUTODESTROY would stop it only when the connection closes, and
            # its log would outlive the run.)
            with contextlib.suppress(lv.libvirtError):
                self._destroy(conn.lookupByName(name), name)
            raise
        try:
            yield dom
        finally:
            self._destroy(dom, name)

    def _destroy(self, dom: Any, name: str) -> None:
        lv = self._lv
        try:
            dom.destroy()
            log.debug("destroyed %s", name)
        except lv.libvirtError as exc:
            # Gone already (the normal end: the guest exited and libvirt
            # reaped it) or stopping; anything else is worth a warning.
            if exc.get_error_code() == lv.VIR_ERR_NO_DOMAIN:
                return
            if transient_cause(exc, dom.connect()) == Transient.CONNECTION:
                return  # run() destroys it by name on a new connection
            if exc.get_error_code() != lv.VIR_ERR_OPERATION_INVALID:
                log.warning("could not destroy %s: %s", name, exc)
        # destroy() returns once QEMU is stopped; removal of the transient
        # definition follows. Wait for it (bounded) so callers never see it.
        try:
            self._wait_gone(dom, Deadline(5.0), cancellable=False)
        except (KvmcpuidError, _Retry) as exc:
            log.warning("%s still listed after destroy: %s", name, exc)

    def _destroy_by_name(self, name: str) -> None:
        """After a connection broke mid-run: the domain, if libvirtd still
        has it, destroyed through this thread's new connection (AUTODESTROY
        of the old one should have done it already)."""
        try:
            conn = self._connection()
            dom = conn.lookupByName(name)
        except (self._lv.libvirtError, KvmcpuidError, _Retry):
            return  # no such domain, or no daemon to ask: nothing left to stop
        self._destroy(dom, name)

    def _wait_gone(self, dom: Any, deadline: Deadline, *, cancellable: bool = True) -> None:
        """Poll until libvirt has removed the transient domain. A stopped
        domain is reported SHUTOFF a moment before it is removed, so only
        "no such domain" counts as gone: afterwards listAllDomains() does not
        show it and its QEMU has been reaped."""
        lv = self._lv
        while True:
            try:
                dom.state()
            except lv.libvirtError as exc:
                if exc.get_error_code() == lv.VIR_ERR_NO_DOMAIN:
                    return
                retry = self._refusal(exc, dom.connect(), "state", dom.name())
                if retry is not None:
                    raise retry from exc
                raise ToolError(f"libvirt state query failed: {exc}") from exc
            if cancellable and self._cancel.is_set():
                raise ProbeError("probe cancelled")
            if deadline.expired():
                raise ProbeTimeoutError(
                    f"libvirt guest did not finish within {deadline.timeout:g} s (destroyed)"
                )
            time.sleep(_POLL)

    def _drop_log(self, path: Path | None, *, always: bool = False) -> None:
        if path is not None and (always or not self.keep_domain_logs):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

    def _vmm_view(self, dom: Any) -> tuple[CpuidTable, list[str]]:
        """What QEMU configured for the paused guest: the CPU object's
        feature-words and filtered-features, asked through libvirt's own
        monitor connection (libvirt-qemu's qemuMonitorCommand; libvirt owns
        the QMP socket, so this is the one way in)."""
        import json

        import libvirt_qemu

        from kvmcpuid_virt.probe.qom import describe_filtered, vmm_view_from_qom

        def ask(command: str, **arguments: object) -> Any:
            text = libvirt_qemu.qemuMonitorCommand(
                dom, json.dumps({"execute": command, "arguments": arguments}), 0
            )
            return json.loads(text)["return"]

        try:
            path = str(ask("query-cpus-fast")[0]["qom-path"])
            words = ask("qom-get", path=path, property="feature-words")
            filtered = ask("qom-get", path=path, property="filtered-features")
        except self._lv.libvirtError as exc:
            retry = self._refusal(exc, dom.connect(), "monitor", dom.name())
            if retry is not None:
                raise retry from exc
            raise ToolError(f"cannot read the guest CPU through libvirt: {exc}") from exc
        except (KeyError, IndexError, ValueError) as exc:
            raise ToolError(f"cannot read the guest CPU through libvirt: {exc}") from exc
        return vmm_view_from_qom(words), describe_filtered(filtered)

    def run(
        self,
        cpu_xml: etree._Element | str | bytes,
        queries: Sequence[Query],
        timeout: float = 10.0,
        *,
        want_vmm_view: bool = False,
        features: etree._Element | None = None,
        msr_queries: Sequence[image.MsrQuery] = (),
    ) -> ProbeResult:
        """Boot the image in a transient domain with `cpu_xml` as its <cpu>
        (and `features` as its <features>, see domain_xml); `timeout` bounds
        each attempt. Transient refusals are retried under self.retry (a new
        domain each time); LibvirtUnavailableError when they run out.
        want_vmm_view: also read what QEMU configured, while the guest is
        still paused (two monitor commands; libvirt marks the domain tainted
        'custom-monitor' for them)."""
        queries = list(queries)
        blob = image.build(queries, msr_queries) if msr_queries else image.build(queries)
        result, causes = self._with_retries(lambda: self._attempt(
            cpu_xml, queries, blob, timeout, want_vmm_view, features, msr_queries))
        assert isinstance(result, ProbeResult)
        if causes:
            result.diagnostics.append(_refusals(causes))
        return result

    def run_smp(self, cpu_xml: etree._Element | str | bytes, queries: Sequence[Query],
                vcpus: int, topology: etree._Element, timeout: float = 10.0,
                *, features: etree._Element | None = None) -> smp_image.SmpResult:
        """Boot the multi-vCPU image (probe/smp_image.py) with `vcpus` vCPUs
        and `topology` in the <cpu>; every vCPU's answers. Retries as run()."""
        queries = list(queries)
        blob = smp_image.build(queries, vcpus, sipi=True)
        result, causes = self._with_retries(lambda: self._attempt(
            cpu_xml, queries, blob, timeout, False, features, smp=(vcpus, topology)))
        assert isinstance(result, smp_image.SmpResult)
        if causes:
            result = dataclasses.replace(result, diagnostics=(*result.diagnostics,
                                                              _refusals(causes)))
        return result

    def _with_retries(self, attempt: Callable[[], _R]) -> tuple[_R, list[str]]:
        """attempt() until it does not meet a transient refusal: its result
        and the causes of the refusals; LibvirtUnavailableError when the
        retries run out."""
        self.stats.guest()
        started = time.monotonic()
        tries = 0
        causes: list[str] = []
        while True:
            tries += 1
            try:
                result = attempt()
            except _Retry as retry:
                if retry.cause == Transient.CONNECTION:
                    self._forget_connection()
                    if retry.name:
                        self._destroy_by_name(retry.name)
                self._next_try(retry, tries, time.monotonic() - started)
                causes.append(retry.cause)
                continue
            return result, causes

    def _next_try(self, retry: _Retry, tries: int, elapsed: float) -> None:
        """Back off before the next try, or give up: LibvirtUnavailableError
        with libvirt's error as its cause."""
        pause = self.retry.backoff(tries, self._rng)
        message = str(retry)
        if self.retry.gives_up(tries, elapsed, pause) or self._cancel.is_set():
            self.stats.give_up(retry.cause, message)
            raise LibvirtUnavailableError(
                f"libvirt could not run the probe guest: {retry.cause} after {tries} "
                f"attempt(s) in {elapsed:.1f} s: {message}", retry.cause, tries,
            ) from retry.error
        self.stats.retried(retry.cause, pause, message)
        log.info("libvirt refused a probe guest (%s: %s); attempt %d in %.2f s",
                 retry.cause, message, tries + 1, pause)
        if self._cancel.wait(pause):
            raise ProbeError("probe cancelled")

    def _attempt(
        self, cpu_xml: etree._Element | str | bytes, queries: list[Query], blob: bytes,
        timeout: float, want_vmm_view: bool, features: etree._Element | None,
        msr_queries: Sequence[image.MsrQuery] = (),
        smp: tuple[int, etree._Element] | None = None,
    ) -> ProbeResult | smp_image.SmpResult:
        """One domain: create, (read QEMU's view,) resume, wait, read the
        serial. smp: (vCPUs, <topology>) of the multi-vCPU image in `blob`."""
        deadline = Deadline(timeout)
        name = self.name_prefix + uuid.uuid4().hex
        with private_tempdir(0o711) as tmp:
            loader = tmp / "image.bin"
            serial = tmp / "serial.log"
            loader.write_bytes(blob)
            loader.chmod(0o644)
            vcpus, topology = smp if smp is not None else (1, None)
            xml = domain_xml(name, cpu_xml, loader, serial, machine=self.machine,
                             emulator=self.emulator, features=features, vcpus=vcpus,
                             topology=topology)  # fmt: skip
            vmm_view: CpuidTable | None = None
            notes: list[str] = []
            domain_log_path = domain_log(self.uri, name)
            try:
                with self.limit.slot(self._cancel) as slot:
                    self.stats.attempt()
                    started = time.monotonic()
                    try:
                        vmm_view, notes = self._boot(xml, name, deadline, want_vmm_view)
                    except _Retry:
                        slot.refused = True  # the daemon is short of something: fewer in flight
                        raise
                    seconds = time.monotonic() - started
                log.debug("libvirt domain %s ran in %.3f s", name, seconds)
                try:
                    if smp is not None:
                        tables = smp_image.parse(read_serial(serial), queries, vcpus)
                    else:
                        observed, read = image.parse_msrs(read_serial(serial), queries,
                                                          msr_queries)  # fmt: skip
                except ProbeError as exc:
                    raise ProbeError(f"libvirt guest {name}: {exc}") from exc
            except _Retry:
                self._drop_log(domain_log_path, always=True)  # the next try has its own
                raise
            except (ProbeError, ToolError) as exc:
                # The log says what QEMU and libvirt made of the domain: keep it
                # (not for a run cancelled by Ctrl-C elsewhere: nothing failed).
                if not self.keep_failed_logs or self._cancel.is_set():
                    self._drop_log(domain_log_path, always=True)
                elif domain_log_path is not None and domain_log_path.exists():
                    raise _with_log(exc, domain_log_path) from exc
                raise
            except BaseException:
                self._drop_log(domain_log_path)  # Ctrl-C: nothing to diagnose
                raise
            self._drop_log(domain_log_path)
        if smp is not None:
            return smp_image.SmpResult(tuple(tables), vcpus, seconds, tuple(notes))
        return ProbeResult(
            observed=observed, vmm_view=vmm_view, seconds=seconds, backend=Backend.LIBVIRT,
            diagnostics=notes, msrs=read,
        )

    def _boot(self, xml: bytes, name: str, deadline: Deadline,
              want_vmm_view: bool) -> tuple[CpuidTable | None, list[str]]:  # fmt: skip
        """Create the domain paused, read QEMU's view if asked, resume, wait it out."""
        vmm_view: CpuidTable | None = None
        notes: list[str] = []
        with self._domain(xml, name) as dom:
            log.debug("created %s", name)
            if want_vmm_view:
                vmm_view, notes = self._vmm_view(dom)
            try:
                dom.resume()
            except self._lv.libvirtError as exc:
                # The guest may finish before `cont` returns; the serial
                # output decides whether it ran.
                log.debug("resume of %s: %s", name, exc)
            self._wait_gone(dom, deadline)
        return vmm_view, notes

    def run_many(
        self,
        jobs: Sequence[tuple[etree._Element | str | bytes, Sequence[Query]]],
        timeout: float = 10.0,
        parallel: int = 4,
    ) -> list[ProbeResult]:
        """Run every (cpu_xml, queries) job, up to `parallel` guests at once,
        so one guest's libvirt teardown overlaps the next guest's start.
        Results in job order; the first error is raised after every started
        guest has been cleaned up."""
        if parallel < 1:
            raise ValueError("parallel must be at least 1")
        self._cancel.clear()
        try:
            with ThreadPoolExecutor(max_workers=parallel,
                                    thread_name_prefix="kvmcpuid-lv") as pool:  # fmt: skip
                futures = [pool.submit(self.run, cpu, qs, timeout) for cpu, qs in jobs]
                try:
                    return [f.result() for f in futures]
                except BaseException:
                    # Ctrl-C or a failed guest: stop queued jobs, make running
                    # ones destroy their domains now rather than at their timeout.
                    self._cancel.set()
                    for f in futures:
                        f.cancel()
                    raise
        finally:
            # Every worker has finished here (the pool's exit waited): a later
            # run() on this probe must not find itself cancelled, and the
            # workers' connections are done with.
            self._cancel.clear()
            self._close_extra(all_threads=False)


def _refusals(causes: Sequence[str]) -> str:
    return (f"libvirt refused {len(causes)} time(s) transiently before the guest ran ("
            + ", ".join(f"{c}: {n}" for c, n in sorted(Counter(causes).items())) + ")")


def run_libvirt(
    cpu_xml: etree._Element | str | bytes,
    queries: Sequence[Query],
    timeout: float = 10.0,
    uri: str = "qemu:///system",
    *,
    name_prefix: str = DOMAIN_PREFIX,
    want_vmm_view: bool = False,
    features: etree._Element | None = None,
    msr_queries: Sequence[image.MsrQuery] = (),
) -> ProbeResult:
    """One probe guest through libvirt at `uri` (connection opened and closed
    here; use LibvirtProbe to reuse one)."""
    with LibvirtProbe(uri, name_prefix=name_prefix) as probe:
        return probe.run(cpu_xml, queries, timeout, want_vmm_view=want_vmm_view,
                         features=features, msr_queries=msr_queries)
