"""CpuidTable.unanswered (the baseline's "which of the template's leaves does
this host lack", in set operations) against lookup() asked key by key, on the
real dumps and on tables that bend the rules (an entry without
SIGNIFICANT_INDEX at a subleaf, a stateful run, leaves of both kinds)."""

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
