"""Adapters: render a CpuConfig for QEMU (`-cpu ...`) or libvirt (`<cpu>`),
and parse those back. Every name that reaches output comes from the feature
registry and is checked again here (see `safe_name`)."""

from __future__ import annotations

import re
from typing import Final

from kvmcpuid_virt.cpuid.features import NAME_RE
from kvmcpuid_virt.errors import InputError

__all__ = ["MODEL_RE", "NAME_RE", "safe_model", "safe_name"]

# A feature name as the registry spells them (NAME_RE, the registry's own, so
# that what it accepts on load and what reaches output cannot drift apart), and
# a CPU model name as QEMU and cpu_map spell them. Neither admits ',', '=',
# quotes, '<', '&' or spaces: nothing that could start another -cpu option or
# break out of an attribute.
MODEL_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")


def safe_name(name: str) -> str:
    """`name` if it is a well-formed feature name, else InputError."""
    if not NAME_RE.match(name):
        raise InputError(f"refusing feature name {name!r}: only [a-z0-9_.-] may reach QEMU or XML")
    return name


def safe_model(name: str) -> str:
    """`name` if it is a well-formed CPU model name, else InputError."""
    if not MODEL_RE.match(name):
        raise InputError(f"refusing CPU model name {name!r}: only [A-Za-z0-9_.-] is accepted")
    return name
