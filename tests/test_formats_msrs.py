"""Feature MSRs in the dump formats: version 2 of the JSON dump carries them
(checked live against a C program's own ioctls), version 1 still reads with
them unknown, libvirt's <cpudata> <msr> elements read as the file's raw
attributes say, `cpuid -1r` text has none, and bad MSR data is a one-line
error naming the file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from lxml import etree

from kvmcpuid_virt.cpuid.formats import READ_VERSIONS, Dump, dumps, loads
from kvmcpuid_virt.cpuid.msr_values import FeatureMsrs
from kvmcpuid_virt.cpuid.table import CpuidEntry, CpuidTable
from kvmcpuid_virt.errors import DumpFormatError
from kvmcpuid_virt.fsutil import load_dump
from tests.conftest import REPO, cpu_dump_paths

LEAF0 = CpuidEntry(0, 0, 0, 1, 0x68747541, 0x444D4163, 0x69746E65)
TABLE = CpuidTable([LEAF0, CpuidEntry(1, 0, 0, 0x00A00F11, 0, 0, 0)])
AMD = {0x8B: 0x1000065, 0xCE: 0x8000_0000, 0x10A: 0x4000_0000_0C00_0069, 0x345: 0}


def _v2(feature_msrs: object) -> str:
    doc = {"format": "kvmcpuid-dump", "version": 2, "feature_msrs": feature_msrs,
           "entries": [{"function": "0x0", "ebx": "0x68747541", "ecx": "0x444d4163",
                        "edx": "0x69746e65"}]}  # fmt: skip
    return json.dumps(doc)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmcpuid_virt.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


@pytest.mark.parametrize("msrs", [
    FeatureMsrs.of(AMD, {0x8B: 0x1000065, 0xCE: 0x8000_0000, 0x10A: 0, 0x345: 0}),
    FeatureMsrs.of(AMD),
    FeatureMsrs.of({}),
    FeatureMsrs.absent("this kernel has no KVM_CAP_GET_MSR_FEATURES"),
    None,
], ids=["with-deliverable", "values-only", "empty", "absent", "unknown"])  # fmt: skip
def test_json_round_trip_keeps_feature_msrs_and_tells_absent_empty_and_unknown_apart(
    msrs: FeatureMsrs | None,
) -> None:
    text = dumps(Dump(TABLE.with_msrs(msrs)), "json")
    back = loads(text, "d.json")
    assert back.table == TABLE and back.msrs == msrs
    if msrs is not None:
        assert back.msrs is not None and back.msrs.why == msrs.why
    doc = json.loads(text)
    assert doc["version"] == 2 and ("feature_msrs" in doc) == (msrs is not None)


def test_json_writes_indices_and_values_as_the_spec_numbers() -> None:
    # IA32_ARCH_CAPABILITIES is MSR 0x10A (Intel SDM vol. 4, table 2-2).
    doc = json.loads(dumps(Dump(TABLE.with_msrs(FeatureMsrs.of(AMD, {0x10A: 0x69}))), "json"))
    msrs = doc["feature_msrs"]
    assert msrs["available"] is True
    assert msrs["values"]["0x0000010a"] == "0x400000000c000069"
    assert msrs["deliverable"] == {"0x0000008b": "0x0000000000000000",
                                   "0x000000ce": "0x0000000000000000",
                                   "0x0000010a": "0x0000000000000069",
                                   "0x00000345": "0x0000000000000000"}  # fmt: skip


@pytest.mark.parametrize("path", [p for p in cpu_dump_paths() if p.suffix == ".xml"][:3],
                         ids=lambda p: p.stem)  # fmt: skip
def test_version_1_dumps_still_read_with_feature_msrs_unknown(path: Path) -> None:
    table = load_dump(str(path)).table.with_msrs(None)
    v1 = json.loads(dumps(Dump(table), "json"))
    v1["version"] = 1
    back = loads(json.dumps(v1), "v1.json")
    assert back.table == table and back.msrs is None
    assert 1 in READ_VERSIONS


def test_version_1_dump_with_feature_msrs_is_refused_naming_the_version() -> None:
    text = _v2({"available": False}).replace('"version": 2', '"version": 1')
    with pytest.raises(DumpFormatError, match="feature MSRs came with version 2"):
        loads(text, "v1.json")


def test_cpudata_msr_elements_read_as_their_raw_attributes() -> None:
    """libvirt's test data of real CPUs carries <msr index= edx= eax=/>
    beside CPUID (Ice Lake's IA32_ARCH_CAPABILITIES among them): read
    straight from the XML, independently of the reader."""
    found = 0
    for path in cpu_dump_paths():
        if path.suffix != ".xml":
            continue
        raw = {int(str(el.get("index")), 16):
               int(str(el.get("edx")), 16) << 32 | int(str(el.get("eax")), 16)
               for el in etree.parse(str(path)).getroot().iter("msr")}  # fmt: skip
        msrs = load_dump(str(path)).msrs
        if not raw:
            assert msrs is None, path
            continue
        found += 1
        assert msrs is not None and msrs.as_dict() == raw and msrs.deliverable is None
        again = loads(dumps(load_dump(str(path)), "cpudata"), "again.xml")
        assert again.msrs == msrs
    assert found >= 3


def test_cpuid_text_has_no_feature_msrs() -> None:
    text = dumps(Dump(TABLE.with_msrs(FeatureMsrs.of(AMD))), "cpuid")
    assert loads(text, "d.txt").msrs is None


@pytest.mark.parametrize(("msrs", "message"), [
    ({"available": True}, "'values' missing"),
    ({"available": "yes", "values": {}}, "'available' must be true or false"),
    ({"available": False, "values": {}}, "values given although 'available' is false"),
    ({"available": True, "values": {"0x10a": "0x1"}, "extra": 1}, "unknown keys"),
    ({"available": True, "values": {"0x10a": 105}}, "expected a hex string"),
    ({"available": True, "values": {"0x1_0a": "0x1"}}, "expected a hex string"),
    ({"available": True, "values": {"0x100000000": "0x1"}}, "within 32 bits"),
    ({"available": True, "values": {"0x10a": "0x10000000000000000"}}, "within 64 bits"),
    ({"available": True, "values": {"0x10a": "0x1", "0x10A": "0x1"}}, "given twice"),
    ({"available": True, "values": {"0x10a": "0x1"}, "deliverable": {"0x10a": "0x3"}},
     "beyond its value"),
    ({"available": True, "values": {}, "deliverable": {"0x10a": "0x0"}}, "has no value"),
    ([], "must be an object"),
], ids=lambda v: v if isinstance(v, str) else None)  # fmt: skip
def test_bad_feature_msrs_are_one_line_errors(msrs: object, message: str) -> None:
    with pytest.raises(DumpFormatError, match=message) as info:
        loads(_v2(msrs), "bad.json")
    assert "\n" not in str(info.value) and "bad.json" in str(info.value)


def test_feature_msr_key_given_twice_is_refused() -> None:
    text = _v2({"available": True, "values": {"0x10a": "0x1"}}).replace(
        '"values": {"0x10a": "0x1"}', '"values": {"0x10a": "0x1", "0x10a": "0x2"}'
    )
    with pytest.raises(DumpFormatError, match="given twice"):
        loads(text, "twice.json")


@pytest.mark.parametrize(("xml", "message"), [
    ("<msr edx='0x0' eax='0x1'/>", "lacks index="),
    ("<msr index='0x10a' eax='0x100000000'/>", "does not fit 32 bits"),
    ("<msr index='0x10a' eax='0x1' value='2'/>", "unknown attribute"),
    ("<msr index='0x10a' eax='0x1'/><msr index='0x10a' eax='0x2'/>", "listed again"),
])  # fmt: skip
def test_bad_cpudata_msr_elements_name_the_line(xml: str, message: str) -> None:
    text = ("<cpudata arch='x86'>\n<cpuid eax_in='0x0' eax='0x1' ebx='0x68747541' "
            f"ecx='0x444d4163' edx='0x69746e65'/>\n{xml}\n</cpudata>")  # fmt: skip
    with pytest.raises(DumpFormatError, match=message) as info:
        loads(text, "bad.xml")
    assert ":3:" in str(info.value) or "line 3" in str(info.value)


def test_command_reading_a_bad_msr_dump_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(_v2({"available": True, "values": {"0x10a": "-1"}}))
    proc = _cli("qemu-flags", "--from", str(bad))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert str(bad) in proc.stderr and "feature_msrs" in proc.stderr


@pytest.mark.kvm
def test_live_dump_carries_the_feature_msrs_a_c_program_reads() -> None:
    """`kvmcpuid dump`: the feature-MSR values are what a C program reads
    through the ioctls, and the bits marked deliverable are exactly those its
    vCPU took with KVM_SET_MSRS (the whole value, or each bit alone for the
    flag MSRs 0x10a and 0xcf)."""
    from tests.kvm_msr_c import c_msr_reading

    c = c_msr_reading()
    proc = _cli("dump", "--msr-trial")
    assert proc.returncode == 0, proc.stderr
    msrs = loads(proc.stdout, "live.json").msrs
    assert msrs is not None
    if not c.cap:
        assert not msrs.available and "KVM_CAP_GET_MSR_FEATURES" in msrs.why
        return
    assert msrs.available and msrs.as_dict() == c.values
    expected = {}
    for index, value in c.values.items():
        if c.set_result[index] == 1:
            expected[index] = value & c.read_back.get(index, value)
        else:
            expected[index] = sum(1 << b for (i, b), r in c.bit_result.items()
                                  if i == index and r == 1)  # fmt: skip
    assert msrs.deliverable_dict() == expected
    # Without --msr-trial: the same values, what a vCPU accepts unknown.
    plain = _cli("dump")
    assert plain.returncode == 0, plain.stderr
    light = loads(plain.stdout, "plain.json").msrs
    assert light is not None and light.items == msrs.items and light.deliverable is None


def test_simulated_kernel_without_msr_features_capability_dumps_them_absent() -> None:
    from kvmcpuid_virt.commands.dump import feature_msrs
    from kvmcpuid_virt.kvm.abi import Ioctl
    from tests.test_kvm_simulated_kernels import SimulatedKernel, _kvm

    kernel = SimulatedKernel(feature_msrs=None)
    with _kvm(kernel) as kvm:
        msrs = feature_msrs(kvm, kvm.supported_cpuid(), trial=True)
    assert Ioctl.CREATE_VM not in kernel.requests
    assert not msrs.available and "KVM_CAP_GET_MSR_FEATURES" in msrs.why
    back = loads(dumps(Dump(TABLE.with_msrs(msrs)), "json"), "sim.json")
    assert back.msrs == FeatureMsrs.absent() and back.msrs is not None
    assert "KVM_CAP_GET_MSR_FEATURES" in back.msrs.why
