"""libvirt: render a CpuConfig as a `<cpu>` element, patch it into an existing
domain XML, and parse a `<cpu>` element back.

Rendered forms, one `<feature policy='require|disable' name=.../>` per
feature that has a cpu_map name, sorted, enabled first:
- a config of this host's own full CPU (model `host` read from /dev/kvm
  here, see own_host(); or the caller asks for it explicitly):
  `<cpu mode='host-passthrough' check='full' migratable='on'>`. libvirt
  (9.0) passes it on as `-cpu host,migratable=on,FEAT=on|off,...`, so the
  guest gets the host's identity, max leaves, brand and address sizes, as
  the configuration has them. check='full' makes libvirt refuse to start a
  guest that lacks a required feature (QEMU alone only warns without
  `enforce`). migratable='on' (libvirt's default, written out) is what
  `-cpu host` does and what CpuConfig.expected models: QEMU passes on only
  the bits it has names for; 'off' adds KVM's unnamed ones (measured here:
  0x80000008 EBX bits 17, 28, 30 and kvm-asyncpf-vmexit). With
  `<cache mode='passthrough'/>` (QEMU's host-cache-info=on; only valid in
  host-passthrough) the cache leaves (2, 4, 0x80000005/6, 0x8000001D) are the
  host's, as KVM reports them and the configuration has them, instead of
  QEMU's made-up model; a domain's own `<cache>` is kept instead.
- a `host` config of any other table (a dump from another host, a cluster
  baseline): host-passthrough would give the guest each host's own CPU
  (identity, caches, whatever KVM there adds) and break migration between
  different hosts, so it is rendered as a named model below, on the cpu_map
  model that fits its features best, and identity_note() warns.
- a named model: `<cpu mode='custom' match='exact' check='full'>` with
  `<model fallback='forbid'>` (libvirt may not substitute another model):
  the config's own model where cpu_map has it, so the guest sees QEMU's
  definition of that model (family/model/stepping, max leaves); else the
  newest cpu_map model whose features are all decided, and
  `identity_note()` says that the guest then sees that model's identity.

KVM paravirtual bits have no cpu_map names. libvirt takes three of them in
`<features><kvm>` (pv-ipi, poll-control, hint-dedicated: the registry's
libvirt_kvm) and the rest through its own defaults (<clock>, <pvspinlock>,
<apic eoi>), which for host-passthrough are QEMU's `host` expansion. A
`<cpu>` cannot carry them: `unexpressible()` reports each one the model's
default does not give, with where libvirt takes it, and `patch_features()`
sets the `<features><kvm>` ones in a domain (`--patch` does both).

Every name written comes from the registry and passes safe_name/safe_model;
the element is built with lxml, never by string formatting.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import re
from typing import Final

from lxml import etree

from kvmcpuid_virt.adapters import safe_model, safe_name
from kvmcpuid_virt.config.cpuconfig import CpuConfig
from kvmcpuid_virt.cpuid.features import Feature, Registry, registry
from kvmcpuid_virt.cpuid.fields import LIBVIRT_VENDOR
from kvmcpuid_virt.cpuid.msr_features import msr_registry
from kvmcpuid_virt.errors import InputError, PolicyError, UnknownFeatureError
from kvmcpuid_virt.toolfacts.facts import CpuModel, ToolFacts
from kvmcpuid_virt.xmlutil import parse_xml

__all__ = [
    "HOST_PASSTHROUGH",
    "Carrier",
    "Unexpressible",
    "base_model",
    "cpu_element",
    "cpu_map_model",
    "identity_note",
    "kvm_features_element",
    "own_host",
    "parse",
    "patch_domain",
    "patch_features",
    "render",
    "unexpressible",
]

class Carrier(enum.Enum):
    """Where a feature that a `<cpu>` cannot carry goes instead."""

    KVM_FEATURES = "kvm-features"  # <features><kvm><NAME state=.../>
    IGNORED = "ignored"  # libvirt has the switch but ignores this state
    NOWHERE = "nowhere"  # libvirt has no name for it


@dataclasses.dataclass(frozen=True)
class Unexpressible:
    """A feature a `<cpu>` element cannot carry, and where libvirt takes it."""

    name: str
    on: bool
    carrier: Carrier
    libvirt_kvm: str | None = None  # the <features><kvm> switch, if any

    @property
    def expressible(self) -> bool:
        """libvirt XML can still say it (outside <cpu>)."""
        return self.carrier == Carrier.KVM_FEATURES

    @property
    def where(self) -> str:
        state = "on" if self.on else "off"
        if self.carrier == Carrier.KVM_FEATURES:
            return f"<features><kvm><{self.libvirt_kvm} state='{state}'/>"
        if self.carrier == Carrier.IGNORED:
            return (f"not expressible: libvirt ignores <kvm><{self.libvirt_kvm} "
                    f"state='{state}'/>; QEMU's default applies")  # fmt: skip
        return "not expressible in libvirt XML; libvirt's default applies"


def _feature(reg: Registry, name: str) -> Feature:
    f = reg.lookup(name)
    if f.name != name:
        raise InputError(f"refusing feature {name!r}: not a registry canonical name")
    return f


# The one state of each <features><kvm> switch that libvirt (9.0) turns into a
# QEMU flag; the other state leaves QEMU's default for the model (on for
# `host`, off for named models). Measured with real guests through libvirt:
# tests/test_probe_libvirt.py::test_kvm_switch_states_libvirt_acts_on.
LIBVIRT_KVM_ACTS_ON: Final[dict[str, bool]] = {
    "pv-ipi": False,
    "poll-control": True,
    "hint-dedicated": True,
}


def kvm_features_element(config: CpuConfig) -> etree._Element | None:
    """`<features><kvm>` with the KVM paravirtual switches libvirt acts on
    (see LIBVIRT_KVM_ACTS_ON), or None when there are none to write. Goes
    beside `<cpu>` in a domain."""
    reg = registry()
    kvm = etree.Element("kvm")
    for name, on in config.features.items():
        f = _feature(reg, name)
        if f.libvirt_kvm is not None and LIBVIRT_KVM_ACTS_ON.get(f.libvirt_kvm) == on:
            etree.SubElement(kvm, safe_name(f.libvirt_kvm), state="on" if on else "off")
    if not len(kvm):
        return None
    features = etree.Element("features")
    features.append(kvm)
    return features


def unexpressible(config: CpuConfig, facts: ToolFacts | None = None, *,
                  passthrough: bool | None = None) -> list[Unexpressible]:  # fmt: skip
    """Features the config decides that a `<cpu>` cannot carry, and what
    libvirt does with them instead.

    Named models (mode='custom'): those on without a cpu_map name (an off one
    is off in every cpu_map model anyway) and the KVM bits libvirt takes
    elsewhere, or not at all. host-passthrough (a `host` config): libvirt's
    defaults are QEMU's own expansion of `host` (facts.qemu.host), so a
    feature without a cpu_map name is carried when the config has it as that
    expansion does, and is unexpressible, on or off, when it differs; without
    that expansion every such feature is reported. `passthrough` as for
    base_model()."""
    reg = registry()
    passthrough = _passthrough(config, passthrough)
    defaults = (facts.qemu.host if passthrough and facts is not None and facts.qemu is not None
                else None)  # fmt: skip
    out = []
    for name, on in config.features.items():
        f = _feature(reg, name)
        if f.libvirt is not None or not (on or f.libvirt_kvm or passthrough):
            continue
        if f.libvirt_kvm and LIBVIRT_KVM_ACTS_ON.get(f.libvirt_kvm) == on:
            carrier = Carrier.KVM_FEATURES
        elif defaults is not None and f.qemu is not None and defaults.get(f.qemu) == on:
            continue  # host-passthrough gives it as configured
        elif f.libvirt_kvm:
            carrier = Carrier.IGNORED
        else:
            carrier = Carrier.NOWHERE
        out.append(Unexpressible(name, on, carrier, f.libvirt_kvm))
    return out


# base_model()'s answer for a configuration of this host's full CPU: no
# cpu_map model, mode='host-passthrough'.
HOST_PASSTHROUGH: Final = "host"
# CpuConfig.source of a table read from this machine's /dev/kvm
# (cli/options.read_table, conformance/plan).
_LIVE_SOURCE: Final = "/dev/kvm"


def own_host(config: CpuConfig) -> bool:
    """Whether `config` is this host's own full CPU: model 'host' built from
    the table /dev/kvm gave here. Only that may be host-passthrough; a dump
    or a baseline (CpuConfig.source a path or 'baseline') describes other
    hosts, whose guests must not get whatever CPU they land on."""
    return config.model == HOST_PASSTHROUGH and config.source == _LIVE_SOURCE


def _passthrough(config: CpuConfig, passthrough: bool | None) -> bool:
    if config.model != HOST_PASSTHROUGH:
        return False
    return own_host(config) if passthrough is None else passthrough


def base_model(config: CpuConfig, facts: ToolFacts, *, passthrough: bool | None = None) -> str:
    """What the `<cpu>` is based on: HOST_PASSTHROUGH ('host') for a config of
    this host's own full CPU (own_host()), else cpu_map_model(). `passthrough`
    overrides own_host() for a `host` config: True where the caller knows the
    table is the host the guest will run on (a dump fingerprinted as this
    host, an explicit --host-passthrough), False to force a named model."""
    if _passthrough(config, passthrough):
        return HOST_PASSTHROUGH
    return cpu_map_model(config, facts)


def cpu_map_model(config: CpuConfig, facts: ToolFacts) -> str:
    """The cpu_map model to name in mode='custom': the config's own model when
    cpu_map (and QEMU) have it and the config decides each of its features
    (cpu_element() disables those that are off), so the guest gets QEMU's
    definition of that model; else the newest cpu_map model (of the config's
    vendor, or vendor-neutral) whose features are all on. When none fits (a
    configuration without fpu, say), the model that needs the fewest of its
    features disabled: cpu_element() writes policy='disable' for every
    feature that is off, model features included, so the guest still gets
    exactly the configuration's features (identity_note() says whose
    family/model/stepping it gets)."""
    reg = registry()
    found = dict(facts.cpu_map)
    if not found:
        raise PolicyError("libvirt's cpu_map is not installed: no model to name in <cpu>")
    on = set(config.enabled())
    off = set(config.disabled())

    def missing(m: CpuModel) -> int | None:
        """How many of the model's features are off; None when the model has a
        feature we cannot reason about or that the config does not decide."""
        count = 0
        for lv in m.features:
            f = reg.by_libvirt(lv)
            if f is None or f.name not in on | off:
                return None  # not a safe base: we could not disable it
            count += f.name in off
        return count

    if facts.qemu is not None:  # without QEMU (a dump from elsewhere): cpu_map alone
        # libvirt refuses a model its QEMU does not define (cpu_map has
        # pentiumpro, QEMU 7.2 does not).
        found = {n: m for n, m in found.items() if n in facts.qemu.definitions}
    if config.model in found and missing(found[config.model]) is not None:
        return config.model
    vendor = LIBVIRT_VENDOR.get(config.vendor, config.vendor)
    best: tuple[int, int] | None = None  # (features to disable, -order)
    name = None
    for m in found.values():
        if m.vendor is not None and m.vendor != vendor:
            continue
        n = missing(m)
        if n is None:
            continue
        rank = (n, -m.order)
        if best is None or rank < best:
            best, name = rank, m.name
    if name is None:
        raise PolicyError("no libvirt cpu_map model can express this configuration")
    return name


def identity_note(config: CpuConfig, model: str) -> str | None:
    """What a `<cpu>` based on `model` (base_model's answer) gives the guest
    that the configuration does not have, or None: a named configuration
    rendered on another cpu_map model gets that model's family/model/stepping,
    max leaves and brand string (libvirt has no element for them)."""
    if model == config.model:
        return None
    if config.model == HOST_PASSTHROUGH:
        where = "a baseline" if config.source == "baseline" else (config.source or "the table")
        return (f"{where} is not this host's own CPU, so the <cpu> is not host-passthrough "
                f"(the guest would get each host's own CPU and could not migrate between "
                f"them): it names {model!r} with explicit features, so the guest sees "
                f"{model}'s family/model/stepping, max leaves, caches and brand string, "
                "not the configuration's")  # fmt: skip
    return (f"libvirt's cpu_map has no usable model {config.model!r}: the <cpu> names "
            f"{model!r}, so the guest sees {model}'s family/model/stepping, max leaves and "
            f"brand string, not {config.model}'s")  # fmt: skip


# What cpu_element() writes itself; the rest of a domain's old <cpu> (the
# guest's topology, NUMA cells, cache and address-size settings, extensions)
# is not CPUID and is carried over. `migratable` is ours too: libvirt refuses
# it outside host-passthrough/maximum ("Attribute migratable is only allowed
# for 'host-passthrough' / 'maximum' CPU mode"), and host-passthrough gets
# migratable='on' (see the module's docstring).
_REPLACED_ATTRS: Final = frozenset({"mode", "match", "check", "migratable"})
_REPLACED_CHILDREN: Final = frozenset({"model", "vendor", "feature"})
# libvirt's order (virCPUDefFormatBuf: model, vendor, topology, cache,
# maxphysaddr, features; then the NUMA cells), which is what `virsh dumpxml`
# writes back. cputypes.rng interleaves <cpu>'s children, so any order
# validates; following libvirt's keeps a define/dumpxml round trip stable.
_BEFORE_FEATURES: Final = ("topology", "cache", "maxphysaddr")


def _carried(old: etree._Element) -> tuple[list[etree._Element], list[etree._Element]]:
    """Copies of the nodes of `old` (a <cpu>) that cpu_element() does not
    write: (those libvirt puts before the features, the rest in their order)."""
    before: list[etree._Element] = []
    after: list[etree._Element] = []
    for node in old:
        if node.tag in _REPLACED_CHILDREN:
            continue
        (before if node.tag in _BEFORE_FEATURES else after).append(copy.deepcopy(node))
    before.sort(key=lambda n: _BEFORE_FEATURES.index(str(n.tag)))
    return before, after


def cpu_element(
    config: CpuConfig, model: str, *, carry: etree._Element | None = None
) -> etree._Element:
    """The `<cpu>` element based on `model` (base_model's choice, or the
    caller's: HOST_PASSTHROUGH or a cpu_map model), not yet indented. With
    `carry` (a domain's old `<cpu>`), everything of it but the model,
    vendor, features and the attributes in _REPLACED_ATTRS is kept, in
    libvirt's order."""
    reg = registry()
    if model == HOST_PASSTHROUGH:
        cpu = etree.Element("cpu", mode="host-passthrough", check="full", migratable="on")
    else:
        cpu = etree.Element("cpu", mode="custom", match="exact", check="full")
    before: list[etree._Element] = []
    after: list[etree._Element] = []
    if carry is not None:
        for key, value in carry.attrib.items():
            if key not in _REPLACED_ATTRS:
                cpu.set(key, value)
        before, after = _carried(carry)
    if model != HOST_PASSTHROUGH:
        m = etree.SubElement(cpu, "model", fallback="forbid")
        m.text = safe_model(model)
    elif not any(n.tag == "cache" for n in before):
        etree.SubElement(cpu, "cache", mode="passthrough")
    cpu.extend(before)
    for on in (True, False):
        for name in config.enabled() if on else config.disabled():
            f = _feature(reg, name)
            if f.libvirt is None:
                continue  # see unexpressible()
            etree.SubElement(
                cpu, "feature", policy="require" if on else "disable", name=safe_name(f.libvirt)
            )
    # Feature-MSR bits (mds-no, vmx-*) in cpu_map's spelling, after the CPUID ones.
    mreg = msr_registry()
    for on in (True, False):
        for name in config.msr_enabled() if on else config.msr_disabled():
            mf = mreg.lookup(name)
            if mf.libvirt is not None:
                etree.SubElement(cpu, "feature", policy="require" if on else "disable",
                                 name=safe_name(mf.libvirt))  # fmt: skip
    cpu.extend(after)
    return cpu


def _indent(el: etree._Element, level: int, step: str = "  ", base: str = "") -> None:
    """Indent `el`'s children for a document whose `<cpu>` starts at `base`."""
    pad = "\n" + base + step * (level + 1)
    children = list(el)
    if children:
        el.text = pad
        for child in children:
            child.tail = pad
        children[-1].tail = "\n" + base + step * level


def render(
    config: CpuConfig, model: str, indent: str = "",
    *, carry: etree._Element | None = None,
) -> str:  # fmt: skip
    """The `<cpu>` element as text, indented as if it started at `indent`
    (`carry`: see cpu_element)."""
    cpu = cpu_element(config, model, carry=carry)
    _indent(cpu, 0, base=indent)
    text: str = etree.tostring(cpu, encoding="unicode")
    return text


# --- patching a domain ---------------------------------------------------------------


def _without_cpu(root: etree._Element) -> bytes:
    dup = parse_xml(etree.tostring(root), "<domain copy>")
    for cpu in dup.findall("cpu"):
        dup.remove(cpu)
    for el in dup.iter():
        # Whitespace-only text around the removed <cpu> is the one thing we
        # are allowed to change; ignore it everywhere in the comparison.
        if el.text is not None and not el.text.strip():
            el.text = None
        if el.tail is not None and not el.tail.strip():
            el.tail = None
    out: bytes = etree.tostring(dup, method="c14n")
    return out


def _canonical(node: etree._Element) -> bytes:
    """`node` canonicalized, whitespace-only text ignored (the one thing
    re-indenting may change). Exclusive C14N: a copied child re-declares only
    the namespaces it uses, which inclusive C14N would count as a change."""
    node = copy.deepcopy(node)
    node.tail = None
    for el in node.iter():
        if el.text is not None and not el.text.strip():
            el.text = None
        if el is not node and el.tail is not None and not el.tail.strip():
            el.tail = None
    out: bytes = etree.tostring(node, method="c14n", exclusive=True, with_tail=False)
    return out


def _added(model: str, old: etree._Element | None) -> frozenset[str]:
    """The children cpu_element() adds to `old` (a domain's <cpu>, or None)."""
    if model == HOST_PASSTHROUGH and (old is None or old.find("cache") is None):
        return frozenset({"cache"})
    return frozenset()


def _kept(cpu: etree._Element | None,
          added: frozenset[str] = frozenset()) -> tuple[list[tuple[str, str]], list[bytes]]:
    """What of a <cpu> must survive patching: its attributes and children
    other than those cpu_element() writes (sorted: libvirt's order is ours
    to choose, their content is not); `added`: children cpu_element() added
    because the old <cpu> had none (host-passthrough's <cache>)."""
    if cpu is None:
        return [], []
    attrs = sorted((str(k), str(v)) for k, v in cpu.attrib.items() if k not in _REPLACED_ATTRS)
    nodes = sorted(_canonical(n) for n in cpu
                   if n.tag not in _REPLACED_CHILDREN and n.tag not in added)  # fmt: skip
    return attrs, nodes


_TOKEN = re.compile(
    r"<!--.*?-->|<!\[CDATA\[.*?\]\]>|<\?.*?\?>|<!DOCTYPE[^>]*>"
    r"|<(/?)([A-Za-z_][\w.:-]*)(?:[^>\"']|\"[^\"]*\"|'[^']*')*?(/?)>",
    re.S,
)


def _span(text: str) -> tuple[int, int, str] | None:
    """(start, end, indentation) of the domain's top-level <cpu> in `text`,
    by a tag scan that skips comments, CDATA, PIs and quoted attribute values."""
    depth = 0
    start: int | None = None
    for m in _TOKEN.finditer(text):
        name = m.group(2)
        if name is None:
            continue
        closing, selfclose = m.group(1) == "/", m.group(3) == "/"
        if closing:
            depth -= 1
            if start is not None and depth == 1 and name == "cpu":
                return start, m.end(), _indentation(text, start)
            continue
        if depth == 1 and name == "cpu" and start is None:
            if selfclose:
                return m.start(), m.end(), _indentation(text, m.start())
            start = m.start()
        if not selfclose:
            depth += 1
    return None


def _indentation(text: str, pos: int) -> str:
    before = text[text.rfind("\n", 0, pos) + 1 : pos]
    return before if not before.strip() else ""


def patch_domain(domain_xml: str, config: CpuConfig, model: str,
                 source: str = "<domain>") -> str:  # fmt: skip
    """`domain_xml` with its `<cpu>` replaced by this config's (or added
    before `</domain>` when it has none). Only the model, vendor, features
    and mode/match/check/migratable of `<cpu>` change: its other children
    (topology, numa, cache, maxphysaddr, ...) and attributes are kept, and
    everything outside `<cpu>` stays byte for byte. The result is re-parsed
    and compared to the input, outside `<cpu>` and on what `<cpu>` keeps, to
    prove it."""
    root = parse_xml(domain_xml, source)
    if root.tag != "domain":
        raise InputError(f"{source}: expected a <domain>, found <{root.tag}>")
    cpus = root.findall("cpu")
    if len(cpus) > 1:
        raise InputError(f"{source}: more than one <cpu> in the domain")
    if cpus:
        span = _span(domain_xml)
        if span is None:
            raise InputError(f"{source}: cannot locate <cpu> in the text")
        start, end, indent = span
        cpu = render(config, model, indent, carry=cpus[0])
        new = domain_xml[:start] + cpu + domain_xml[end:]
    else:
        close = domain_xml.rfind("</domain>")
        if close < 0:
            raise InputError(f"{source}: no </domain> end tag")
        line_start = domain_xml.rfind("\n", 0, close) + 1
        outer = domain_xml[line_start:close]
        if outer.strip():  # </domain> shares its line: no layout to follow
            new = domain_xml[:close] + render(config, model) + domain_xml[close:]
        else:  # a new line, one level deeper than </domain>
            inner = outer + "  "
            cpu = inner + render(config, model, inner) + "\n"
            new = domain_xml[:line_start] + cpu + domain_xml[line_start:]
    new_root = parse_xml(new, f"{source} (patched)")
    if (
        _without_cpu(new_root) != _without_cpu(root)
        or len(new_root.findall("cpu")) != 1
        or _kept(new_root.find("cpu"), _added(model, root.find("cpu"))) != _kept(root.find("cpu"))
    ):
        raise InputError(f"{source}: patching <cpu> would change more than <cpu>; refusing")
    return new


# libvirt's order (virDomainDefFormatInternal, virDomainFeature and
# virDomainKVM in 9.0), which `virsh dumpxml` writes back: the domain
# children <features> goes before, the <features> children <kvm> goes
# before, and the <kvm> children in theirs. The schema interleaves them, so
# any order validates; following libvirt's keeps define/dumpxml stable.
_AFTER_FEATURES: Final = ("cpu", "clock", "on_poweroff", "on_reboot", "on_crash",
                          "on_lockfailure", "pm", "perf", "devices", "seclabel", "keywrap",
                          "launchSecurity")  # fmt: skip
_AFTER_KVM: Final = ("pvspinlock", "capabilities", "pmu", "vmport", "gic", "smm", "ioapic",
                     "hpt", "vmcoreinfo", "htm", "nested-hv", "msrs", "ccf-assist", "xen",
                     "cfpc", "sbbc", "ibs", "tcg", "async-teardown")  # fmt: skip
_KVM_ORDER: Final = ("hidden", "hint-dedicated", "poll-control", "pv-ipi", "dirty-ring")

_Span = tuple[str, int, int]  # (tag, start, end) of an element in a text


def _children(text: str, lo: int, hi: int) -> list[_Span]:
    """The elements directly inside text[lo:hi] (one element's content), by
    the tag scan of _span."""
    out: list[_Span] = []
    depth = 0
    start = 0
    name = ""
    for m in _TOKEN.finditer(text, lo, hi):
        tag = m.group(2)
        if tag is None:
            continue
        closing, selfclose = m.group(1) == "/", m.group(3) == "/"
        if closing:
            depth -= 1
            if depth == 0:
                out.append((name, start, m.end()))
        elif selfclose:
            if depth == 0:
                out.append((tag, m.start(), m.end()))
        else:
            if depth == 0:
                name, start = tag, m.start()
            depth += 1
    return out


def _inside(text: str, span: _Span) -> tuple[int, int] | None:
    """(start, end) of the content of the element at `span`; None when it
    is self-closing."""
    _, start, end = span
    head = next(m for m in _TOKEN.finditer(text, start, end) if m.group(2) is not None)
    if head.group(3) == "/":
        return None
    return head.end(), text.rfind("</", start, end)


def _insert(text: str, lo: int, hi: int, lines: list[str], before: tuple[str, ...],
            parent_indent: str) -> str:  # fmt: skip
    """`lines` (an element's markup, a line each) inserted into the content
    text[lo:hi] before the first child named in `before` (else last): on
    lines of their own, indented like the siblings (or one level deeper than
    the parent), where the siblings have lines of their own; inline where
    they share a line."""
    kids = _children(text, lo, hi)
    at = next((k for k in kids if k[0] in before), None)
    pos = at[1] if at is not None else hi
    line = text.rfind("\n", 0, pos) + 1
    own_line = not text[max(line, lo):pos].strip() and (line > lo or not kids)
    if not own_line:
        return text[:pos] + "".join(x.strip() for x in lines) + text[pos:]
    indent = _indentation(text, kids[0][1]) if kids else parent_indent + "  "
    block = "".join(f"{indent}{x}\n" for x in lines)
    return text[:line] + block + text[line:]


def _kvm_switches(config: CpuConfig) -> dict[str, str]:
    """The <features><kvm> children the config sets: tag -> state, in libvirt's order."""
    el = kvm_features_element(config)
    if el is None:
        return {}
    kvm = el.find("kvm")
    got = {str(c.tag): str(c.get("state")) for c in (kvm if kvm is not None else ())}
    order = {t: i for i, t in enumerate(_KVM_ORDER)}
    return {t: got[t] for t in sorted(got, key=lambda t: order.get(t, len(order)))}


def _without_switches(root: etree._Element, tags: frozenset[str]) -> bytes:
    """The domain without <cpu> and without the <kvm> children in `tags`
    (and a <kvm> or <features> left empty by that), whitespace-only text
    ignored: what patching <cpu> and <kvm> may not change."""
    dup = parse_xml(_without_cpu(root), "<domain copy>")
    for features in dup.findall("features"):
        for kvm in features.findall("kvm"):
            for child in [c for c in kvm if c.tag in tags]:
                kvm.remove(child)
            if not len(kvm) and not kvm.attrib:
                features.remove(kvm)
        if not len(features) and not features.attrib:
            dup.remove(features)
    out: bytes = etree.tostring(dup, method="c14n")
    return out


def patch_features(domain_xml: str, config: CpuConfig, source: str = "<domain>") -> str:
    """`domain_xml` with the `<features><kvm>` switches of this config (the
    paravirtual bits libvirt takes there: kvm_features_element) set: each
    such `<kvm>` child replaced or added, `<kvm>` and `<features>` created in
    libvirt's order where absent; every other byte stays. The result is
    re-parsed and compared to the input outside those children, as
    patch_domain proves its <cpu> change."""
    switches = _kvm_switches(config)
    if not switches:
        return domain_xml
    root = parse_xml(domain_xml, source)
    if root.tag != "domain":
        raise InputError(f"{source}: expected a <domain>, found <{root.tag}>")
    if len(root.findall("features")) > 1 or any(len(f.findall("kvm")) > 1
                                                 for f in root.findall("features")):  # fmt: skip
        raise InputError(f"{source}: more than one <features> or <kvm> in the domain")
    new = _set_switches(domain_xml, switches, source)
    new_root = parse_xml(new, f"{source} (patched)")
    kvm = new_root.find("features/kvm")
    got = {str(c.tag): c.get("state") for c in (kvm if kvm is not None else ())}
    tags = frozenset(switches)
    if (_without_switches(new_root, tags) != _without_switches(root, tags)
            or any(got.get(t) != state for t, state in switches.items())):  # fmt: skip
        raise InputError(f"{source}: patching <features><kvm> would change more; refusing")
    return new


def _locate(text: str, source: str) -> tuple[tuple[int, int], str, _Span | None,
                                             tuple[int, int] | None, _Span | None,
                                             tuple[int, int] | None]:  # fmt: skip
    """Where the domain's content, its <features> and that one's <kvm> are
    (each element's span and content; None where absent or self-closing)."""
    domain = next((k for k in _children(text, 0, len(text)) if k[0] == "domain"), None)
    inner = _inside(text, domain) if domain is not None else None
    if domain is None or inner is None:
        raise InputError(f"{source}: cannot locate the domain's content in the text")
    features = next((k for k in _children(text, *inner) if k[0] == "features"), None)
    f_in = _inside(text, features) if features is not None else None
    kvm = next((k for k in _children(text, *f_in) if k[0] == "kvm"), None) if f_in else None
    k_in = _inside(text, kvm) if kvm is not None else None
    return inner, _indentation(text, domain[1]), features, f_in, kvm, k_in


def _set_switches(text: str, switches: dict[str, str], source: str) -> str:
    """Each switch set in turn, the spans found afresh after every change."""
    for tag, state in switches.items():
        el: str = etree.tostring(etree.Element(safe_name(tag), state=state), encoding="unicode")
        (lo, hi), indent, features, f_in, kvm, k_in = _locate(text, source)
        if features is None:
            text = _insert(text, lo, hi, ["<features>", "  <kvm>", f"    {el}", "  </kvm>",
                                          "</features>"], _AFTER_FEATURES, indent)  # fmt: skip
        elif f_in is None:  # <features/>
            text = text[:features[1]] + f"<features><kvm>{el}</kvm></features>" + \
                text[features[2]:]  # fmt: skip
        elif kvm is None:
            text = _insert(text, *f_in, ["<kvm>", f"  {el}", "</kvm>"], _AFTER_KVM,
                           _indentation(text, features[1]))  # fmt: skip
        elif k_in is None:  # <kvm/>
            text = text[:kvm[1]] + f"<kvm>{el}</kvm>" + text[kvm[2]:]
        else:
            same = next((k for k in _children(text, *k_in) if k[0] == tag), None)
            if same is not None:
                text = text[:same[1]] + el + text[same[2]:]
            else:
                later = _KVM_ORDER[_KVM_ORDER.index(tag) + 1:] if tag in _KVM_ORDER else ()
                text = _insert(text, *k_in, [el], later, _indentation(text, kvm[1]))
    return text


# --- parsing ---------------------------------------------------------------------------


def parse(
    cpu_xml: str | etree._Element, source: str = "<cpu>"
) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """(model, enabled, disabled) from a `<cpu>` element (or a domain holding
    one), names as registry canonical names. host-passthrough/maximum read as
    model 'host'; host-model as 'auto' (libvirt's own newest-fitting model);
    policy require/force enable, disable/forbid disable, optional is left to
    the model.

    What libvirt 9.0's schema (cputypes.rng, guestcpu) does not allow is
    refused, and so is what it allows but a (model, enabled, disabled) cannot
    say, rather than read as something else: more than one <cpu> in a
    domain; unknown attributes, values and children of <cpu>, <model> and
    <feature>; a second <model>, <vendor>, <topology>, <numa>, <cache> or
    <maxphysaddr>; a feature named twice (libvirt refuses that too) or not
    in libvirt's spelling (UnknownFeatureError, with the cpu_map name as a
    hint); match='minimum' on a custom CPU (libvirt adds host-model features
    to it); <model vendor_id=...> (a different CPUID vendor); migratable=
    outside host-passthrough/maximum (libvirt refuses it). Each error is one line naming
    `source`, the element and its line."""
    try:
        el = parse_xml(cpu_xml, source) if isinstance(cpu_xml, str) else cpu_xml
    except UnicodeEncodeError:  # lone surrogates: a str that never was UTF-8
        raise InputError(f"{source}: not Unicode text (a lone surrogate)") from None
    if el.tag == "domain":
        cpus = el.findall("cpu")
        if not cpus:
            raise InputError(f"{source}: the domain has no <cpu>")
        if len(cpus) > 1:
            raise _bad(source, cpus[1], f"a second <cpu> in the domain (the first: "
                       f"{_at(cpus[0])}): which one is meant?")  # fmt: skip
        el = cpus[0]
    if el.tag != "cpu":
        raise _bad(source, el, f"expected <cpu>, found <{_tag(el)}>")
    _check_attrs(source, el, _CPU_ATTRS)
    mode = el.get("mode", "custom")
    once = _check_children(source, el)
    if el.get("migratable") is not None and mode not in ("host-passthrough", "maximum"):
        raise _bad(source, el, "migratable= is only for mode='host-passthrough' or 'maximum' "
                   "(libvirt refuses it elsewhere)")  # fmt: skip
    if mode in ("host-passthrough", "maximum"):
        model = "host"
    elif mode == "host-model":
        model = "auto"
    else:
        if el.get("match") == "minimum":
            raise _bad(source, el, "match='minimum': libvirt adds host-model features to the "
                       "model, so the guest's CPU is not the one written; use match='exact'")
        m = once.get("model")
        if m is None or not (m.text or "").strip():
            raise _bad(source, el, "<cpu mode='custom'> without a <model>")
        _check_attrs(source, m, _MODEL_ATTRS)
        name = (m.text or "").strip()
        if len(name) > _MAX_NAME:
            raise _bad(source, m, f"model {_show(name)}: longer than {_MAX_NAME} characters")
        try:
            model = safe_model(name)
        except InputError as exc:
            raise _bad(source, m, str(exc)) from None
    return (model, *_features(source, el))


# What libvirt 9.0's cputypes.rng (guestcpu) allows, attribute -> values.
# <model vendor_id> is valid there, but changes CPUID's vendor string, which
# a (model, enabled, disabled) cannot carry: refused with that reason.
_CPU_ATTRS: Final[dict[str, tuple[str, ...]]] = {
    "mode": ("custom", "host-model", "host-passthrough", "maximum"),
    "match": ("minimum", "exact", "strict"),
    "check": ("none", "partial", "full"),
    "migratable": ("on", "off"),
}
_MODEL_ATTRS: Final[dict[str, tuple[str, ...]]] = {"fallback": ("allow", "forbid")}
_POLICIES: Final = ("force", "require", "optional", "disable", "forbid")
_FEATURE_ATTRS: Final[dict[str, tuple[str, ...]]] = {"policy": (), "name": ()}  # see _features
# <cpu>'s children in that schema: at most one of each, any number of <feature>.
_ONCE: Final = ("model", "vendor", "topology", "numa", "cache", "maxphysaddr")
_MAX_NAME: Final = 64  # longer than any cpu_map model or feature name


def _show(text: str) -> str:
    """repr() of user text for a one-line message, cut to ~40 characters."""
    shown = repr(text)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def _tag(el: etree._Element) -> str:
    return _show(str(el.tag))[1:-1]


def _at(el: etree._Element) -> str:
    line = el.sourceline
    return f"line {line}" if isinstance(line, int) else "the element"


def _bad(source: str, el: etree._Element, message: str) -> InputError:
    """An InputError naming the source, the reason and the element's line."""
    line = el.sourceline
    return InputError(f"{source}: {message}" + (f" (line {line})" if isinstance(line, int) else ""))


def _check_attrs(source: str, el: etree._Element, allowed: dict[str, tuple[str, ...]]) -> None:
    for key, value in el.attrib.items():
        key, value = str(key), str(value)
        if key == "vendor_id" and el.tag == "model":
            raise _bad(source, el, f"<model vendor_id={_show(value)}> changes the CPUID vendor "
                       "string, which this tool cannot carry or verify")  # fmt: skip
        if key not in allowed:
            raise _bad(source, el, f"<{_tag(el)}> has unknown attribute {_show(key)}")
        if allowed[key] and value not in allowed[key]:
            raise _bad(source, el, f"<{_tag(el)} {key}={_show(value)}>: not one of "
                       f"{', '.join(allowed[key])}")  # fmt: skip


def _check_children(source: str, cpu: etree._Element) -> dict[str, etree._Element]:
    """<cpu>'s unique children by tag; refuses unknown and repeated ones, and text."""
    if (cpu.text or "").strip():
        raise _bad(source, cpu, f"unexpected text in <cpu>: {_show((cpu.text or '').strip())}")
    once: dict[str, etree._Element] = {}
    for child in cpu:
        if (child.tail or "").strip():
            raise _bad(source, child, f"unexpected text in <cpu>: "
                       f"{_show((child.tail or '').strip())}")  # fmt: skip
        if not isinstance(child.tag, str):
            continue  # comments, processing instructions
        tag = str(child.tag)
        if tag in _ONCE:
            if tag in once:
                raise _bad(source, child, f"a second <{tag}> in <cpu> (the first: "
                           f"{_at(once[tag])}): which one is meant?")  # fmt: skip
            once[tag] = child
        elif tag != "feature":
            raise _bad(source, child, f"unexpected <{_tag(child)}> in <cpu> (libvirt's schema "
                       f"has {', '.join(_ONCE)} and feature)")  # fmt: skip
    model = once.get("model")
    if model is not None and len(model):
        raise _bad(source, model, "<model> takes only the model name as text")
    return once


def _features(source: str, cpu: etree._Element) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(enabled, disabled) canonical names from <cpu>'s <feature> elements."""
    reg = registry()
    state: dict[str, bool | None] = {}  # None: policy='optional'
    first: dict[str, etree._Element] = {}
    for f in cpu.findall("feature"):
        _check_attrs(source, f, _FEATURE_ATTRS)
        if len(f) or (f.text or "").strip():
            raise _bad(source, f, "<feature> takes no content")
        name, policy = f.get("name"), f.get("policy", "require")
        if not name:
            raise _bad(source, f, "<feature> without a name=")
        if len(name) > _MAX_NAME:
            raise _bad(source, f, f"feature {_show(name)}: longer than {_MAX_NAME} characters")
        if policy not in _POLICIES:
            raise _bad(source, f, f"feature {_show(name)}: unknown policy {_show(policy)} (not "
                       f"one of {', '.join(_POLICIES)})")  # fmt: skip
        feature = reg.by_libvirt(name) or msr_registry().by_libvirt(name)
        if feature is None:
            raise _unknown_to_libvirt(source, f, reg, name)
        if feature.name in first:
            same = "" if first[feature.name].get("name") == name else f" (as {feature.name})"
            raise _bad(source, f, f"feature {_show(name)}{same} given twice (the first: "
                       f"{_at(first[feature.name])}); libvirt refuses that too")  # fmt: skip
        first[feature.name] = f
        state[feature.name] = (True if policy in ("require", "force")
                               else False if policy in ("disable", "forbid") else None)  # fmt: skip
    return (
        tuple(n for n, on in state.items() if on is True),
        tuple(n for n, on in state.items() if on is False),
    )


def _unknown_to_libvirt(source: str, el: etree._Element, reg: Registry,
                        name: str) -> UnknownFeatureError:  # fmt: skip
    """UnknownFeatureError for a name libvirt's cpu_map does not spell: libvirt
    looks names up exactly ("unknown CPU feature"), so `pclmulqdq` (QEMU's)
    or `LAHF_LM` would fail there; the hint is the cpu_map name of that bit."""
    err = UnknownFeatureError(name, reg.hint(name, lambda f: f.libvirt))
    text = str(err).replace("unknown feature", "libvirt does not know the feature", 1)
    err.args = (str(_bad(source, el, text)),)
    return err
