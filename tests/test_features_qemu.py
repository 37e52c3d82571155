"""The registry's QEMU names against the installed qemu-system-x86_64.

1. Every QEMU name (canonical and alias) is a boolean property of
   `query-cpu-model-expansion` (type full, model max).
2. Every QEMU name sets exactly the registry's bit: QEMU is started with an
   empty `base` CPU plus that one name, and the CPU's QOM `feature-words`
   together with `filtered-features` (what was requested but the accelerator
   cannot give) must be that bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from kvmcpuid_virt.cpuid.features import registry
from kvmcpuid_virt.errors import ToolError
from kvmcpuid_virt.qmp import run_commands

pytestmark = pytest.mark.qemu

Key = tuple[int, int, str, int]
CPU = "/machine/unattached/device[0]"

# QEMU's "kvmclock" sets KVM_FEATURE_CLOCKSOURCE and ..._CLOCKSOURCE2 at once;
# the registry names bit 3 "kvmclock2" (Linux) so that each bit has one owner.
ALSO_SETS: dict[str, set[Key]] = {"kvmclock": {(0x40000001, 0, "eax", 3)}}
# QEMU derives XCR0 component bits (0xD.0 EAX/EDX) from xsave/avx/... flags.
DERIVED_WORDS = {(0xD, 0, "eax"), (0xD, 0, "edx")}


def _feature_words(qemu: str, cpu: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`feature-words` and `filtered-features` of a stopped one-CPU QEMU."""
    fw, ff = run_commands(
        qemu,
        [
            {"execute": "qom-get", "arguments": {"path": CPU, "property": prop}}
            for prop in ("feature-words", "filtered-features")
        ],
        machine="pc",
        cpu=cpu,
        accel="kvm",
        extra=("-m", "16"),
        timeout=30,
    )
    return fw, ff


def _bits(words: list[dict[str, Any]]) -> set[Key]:
    out = set()
    for w in words:
        for bit in range(32):
            if w["features"] >> bit & 1:
                reg = w["cpuid-register"].lower()
                out.add((w["cpuid-input-eax"], w.get("cpuid-input-ecx", 0), reg, bit))
    return out


@pytest.fixture(scope="module")
def max_props(qemu_binary: str) -> Iterator[dict[str, Any]]:
    (reply,) = run_commands(
        qemu_binary,
        [{"execute": "query-cpu-model-expansion",
          "arguments": {"type": "full", "model": {"name": "max"}}}],
        accel="kvm",
    )  # fmt: skip
    props: dict[str, Any] = reply["model"]["props"]
    yield props


def test_every_qemu_name_is_a_cpu_property(max_props: dict[str, Any]) -> None:
    names = {n for f in registry().features for n in (f.qemu, *f.qemu_aliases) if n}
    assert len(names) > 200
    missing = sorted(n for n in names if not isinstance(max_props.get(n), bool))
    assert missing == []


def test_every_qemu_name_sets_its_bit_and_no_name_is_missing(
    qemu_binary: str, max_props: dict[str, Any]
) -> None:
    """Each boolean property of `max` is tried alone on `base`. A registry name
    must set exactly its bit; any other property that sets a CPUID bit is a
    QEMU feature name the registry lacks. Properties QEMU refuses on `base`
    (Hyper-V options this kernel rejects, CPU options) set no CPUID bit."""
    reg = registry()
    cases: dict[str, set[Key]] = {}
    for f in reg.features:
        for n in (f.qemu, *f.qemu_aliases):
            if n is not None:
                cases.setdefault(n, set()).add((f.leaf, f.subleaf, f.reg, f.bit))
    for n, extra in ALSO_SETS.items():
        cases[n] |= extra
    others = sorted(n for n, v in max_props.items() if isinstance(v, bool) and n not in cases)

    def one(name: str) -> tuple[str, set[Key] | str]:
        try:
            fw, ff = _feature_words(qemu_binary, f"base,{name}=on")
        except ToolError as exc:
            return name, str(exc)
        got = _bits(fw) | _bits(ff)
        if len(got) > 1:
            got = {k for k in got if k[:3] not in DERIVED_WORDS}
        return name, got

    with ThreadPoolExecutor(16) as pool:
        results = dict(pool.map(one, [*sorted(cases), *others]))
    wrong = {n: (sorted(cases[n]), results[n]) for n in cases if results[n] != cases[n]}
    assert wrong == {}
    unregistered = {n: results[n] for n in others if isinstance(results[n], set) and results[n]}
    assert unregistered == {}
    # The run exercised KVM PV names (QEMU drops them silently without KVM).
    assert results["kvm-pv-eoi"] == {(0x40000001, 0, "eax", 6)}
