"""What the suite runs on this host, decided once per process from the live
KVM_GET_SUPPORTED_CPUID: the full supported configuration, one configuration
per supported feature turned off, a few named CPU models this host can run,
and a cluster baseline (this host with a real CPU dump of the same vendor
from tests/data/cpuid, or, for a vendor the dumps lack, with this host
narrowed to a named model: the whole plan runs on a checkout alone).

Test ids are generated from this plan at collection time, so the ids follow
the host: `test_feature_off[qemu-avx2]` exists only where avx2 is supported.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Final

from conformance.backends import Case, make_case
from kvmcpuid_virt.cpuid.table import CpuidTable
from kvmcpuid_virt.errors import KvmcpuidError
from kvmcpuid_virt.toolfacts.facts import ToolFacts

__all__ = ["MAX_MODELS", "Plan", "data_dir", "plan"]

# Named models tested: the newest ones this host can run (older models are
# subsets of the newer ones, so they add little).
MAX_MODELS: Final = 3
FULL: Final = "full"


def data_dir() -> Path:
    """Real CPU dumps: the repository's (tests/data/cpuid), or $KVMCPUID_DATA."""
    repo = Path(__file__).resolve().parent.parent
    return Path(os.environ.get("KVMCPUID_DATA") or repo / "tests" / "data" / "cpuid")


@dataclasses.dataclass(frozen=True)
class Plan:
    supported: CpuidTable
    facts: ToolFacts
    full: Case
    off: dict[str, Case]  # feature -> case
    models: dict[str, Case]  # model name -> case
    baseline: Case | None
    baseline_why: str  # the inputs, or why there is no baseline case
    notes: tuple[str, ...]

    def cases(self) -> list[Case]:
        out = [self.full, *self.off.values(), *self.models.values()]
        if self.baseline is not None:
            out.append(self.baseline)
        return out


def _models(supported: CpuidTable, facts: ToolFacts, notes: list[str]) -> dict[str, Case]:
    from kvmcpuid_virt.config.build import Policy, build

    try:
        candidates = facts.models()
    except KvmcpuidError as exc:
        notes.append(f"no named CPU models: {exc}")
        return {}
    found: dict[str, Case] = {}
    for m in reversed(candidates):  # newest first
        try:
            config = build(supported, Policy(model=m.name), facts=facts, source="/dev/kvm")
        except KvmcpuidError:
            continue  # needs a feature this host lacks, or QEMU lacks the model
        found[m.name] = make_case(f"model:{m.name}", config, facts)
        if len(found) == MAX_MODELS:
            break
    if not found:
        notes.append("this host can run none of the named CPU models")
    return found


def _baseline(supported: CpuidTable, facts: ToolFacts,
              models: dict[str, Case]) -> tuple[Case | None, str]:  # fmt: skip
    """The cluster baseline of this host and a second one: a real CPU dump
    of this host's vendor, or, where there is none (a vendor the dumps do
    not cover), this host narrowed to the newest named model it runs, from
    QEMU's own definition of the model (ToolFacts) as a configuration."""
    from kvmcpuid_virt.analysis.baseline import baseline
    from kvmcpuid_virt.config.build import build
    from kvmcpuid_virt.config.cpuconfig import vendor_of
    from kvmcpuid_virt.cpuid.formats import Dump
    from kvmcpuid_virt.fsutil import load_dump

    directory = data_dir()
    vendor = vendor_of(supported)
    here = Dump(supported, "supported", {}, "/dev/kvm")
    for path in sorted(directory.glob("*.xml")):
        dump = load_dump(str(path))
        if vendor_of(dump.table) == vendor:
            config = build(baseline([here, dump]).table, facts=facts, source="baseline")
            return make_case("baseline", config, facts), f"this host and {path.name}"
    if not models:
        return None, (f"no CPU dump of this host's vendor ({vendor}) in {directory}, and no "
                      "named model this host runs to stand in for a second host")
    name, case = next(iter(models.items()))
    other = Dump(case.config.expected, "config", {}, f"this host as QEMU's {name}")
    config = build(baseline([here, other]).table, facts=facts, source="baseline")
    return make_case("baseline", config, facts), (
        f"this host and this host narrowed to QEMU's model {name} (no CPU dump of this "
        f"host's vendor, {vendor}, in {directory})")


@functools.cache
def plan() -> Plan | str:
    """The plan, or why there is none (no /dev/kvm)."""
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm: every check needs a KVM host"
    from kvmcpuid_virt.config.build import Policy, build
    from kvmcpuid_virt.kvm import Kvm
    from kvmcpuid_virt.toolfacts.learn import learn

    with Kvm() as kvm:
        supported = kvm.supported_cpuid()
    facts = learn()  # once per process: every case is a function of these
    notes: list[str] = []
    full = build(supported, facts=facts, source="/dev/kvm")
    off = {
        name: make_case(f"off:{name}", build(supported, Policy(disable=(name,)), facts=facts,
                                             source="/dev/kvm"), facts)
        for name in full.enabled()
    }
    models = _models(supported, facts, notes)
    base, why = _baseline(supported, facts, models)
    return Plan(supported, facts, make_case(FULL, full, facts), off, models, base, why,
                tuple(notes))
