"""What a guest read from its feature MSRs against what was configured, per
named bit, each mismatch attributed to a layer as analysis.compare does for
CPUID.

Inputs: `expected` (CpuConfig.expected_msrs, plus for raw KVM what it wrote
with KVM_SET_MSRS), the guest's RDMSR answers (probe/image.parse_msrs: None
where its own CPUID said the MSR does not exist), and the VMM's view when
there is one (raw KVM: KVM_GET_MSRS after the write). Layers:
- config: the configuration asks for bits KVM does not offer;
- vmm:    the VMM wrote another value than configured (its view says so);
- kvm:    KVM was given the value and the guest reads another;
- host:   no view of the VMM, or the guest's CPUID lost the MSR's
          enumerating bit below KVM (this host's outer hypervisor rewrites
          leaf 7).
An MSR the guest read that the config sets no value for is reported as not
modelled, never as a mismatch.

Also here: which MSRs a probe guest reads (PROBED) and the CPUID bit that
gates each (gate_of), from the registries. Pure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Final

from kvmcpuid_virt.analysis.backend import Backend
from kvmcpuid_virt.analysis.compare import Layer
from kvmcpuid_virt.config.cpuconfig import CpuConfig
from kvmcpuid_virt.cpuid.features import registry
from kvmcpuid_virt.cpuid.msr_features import MsrLayout, MsrRegistry, msr_registry
from kvmcpuid_virt.cpuid.msr_values import FeatureMsrs
from kvmcpuid_virt.cpuid.table import CpuidTable, Register

__all__ = [
    "PROBED",
    "MsrComparison",
    "MsrMismatch",
    "compare_msrs",
    "expectations",
    "gate_of",
    "msr_queries",
    "observed_gates",
]

# The feature MSRs a probe guest reads, each when its CPUID says the MSR
# exists: IA32_BIOS_SIGN_ID (every CPU with RDMSR; KVM gives a guest the
# value the VMM set), IA32_CORE_CAPABILITIES, IA32_ARCH_CAPABILITIES,
# IA32_PERF_CAPABILITIES.
PROBED: Final = (0x8B, 0xCF, 0x10A, 0x345)
# CPUID.01H:EDX[5] (MSR): RDMSR and WRMSR exist (Intel SDM vol. 2B, RDMSR).
_RDMSR_GATE: Final = "msr"

Gate = tuple[int, int, Register, int]


def gate_of(index: int, reg: MsrRegistry | None = None) -> Gate:
    """(leaf, subleaf, register, bit) of the CPUID bit that says MSR `index`
    exists: the registry's enumerating feature, else RDMSR's own bit."""
    info = (reg or msr_registry()).msr(index)
    name = info.enumerated_by if info is not None and info.enumerated_by else _RDMSR_GATE
    f = registry().lookup(name)
    return (f.leaf, f.subleaf, f.reg, f.bit)


def msr_queries(indices: Sequence[int] = PROBED) -> list[tuple[int, int, int, int, int, int, int]]:
    """probe/image.MsrQuery tuples for `indices`: (index, leaf, subleaf,
    eax/ebx/ecx/edx masks of the gate bit)."""
    regs: tuple[Register, ...] = ("eax", "ebx", "ecx", "edx")
    out = []
    for index in indices:
        leaf, subleaf, r, bit = gate_of(index)
        masks = [1 << bit if r == x else 0 for x in regs]
        out.append((index, leaf, subleaf, masks[0], masks[1], masks[2], masks[3]))
    return out


# IA32_BIOS_SIGN_ID: raw KVM writes KVM's own value (the MSR is a number,
# not feature bits; QEMU writes its ucode-rev property, not modelled here).
_UCODE_REV: Final = 0x8B
# IA32_PERF_CAPABILITIES: QEMU 7.2 writes it only with its `pmu` property on
# (kvm_init_msrs), else the guest reads KVM's default with the LBR format
# fields: not modelled for QEMU and libvirt.
_VMM_UNMODELLED: Final = frozenset({0x345})


def expectations(config: CpuConfig, backend: Backend, host_msrs: FeatureMsrs | None
                 ) -> tuple[dict[int, int], dict[int, int] | None]:  # fmt: skip
    """(what the guest should read from each feature MSR, what raw KVM
    writes with KVM_SET_MSRS: None for QEMU and libvirt, which write them
    themselves from the -cpu flags). Raw KVM also writes IA32_BIOS_SIGN_ID
    with KVM's value when a vCPU here accepts it."""
    expected = dict(config.expected_msrs)
    if backend != Backend.KVM:
        return {i: v for i, v in expected.items() if i not in _VMM_UNMODELLED}, None
    to_set = dict(expected)
    value = None if host_msrs is None else host_msrs.get(_UCODE_REV)
    accepts = None if host_msrs is None else host_msrs.deliverable_dict()
    if value is not None and (accepts is None or accepts.get(_UCODE_REV) == value):
        to_set[_UCODE_REV] = expected[_UCODE_REV] = value
    return expected, to_set


@dataclasses.dataclass(frozen=True, slots=True)
class MsrMismatch:
    """One feature MSR (a named bit, or the whole value of a value MSR) the
    guest reads otherwise than configured."""

    index: int
    name: str  # the feature's name, or the MSR's for a whole value
    expected: int | None  # the bit (0/1) or value; None: the MSR should not exist
    guest: int | None  # what the guest read; None: its CPUID says there is no MSR
    vmm: int | None  # the VMM's view (raw KVM: KVM_GET_MSRS), if any
    layer: Layer
    explanation: str

    def as_json(self) -> dict[str, Any]:
        return {"msr": f"{self.index:#x}", "name": self.name, "expected": self.expected,
                "guest": self.guest, "vmm": self.vmm, "layer": str(self.layer),
                "explanation": self.explanation}  # fmt: skip


@dataclasses.dataclass(frozen=True, slots=True)
class MsrComparison:
    backend: Backend
    read: Mapping[int, int | None]  # the guest's answers
    mismatches: tuple[MsrMismatch, ...]
    not_modelled: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def summary(self) -> str:
        seen = sum(1 for v in self.read.values() if v is not None)
        head = f"{self.backend}: {seen} feature MSR(s) read"
        if self.not_modelled:
            head += f" ({len(self.not_modelled)} the configuration sets no value for)"
        if self.ok:
            return f"{head}, all as configured"
        return f"{head}, {len(self.mismatches)} mismatch(es): " + "; ".join(
            f"{m.name}: {m.explanation}" for m in self.mismatches)  # fmt: skip

    def as_json(self) -> dict[str, Any]:
        return {
            "backend": str(self.backend),
            "read": {f"{i:#x}": None if v is None else f"{v:#x}" for i, v in self.read.items()},
            "mismatches": [m.as_json() for m in self.mismatches],
            "not_modelled": list(self.not_modelled),
        }


def _label(reg: MsrRegistry, index: int) -> str:
    info = reg.msr(index)
    return info.label if info else f"MSR {index:X}H"


def compare_msrs(
    expected: Mapping[int, int], guest: Mapping[int, int | None], backend: Backend, *,
    vmm: Mapping[int, int] | None = None, offered: Mapping[int, int] | None = None,
    registry_: MsrRegistry | None = None,
) -> MsrComparison:  # fmt: skip
    """`expected` (index -> value the guest should read; an index missing
    means no expectation) against the guest's RDMSR answers. `vmm`: what the
    VMM holds (raw KVM: KVM_GET_MSRS after KVM_SET_MSRS); `offered`: KVM's
    feature-MSR values (what it can give at all)."""
    reg = registry_ or msr_registry()
    out: list[MsrMismatch] = []
    unmodelled: list[str] = []
    for index in sorted(set(expected) | set(guest)):
        label = _label(reg, index)
        want = expected.get(index)
        seen = guest.get(index)
        held = None if vmm is None else vmm.get(index)
        if want is None:
            if seen is not None:
                unmodelled.append(f"{label} reads {seen:#x}: the configuration sets no value")
            continue
        if index not in guest:
            unmodelled.append(f"{label}: the probe did not read it")
            continue
        if seen is None:
            out.append(MsrMismatch(index, label, want, None, held, Layer.HOST,
                                   f"configured {want:#x}, but the guest's CPUID says the MSR "
                                   "does not exist (its enumerating bit was lost: see the "
                                   "CPUID comparison)"))  # fmt: skip
            continue
        info = reg.msr(index)
        if info is not None and info.layout is MsrLayout.FLAGS:
            diff = want ^ seen
            for b in range(64):
                if diff >> b & 1:
                    f = reg.at(index, b)
                    name = f.name if f is not None else f"{label}[{b}]"
                    out.append(_attribute(index, name, want >> b & 1, seen >> b & 1,
                                          None if held is None else held >> b & 1,
                                          None if offered is None or index not in offered
                                          else offered[index] >> b & 1))  # fmt: skip
        elif want != seen:
            out.append(_attribute(index, label, want, seen, held,
                                  None if offered is None else offered.get(index)))  # fmt: skip
    return MsrComparison(backend, dict(guest), tuple(out), tuple(unmodelled))


def _attribute(index: int, name: str, want: int, seen: int, held: int | None,
               offered: int | None) -> MsrMismatch:  # fmt: skip
    show = (lambda v: f"{v:#x}") if max(want, seen) > 1 else str
    if want and offered == 0:
        layer, where = Layer.CONFIG, "the configuration asks for what KVM does not offer"
    elif held is not None and held != want:
        layer, where = Layer.VMM, f"the VMM holds {show(held)}"
    elif held is not None:
        layer, where = Layer.KVM, "KVM holds the configured value, the guest reads another"
    else:
        layer, where = Layer.HOST, "lost between the VMM and the guest"
    text = f"configured {show(want)}, guest reads {show(seen)} -> {where}"
    return MsrMismatch(index, name, want, seen, held, layer, text)


def observed_gates(observed: CpuidTable, indices: Sequence[int] = PROBED) -> dict[int, bool]:
    """Whether the guest's own CPUID (its observed table) enumerates each MSR."""
    out = {}
    for index in indices:
        leaf, subleaf, r, bit = gate_of(index)
        out[index] = bool(observed.get(leaf, subleaf, r) >> bit & 1)
    return out
