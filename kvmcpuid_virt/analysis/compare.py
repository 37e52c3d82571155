"""Expected CPUID against what a guest saw, per bit, with names, and each
mismatch attributed to the layer that changed it.

Views, from the top down:
  requested  the CpuConfig's expected table (what the guest should see);
  supported  KVM_GET_SUPPORTED_CPUID (what KVM says it can give);
  vmm        what the VMM configured (KVM_GET_CPUID2 on raw KVM, QEMU's
             feature-words over QMP), when the backend can tell;
  guest      what CPUID answered inside the guest.
A bit that differs between two adjacent views was changed by the layer
between them. Bits that legitimately follow guest state are masked by the
documented list GUEST_STATE_MASKS, never by skipping whole leaves.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from kvmcpuid_virt.analysis.backend import Backend
from kvmcpuid_virt.cpuid.features import Registry, registry
from kvmcpuid_virt.cpuid.table import CpuidTable, Register

__all__ = [
    "GUEST_STATE_MASKS",
    "Comparison",
    "Ignore",
    "Layer",
    "Mismatch",
    "compare",
    "feature_words",
]

Word = tuple[int, int, Register]


@dataclasses.dataclass(frozen=True, slots=True)
class Ignore:
    """One rule of the ignore grammar: (leaf, subleaf or None for every
    subleaf, register, mask), and why those bits may legitimately differ."""

    leaf: int
    subleaf: int | None
    reg: Register
    mask: int
    reason: str

    def applies(self, leaf: int, subleaf: int, reg: str) -> bool:
        return self.leaf == leaf and self.reg == reg and self.subleaf in (None, subleaf)


# Bits that follow guest state or topology rather than the configuration.
GUEST_STATE_MASKS: Final[tuple[Ignore, ...]] = (
    Ignore(0x1, 0, "ebx", 0xFF00_0000, "initial APIC ID: differs per vCPU"),
    Ignore(0x1, 0, "ebx", 0x00FF_0000, "logical processor count: follows the topology"),
    Ignore(0x1, 0, "ecx", 1 << 27, "OSXSAVE mirrors CR4.OSXSAVE, set by the guest OS"),
    Ignore(0x1, 0, "edx", 1 << 28, "HTT follows the topology (threads per package)"),
    Ignore(0x7, 0, "ecx", 1 << 4, "OSPKE mirrors CR4.PKE, set by the guest OS"),
    Ignore(0xB, None, "edx", 0xFFFF_FFFF, "x2APIC ID: differs per vCPU"),
    Ignore(0x1F, None, "edx", 0xFFFF_FFFF, "x2APIC ID: differs per vCPU"),
    Ignore(0xD, 0, "ebx", 0xFFFF_FFFF, "XSAVE area size for the features enabled in XCR0"),
    Ignore(0xD, 1, "ebx", 0xFFFF_FFFF, "XSAVE area size for XCR0 | IA32_XSS"),
    Ignore(0x8000_001E, None, "eax", 0xFFFF_FFFF, "extended APIC ID: differs per vCPU"),
    Ignore(0x8000_001E, None, "ebx", 0xFFFF_FFFF, "compute unit / core ID: topology"),
    Ignore(0x8000_001E, None, "ecx", 0xFFFF_FFFF, "node ID: topology"),
)


class Layer(enum.StrEnum):
    """Where a mismatching bit was changed. A StrEnum: Mismatch.as_json and
    the JSON report carry the value ("vmm"), as they did when it was a str."""

    CONFIG = "config"  # the configuration asks for what KVM cannot give
    VMM = "vmm"  # QEMU or libvirt set something else than requested
    HOST = "host"  # below KVM: the outer hypervisor or the CPU itself
    KVM = "kvm"  # KVM was told one thing and the guest sees another


@dataclasses.dataclass(frozen=True, slots=True)
class Mismatch:
    leaf: int
    subleaf: int
    reg: Register
    bit: int
    name: str | None
    requested: bool
    guest: bool
    supported: bool | None
    vmm: bool | None
    layer: Layer
    controlled: bool  # False: the host-control probe says this host ignores the bit
    explanation: str

    @property
    def label(self) -> str:
        pos = f"{self.leaf:#x}.{self.subleaf}:{self.reg}[{self.bit}]"
        return f"{self.name} ({pos})" if self.name else pos

    def as_json(self) -> dict[str, object]:
        out = dataclasses.asdict(self)
        out["label"] = self.label
        return out


@dataclasses.dataclass(frozen=True, slots=True)
class Comparison:
    backend: Backend
    mismatches: tuple[Mismatch, ...]
    bits_compared: int
    words_missing: tuple[Word, ...]  # requested words the guest was not asked for

    @property
    def ok(self) -> bool:
        """True when every bit this host controls matches and the guest was
        asked for every word that has a requested bit."""
        return not self.words_missing and all(not m.controlled for m in self.mismatches)

    @property
    def failures(self) -> tuple[Mismatch, ...]:
        return tuple(m for m in self.mismatches if m.controlled)

    def summary(self) -> str:
        known = len(self.mismatches) - len(self.failures)
        text = f"{self.backend}: {self.bits_compared} bits compared, "
        if not self.mismatches:
            text += "all match"
        else:
            text += f"{len(self.failures)} mismatch(es)"
            if known:
                text += f", {known} on bits this host does not control"
        if self.words_missing:
            words = ", ".join(f"{leaf:#x}.{sub} {reg}" for leaf, sub, reg in self.words_missing)
            text += f"; NOT CHECKED (the guest was not asked): {words}"
        return text

    def as_json(self) -> dict[str, object]:
        return {
            "backend": self.backend,
            "ok": self.ok,
            "bits_compared": self.bits_compared,
            "mismatches": [m.as_json() for m in self.mismatches],
            "words_missing": [
                {"leaf": f"{leaf:#x}", "subleaf": sub, "reg": reg}
                for leaf, sub, reg in self.words_missing
            ],
        }

    def table(self, include_host: bool = False) -> str:
        """A per-bit table of the mismatches that fail (and, with
        include_host, of those on bits this host does not control), or only
        the summary line when there are none to show."""
        shown = self.mismatches if include_host else self.failures
        if not shown:
            return self.summary()
        rows = [("feature", "req", "kvm", "vmm", "guest", "where")]
        for m in shown:
            rows.append(
                (
                    m.label,
                    _onoff(m.requested),
                    _onoff(m.supported),
                    _onoff(m.vmm),
                    _onoff(m.guest),
                    m.explanation if m.controlled else f"(host) {m.explanation}",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5]
                 for r in rows]
        return "\n".join([*lines, self.summary()])


def _onoff(value: bool | None) -> str:
    return "-" if value is None else ("on" if value else "off")


def feature_words(reg: Registry | None = None) -> list[Word]:
    """The registers that hold named feature bits: what compare() checks."""
    return (reg or registry()).words()


def _uncontrolled_mask(
    uncontrolled: Mapping[Word, int] | None, word: Word
) -> int:
    return 0 if uncontrolled is None else uncontrolled.get(word, 0)


def compare(
    requested: CpuidTable,
    guest: CpuidTable,
    *,
    backend: Backend,
    supported: CpuidTable | None = None,
    vmm: CpuidTable | None = None,
    uncontrolled: Mapping[Word, int] | None = None,
    uncontrolled_reasons: Mapping[tuple[int, int, Register, int], str] | None = None,
    words: Sequence[Word] | None = None,
    ignore: Iterable[Ignore] = GUEST_STATE_MASKS,
) -> Comparison:
    """Compare every bit of the feature words (or `words`) that the guest was
    asked for. `uncontrolled` marks bits the host-control probe found this
    host does not let KVM_SET_CPUID2 control: mismatches there are reported
    but do not fail."""
    reg = registry()
    rules = tuple(ignore)
    mismatches: list[Mismatch] = []
    missing: list[Word] = []
    compared = 0
    for leaf, subleaf, r in words if words is not None else feature_words(reg):
        entry = guest.lookup(leaf, subleaf)
        if entry is None:
            if requested.get(leaf, subleaf, r):
                missing.append((leaf, subleaf, r))
            continue
        mask = 0xFFFF_FFFF
        for rule in rules:
            if rule.applies(leaf, subleaf, r):
                mask &= ~rule.mask
        want = requested.get(leaf, subleaf, r) & mask
        seen = entry.reg(r) & mask
        compared += bin(mask).count("1")
        diff = want ^ seen
        if not diff:
            continue
        free = _uncontrolled_mask(uncontrolled, (leaf, subleaf, r))
        for bit in range(32):
            if not diff >> bit & 1:
                continue
            feature = reg.at(leaf, subleaf, r, bit)
            mismatches.append(
                _attribute(
                    leaf, subleaf, r, bit,
                    feature.name if feature else None,
                    requested=bool(want >> bit & 1),
                    guest=bool(seen >> bit & 1),
                    supported=_bit(supported, leaf, subleaf, r, bit),
                    vmm=_bit(vmm, leaf, subleaf, r, bit),
                    controlled=not free >> bit & 1,
                    reason=(uncontrolled_reasons or {}).get((leaf, subleaf, r, bit)),
                )
            )
    return Comparison(backend, tuple(mismatches), compared, tuple(missing))


def _bit(table: CpuidTable | None, leaf: int, subleaf: int, reg: Register, bit: int) -> bool | None:
    if table is None or table.lookup(leaf, subleaf) is None:
        return None
    return bool(table.get(leaf, subleaf, reg) >> bit & 1)


def _attribute(
    leaf: int, subleaf: int, reg: Register, bit: int, name: str | None, *,
    requested: bool, guest: bool, supported: bool | None, vmm: bool | None,
    controlled: bool, reason: str | None,
) -> Mismatch:
    want, seen = _onoff(requested), _onoff(guest)
    kvm = "" if supported is None else (
        "supported by KVM, " if supported else "not supported by KVM, "
    )
    if not controlled:
        # The host-control probe saw this bit ignore KVM_SET_CPUID2: whatever
        # the views above say, the guest's answer comes from below KVM.
        layer = Layer.HOST
        where = "below KVM: this host does not control the bit" + (f" ({reason})" if reason else "")
    elif requested and supported is False and (vmm is None or not vmm):
        layer = Layer.CONFIG
        where = "the configuration asks for more than KVM gives"
    elif vmm is not None and vmm != requested:
        layer = Layer.VMM
        where = "changed in the VMM (QEMU/libvirt)"
    else:
        layer = Layer.KVM if vmm is not None else Layer.HOST
        where = "lost below KVM" if vmm is not None else "lost between the VMM and the guest"
    set_by = "" if vmm is None else f"set {_onoff(vmm)} by the VMM, "
    text = f"requested {want}, {kvm}{set_by}guest sees {seen} -> {where}"
    return Mismatch(leaf, subleaf, reg, bit, name, requested, guest, supported, vmm, layer,
                    controlled, text)
