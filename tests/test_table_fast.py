"""CpuidTable.unanswered (the baseline's "which of the template's leaves does
this host lack", in set operations) against lookup() asked key by key, on the
real dumps and on tables that bend the rules (an entry without
SIGNIFICANT_INDEX at a subleaf, a stateful run, leaves of both kinds); and
CpuidTable.from_layout against CpuidTable(entries)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmcpuid_virt.cpuid.table import CpuidEntry, CpuidTable, EntryFlag
from kvmcpuid_virt.fsutil import load_dump
from tests.conftest import DATA

REAL = [load_dump(str(p)).table for p in sorted(DATA.glob("*.xml"))]


def _by_lookup(table: CpuidTable, keys: set[tuple[int, int]]) -> set[tuple[int, int]]:
    return {k for k in keys if table.lookup(*k) is None}


def test_real_tables_against_each_other() -> None:
    assert len(REAL) >= 2
    for a in REAL:
        wanted = set(a.keys()) | {(0x7, 5), (0x4, 9), (0xD, 63), (0x8000_0001, 1)}
        for b in REAL:
            assert b.unanswered(wanted) == _by_lookup(b, wanted)
        assert a.unanswered(set(a.keys())) == set()


_KEYS = st.tuples(st.sampled_from([0, 1, 2, 4, 7, 0xD, 0x8000_0000]), st.integers(0, 3))


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(st.lists(st.tuples(_KEYS, st.sampled_from([0, 1, 2, 3])), max_size=12),
       st.sets(_KEYS, max_size=12))  # fmt: skip
def test_any_table_against_lookup(rows: list[tuple[tuple[int, int], int]],
                                  wanted: set[tuple[int, int]]) -> None:  # fmt: skip
    table = CpuidTable(CpuidEntry(f, i, EntryFlag(flags)) for (f, i), flags in rows)
    assert table.unanswered(wanted) == _by_lookup(table, wanted)
    assert table.unanswered(frozenset(wanted)) == _by_lookup(table, wanted)


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(st.lists(st.tuples(_KEYS, st.sampled_from([0, 1, 2, 3]), st.integers(0, 3)),
                max_size=12))  # fmt: skip
def test_a_table_from_a_layout_looks_up_as_one_built_entry_by_entry(
    rows: list[tuple[tuple[int, int], int, int]],
) -> None:
    # Two tables with the same (leaf, subleaf, flags) at each position and
    # other values: the second built from the first's layout.
    first = CpuidTable(CpuidEntry(f, i, EntryFlag(fl)) for (f, i), fl, _ in rows)
    other = [CpuidEntry(f, i, EntryFlag(fl), eax=v, ebx=n) for n, ((f, i), fl, v) in
             enumerate(rows)]  # fmt: skip
    fast = CpuidTable.from_layout(other, first.layout())
    slow = CpuidTable(other)
    assert fast == slow and fast.entries == slow.entries
    keys = {(f, i) for (f, i), _, _ in rows} | {(f, 5) for (f, _), _, _ in rows} | {(3, 0)}
    for k in keys:
        assert fast.lookup(*k) is slow.lookup(*k)


def test_real_tables_from_their_own_layout() -> None:
    for t in REAL:
        again = CpuidTable.from_layout(t.entries, t.layout(), t.msrs)
        asked = t.keys()
        assert [again.lookup(*k) for k in asked] == [t.lookup(*k) for k in asked]
