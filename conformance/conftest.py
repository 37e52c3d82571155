"""The conformance suite: does this KVM host (its kernel, QEMU and libvirt)
give guests exactly the CPUID they were configured with? Parts whose
prerequisite is missing skip with one clear reason each.

Every guest of a backend is booted once per session, in a batch (session
fixtures `batch_kvm`, `batch_qemu`, `batch_libvirt`); the tests look their
results up. The report plugin (conformance/report.py) writes
reports/conformance.{json,md,html}; pytest itself writes the JUnit XML.

The suite's options live here and in conformance/pytest.ini, not on tox's
command line, so any pytest arguments can be added (`tox -e conformance --
-k avx2`, `-x`, `--lf`, a test id): the reports go to the checkout's
reports/ (or $KVMCPUID_REPORTS, or --conformance-report-dir) unless told
otherwise, the JUnit XML beside them unless --junitxml says where.

A guest the suite's machinery could not run raises CouldNotRun
(conformance/backends.py) from a fixture: pytest reports an ERROR, and the
report counts the cell as "could not run", with the cause.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Generator, Iterator

import pytest

from conformance import report as reporting
from conformance.backends import (
    BACKENDS,
    LIBVIRT_LIMIT,
    LIBVIRT_STATS,
    Batch,
    CouldNotRun,
    run_kvm_cases,
    run_libvirt_cases,
    run_qemu_cases,
)
from conformance.identity import VMMS, QemuIdentity, cpu_value, identity_cases, qemu_identities
from conformance.plan import Plan, plan
from kvmcpuid_virt.analysis.backend import Backend
from kvmcpuid_virt.cpuid.table import CpuidTable
from kvmcpuid_virt.kvm import Kvm
from kvmcpuid_virt.probe.hostcontrol import HostControl

LIBVIRT_URI = os.environ.get("KVMCPUID_LIBVIRT_URI", "qemu:///system")


def pytest_addoption(parser: pytest.Parser) -> None:
    reporting.addoption(parser)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # First: the JUnit XML default must be in place before pytest's junitxml
    # plugin reads --junitxml in its own pytest_configure.
    reporting.configure(config)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A CouldNotRun (in any phase) marks the report, so that the suite's
    report shows the cell as "could not run", not as a failure of the host."""
    report = yield
    if call.excinfo is not None and call.excinfo.errisinstance(CouldNotRun):
        reporting.mark_could_not_run(report, str(call.excinfo.value))
    return report


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Ids from the live plan: test_feature_off[qemu-avx2], test_model[kvm-EPYC]."""
    names = metafunc.fixturenames
    p = plan()
    if "feature" in names:
        subjects = sorted(p.off) if isinstance(p, Plan) else []
        _parametrize(metafunc, "feature", subjects, p)
    elif "model" in names:
        subjects = list(p.models) if isinstance(p, Plan) else []
        _parametrize(metafunc, "model", subjects, p)
    elif "backend" in names:
        metafunc.parametrize("backend", BACKENDS)


def _parametrize(metafunc: pytest.Metafunc, name: str, subjects: list[str],
                 p: Plan | str) -> None:
    if not subjects:
        # One visible skipped id per backend rather than an empty, silent set.
        why = p if isinstance(p, str) else f"the plan has no {name} to test on this host"
        params = [pytest.param(b, "-", marks=pytest.mark.skip(reason=why), id=f"{b}-none")
                  for b in BACKENDS]
    else:
        params = [pytest.param(b, s, id=f"{b}-{s}") for b in BACKENDS for s in subjects]
    metafunc.parametrize(("backend", name), params)


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm: the KVM API checks need a KVM host")
    with Kvm() as k:
        yield k


@pytest.fixture(scope="session")
def the_plan() -> Plan:
    p = plan()
    if isinstance(p, str):
        pytest.skip(p)
    reporting.EXTRAS["plan_notes"] = list(p.notes)
    reporting.EXTRAS["baseline"] = p.baseline_why
    return p


@pytest.fixture(scope="session")
def control(the_plan: Plan) -> HostControl:
    """Which bits this host lets KVM_SET_CPUID2 control (cached per host
    fingerprint by the host-control probe)."""
    from kvmcpuid_virt.probe.hostcontrol import host_control

    hc = host_control()
    reporting.EXTRAS["host_control"] = hc.summary()
    reporting.EXTRAS["host_control_notes"] = list(hc.notes)
    return hc


@pytest.fixture(scope="session")
def forced(the_plan: Plan, control: HostControl) -> CpuidTable:
    """What this host forces: the raw-KVM guest of the unmodified supported
    table. Bits that do not follow KVM_SET_CPUID2 read these values whatever
    the table says, so an absolute check is at stake on an uncontrolled bit
    exactly where its expected value differs from this."""
    from conformance.hostcpuid import pinned
    from kvmcpuid_virt.probe import image
    from kvmcpuid_virt.probe.kvm import run_kvm

    with pinned():
        return run_kvm(the_plan.supported, image.default_queries(the_plan.supported)).observed


def _record_batch(batch: Batch) -> Batch:
    reporting.EXTRAS.setdefault("batches", {})[batch.backend] = {  # type: ignore[index]
        "seconds": round(batch.seconds, 3), "guests": len(batch.results),
        "errors": len(batch.errors), "could_not_run": len(batch.could_not_run),
        "reruns": batch.reruns, "notes": batch.notes,
    }
    return batch


@pytest.fixture(scope="session")
def batch_kvm(the_plan: Plan) -> Batch:
    return _record_batch(run_kvm_cases(the_plan.cases()))


@pytest.fixture(scope="session")
def qemu_binary() -> str:
    # $KVMCPUID_QEMU first, as the package itself resolves it (learn.find_qemu).
    from kvmcpuid_virt.toolfacts.learn import find_qemu

    path = find_qemu()
    if path is None:
        pytest.skip("QEMU backend: qemu-system-x86_64 is not installed (or set KVMCPUID_QEMU)")
    return path


@pytest.fixture(scope="session")
def batch_qemu(the_plan: Plan, qemu_binary: str) -> Batch:
    return _record_batch(run_qemu_cases(the_plan.cases(), qemu_binary))


@pytest.fixture(scope="session")
def libvirt_uri(qemu_binary: str) -> str:
    if importlib.util.find_spec("kvmcpuid_virt.probe.libvirt") is None:
        pytest.skip("libvirt backend: kvmcpuid_virt.probe.libvirt is not available")
    try:
        import libvirt
    except ImportError:
        pytest.skip("libvirt backend: libvirt-python is not installed")
    try:
        conn = libvirt.open(LIBVIRT_URI)
    except libvirt.libvirtError as exc:
        pytest.skip(f"libvirt backend: no libvirtd at {LIBVIRT_URI}: "
                    f"{' '.join(str(exc).split())}")
    conn.close()
    return LIBVIRT_URI


@pytest.fixture(scope="session")
def batch_libvirt(the_plan: Plan, libvirt_uri: str) -> Batch:
    return _record_batch(run_libvirt_cases(the_plan.cases(), libvirt_uri))


@pytest.fixture(scope="session")
def qemu_defined(the_plan: Plan, qemu_binary: str) -> dict[str, QemuIdentity]:
    """QEMU's own expansion of every -cpu value whose identity the suite
    checks (conformance/identity.py), from one QEMU."""
    cases = identity_cases(the_plan).values()
    return qemu_identities(qemu_binary,
                           [cpu_value(b, c) for b in VMMS for c in cases if c.qemu_cpu])


def libvirt_retries() -> dict[str, object]:
    """Every libvirt guest of the session: attempts, retries by cause, the
    limit on guests in flight (all libvirt batches, the mutants' included)."""
    doc = LIBVIRT_STATS.as_json(LIBVIRT_LIMIT)
    doc["summary"] = LIBVIRT_STATS.summary(LIBVIRT_LIMIT)
    return doc


@pytest.fixture
def batch(request: pytest.FixtureRequest, backend: Backend) -> Batch:
    """The session batch of this test's backend (skips when it has none)."""
    result = request.getfixturevalue(f"batch_{backend}")
    assert isinstance(result, Batch)
    return result


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    reporting.logreport(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if LIBVIRT_STATS.guests:
        reporting.EXTRAS["libvirt_retries"] = libvirt_retries()
    reporting.sessionfinish(session, exitstatus)
