"""compat and the matrix judge feature MSRs (IA32_ARCH_CAPABILITIES bits
such as mds-no), on the real dumps of tests/data/cpuid that carry libvirt's
`<msr>` element and on those that do not.

Independent sources: the Intel SDM's bit positions of IA32_ARCH_CAPABILITIES
(MSR 10AH: RDCL_NO 0, IBRS_ALL 1, SKIP_L1DFL_VMENTRY 3, MDS_NO 5, TAA_NO 8),
and each dump's raw `<msr>` value, read here with lxml, for whether the host
has the bit at all.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lxml import etree

from kvmcpuid_virt.analysis.compat import Host, compat
from kvmcpuid_virt.analysis.matrix import fits_pair, matrix
from kvmcpuid_virt.cli import main
from kvmcpuid_virt.cpuid.formats import Dump
from kvmcpuid_virt.fsutil import load_dump
from tests.conftest import DATA

ARCH_CAPABILITIES = 0x10A
MDS_NO = 5  # SDM: IA32_ARCH_CAPABILITIES[5] MDS_NO
ICE_LAKE = DATA / "x86_64-cpuid-Ice-Lake-Server.xml"  # 10AH = 0xb: no MDS_NO
ATOM = DATA / "x86_64-cpuid-Atom-P5362.xml"  # 10AH has MDS_NO
SKYLAKE = DATA / "x86_64-cpuid-Xeon-Gold-6148.xml"  # no <msr>: unknown

DOMAIN = """<domain type='kvm'><name>g</name><memory>65536</memory>
<cpu mode='host-passthrough'><feature policy='require' name='mds-no'/></cpu></domain>
"""


def _raw_msr(path: Path, index: int) -> int | None:
    """The dump's own <msr> value (edx:eax), read with lxml."""
    for m in etree.parse(str(path)).getroot().iter("msr"):
        if int(m.get("index", "0"), 16) == index:
            return int(m.get("edx", "0"), 16) << 32 | int(m.get("eax", "0"), 16)
    return None


@pytest.fixture
def domain(tmp_path: Path) -> Path:
    p = tmp_path / "dom.xml"
    p.write_text(DOMAIN)
    return p


def test_the_dumps_say_what_the_tests_assume() -> None:
    ice, atom = _raw_msr(ICE_LAKE, ARCH_CAPABILITIES), _raw_msr(ATOM, ARCH_CAPABILITIES)
    assert ice is not None and not ice >> MDS_NO & 1
    assert atom is not None and atom >> MDS_NO & 1
    assert not any(True for _ in etree.parse(str(SKYLAKE)).getroot().iter("msr"))


def test_a_domain_requiring_mds_no_does_not_fit_a_host_without_it(
    domain: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["compat", str(domain), "--host", str(ICE_LAKE), "--format", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert not doc["fits"]
    [reason] = [r for r in doc["reasons"] if r["field"] == "mds-no"]
    assert reason["where"] == f"MSR {ARCH_CAPABILITIES:X}H[{MDS_NO}]"
    assert "mds-no" in reason["detail"] and "does not offer" in reason["detail"]
    assert {"register": f"MSR {ARCH_CAPABILITIES:X}H", "rule": "subset", "fits": False,
            "reasons": [reason]} in doc["registers"]  # fmt: skip
    assert main(["compat", str(domain), "--host", str(ICE_LAKE)]) == 1
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert "does not fit" in last and "mds-no" in last


def test_a_host_with_mds_no_takes_it(domain: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compat", str(domain), "--host", str(ATOM), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["fits"] and doc["unjudged"] == []
    assert any(r["register"] == "MSR 10AH" and r["fits"] for r in doc["registers"])


def test_unknown_feature_msrs_are_a_note_not_a_misfit(
    domain: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["compat", str(domain), "--host", str(SKYLAKE), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["fits"] and doc["unjudged"] == ["mds-no"]
    assert not any(r["field"] == "mds-no" for r in doc["reasons"])
    assert any("carries no feature MSRs" in n and "mds-no" in n for n in doc["notes"])
    assert main(["compat", str(domain), "--host", str(SKYLAKE)]) == 0
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert "fits as far as known" in last and "mds-no not judged" in last


def _with_msr(path: Path, value: int | None, tag: str) -> Dump:
    """The dump with IA32_ARCH_CAPABILITIES set to `value` (None: no <msr>)."""
    root = etree.parse(str(path)).getroot()
    for m in list(root.iter("msr")):
        if int(m.get("index", "0"), 16) == ARCH_CAPABILITIES:
            if value is None:
                m.getparent().remove(m)  # type: ignore[union-attr]
            else:
                m.set("eax", f"{value & 0xFFFF_FFFF:#010x}")
    d = load_dump(str(path))
    from kvmcpuid_virt.cpuid.formats import loads

    text = etree.tostring(root, encoding="unicode")
    return Dump(loads(text, f"{d.source}-{tag}").table, d.kind, d.host, f"{d.source}-{tag}")


def test_the_matrix_tells_hosts_apart_by_one_msr_bit() -> None:
    raw = _raw_msr(ICE_LAKE, ARCH_CAPABILITIES)
    assert raw is not None
    plain = load_dump(str(ICE_LAKE))
    mds = _with_msr(ICE_LAKE, raw | 1 << MDS_NO, "mds")
    unknown = _with_msr(ICE_LAKE, None, "unknown")
    assert mds.table.msrs is not None and unknown.table.msrs is None
    m = matrix([plain, mds, unknown])
    assert len(m.groups) == 3  # the CPUID is the same; one MSR bit (or its absence) differs
    p, x, u = m.group_of()
    assert not m.fits(x, p) and m.fits(p, x)
    assert [r.field for r in m.verdict(x, p).reasons] == ["mds-no"]
    assert m.verdict(x, p).reasons[0].where == f"MSR 10AH[{MDS_NO}]"
    # Unknown is not missing: it takes the guest, compat saying it is unjudged.
    assert m.fits(x, u) and "mds-no" in m.verdict(x, u).unjudged
    # A host with unknown MSRs offers a guest none (nothing to ask for).
    assert m.fits(u, p)
    for g, ga in enumerate(m.groups):
        for h, hb in enumerate(m.groups):
            v = compat(ga.side.guest, Host(hb.side.host))
            assert m.fits(g, h) == v.fits == fits_pair(ga.side, hb.side)


def test_the_matrix_on_the_real_dumps_with_msrs() -> None:
    # Every real dump, each with a copy whose IA32_ARCH_CAPABILITIES lacks
    # its lowest set bit: the copy never takes the original's guest.
    real = [load_dump(str(p)) for p in sorted(DATA.glob("*.xml"))]
    copies = []
    for p in sorted(DATA.glob("*.xml")):
        raw = _raw_msr(p, ARCH_CAPABILITIES)
        if raw:
            copies.append((p, _with_msr(p, raw & (raw - 1), "less")))
    assert len(copies) >= 3
    tested = 0
    for path, less in copies:
        orig = load_dump(str(path))
        m = matrix([orig, less])
        o, c = m.group_of()
        raw = _raw_msr(path, ARCH_CAPABILITIES) or 0
        bit = (raw & -raw).bit_length() - 1
        where = f"MSR 10AH[{bit}]"
        # CPUID.07H.0:EDX[29] enumerates the MSR; KVM gives it on AMD too
        # (arch/x86/kvm/cpuid.c emulates ARCH_CAPABILITIES), so every
        # dump's guest reads it, raw AMD dumps without the bit included.
        tested += 1
        v = m.verdict(o, c)
        assert not m.fits(o, c) and [r.where for r in v.reasons] == [where], path
        assert m.fits(c, o), path
    assert tested >= 4  # Atom, Ice Lake, Zen 2, Zen 4
    m = matrix([*real, *(c for _, c in copies)])
    for g, ga in enumerate(m.groups):
        for h, hb in enumerate(m.groups):
            v = compat(ga.side.guest, Host(hb.side.host))
            assert m.fits(g, h) == v.fits == fits_pair(ga.side, hb.side)


# SDM bit positions of IA32_ARCH_CAPABILITIES, by QEMU's property names.
SDM_BITS = {"rdctl-no": 0, "skip-l1dfl-vmentry": 3, "mds-no": 5, "taa-no": 8}


@pytest.mark.kvm  # this machine's /dev/kvm and a C program on it
@pytest.mark.parametrize("name", sorted(SDM_BITS))
def test_this_host_as_its_vcpus_accept(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # This machine's /dev/kvm, held to a C program's own KVM_GET_MSRS and
    # KVM_SET_MSRS (tests/kvm_msr_c.py): not offered, refused by a vCPU,
    # or given.
    from tests.kvm_msr_c import c_msr_reading

    c = c_msr_reading()
    bit = SDM_BITS[name]
    value = c.values.get(ARCH_CAPABILITIES)
    guest = tmp_path / "g.cpu"
    guest.write_text(f"-cpu host,{name}=on\n")
    main(["compat", str(guest), "--format", "json"])
    doc = json.loads(capsys.readouterr().out)
    reasons = [r for r in doc["reasons"] if r["field"] == name]
    if value is None or not value >> bit & 1:
        assert [r["where"] for r in reasons] == [f"MSR 10AH[{bit}]"]
        assert "does not offer" in reasons[0]["detail"]
    elif 1 in (c.set_result.get(ARCH_CAPABILITIES), c.bit_result.get((ARCH_CAPABILITIES, bit))):
        assert reasons == []
    else:
        assert [r["where"] for r in reasons] == [f"MSR 10AH[{bit}]"]
        assert "refuses" in reasons[0]["detail"]


def test_the_matrix_reports_say_which_fitting_cells_are_unjudged(tmp_path: Path) -> None:
    from kvmcpuid_virt.analysis.matrix_report import matrix_html, matrix_json, matrix_table

    raw = _raw_msr(ICE_LAKE, ARCH_CAPABILITIES)
    assert raw is not None
    mds = _with_msr(ICE_LAKE, raw | 1 << MDS_NO, "mds")
    unknown = _with_msr(ICE_LAKE, None, "unknown")
    m = matrix([mds, unknown])
    x, u = m.group_of()
    assert m.unjudged(x, u) and "mds-no" in m.unjudged(x, u)
    assert m.unjudged(x, u) == list(m.verdict(x, u).unjudged)  # compat's own list
    assert m.unjudged(u, x) == [] and m.unjudged(x, x) == []
    cells = {(c["guest"], c["host"]): c for c in json.loads(matrix_json(m))["cells"]}
    assert cells[(x, u)]["fits"] and "mds-no" in cells[(x, u)]["unjudged"]
    assert cells[(u, x)]["unjudged"] == []
    assert f"{x + 1} on {u + 1}: ok as far as known" in matrix_table(m)
    page = etree.fromstring(matrix_html(m).encode(), etree.HTMLParser())
    titles = [str(td.get("title", "")) for td in page.iter("td")]
    titles = [t for t in titles if "as far as known" in t]
    assert len(titles) == 1 and "mds-no" in titles[0]


def test_which_hosts_take_a_domain_requiring_mds_no(
    domain: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hosts = [str(ICE_LAKE), str(ATOM), str(SKYLAKE)]
    assert main(["compat", str(domain), *hosts]) == 1
    lines = capsys.readouterr().out.splitlines()
    by_host = {ln.split()[0]: ln for ln in lines if ln.split() and ln.split()[0] in hosts}
    assert "does not fit" in by_host[str(ICE_LAKE)] and "mds-no" in by_host[str(ICE_LAKE)]
    assert by_host[str(ATOM)].rstrip().endswith("fits")
    assert "fits as far as known (feature MSRs unknown: mds-no)" in by_host[str(SKYLAKE)]
    assert main(["compat", str(domain), *hosts, "--format", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["fits"] == [str(ATOM), str(SKYLAKE)]
    assert [h["unjudged"] for h in doc["hosts"]] == [[], [], ["mds-no"]]


def _host_model_features(uri: str) -> set[str]:
    """The real daemon's host-model required features, asked here."""
    import libvirt

    conn = libvirt.open(uri)
    try:
        caps = etree.fromstring(conn.getDomainCapabilities(None, None, None, "kvm", 0).encode())
    finally:
        conn.close()
    path = "cpu/mode[@name='host-model']/feature[@policy='require']"
    return {str(f.get("name")) for f in caps.iterfind(path)}


@pytest.mark.parametrize("name", sorted(SDM_BITS))
def test_connect_judges_the_host_models_msr_features(
    name: str, libvirt_conn_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A guest asking for one IA32_ARCH_CAPABILITIES bit fits the real
    # daemon's host-model exactly when libvirt's host-model requires it
    # (libvirt and QEMU spell these four the same).
    guest = tmp_path / "g.cpu"
    guest.write_text(f"-cpu host,{name}=on\n")
    rc = main(["compat", str(guest), "--connect", libvirt_conn_uri, "--format", "json"])
    doc = json.loads(capsys.readouterr().out)
    reasons = [r for r in doc["reasons"] if r["field"] == name]
    if name in _host_model_features(libvirt_conn_uri):
        assert reasons == [] and doc["unjudged"] == []
    else:
        assert rc == 1 and [r["where"] for r in reasons] == [f"MSR 10AH[{SDM_BITS[name]}]"]


# SDM vol. 4, IA32_ARCH_CAPABILITIES: the bits QEMU's Icelake-Server-v3 sets.
ICX_BITS = {"rdctl-no": 0, "ibrs-all": 1, "skip-l1dfl-vmentry": 3, "mds-no": 5,
            "pschange-mc-no": 6, "taa-no": 8}  # fmt: skip


def test_a_named_models_msr_features_are_asked_for() -> None:
    # QEMU's own expansion of Icelake-Server-v3 (its QMP answer, recorded in
    # tests/data/toolfacts-qemu-7.2.json) turns these MSR features on; the
    # ones whose SDM bit Ice Lake's recorded IA32_ARCH_CAPABILITIES lacks
    # are missing, named at that bit, and no other.
    from kvmcpuid_virt.analysis.compat import judge_text
    from tests.conftest import FACTS

    wants = set(FACTS.model("Icelake-Server-v3").features) & set(ICX_BITS)
    assert wants == set(ICX_BITS)
    raw = _raw_msr(ICE_LAKE, ARCH_CAPABILITIES)
    assert raw is not None
    lacking = {(n, f"MSR 10AH[{b}]") for n, b in ICX_BITS.items() if not raw >> b & 1}
    assert lacking  # Ice Lake's 0xb: bits 0, 1, 3 only
    xml = ("<cpu mode='custom' match='exact'><model fallback='forbid'>Icelake-Server-v3"
           "</model></cpu>")  # fmt: skip
    v = judge_text(xml, "icx.xml", Host(load_dump(str(ICE_LAKE))), FACTS)
    assert {(r.field, r.where) for r in v.reasons if r.where.startswith("MSR ")} == lacking
    assert "MSR 10AH" in v.checked
    # On a dump without <msr> they are unjudged, none missing.
    v = judge_text(xml, "icx.xml", Host(load_dump(str(SKYLAKE))), FACTS)
    assert not any(r.where.startswith("MSR ") for r in v.reasons)
    assert set(ICX_BITS) <= set(v.unjudged)


def _cpuid_reg(path: Path, leaf: int, sub: int, reg: str) -> int:
    """A <cpudata> register, read with lxml."""
    for c in etree.parse(str(path)).getroot().iter("cpuid"):
        if int(c.get("eax_in", "0"), 16) == leaf and int(c.get("ecx_in", "0"), 16) == sub:
            return int(c.get(reg, "0"), 16)
    return 0


def test_a_guest_reads_only_the_msrs_its_cpuid_enumerates() -> None:
    # Zen 2's raw <cpudata> records IA32_ARCH_CAPABILITIES but its CPUID
    # lacks 7.0 EDX[29] (SDM: the bit that enumerates the MSR): a guest
    # that sees this CPUID never reads the MSR, so a host without its bits
    # takes it; with EDX[29] set, the guest reads them and that host does not.
    ryzen = DATA / "x86_64-cpuid-Ryzen-9-3900X-12-Core.xml"
    raw = _raw_msr(ryzen, ARCH_CAPABILITIES)
    assert raw and not _cpuid_reg(ryzen, 7, 0, "edx") >> 29 & 1
    d = load_dump(str(ryzen))
    guest = Dump(d.table, "guest", d.host, "zen2-guest")
    host = Host(_with_msr(ryzen, 0, "none"))
    assert not any(r.where.startswith("MSR ") for r in compat(guest, host).reasons)
    e = d.table.lookup(7, 0)
    assert e is not None
    seen = Dump(d.table.replace_entry(e.replace(edx=e.edx | 1 << 29)), "guest", d.host, "zen2+")
    got = {r.where for r in compat(seen, host).reasons if r.where.startswith("MSR ")}
    assert got == {f"MSR 10AH[{b}]" for b in range(64) if raw >> b & 1}
