"""libvirt-xml --patch sets the KVM switches libvirt takes in
<features><kvm> (adapters.libvirt.patch_features): only those children
change, <features> and <kvm> are created in libvirt's order, every other
byte stays; the real libvirtd accepts the result, writes it back in the same
order, and turns each switch into QEMU's -cpu property."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import uuid
from pathlib import Path

import libvirt
import pytest
from lxml import etree

from kvmcpuid_virt.adapters import libvirt as lv
from kvmcpuid_virt.config.cpuconfig import CpuConfig
from kvmcpuid_virt.cpuid.table import CpuidTable
from kvmcpuid_virt.errors import InputError

# libvirt's names of the switches and QEMU's properties behind them
# (libvirt 9.0 qemu_command.c, qemuBuildCpuCommandLine): hint-dedicated ->
# kvm-hint-dedicated, poll-control -> kvm-poll-control, pv-ipi -> kvm-pv-ipi.
CONFIG = CpuConfig("host", {"kvm-hint-dedicated": True, "kvm-poll-control": True,
                            "kvm-pv-ipi": False, "sse2": True}, CpuidTable([]))  # fmt: skip
SET = {"hint-dedicated": "on", "poll-control": "on", "pv-ipi": "off"}

BARE = """<domain type='kvm'>
  <name>NAME</name>
  <memory unit='MiB'>32</memory>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
  </os>
  <cpu mode='host-model'/>
  <devices/>
</domain>
"""

BUSY = """<?xml version='1.0'?>
<!-- <features><kvm><poll-control state='off'/></kvm></features> -->
<domain type='kvm'>
  <name>NAME</name>
  <memory unit='MiB'>32</memory>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
  </os>
  <features>
    <acpi/>
    <hyperv mode='custom'><relaxed state='on'/></hyperv>
    <kvm>
      <hidden state = 'on'/>
      <poll-control state='off'/>
    </kvm>
    <pmu state='off'/>
  </features>
  <devices/>
</domain>
"""


def _kvm(xml: str) -> dict[str, str | None]:
    kvm = etree.fromstring(xml.encode()).find("features/kvm")
    return {} if kvm is None else {str(c.tag): c.get("state") for c in kvm}


def _without(text: str, added: str) -> str:
    """`text` with the one inserted run `added` taken out."""
    assert text.count(added) == 1
    return text.replace(added, "", 1)


def test_features_created_before_cpu_in_libvirts_order() -> None:
    out = lv.patch_features(BARE, CONFIG)
    block = ("  <features>\n    <kvm>\n      <hint-dedicated state=\"on\"/>\n"
             "      <poll-control state=\"on\"/>\n      <pv-ipi state=\"off\"/>\n"
             "    </kvm>\n  </features>\n")  # fmt: skip
    assert _without(out, block) == BARE
    assert out.index("<features>") < out.index("<cpu ")
    assert _kvm(out) == SET


def test_only_the_kvm_children_set_change() -> None:
    out = lv.patch_features(BUSY, CONFIG)
    # hidden (not ours) and everything else kept byte for byte; poll-control
    # replaced; hint-dedicated before it and pv-ipi after it, as libvirt orders.
    assert out == BUSY.replace(
        "      <poll-control state='off'/>\n",
        "      <hint-dedicated state=\"on\"/>\n      <poll-control state=\"on\"/>\n"
        "      <pv-ipi state=\"off\"/>\n",
    )
    assert _kvm(out) == {"hidden": "on", **SET}


def test_kvm_created_after_hyperv_before_pmu() -> None:
    busy = re.sub(r"    <kvm>.*?</kvm>\n", "", BUSY, flags=re.S)
    out = lv.patch_features(busy, CONFIG)
    features = etree.fromstring(out.encode()).find("features")
    assert features is not None
    assert [str(c.tag) for c in features] == ["acpi", "hyperv", "kvm", "pmu"]
    assert _kvm(out) == SET


@pytest.mark.parametrize("empty", ["<features/>", "<features><kvm/></features>"])
def test_self_closing_features_and_kvm(empty: str) -> None:
    domain = BARE.replace("  <cpu ", f"  {empty}\n  <cpu ")
    out = lv.patch_features(domain, CONFIG)
    assert _kvm(out) == SET
    assert out.replace(out[out.index("<features>"):out.index("</features>") + 11], empty) \
        == domain  # fmt: skip


def test_nothing_to_set_changes_nothing() -> None:
    assert lv.patch_features(BUSY, CpuConfig("host", {"sse2": True}, CpuidTable([]))) == BUSY


def test_two_features_elements_are_refused() -> None:
    twice = BUSY.replace("  <devices/>", "  <features><apic/></features>\n  <devices/>")
    with pytest.raises(InputError, match="more than one <features>"):
        lv.patch_features(twice, CONFIG)


# --- the real daemon --------------------------------------------------------------------


def _patched_by_the_command(tmp_path: Path, domain: str) -> str:
    path = tmp_path / "dom.xml"
    path.write_text(domain)
    proc = subprocess.run([sys.executable, "-c", "import sys; from kvmcpuid_virt.cli import "
                           "main; sys.exit(main())", "libvirt-xml", "--patch", str(path),
                           "--enable", "kvm-poll-control"], capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    if proc.returncode == 2 and "cannot give" in proc.stderr:
        pytest.skip(f"this host's KVM has no poll-control: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    assert "put in the domain's features" not in proc.stderr
    return proc.stdout


def test_libvirt_takes_the_patched_domain_as_written(
    libvirt_conn_uri: str, tmp_path: Path, qemu_binary: str
) -> None:
    """Defined in the real libvirtd: its own dumpxml has the switch, with
    <features> where we put it, and its QEMU command line carries it."""
    name = f"kvmcpuid-featurestest-{uuid.uuid4().hex[:8]}"
    out = _patched_by_the_command(tmp_path, BARE.replace("NAME", name))
    assert _kvm(out).get("poll-control") == "on"
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(libvirt_conn_uri)
    try:
        dom = conn.defineXML(out)
        try:
            back = dom.XMLDesc(0)
            assert _kvm(back).get("poll-control") == "on"
            ours = [str(c.tag) for c in etree.fromstring(out.encode())]
            theirs = [str(c.tag) for c in etree.fromstring(back.encode())]
            assert [t for t in theirs if t in ours] == ours
            argv = conn.domainXMLToNative("qemu-argv", out, 0)
            assert re.search(r"-cpu \S*kvm-poll-control=on", argv), argv
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefine()
    finally:
        conn.close()
