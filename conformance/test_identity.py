"""Per VMM backend (QEMU, libvirt) and per configuration it boots (the full
one, each named model, the baseline): the guest's vendor, family / model /
stepping (extended parts included), max basic and extended leaves, brand
string and physical address bits equal what QEMU itself defines for that
configuration (conformance/identity.py: QEMU's query-cpu-model-expansion,
asked live). Raw KVM boots this project's table and has no QEMU model: its
fields are held to the configuration by `kvmcpuid verify`.
"""

from __future__ import annotations

import pytest

from conformance.backends import Batch
from conformance.identity import VMMS, QemuIdentity, check_identity, cpu_value, identity_cases
from conformance.plan import Plan, plan
from kvmcpuid_virt.analysis.backend import Backend


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "subject" not in metafunc.fixturenames:
        return
    p = plan()
    subjects = list(identity_cases(p)) if isinstance(p, Plan) else []
    if not subjects:
        why = p if isinstance(p, str) else "no configuration to test"
        metafunc.parametrize(("vmm", "subject"), [
            pytest.param(b, "-", marks=pytest.mark.skip(reason=why), id=f"{b}-none")
            for b in VMMS])
        return
    metafunc.parametrize(("vmm", "subject"),
                         [pytest.param(b, s, id=f"{b}-{s}") for b in VMMS for s in subjects])


def test_identity_is_qemus(request: pytest.FixtureRequest, vmm: Backend, subject: str,
                           the_plan: Plan, qemu_defined: dict[str, QemuIdentity]) -> None:
    case = identity_cases(the_plan)[subject]
    if vmm in case.render_errors:
        pytest.skip(case.render_errors[vmm])
    batch: Batch = request.getfixturevalue(f"batch_{vmm}")
    batch.require([case.id])
    guest = batch.get(case.id).observed
    problems = check_identity(qemu_defined[cpu_value(vmm, case)], guest)
    assert not problems, f"{vmm} {subject}: " + "; ".join(problems)
