"""The conformance checks as plain functions, so that the suite and its
mutant tests (test_mutants.py) run exactly the same code.

Two kinds of check:
- absolute (`check_table`): the guest's feature words equal the config's
  expected table (probe.compare with its guest-state masks);
- delta (`check_delta`): with one feature turned off, the guest's feature
  words differ from the full configuration's guest in exactly the bits the two
  expected tables differ in (the feature itself plus whatever the policy says
  goes with it), nothing else.

Mismatches on bits the host-control probe found this host does not let
KVM_SET_CPUID2 control are reported separately: the suite turns those into
xfail(strict=True) decided *before* the guest runs (`at_stake`), from the
host-control result alone, so a host that starts honouring them fails the
strict xfail.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

from kvmcpuid_virt.analysis.backend import Backend
from kvmcpuid_virt.analysis.compare import GUEST_STATE_MASKS, Ignore, compare
from kvmcpuid_virt.cpuid import features
from kvmcpuid_virt.cpuid.table import CpuidTable, Register

__all__ = [
    "KNOWN_GAPS",
    "KNOWN_RENDER_GAPS",
    "BitIssue",
    "Gap",
    "KnownGap",
    "Outcome",
    "UncontrolledMismatch",
    "at_stake",
    "check_delta",
    "check_table",
    "feature_words",
    "predicted_gaps",
    "state_mask",
]

Word = tuple[int, int, Register]
BitKey = tuple[int, int, Register, int]
_ALL = 0xFFFF_FFFF


class KnownGap(AssertionError):
    """Only bits of a documented, not yet fixed gap of this project differ
    (KNOWN_GAPS): expected failure of a strict xfail, so the fix shows up."""


@dataclasses.dataclass(frozen=True)
class Gap:
    """A known defect of this project's own layers, by where it shows."""

    backends: tuple[Backend, ...]
    kinds: tuple[str, ...]  # full, off, model, baseline
    word: Word
    mask: int
    reason: str

    def covers(self, backend: Backend | None, kind: str, issue: BitIssue) -> bool:
        return (backend in self.backends and kind in self.kinds
                and (issue.leaf, issue.subleaf, issue.reg) == self.word
                and bool(self.mask >> issue.bit & 1))


# Known gaps of this project's own model of QEMU: (backends, kinds, word,
# mask, reason). Empty now: named models' max leaves and signature follow
# QEMU's model (policy.select.with_model_identity).
KNOWN_GAPS: tuple[Gap, ...] = ()
# Renderings an adapter cannot produce yet: (backend, text of its error).
# Empty: the libvirt adapter now disables model features when no model fits.
KNOWN_RENDER_GAPS: tuple[tuple[Backend, str], ...] = ()


def predicted_gaps(backend: Backend, kind: str, expected: CpuidTable) -> list[str]:
    """Known gaps that can show in this test: their bits are on in `expected`."""
    return [g.reason for g in KNOWN_GAPS
            if backend in g.backends and kind in g.kinds and expected.get(*g.word) & g.mask]


class UncontrolledMismatch(AssertionError):
    """Only bits this host does not control differ: the expected failure of
    an xfail(strict=True, raises=UncontrolledMismatch) test. Any other
    exception (a plain AssertionError for controlled bits) fails the test."""


@dataclasses.dataclass(frozen=True)
class BitIssue:
    leaf: int
    subleaf: int
    reg: Register
    bit: int
    name: str | None
    want: str  # "on"/"off" (absolute) or "changes"/"stays" (delta)
    got: str
    controlled: bool
    reason: str = ""

    @property
    def label(self) -> str:
        pos = f"{self.leaf:#x}.{self.subleaf}:{self.reg}[{self.bit}]"
        return f"{self.name} ({pos})" if self.name else pos

    def text(self) -> str:
        extra = "" if self.controlled else f" [host does not control it: {self.reason}]"
        return f"{self.label}: expected {self.want}, guest {self.got}{extra}"


@dataclasses.dataclass(frozen=True)
class Outcome:
    issues: tuple[BitIssue, ...]
    bits_compared: int
    # Of bits_compared, those this host lets KVM_SET_CPUID2 control: what a
    # check proves even where uncontrolled bits make the test an xfail.
    controlled_bits: int = 0

    @property
    def failures(self) -> tuple[BitIssue, ...]:
        return tuple(i for i in self.issues if i.controlled)

    @property
    def uncontrolled(self) -> tuple[BitIssue, ...]:
        return tuple(i for i in self.issues if not i.controlled)

    @property
    def controlled_matched(self) -> int:
        """Controlled bits compared that matched."""
        return max(0, self.controlled_bits - len(self.failures))

    def raise_for(self, what: str, backend: Backend | None = None, kind: str = "") -> None:
        """AssertionError on any controlled mismatch outside KNOWN_GAPS;
        KnownGap when the rest are known gaps; UncontrolledMismatch when only
        uncontrolled bits differ; nothing when all match."""
        known = [i for i in self.failures
                 if any(g.covers(backend, kind, i) for g in KNOWN_GAPS)]
        unknown = [i for i in self.failures if i not in known]
        if unknown:
            lines = [i.text() for i in unknown]
            more = len(self.uncontrolled)
            if more:
                lines.append(f"(and {more} mismatch(es) on bits this host does not control)")
            if known:
                lines.append(f"(and {len(known)} mismatch(es) of known gaps)")
            raise AssertionError(f"{what}: {len(unknown)} mismatch(es)\n  "
                                 + "\n  ".join(lines))
        if known:
            raise KnownGap(f"{what}: known gap\n  " + "\n  ".join(i.text() for i in known))
        if self.uncontrolled:
            raise UncontrolledMismatch(
                f"{what}: only bits this host does not control differ\n  "
                + "\n  ".join(i.text() for i in self.uncontrolled)
            )


def feature_words() -> list[Word]:
    """Registers with named bits: what every check compares (the same words
    probe.compare checks). Looked up through the module so a mutant registry
    patched into `features.registry` is seen."""
    return features.registry().words()


def state_mask(leaf: int, subleaf: int, reg: str,
               ignore: Iterable[Ignore] = GUEST_STATE_MASKS) -> int:
    """Bits of a word that are compared: all but the documented guest-state ones."""
    mask = _ALL
    for rule in ignore:
        if rule.applies(leaf, subleaf, reg):
            mask &= ~rule.mask
    return mask


def _name(leaf: int, subleaf: int, reg: str, bit: int) -> str | None:
    f = features.registry().at(leaf, subleaf, reg, bit)
    return f.name if f is not None else None


def check_table(expected: CpuidTable, guest: CpuidTable, *, backend: Backend,
                uncontrolled: Mapping[Word, int], reasons: Mapping[BitKey, str],
                supported: CpuidTable | None = None, vmm: CpuidTable | None = None,
                ignore: Sequence[Ignore] = GUEST_STATE_MASKS) -> Outcome:
    """The guest's feature words against the expected table (probe.compare)."""
    cmp = compare(expected, guest, backend=backend, supported=supported, vmm=vmm,
                  uncontrolled=uncontrolled, uncontrolled_reasons=reasons,
                  words=feature_words(), ignore=ignore)
    issues = [
        BitIssue(m.leaf, m.subleaf, m.reg, m.bit, m.name, "on" if m.requested else "off",
                 "on" if m.guest else "off", m.controlled,
                 reasons.get((m.leaf, m.subleaf, m.reg, m.bit), "") if not m.controlled
                 else m.explanation)
        for m in cmp.mismatches
    ]
    for leaf, sub, reg in cmp.words_missing:
        issues.append(BitIssue(leaf, sub, reg, 0, None, "answered", "missing", True,
                               "the guest was not asked for this word"))
    return Outcome(tuple(issues), cmp.bits_compared,
                   cmp.bits_compared - _uncontrolled_compared(guest, uncontrolled, ignore))


def _uncontrolled_compared(guest: CpuidTable, uncontrolled: Mapping[Word, int],
                           ignore: Sequence[Ignore], *also: CpuidTable) -> int:  # fmt: skip
    """Bits the comparison looked at (the words the guest, and `also`,
    answered; the guest-state masks left out) that this host does not control."""
    n = 0
    for leaf, sub, reg in feature_words():
        if any(t.lookup(leaf, sub) is None for t in (guest, *also)):
            continue
        n += bin(uncontrolled.get((leaf, sub, reg), 0) & state_mask(leaf, sub, reg, ignore)
                 ).count("1")
    return n


def check_delta(expected_full: CpuidTable, expected_off: CpuidTable,
                guest_full: CpuidTable, guest_off: CpuidTable, *,
                uncontrolled: Mapping[Word, int], reasons: Mapping[BitKey, str],
                ignore: Sequence[Ignore] = GUEST_STATE_MASKS) -> Outcome:
    """Every feature-word bit must change between the two guests exactly
    when it changes between the two expected tables."""
    issues: list[BitIssue] = []
    compared = 0
    for leaf, sub, reg in feature_words():
        if guest_full.lookup(leaf, sub) is None or guest_off.lookup(leaf, sub) is None:
            if (expected_full.get(leaf, sub, reg) ^ expected_off.get(leaf, sub, reg)):
                issues.append(BitIssue(leaf, sub, reg, 0, None, "answered", "missing", True,
                                       "the guest was not asked for this word"))
            continue
        mask = state_mask(leaf, sub, reg, ignore)
        compared += bin(mask).count("1")
        want = (expected_full.get(leaf, sub, reg) ^ expected_off.get(leaf, sub, reg)) & mask
        seen = (guest_full.get(leaf, sub, reg) ^ guest_off.get(leaf, sub, reg)) & mask
        free = uncontrolled.get((leaf, sub, reg), 0)
        for bit in range(32):
            if (want ^ seen) >> bit & 1:
                ctl = not free >> bit & 1
                issues.append(BitIssue(
                    leaf, sub, reg, bit, _name(leaf, sub, reg, bit),
                    "changes" if want >> bit & 1 else "stays",
                    "changes" if seen >> bit & 1 else "stays", ctl,
                    "" if ctl else reasons.get((leaf, sub, reg, bit), "?"),
                ))
    return Outcome(tuple(issues), compared,
                   compared - _uncontrolled_compared(guest_full, uncontrolled, ignore, guest_off))


def at_stake(expected: CpuidTable, reference: CpuidTable, *,
             uncontrolled: Mapping[Word, int], reasons: Mapping[BitKey, str],
             ignore: Sequence[Ignore] = GUEST_STATE_MASKS) -> list[str]:
    """Uncontrolled bits where `expected` differs from `reference`, as
    "label: reason" lines. For an absolute check `reference` is what this
    host forces (the guest of the unmodified supported table); for a delta
    check it is the full configuration's expected table. Decided from the
    host-control result and the expected tables only, before any guest of the
    test runs."""
    out = []
    for leaf, sub, reg in feature_words():
        free = uncontrolled.get((leaf, sub, reg), 0) & state_mask(leaf, sub, reg, ignore)
        if not free or reference.lookup(leaf, sub) is None:
            continue
        diff = (expected.get(leaf, sub, reg) ^ reference.get(leaf, sub, reg)) & free
        for bit in range(32):
            if diff >> bit & 1:
                name = _name(leaf, sub, reg, bit)
                pos = f"{leaf:#x}.{sub}:{reg}[{bit}]"
                label = f"{name} ({pos})" if name else pos
                out.append(f"{label}: {reasons.get((leaf, sub, reg, bit), '?')}")
    return out
