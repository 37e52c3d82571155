"""CpuConfig: what the guest should see."""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping

from kvmcpuid_virt.cpuid.fields import vendor
from kvmcpuid_virt.cpuid.table import CpuidTable

__all__ = ["CpuConfig", "vendor_of"]


def vendor_of(table: CpuidTable) -> str:
    """The vendor string of leaf 0 (EBX, EDX, ECX), '' without one."""
    return vendor(table) or ""


@dataclasses.dataclass(frozen=True)
class CpuConfig:
    """A base model, every relevant named feature explicitly on or off, and
    the CPUID words that follow.

    model:    'host' or a named CPU model (QEMU's spelling; cpu_map uses the
              same model names).
    features: registry canonical name -> on/off for every feature that the
              target can set (PLAIN and KVM_PV kinds the QEMU binary knows).
    expected: the supported table with every feature bit set to its value in
              `features` (and bits QEMU does not hand over cleared): what the
              probe should read back in the guest.
    vendor:   vendor string of the table the config was built from.
    dropped:  features asked for that the host cannot give, dropped under
              --allow-unsupported (the CLI warns about each).
    source:   where the table came from ('/dev/kvm' or a dump path).
    msr_features:  feature-MSR bits (cpuid/msr_features registry names, QEMU's
              spelling) -> on/off, for those the config decides (config/
              msr_policy.py); empty when the feature MSRs are unknown.
    expected_msrs: MSR index -> the value the guest should read, for the
              feature MSRs its CPUID enumerates.
    notes:    one line each about the decision (unknown feature MSRs, why
              plain `-cpu host` aborts here).
    msr_dropped: MSR features asked for that the host cannot give, dropped
              under --allow-unsupported (apart from `dropped`, which names
              CPUID features only).
    """

    model: str
    features: Mapping[str, bool]
    expected: CpuidTable
    vendor: str = ""
    dropped: tuple[str, ...] = ()
    source: str = ""
    msr_features: Mapping[str, bool] = dataclasses.field(default_factory=dict)
    expected_msrs: Mapping[int, int] = dataclasses.field(default_factory=dict)
    notes: tuple[str, ...] = ()
    msr_dropped: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # A read-only, name-sorted copy: frozen means frozen, and sorted makes
        # every rendering deterministic without each adapter re-sorting.
        frozen = types.MappingProxyType(dict(sorted(self.features.items())))
        object.__setattr__(self, "features", frozen)
        object.__setattr__(self, "dropped", tuple(self.dropped))
        msr = types.MappingProxyType(dict(sorted(self.msr_features.items())))
        object.__setattr__(self, "msr_features", msr)
        object.__setattr__(self, "expected_msrs",
                           types.MappingProxyType(dict(sorted(self.expected_msrs.items()))))
        object.__setattr__(self, "notes", tuple(self.notes))
        object.__setattr__(self, "msr_dropped", tuple(self.msr_dropped))

    def msr_enabled(self) -> tuple[str, ...]:
        """MSR features that are on, sorted."""
        return tuple(name for name, on in self.msr_features.items() if on)

    def msr_disabled(self) -> tuple[str, ...]:
        """MSR features that are off, sorted."""
        return tuple(name for name, on in self.msr_features.items() if not on)

    def enabled(self) -> tuple[str, ...]:
        """Canonical names of the features that are on, sorted."""
        return tuple(name for name, on in self.features.items() if on)

    def disabled(self) -> tuple[str, ...]:
        """Canonical names of the features that are off, sorted."""
        return tuple(name for name, on in self.features.items() if not on)

    def is_enabled(self, name: str) -> bool:
        """On or off; KeyError for a name the config does not cover."""
        return self.features[name]
