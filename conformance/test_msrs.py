"""Feature MSRs on every backend: the full configuration's guest reads, with
RDMSR, each feature MSR its own CPUID enumerates (probe/image: the guest
decides from its CPUID, so an absent MSR never faults), and every MSR
feature the configuration decides must read as configured
(test_msr_feature[qemu-mds-no], ...). An MSR feature configured on whose
enumerating CPUID bit this host loses below KVM (the feature-MSR vCPU
trial's finding, ToolFacts.msr_delivery) is a strict xfail, decided before
the guest is read.

IA32_BIOS_SIGN_ID, which every guest can read, carries a value the suite
chooses: raw KVM writes it with KVM_SET_MSRS, QEMU gets it as its ucode-rev
property; the guest must read exactly that (libvirt has no setting for it).
"""

from __future__ import annotations

from typing import Final

import pytest

from conformance.backends import BACKENDS, CouldNotRun
from conformance.plan import Plan, plan
from kvmcpuid_virt.analysis.backend import Backend
from kvmcpuid_virt.analysis.msr_compare import PROBED, compare_msrs, expectations, msr_queries
from kvmcpuid_virt.cpuid.msr_features import msr_registry
from kvmcpuid_virt.cpuid.table import REGISTERS
from kvmcpuid_virt.errors import KvmcpuidError
from kvmcpuid_virt.probe import image
from kvmcpuid_virt.probe.result import ProbeResult
from kvmcpuid_virt.verify import could_not_run

TIMEOUT: Final = 20.0
# A value no KVM or QEMU default has: the guest can only read it if it came
# through the backend.
UCODE_REV: Final = 0x0C0F_FEE0_0000_0000


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Ids backend first, as the suite's report reads them: [qemu-mds-no].
    if "msr_feature" not in metafunc.fixturenames:
        return
    p = plan()
    names = sorted(p.full.config.msr_features) if isinstance(p, Plan) else []
    if not names:
        why = p if isinstance(p, str) else "the full configuration decides no MSR feature"
        params = [pytest.param(b, "-", marks=pytest.mark.skip(reason=why), id=f"{b}-none")
                  for b in BACKENDS]  # fmt: skip
    else:
        params = [pytest.param(b, n, id=f"{b}-{n}") for b in BACKENDS for n in names]
    metafunc.parametrize(("on_backend", "msr_feature"), params)


_GUESTS: dict[tuple[Backend, int | None], ProbeResult | BaseException] = {}


def _boot(the_plan: Plan, backend: Backend, request: pytest.FixtureRequest,
          ucode_rev: int | None = None) -> ProbeResult:  # fmt: skip
    """The full configuration's guest on `backend` (with IA32_BIOS_SIGN_ID
    set to `ucode_rev`, where the backend can), booted once per session."""
    key = (backend, ucode_rev)
    if key not in _GUESTS:
        full = the_plan.full
        queries = list(full.queries)
        mq = msr_queries()
        try:
            if backend == Backend.KVM:
                from kvmcpuid_virt.probe.kvm import run_kvm

                _, to_set = expectations(full.config, backend, the_plan.facts.host_msrs)
                if ucode_rev is not None:
                    to_set = {**(to_set or {}), 0x8B: ucode_rev}
                _GUESTS[key] = run_kvm(full.expected, queries, TIMEOUT, msrs=to_set,
                                       msr_queries=mq)  # fmt: skip
            elif backend == Backend.QEMU:
                from kvmcpuid_virt.probe.qemu import run_qemu

                cpu = full.qemu_cpu + ("" if ucode_rev is None else f",ucode-rev={ucode_rev:#x}")
                _GUESTS[key] = run_qemu(cpu, queries, TIMEOUT,
                                        qemu=request.getfixturevalue("qemu_binary"),
                                        msr_queries=mq)  # fmt: skip
            else:
                from kvmcpuid_virt.adapters.libvirt import kvm_features_element
                from kvmcpuid_virt.probe.libvirt import run_libvirt

                _GUESTS[key] = run_libvirt(full.libvirt_cpu, queries, TIMEOUT,
                                           request.getfixturevalue("libvirt_uri"),
                                           features=kvm_features_element(full.config),
                                           msr_queries=mq)  # fmt: skip
        except (KvmcpuidError, OSError) as exc:
            _GUESTS[key] = exc
    got = _GUESTS[key]
    if isinstance(got, BaseException):
        if could_not_run(got):
            raise CouldNotRun(f"{backend}: the MSR guest could not run: {got}")
        pytest.fail(f"{backend}: the MSR guest did not run: {got}")
    return got


def test_msr_feature(the_plan: Plan, on_backend: Backend, msr_feature: str,
                     request: pytest.FixtureRequest) -> None:  # fmt: skip
    backend = on_backend
    config = the_plan.full.config
    f = msr_registry().lookup(msr_feature)
    if f.msr not in PROBED:
        pytest.skip(f"the probe guest does not read MSR {f.msr:#x} ({f.position})")
    on = config.msr_features[msr_feature]
    info = msr_registry().msr(f.msr)
    delivery = the_plan.facts.msr_delivery
    gate = info.enumerated_by if info is not None else None
    if on and delivery is not None and gate in delivery.cpuid_lost:
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            f"{gate} is lost below KVM on this host: the guest has no {info.name if info else ''}"
        )))  # fmt: skip
    guest = _boot(the_plan, backend, request)
    value = guest.msrs.get(f.msr)
    seen = value is not None and value & f.mask == f.mask
    where = "absent (its CPUID does not enumerate the MSR)" if value is None else f"{value:#x}"
    assert seen == on, (f"{msr_feature} ({f.position}) configured {'on' if on else 'off'}, "
                        f"the guest reads MSR {f.msr:#x} {where}")  # fmt: skip


def test_msrs_as_configured(the_plan: Plan, backend: Backend,
                            request: pytest.FixtureRequest) -> None:  # fmt: skip
    """The whole MSR verdict verify gives (analysis/msr_compare)."""
    config = the_plan.full.config
    guest = _boot(the_plan, backend, request)
    expected, _ = expectations(config, backend, the_plan.facts.host_msrs)
    host = the_plan.facts.host_msrs
    cmp = compare_msrs(expected, guest.msrs, backend, vmm=guest.msr_vmm,
                       offered=None if host is None else host.as_dict())  # fmt: skip
    assert cmp.ok, cmp.summary()
    # Whatever the guest read, it read only where its own CPUID said the MSR exists.
    for index, value in guest.msrs.items():
        q = next(q for q in msr_queries() if q[0] == index)
        enumerated = any(guest.observed.get(q[1], q[2], r) & m
                         for r, m in zip(REGISTERS, q[3:], strict=True))  # fmt: skip
        assert (value is not None) == bool(enumerated), hex(index)


def test_ucode_rev_reaches_the_guest(the_plan: Plan, backend: Backend,
                                     request: pytest.FixtureRequest) -> None:  # fmt: skip
    if backend == Backend.LIBVIRT:
        pytest.skip("libvirt's <cpu> has no setting for IA32_BIOS_SIGN_ID (QEMU's ucode-rev)")
    guest = _boot(the_plan, backend, request, ucode_rev=UCODE_REV)
    assert guest.msrs.get(0x8B) == UCODE_REV, (
        f"the guest reads IA32_BIOS_SIGN_ID {guest.msrs.get(0x8B)!r}, the {backend} was given "
        f"{UCODE_REV:#x}")
    assert image.msr_query(0x8B, None) in msr_queries()
