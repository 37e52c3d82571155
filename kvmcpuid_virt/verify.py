"""Boot a configuration on one or more backends and compare what each guest
saw with what was requested: the engine behind `kvmcpuid verify` and the
conformance suite.

A Target holds one configuration in every form a backend takes: the CPUID
table raw KVM sets, the `-cpu` value QEMU gets and the `<cpu>` element
libvirt gets, plus the table the guest should see (`requested`). When the
user hands in QEMU flags or libvirt XML, those are booted as given, not
re-rendered: verify checks the user's configuration, not ours.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Final

from lxml import etree

from kvmcpuid_virt.adapters.libvirt import (
    HOST_PASSTHROUGH,
    base_model,
    kvm_features_element,
    render,
    unexpressible,
)
from kvmcpuid_virt.adapters.libvirt import parse as parse_libvirt_cpu
from kvmcpuid_virt.adapters.qemu import HOST_ONLY_PROPS, cpu_value
from kvmcpuid_virt.analysis.backend import Backend
from kvmcpuid_virt.analysis.compare import GUEST_STATE_MASKS, Comparison, Ignore, Word, compare
from kvmcpuid_virt.analysis.msr_compare import (
    MsrComparison,
    compare_msrs,
    expectations,
    msr_queries,
)
from kvmcpuid_virt.analysis.topology import TOPOLOGY_QUERIES, check_topology, smp_queries
from kvmcpuid_virt.config.build import with_model_identity
from kvmcpuid_virt.config.cpuconfig import CpuConfig
from kvmcpuid_virt.config.topology import Topology, vcpu_tables
from kvmcpuid_virt.cpuid.features import registry
from kvmcpuid_virt.cpuid.msr_features import msr_registry
from kvmcpuid_virt.cpuid.table import REGISTERS, CpuidTable, Register
from kvmcpuid_virt.errors import (
    KvmcpuidError,
    KvmError,
    KvmIoctlError,
    ProbeError,
    ProbeTimeoutError,
    ToolError,
)
from kvmcpuid_virt.fleet import MAX_CONCURRENT, ask_all
from kvmcpuid_virt.host import cpuinfo_fields
from kvmcpuid_virt.probe.image import default_queries
from kvmcpuid_virt.probe.kvm import run_kvm, run_kvm_smp
from kvmcpuid_virt.probe.libvirt import DomainRefusedError, LibvirtProbe
from kvmcpuid_virt.probe.qemu import run_qemu, run_qemu_smp
from kvmcpuid_virt.probe.result import ProbeResult
from kvmcpuid_virt.qmp import run_commands
from kvmcpuid_virt.toolfacts.facts import QEMU_BINARY, ToolFacts
from kvmcpuid_virt.xmlutil import parse_xml

__all__ = [
    "BACKENDS",
    "BackendReport",
    "Target",
    "TopologyReport",
    "could_not_run",
    "requested_table",
    "target_for",
    "verify",
    "verify_libvirt_hosts",
    "verify_topology",
]

# Every backend, in the order verify runs them.
BACKENDS: Final[tuple[Backend, ...]] = tuple(Backend)


def requested_table(config: CpuConfig) -> CpuidTable:
    """The config's expected table plus the bits of features it asked for and
    the host cannot give (config.dropped): the guest should see those too, and
    when it does not, compare() names the layer that lost them."""
    table = config.expected
    reg = registry()
    for name in config.dropped:
        f = reg.lookup(name)
        entry = table.lookup(f.leaf, f.subleaf)
        if entry is None:
            continue
        table = table.replace_entry(entry.replace(**{f.reg: entry.reg(f.reg) | f.mask}))
    return table


@dataclasses.dataclass(frozen=True)
class Target:
    """One configuration, rendered for every backend on demand (a config
    libvirt cannot express must still boot on QEMU and raw KVM)."""

    config: CpuConfig
    requested: CpuidTable
    facts: ToolFacts
    qemu_cpu_given: str | None = None  # the value of -cpu, as the user gave it
    libvirt_cpu_given: str | None = None  # a <cpu> element, as the user gave it
    label: str = ""
    libvirt_features_given: str | None = None  # the domain's <features>, if given

    def qemu_cpu(self) -> str:
        if self.qemu_cpu_given is not None:
            return self.qemu_cpu_given
        return cpu_value(self.config)

    def libvirt_cpu(self) -> str:
        if self.libvirt_cpu_given is not None:
            return self.libvirt_cpu_given
        return render(self.config, self.libvirt_base())

    def libvirt_base(self) -> str:
        """What the <cpu> is based on: HOST_PASSTHROUGH ('host': also mode
        'maximum'), 'auto' (host-model: libvirt picks) or a cpu_map model."""
        if self.libvirt_cpu_given is not None:
            return parse_libvirt_cpu(self.libvirt_cpu_given, "<cpu>")[0]
        return base_model(self.config, self.facts)

    def libvirt_features(self) -> etree._Element | None:
        """The <features> element beside <cpu>: the user's, or ours with the
        KVM paravirtual switches libvirt takes there."""
        if self.libvirt_cpu_given is not None:
            if self.libvirt_features_given is None:
                return None
            return parse_xml(self.libvirt_features_given, "<features>")
        return kvm_features_element(self.config)

    def libvirt_ignores(self) -> list[Ignore]:
        """Bits a libvirt domain cannot state at all (KVM paravirtual
        features with no libvirt name): their value is libvirt's and QEMU's
        default, so the comparison leaves them out and says so."""
        reg = registry()
        out = []
        for u in unexpressible(self.config, self.facts):
            if not u.expressible:
                f = reg.lookup(u.name)
                out.append(Ignore(f.leaf, f.subleaf, f.reg, f.mask, f"{f.name}: {u.where}"))
        return out


def target_for(
    config: CpuConfig, facts: ToolFacts, *, qemu_cpu: str | None = None,
    libvirt_cpu: str | None = None, libvirt_features: str | None = None, label: str = "",
) -> Target:
    """A Target for `config`; QEMU flags and libvirt XML default to the
    adapters' renderings of it. A configuration the user wrote (flags or XML
    given) still requests what the host cannot give (config.dropped); one
    built with --allow-unsupported has dropped it on purpose."""
    given = qemu_cpu is not None or libvirt_cpu is not None
    requested = requested_table(config) if given else config.expected
    return Target(config, requested, facts, qemu_cpu, libvirt_cpu, label, libvirt_features)


def could_not_run(exc: BaseException) -> bool:
    """Whether a backend's error is its machinery failing (no verdict on the
    guest's CPUID: the daemon unreachable or refusing for transient reasons
    past its retries, /dev/kvm unusable, the guest not finishing in time,
    QEMU or its monitor not working) rather than the backend refusing the
    configuration (libvirt rejecting the domain, QEMU exiting over its -cpu
    flags, KVM_SET_CPUID2 rejecting the table, a guest that stopped short:
    answers about the configuration)."""
    if isinstance(exc, DomainRefusedError):
        return False
    if isinstance(exc, KvmIoctlError):
        return exc.request != "KVM_SET_CPUID2"
    if isinstance(exc, ProbeError):
        return isinstance(exc, ProbeTimeoutError)
    return isinstance(exc, ToolError | KvmError)


@dataclasses.dataclass(frozen=True)
class BackendReport:
    backend: Backend
    comparison: Comparison | None  # None when the guest did not run
    seconds: float
    diagnostics: tuple[str, ...] = ()
    error: str | None = None
    # The error is the backend's machinery failing (could_not_run): no
    # verdict, where any other error is the backend refusing the configuration.
    machinery: bool = False
    # The guest's feature-MSR answers against the configuration (msr_compare).
    msrs: MsrComparison | None = None
    # The libvirt URI the guest ran at, when verify asked several (--connect
    # repeated); None otherwise.
    host: str | None = None

    @property
    def ok(self) -> bool:
        return (self.error is None and self.comparison is not None and self.comparison.ok
                and (self.msrs is None or self.msrs.ok))  # fmt: skip

    @property
    def could_not_run(self) -> bool:
        return self.error is not None and self.machinery

    def as_json(self) -> dict[str, object]:
        return {
            "backend": self.backend,
            "ok": self.ok,
            "could_not_run": self.could_not_run,
            "seconds": round(self.seconds, 4),
            "error": self.error,
            "diagnostics": list(self.diagnostics),
            "comparison": None if self.comparison is None else self.comparison.as_json(),
            "msrs": None if self.msrs is None else self.msrs.as_json(),
            **({} if self.host is None else {"host": self.host}),
        }

    def text(self, include_host: bool = False) -> str:
        head = [f"{self.backend}: {d}" for d in self.diagnostics]
        if self.host is not None:
            head.insert(0, f"{self.backend} at {self.host}:")
        if self.error is not None:
            what = "could not run the guest" if self.machinery else "did not run"
            return "\n".join([*head, f"{self.backend}: {what}: {self.error}"])
        assert self.comparison is not None
        msr = [] if self.msrs is None or not (self.msrs.mismatches or any(
            v is not None for v in self.msrs.read.values())) else [self.msrs.summary()]  # fmt: skip
        if include_host and self.msrs is not None:  # -v: every feature MSR the guest read
            msr += _msr_lines(self.msrs)
        return "\n".join([*head, self.comparison.table(include_host), *msr])


def _msr_lines(msrs: MsrComparison) -> list[str]:
    """One line per feature MSR the probe asked: what the guest read, or that
    its CPUID enumerates no such MSR; then what the configuration leaves open."""
    reg = msr_registry()
    out = []
    for index, value in msrs.read.items():
        info = reg.msr(index)
        label = info.label if info is not None else f"MSR {index:X}H"
        out.append(f"  {label}: " + ("the guest's CPUID enumerates no such MSR" if value is None
                                     else f"guest reads {value:#x}"))
    if msrs.not_modelled:
        out.append(f"  no configured value for: {', '.join(msrs.not_modelled)}")
    return out


def _run(
    backend: Backend, target: Target, queries: Sequence[tuple[int, int]], timeout: float,
    qemu: str | None,
) -> ProbeResult:
    """Raw KVM and QEMU, in this thread (libvirt: _LibvirtBeside)."""
    if backend == Backend.KVM:
        _, to_set = expectations(target.config, backend, target.facts.host_msrs)
        return run_kvm(target.requested, queries, timeout, msrs=to_set,
                       msr_queries=msr_queries())  # fmt: skip
    if backend == Backend.QEMU:
        facts = target.facts.qemu
        result: ProbeResult = run_qemu(
            target.qemu_cpu(), queries, timeout=timeout, want_vmm_view=True,
            qemu=qemu or (facts.binary if facts is not None else QEMU_BINARY),
            msr_queries=msr_queries(),
        )
        return result
    raise ValueError(f"unknown backend {backend!r}")


def verify(
    target: Target,
    backends: Iterable[Backend],
    *,
    supported: CpuidTable,
    uncontrolled: Mapping[Word, int] | None = None,
    reasons: Mapping[tuple[int, int, Register, int], str] | None = None,
    timeout: float = 10.0,
    qemu: str | None = None,
    libvirt_uri: str | None = None,
) -> list[BackendReport]:
    """Boot `target` on each backend and compare. A backend that cannot run
    the guest (QEMU refusing the flags, libvirt refusing the XML, or its
    machinery failing: `could_not_run`) yields a report with `error` set,
    never an exception: the other backends still run. Ctrl-C propagates (the
    backends clean up on the way out)."""
    queries = default_queries(target.requested)
    backends = list(backends)
    reports = []
    uri = libvirt_uri or target.facts.libvirt_uri
    with _LibvirtBeside(target, queries, timeout, uri, backends) as beside:
        for backend in backends:
            start = time.monotonic()
            try:
                if backend == Backend.LIBVIRT:
                    result = beside.result()
                else:
                    result = _run(backend, target, queries, timeout, qemu)
            except (KvmcpuidError, ProbeError) as exc:
                reports.append(BackendReport(backend, None, time.monotonic() - start,
                                             error=" ".join(str(exc).split()),
                                             machinery=could_not_run(exc)))
                continue
            reports.append(_report(backend, target, result, supported, uncontrolled, reasons))
    return reports


def verify_libvirt_hosts(
    target: Target,
    uris: Sequence[str],
    *,
    supported: CpuidTable,
    uncontrolled: Mapping[Word, int] | None = None,
    reasons: Mapping[tuple[int, int, Register, int], str] | None = None,
    timeout: float = 10.0,
    skip_unreachable: bool = False,
    prog: str = "kvmcpuid verify",
    limit: int = MAX_CONCURRENT,
) -> list[BackendReport]:
    """The libvirt backend on each daemon of `uris` (each on this machine),
    one report per daemon, in their order (BackendReport.host says which).
    The daemons are connected to through fleet.ask_all: one that cannot be
    reached is a line on stderr, and then a FleetError, or with
    `skip_unreachable` it is left out with a warning. The guests then run
    at most `limit` at a time in a pool of our own, not ask_all's: a guest
    must be cancelled and waited for on Ctrl-C or an error (its domain
    destroyed, its files removed), which ask_all's abandoned daemon threads
    would not do."""
    queries = default_queries(target.requested)
    opened: list[LibvirtProbe] = []
    lock = threading.Lock()

    def connect(uri: str) -> LibvirtProbe:
        probe = LibvirtProbe(uri)
        with lock:
            opened.append(probe)
        return probe

    try:
        probes = ask_all(uris, connect, prog=prog, what="libvirt hosts",
                         skip_unreachable=skip_unreachable)  # fmt: skip
        with ThreadPoolExecutor(max(1, min(limit, len(probes))),
                                thread_name_prefix="kvmcpuid-verify-hosts") as pool:  # fmt: skip
            runs = [(uri, probe, time.monotonic(), pool.submit(
                probe.run, target.libvirt_cpu(), queries, timeout, want_vmm_view=True,
                features=target.libvirt_features(), msr_queries=msr_queries()))
                for uri, probe in probes]  # fmt: skip
            try:
                return [_host_report(uri, start, future, target, supported, uncontrolled,
                                     reasons) for uri, _, start, future in runs]  # fmt: skip
            except BaseException:
                for _, probe, _, future in runs:
                    if not future.done():
                        probe.cancel()
                raise  # the pool's exit waits for every guest to be gone
    finally:
        with lock:
            for probe in opened:
                probe.close()


def _host_report(uri: str, start: float, future: Future[ProbeResult], target: Target,
                 supported: CpuidTable, uncontrolled: Mapping[Word, int] | None,
                 reasons: Mapping[tuple[int, int, Register, int], str] | None,
                 ) -> BackendReport:  # fmt: skip
    """One daemon's report: its guest compared, or its error (as verify())."""
    try:
        result = future.result()
    except (KvmcpuidError, ProbeError) as exc:
        return BackendReport(Backend.LIBVIRT, None, time.monotonic() - start,
                             error=" ".join(str(exc).split()), machinery=could_not_run(exc),
                             host=uri)  # fmt: skip
    report = _report(Backend.LIBVIRT, target, result, supported, uncontrolled, reasons)
    return dataclasses.replace(report, host=uri)


class _LibvirtBeside:
    """The libvirt guest, when asked for, run in a thread while the other
    backends run here: its ~0.6 s is mostly waiting on libvirtd (domain start
    and stop), so `verify` with every backend takes about as long as libvirt
    alone. On Ctrl-C (or any error here) the run is cancelled and its domain
    destroyed before the exception goes on."""

    def __init__(self, target: Target, queries: Sequence[tuple[int, int]], timeout: float,
                 uri: str, backends: Sequence[Backend]) -> None:  # fmt: skip
        self._args = (target, queries, timeout, uri)
        self._wanted = Backend.LIBVIRT in backends
        self._probe: LibvirtProbe | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._future: Future[ProbeResult] | None = None
        self._error: KvmcpuidError | None = None

    def __enter__(self) -> _LibvirtBeside:
        if not self._wanted:
            return self
        target, queries, timeout, uri = self._args
        try:
            self._probe = LibvirtProbe(uri)
        except KvmcpuidError as exc:
            self._error = exc  # reported in its turn, like any backend error
            return self
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvmcpuid-verify")
        self._future = self._pool.submit(
            self._probe.run, target.libvirt_cpu(), queries, timeout, want_vmm_view=True,
            features=target.libvirt_features(), msr_queries=msr_queries(),
        )
        return self

    def result(self) -> ProbeResult:
        if self._error is not None:
            raise self._error
        assert self._future is not None
        return self._future.result()

    def __exit__(self, *exc: object) -> None:
        try:
            if self._probe is not None and self._future is not None and not self._future.done():
                self._probe.cancel()
            if self._pool is not None:
                self._pool.shutdown(wait=True)  # its domain is gone once it returns
        finally:
            if self._probe is not None:
                self._probe.close()


# Fields CpuConfig.expected does not model for a backend (gaps of config/,
# seen on this host's QEMU 7.2): their mismatches are reported, never failing.
_QEMU_OWN = "QEMU's own model sets it, CpuConfig.expected has KVM's value"
# The cache leaves: QEMU's own cache model unless host-cache-info=on (libvirt:
# <cache mode='passthrough'/>) passes the host's on.
_CACHE_FIELDS: Final = (
    "cache/TLB descriptors", "cache type and level", "cache line size, partitions, ways",
    "cache sets", "cache flags", "L1 cache and TLB", "L2/L3 cache and TLB",
    "cache type and level (AMD)", "cache line size, partitions, ways (AMD)",
    "cache sets (AMD)", "cache flags (AMD)",
)
_UNMODELLED_QEMU: Final = {
    **{name: f"{_QEMU_OWN} (host-cache-info=off)" for name in _CACHE_FIELDS},
    **{name: _QEMU_OWN for name in (
        "MONITOR/MWAIT line sizes and extensions", "brand ID and package type (AMD)",
        "performance optimization identifiers (AMD)",
    )},
}
# Unnamed bits KVM offers that QEMU 7.2 does not pass on (CPUID.80000021H).
_QEMU_DROPS: Final = (
    Ignore(0x8000_0021, 0, "eax", 0x0000_0204, f"0x80000021 eax bits 2, 9: {_QEMU_OWN}"),
    Ignore(0x8000_0021, 0, "ecx", 0x0000_0006, f"0x80000021 ecx bits 1-2: {_QEMU_OWN}"),
)


def _brand(table: CpuidTable, text: str) -> CpuidTable:
    """`table` with the brand string (0x80000002-4) set to `text`."""
    raw = text.encode("latin-1", "replace")[:47].ljust(48, b"\0")
    for i, leaf in enumerate((0x8000_0002, 0x8000_0003, 0x8000_0004)):
        entry = table.lookup(leaf, 0)
        if entry is None:
            return table
        chunk = raw[16 * i:16 * i + 16]
        regs = [int.from_bytes(chunk[4 * j:4 * j + 4], "little") for j in range(4)]
        table = table.replace_entry(entry.replace(**dict(zip(REGISTERS, regs, strict=True))))
    return table


def _expectations(backend: Backend, target: Target) -> tuple[CpuidTable, list[Ignore],
                                                               dict[str, str]]:  # fmt: skip
    """What this backend's guest should see, the extra ignore rules and the
    fields the configuration does not model here. QEMU's `-cpu host` and
    libvirt's host-passthrough (which is `-cpu host`) pass the host CPU's
    brand string on (/proc/cpuinfo "model name"); a named model gets QEMU's
    definition of the model libvirt names, which for a <cpu> based on
    another cpu_map model than the configuration's is that model's."""
    if backend == Backend.KVM:
        return target.requested, [], {}
    if backend == Backend.LIBVIRT:
        base = target.libvirt_base()
        ignores = [*target.libvirt_ignores(), *_QEMU_DROPS]
        cache = parse_xml(target.libvirt_cpu(), "<cpu>").find("cache")
        host_caches = cache is not None and cache.get("mode") == "passthrough"
    else:
        parts = target.qemu_cpu().removeprefix("-cpu ").strip().split(",")
        base, host_caches = parts[0], "host-cache-info=on" in parts
        ignores = list(_QEMU_DROPS)
    requested, unmodelled = target.requested, dict(_UNMODELLED_QEMU)
    if host_caches:  # QEMU passes the host's cache leaves on, as KVM reports them
        for name in _CACHE_FIELDS:
            del unmodelled[name]
    if base == HOST_PASSTHROUGH:
        return _brand(requested, cpuinfo_fields("model name")["model name"]), ignores, unmodelled
    # A named model: QEMU sets the linear and guest physical address bits
    # itself (48 or 57 with lm, 32 without; 0).
    for name in ("linear address bits", "guest physical address bits"):
        unmodelled[name] = "QEMU sets it for a named model"
    qemu = target.facts.qemu
    if base != target.config.model:
        if qemu is not None and base in qemu.identities:
            reg = registry()
            requested = with_model_identity(requested, qemu.identity(base),
                                            [reg.lookup(n) for n in target.config.enabled()])
        else:  # host-model: libvirt picks the model when it starts the guest
            for name in _IDENTITY_FIELDS:
                unmodelled[name] = f"the <cpu> leaves the model to libvirt ({base})"
    return _named_model_fields(requested, base, target, unmodelled), ignores, unmodelled


def _named_model_fields(requested: CpuidTable, base: str, target: Target,
                        unmodelled: dict[str, str]) -> CpuidTable:  # fmt: skip
    """`requested` with what QEMU sets itself for a named model: the brand
    string (the model's model-id, from QEMU's own expansion of the -cpu
    value, asked live), the physical address bits (its phys-bits, else 40:
    TCG_PHYS_ADDR_BITS, target/i386/cpu.h) and the extended signature (QEMU
    answers 0x80000001 EAX with leaf 1's signature). Where QEMU cannot be
    asked, those stay in `unmodelled`, with why."""
    # The -cpu switches on `base` as libvirt gives them: a named model has no
    # host-only property (host-cache-info: QEMU would refuse the expansion).
    value = ",".join([base, *(p for p in target.qemu_cpu().removeprefix("-cpu ").split(",")[1:]
                              if p.split("=", 1)[0] not in HOST_ONLY_PROPS)])
    facts = target.facts.qemu
    try:
        model_id, phys = _qemu_named_fields(facts.binary if facts else QEMU_BINARY, value)
    except KvmcpuidError as exc:
        why = f"QEMU's expansion of the model could not be read: {' '.join(str(exc).split())}"
        for name in ("brand string", "extended signature (AMD)", "physical address bits"):
            unmodelled[name] = why
        return requested
    requested = _brand(requested, model_id)
    signature = requested.get(1, 0, "eax") & 0x0FFF_3FFF
    for leaf, mask, v in ((0x8000_0001, _U32, signature), (0x8000_0008, 0xFF, phys)):
        entry = requested.lookup(leaf, 0)
        if entry is not None:  # both in EAX
            requested = requested.replace_entry(entry.replace(eax=entry.eax & ~mask | v))
    return requested


_U32: Final = 0xFFFF_FFFF
_QEMU_DEFAULT_PHYS_BITS: Final = 40  # TCG_PHYS_ADDR_BITS, QEMU target/i386/cpu.h


@functools.lru_cache(maxsize=16)
def _qemu_named_fields(binary: str, cpu_value: str) -> tuple[str, int]:
    """(model-id, physical address bits) of QEMU's full expansion of a named
    model's -cpu value (`MODEL,feat=on|off,...,enforce`)."""
    model, *rest = cpu_value.split(",")
    props = {k: v == "on" for k, _, v in (p.partition("=") for p in rest)
             if k not in ("enforce", "check")}  # fmt: skip
    [reply] = run_commands(binary, [{"execute": "query-cpu-model-expansion", "arguments": {
        "type": "full", "model": {"name": model, "props": props}}}])
    got = reply["model"]["props"]
    return str(got.get("model-id", "")), int(got.get("phys-bits") or _QEMU_DEFAULT_PHYS_BITS)


# What with_model_identity() sets: a model's identity and max leaves.
_IDENTITY_FIELDS: Final = (
    "stepping", "model", "family", "processor type", "extended model", "extended family",
    "max basic leaf", "max extended leaf", "max leaf 7 subleaf",
)


def _report(
    backend: Backend, target: Target, result: ProbeResult, supported: CpuidTable,
    uncontrolled: Mapping[Word, int] | None,
    reasons: Mapping[tuple[int, int, Register, int], str] | None,
) -> BackendReport:
    requested, ignores, unmodelled = _expectations(backend, target)
    extra = target.libvirt_ignores() if backend == Backend.LIBVIRT else []
    cmp = compare(
        requested, result.observed, backend=backend, supported=supported,
        vmm=result.vmm_view, uncontrolled=uncontrolled, uncontrolled_reasons=reasons,
        ignore=(*GUEST_STATE_MASKS, *ignores), unmodelled=unmodelled,
    )
    notes = [
        "left out, libvirt XML cannot set them: "
        + ", ".join(rule.reason.split(":", 1)[0] for rule in extra)
    ] if extra else []
    expected_msrs, _ = expectations(target.config, backend, target.facts.host_msrs)
    host_msrs = target.facts.host_msrs
    msrs = compare_msrs(expected_msrs, result.msrs, backend, vmm=result.msr_vmm,
                        offered=None if host_msrs is None else host_msrs.as_dict())  # fmt: skip
    return BackendReport(backend, cmp, result.seconds, (*result.diagnostics, *notes), msrs=msrs)


# --- topology ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TopologyReport:
    """One backend's multi-vCPU guest against a topology (analysis.topology)."""

    backend: Backend
    topology: Topology
    problems: tuple[str, ...] = ()
    vcpus: int = 0  # that reported
    seconds: float = 0.0
    error: str | None = None
    machinery: bool = False  # the error is the machinery's (could_not_run)
    skipped: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and not self.problems

    @property
    def could_not_run(self) -> bool:
        return self.error is not None and self.machinery

    def as_json(self) -> dict[str, object]:
        return {"backend": self.backend, "topology": self.topology.spec(), "ok": self.ok,
                "could_not_run": self.could_not_run, "vcpus_reported": self.vcpus,
                "vcpus": self.topology.vcpus, "problems": list(self.problems),
                "error": self.error, "skipped": self.skipped,
                "seconds": round(self.seconds, 4)}  # fmt: skip

    def text(self) -> str:
        head = f"{self.backend}: topology {self.topology.spec()}"
        if self.skipped is not None:
            return f"{head}: {self.skipped}"
        if self.error is not None:
            what = "could not run the guest" if self.machinery else "did not run"
            return f"{head}: {what}: {self.error}"
        if not self.problems:
            return (f"{head}: {self.vcpus} vCPUs, each with its own APIC IDs, consistent "
                    "with the topology")  # fmt: skip
        return "\n".join([f"{head}: {len(self.problems)} problem(s)",
                          *(f"  {p}" for p in self.problems)])


def verify_topology(
    target: Target, topology: Topology, backends: Iterable[Backend], *, timeout: float = 10.0,
    qemu: str | None = None, libvirt_uri: str | None = None,
) -> list[TopologyReport]:
    """Boot the multi-vCPU guest with `topology` on each VMM backend and
    check what each vCPU reports (analysis.topology.check_topology). A
    backend that cannot run it yields a report with `error`, never an
    exception (Ctrl-C propagates; the guests are cleaned up on the way)."""
    queries = smp_queries(default_queries(target.requested))
    out = []
    for backend in backends:
        start = time.monotonic()
        configured: list[CpuidTable] = []
        try:
            if backend == Backend.KVM:
                # This tool is the VMM: each vCPU's table laid out for the topology.
                configured = vcpu_tables(target.requested, topology)
                result = run_kvm_smp(configured, queries, timeout)
            elif backend == Backend.QEMU:
                facts = target.facts.qemu
                binary = qemu or (facts.binary if facts is not None else QEMU_BINARY)
                result = run_qemu_smp(target.qemu_cpu(), queries, topology.qemu_smp(),
                                      topology.vcpus, timeout, binary)
            else:
                with LibvirtProbe(libvirt_uri or target.facts.libvirt_uri) as probe:
                    result = probe.run_smp(target.libvirt_cpu(), queries, topology.vcpus,
                                           topology.libvirt_topology(), timeout,
                                           features=target.libvirt_features())
        except (KvmcpuidError, ProbeError) as exc:
            out.append(TopologyReport(backend, topology, seconds=time.monotonic() - start,
                                      error=" ".join(str(exc).split()),
                                      machinery=could_not_run(exc)))
            continue
        problems = check_topology(topology, result.tables) + _as_set(configured, result.tables)
        out.append(TopologyReport(backend, topology, tuple(problems), len(result.tables),
                                  result.seconds))
    return out


def _as_set(configured: Sequence[CpuidTable], seen: Sequence[CpuidTable]) -> list[str]:
    """Raw KVM: each vCPU's 0xB and 0x8000001E leaves as its table set them
    (matched by the initial APIC ID its table gave it)."""
    out = []
    by_apic = {t.get(1, 0, "ebx") >> 24: t for t in configured}
    for guest in seen:
        want = by_apic.get(guest.get(1, 0, "ebx") >> 24)
        if want is None:
            continue  # check_topology names APIC IDs that are not the topology's
        for leaf, sub in TOPOLOGY_QUERIES:
            if want.lookup(leaf, sub) is None or guest.lookup(leaf, sub) is None:
                continue
            for reg in REGISTERS:
                a, b = want.get(leaf, sub, reg), guest.get(leaf, sub, reg)
                if leaf in (0xB, 0x8000_001E) and a != b:
                    out.append(f"APIC ID {guest.get(1, 0, 'ebx') >> 24}: {leaf:#x}.{sub} {reg}: "
                               f"configured {a:#010x}, guest sees {b:#010x}")
    return out
