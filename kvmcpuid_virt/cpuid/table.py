"""CpuidEntry and CpuidTable: the in-memory form of a CPUID table, whatever it
came from (KVM, a dump, a guest's answer)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet
from enum import IntFlag
from itertools import repeat

TYPE_CHECKING = False  # the fast path's typing stand-in: docs/ARCHITECTURE.md, Start-up
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Final, Literal

    from kvmcpuid_virt.cpuid.msr_values import FeatureMsrs

__all__ = [
    "INDEXED_LEAVES",
    "REGISTERS",
    "CpuidEntry",
    "CpuidTable",
    "EntryFlag",
    "Register",
    "first_problem",
]

if TYPE_CHECKING:
    Register = Literal["eax", "ebx", "ecx", "edx"]
    # CpuidTable.layout: (function, index) -> position of the indexed
    # entries, function -> position of the others.
    TableLayout = tuple[dict[tuple[int, int], int], dict[int, int]]
REGISTERS: Final[tuple[Register, ...]] = ("eax", "ebx", "ecx", "edx")


def __getattr__(name: str) -> object:
    # Register is a typing-only alias here (see TYPE_CHECKING above); modules
    # that import it at run time still get the real Literal.
    if name == "Register":
        from typing import Literal

        return Literal["eax", "ebx", "ecx", "edx"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
_U32: Final = 0xFFFF_FFFF

# Leaves whose answer depends on ECX (the subleaf), per the Intel SDM and AMD
# APM. KVM marks the ones it enumerates SIGNIFICANT_INDEX (arch/x86/kvm/
# cpuid.c); dumps from `cpuid -r` or libvirt's <cpudata> carry no flags, so
# readers use this list to restore them. It names some leaves KVM does not
# flag (0x1B, 0x20, 0x23, 0x80000020, 0x80000026), which raw dumps need.
INDEXED_LEAVES: Final = frozenset(
    {
        0x4, 0x7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1B, 0x1D, 0x1E,
        0x1F, 0x20, 0x23, 0x24, 0x8000001D, 0x80000020, 0x80000026,
    }
)


class EntryFlag(IntFlag):
    """kvm_cpuid_entry2.flags (KVM_CPUID_FLAG_*; the kernel spells the first
    one SIGNIFCANT)."""

    NONE = 0
    SIGNIFICANT_INDEX = 1 << 0
    STATEFUL_FUNC = 1 << 1
    STATE_READ_NEXT = 1 << 2


class CpuidEntry:
    """One CPUID answer: inputs (function = EAX, index = ECX), flags, outputs.

    Immutable and validated. A plain slotted class rather than a dataclass:
    `kvmcpuid dump` must start fast, and dataclasses pulls in inspect."""

    __slots__ = ("eax", "ebx", "ecx", "edx", "flags", "function", "index")

    function: int
    index: int
    flags: EntryFlag
    eax: int
    ebx: int
    ecx: int
    edx: int

    def __init__(
        self,
        function: int,
        index: int = 0,
        flags: EntryFlag | int = EntryFlag.NONE,
        eax: int = 0,
        ebx: int = 0,
        ecx: int = 0,
        edx: int = 0,
    ) -> None:
        values = (function, index, eax, ebx, ecx, edx)
        for name, value in zip(("function", "index", *REGISTERS), values, strict=True):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U32:
                raise ValueError(f"{name}={value!r} is not a 32-bit unsigned value")
        if not 0 <= int(flags) <= 7:
            raise ValueError(f"flags={int(flags):#x} has unknown bits")
        setter = object.__setattr__
        setter(self, "function", int(function))
        setter(self, "index", int(index))
        setter(self, "flags", EntryFlag(flags))
        setter(self, "eax", int(eax))
        setter(self, "ebx", int(ebx))
        setter(self, "ecx", int(ecx))
        setter(self, "edx", int(edx))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"CpuidEntry is immutable (tried to set {name})")

    def _tuple(self) -> tuple[int, int, int, int, int, int, int]:
        return (self.function, self.index, int(self.flags), self.eax, self.ebx, self.ecx,
                self.edx)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CpuidEntry):
            return NotImplemented
        return self._tuple() == other._tuple()

    def __hash__(self) -> int:
        return hash(self._tuple())

    def __repr__(self) -> str:
        return (
            f"CpuidEntry({self.function:#x}, {self.index:#x}, {self.flags!r}, "
            f"eax={self.eax:#010x}, ebx={self.ebx:#010x}, ecx={self.ecx:#010x}, "
            f"edx={self.edx:#010x})"
        )

    def __reduce__(self) -> tuple[type[CpuidEntry], tuple[int, ...]]:
        return (CpuidEntry, self._tuple())

    @property
    def key(self) -> tuple[int, int]:
        return (self.function, self.index)

    @property
    def indexed(self) -> bool:
        return EntryFlag.SIGNIFICANT_INDEX in self.flags

    def reg(self, name: Register) -> int:
        value: int = getattr(self, name)
        return value

    def regs(self) -> tuple[int, int, int, int]:
        return (self.eax, self.ebx, self.ecx, self.edx)

    def replace(self, **changes: int) -> CpuidEntry:
        fields = {
            "function": self.function, "index": self.index, "flags": self.flags,
            "eax": self.eax, "ebx": self.ebx, "ecx": self.ecx, "edx": self.edx,
        }
        unknown = set(changes) - set(fields)
        if unknown:
            raise TypeError(f"CpuidEntry has no field(s) {sorted(unknown)}")
        fields.update(changes)
        return CpuidEntry(**fields)


class CpuidTable:
    """An ordered, immutable collection of CpuidEntry with CPUID lookup rules.

    `msrs` rides along: the feature MSRs of the same source (a dump's, or
    KVM's), None when the source carried none (a version-1 dump, `cpuid -1r`
    text, a guest's answer): unknown, which is not "zero". Equality and
    hashing are the CPUID entries only; copies made by replace_entry, masked
    and sorted keep it."""

    __slots__ = ("_any", "_entries", "_exact", "msrs")

    def __init__(
        self, entries: Iterable[CpuidEntry] = (), msrs: FeatureMsrs | None = None
    ) -> None:
        self.msrs = msrs
        self._entries: tuple[CpuidEntry, ...] = tuple(entries)
        # Where lookup finds each answer: (function, index) of the indexed
        # entries, and function of the others -> position in _entries. By
        # position, not entry, so that tables of one layout share these two
        # (from_layout); never changed once made.
        self._exact: dict[tuple[int, int], int] = {}
        self._any: dict[int, int] = {}
        for i, entry in enumerate(self._entries):
            # First entry wins: STATEFUL_FUNC leaves (old leaf 2) repeat a
            # function in read order, and the first is what CPUID answers first.
            # int(): IntFlag's own operators cost ~1 us each, and a
            # 2000-host baseline builds 2000 tables (benchmarks/bench_baseline.py).
            if int(entry.flags) & 1:  # SIGNIFICANT_INDEX
                self._exact.setdefault((entry.function, entry.index), i)
            else:
                self._any.setdefault(entry.function, i)

    def layout(self) -> TableLayout:
        """Where this table's lookup answers sit: from_layout makes a table
        of other entries with the same (function, index, SIGNIFICANT_INDEX)
        at each position without walking them (a fleet's tables share a few
        layouts: cpuid/canonical.py)."""
        return self._exact, self._any

    @classmethod
    def from_layout(cls, entries: Sequence[CpuidEntry], layout: TableLayout,
                    msrs: FeatureMsrs | None = None) -> CpuidTable:  # fmt: skip
        """CpuidTable(entries, msrs), for entries whose (function, index,
        SIGNIFICANT_INDEX) are, position by position, those of the table
        `layout` came from (the caller's promise: nothing is checked)."""
        table = cls.__new__(cls)
        table.msrs = msrs
        table._entries = tuple(entries)
        table._exact, table._any = layout
        return table

    @property
    def entries(self) -> tuple[CpuidEntry, ...]:
        return self._entries

    def __iter__(self) -> Iterator[CpuidEntry]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CpuidTable):
            return NotImplemented
        return self._entries == other._entries

    def __hash__(self) -> int:
        return hash(self._entries)

    def __repr__(self) -> str:
        return f"CpuidTable({len(self._entries)} entries)"

    def lookup(self, leaf: int, subleaf: int = 0) -> CpuidEntry | None:
        """The entry CPUID(leaf, subleaf) answers with, honouring
        SIGNIFICANT_INDEX: an entry without it answers every subleaf."""
        at = self._exact.get((leaf, subleaf))
        if at is None:
            at = self._any.get(leaf)
            if at is None:
                return None
        return self._entries[at]

    def unanswered(self, keys: AbstractSet[tuple[int, int]]) -> set[tuple[int, int]]:
        """The (leaf, subleaf) pairs of `keys` that lookup() finds no entry
        for. In set operations: a baseline asks it of thousands of tables."""
        rest = set(keys).difference(self._exact)
        if rest:
            rest.difference_update(zip(self._any, repeat(0)))
        if rest:
            rest = {k for k in rest if k[0] not in self._any}
        return rest

    def get(self, leaf: int, subleaf: int, reg: Register) -> int:
        """A register's value, 0 where the table has no entry (what KVM gives a
        guest for a leaf it has no entry for, within the max leaf)."""
        entry = self.lookup(leaf, subleaf)
        return 0 if entry is None else entry.reg(reg)

    def stateful(self, leaf: int) -> tuple[CpuidEntry, ...]:
        """All entries of a STATEFUL_FUNC leaf, in the order reads return them."""
        return tuple(
            e for e in self._entries if e.function == leaf and EntryFlag.STATEFUL_FUNC in e.flags
        )

    def keys(self) -> list[tuple[int, int]]:
        return [e.key for e in self._entries]

    def sorted(self) -> CpuidTable:
        """The same entries ordered by (function, index), stable for stateful runs."""
        return CpuidTable(sorted(self._entries, key=lambda e: e.key), self.msrs)

    def with_msrs(self, msrs: FeatureMsrs | None) -> CpuidTable:
        """The same entries carrying `msrs` (None: unknown)."""
        return CpuidTable.from_layout(self._entries, self.layout(), msrs)

    def replace_entry(self, entry: CpuidEntry) -> CpuidTable:
        """A copy with the entry for entry.key replaced (or appended)."""
        out = list(self._entries)
        for i, old in enumerate(out):
            if old.key == entry.key:
                out[i] = entry
                return CpuidTable(out, self.msrs)
        out.append(entry)
        return CpuidTable(out, self.msrs)

    def masked(self, masks: Iterable[tuple[int, int | None, Register, int]]) -> CpuidTable:
        """A copy with the given bits cleared: (leaf, subleaf or None for every
        subleaf, register, mask). For comparing tables whose per-CPU fields
        (APIC IDs) legitimately differ."""
        by_leaf: dict[int, list[tuple[int | None, Register, int]]] = {}
        for leaf, subleaf, reg, mask in masks:
            by_leaf.setdefault(leaf, []).append((subleaf, reg, mask))
        out = []
        for entry in self._entries:
            rules = by_leaf.get(entry.function)
            if rules:
                changes: dict[str, int] = {}
                for subleaf, reg, mask in rules:
                    if subleaf is None or subleaf == entry.index:
                        changes[reg] = changes.get(reg, entry.reg(reg)) & ~mask & _U32
                if changes:
                    entry = entry.replace(**changes)
            out.append(entry)
        return CpuidTable(out, self.msrs)


# The dense ranges whose max leaf (EAX of their first leaf) bounds what a guest
# can read. Intel SDM vol. 2A CPUID: basic leaves 0..leaf 0 EAX; extended
# 0x80000000..0x80000000 EAX, which announces extended leaves only when it reads
# 0x8000xxxx (Linux, arch/x86/kernel/cpu/common.c, checks it the same way).
# Not bounded here: 0x20000000 (Xeon Phi), 0x40000000 (hypervisors: `cpuid`
# probes 0x40000100 beside KVM's 0x40000001), 0x80860000 (Transmeta) and
# 0xC0000000 (Centaur): real dumps carry those whatever leaf 0 says.
BASIC_END: Final = 0x1000_0000
EXTENDED_BASE: Final = 0x8000_0000
EXTENDED_END: Final = 0x8001_0000


def first_problem(
    entries: Sequence[CpuidEntry], where: Callable[[int], str], *, need_vendor: bool = True
) -> tuple[int | None, str] | None:
    """The first reason `entries` are not one unambiguous CPUID table, as
    (position of the entry it is about, or None; reason), or None when they
    are one. `where(i)` names entry i in the reason ("line 7", "entry 3").

    A table is: leaf 0 present (its EAX is the max basic leaf, EBX/EDX/ECX the
    vendor; `need_vendor=False` for KVM_GET_EMULATED_CPUID, whose leaf 0 has no
    vendor); each (leaf, subleaf) at most once, even with identical values (a
    repeat means a file was concatenated or edited; `cpuid -1r` and KVM list
    each once), except a STATEFUL_FUNC run (old leaf 2, read in order); all
    entries of a leaf agree on SIGNIFICANT_INDEX (KVM answers with the first
    entry that matches, ours by subleaf first: a mixed leaf reads differently);
    an entry without SIGNIFICANT_INDEX at subleaf 0 (it answers every
    subleaf); STATE_READ_NEXT only with STATEFUL_FUNC; no entry beyond its
    range's max leaf (no guest can read it: see BASIC_END)."""
    if not entries:
        return None, "no entries: a CPUID table needs at least leaf 0 (vendor and max basic leaf)"
    # Plain ints in the loop: IntFlag operators cost ~1 us each, and a
    # 1000-host baseline reads 80000 entries (benchmarks/bench_baseline.py).
    first: dict[tuple[int, int], int] = {}
    shapes: dict[int, int] = {}  # leaf -> its SIGNIFICANT_INDEX | STATEFUL_FUNC bits
    for i, e in enumerate(entries):
        flags, function, index = int(e.flags), e.function, e.index
        if flags & 4 and not flags & 2:
            return i, f"leaf {function:#x}: STATE_READ_NEXT without STATEFUL_FUNC"
        if index and not flags & 1:
            return i, (f"leaf {function:#x} subleaf {index:#x} without SIGNIFICANT_INDEX "
                       "(flags 0x1): it would answer every subleaf")  # fmt: skip
        shape = shapes.setdefault(function, flags & 3)
        if shape != flags & 3:
            j = next(k for k, o in enumerate(entries) if o.function == function)
            return i, (f"leaf {function:#x}: flags {flags:#x} here, {int(entries[j].flags):#x} "
                       f"at {where(j)}: a leaf is indexed by subleaf or not")  # fmt: skip
        j = first.setdefault((function, index), i)
        if j != i and not flags & 2:
            same = "the same values as" if e.regs() == entries[j].regs() else "other values than"
            return i, (f"leaf {function:#x} subleaf {index:#x} listed again, with {same} at "
                       f"{where(j)}: which one is meant?")  # fmt: skip
    at0 = first.get((0, 0))
    if at0 is None:
        return None, "no leaf 0 (vendor and max basic leaf): not a CPUID table"
    leaf0 = entries[at0]
    if need_vendor and not (leaf0.ebx or leaf0.ecx or leaf0.edx):
        return at0, "leaf 0 has no vendor string (EBX, EDX and ECX are 0)"
    top = leaf0.eax
    at_ext = first.get((EXTENDED_BASE, 0))
    ext = -1 if at_ext is None else entries[at_ext].eax
    ext_top = ext if ext & 0xFFFF_0000 == EXTENDED_BASE else EXTENDED_BASE
    for i, e in enumerate(entries):
        f = e.function
        if top < f < BASIC_END:
            return i, (f"leaf {f:#x} is beyond the max basic leaf {top:#x} "
                       f"(leaf 0 EAX, {where(at0)}): no guest reads it")  # fmt: skip
        if ext_top < f < EXTENDED_END:
            if at_ext is None:
                return i, f"leaf {f:#x} without leaf 0x80000000 (the max extended leaf)"
            if ext_top != ext:
                return i, (f"leaf {f:#x} listed, but leaf 0x80000000 EAX {ext:#x} "
                           f"({where(at_ext)}) announces no extended leaves")  # fmt: skip
            return i, (f"leaf {f:#x} is beyond the max extended leaf {ext:#x} (leaf "
                       f"0x80000000 EAX, {where(at_ext)}): no guest reads it")  # fmt: skip
    return None
