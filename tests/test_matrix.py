"""`kvmcpuid compat --matrix`: every ordered pair of hosts, on the real CPU
dumps of tests/data/cpuid (Intel Atom, Broadwell, Skylake-SP, Ice Lake;
AMD Zen 1, Zen 2, Zen 4).

Independent sources: libvirt's cpu_map (x86_features.xml: each feature's
CPUID leaf, subleaf, register and bit), read here with lxml; the vendor
string of leaf 0 decoded here; and compat() (the single-pair verdict the
command already had) for every cell. What QEMU and KVM add on any host
(QEMU's kvm_arch_get_supported_cpuid: hypervisor, tsc-deadline, arat, the
AMD aliases of leaf 1 EDX in 0x80000001 EDX; KVM's x2apic and
arch-capabilities emulation) and the
bits that follow guest state (OSXSAVE, OSPKE, HTT) are written out here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from lxml import etree, html

from kvmcpuid_virt.analysis.compat import Host, compat
from kvmcpuid_virt.analysis.matrix import fits_pair, matrix
from kvmcpuid_virt.analysis.matrix_report import matrix_html, matrix_json
from kvmcpuid_virt.cpuid.formats import Dump
from kvmcpuid_virt.cpuid.table import CpuidTable
from kvmcpuid_virt.fsutil import load_dump
from tests.conftest import DATA, REPO

CPU_MAP = Path("/usr/share/libvirt/cpu_map")
Bit = tuple[int, int, str, int]
# Added by QEMU or KVM whatever the CPU (see the module docstring).
ADDED_ANYWHERE = frozenset({"hypervisor", "tsc-deadline", "arat", "x2apic", "arch-capabilities"})
# Follow CR4, XCR0 or the topology, not the host (Intel SDM vol. 2A CPUID).
GUEST_STATE = frozenset({"osxsave", "ospke", "ht"})
# 0x80000001 EDX bits AMD mirrors from leaf 1 EDX (AMD APM vol. 3, CPUID
# Fn8000_0001_EDX): bits 0-9, 12-17, 23, 24.
AMD_ALIAS_BITS = frozenset([*range(10), *range(12, 18), 23, 24])


@pytest.fixture(scope="module")
def cpu_map_bits() -> dict[str, Bit]:
    path = CPU_MAP / "x86_features.xml"
    if not path.exists():
        pytest.skip(f"libvirt's cpu_map is not installed ({CPU_MAP})")
    out: dict[str, Bit] = {}
    for f in etree.parse(str(path)).getroot().iter("feature"):
        c = f.find("cpuid")
        if c is None:
            continue
        for reg in ("eax", "ebx", "ecx", "edx"):
            value = int(c.get(reg, "0"), 16)
            if value:
                out[f.get("name", "")] = (int(c.get("eax_in", "0"), 16),
                                          int(c.get("ecx_in", "0"), 16), reg,
                                          value.bit_length() - 1)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def real() -> list[Dump]:
    return [load_dump(str(p)) for p in sorted(DATA.glob("*.xml"))]


def _has(table: CpuidTable, bit: Bit) -> bool:
    """The bit as a guest reads it: 0 beyond the table's max leaf."""
    leaf, sub, reg, b = bit
    base = leaf & 0xF000_0000  # the range: 0, 0x40000000, 0x80000000, 0xC0000000
    top = table.lookup(base, 0)
    if top is None or leaf > top.eax:
        return False
    return bool(table.get(leaf, sub, reg) >> b & 1)  # type: ignore[arg-type]


def _vendor(table: CpuidTable) -> bytes:
    e = table.lookup(0, 0)
    assert e is not None
    return b"".join(v.to_bytes(4, "little") for v in (e.ebx, e.edx, e.ecx))


def _missing(a: CpuidTable, b: CpuidTable, bits: dict[str, Bit]) -> list[str]:
    """cpu_map features A has that B lacks and that nothing adds on B."""
    out = []
    for name, bit in bits.items():
        if name in ADDED_ANYWHERE or name in GUEST_STATE or not _has(a, bit) or _has(b, bit):
            continue
        leaf, _, reg, b_ = bit
        if leaf == 0x8000_0001 and reg == "edx" and b_ in AMD_ALIAS_BITS and \
                b.get(1, 0, "edx") >> b_ & 1:  # fmt: skip
            continue  # QEMU copies it from leaf 1 EDX on B
        out.append(name)
    return out


def _cleared(d: Dump, bit: Bit, tag: str) -> Dump:
    leaf, sub, reg, b = bit
    e = d.table.lookup(leaf, sub)
    assert e is not None
    table = d.table.replace_entry(e.replace(**{reg: e.reg(reg) & ~(1 << b)}))  # type: ignore[arg-type]
    return Dump(table, d.kind, d.host, f"{d.source}-{tag}")


def test_never_fits_where_a_cpu_map_feature_is_missing(
    real: list[Dump], cpu_map_bits: dict[str, Bit]
) -> None:
    m = matrix(real)
    assert len(m.groups) == len(real)  # seven different CPUs
    fitting = 0
    for g, a in enumerate(real):
        for h, b in enumerate(real):
            if m.fits(g, h):
                fitting += 1
                assert not _missing(a.table, b.table, cpu_map_bits), (a.source, b.source)
                assert _vendor(a.table) == _vendor(b.table)
    # Not vacuous: the diagonal, and older on newer of one vendor (Zen 1 on
    # Zen 4; Broadwell on Ice Lake) fit.
    assert fitting > len(real)
    names = [d.source for d in real]
    zen1 = next(i for i, n in enumerate(names) if "EPYC-7601" in n)
    zen4 = next(i for i, n in enumerate(names) if "EPYC-9334" in n)
    assert m.fits(zen1, zen4) and not m.fits(zen4, zen1)


def test_a_host_without_one_feature_takes_no_guest_that_has_it(
    real: list[Dump], cpu_map_bits: dict[str, Bit]
) -> None:
    # For each real CPU, copies with one cpu_map feature cleared (every
    # 9th feature the CPU has): the copy takes the original's guest never,
    # the original takes the copy's guest always.
    for d in real:
        present = [n for n, bit in sorted(cpu_map_bits.items()) if _has(d.table, bit)
                   and n not in ADDED_ANYWHERE and n not in GUEST_STATE]  # fmt: skip
        names = present[::9]
        copies = [_cleared(d, cpu_map_bits[n], n) for n in names]
        m = matrix([d, *copies])
        group = m.group_of()
        for i, name in enumerate(names, start=1):
            leaf, _, reg, b = cpu_map_bits[name]
            if leaf == 0x8000_0001 and reg == "edx" and b in AMD_ALIAS_BITS and \
                    d.table.get(1, 0, "edx") >> b & 1:  # fmt: skip
                continue  # QEMU gives it back from leaf 1 EDX
            assert not m.fits(group[0], group[i]), (d.source, name)
            assert m.fits(group[i], group[0]), (d.source, name)
            reasons = {r.field for r in m.verdict(group[0], group[i]).reasons}
            assert reasons, (d.source, name)


def test_every_cell_is_compats_verdict(real: list[Dump]) -> None:
    # Both vendors, several generations, and copies that differ in one field
    # (a smaller max basic leaf, fewer physical address bits).
    extra = []
    for d in real:
        e = d.table.lookup(0x8000_0008, 0)
        if e is not None:
            t = d.table.replace_entry(e.replace(eax=e.eax & ~0xFF | ((e.eax & 0xFF) - 3)))
            extra.append(Dump(t, d.kind, d.host, d.source + "-phys"))
    hosts = [*real, *extra]
    m = matrix(hosts)
    for g, ga in enumerate(m.groups):
        for h, hb in enumerate(m.groups):
            v = compat(ga.side.guest, Host(hb.side.host))
            assert m.fits(g, h) == v.fits == fits_pair(ga.side, hb.side), (
                ga.side.host.source, hb.side.host.source)
    for g in range(len(m.groups)):
        assert m.fits(g, g)


def test_identical_hosts_are_one_group(real: list[Dump]) -> None:
    a, b = real[0], real[1]
    copies = [Dump(a.table, a.kind, a.host, f"a{i}") for i in range(5)]
    m = matrix([*copies, Dump(b.table, b.kind, b.host, "b")])
    assert len(m.groups) == 2 and len(m.hosts) == 6
    assert m.groups[0].members == (0, 1, 2, 3, 4)
    # Five hosts of group 0 fit each other (25 pairs) and b fits itself.
    expected = 25 + 1 + 5 * m.fits(0, 1) + 5 * m.fits(1, 0)
    assert m.fitting_pairs() == expected


def test_json_schema(real: list[Dump]) -> None:
    m = matrix(real[:4])
    doc = json.loads(matrix_json(m))
    assert doc["format"] == "kvmcpuid-compat-matrix" and doc["version"] == 1
    assert [h["name"] for h in doc["hosts"]] == [d.source for d in real[:4]]
    n = len(doc["groups"])
    assert {h["group"] for h in doc["hosts"]} == set(range(n))
    assert len(doc["cells"]) == n * n
    for cell in doc["cells"]:
        assert set(cell) == {"guest", "host", "fits", "missing", "reasons", "unjudged"}
        assert isinstance(cell["fits"], bool) and isinstance(cell["unjudged"], list)
        assert not cell["unjudged"] or cell["fits"]
        assert cell["fits"] == m.fits(cell["guest"], cell["host"])
        assert bool(cell["reasons"]) == (not cell["fits"]) == bool(cell["missing"])
        for r in cell["reasons"]:
            assert set(r) == {"field", "where", "rule", "layer", "guest", "host", "detail"}
    assert doc["summary"] == {"hosts": 4, "groups": n, "pairs": 16,
                              "fitting_pairs": m.fitting_pairs()}  # fmt: skip


def _xpath(el: Any, path: str) -> list[Any]:
    found = el.xpath(path)
    assert isinstance(found, list)
    return found


def test_html_page_cells_and_classes(real: list[Dump]) -> None:
    m = matrix(real)
    page = html.fromstring(matrix_html(m))
    # Self-contained: no script, stylesheet link, image or frame.
    assert not _xpath(page, "//script | //link | //img | //iframe | //*[@src]")
    rows = _xpath(page, "//table[@class='matrix']/tr")
    n = len(m.groups)
    assert len(rows) == n + 1
    # Headers name each file without its directory; the title has it all.
    names = [Path(h).name for h in m.hosts]
    cols = _xpath(rows[0], "th[@class='col']")
    assert [th.text for th in cols] == names
    assert tuple(th.get("title") for th in cols) == m.hosts
    for g, row in enumerate(rows[1:]):
        assert _xpath(row, "th[@class='row']")[0].text == names[g]
        cells = _xpath(row, "td")
        assert len(cells) == n
        for h, td in enumerate(cells):
            assert td.get("class") == ("fits" if m.fits(g, h) else "does-not-fit")
            if not m.fits(g, h):
                # The hover names what is missing; the link leads to the reasons.
                assert td.get("title") == m.verdict(g, h).missing()
                target = str(_xpath(td, "a/@href")[0]).lstrip("#")
                item = _xpath(page, f"//li[@id='{target}']")[0]
                assert len(_xpath(item, "ul/li")) == len(m.verdict(g, h).reasons)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmcpuid_virt.cli", "compat", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)  # fmt: skip


def test_cli_matrix_formats_and_exit_status(tmp_path: Path) -> None:
    dumps = [str(p) for p in sorted(DATA.glob("*.xml"))]
    r = _cli("--matrix", *dumps)
    assert r.returncode == 1, r.stderr  # some pairs do not fit
    assert r.stderr == ""
    assert f"{len(dumps)} hosts, {len(dumps)} distinct" in r.stdout
    out = tmp_path / "m.html"
    r = _cli("--matrix", *dumps, "--format", "html", "-o", str(out))
    assert r.returncode == 1 and r.stdout == "" and r.stderr == ""
    assert html.fromstring(out.read_text()).xpath("//td[@class='fits']")
    same = [dumps[2], dumps[2]]
    r = _cli("--matrix", *same, "--format", "json")
    assert r.returncode == 0, r.stderr  # one host twice: everything fits
    assert json.loads(r.stdout)["summary"]["fitting_pairs"] == 4


def test_cli_bad_input_is_one_line_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "kvmcpuid-dump", "version": 1, "entries": [}')
    dump = str(next(DATA.glob("*.xml")))
    for args in (["--matrix", dump, str(bad)], ["--matrix", dump],
                 [dump, "--format", "html"], ["--matrix", dump, dump, "--host", dump],
                 ["--matrix", dump, str(tmp_path / "missing.json")]):  # fmt: skip
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stdout == ""
    assert not list(tmp_path.glob(".*"))  # nothing half-written


def test_cli_which_hosts_take_a_guest() -> None:
    dumps = sorted(DATA.glob("*.xml"))
    zen1 = next(str(p) for p in dumps if "EPYC-7601" in p.name)
    zen4 = next(str(p) for p in dumps if "EPYC-9334" in p.name)
    atom = next(str(p) for p in dumps if "Atom" in p.name)
    # The guest: what a Zen 1 host's guest sees, as a dump of it.
    r = _cli(zen1, zen4, atom, "--format", "json")
    assert r.returncode == 1, r.stderr  # the Atom cannot take it
    doc = json.loads(r.stdout)
    assert [v["host"] for v in doc["hosts"]] == [zen4, atom]
    assert doc["fits"] == [zen4]
    r = _cli(zen1, zen4, zen1)
    assert r.returncode == 0, r.stderr
    assert "2 of 2 hosts can take it" in r.stdout


def test_the_matrix_and_the_fast_reader_are_pure(data_dir: Path) -> None:
    # tests/test_pure_core.py's child under its audit hook, with the matrix,
    # its three renderings and cpuid.canonical's reader run there as well.
    from tests.conftest import RECORDING
    from tests.test_pure_core import CHILD

    marker = 'print(json.dumps({"seen": seen'
    assert marker in CHILD
    extra = ("from kvmcpuid_virt.analysis import matrix as mx, matrix_report as mr\n"
             "from kvmcpuid_virt.cpuid import canonical\n"
             "m = mx.matrix(tables)\n"
             "mr.matrix_html(m), mr.matrix_json(m), mr.matrix_table(m)\n"
             "assert all(canonical.loads(formats.dumps(d), 'c').table == d.table "
             "for d in tables)\n")  # fmt: skip
    child = CHILD.replace(marker, extra + marker)
    dumps = sorted(str(p) for p in data_dir.glob("*.xml"))
    r = subprocess.run([sys.executable, "-c", child, str(RECORDING), *dumps],
                       capture_output=True, text=True, cwd=REPO, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["seen"] == []
