"""libvirt adapter: the <cpu> element, domain patching that changes nothing
else, parsing, markup-injection refusal, RelaxNG validity, and libvirt's own
verdict (compareHypervisorCPU, define, start) on this host."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import pytest
from lxml import etree

from kvmcpuid_virt.adapters import libvirt as lv
from kvmcpuid_virt.analysis.given import applied
from kvmcpuid_virt.config import build as select
from kvmcpuid_virt.config.cpuconfig import CpuConfig
from kvmcpuid_virt.cpuid import fields
from kvmcpuid_virt.cpuid.features import registry
from kvmcpuid_virt.cpuid.msr_features import msr_registry
from kvmcpuid_virt.errors import InputError
from kvmcpuid_virt.fsutil import load_dump
from kvmcpuid_virt.kvm import Kvm
from kvmcpuid_virt.probe.libvirt import domain_log
from kvmcpuid_virt.toolfacts.facts import ToolFacts
from tests.conftest import FACTS, cpu_dump_paths
from tests.test_policy import table

SCHEMA = Path("/usr/share/libvirt/schemas/domain.rng")
# CpuConfig.source of a table read from /dev/kvm here (cli/options.read_table):
# only such a `host` config is host-passthrough.
LIVE = "/dev/kvm"

DOMAIN = """<?xml version="1.0"?>
<!-- a comment with <cpu mode='host-model'/> inside -->
<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>NAME</name>
  <memory unit='MiB'>64</memory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
  </os>
  <cpu mode='host-passthrough' check='none'>
    <feature policy="disable" name='svm'/>
  </cpu>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
  </devices>
</domain>
"""


def _named() -> CpuConfig:
    """A configuration of a named cpu_map model (the newest the test table runs)."""
    c = select.build(table(), select.Policy(model="auto"), facts=FACTS)
    assert c.model != "host" and c.model in FACTS.cpu_map
    return c


def _patch(domain: str, c: CpuConfig | None = None) -> str:
    c = _named() if c is None else c
    return lv.patch_domain(domain, c, lv.base_model(c, FACTS))


def _domain(cpu_xml: str, name: str = "t") -> str:
    return DOMAIN.replace("NAME", name).replace(
        DOMAIN[DOMAIN.index("  <cpu ") : DOMAIN.index("  <devices>")], "  " + cpu_xml + "\n"
    )


def test_render_shape() -> None:
    c = _named()
    cpu = etree.fromstring(lv.render(c, lv.base_model(c, FACTS)))
    assert (cpu.get("mode"), cpu.get("match"), cpu.get("check")) == ("custom", "exact", "full")
    model = cpu.find("model")
    assert model is not None and model.get("fallback") == "forbid"
    assert model.text == c.model  # the configured model itself, so its identity too
    feats = {f.get("name"): f.get("policy") for f in cpu.findall("feature")}
    assert set(feats.values()) == {"require", "disable"}
    assert feats["sse2"] == "require" and feats["avx"] == "disable"
    assert feats["lahf_lm"] in ("require", "disable")  # cpu_map spelling, not lahf-lm
    assert "lahf-lm" not in feats
    # PV bits are reported, never put in <cpu>.
    assert not any(n and n.startswith("kvm") for n in feats)
    assert {u.name for u in lv.unexpressible(c)} >= {"kvmclock"}


def test_render_host_is_host_passthrough() -> None:
    """This host's full CPU is host-passthrough (the host's identity, max
    leaves, brand, address sizes), checked by libvirt (check='full'),
    migratable='on' as QEMU's -cpu host; the features are written as for a
    named model, and parse reads it all back."""
    c = select.build(table(), select.Policy(disable=("sse2",)), facts=FACTS, source=LIVE)
    assert lv.base_model(c, FACTS) == lv.HOST_PASSTHROUGH == c.model
    cpu = etree.fromstring(lv.render(c, lv.base_model(c, FACTS)))
    assert {str(k): str(v) for k, v in cpu.attrib.items()} == {
        "mode": "host-passthrough", "check": "full", "migratable": "on"}
    assert cpu.find("model") is None and cpu.find("vendor") is None
    cache = cpu.find("cache")
    assert cache is not None and cache.get("mode") == "passthrough" and len(cache.attrib) == 1
    feats = {f.get("name"): f.get("policy") for f in cpu.findall("feature")}
    assert feats["sse2"] == "disable" and feats["fpu"] == "require"
    assert lv.parse(cpu) == ("host", *(tuple(n for n in names if registry().lookup(n).libvirt)
                                       for names in (c.enabled(), c.disabled())))
    assert lv.identity_note(c, lv.base_model(c, FACTS)) is None


def test_host_passthrough_unexpressible_follows_qemus_host_expansion() -> None:
    """With host-passthrough, libvirt's defaults are QEMU's expansion of
    `host` (the recording of QEMU's own query-cpu-model-expansion): a
    nameless feature set as QEMU's expansion has it is carried; one set the
    other way is reported, on or off."""
    c = select.build(table(), facts=FACTS, source=LIVE)
    reg = registry()
    assert FACTS.qemu is not None
    host = FACTS.qemu.host
    nameless = [n for n in c.features if reg.lookup(n).libvirt is None
                and reg.lookup(n).libvirt_kvm is None and reg.lookup(n).qemu in host]
    assert nameless, "the recording has no feature without a cpu_map name"
    lost = {u.name: u for u in lv.unexpressible(c, FACTS)}
    for n in nameless:
        assert (n in lost) == (c.features[n] != host[str(reg.lookup(n).qemu)]), n
    flipped = dataclasses.replace(c, features={**c.features, nameless[0]: not c.features[
        nameless[0]]})
    u = {x.name: x for x in lv.unexpressible(flipped, FACTS)}[nameless[0]]
    assert u.carrier == lv.Carrier.NOWHERE and u.on == flipped.features[nameless[0]]
    # Without QEMU's expansion nothing is assumed carried.
    assert {x.name for x in lv.unexpressible(c)} >= set(nameless)


def test_named_model_rendered_on_another_model_is_said() -> None:
    """A model cpu_map lacks (QEMU's versioned names) is rendered on a cpu_map
    model, and identity_note says whose identity the guest then gets."""
    c = dataclasses.replace(_named(), model="EPYC-v4")
    assert "EPYC-v4" not in FACTS.cpu_map
    base = lv.base_model(c, FACTS)
    assert base != "EPYC-v4"
    note = lv.identity_note(c, base)
    assert note is not None and base in note and "EPYC-v4" in note


@pytest.mark.parametrize("bad", ['x"/><evil/><feature name="y', "a&b", "a<b"])
def test_markup_injection_refused(bad: str) -> None:
    c = select.build(table(), facts=FACTS)
    evil = dict(c.features)
    evil[bad] = True
    with pytest.raises(InputError):
        lv.render(dataclasses.replace(c, features=evil), "pentium3")
    with pytest.raises(InputError, match="refusing"):
        lv.render(c, "pentium3'/><x a='")


def test_patch_changes_only_cpu() -> None:
    c = _named()
    out = lv.patch_domain(DOMAIN, c, lv.base_model(c, FACTS))
    start, end = DOMAIN.index("  <cpu "), DOMAIN.index("  <devices>")
    assert out.startswith(DOMAIN[:start])
    assert out.endswith(DOMAIN[end:])
    assert "host-passthrough" not in out[start:]
    # Without a <cpu>: one is added before </domain>, the rest is untouched.
    bare = DOMAIN[:start] + DOMAIN[end:]
    out2 = lv.patch_domain(bare, c, lv.base_model(c, FACTS))
    assert out2.startswith(bare[: bare.index("</domain>")])
    assert etree.fromstring(out2.encode()).find("cpu") is not None
    # This host's full CPU: host-passthrough stays, checked and migratable.
    host = select.build(table(), facts=FACTS, source=LIVE)
    out3 = lv.patch_domain(DOMAIN, host, lv.base_model(host, FACTS))
    assert out3.startswith(DOMAIN[:start]) and out3.endswith(DOMAIN[end:])
    cpu = etree.fromstring(out3.encode()).find("cpu")
    assert cpu is not None
    assert {str(k): str(v) for k, v in cpu.attrib.items()} == {
        "mode": "host-passthrough", "check": "full", "migratable": "on"}


def test_patch_refuses_non_domain_and_entities() -> None:
    c = select.build(table(), facts=FACTS)
    with pytest.raises(InputError):
        lv.patch_domain("<network/>", c, "qemu64")
    with pytest.raises(InputError):
        lv.patch_domain(
            '<!DOCTYPE domain [<!ENTITY x SYSTEM "file:///etc/passwd">]><domain>&x;</domain>',
            c, "qemu64",
        )


def test_parse_round_trip() -> None:
    t = table()
    c = select.build(t, select.Policy(disable=("sse2",)), facts=FACTS)
    back = applied(lv.parse(lv.render(c, lv.base_model(c, FACTS))), t, FACTS,
                   allow_unsupported=False)
    assert back.features == c.features
    assert lv.parse(DOMAIN) == ("host", (), ("svm",))


def _rng() -> etree.RelaxNG:
    if not SCHEMA.exists():
        pytest.skip("libvirt's RelaxNG schemas are not installed")
    return etree.RelaxNG(etree.parse(str(SCHEMA)))


@pytest.mark.libvirt
@pytest.mark.parametrize("dump", cpu_dump_paths(), ids=lambda p: p.stem)
def test_dump_xml_validates_against_schema(dump: Path) -> None:
    rng = _rng()
    host = select.build(load_dump(str(dump)).table, source=str(dump), facts=FACTS)
    config = select.build(load_dump(str(dump)).table, select.Policy(model="auto"),
                          source=str(dump), facts=FACTS)
    for c in (host, config):
        cpu_xml = lv.render(c, lv.base_model(c, FACTS), indent="  ")
        doc = etree.fromstring(_domain(cpu_xml).encode())
        assert rng.validate(doc), rng.error_log.last_error
    # Independent check on the chosen base: every cpu_map feature of that
    # model is required in the element (the model adds nothing unasked).
    cpu = doc.find("cpu")
    assert cpu is not None
    required = {f.get("name") for f in cpu.findall("feature") if f.get("policy") == "require"}
    base = FACTS.cpu_map[cpu.findtext("model") or ""]
    assert set(base.features) <= required


# --- live: libvirt's own verdict -----------------------------------------------------------


@pytest.mark.kvm
@pytest.mark.libvirt
def test_libvirt_accepts_defines_and_starts(kvm: Kvm, libvirt_conn_uri: str,
                                            live_facts: ToolFacts) -> None:
    import libvirt

    config = select.build(kvm.supported_cpuid(), source="/dev/kvm", facts=live_facts)
    cpu_xml = lv.render(config, lv.base_model(config, live_facts), indent="  ")
    conn = libvirt.open(libvirt_conn_uri)
    try:
        verdict = conn.compareHypervisorCPU(None, "x86_64", None, "kvm", cpu_xml, 0)
        assert verdict in (libvirt.VIR_CPU_COMPARE_IDENTICAL, libvirt.VIR_CPU_COMPARE_SUPERSET)
        name = f"kvmcpuid-test-{uuid.uuid4().hex[:12]}"
        xml = _domain(cpu_xml, name)
        assert _rng().validate(etree.fromstring(xml.encode()))
        dom = conn.defineXML(xml)
        try:
            # Needs qemu.conf `namespaces = []` inside a container
            # (scripts/setup-host.sh sets it).
            dom.create()
            assert dom.isActive()
            live = lv.parse(etree.fromstring(dom.XMLDesc(0).encode()))
            assert set(live[1]) >= {"sse2", "fpu"}
        finally:
            if dom.isActive():
                dom.destroy()
            dom.undefine()
            log = domain_log(libvirt_conn_uri, name)
            if log is not None:
                log.unlink(missing_ok=True)  # libvirt keeps it after undefine
    finally:
        conn.close()


def test_patch_parses_only_with_the_hardened_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every parse behind --patch (the self-check's copies too) goes through
    xmlutil.parse_xml, whose parser expands no entities and fetches nothing;
    lxml's default parser would do both."""
    real = etree.fromstring
    parsers: list[object] = []

    def spy(text: str | bytes, parser: etree.XMLParser | None = None) -> etree._Element:
        parsers.append(parser)
        el: etree._Element = real(text, parser)
        return el

    monkeypatch.setattr(etree, "fromstring", spy)
    _patch(DOMAIN)
    assert parsers, "patch_domain parsed nothing?"
    probe = b'<!DOCTYPE d [<!ENTITY e "expanded">]><d>&e;</d>'
    for parser in parsers:
        # None is lxml's default parser; a hardened one leaves &e; alone.
        assert isinstance(parser, etree.XMLParser)
        assert real(probe, parser).text != "expanded"


def test_base_model_vendor_names_come_from_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    """One vendor-name map (fields.LIBVIRT_VENDOR): what base_model() matches
    cpu_map's <vendor> against follows it."""
    found = FACTS.cpu_map
    amd = [p for p in cpu_dump_paths() if "EPYC" in p.stem]
    if not amd:
        pytest.skip("no AMD EPYC dump in the CPU dump directory")
    c = select.build(load_dump(str(amd[0])).table, facts=FACTS)
    assert c.vendor == "AuthenticAMD"
    assert found[lv.cpu_map_model(c, FACTS)].vendor == "AMD"
    monkeypatch.setitem(fields.LIBVIRT_VENDOR, "AuthenticAMD", "Intel")
    assert found[lv.cpu_map_model(c, FACTS)].vendor == "Intel"


def test_one_feature_name_pattern() -> None:
    """adapters.NAME_RE is the registry's pattern itself, not a copy that
    could drift from what the registry validates on load."""
    import ast
    import inspect

    import kvmcpuid_virt.adapters as adapters
    from kvmcpuid_virt.cpuid import features

    assert adapters.NAME_RE is features.NAME_RE
    # re.compile caches, so identity alone would not catch a second literal.
    tree = ast.parse(inspect.getsource(adapters))
    assigned = {
        t.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign | ast.AnnAssign)
        for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(t, ast.Name)
    }
    assert "NAME_RE" not in assigned


# --- --patch keeps what <cpu> holds besides CPUID ----------------------------------------

# As `virsh dumpxml` shows a host-passthrough guest (libvirt adds
# migratable='on'), with the non-CPUID children in an order libvirt would not
# write, so that the patched order is ours.
RICH_CPU = """<cpu mode='host-passthrough' check='none' migratable='on'>
    <numa>
      <cell id='0' cpus='0-3' memory='1048576' unit='KiB'/>
    </numa>
    <feature policy='disable' name='svm'/>
    <maxphysaddr mode='emulate' bits='42'/>
    <topology sockets='1' dies='1' cores='2' threads='2'/>
    <cache level='3' mode='emulate'/>
  </cpu>"""
KEPT = ("topology", "cache", "maxphysaddr", "numa")


def _rich_domain(name: str = "t") -> str:
    # Four vCPUs: libvirt refuses a topology that does not add up to <vcpu>.
    return _domain(RICH_CPU, name).replace(
        "<vcpu placement='static'>1</vcpu>", "<vcpu placement='static'>4</vcpu>"
    )


def _c14n(el: etree._Element | None) -> bytes:
    assert el is not None
    el = etree.fromstring(etree.tostring(el, with_tail=False))  # a standalone copy
    for node in el.iter():  # indentation is the one thing allowed to differ
        node.text = node.text if node.text and node.text.strip() else None
        node.tail = None
    out: bytes = etree.tostring(el, method="c14n", exclusive=True)
    return out


@pytest.mark.libvirt
def test_patch_keeps_topology_numa_cache() -> None:
    before = _rich_domain()
    after = _patch(before)
    old, new = etree.fromstring(before.encode()).find("cpu"), etree.fromstring(after.encode())
    cpu = new.find("cpu")
    assert old is not None and cpu is not None
    for tag in KEPT:
        assert _c14n(cpu.find(tag)) == _c14n(old.find(tag)), tag
    # libvirt refuses migratable outside host-passthrough/maximum.
    assert sorted(cpu.attrib.items()) == [("check", "full"), ("match", "exact"), ("mode", "custom")]
    tags = [str(el.tag) for el in cpu]
    features = tags.count("feature")
    assert features > 0
    # libvirt's own order (what `virsh dumpxml` writes, checked live below).
    assert tags == ["model", "topology", "cache", "maxphysaddr", *["feature"] * features, "numa"]
    rng = _rng()
    assert rng.validate(new), rng.error_log.last_error


def test_patch_self_check_covers_what_cpu_keeps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Were the carried children lost or altered, --patch refuses rather
    than write a domain that lost its topology."""

    def lossy(old: etree._Element) -> tuple[list[etree._Element], list[etree._Element]]:
        before, after = real(old)
        return before[1:], after

    real = lv._carried
    monkeypatch.setattr(lv, "_carried", lossy)
    with pytest.raises(InputError, match="more than <cpu>"):
        _patch(_rich_domain())


@pytest.mark.libvirt
def test_libvirt_defines_patched_rich_domain(libvirt_conn_uri: str) -> None:
    import libvirt

    name = f"kvmcpuid-test-{uuid.uuid4().hex[:12]}"
    xml = _patch(_rich_domain(name))
    conn = libvirt.open(libvirt_conn_uri)
    try:
        dom = conn.defineXML(xml)  # persistent but never started
        try:
            back = etree.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode())
        finally:
            dom.undefine()
    finally:
        conn.close()
    ours, theirs = etree.fromstring(xml.encode()).find("cpu"), back.find("cpu")
    assert ours is not None and theirs is not None
    for tag in KEPT:
        assert _c14n(theirs.find(tag)) == _c14n(ours.find(tag)), tag
    assert [el.tag for el in theirs] == [el.tag for el in ours]


@pytest.mark.kvm
@pytest.mark.libvirt
def test_libvirt_passes_host_passthrough_on_as_cpu_host(kvm: Kvm, libvirt_conn_uri: str,
                                                        live_facts: ToolFacts) -> None:
    """libvirt's own QEMU command line for this host's rendering: `-cpu
    host,migratable=on` and every <feature> as QEMU's property (libvirt's own
    cpu_map-to-QEMU spelling, against the registry's), nothing else."""
    import shlex

    import libvirt

    config = select.build(kvm.supported_cpuid(), source="/dev/kvm", facts=live_facts)
    cpu_xml = lv.render(config, lv.base_model(config, live_facts), indent="  ")
    conn = libvirt.open(libvirt_conn_uri)
    try:
        argv = shlex.split(conn.domainXMLToNative("qemu-argv", _domain(cpu_xml), 0))
    finally:
        conn.close()
    value = argv[argv.index("-cpu") + 1].split(",")
    assert value[:2] == ["host", "migratable=on"]
    # <cache mode='passthrough'/>: the host's cache leaves, QEMU's own L3 off.
    assert value[-2:] == ["host-cache-info=on", "l3-cache=off"]
    reg = registry()
    want = {str(reg.lookup(n).qemu): "on" if on else "off" for n, on in config.features.items()
            if reg.lookup(n).libvirt is not None}
    # Feature-MSR bits (mds-no, ...) too: libvirt spells them as QEMU does.
    mreg = msr_registry()
    want |= {str(mreg.lookup(n).qemu): "on" if on else "off"
             for n, on in config.msr_features.items() if mreg.lookup(n).libvirt is not None}
    got = dict(p.split("=", 1) for p in value[2:-2])
    assert got == want
