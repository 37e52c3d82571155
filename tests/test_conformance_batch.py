"""How a conformance batch sorts what went wrong with its guests, without
booting any: the guest runner is a stand-in that simulates a guest timing
out on a loaded host (machinery: could not run) and a backend refusing the
configuration (an answer: the test fails)."""

from __future__ import annotations

import threading

import pytest

from conformance.backends import Batch, Case, CouldNotRun, _parallel, make_case
from kvmcpuid_virt.analysis.backend import Backend
from kvmcpuid_virt.config.build import Policy, build
from kvmcpuid_virt.errors import ProbeError, ProbeTimeoutError
from kvmcpuid_virt.fsutil import load_dump
from kvmcpuid_virt.probe.libvirt import DomainRefusedError
from kvmcpuid_virt.probe.result import ProbeResult
from tests.conftest import DATA, FACTS


def _cases() -> list[Case]:
    table = load_dump(str(DATA / "x86_64-cpuid-EPYC-9334-32-Core.xml")).table
    full = build(table, facts=FACTS)
    return [make_case("full", full, FACTS)] + [
        make_case(f"off:{name}", build(table, Policy(disable=(name,)), facts=FACTS), FACTS)
        for name in ("lahf-lm", "cx16", "abm")
    ]


def _batch(failures: dict[str, list[BaseException]]) -> tuple[Batch, dict[str, int]]:
    """A QEMU batch whose guests raise, in turn, the errors listed for them."""
    calls: dict[str, int] = {}
    lock = threading.Lock()

    def run(case: Case) -> ProbeResult:
        with lock:
            n = calls[case.id] = calls.get(case.id, 0) + 1
        errors = failures.get(case.id, [])
        if n <= len(errors):
            raise errors[n - 1]
        return ProbeResult(case.expected, None, 0.1, Backend.QEMU)

    return _parallel(Backend.QEMU, _cases(), run, workers=3), calls


def test_simulated_guest_timing_out_in_the_batch_runs_once_more_alone() -> None:
    batch, calls = _batch({"off:cx16": [ProbeTimeoutError("did not finish within 20 s")]})
    assert set(batch.results) == {"full", "off:lahf-lm", "off:cx16", "off:abm"}
    assert batch.reruns == {"off:cx16": "ProbeTimeoutError: did not finish within 20 s"}
    assert not batch.could_not_run and calls["off:cx16"] == 2 and calls["full"] == 1
    assert batch.notes[-1] == ("1 guest(s) the machinery could not run in the batch re-run "
                               "alone: 1 ran")


def test_simulated_guest_timing_out_again_could_not_run() -> None:
    timeout = ProbeTimeoutError("did not finish within 20 s")
    batch, calls = _batch({"off:cx16": [timeout, timeout]})
    assert calls["off:cx16"] == 2 and "off:cx16" not in batch.results
    assert batch.could_not_run == {"off:cx16": "ProbeTimeoutError: did not finish within 20 s"}
    batch.require(["full", "off:abm"])  # the others ran
    with pytest.raises(CouldNotRun, match="qemu: off:cx16: the guest could not run: "
                                          "ProbeTimeoutError"):
        batch.require(["full", "off:cx16"])
    with pytest.raises(CouldNotRun):
        batch.get("off:cx16")


def test_simulated_refusal_is_an_answer_not_rerun() -> None:
    batch, calls = _batch({"off:abm": [DomainRefusedError("unknown CPU model")],
                           "off:cx16": [ProbeError("QEMU exited with status 1")]})
    assert calls["off:abm"] == calls["off:cx16"] == 1 and not batch.reruns
    assert not batch.could_not_run
    batch.require(["off:abm", "off:cx16"])  # no CouldNotRun: the tests judge these
    with pytest.raises(AssertionError, match="qemu: off:abm: the guest did not run: "
                                             "DomainRefusedError: unknown CPU model"):
        batch.get("off:abm")
