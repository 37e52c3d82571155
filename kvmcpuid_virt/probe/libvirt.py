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
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from lxml import etree

from kvmcpuid_virt.analysis.backend import Backend
from kvmcpuid_virt.cpuid.table import CpuidTable
from kvmcpuid_virt.errors import InputError, ProbeError, ProbeTimeoutError, ToolError
from kvmcpuid_virt.probe import image
from kvmcpuid_virt.probe.result import ProbeResult
from kvmcpuid_virt.process import PREFIX, Deadline, private_tempdir, read_serial
from kvmcpuid_virt.xmlutil import parse_xml

__all__ = [
    "DOMAIN_PREFIX",
    "LibvirtProbe",
    "domain_log",
    "domain_xml",
    "is_local",
    "run_libvirt",
]

log = logging.getLogger(__name__)

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
) -> bytes:
    """The transient domain of one probe run, built with lxml. `features`: a
    `<features>` element to include (the KVM paravirtual switches libvirt
    takes there, see adapters.libvirt.kvm_features_element)."""
    root = etree.Element("domain", type="kvm")
    etree.SubElement(root, "name").text = name
    etree.SubElement(root, "memory", unit="MiB").text = "16"
    etree.SubElement(root, "vcpu").text = "1"
    os_ = etree.SubElement(root, "os")
    etree.SubElement(os_, "type", arch="x86_64", machine=machine).text = "hvm"
    etree.SubElement(os_, "loader", type="rom", readonly="yes").text = str(loader)
    if features is not None:
        if features.tag != "features":
            raise InputError(f"expected a <features> element, got <{features.tag}>")
        root.append(copy.deepcopy(features))
    root.append(_cpu_element(cpu_xml))
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


class LibvirtProbe:
    """One libvirt connection; runs probe guests on it. A context manager:
    closing it closes the connection (AUTODESTROY then stops any domain a
    crashed run left)."""

    def __init__(self, uri: str = "qemu:///system", *, machine: str = "pc",
                 emulator: str | None = None, name_prefix: str = DOMAIN_PREFIX,
                 keep_domain_logs: bool = False, keep_failed_logs: bool = True) -> None:
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
        self._lv = _libvirt()
        self.uri = uri
        self.machine = machine
        self.emulator = emulator
        self.conn: Any = self._open()
        self._owner = threading.get_ident()
        # Other threads (run_many, callers' pools) get a connection each:
        # libvirtd serves at most max_client_requests (default 5) calls of one
        # connection at a time and queues the rest with a warning in its log.
        self._local = threading.local()
        self._extra: dict[threading.Thread, Any] = {}
        self._extra_lock = threading.Lock()
        self._cancel = threading.Event()

    def _open(self) -> Any:
        try:
            return self._lv.open(self.uri)
        except self._lv.libvirtError as exc:
            raise ToolError(f"cannot connect to libvirt at {self.uri}: {exc}") from exc

    def _connection(self) -> Any:
        """This thread's connection: the probe's own in the thread that made
        it, one per other thread (closed by close(), or once its thread has
        ended, at the end of run_many)."""
        if self.conn is None:
            raise ToolError("the libvirt probe is closed")
        if threading.get_ident() == self._owner:
            return self.conn
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._open()
            with self._extra_lock:
                self._extra[threading.current_thread()] = conn
        return conn

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
            raise ToolError(f"libvirt refused the probe domain: {exc}") from exc
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
            if exc.get_error_code() != lv.VIR_ERR_OPERATION_INVALID:
                log.warning("could not destroy %s: %s", name, exc)
        # destroy() returns once QEMU is stopped; removal of the transient
        # definition follows. Wait for it (bounded) so callers never see it.
        try:
            self._wait_gone(dom, Deadline(5.0), cancellable=False)
        except ProbeError as exc:
            log.warning("%s still listed after destroy: %s", name, exc)

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
        except (self._lv.libvirtError, KeyError, IndexError, ValueError) as exc:
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
    ) -> ProbeResult:
        """Boot the image in a transient domain with `cpu_xml` as its <cpu>
        (and `features` as its <features>, see domain_xml).
        want_vmm_view: also read what QEMU configured, while the guest is
        still paused (two monitor commands; libvirt marks the domain tainted
        'custom-monitor' for them)."""
        queries = list(queries)
        deadline = Deadline(timeout)
        blob = image.build(queries)
        name = self.name_prefix + uuid.uuid4().hex
        with private_tempdir(0o711) as tmp:
            loader = tmp / "image.bin"
            serial = tmp / "serial.log"
            loader.write_bytes(blob)
            loader.chmod(0o644)
            xml = domain_xml(name, cpu_xml, loader, serial, machine=self.machine,
                             emulator=self.emulator, features=features)
            started = time.monotonic()
            vmm_view: CpuidTable | None = None
            notes: list[str] = []
            domain_log_path = domain_log(self.uri, name)
            try:
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
                seconds = time.monotonic() - started
                log.debug("libvirt domain %s ran in %.3f s", name, seconds)
                try:
                    observed = image.parse(read_serial(serial), queries)
                except ProbeError as exc:
                    raise ProbeError(f"libvirt guest {name}: {exc}") from exc
            except (ProbeError, ToolError) as exc:
                # The log says what QEMU and libvirt made of the domain: keep it
                # (not for a run cancelled by Ctrl-C elsewhere: nothing failed).
                if not self.keep_failed_logs or self._cancel.is_set():
                    self._drop_log(domain_log_path, always=True)
                elif domain_log_path is not None and domain_log_path.exists():
                    raise type(exc)(f"{exc} (libvirt's log: {domain_log_path})") from exc
                raise
            except BaseException:
                self._drop_log(domain_log_path)  # Ctrl-C: nothing to diagnose
                raise
            self._drop_log(domain_log_path)
        return ProbeResult(
            observed=observed, vmm_view=vmm_view, seconds=seconds, backend=Backend.LIBVIRT,
            diagnostics=notes,
        )

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


def run_libvirt(
    cpu_xml: etree._Element | str | bytes,
    queries: Sequence[Query],
    timeout: float = 10.0,
    uri: str = "qemu:///system",
    *,
    name_prefix: str = DOMAIN_PREFIX,
    want_vmm_view: bool = False,
    features: etree._Element | None = None,
) -> ProbeResult:
    """One probe guest through libvirt at `uri` (connection opened and closed
    here; use LibvirtProbe to reuse one)."""
    with LibvirtProbe(uri, name_prefix=name_prefix) as probe:
        return probe.run(cpu_xml, queries, timeout, want_vmm_view=want_vmm_view,
                         features=features)
