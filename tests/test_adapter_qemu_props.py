"""QEMU's non-feature CPU properties in a -cpu value: each one this machine's
QEMU has (its own device-list-properties answer) is a feature of the
registries, accepted (host-cache-info, l3-cache, migratable=on) or refused
in one line as "not a feature"; and `-cpu host,host-cache-info=on` makes
QEMU's cache leaves exact, which verify then holds on a real guest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvmcpuid_virt.adapters import qemu
from kvmcpuid_virt.cpuid.features import registry
from kvmcpuid_virt.cpuid.msr_features import msr_registry
from kvmcpuid_virt.errors import InputError
from kvmcpuid_virt.kvm import Kvm
from kvmcpuid_virt.qmp import run_commands
from tests.qemu_mutant import qemu_wrapper

REPO = Path(__file__).resolve().parent.parent
# enforce and check change only how QEMU reports a feature it cannot give.
ACCEPTED = ("host-cache-info", "l3-cache", "migratable", "enforce", "check")
# A value of each QOM type QEMU's parser would take for the property.
VALUES = {"bool": "on", "string": "x", "str": "x"}


@pytest.fixture(scope="module")
def cpu_properties(qemu_binary: str) -> dict[str, str]:
    """QEMU's own list: every property of the host CPU type -> its QOM type."""
    reply = run_commands(qemu_binary, [{"execute": "device-list-properties",
                                        "arguments": {"typename": "host-x86_64-cpu"}}])[0]
    return {str(p["name"]): str(p.get("type", "")) for p in reply}


def test_every_qemu_cpu_property_is_a_feature_accepted_or_not_a_feature(
        cpu_properties: dict[str, str]) -> None:  # fmt: skip
    """No property QEMU has is answered "QEMU does not know the feature"."""
    reg, mreg = registry(), msr_registry()
    others = {n: t for n, t in cpu_properties.items()
              if reg.by_qemu(n.replace("_", "-")) is None
              and mreg.by_qemu(n.replace("_", "-")) is None}  # fmt: skip
    assert len(others) > 40 and set(ACCEPTED) <= set(others)
    wrong = {}
    for name, kind in sorted(others.items()):
        value = f"host,{name}={VALUES.get(kind, '1')}"
        try:
            qemu.parse(value)
        except InputError as exc:
            text = str(exc)
            if "is not a feature; not supported" not in text or "\n" in text:
                wrong[name] = text
        else:
            if name not in ACCEPTED:
                wrong[name] = "accepted"
    assert not wrong


def test_accepted_properties_decide_no_feature() -> None:
    plain = qemu.parse("host,avx=off,lahf-lm=on")
    assert qemu.parse("host,host-cache-info=on,avx=off,l3-cache=off,lahf-lm=on,"
                      "migratable=on,host_cache_info=off") == plain  # fmt: skip
    for bad, says in (("host,migratable=off", "migratable=off is not supported"),
                      ("host,+host-cache-info", "not a feature; write host-cache-info=on"),
                      ("host,l3-cache=maybe", "l3-cache takes on or off")):  # fmt: skip
        with pytest.raises(InputError, match=says):
            qemu.parse(bad)


def _verify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmcpuid_virt.cli", "verify", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=180, check=False)


@pytest.mark.parametrize("prop", ["level=7", "phys-bits=36", "model-id=x", "hv-relaxed=on"])
def test_verify_refuses_a_non_feature_property_in_one_line(prop: str) -> None:
    r = _verify("--backend", "qemu", "--qemu-flags", f"host,{prop},enforce")
    assert r.returncode == 2 and r.stdout == ""
    [line] = r.stderr.splitlines()
    assert "--qemu-flags" in line and "is not a feature; not supported" in line
    assert prop.split("=")[0] in line


def test_qemu_cache_leaves_are_the_hosts_and_verified(kvm: Kvm, qemu_binary: str,
                                                      tmp_path: Path) -> None:  # fmt: skip
    """-cpu host,host-cache-info=on: the guest's cache leaves equal KVM's (the
    configuration's), so verify compares them rather than listing them as not
    modelled; a VMM that turns it off (QEMU's made-up caches) fails, naming
    the cache fields."""
    r = _verify("--backend", "qemu")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not [ln for ln in r.stdout.splitlines()
                if ln.startswith("(not modelled) cache") or "cache" in ln.split(":")[0]]
    bad = _verify("--backend", "qemu", "--qemu",
                  str(qemu_wrapper(tmp_path, qemu_binary, "host-cache-info=off")))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    named = [ln for ln in bad.stdout.splitlines()
             if ln.startswith("cache") and ln.endswith("(changed in the VMM)")]
    assert named, bad.stdout


def test_host_only_properties_follow_qemus_named_model_types(qemu_binary: str) -> None:
    """QEMU's own property list of a named model (EPYC) lacks exactly the
    host-only ones of the accepted properties: parse refuses those on a
    named model, in one line, and takes them on host."""
    reply = run_commands(qemu_binary, [{"execute": "device-list-properties",
                                        "arguments": {"typename": "EPYC-x86_64-cpu"}}])[0]
    named = {str(p["name"]) for p in reply}
    assert {n for n in ACCEPTED if n not in named} == set(qemu.HOST_ONLY_PROPS)
    for name in qemu.HOST_ONLY_PROPS:
        with pytest.raises(InputError, match="only for -cpu host or max"):
            qemu.parse(f"EPYC,{name}=on")
        assert qemu.parse(f"host,{name}=on") == ("host", (), ())
    assert qemu.parse("EPYC,l3-cache=off") == ("EPYC", (), ())
