"""The registry's QEMU names against the installed qemu-system-x86_64.

1. Every QEMU name (canonical and alias) is a boolean property of
   `query-cpu-model-expansion` (type full, model max).
2. Every QEMU name sets exactly the registry's bit: QEMU is started with an
   empty `base` CPU plus that one name, and the CPU's QOM `feature-words`
   together with `filtered-features` (what was requested but the accelerator
   cannot give) must be that bit.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from qemu.qmp import ConnectError, QMPClient

from kvmcpuid_virt.cpuid.features import registry

pytestmark = pytest.mark.qemu

Key = tuple[int, int, str, int]
CPU = "/machine/unattached/device[0]"

# QEMU's "kvmclock" sets KVM_FEATURE_CLOCKSOURCE and ..._CLOCKSOURCE2 at once;
# the registry names bit 3 "kvmclock2" (Linux) so that each bit has one owner.
ALSO_SETS: dict[str, set[Key]] = {"kvmclock": {(0x40000001, 0, "eax", 3)}}
# QEMU derives XCR0 component bits (0xD.0 EAX/EDX) from xsave/avx/... flags.
DERIVED_WORDS = {(0xD, 0, "eax"), (0xD, 0, "edx")}


async def _qmp(qemu: str, cpu: str | None, commands: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "qmp.sock")
        machine = (
            ["-machine", "none"]
            if cpu is None
            else ["-machine", "pc", "-S", "-m", "16", "-cpu", cpu]
        )
        argv = [
            qemu,
            *machine,
            "-accel",
            "kvm",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
            f"unix:{sock},server=on,wait=off",
        ]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        client = QMPClient("test")
        try:
            for _ in range(250):  # 5 s
                if proc.poll() is not None:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    raise AssertionError(f"qemu -cpu {cpu} exited: {err.strip()}")
                try:
                    await client.connect(sock)
                    break
                except ConnectError:
                    await asyncio.sleep(0.02)
            else:
                raise AssertionError("qemu did not open its QMP socket in 5 s")
            return [await asyncio.wait_for(client.execute(c, a), 30) for c, a in commands]
        finally:
            await client.disconnect()
            proc.kill()
            proc.wait()


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
    (reply,) = asyncio.run(
        _qmp(
            qemu_binary,
            None,
            [("query-cpu-model-expansion", {"type": "full", "model": {"name": "max"}})],
        )
    )
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

    async def one(sem: asyncio.Semaphore, name: str) -> tuple[str, set[Key] | str]:
        async with sem:
            try:
                fw, ff = await _qmp(
                    qemu_binary,
                    f"base,{name}=on",
                    [
                        ("qom-get", {"path": CPU, "property": "feature-words"}),
                        ("qom-get", {"path": CPU, "property": "filtered-features"}),
                    ],
                )
            except AssertionError as exc:
                return name, str(exc)
        got = _bits(fw) | _bits(ff)
        if len(got) > 1:
            got = {k for k in got if k[:3] not in DERIVED_WORDS}
        return name, got

    async def run_all() -> list[tuple[str, set[Key] | str]]:
        sem = asyncio.Semaphore(16)
        return await asyncio.gather(*(one(sem, n) for n in [*sorted(cases), *others]))

    results = dict(asyncio.run(run_all()))
    wrong = {n: (sorted(cases[n]), results[n]) for n in cases if results[n] != cases[n]}
    assert wrong == {}
    unregistered = {n: results[n] for n in others if isinstance(results[n], set) and results[n]}
    assert unregistered == {}
    # The run exercised KVM PV names (QEMU drops them silently without KVM).
    assert results["kvm-pv-eoi"] == {(0x40000001, 0, "eax", 6)}
