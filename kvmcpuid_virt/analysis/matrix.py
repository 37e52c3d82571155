"""The migration matrix: for every ordered pair of hosts (A, B), can a guest
configured with A's full CPU (everything A can give, as compat reads it:
`compat.host_offer`) run on B, by compat's RULES (docs/compat.md)?

Hosts whose tables read the same for every rule are one *group* (a fleet of
thousands has a few dozen configurations); the matrix is computed over the
groups and says which hosts each holds. Each guest group's row is one
integer, a bit per host group, built from per-host-group bitsets: "hosts
whose offer has feature bit p", "hosts whose max basic leaf is at least v",
... A row is the AND of the bitsets of what the guest has, so the cost per
pair is a fraction of one big-integer AND, and the reasons of a cell are
compat() itself, asked only for the cells shown (`Matrix.verdict`).

`fits_pair` is the same verdict for one pair, written out rule by rule;
the tests hold both to compat().fits.

Pure: a function of the dumps and of the feature registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Final

from kvmcpuid_virt.analysis.baseline import word_value
from kvmcpuid_virt.analysis.compat import (
    RULES,
    FieldRule,
    Host,
    Rule,
    Scope,
    Verdict,
    compat,
    field_value,
    guest_msr_features,
    host_msrs,
    host_offer,
    ignored_mask,
    xsave_components,
)
from kvmcpuid_virt.analysis.hostbits import WORDS, pack
from kvmcpuid_virt.cpuid import fields
from kvmcpuid_virt.cpuid.formats import Dump
from kvmcpuid_virt.cpuid.msr_features import msr_registry

__all__ = ["Group", "Matrix", "Side", "fits_pair", "matrix", "side"]

_FIELDS: Final = tuple(r for r in RULES if r.scope == Scope.REGISTER)
_XSAVE: Final = tuple(r for r in RULES if r.scope == Scope.XSAVE_COMPONENTS)
# The bits compat() compares in each feature word, packed (hostbits order).
_COMPARED: Final = pack({(leaf, sub, r): ~ignored_mask(leaf, sub, r) & 0xFFFF_FFFF
                         for leaf, sub, r in WORDS})  # fmt: skip
# Feature-MSR bits follow the CPUID words in the same integer, one bit per
# registry feature, so the pair test stays `a & ~b`.
_MSR_FEATURES: Final = tuple(f.name for f in msr_registry().features)
_MSR_BIT: Final = {name: 1 << (32 * len(WORDS) + i) for i, name in enumerate(_MSR_FEATURES)}
_ALL_MSR_BITS: Final = sum(_MSR_BIT.values())


def _msr_bits(offer: Dump) -> int:
    """The feature-MSR bits of a host's full CPU: the features its offer's
    feature MSRs hold (compat.host_offer keeps just those a guest can be
    given). They are what the guest has and, QEMU-settable features being
    all a matrix guest asks for, what the host gives."""
    return sum(_MSR_BIT[name] for name in guest_msr_features(offer))


@dataclasses.dataclass(frozen=True)
class Side:
    """One host read both ways: as the guest (A's full CPU) and as the host
    (`offer`: compat.host_offer of it).

    guest_words: the guest's feature words, packed, the compared bits only,
    then its feature-MSR bits (_MSR_BIT);
    offer_words: what the host can give, packed the same way;
    guest_fields / host_fields: each REGISTER rule's value (None: absent);
    guest_xsave: (component, its size, offset, flags) the guest has;
    host_xsave: component -> (size, offset, flags) of the host;
    ranged: the host announces its leaf ranges (not a feature-only view);
    msrs_known: the host's feature MSRs are known (else compat leaves a
    guest's MSR features unjudged there, and the cell fits as far as known)."""

    guest: Dump
    host: Dump
    offer: Dump
    guest_words: int
    offer_words: int
    guest_fields: tuple[int | None, ...]
    host_fields: tuple[int | None, ...]
    guest_xsave: tuple[tuple[int, tuple[int | None, ...]], ...]
    host_xsave: tuple[tuple[int, tuple[int | None, ...]], ...]
    ranged: bool
    msrs_known: bool = True

    def key(self) -> tuple[object, ...]:
        """What every verdict of this host depends on: equal keys, one group."""
        return (self.guest_words, self.offer_words, self.guest_fields, self.host_fields,
                self.guest_xsave, self.host_xsave, self.ranged, self.msrs_known)  # fmt: skip

    def msr_features(self) -> list[str]:
        """The MSR features of this host's guest (its full CPU's)."""
        return [n for n in _MSR_FEATURES if self.guest_words & _MSR_BIT[n]]


def side(dump: Dump) -> Side:
    """Read one host (a dump, or a feature-only host-model) both ways."""
    host = Host(dump)
    offer = host_offer(host)
    # A guest with everything the host offers; a feature-only view stays
    # one (it names no max leaves, so none are compared).
    guest = Dump(offer.table, "config" if dump.kind == "config" else "guest", dump.host,
                 dump.source)  # fmt: skip
    words: dict[tuple[int, int, str], int] = {}
    offers: dict[tuple[int, int, str], int] = {}
    limits = fields.leaf_limits(offer.table)
    feature_only = dump.kind == "config"
    for leaf, sub, r in WORDS:
        words[(leaf, sub, r)] = word_value(guest, leaf, sub, r, limits)
        offers[(leaf, sub, r)] = word_value(offer, leaf, sub, r, limits)
        if feature_only and fields.range_base(leaf) == fields.HYPERVISOR_BASE:
            # A host-model names no KVM paravirtual feature: not compared
            # (compat's rule), so as if it had every one.
            offers[(leaf, sub, r)] = 0xFFFF_FFFF
    comps = xsave_components(guest)
    known = host_msrs(host) is not None
    msr_bits = _msr_bits(offer)
    return Side(
        guest=guest,
        host=dump,
        offer=offer,
        guest_words=pack(words) & _COMPARED | msr_bits,  # type: ignore[arg-type]
        # Unknown feature MSRs are not missing: every MSR bit (compat notes them).
        offer_words=pack(offers) | (msr_bits if known else _ALL_MSR_BITS),  # type: ignore[arg-type]
        guest_fields=tuple(field_value(guest, r) for r in _FIELDS),
        host_fields=tuple(field_value(dump, r) for r in _FIELDS),
        guest_xsave=tuple((i, tuple(field_value(guest, r, i) for r in _XSAVE)) for i in comps),
        host_xsave=tuple((i, tuple(field_value(dump, r, i) for r in _XSAVE))
                         for i in range(2, 63) if field_value(dump, _XSAVE[0], i) is not None),
        ranged=dump.kind != "config",
        msrs_known=known,
    )


def _field_ok(rule: FieldRule, g: int, h: int | None) -> bool:
    if h is None:
        return False
    if rule.rule == Rule.NO_GREATER:
        return g <= h
    if rule.rule == Rule.EQUAL:
        return g == h
    return not g & ~h  # SUBSET


def fits_pair(a: Side, b: Side) -> bool:
    """Whether a guest with A's full CPU fits B, rule by rule (compat's)."""
    if a.guest_words & ~b.offer_words:
        return False
    if not b.ranged:
        return True  # a feature-only host: its fields are unknown
    for rule, g, h in zip(_FIELDS, a.guest_fields, b.host_fields, strict=True):
        if g is not None and not _field_ok(rule, g, h):
            return False
    host_xsave = dict(b.host_xsave)
    for i, values in a.guest_xsave:
        have = host_xsave.get(i)
        for k, g in enumerate(values):
            if g is not None and have is not None and have[k] is not None and have[k] != g:
                return False
    return True


@dataclasses.dataclass(frozen=True)
class Group:
    """Hosts that read the same for every rule: `members` index Matrix.hosts."""

    side: Side
    members: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Matrix:
    """hosts: every host's source, in input order; groups: the distinct
    configurations; rows[g]: bit h set when group g's guest fits group h."""

    hosts: tuple[str, ...]
    groups: tuple[Group, ...]
    rows: tuple[int, ...]

    def fits(self, guest: int, host: int) -> bool:
        """Group `guest`'s full CPU on group `host`."""
        return bool(self.rows[guest] >> host & 1)

    def group_of(self) -> list[int]:
        """Each host's group, by host index."""
        out = [0] * len(self.hosts)
        for g, group in enumerate(self.groups):
            for m in group.members:
                out[m] = g
        return out

    def verdict(self, guest: int, host: int) -> Verdict:
        """compat() of the cell: its reasons (the groups' first hosts named)."""
        target = self.groups[host].side
        return compat(self.groups[guest].side.guest, Host(target.host), offer=target.offer)

    def unjudged(self, guest: int, host: int) -> list[str]:
        """The guest's MSR features a fitting cell leaves unjudged (the
        host's feature MSRs are unknown): what compat's verdict names."""
        if self.groups[host].side.msrs_known or not self.fits(guest, host):
            return []
        return self.groups[guest].side.msr_features()

    def fitting_pairs(self) -> int:
        """How many ordered pairs of hosts fit (the diagonal included)."""
        sizes = [len(g.members) for g in self.groups]
        total = 0
        for g, row in enumerate(self.rows):
            total += sizes[g] * sum(sizes[h] for h in range(len(sizes)) if row >> h & 1)
        return total


def matrix(dumps: Sequence[Dump]) -> Matrix:
    """The matrix of `dumps` (see the module)."""
    sides: dict[int, Side] = {}  # one read per distinct table object
    groups: dict[tuple[object, ...], list[int]] = {}
    reps: dict[tuple[object, ...], Side] = {}
    for i, d in enumerate(dumps):
        s = sides.get(id(d.table) * 2 + (d.kind == "config"))
        if s is None:
            s = sides[id(d.table) * 2 + (d.kind == "config")] = side(d)
        k = s.key()
        reps.setdefault(k, s)
        groups.setdefault(k, []).append(i)
    order = list(groups)
    all_sides = [reps[k] for k in order]
    return Matrix(
        hosts=tuple(d.source for d in dumps),
        groups=tuple(Group(reps[k], tuple(groups[k])) for k in order),
        rows=_rows(all_sides),
    )


def _rows(sides: Sequence[Side]) -> tuple[int, ...]:
    """Each guest's row over the hosts (bit h: fits host h), by bitsets."""
    n = len(sides)
    everyone = (1 << n) - 1
    unranged = sum(1 << j for j, s in enumerate(sides) if not s.ranged)
    # has[p]: hosts whose offer has packed feature bit p.
    has: dict[int, int] = {}
    # Only bits some guest has are ever looked up (a host with unknown
    # feature MSRs offers every MSR bit).
    asked = 0
    for s in sides:
        asked |= s.guest_words
    for j, s in enumerate(sides):
        w = s.offer_words & asked
        while w:
            low = w & -w
            p = low.bit_length() - 1
            has[p] = has.get(p, 0) | 1 << j
            w ^= low
    memo: dict[tuple[object, ...], int] = {}

    def field_hosts(r: int, g: int) -> int:
        key = ("field", r, g)
        found = memo.get(key)
        if found is None:
            rule = _FIELDS[r]
            found = unranged | sum(1 << j for j, s in enumerate(sides)
                                   if s.ranged and _field_ok(rule, g, s.host_fields[r]))
            memo[key] = found
        return found

    def xsave_hosts(i: int, k: int, g: int) -> int:
        key = ("xsave", i, k, g)
        found = memo.get(key)
        if found is None:
            ok = unranged
            for j, s in enumerate(sides):
                have = dict(s.host_xsave).get(i)
                if not s.ranged or have is None or have[k] is None or have[k] == g:
                    ok |= 1 << j
            memo[key] = found = ok
        return found

    rows = []
    for a in sides:
        row = everyone
        w = a.guest_words
        while w and row:
            low = w & -w
            row &= has.get(low.bit_length() - 1, 0)
            w ^= low
        for r, g in enumerate(a.guest_fields):
            if g is not None and row:
                row &= field_hosts(r, g)
        for i, values in a.guest_xsave:
            for k, g in enumerate(values):
                if g is not None and row:
                    row &= xsave_hosts(i, k, g)
        rows.append(row)
    return tuple(rows)
