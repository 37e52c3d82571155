"""A guest's identity and max leaves against what QEMU itself defines for
the configuration it booted: an independent source, not this project's
table (config.build.with_model_identity).

QEMU is asked live, once per session, `query-cpu-model-expansion` (type
full) of each case's model with the case's own feature properties, as its
`-cpu` value has them: the expansion's `vendor`, `family`, `model`,
`stepping`, `level`, `xlevel` and `model-id` are what QEMU sets up, after its
full-cpuid-auto-level raised the max leaves for the enabled features (and,
under KVM, with the host's vendor). libvirt boots the same `-cpu` (its
host-passthrough is `-cpu host`), so the same expansion holds for it.

Physical address bits: the expansion's `phys-bits` when set; with
`host-phys-bits` (QEMU's `host` model) the host's own, from /proc/cpuinfo
"address sizes"; else QEMU's default for a named model, 40
(TCG_PHYS_ADDR_BITS, target/i386/cpu.h).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

from conformance.backends import Case
from conformance.plan import FULL, Plan
from kvmcpuid_virt.analysis.backend import Backend
from kvmcpuid_virt.cpuid import fields
from kvmcpuid_virt.cpuid.table import CpuidTable
from kvmcpuid_virt.host import cpuinfo_fields
from kvmcpuid_virt.qmp import run_commands

__all__ = ["VMMS", "QemuIdentity", "check_identity", "cpu_value", "identity_cases",
           "qemu_identities", "qemu_props"]

VMMS: Final = (Backend.QEMU, Backend.LIBVIRT)

_QEMU_DEFAULT_PHYS_BITS: Final = 40  # TCG_PHYS_ADDR_BITS in QEMU's target/i386/cpu.h
_NOT_PROPS: Final = frozenset({"enforce", "check"})


@dataclasses.dataclass(frozen=True)
class QemuIdentity:
    """What QEMU's expansion of one configuration says the guest sees."""

    vendor: str
    family: int
    model: int
    stepping: int
    level: int
    xlevel: int
    model_id: str
    phys_bits: int

    @classmethod
    def from_expansion(cls, reply: Mapping[str, Any], host_phys_bits: int) -> QemuIdentity:
        props = reply["model"]["props"]
        phys = int(props.get("phys-bits") or 0)
        if not phys:
            phys = host_phys_bits if props.get("host-phys-bits") else _QEMU_DEFAULT_PHYS_BITS
        return cls(str(props["vendor"]), int(props["family"]), int(props["model"]),
                   int(props["stepping"]), int(props["level"]), int(props["xlevel"]),
                   str(props.get("model-id", "")), phys)


def qemu_props(cpu_value: str) -> tuple[str, dict[str, bool]]:
    """(model, properties) of a `-cpu` value as this project renders it
    (`MODEL,name=on|off,...,enforce`)."""
    model, *rest = cpu_value.split(",")
    props = {}
    for part in rest:
        if part in _NOT_PROPS:
            continue
        name, _, value = part.partition("=")
        props[name] = value == "on"
    return model, props


def _host_phys_bits() -> int:
    text = cpuinfo_fields("address sizes")["address sizes"]
    m = re.match(r"\s*(\d+) bits physical", text)
    if m is None:
        raise ValueError(f"/proc/cpuinfo address sizes: {text!r}")
    return int(m.group(1))


def qemu_identities(binary: str, cpu_values: Sequence[str]) -> dict[str, QemuIdentity]:
    """QEMU's expansion of each `-cpu` value, by value, in one QEMU."""
    unique = list(dict.fromkeys(cpu_values))
    commands = []
    for value in unique:
        model, props = qemu_props(value)
        commands.append({"execute": "query-cpu-model-expansion",
                         "arguments": {"type": "full",
                                       "model": {"name": model, "props": props}}})
    replies = run_commands(binary, commands)
    phys = _host_phys_bits()
    return {v: QemuIdentity.from_expansion(r, phys) for v, r in zip(unique, replies, strict=True)}


def check_identity(want: QemuIdentity, guest: CpuidTable) -> list[str]:
    """Each field of the guest's identity and max leaves that differs from
    QEMU's, as "NAME: QEMU defines X, guest sees Y"."""
    sig = fields.signature(guest)
    sizes = fields.address_sizes(guest)
    seen: dict[str, object] = {
        "vendor": fields.vendor(guest),
        "family": sig.family if sig else None,
        "model": sig.model if sig else None,
        "stepping": sig.stepping if sig else None,
        "max basic leaf": fields.max_basic_leaf(guest),
        "max extended leaf": fields.max_extended_leaf(guest),
        "brand string": fields.brand_string(guest) if want.xlevel >= 0x8000_0004 else None,
        "physical address bits": sizes.physical if sizes else None,
    }
    defined: dict[str, object] = {
        "vendor": want.vendor, "family": want.family, "model": want.model,
        "stepping": want.stepping, "max basic leaf": want.level,
        # Below 0x80000000 QEMU has no extended range: the guest has none.
        "max extended leaf": want.xlevel if want.xlevel >= 0x8000_0000 else None,
        "brand string": want.model_id.strip() if want.xlevel >= 0x8000_0004 else None,
        "physical address bits": want.phys_bits if want.xlevel >= 0x8000_0008 else None,
    }

    def show(v: object) -> str:
        return f"{v:#x}" if isinstance(v, int) and v >= 0x8000_0000 else repr(v) \
            if isinstance(v, str) else str(v)  # fmt: skip

    return [f"{name}: QEMU defines {show(defined[name])}, guest sees {show(seen[name])}"
            for name in defined if defined[name] != seen[name]]


def identity_cases(p: Plan) -> dict[str, Case]:
    """The configurations whose identity the suite checks, by subject."""
    out = {FULL: p.full, **p.models}
    if p.baseline is not None:
        out["baseline"] = p.baseline
    return out


def cpu_value(vmm: Backend, case: Case) -> str:
    """The -cpu value the VMM gives QEMU for the case: the adapter's for
    QEMU; for libvirt its <cpu>'s base (host for host-passthrough) with the
    same feature properties (libvirt's own command line: tests/
    test_adapter_libvirt.py)."""
    if vmm == Backend.QEMU:
        return case.qemu_cpu
    from kvmcpuid_virt.adapters.libvirt import base_model

    assert case.facts is not None
    from kvmcpuid_virt.adapters.qemu import HOST_ONLY_PROPS

    base = base_model(case.config, case.facts)
    rest = case.qemu_cpu.split(",", 1)[1].split(",")
    if base != "host":  # QEMU's named models have no host-cache-info (libvirt adds none)
        rest = [p for p in rest if p.split("=", 1)[0] not in HOST_ONLY_PROPS]
    return ",".join([base, *rest])
