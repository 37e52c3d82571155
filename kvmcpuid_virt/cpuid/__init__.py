"""CPUID data: tables of entries, the named-feature registry, field decoders and
file formats. Pure data, no device I/O."""

from kvmcpuid_virt.cpuid.table import REGISTERS, CpuidEntry, CpuidTable, EntryFlag

__all__ = ["REGISTERS", "CpuidEntry", "CpuidTable", "EntryFlag"]
