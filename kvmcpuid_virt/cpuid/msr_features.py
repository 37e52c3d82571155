"""The registry of named feature-MSR bits, and plain data about feature MSRs.

QEMU and libvirt name some CPU features by a bit of an MSR rather than of
CPUID, in the same `-cpu` / `<cpu>` namespace: IA32_ARCH_CAPABILITIES
(rdctl-no, mds-no, ...), IA32_CORE_CAPABILITIES (split-lock-detect),
IA32_PERF_CAPABILITIES (full-width-write) and, on Intel hosts with nested
VMX, the VMX capability MSRs (vmx-*). KVM reports their values on /dev/kvm
(KVM_GET_MSR_FEATURE_INDEX_LIST, KVM_GET_MSRS: kvm/system.py).

The data is shipped in cpuid/data/msr_features.json (scripts/gen_msr_features.py
made it from QEMU 7.2's own statement of each name's MSR and bit and from
libvirt 9.0's cpu_map); it is read once, on first use. Positions are bits of
the 64-bit MSR value. A VMX control capability MSR (IA32_VMX_*_CTLS) has the
"allowed-0" settings in bits 31:0 and the "allowed-1" settings in 63:32
(Intel SDM Vol. 3, Appendix A.3): control n is bit 32+n here, and it counts
as present, as QEMU reads it, when it may be 1 and need not be.

Also here, as plain data for the layers above: FeatureMsrs (what KVM
reported, or that nothing could be), MsrTrial and MsrDelivery (what a vCPU
accepted of it, kvm/msrs.py), and the reasons a vCPU refuses a value.
"""

from __future__ import annotations

import enum
import functools
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from kvmcpuid_virt.cpuid.features import NAME_RE, FeatureKind, Registry
from kvmcpuid_virt.cpuid.msr_values import FeatureMsrs
from kvmcpuid_virt.cpuid.table import CpuidTable
from kvmcpuid_virt.errors import UnknownFeatureError

__all__ = [
    "FeatureMsrs",
    "MsrDelivery",
    "MsrFeature",
    "MsrInfo",
    "MsrLayout",
    "MsrRegistry",
    "MsrTrial",
    "explain_set_failure",
    "load_msr_registry",
    "msr_registry",
    "qemu_written",
    "refusal_reason",
]

_U32: Final = 0xFFFF_FFFF
_U64: Final = 0xFFFF_FFFF_FFFF_FFFF
_LOW: Final = 0xFFFF_FFFF
_HIGH: Final = _U64 & ~_LOW


class MsrLayout(enum.StrEnum):
    """How the value of an MSR holds its named bits."""

    FLAGS = "flags"  # each named bit is a flag
    CONTROLS = "controls"  # VMX controls: allowed-0 in 31:0, allowed-1 in 63:32
    VALUE = "value"  # a number (microcode revision, ratios): no named bits


@dataclass(frozen=True, slots=True)
class MsrInfo:
    """One MSR KVM may list as a feature MSR."""

    index: int
    name: str  # the Intel SDM / AMD APM name, e.g. IA32_ARCH_CAPABILITIES
    layout: MsrLayout
    # The CPUID feature (registry name) whose bit says the MSR exists, e.g.
    # arch-capabilities (CPUID.07H.0:EDX[29]); None for an MSR that always does.
    enumerated_by: str | None
    vendor: str | None  # "GenuineIntel" / "AuthenticAMD" when only one has it
    # The vCPU trial (kvm/msrs.py) also tries each set bit alone: every bit is
    # an independent flag (not so for IA32_PERF_CAPABILITIES' format fields).
    per_bit_trial: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.index <= _U32:
            raise ValueError(f"MSR index {self.index:#x} is not 32-bit")
        if not re.fullmatch(r"[A-Z][A-Z0-9_]*", self.name):
            raise ValueError(f"MSR name {self.name!r} is not an SDM-style name")
        if self.enumerated_by is not None and not NAME_RE.match(self.enumerated_by):
            raise ValueError(f"bad feature name {self.enumerated_by!r}")

    @property
    def label(self) -> str:
        """e.g. 'MSR 10AH IA32_ARCH_CAPABILITIES'."""
        return f"MSR {self.index:X}H {self.name}"


@dataclass(frozen=True, slots=True)
class MsrFeature:
    """One named feature bit of an MSR (with, rarely, more bits the same
    QEMU name sets: QEMU 7.2's vmx-invept-single-context sets bits 25 and 41
    of IA32_VMX_EPT_VPID_CAP)."""

    msr: int
    bit: int  # 0..63 in the MSR's value (controls: 32 + the control's number)
    extra_bits: tuple[int, ...]
    qemu: str | None  # QEMU's -cpu name (None if QEMU cannot name it)
    qemu_aliases: tuple[str, ...]
    libvirt: str | None  # cpu_map's name (None if libvirt has none)
    kind: FeatureKind  # PLAIN (QEMU can set it) or UNSETTABLE
    layout: MsrLayout
    # The SDM's name, only for bits neither QEMU nor libvirt names (e.g.
    # IA32_ARCH_CAPABILITIES[26] gds-no), so that every bit KVM may report
    # has a name.
    sdm: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.msr <= _U32:
            raise ValueError(f"MSR index {self.msr:#x} is not 32-bit")
        for b in (self.bit, *self.extra_bits):
            if not 0 <= b < 64:
                raise ValueError(f"bit {b} of MSR {self.msr:#x} is outside 0..63")
            if self.layout is MsrLayout.CONTROLS and b < 32:
                raise ValueError(f"control bit {b} of MSR {self.msr:#x} is not an allowed-1 bit")
        if self.layout is MsrLayout.VALUE:
            raise ValueError(f"MSR {self.msr:#x} holds a value, not named bits")
        for n in (self.qemu, *self.qemu_aliases, self.libvirt, self.sdm):
            if n is not None and not NAME_RE.match(n):
                raise ValueError(f"feature name {n!r} has characters outside [a-z0-9_.-]")
        if self.qemu is None and self.libvirt is None and self.sdm is None:
            raise ValueError(f"feature at {self.position} has no name")
        if self.kind not in (FeatureKind.PLAIN, FeatureKind.UNSETTABLE):
            raise ValueError(f"an MSR feature is plain or unsettable, not {self.kind}")
        if (self.kind is FeatureKind.PLAIN) != (self.qemu is not None):
            raise ValueError(f"{self.position}: plain exactly when QEMU names it")

    @property
    def name(self) -> str:
        """The canonical name: QEMU's, else libvirt's, else the SDM's."""
        name = self.qemu or self.libvirt or self.sdm
        assert name is not None  # guaranteed by __post_init__
        return name

    @property
    def names(self) -> tuple[str, ...]:
        out: list[str] = []
        for n in (self.qemu, *self.qemu_aliases, self.libvirt, self.sdm):
            if n is not None and n not in out:
                out.append(n)
        return tuple(out)

    @property
    def bits(self) -> tuple[int, ...]:
        return (self.bit, *self.extra_bits)

    @property
    def mask(self) -> int:
        m = 0
        for b in self.bits:
            m |= 1 << b
        return m

    @property
    def control(self) -> int | None:
        """The VMX control's number (bit - 32) in a controls MSR, else None."""
        return self.bit - 32 if self.layout is MsrLayout.CONTROLS else None

    @property
    def position(self) -> str:
        """e.g. 'MSR 10AH[5]'; for a VMX control 'MSR 48BH[33] (control 1)'."""
        text = f"MSR {self.msr:X}H[{self.bit}]"
        if self.control is not None:
            text += f" (control {self.control})"
        return text

    def present(self, value: int) -> bool:
        """Whether the feature is on in this MSR value (every bit set; a VMX
        control when it may be 1 and need not be, as QEMU reads it)."""
        if value & self.mask != self.mask:
            return False
        if self.layout is MsrLayout.CONTROLS:
            return not value & (self.mask >> 32)
        return True


class MsrRegistry:
    """Every known feature-MSR bit, with lookups by any spelling and by
    position, and what is known about each MSR."""

    def __init__(self, msrs: tuple[MsrInfo, ...], features: tuple[MsrFeature, ...]) -> None:
        self.msrs: dict[int, MsrInfo] = {}
        for m in msrs:
            if m.index in self.msrs:
                raise ValueError(f"MSR {m.index:#x} listed twice")
            self.msrs[m.index] = m
        self.features = features
        self._at: dict[tuple[int, int], MsrFeature] = {}
        self._in_msr: dict[int, list[MsrFeature]] = {}
        self._by_qemu: dict[str, MsrFeature] = {}
        self._by_libvirt: dict[str, MsrFeature] = {}
        self._by_name: dict[str, MsrFeature] = {}
        for f in features:
            info = self.msrs.get(f.msr)
            if info is None:
                raise ValueError(f"{f.position}: MSR {f.msr:#x} is not described")
            if info.layout is not f.layout:
                raise ValueError(f"{f.position}: layout {f.layout} but the MSR's is {info.layout}")
            for b in f.bits:
                old = self._at.setdefault((f.msr, b), f)
                if old is not f:
                    raise ValueError(f"two features at MSR {f.msr:#x} bit {b}")
            self._in_msr.setdefault(f.msr, []).append(f)
            for q in (f.qemu, *f.qemu_aliases):
                if q is not None:
                    _claim(self._by_qemu, q, f, "QEMU")
            if f.libvirt is not None:
                _claim(self._by_libvirt, f.libvirt, f, "libvirt")
            for n in f.names:
                _claim(self._by_name, n, f, "any")
        for word in self._in_msr.values():
            word.sort(key=lambda f: f.bit)

    def __len__(self) -> int:
        return len(self.features)

    def __iter__(self) -> Iterator[MsrFeature]:
        return iter(self.features)

    def lookup(self, name: str) -> MsrFeature:
        """The feature for any spelling (QEMU's, libvirt's, the SDM's), any
        case; UnknownFeatureError with close matches for a name not known."""
        found = self._by_name.get(name) or self._by_name.get(name.lower())
        if found is None:
            import difflib  # only for a name not known

            close = difflib.get_close_matches(name.lower(), self._by_name, n=10, cutoff=0.75)
            suggestions = list(dict.fromkeys(self._by_name[c].name for c in close))[:3]
            raise UnknownFeatureError(name, suggestions)
        return found

    def get(self, name: str) -> MsrFeature | None:
        """lookup() without the error: None for a name not known."""
        return self._by_name.get(name) or self._by_name.get(name.lower())

    def by_qemu(self, name: str) -> MsrFeature | None:
        return self._by_qemu.get(name)

    def by_libvirt(self, name: str) -> MsrFeature | None:
        return self._by_libvirt.get(name)

    def at(self, msr: int, bit: int) -> MsrFeature | None:
        """The feature that bit `bit` (0..63) of MSR `msr` belongs to."""
        return self._at.get((msr, bit))

    def in_msr(self, msr: int) -> list[MsrFeature]:
        """The features of one MSR, by bit."""
        return list(self._in_msr.get(msr, ()))

    def msr(self, index: int) -> MsrInfo | None:
        return self.msrs.get(index)

    def present(self, values: Mapping[int, int]) -> list[MsrFeature]:
        """The features on in `values` (MSR index -> value), in registry order."""
        return [f for f in self.features if f.msr in values and f.present(values[f.msr])]

    def unnamed(self, index: int, value: int) -> int:
        """The bits of `value` no feature names: for a controls MSR, the
        allowed-1 half only; for a value MSR, nothing (it is a number)."""
        info = self.msrs.get(index)
        if info is not None and info.layout is MsrLayout.VALUE:
            return 0
        named = 0
        for f in self._in_msr.get(index, ()):
            named |= f.mask
        if info is not None and info.layout is MsrLayout.CONTROLS:
            value &= _HIGH
        return value & ~named


def _claim(index: dict[str, MsrFeature], name: str, f: MsrFeature, what: str) -> None:
    # One spelling must never mean two different features.
    old = index.setdefault(name, f)
    if old is not f:
        raise ValueError(f"{what} name {name!r} names {old.position} and {f.position}")


def _int(raw: object, what: str) -> int:
    if isinstance(raw, str):
        return int(raw, 16)
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    raise ValueError(f"{what} {raw!r} is not a number")


def load_msr_registry(text: str) -> MsrRegistry:
    """An MsrRegistry from msr_features.json text (validated; ValueError if bad)."""
    doc = json.loads(text)
    msrs = tuple(
        MsrInfo(
            index=_int(m["index"], "MSR index"),
            name=m["name"],
            layout=MsrLayout(m["layout"]),
            enumerated_by=m.get("enumerated_by"),
            vendor=m.get("vendor"),
            per_bit_trial=bool(m.get("per_bit_trial", False)),
        )
        for m in doc["msrs"]
    )
    layouts = {m.index: m.layout for m in msrs}

    def feature(raw: dict[str, Any]) -> MsrFeature:
        index = _int(raw["msr"], "MSR index")
        if index not in layouts:
            raise ValueError(f"feature of MSR {index:#x}, which is not described")
        return MsrFeature(
            msr=index,
            bit=int(raw["bit"]),
            extra_bits=tuple(int(b) for b in raw.get("extra_bits", ())),
            qemu=raw["qemu"],
            qemu_aliases=tuple(raw.get("qemu_aliases", ())),
            libvirt=raw["libvirt"],
            kind=FeatureKind(raw["kind"]),
            layout=layouts[index],
            sdm=raw.get("sdm"),
        )

    return MsrRegistry(msrs, tuple(feature(r) for r in doc["features"]))


@functools.cache
def msr_registry() -> MsrRegistry:
    """The shipped registry, loaded on first call and cached."""
    from kvmcpuid_virt.cpuid import shipped_text

    text = shipped_text("msr_features.json")
    return load_msr_registry(text)


# What KVM reported: FeatureMsrs lives in cpuid/msr_values.py (light: CpuidTable
# carries one) and is re-exported here.


# --- what a vCPU accepts of it ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class MsrTrial:
    """What one vCPU did with KVM's value of one feature MSR (kvm/msrs.py).

    `offered`: KVM's value (KVM_GET_MSRS on /dev/kvm); `accepted`: KVM_SET_MSRS
    of it on a vCPU with KVM's supported CPUID took; `read_back`: KVM_GET_MSRS
    after that write (None if refused); `deliverable`: the bits of `offered`
    a vCPU accepts (all of them if the value was accepted; for a per-bit MSR
    the bits accepted alone; else none); `reason`: why the rest is refused."""

    index: int
    offered: int
    accepted: bool
    read_back: int | None
    deliverable: int
    reason: str | None = None

    @property
    def refused(self) -> int:
        return self.offered & ~self.deliverable


@dataclass(frozen=True, slots=True)
class MsrDelivery:
    """What this host's vCPUs accept of every feature MSR KVM reported."""

    trials: tuple[MsrTrial, ...]
    # Feature names (CPUID registry) the vCPU's CPUID lost between
    # KVM_SET_CPUID2 and KVM_GET_CPUID2: something below this KVM rewrites them.
    cpuid_lost: tuple[str, ...] = ()
    seconds: float = 0.0
    _by_index: dict[int, MsrTrial] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for t in self.trials:
            self._by_index[t.index] = t

    def trial(self, index: int) -> MsrTrial | None:
        return self._by_index.get(index)

    def offered(self) -> FeatureMsrs:
        """KVM's values as tried, with the bits a vCPU accepted of each."""
        return FeatureMsrs.of({t.index: t.offered for t in self.trials},
                              {t.index: t.deliverable for t in self.trials})  # fmt: skip

    def note(self, index: int, registry: MsrRegistry | None = None) -> str | None:
        """One line: MSR `index`, the value KVM offers, the value a vCPU here
        accepts and why; None when the vCPU took all of it."""
        t = self._by_index.get(index)
        if t is None or not t.refused:
            return None
        reg = registry or msr_registry()
        info = reg.msr(index)
        label = info.label if info else f"MSR {index:X}H"
        why = f" ({t.reason})" if t.reason else ""
        return (f"{label} (MSR {index:#x}): KVM offers {t.offered:#x}, a vCPU here "
                f"accepts {t.deliverable:#x}{why}")  # fmt: skip

    def cpuid_notes(self, registry: MsrRegistry | None = None) -> dict[str, str]:
        """CPUID features (registry names) a vCPU here cannot be given, each
        with the one-line note of the feature MSR it enumerates: the vCPU's
        CPUID loses the bit, and KVM then accepts only 0 for that MSR."""
        reg = registry or msr_registry()
        out: dict[str, str] = {}
        for t in self.trials:
            info = reg.msr(t.index)
            if info is None or info.enumerated_by not in self.cpuid_lost:
                continue
            lost = f"{info.label}: the vCPU's CPUID loses {info.enumerated_by}"
            out.setdefault(info.enumerated_by, self.note(t.index, reg) or lost)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "trials": [{"index": f"{t.index:#x}", "offered": f"{t.offered:#x}",
                        "accepted": t.accepted,
                        "read_back": None if t.read_back is None else f"{t.read_back:#x}",
                        "deliverable": f"{t.deliverable:#x}", "reason": t.reason}
                       for t in self.trials],
            "cpuid_lost": list(self.cpuid_lost),
            "seconds": self.seconds,
        }  # fmt: skip

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> MsrDelivery:
        """to_json()'s output back (KeyError/TypeError/ValueError if damaged)."""
        trials = tuple(
            MsrTrial(int(t["index"], 16), int(t["offered"], 16), bool(t["accepted"]),
                     None if t["read_back"] is None else int(t["read_back"], 16),
                     int(t["deliverable"], 16),
                     None if t["reason"] is None else str(t["reason"]))
            for t in doc["trials"]
        )  # fmt: skip
        return cls(trials, tuple(str(n) for n in doc["cpuid_lost"]), float(doc["seconds"]))

    def deliverable(self, index: int) -> int:
        """The bits of KVM's value of MSR `index` a vCPU accepts (0: none, or
        an MSR that was not tried)."""
        t = self._by_index.get(index)
        return 0 if t is None else t.deliverable

    def why_refused(
        self, index: int, value: int, registry: MsrRegistry | None = None
    ) -> str | None:
        """Why a vCPU here refuses `value` for MSR `index`, in one line naming
        the bits; None when it accepts it (as far as the trials tell)."""
        reg = registry or msr_registry()
        t = self._by_index.get(index)
        info = reg.msr(index)
        label = info.label if info else f"MSR {index:X}H"
        if t is None:
            return f"{label} is not a feature MSR this KVM reported"
        if t.accepted and value & ~t.offered == 0:
            return None
        beyond = value & ~t.offered
        refused = value & t.offered & ~t.deliverable
        if not beyond and not refused:
            return None
        parts = []
        if refused:
            parts.append(f"{_bit_names(reg, index, refused)} refused by a vCPU here"
                         + (f": {t.reason}" if t.reason else ""))
        if beyond:
            parts.append(f"{_bit_names(reg, index, beyond)} not offered by KVM "
                         f"(it reports {t.offered:#x})")
        return f"{label} = {value:#x}: " + "; ".join(parts)


def _bit_names(reg: MsrRegistry, index: int, mask: int) -> str:
    names = []
    for b in range(64):
        if mask >> b & 1:
            f = reg.at(index, b)
            names.append(f"{f.name}" if f else f"bit {b}")
    return ", ".join(dict.fromkeys(names)) + f" ({mask:#x})"


def refusal_reason(
    info: MsrInfo | None, cpuid_set: CpuidTable, cpuid_kept: CpuidTable, cpuid_registry: Registry
) -> str:
    """Why a vCPU refuses a non-zero value of an MSR, from what decides it in
    KVM: a host-initiated write of a feature MSR whose enumerating CPUID bit
    the vCPU's CPUID lacks is refused unless it is 0 (x86.c, the
    KVM_MSR_RET_UNSUPPORTED exemption). `cpuid_set` is the table given to
    KVM_SET_CPUID2, `cpuid_kept` what KVM_GET_CPUID2 says after it."""
    if info is None or info.enumerated_by is None:
        return "KVM refuses the value for this vCPU"
    feat = cpuid_registry.lookup(info.enumerated_by)
    what = f"{feat.name} ({feat.position})"
    if not feat.present(cpuid_set):
        return f"the CPUID given to the vCPU lacks {what}, which enumerates {info.name}"
    if not feat.present(cpuid_kept):
        return (
            f"the vCPU's CPUID lost {what} between KVM_SET_CPUID2 and KVM_GET_CPUID2 "
            "(something below this KVM, e.g. the outer hypervisor, rewrites that leaf), "
            f"and KVM accepts only 0 for {info.name} on a vCPU whose CPUID does not "
            "enumerate it"
        )
    return f"KVM refuses these bits of {info.name} although the vCPU's CPUID has {what}"


def qemu_written(index: int, value: int, props: frozenset[str] | None,
                 registry: MsrRegistry | None = None) -> int:  # fmt: skip
    """What QEMU writes to feature MSR `index` for `-cpu host` when KVM offers
    `value`: the bits it has properties for (QEMU keeps each MSR as a feature
    word of named bits; with `props`, only those this binary knows). This is
    the value in its "failed to set MSR 0x10a to 0x69"."""
    reg = registry or msr_registry()
    mask = 0
    for f in reg.in_msr(index):
        if f.kind is FeatureKind.PLAIN and (props is None or f.qemu in props):
            mask |= f.mask
    return value & mask


_SET_FAILURE: Final = re.compile(r"failed to set MSR (0x[0-9a-fA-F]+) to (0x[0-9a-fA-F]+)")


def explain_set_failure(
    text: str, delivery: MsrDelivery, registry: MsrRegistry | None = None
) -> str | None:
    """QEMU's "failed to set MSR 0x10a to 0x69" (its abort when a vCPU
    refuses an MSR value, e.g. `-cpu host` here), explained from the trials;
    None when `text` has no such line or the trials say the value is taken."""
    m = _SET_FAILURE.search(text)
    if m is None:
        return None
    return delivery.why_refused(int(m.group(1), 16), int(m.group(2), 16), registry)
