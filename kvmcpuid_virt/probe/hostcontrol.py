"""Which CPUID bits KVM_SET_CPUID2 really controls on this host, found by
booting the probe guest on raw KVM with changed tables.

Some hosts here run KVM nested under a hypervisor (or a patched kernel) that
rewrites guest CPUID: whole leaves that ignore KVM_SET_CPUID2, or bits forced
to the host's value. A conformance check must not blame the configuration
for those bits, and must still fail on every bit the host does control.

Method (all on one KvmProbe session, each run a fresh vCPU):
1. baseline: the supported table as is;
2. two batch runs over every register word of the table (except the range and
   vendor leaves 0x0, 0x40000000, 0x80000000, which steer how KVM answers out
   of range queries): all bits cleared, then all bits set (including those KVM
   does not report as supported). A bit follows when the guest reads 0, then 1.
   A run that KVM_SET_CPUID2 rejects (or that breaks the guest) is bisected,
   by words and then by bits, so one bad bit cannot hide the others;
3. only the words that did not follow completely are re-tested bit by bit,
   batched across words (one run per bit position and direction: at most 64);
4. the range/vendor words get a single value test (lower max leaf, another
   vendor string).

The result is cached as JSON per host fingerprint (kernel, CPU model,
microcode, and a digest of KVM_GET_SUPPORTED_CPUID).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final

from kvmcpuid_virt import fsutil
from kvmcpuid_virt.cpuid.table import REGISTERS, CpuidTable, Register
from kvmcpuid_virt.errors import KvmIoctlError, ProbeError
from kvmcpuid_virt.host import cpuinfo_fields, pinned
from kvmcpuid_virt.kvm.system import Kvm
from kvmcpuid_virt.probe.kvm import KvmProbe

__all__ = [
    "FORCED",
    "LEAF_FIXED",
    "REJECTED",
    "VCPU_STATE",
    "HostControl",
    "cache_dir",
    "fingerprint",
    "host_control",
    "probe_host_control",
]

log = logging.getLogger(__name__)

Word = tuple[int, int, Register]  # (leaf, subleaf, register)
_ALL: Final = 0xFFFF_FFFF
CACHE_VERSION: Final = 1

# Reasons a bit does not follow KVM_SET_CPUID2.
FORCED: Final = "forced to host value"
LEAF_FIXED: Final = "ignored, leaf fixed by outer hypervisor"
VCPU_STATE: Final = "follows vCPU state in KVM (CR4, XCR0, APIC), not the table"
REJECTED: Final = "KVM_SET_CPUID2 or the guest fails when it changes"
INVERTED: Final = "reads the opposite of the table"

# Leaves whose answers steer KVM's own CPUID emulation (max leaf, vendor):
# value-tested only.
_STRUCTURAL: Final = frozenset({0x0, 0x40000000, 0x80000000})
# Bits KVM recomputes from vCPU state at every change of it
# (kvm_update_cpuid_runtime and the XSAVE size leaves).
_RUNTIME: Final[dict[tuple[int, int, Register], int]] = {
    (1, 0, "ecx"): 1 << 27,  # OSXSAVE = CR4.OSXSAVE
    (1, 0, "edx"): 1 << 9,  # APIC = APIC_BASE.EN
    (7, 0, "ecx"): 1 << 4,  # OSPKE = CR4.PKE
    (0xD, 0, "ebx"): _ALL,  # XSAVE area size for XCR0
    (0xD, 1, "ebx"): _ALL,  # XSAVES area size for XCR0 | XSS
}


@dataclasses.dataclass
class HostControl:
    """controlled[(leaf, subleaf, reg)]: mask of bits that follow
    KVM_SET_CPUID2 (words not probed are absent: assume they follow).
    reasons[(leaf, subleaf, reg, bit)]: why a probed bit does not."""

    fingerprint: dict[str, str]
    controlled: dict[Word, int]
    reasons: dict[tuple[int, int, Register, int], str]
    seconds: float = 0.0
    runs: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)

    def follows(self, leaf: int, subleaf: int, reg: Register, bit: int) -> bool:
        mask = self.controlled.get((leaf, subleaf, reg))
        return True if mask is None else bool(mask >> bit & 1)

    def uncontrolled(self) -> Iterator[tuple[Word, int]]:
        """(word, mask of bits that do not follow) for every word with any."""
        for word, mask in sorted(self.controlled.items()):
            if mask != _ALL:
                yield word, ~mask & _ALL

    def summary(self) -> list[str]:
        lines = []
        for (leaf, sub, reg), missing in self.uncontrolled():
            why: dict[str, list[int]] = {}
            for bit in range(32):
                if missing >> bit & 1:
                    why.setdefault(self.reasons.get((leaf, sub, reg, bit), "?"), []).append(bit)
            parts = "; ".join(f"{reason}: bits {_ranges(bits)}" for reason, bits in why.items())
            lines.append(f"{leaf:#x}.{sub} {reg}: {parts}")
        return lines

    def to_json(self) -> str:
        words = []
        for (leaf, sub, reg), mask in sorted(self.controlled.items()):
            reasons = {
                str(bit): text
                for (rl, rs, rr, bit), text in self.reasons.items()
                if (rl, rs, rr) == (leaf, sub, reg)
            }
            words.append({"leaf": leaf, "subleaf": sub, "reg": reg, "controlled": mask,
                          "reasons": reasons})
        doc = {"version": CACHE_VERSION, "fingerprint": self.fingerprint,
               "seconds": self.seconds, "runs": self.runs, "notes": self.notes, "words": words}
        return json.dumps(doc, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> HostControl:
        """Parse a cache file; ValueError on anything unexpected."""
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("version") != CACHE_VERSION:
            raise ValueError("not a host-control cache of this version")
        fp = doc["fingerprint"]
        if not isinstance(fp, dict) or not all(isinstance(v, str) for v in fp.values()):
            raise ValueError("bad fingerprint")
        controlled: dict[Word, int] = {}
        reasons: dict[tuple[int, int, Register, int], str] = {}
        for w in doc["words"]:
            leaf, sub, reg, mask = w["leaf"], w["subleaf"], w["reg"], w["controlled"]
            if reg not in REGISTERS or not all(
                isinstance(v, int) and 0 <= v <= _ALL for v in (leaf, sub, mask)
            ):
                raise ValueError(f"bad word {w!r}")
            controlled[(leaf, sub, reg)] = mask
            for bit, text in w["reasons"].items():
                if not (0 <= int(bit) < 32 and isinstance(text, str)):
                    raise ValueError(f"bad reason {bit!r}: {text!r}")
                reasons[(leaf, sub, reg, int(bit))] = text
        return cls(fingerprint=dict(fp), controlled=controlled, reasons=reasons,
                   seconds=float(doc.get("seconds", 0.0)), runs=int(doc.get("runs", 0)),
                   notes=[str(n) for n in doc.get("notes", [])])


def _ranges(bits: list[int]) -> str:
    out: list[str] = []
    for b in bits:
        if out and out[-1].split("-")[-1] == str(b - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{b}"
        else:
            out.append(str(b))
    return ",".join(out)


# --- probing -----------------------------------------------------------------

# One change to a table: in `word`, the bits of `mask` take the bits of `value`.
_Change = tuple[Word, int, int]
# Observed bits per word: (mask of bits observed, their values).
_Seen = dict[Word, tuple[int, int]]


class _Prober:
    def __init__(self, probe: KvmProbe, supported: CpuidTable, timeout: float) -> None:
        self.probe = probe
        self.supported = supported
        self.timeout = timeout
        self.queries = sorted(set(supported.keys()))
        self.runs = 0
        self.failures: dict[tuple[Word, int], str] = {}
        self.last_vmm: CpuidTable | None = None

    def table(self, changes: Iterable[_Change]) -> CpuidTable:
        by_key: dict[tuple[int, int], dict[str, int]] = {}
        for (leaf, sub, reg), mask, value in changes:
            regs = by_key.setdefault((leaf, sub), {})
            old = regs.get(reg, self.supported.get(leaf, sub, reg))
            regs[reg] = (old & ~mask | value & mask) & _ALL
        table = self.supported
        for (leaf, sub), regs in by_key.items():
            entry = table.lookup(leaf, sub)
            if entry is None:
                raise ValueError(f"no entry for leaf {leaf:#x}.{sub}")
            table = table.replace_entry(entry.replace(**regs))
        return table

    def observe(self, changes: list[_Change]) -> CpuidTable | str:
        """The guest's table with `changes` applied, or why that failed."""
        self.runs += 1
        try:
            result = self.probe.run(self.table(changes), self.queries, self.timeout)
        except (KvmIoctlError, ProbeError) as exc:
            return str(exc)
        self.last_vmm = result.vmm_view
        return result.observed

    def trial(self, changes: list[_Change]) -> _Seen:
        """Observed bits for every changed bit; a failing run is split (by
        words, then by bits) and single failing bits are recorded."""
        if not changes:
            return {}
        got = self.observe(changes)
        if isinstance(got, CpuidTable):
            seen: _Seen = {}
            for word, mask, _ in changes:
                m, v = seen.get(word, (0, 0))
                seen[word] = (m | mask, v | got.get(*word) & mask)
            return seen
        if len(changes) > 1:
            half = len(changes) // 2
            return _merge(self.trial(changes[:half]), self.trial(changes[half:]))
        word, mask, value = changes[0]
        bits = [b for b in range(32) if mask >> b & 1]
        if len(bits) == 1:
            self.failures[(word, bits[0])] = got
            return {}
        lo = sum(1 << b for b in bits[: len(bits) // 2])
        return _merge(self.trial([(word, lo, value)]), self.trial([(word, mask & ~lo, value)]))


def _merge(a: _Seen, b: _Seen) -> _Seen:
    out = dict(a)
    for word, (m, v) in b.items():
        om, ov = out.get(word, (0, 0))
        out[word] = (om | m, ov & ~m | v)
    return out


def probe_host_control(probe: KvmProbe | None = None, *, supported: CpuidTable | None = None,
                       timeout: float = 5.0) -> HostControl:
    """Find out, on raw KVM, which bits of the supported table's words follow
    KVM_SET_CPUID2. Uses `probe` (or a private session)."""
    start = time.perf_counter()
    if probe is None:
        with KvmProbe() as own:
            return probe_host_control(own, supported=supported, timeout=timeout)
    if supported is None:
        with Kvm() as kvm:
            supported = kvm.supported_cpuid()
    # Per-CPU fields (APIC IDs) forced by an outer hypervisor would otherwise
    # change between runs and look like bits that follow nothing.
    with pinned():
        p = _Prober(probe, supported, timeout)
        result = _probe(p, supported)
    result.seconds = time.perf_counter() - start
    result.runs = p.runs
    return result


def _probe(p: _Prober, supported: CpuidTable) -> HostControl:
    words: list[Word] = sorted(
        {(e.function, e.index, reg) for e in supported for reg in REGISTERS
         if e.function not in _STRUCTURAL}
    )
    baseline = p.observe([])
    if not isinstance(baseline, CpuidTable):
        raise ProbeError(f"the guest fails with the unmodified supported table: {baseline}")
    baseline_vmm = p.last_vmm
    cleared = p.trial([(w, _ALL, 0) for w in words])
    setall = p.trial([(w, _ALL, _ALL) for w in words])

    # Bits that did not follow (or were not observed) in the batch runs:
    # re-test one bit position at a time, across all such words at once.
    suspect: dict[Word, int] = {}
    for w in words:
        cm, cv = cleared.get(w, (0, 0))
        sm, sv = setall.get(w, (0, 0))
        follows = cm & sm & ~cv & sv
        if follows != _ALL:
            suspect[w] = ~follows & _ALL
    for bit in range(32):
        group = [w for w, m in suspect.items() if m >> bit & 1]
        if group:
            cleared = _merge(cleared, p.trial([(w, 1 << bit, 0) for w in group]))
            setall = _merge(setall, p.trial([(w, 1 << bit, 1 << bit) for w in group]))

    controlled: dict[Word, int] = {}
    forced: dict[tuple[Word, int], int] = {}
    inverted: set[tuple[Word, int]] = set()
    for w in words:
        cm, cv = cleared.get(w, (0, 0))
        sm, sv = setall.get(w, (0, 0))
        controlled[w] = cm & sm & ~cv & sv & _ALL
        for bit in range(32):
            if not (cm & sm) >> bit & 1 or controlled[w] >> bit & 1:
                continue
            c, s = cv >> bit & 1, sv >> bit & 1
            if c == s:
                forced[(w, bit)] = c
            else:
                inverted.add((w, bit))

    reasons: dict[tuple[int, int, Register, int], str] = {}
    fixed_leaves = {
        (leaf, sub)
        for leaf, sub, _ in words
        if not any(controlled.get((leaf, sub, r), 0) for r in REGISTERS)
    }
    for (w, bit), value in forced.items():
        leaf, sub, reg = w
        if _RUNTIME.get(w, 0) >> bit & 1:
            text = VCPU_STATE
        elif (leaf, sub) in fixed_leaves:
            text = LEAF_FIXED
        else:
            unsupported = not supported.get(leaf, sub, reg) >> bit & 1
            text = f"{FORCED} ({value}{'; KVM reports it unsupported' if unsupported else ''})"
        reasons[(leaf, sub, reg, bit)] = text
    for (leaf, sub, reg), bit in inverted:
        reasons[(leaf, sub, reg, bit)] = INVERTED
    for ((leaf, sub, reg), bit), why in p.failures.items():
        reasons.setdefault((leaf, sub, reg, bit), f"{REJECTED}: {why}")

    _structural(p, supported, controlled, reasons)
    notes = _notes(baseline, baseline_vmm, controlled, fixed_leaves)
    return HostControl(fingerprint=fingerprint(supported), controlled=controlled,
                       reasons=reasons, notes=notes)


def _structural(p: _Prober, supported: CpuidTable, controlled: dict[Word, int],
                reasons: dict[tuple[int, int, Register, int], str]) -> None:
    """One run with other values in the range/vendor leaves."""
    changes: list[_Change] = []
    for leaf in sorted(_STRUCTURAL):
        entry = supported.lookup(leaf)
        if entry is None:
            continue
        # Another max leaf that still covers `leaf` itself.
        other = entry.eax - 1 if entry.eax > leaf else entry.eax + 1
        changes.append(((leaf, 0, "eax"), _ALL, other & _ALL))
        # Another signature of the same length (vendor or hypervisor id).
        signature: tuple[tuple[Register, bytes], ...] = (
            ("ebx", b"kvmc"), ("edx", b"puid"), ("ecx", b"test"))
        for reg, text in signature:
            changes.append(((leaf, 0, reg), _ALL, int.from_bytes(text, "little")))
    if not changes:
        return
    got = p.observe(changes)
    for (leaf, sub, reg), _, value in changes:
        w: Word = (leaf, sub, reg)
        if isinstance(got, CpuidTable) and got.get(leaf, sub, reg) == value:
            controlled[w] = _ALL
            continue
        controlled[w] = 0
        why = got if isinstance(got, str) else "the guest reads another value"
        for bit in range(32):
            reasons[(leaf, sub, reg, bit)] = f"value test failed: {why}"


def _notes(baseline: CpuidTable, vmm: CpuidTable | None, controlled: dict[Word, int],
           fixed: set[tuple[int, int]]) -> list[str]:
    notes = []
    if fixed:
        notes.append("leaves that ignore KVM_SET_CPUID2 entirely: "
                     + ", ".join(f"{leaf:#x}.{sub}" for leaf, sub in sorted(fixed)))
    partial = sorted({(leaf, sub) for (leaf, sub, _), mask in controlled.items()
                      if mask != _ALL and (leaf, sub) not in fixed})
    if partial:
        notes.append("leaves with some bits KVM_SET_CPUID2 does not control: "
                     + ", ".join(f"{leaf:#x}.{sub}" for leaf, sub in partial))
    # Does KVM_GET_CPUID2 show the override, or only the guest?
    if vmm is not None:
        shown = hidden = 0
        for w, mask in controlled.items():
            entry = vmm.lookup(w[0], w[1])
            if mask == _ALL or entry is None:
                continue
            if entry.reg(w[2]) & ~mask == baseline.get(*w) & ~mask:
                shown += 1
            else:
                hidden += 1
        if shown or hidden:
            notes.append(
                f"KVM_GET_CPUID2 shows the guest's values in {shown} of {shown + hidden} "
                "uncontrolled words" + ("" if hidden else " (the override is visible to the VMM)")
            )
    return notes


# --- host fingerprint and cache ------------------------------------------------


def fingerprint(supported: CpuidTable) -> dict[str, str]:
    """What the result depends on: kernel, CPU, microcode, and KVM's table."""
    digest = hashlib.sha256(
        b"".join(
            f"{e.function:x}.{e.index:x}.{int(e.flags)}:{e.eax:x},{e.ebx:x},{e.ecx:x},{e.edx:x};"
            .encode()
            for e in supported.masked([(1, None, "ebx", 0xFF00_0000), (0xB, None, "edx", _ALL),
                                       (0x1F, None, "edx", _ALL),
                                       (0x8000001E, None, "eax", _ALL)])
        )
    ).hexdigest()[:16]
    cpu = cpuinfo_fields("model name", "microcode")
    return {
        "kernel": os.uname().release,
        "cpu_model": cpu["model name"],
        "microcode": cpu["microcode"],
        "supported_cpuid": digest,
    }


def cache_dir() -> Path:
    """fsutil.cache_dir() as a Path (this module's callers and tests take one)."""
    return Path(fsutil.cache_dir())


def _cache_path(fp: dict[str, str], directory: Path) -> Path:
    key = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    return directory / f"hostcontrol-{key}.json"


def host_control(*, directory: Path | None = None, refresh: bool = False,
                 probe: KvmProbe | None = None) -> HostControl:
    """The cached HostControl of this host, probing (and caching) when there
    is none for the current fingerprint or `refresh` is set."""
    with Kvm() as kvm:
        supported = kvm.supported_cpuid()
    fp = fingerprint(supported)
    path = _cache_path(fp, directory or cache_dir())
    if not refresh:
        try:
            cached = HostControl.from_json(path.read_text())
            if cached.fingerprint == fp:
                return cached
        except (FileNotFoundError, NotADirectoryError):
            pass  # no cache yet, or a cache directory that cannot exist
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            log.warning("ignoring unreadable host-control cache %s: %s", path, exc)
    result = probe_host_control(probe, supported=supported)
    # Best effort, but at warning level: without the cache every run probes
    # again (most of a second).
    fsutil.write_cache(str(path), result.to_json(), warn=True)
    return result
