"""What QEMU says it configured for a vCPU, from the CPU object's QOM
properties `feature-words` and `filtered-features` (read over QMP by the QEMU
backend, or through libvirt's monitor by the libvirt backend)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from kvmcpuid_virt.cpuid.features import registry
from kvmcpuid_virt.cpuid.table import CpuidEntry, CpuidTable, EntryFlag

__all__ = ["describe_filtered", "vmm_view_from_qom"]

_REGISTERS: Final = {"EAX": "eax", "EBX": "ebx", "ECX": "ecx", "EDX": "edx"}


def vmm_view_from_qom(feature_words: Sequence[dict[str, Any]]) -> CpuidTable:
    """A CpuidTable of QEMU's `feature-words` (X86CPUFeatureWordInfo list):
    one entry per (leaf, subleaf), only the registers QEMU tracks as feature
    words filled in, the others 0."""
    regs: dict[tuple[int, int | None], dict[str, int]] = {}
    for word in feature_words:
        leaf = int(word["cpuid-input-eax"])
        sub = word.get("cpuid-input-ecx")
        reg = _REGISTERS[str(word["cpuid-register"])]
        key = (leaf, None if sub is None else int(sub))
        regs.setdefault(key, {})[reg] = int(word["features"]) & 0xFFFF_FFFF
    entries = [
        CpuidEntry(
            function=leaf,
            index=sub or 0,
            flags=EntryFlag.NONE if sub is None else EntryFlag.SIGNIFICANT_INDEX,
            **values,
        )
        for (leaf, sub), values in sorted(regs.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0))
    ]
    return CpuidTable(entries)


def describe_filtered(words: Sequence[dict[str, Any]]) -> list[str]:
    """One line per register in which QEMU filtered bits out (the host could
    not give them), the bits named as QEMU names them."""
    reg = registry()
    out = []
    for word in words:
        bits = int(word["features"]) & 0xFFFF_FFFF
        if not bits:
            continue
        leaf = int(word["cpuid-input-eax"])
        sub = word.get("cpuid-input-ecx")
        register = _REGISTERS[str(word["cpuid-register"])]
        names = []
        for bit in range(32):
            if bits >> bit & 1:
                f = reg.at(leaf, int(sub or 0), register, bit)
                names.append(f.name if f is not None else f"bit {bit}")
        where = f"{leaf:#x}" + ("" if sub is None else f".{sub}")
        out.append(
            f"QEMU filtered out (the host cannot give them): {', '.join(names)} "
            f"(CPUID {where} {register.upper()} {bits:#010x})"
        )
    return out
