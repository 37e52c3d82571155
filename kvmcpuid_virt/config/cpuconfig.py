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
    """

    model: str
    features: Mapping[str, bool]
    expected: CpuidTable
    vendor: str = ""
    dropped: tuple[str, ...] = ()
    source: str = ""

    def __post_init__(self) -> None:
        # A read-only, name-sorted copy: frozen means frozen, and sorted makes
        # every rendering deterministic without each adapter re-sorting.
        frozen = types.MappingProxyType(dict(sorted(self.features.items())))
        object.__setattr__(self, "features", frozen)
        object.__setattr__(self, "dropped", tuple(self.dropped))

    def enabled(self) -> tuple[str, ...]:
        """Canonical names of the features that are on, sorted."""
        return tuple(name for name, on in self.features.items() if on)

    def disabled(self) -> tuple[str, ...]:
        """Canonical names of the features that are off, sorted."""
        return tuple(name for name, on in self.features.items() if not on)

    def is_enabled(self, name: str) -> bool:
        """On or off; KeyError for a name the config does not cover."""
        return self.features[name]
