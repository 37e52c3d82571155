"""The conformance plan's cluster baseline on a checkout alone: the real CPU
dumps are in the repository, and a host whose vendor they lack is paired
with itself narrowed to a named model, from QEMU's own model definitions
(the recorded ToolFacts: no QEMU, no /dev/kvm needed here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conformance import plan
from kvmcpuid_virt.config.build import build
from kvmcpuid_virt.cpuid.features import registry
from kvmcpuid_virt.fsutil import load_dump
from tests.conftest import DATA, FACTS, REPO

AMD = "x86_64-cpuid-EPYC-9334-32-Core.xml"


def test_the_dumps_are_in_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVMCPUID_DATA", raising=False)
    assert plan.data_dir() == REPO / "tests" / "data" / "cpuid"
    assert (plan.data_dir() / AMD).is_file()
    monkeypatch.setenv("KVMCPUID_DATA", "/elsewhere")
    assert plan.data_dir() == Path("/elsewhere")


def test_baseline_pairs_the_host_with_a_dump_of_its_vendor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KVMCPUID_DATA", str(DATA))
    supported = load_dump(str(DATA / AMD)).table
    case, why = plan._baseline(supported, FACTS, {})
    assert case is not None
    # The first AMD dump in name order (the host's own file is one of them).
    assert why == "this host and x86_64-cpuid-EPYC-7601-32-Core.xml"


def test_baseline_without_a_dump_of_the_vendor_uses_the_host_as_a_named_model(
    tmp_path: Path,
) -> None:
    supported = load_dump(str(DATA / AMD)).table
    models = plan._models(supported, FACTS, [])
    assert models, "the recorded QEMU has models this CPU runs"
    name = next(iter(models))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVMCPUID_DATA", str(tmp_path))  # a directory without dumps
        case, why = plan._baseline(supported, FACTS, models)
    assert case is not None, why
    assert f"narrowed to QEMU's model {name}" in why and str(tmp_path) in why
    # Narrowed: what the CPU has and the model lacks is off in the baseline
    # (the CPU's own bits: QEMU adds hypervisor and tsc-deadline to both).
    cpu_has = {f.name for f in registry().present(supported)}
    host_only = cpu_has & set(build(supported, facts=FACTS).enabled()) - set(
        models[name].config.enabled())
    assert host_only, "the model is the whole host: nothing would be narrowed"
    assert not host_only & set(case.config.enabled())


def test_no_dump_and_no_model_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMCPUID_DATA", str(tmp_path))
    supported = load_dump(str(DATA / AMD)).table
    case, why = plan._baseline(supported, FACTS, {})
    assert case is None and "no named model this host runs" in why
