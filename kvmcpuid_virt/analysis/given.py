"""Configurations a user already has, given as text: a QEMU `-cpu` string
(as `kvmcpuid-qemu-flags` prints it, in any of its formats) or a libvirt
`<cpu>` element, alone or inside a domain XML. Each is applied to a supported
table (this host's, or a dump's) to give the CpuConfig a guest would get.

`kvmcpuid verify --qemu-flags/--libvirt-xml` and `kvmcpuid diff` read them
through here; `classify` tells a configuration from a dump by its content.
"""

from __future__ import annotations

import json
from typing import Literal

from lxml import etree

from kvmcpuid_virt.adapters import libvirt as lv
from kvmcpuid_virt.adapters import qemu as qemu_adapter
from kvmcpuid_virt.config.build import Policy, build
from kvmcpuid_virt.config.cpuconfig import CpuConfig
from kvmcpuid_virt.cpuid.formats import Dump, loads
from kvmcpuid_virt.cpuid.msr_features import msr_registry
from kvmcpuid_virt.cpuid.msr_values import FeatureMsrs
from kvmcpuid_virt.cpuid.table import CpuidTable
from kvmcpuid_virt.errors import InputError
from kvmcpuid_virt.toolfacts.facts import ModelSource, ToolFacts
from kvmcpuid_virt.xmlutil import parse_xml

__all__ = [
    "Kind",
    "LibvirtCpu",
    "applied",
    "classify",
    "libvirt_cpu",
    "load_operand",
    "qemu_config",
    "qemu_cpu_value",
]

Kind = Literal["dump", "qemu", "libvirt"]


def classify(text: str) -> Kind:
    """What a file holds, by its first token: `-cpu ...` (arg or argv format)
    or a JSON object with "argv" is QEMU; XML whose root is <cpu> or <domain>
    is libvirt; anything else is left to the dump readers (which report what
    is wrong with it). A leading byte order mark is ignored."""
    text = text.removeprefix("\ufeff")
    head = text.lstrip()
    if head.startswith("-cpu"):
        return "qemu"
    if head.startswith("{"):
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError):
            return "dump"  # the dump reader names the line of the error
        return "qemu" if isinstance(doc, dict) and "argv" in doc else "dump"
    if head.startswith("<"):
        try:
            root = parse_xml(text, "<classify>")
        except (InputError, UnicodeEncodeError):
            return "dump"  # the dump reader reports it, with the real source
        return "libvirt" if root.tag in ("cpu", "domain") else "dump"
    return "dump"


def _repeated_key(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object, refusing a key given twice (json keeps the last one)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"key {key!r} given twice")
            seen.add(key)
    return obj


def _flags_json(text: str, source: str) -> str:
    """The -cpu value of kvmcpuid-qemu-flags' JSON output: "argv" is
    ["-cpu", VALUE]; "model", "enabled" and "disabled", when there, must say
    what VALUE says (an edited file where they disagree is ambiguous)."""
    try:
        doc = json.loads(text, object_pairs_hook=_repeated_key)
    except json.JSONDecodeError as exc:
        raise InputError(f"{source}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    except RecursionError:
        raise InputError(f"{source}: JSON nested too deeply") from None
    except ValueError as exc:  # a repeated key, or a number too long for int()
        raise InputError(f"{source}: not kvmcpuid-qemu-flags JSON: {str(exc)[:60]}") from None
    argv = doc.get("argv") if isinstance(doc, dict) else None
    if not (isinstance(argv, list) and len(argv) == 2 and argv[0] == "-cpu"
            and isinstance(argv[1], str)):  # fmt: skip
        raise InputError(f"{source}: \"argv\" must be [\"-cpu\", VALUE]")
    value = str(argv[1])
    try:
        model, enabled, disabled = qemu_adapter.parse(value)
    except InputError as exc:
        raise InputError(f"{source}: \"argv\": {exc}") from None
    said = {"model": model, "enabled": sorted(enabled), "disabled": sorted(disabled)}
    for key, expected in said.items():
        if key not in doc:
            continue
        given = doc[key]
        if isinstance(given, list) and all(isinstance(n, str) for n in given):
            given = sorted(given)
        if given != expected:
            raise InputError(f"{source}: \"argv\" and \"{key}\" disagree: which one is meant?")
    return value


def qemu_cpu_value(text: str, source: str) -> str:
    """The -cpu value of `-cpu VALUE`, a bare VALUE, argv lines (`-cpu` and
    VALUE on lines of their own) or kvmcpuid-qemu-flags' JSON."""
    stripped = text.removeprefix("\ufeff").strip()
    if stripped.startswith("{"):
        return _flags_json(stripped, source)
    if stripped == "-cpu" or stripped.startswith(("-cpu ", "-cpu\t", "-cpu\n", "-cpu\r")):
        stripped = stripped[len("-cpu"):].strip()
    if not stripped or any(c.isspace() for c in stripped):
        raise InputError(f"{source}: expected one -cpu value, e.g. 'host,avx2=off,enforce'")
    return stripped


def applied(parsed: tuple[str, tuple[str, ...], tuple[str, ...]], table: CpuidTable,
            facts: ToolFacts, *, allow_unsupported: bool = True,
            source: str = "") -> CpuConfig:  # fmt: skip
    """The CpuConfig of a parsed configuration (model, enable, disable) applied
    to `table` (what this host, or a dump, supports): the model as base, then
    its switches. What QEMU runs for a named model is its own definition
    (see Policy.model_source)."""
    model, enable, disable = parsed
    policy = Policy(model=model, enable=enable, disable=disable,
                    allow_unsupported=allow_unsupported, model_source=ModelSource.QEMU)  # fmt: skip
    return build(table, policy, facts=facts, source=source)


def qemu_config(text: str, source: str, table: CpuidTable, table_source: str,
                facts: ToolFacts) -> CpuConfig:  # fmt: skip
    """The CpuConfig of a -cpu value (see qemu_cpu_value) applied to `table`;
    errors in the value name `source`."""
    value = qemu_cpu_value(text, source)
    try:
        return applied(qemu_adapter.parse(value), table, facts, source=table_source)
    except InputError as exc:
        raise InputError(f"{source}: {exc}") from None


class LibvirtCpu:
    """The <cpu> of a libvirt document, and the domain's <features> beside it
    (where libvirt takes the KVM paravirtual switches), if any."""

    def __init__(self, cpu: etree._Element, features: etree._Element | None,
                 source: str = "<cpu>") -> None:  # fmt: skip
        self.cpu = cpu
        self.features = features
        self.source = source

    def config(self, table: CpuidTable, table_source: str, facts: ToolFacts) -> CpuConfig:
        parsed = lv.parse(self.cpu, self.source or table_source or "<cpu>")
        return applied(parsed, table, facts, source=table_source)


def libvirt_cpu(text: str, source: str) -> LibvirtCpu:
    """The <cpu> of a <cpu> document or of a <domain>; an InputError without
    one, or with more than one <cpu> or <features> in the domain (libvirt
    reads one; which of two would be meant is anyone's guess)."""
    try:
        root = parse_xml(text, source)
    except UnicodeEncodeError:  # lone surrogates: a str that never was UTF-8
        raise InputError(f"{source}: not Unicode text (a lone surrogate)") from None
    if root.tag == "cpu":
        return LibvirtCpu(root, None, source)
    if root.tag != "domain":
        raise InputError(f"{source}: no <cpu> element (expected <cpu> or a <domain> with one)")
    unique: dict[str, etree._Element | None] = {}
    for tag in ("cpu", "features"):
        found = root.findall(tag)
        if len(found) > 1:
            raise InputError(f"{source}: a second <{tag}> in the domain (the first: line "
                             f"{found[0].sourceline}): which one is meant? (line "
                             f"{found[1].sourceline})")  # fmt: skip
        unique[tag] = found[0] if found else None
    cpu = unique["cpu"]
    if cpu is None:
        raise InputError(f"{source}: no <cpu> element (expected <cpu> or a <domain> with one)")
    return LibvirtCpu(cpu, unique["features"], source)


def load_operand(
    text: str, source: str, base: tuple[CpuidTable, str, ToolFacts] | None
) -> tuple[Dump, CpuConfig | None]:
    """A dump as it is, or a configuration as the table a guest would get
    from it on `base` (table, its source, the tool facts; needed only for
    configurations: see classify), with the config."""
    kind = classify(text)
    if kind == "dump":
        return loads(text, source), None
    if base is None:
        raise ValueError(f"{source}: a configuration needs a supported table to apply it to")
    table, table_source, facts = base
    if kind == "qemu":
        config = qemu_config(text, source, table, table_source, facts)
        label = f"{source} (QEMU -cpu applied to {table_source})"
    else:
        config = libvirt_cpu(text, source).config(table, table_source, facts)
        label = f"{source} (libvirt <cpu> applied to {table_source})"
    # "guest": a whole table as the guest reads it, max leaves included (not
    # a feature-only "config" view), with the feature MSRs the config sets.
    return Dump(config.expected.with_msrs(configured_msrs(config)), kind="guest",
                source=label), config  # fmt: skip


def configured_msrs(config: CpuConfig) -> FeatureMsrs | None:
    """The feature MSRs a guest of `config` gets, as its decided MSR
    features set them (MSR index -> the bits that are on); None when the
    config decides none (its feature MSRs were unknown)."""
    if not config.msr_features:
        return None
    reg = msr_registry()
    values: dict[int, int] = {}
    for name, on in config.msr_features.items():
        f = reg.lookup(name)
        values[f.msr] = values.get(f.msr, 0) | (f.mask if on else 0)
    return FeatureMsrs.of(values)
