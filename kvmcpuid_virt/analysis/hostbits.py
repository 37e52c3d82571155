"""What the baseline and the compat matrix need of each host, read once per
distinct table: its vendor, leaf ranges, signature, which (leaf, subleaf)
it answers, and every feature word of the registry packed into one integer
(word i at bits 32*i..32*i+31, `WORDS` order), so that an intersection is an
AND and "does A fit in B" is `a & ~b == 0` however many words there are.

Tables are read through `profiles()`, which reads each distinct table object
once (a fleet's identical dumps share one table: cpuid/canonical.py).

Pure: a function of the tables and of the feature registry.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter
from typing import Final

from kvmcpuid_virt.cpuid import fields
from kvmcpuid_virt.cpuid.features import registry
from kvmcpuid_virt.cpuid.formats import Dump
from kvmcpuid_virt.cpuid.table import CpuidEntry, CpuidTable, Register

__all__ = [
    "NAMED",
    "WORDS",
    "Profile",
    "pack",
    "profile",
    "profiles",
    "unpack",
    "word_mask",
]

# Every feature word the registry names a bit in, in its order.
WORDS: Final[tuple[tuple[int, int, Register], ...]] = tuple(registry().words())
_SLOT: Final = {w: i for i, w in enumerate(WORDS)}
# (leaf, subleaf, range base) -> [(register, shift)]: one lookup per entry,
# not per word.
_BY_ENTRY: Final[dict[tuple[int, int, int], list[tuple[Register, int]]]] = {}
for _i, (_leaf, _sub, _reg) in enumerate(WORDS):
    _BY_ENTRY.setdefault((_leaf, _sub, fields.range_base(_leaf)), []).append((_reg, 32 * _i))
# An entry's (leaf, subleaf), read in C: a fleet's tables are many.
_KEY: Final = attrgetter("function", "index")
_U32: Final = 0xFFFF_FFFF


def pack(words: dict[tuple[int, int, Register], int]) -> int:
    """The packed form of a word -> value mapping (words not in WORDS ignored)."""
    out = 0
    for w, value in words.items():
        slot = _SLOT.get(w)
        if slot is not None:
            out |= (value & _U32) << (32 * slot)
    return out


def unpack(bits: int) -> dict[tuple[int, int, Register], int]:
    """Word -> value of a packed integer, every word of WORDS."""
    return {w: bits >> (32 * i) & _U32 for i, w in enumerate(WORDS)}


def word_mask(masks: dict[tuple[int, int, Register], int]) -> int:
    """A packed mask from per-word masks (e.g. the named bits of each word)."""
    return pack(masks)


def _named() -> int:
    reg = registry()
    out: dict[tuple[int, int, Register], int] = {}
    for leaf, sub, r in WORDS:
        mask = 0
        for f in reg.in_word(leaf, sub, r):
            mask |= f.mask
        out[(leaf, sub, r)] = mask
    return pack(out)


# The registry's named bits, packed: what the baseline ANDs.
NAMED: Final = _named()


class Profile:
    """One table, read for the baseline and the matrix.

    words:   every feature word as a guest reads it (0 beyond the table's max
             leaf, unless `ranged` is False), packed (see the module);
    ranged:  whether the table announces its leaf ranges (a feature-only
             input, kind "config", does not: its words count as they are);
    limits:  fields.leaf_limits; keys: the (leaf, subleaf) of every entry
             (made when first asked: a set per table was a third of a
             2000-host baseline's per-table work, and it needs none).
    A plain slotted class: a fleet makes thousands, and a frozen
    dataclass sets each field through object.__setattr__."""

    __slots__ = ("_keys", "limits", "ranged", "signature", "table", "vendor", "words")

    def __init__(self, table: CpuidTable, vendor: str, ranged: bool, limits: dict[int, int],
                 words: int, signature: tuple[int, int, int],
                 keys: frozenset[tuple[int, int]] | None = None) -> None:  # fmt: skip
        self.table = table
        self.vendor = vendor
        self.ranged = ranged
        self.limits = limits
        self.words = words
        self._keys = keys
        self.signature = signature

    @property
    def keys(self) -> frozenset[tuple[int, int]]:
        if self._keys is None:
            self._keys = frozenset(map(_KEY, self.table))
        return self._keys

    def answers(self, leaf: int, subleaf: int) -> bool:
        """Whether the table has an entry for CPUID(leaf, subleaf)."""
        return self.table.lookup(leaf, subleaf) is not None


def _words(table: CpuidTable, limits: dict[int, int] | None) -> int:
    out = 0
    for (leaf, sub, base), regs in _BY_ENTRY.items():
        if limits is not None:
            # fields.in_range(strict=True), inline: a fleet reads thousands.
            top = limits.get(base)
            if top is None or leaf > top:
                continue
        e: CpuidEntry | None = table.lookup(leaf, sub)
        if e is None:
            continue
        for r, shift in regs:
            out |= getattr(e, r) << shift
    return out


def profile(dump: Dump) -> Profile:
    """The profile of one dump's table (see Profile)."""
    table = dump.table
    limits = fields.leaf_limits(table)
    ranged = dump.kind != "config"
    sig = fields.signature(table)
    return Profile(
        table=table,
        vendor=fields.vendor(table) or "",
        ranged=ranged,
        limits=limits,
        words=_words(table, limits if ranged else None),
        signature=(0, 0, 0) if sig is None else (sig.family, sig.model, sig.stepping),
    )


def profiles(dumps: Sequence[Dump]) -> list[Profile]:
    """profile() of each dump, each distinct table (and range rule) read once."""
    seen: dict[tuple[int, bool], Profile] = {}
    out = []
    for d in dumps:
        key = (id(d.table), d.kind != "config")
        p = seen.get(key)
        if p is None:
            p = seen[key] = profile(d)
        out.append(p)
    return out
