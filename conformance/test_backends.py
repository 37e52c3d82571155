"""Per backend (raw KVM, QEMU, libvirt): the full supported configuration,
every supported feature turned off one at a time, a few named CPU models and
a cluster baseline, each checked inside a booted guest.

Bits the host-control probe found this host does not control make a test
xfail(strict=True, raises=UncontrolledMismatch): decided before looking at
the guest, from the host-control result and the expected tables alone, so
the test fails (XPASS strict) the day the host honours the bits, and any
mismatch on a controlled bit still fails it (a plain AssertionError is not
the expected exception). Every test records how many bits the host controls
were compared and matched, so the report shows what an xfail still proved.

A guest the suite's machinery could not run (libvirtd refusing past its
retries, a timeout) is an ERROR in the `guests` fixture (CouldNotRun), never
a failure of the test.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from conformance import report as reporting
from conformance.backends import Batch, Case
from conformance.checks import (
    KNOWN_RENDER_GAPS,
    KnownGap,
    Outcome,
    UncontrolledMismatch,
    at_stake,
    check_delta,
    check_table,
    predicted_gaps,
)
from conformance.plan import Plan
from kvmcpuid_virt.analysis.backend import Backend
from kvmcpuid_virt.analysis.compare import GUEST_STATE_MASKS, Ignore
from kvmcpuid_virt.cpuid.features import registry
from kvmcpuid_virt.cpuid.table import CpuidTable, Register
from kvmcpuid_virt.probe.hostcontrol import VCPU_STATE, HostControl

Word = tuple[int, int, Register]


def _uncontrolled(control: HostControl, backend: Backend) -> dict[Word, int]:
    """Uncontrolled bits per word. Bits that follow vCPU state (APIC enable,
    CR4) count as uncontrolled on raw KVM, where nothing sets that state up
    from the table; QEMU and libvirt set it up from the configuration (no
    APIC device with apic=off), so there they must follow it."""
    out: dict[Word, int] = {}
    for (leaf, sub, reg), mask in control.uncontrolled():
        if backend != Backend.KVM:
            for bit in range(32):
                if control.reasons.get((leaf, sub, reg, bit)) == VCPU_STATE:
                    mask &= ~(1 << bit)
        if mask:
            out[(leaf, sub, reg)] = mask
    return out


def _libvirt_ignores(*cases: Case) -> tuple[Ignore, ...]:
    """Features a <cpu> element cannot carry (the adapter's own list, for
    each of the cases): their bits follow libvirt's defaults, so libvirt's
    guest is not held to them."""
    from kvmcpuid_virt.adapters.libvirt import unexpressible

    reg = registry()
    rules = {}
    for case in cases:
        for u in unexpressible(case.config, case.facts):
            f = reg.lookup(u.name)
            rules[u.name] = Ignore(f.leaf, f.subleaf, f.reg, f.mask, f"not in <cpu>: {u.where}")
    return tuple(rules.values())


def _ignores(backend: Backend, *cases: Case) -> tuple[Ignore, ...]:
    extra = _libvirt_ignores(*cases) if backend == Backend.LIBVIRT else ()
    return GUEST_STATE_MASKS + extra


@pytest.fixture
def guests(request: pytest.FixtureRequest, batch: Batch, the_plan: Plan) -> Batch:
    """The batch, once every guest this test reads has run: one the suite's
    machinery could not run is an ERROR of this setup (CouldNotRun, with
    its cause), so the test never judges the host on a guest that is not there."""
    params = request.node.callspec.params
    needs: dict[str, Callable[[], list[str]]] = {
        "test_full_config": lambda: [the_plan.full.id],
        "test_feature_off": lambda: [the_plan.full.id, the_plan.off[params["feature"]].id],
        "test_model": lambda: [the_plan.models[params["model"]].id],
        "test_baseline": lambda: [] if the_plan.baseline is None else [the_plan.baseline.id],
    }
    batch.require(needs[request.node.originalname]())
    return batch


def _stake_names(stake: list[str]) -> list[str]:
    # Names only: why each bit is out of this host's control is listed once,
    # in the report's host-control section.
    return [s.split(" (", 1)[0] for s in stake]


def _xfail_if(request: pytest.FixtureRequest, stake: list[str], gaps: list[str]) -> None:
    """Strict xfail, decided before the guest is looked at: for uncontrolled
    bits at stake and for known gaps of this project (checks.KNOWN_GAPS)."""
    raises: tuple[type[AssertionError], ...] = ()
    parts = []
    if stake:
        raises += (UncontrolledMismatch,)
        names = _stake_names(stake)
        parts.append(f"this host does not control {len(names)} bit(s) at stake: "
                     + ", ".join(names[:8]) + (", ..." if len(names) > 8 else ""))
    if gaps:
        raises += (KnownGap,)
        parts.append("known gap: " + "; ".join(gaps))
    if raises:
        request.applymarker(pytest.mark.xfail(strict=True, raises=raises,
                                              reason=" | ".join(parts)))


def _absolute(request: pytest.FixtureRequest, backend: Backend, kind: str, subject: str,
              case: Case, batch: Batch, control: HostControl, forced: CpuidTable,
              the_plan: Plan) -> None:
    ignores = _ignores(backend, case)
    unc = _uncontrolled(control, backend)
    gaps = predicted_gaps(backend, kind, case.expected) + _render_gap(backend, case)
    stake = at_stake(case.expected, forced, uncontrolled=unc, reasons=control.reasons,
                     ignore=ignores)
    _xfail_if(request, stake, gaps)
    result = batch.get(case.id)
    outcome = check_table(case.expected, result.observed, backend=backend,
                          uncontrolled=unc, reasons=control.reasons,
                          supported=the_plan.supported, vmm=result.vmm_view, ignore=ignores)
    _finish(request, backend, kind, subject, outcome, result.seconds, case, stake)


def _render_gap(backend: Backend, case: Case) -> list[str]:
    why = case.render_errors.get(backend, "")
    return [why for b, text in KNOWN_RENDER_GAPS if b == backend and text in why]


def _finish(request: pytest.FixtureRequest, backend: Backend, kind: str, subject: str,
            outcome: Outcome, seconds: float, case: Case, stake: list[str]) -> None:
    reporting.record(request, backend=backend, kind=kind, subject=subject,
                     issues=[i.text() for i in outcome.issues],
                     bits=outcome.bits_compared, controlled_bits=outcome.controlled_bits,
                     controlled_matched=outcome.controlled_matched,
                     uncontrolled_differ=[i.label for i in outcome.uncontrolled],
                     at_stake=_stake_names(stake), seconds=seconds,
                     qemu_cpu=case.qemu_cpu if backend == Backend.QEMU else None)
    assert outcome.bits_compared > 0, "no bits compared: the guest answered nothing we check"
    outcome.raise_for(f"{backend} {subject}", backend, kind)


def test_full_config(request: pytest.FixtureRequest, backend: Backend, guests: Batch,
                     the_plan: Plan, control: HostControl, forced: CpuidTable) -> None:
    """Every feature this host supports, as the adapters render it: the guest
    sees the expected table on every feature word."""
    _absolute(request, backend, "full", "full", the_plan.full, guests, control, forced,
              the_plan)


def test_feature_off(request: pytest.FixtureRequest, backend: Backend, feature: str,
                     guests: Batch, the_plan: Plan, control: HostControl) -> None:
    """The full configuration with `feature` off: compared with the full
    configuration's guest, the guest loses exactly the bits the two expected
    tables differ in (the feature, and what the policy couples to it)."""
    full, off = the_plan.full, the_plan.off[feature]
    ignores = _ignores(backend, full, off)
    if backend == Backend.LIBVIRT:
        f = registry().lookup(feature)
        if any(rule.applies(f.leaf, f.subleaf, f.reg) and rule.mask & f.mask
               for rule in ignores[len(GUEST_STATE_MASKS):]):
            pytest.skip(f"libvirt: <cpu> cannot express {feature} "
                        "(adapters.libvirt.unexpressible); libvirt's default applies")
    unc = _uncontrolled(control, backend)
    stake = at_stake(off.expected, full.expected, uncontrolled=unc, reasons=control.reasons,
                     ignore=ignores)
    _xfail_if(request, stake,
              predicted_gaps(backend, "off", off.expected) + _render_gap(backend, off))
    guest_full = guests.get(full.id)
    guest_off = guests.get(off.id)
    outcome = check_delta(full.expected, off.expected, guest_full.observed, guest_off.observed,
                          uncontrolled=unc, reasons=control.reasons, ignore=ignores)
    _finish(request, backend, "off", feature, outcome, guest_off.seconds, off, stake)


def test_model(request: pytest.FixtureRequest, backend: Backend, model: str, guests: Batch,
               the_plan: Plan, control: HostControl, forced: CpuidTable) -> None:
    """A named CPU model this host can run (newest first)."""
    _absolute(request, backend, "model", model, the_plan.models[model], guests, control,
              forced, the_plan)


def test_baseline(request: pytest.FixtureRequest, backend: Backend, guests: Batch,
                  the_plan: Plan, control: HostControl, forced: CpuidTable) -> None:
    """The cluster baseline of this host and a second one: a real CPU dump
    of its vendor, or itself narrowed to a named model (plan._baseline)."""
    if the_plan.baseline is None:
        pytest.skip(f"baseline: {the_plan.baseline_why}")
    _absolute(request, backend, "baseline", "baseline", the_plan.baseline, guests, control,
              forced, the_plan)
