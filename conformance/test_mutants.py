"""The suite catches broken adapters: each test breaks an adapter on
purpose (a mutant), runs the same check the suite runs on the same backend,
and asserts that the check FAILS, while the unbroken adapter passes the same
check (so the failure is the mutant's doing).

Mutants:
- qemu-swap: two feature names swapped in the QEMU adapter's name mapping;
- libvirt-disable-as-require: the libvirt adapter writes policy='require'
  for features that are off (a source mutation of adapters/libvirt.py);
- one VMM wrapper per field class (identity: stepping, family; max leaf:
  level; brand: model-id; address size: phys-bits) appending a property to
  the guest's -cpu: the suite's identity check and `kvmcpuid verify` both
  fail naming the field;
- libvirt-host-as-custom: this host's full CPU rendered on a cpu_map model
  (the libvirt adapter's old bug): both name the identity and max leaf.
"""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conformance.backends import (
    Batch,
    Case,
    make_case,
    run_libvirt_cases,
    run_qemu_cases,
)
from conformance.checks import KnownGap, UncontrolledMismatch, check_delta, check_table
from conformance.identity import QemuIdentity, check_identity, cpu_value
from conformance.plan import Plan
from conformance.test_backends import _ignores, _uncontrolled
from kvmcpuid_virt.analysis.backend import Backend
from kvmcpuid_virt.cpuid.features import FeatureKind, registry
from kvmcpuid_virt.cpuid.table import Register
from kvmcpuid_virt.probe.hostcontrol import HostControl

Word = tuple[int, int, Register]
# The line of adapters/libvirt.py the libvirt mutant rewrites.
LIBVIRT_POLICY = 'policy="require" if on else "disable"'


def _controlled(control: HostControl, backend: Backend = Backend.QEMU) -> dict[Word, int]:
    """The uncontrolled masks exactly as the suite uses them."""
    return dict(_uncontrolled(control, backend))


def _verdict(check: Callable[[], None]) -> str:
    """'pass', or 'FAIL: ...' when the check fails the way the suite fails a
    test (any AssertionError that is not an expected-failure kind)."""
    try:
        check()
    except (UncontrolledMismatch, KnownGap) as exc:
        return f"xfail: {exc}"
    except AssertionError as exc:
        return f"FAIL: {exc}"
    return "pass"


def _delta_check(plan_: Plan, full: Case, off: Case, batch_full: Batch, batch_off: Batch,
                 control: HostControl) -> Callable[[], None]:
    def check() -> None:
        outcome = check_delta(full.expected, off.expected,
                              batch_full.get(full.id).observed, batch_off.get(off.id).observed,
                              uncontrolled=_controlled(control), reasons=control.reasons)
        outcome.raise_for(f"mutant {off.id}", batch_off.backend, "off")
    return check


def _pick_two(plan_: Plan, control: HostControl) -> tuple[str, str]:
    """Two plain features on in the full configuration whose bits this host
    controls: a swap of their names must show."""
    unc = _controlled(control)
    reg = registry()
    picked = []
    for name in plan_.full.config.enabled():
        f = reg.lookup(name)
        if f.kind == FeatureKind.PLAIN and not unc.get((f.leaf, f.subleaf, f.reg), 0) & f.mask:
            picked.append(name)
        if len(picked) == 2:
            return picked[0], picked[1]
    pytest.skip("qemu-swap: this host controls fewer than two supported plain features")


def test_mutant_qemu_names_swapped(the_plan: Plan, control: HostControl, batch_qemu: Batch,
                                   qemu_binary: str, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = _pick_two(the_plan, control)
    full = the_plan.full
    # Unbroken adapter: the suite's own results for these features pass.
    for name in (a, b):
        assert _verdict(_delta_check(the_plan, full, the_plan.off[name], batch_qemu,
                                     batch_qemu, control)) == "pass", name
    qemu_adapter = importlib.import_module("kvmcpuid_virt.adapters.qemu")
    original = qemu_adapter._qemu_name
    swap = {a: b, b: a}
    monkeypatch.setattr(qemu_adapter, "_qemu_name",
                        lambda reg, name: original(reg, swap.get(name, name)))
    mutants = [make_case(f"mutant-{c.id}", c.config, the_plan.facts) for c in (the_plan.off[a],
                                                                 the_plan.off[b])]
    assert all(f"{a}=off" not in m.qemu_cpu for m in mutants[:1]), "the mutant did not apply"
    mutant_batch = run_qemu_cases(mutants, qemu_binary)
    verdicts = [_verdict(_delta_check(the_plan, full, m, batch_qemu, mutant_batch, control))
                for m in mutants]
    assert all(v.startswith("FAIL") for v in verdicts), (
        f"the suite did not catch {a} and {b} swapped in the QEMU adapter: {verdicts}")


@pytest.fixture
def libvirt_mutant(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """adapters.libvirt with 'disable' written as 'require', patched into
    sys.modules (make_case imports the adapter at call time)."""
    original = importlib.import_module("kvmcpuid_virt.adapters.libvirt")
    source = inspect.getsource(original)
    # Every <feature> the adapter writes (CPUID and feature-MSR ones) is mutated.
    assert source.count(LIBVIRT_POLICY) >= 1, (
        "the mutation point moved; update LIBVIRT_POLICY to keep this mutant meaningful")
    mutant = types.ModuleType(original.__name__)
    mutant.__file__ = original.__file__
    exec(compile(source.replace(LIBVIRT_POLICY, 'policy="require"'), "<libvirt mutant>",
                 "exec"), mutant.__dict__)
    monkeypatch.setitem(sys.modules, original.__name__, mutant)
    yield mutant


def test_mutant_libvirt_disable_as_require(the_plan: Plan, control: HostControl,
                                           batch_libvirt: Batch, libvirt_uri: str,
                                           libvirt_mutant: types.ModuleType) -> None:
    full = the_plan.full
    unc = _controlled(control, Backend.LIBVIRT)

    def check(batch: Batch, case: Case) -> Callable[[], None]:
        def run() -> None:
            result = batch.get(case.id)
            check_table(case.expected, result.observed, backend=Backend.LIBVIRT,
                        uncontrolled=unc, reasons=control.reasons,
                        ignore=_ignores(Backend.LIBVIRT, full)
                        ).raise_for("mutant libvirt full", Backend.LIBVIRT, "full")
        return run

    mutant = make_case("mutant-full", full.config, the_plan.facts)
    assert 'policy="disable"' not in mutant.libvirt_cpu.replace("'", '"'), "mutant not applied"
    assert 'policy="disable"' in full.libvirt_cpu.replace("'", '"'), (
        "the full configuration turns nothing off here: this mutant cannot show")
    baseline = _verdict(check(batch_libvirt, full))
    assert not baseline.startswith("FAIL"), f"the unbroken adapter fails already: {baseline}"
    verdict = _verdict(check(run_libvirt_cases([mutant], libvirt_uri, keep_failed_logs=False),
                             mutant))
    assert verdict.startswith("FAIL"), (
        f"the suite did not catch 'disable' rendered as 'require': {verdict}")


# --- field mutants: a VMM that changes one field of each class ------------------------

# One -cpu property a VMM wrapper appends, per field class, and the field
# each check must name: (verify's FIELD_RULES name, the suite's identity
# check's name). family=23 keeps base family 0xF on this AMD host, so verify
# sees the extended family change. host-phys-bits=off: with it on (as for
# -cpu host), QEMU ignores phys-bits.
FIELD_MUTANTS: dict[str, tuple[str, str]] = {
    "stepping=9": ("stepping", "stepping"),
    "family=23": ("extended family", "family"),
    "level=7": ("max basic leaf", "max basic leaf"),
    "model-id=Evil": ("brand string", "brand string"),
    "host-phys-bits=off,phys-bits=36": ("physical address bits", "physical address bits"),
}


def _qemu_wrapper(tmp_path: Path, qemu_binary: str, prop: str) -> Path:
    """A QEMU that appends `prop` to the guest's -cpu value, then runs the real one."""
    wrapper = tmp_path / "qemu-mutant"
    wrapper.write_text(
        "#!/bin/bash\nargs=(); next=0\n"
        'for a in "$@"; do\n'
        f'  if [ $next = 1 ]; then a="$a,{prop}"; next=0; fi\n'
        '  [ "$a" = "-cpu" ] && next=1; args+=("$a")\n'
        "done\n"
        f'exec {qemu_binary} "${{args[@]}}"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def _verify_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmcpuid_virt.cli", "verify", *args],
                          capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)


@pytest.mark.parametrize("prop", sorted(FIELD_MUTANTS))
def test_mutant_vmm_changing_one_field(the_plan: Plan, batch_qemu: Batch, qemu_binary: str,
                                       qemu_defined: dict[str, QemuIdentity], tmp_path: Path,
                                       prop: str) -> None:
    """A VMM that changes one field: the suite's identity check (against
    QEMU's own expansion) and `kvmcpuid verify --qemu WRAPPER` both fail,
    each naming the field; the unbroken QEMU passes the same check."""
    verify_name, suite_name = FIELD_MUTANTS[prop]
    full = the_plan.full
    want = qemu_defined[cpu_value(Backend.QEMU, full)]
    assert check_identity(want, batch_qemu.get(full.id).observed) == [], "unbroken QEMU fails"
    wrapper = _qemu_wrapper(tmp_path, qemu_binary, prop)
    mutant = run_qemu_cases([full], str(wrapper))
    problems = check_identity(want, mutant.get(full.id).observed)
    assert any(p.startswith(f"{suite_name}: QEMU defines ") for p in problems), (
        f"the suite did not catch {prop}: {problems}")
    r = _verify_cli("--backend", "qemu", "--qemu", str(wrapper))
    assert r.returncode == 1, r.stdout + r.stderr
    assert any(line.startswith(f"{verify_name}: configured ") for line in r.stdout.splitlines()
               ), f"verify did not name {verify_name}:\n{r.stdout}"


def test_mutant_libvirt_host_rendered_on_a_cpu_map_model(
    the_plan: Plan, batch_libvirt: Batch, libvirt_uri: str, control: HostControl,
    qemu_defined: dict[str, QemuIdentity], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The libvirt adapter as it was: this host's full CPU rendered as
    mode='custom' on a cpu_map model. The guest then has that model's
    family/model/stepping and max leaves: the suite's identity check and
    verify (its rendering mutated, its expectation not) both name them."""
    from kvmcpuid_virt import verify as verify_mod
    from kvmcpuid_virt.adapters import libvirt as lv

    full = the_plan.full
    want = qemu_defined[cpu_value(Backend.LIBVIRT, full)]
    assert check_identity(want, batch_libvirt.get(full.id).observed) == [], "unbroken fails"
    monkeypatch.setattr(lv, "base_model", lv.cpu_map_model)
    mutant = make_case("mutant-libvirt-custom", full.config, the_plan.facts)
    assert "mode=\"custom\"" in mutant.libvirt_cpu, "the mutant did not apply"
    batch = run_libvirt_cases([mutant], libvirt_uri, keep_failed_logs=False)
    problems = check_identity(want, batch.get(mutant.id).observed)
    assert any(p.startswith(("family: ", "model: ")) for p in problems), problems
    assert any(p.startswith("max basic leaf: ") for p in problems), problems

    real_render = lv.render
    monkeypatch.setattr(verify_mod, "render", lambda config, model, *a, **k: real_render(
        config, lv.cpu_map_model(config, the_plan.facts), *a, **k))
    monkeypatch.setattr(verify_mod, "base_model", lambda config, facts: "host")
    target = verify_mod.target_for(full.config, the_plan.facts)
    [report] = verify_mod.verify(target, [Backend.LIBVIRT], supported=the_plan.supported,
                                 uncontrolled=_controlled(control, Backend.LIBVIRT),
                                 reasons=control.reasons, timeout=20.0, libvirt_uri=libvirt_uri)
    assert report.comparison is not None and not report.ok, report.text()
    named = {m.name for m in report.comparison.field_failures}
    assert {"max basic leaf", "family"} & named and "max basic leaf" in named, named
