"""`kvmcpuid features`: the named CPUID features of this host's KVM or of a dump,
with the decoded non-flag fields (vendor, family/model, sizes, caches), and the
feature MSRs (IA32_ARCH_CAPABILITIES, ...) with their named bits and what a
vCPU here accepts of them."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # heavy-ish imports stay out of `kvmcpuid --help`
    from kvmcpuid_virt.cpuid.features import Feature, Registry
    from kvmcpuid_virt.cpuid.msr_features import (
        FeatureMsrs,
        MsrDelivery,
        MsrFeature,
        MsrRegistry,
    )
    from kvmcpuid_virt.cpuid.table import CpuidTable, Register

    # What render_* show of the feature MSRs: the values (None: unknown), the
    # vCPU trial, a note (why something is missing, or whence), the registry.
    MsrView = tuple[FeatureMsrs | None, MsrDelivery | None, str | None, MsrRegistry]

__all__ = [
    "FROM_DUMP", "FROM_DUMP_TRIED", "NO_MSRS_IN_DUMP", "add_parser", "live_msr_view",
    "render_json", "render_table", "run",
]  # fmt: skip

WIDTH = 80
# `--from DUMP` of a dump without feature MSRs (format 1, `cpuid -1r` text,
# a <cpudata> without <msr>): unknown, not "none".
NO_MSRS_IN_DUMP = "no feature MSRs in this dump"
FROM_DUMP = "as the dump's host reported them; no vCPU tried them here"
# A format-2 dump taken with `dump --msr-trial` records what a vCPU of its
# host accepted: the refused bits are that record, not a trial here.
FROM_DUMP_TRIED = ("as the dump's host reported them, with the bits a vCPU there accepted "
                   "(`kvmcpuid dump --msr-trial`); refused: by that vCPU, not tried here")
NO_MSR_CAP = "this kernel has no KVM_CAP_GET_MSR_FEATURES"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "features",
        help="list the named CPUID features of this host or a dump",
        description="Name every set CPUID feature bit of KVM_GET_SUPPORTED_CPUID (default) "
        "or of a dump (JSON, libvirt <cpudata> or `cpuid -1r` text), grouped by leaf and "
        "register, and decode vendor, family/model/stepping, brand, address sizes, XSAVE, "
        "caches and topology. Live, also list the feature MSRs KVM reports "
        "(KVM_GET_MSR_FEATURE_INDEX_LIST) with the MSR and bit of each named feature, and "
        "mark the bits a vCPU here refuses (KVM_SET_MSRS on a vCPU that never runs).",
    )
    p.add_argument("--from", dest="dump", metavar="DUMP", help="read a dump instead of /dev/kvm")
    p.add_argument(
        "--names",
        choices=("qemu", "libvirt"),
        default="qemu",
        help="spell features as QEMU -cpu or libvirt cpu_map does (default: qemu)",
    )
    p.add_argument(
        "--format",
        choices=("table", "json", "kubevirt"),
        default="table",
        help="default: table; kubevirt: KubeVirt node labels (cpu-feature, cpu-model, "
        "cpu-vendor .node.kubevirt.io/NAME=true, libvirt's names; docs/exports.md)",
    )
    p.add_argument("--device", default="/dev/kvm", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from kvmcpuid_virt.cpuid.features import registry
    from kvmcpuid_virt.cpuid.msr_features import msr_registry

    msrs: FeatureMsrs | None = None
    delivery: MsrDelivery | None = None
    this_host = True
    if args.dump:
        from kvmcpuid_virt.fsutil import load_dump

        dump = load_dump(args.dump)
        table = dump.table
        source = args.dump
        note: str | None = NO_MSRS_IN_DUMP
        if table.msrs is not None:
            # A format-2 dump's (or <cpudata>'s <msr>) values: shown as the
            # host it came from reported them; no vCPU trial here.
            msrs = table.msrs
            tried = msrs.deliverable is not None
            note = (FROM_DUMP_TRIED if tried else FROM_DUMP) if msrs.available \
                else (msrs.why or NO_MSR_CAP)  # fmt: skip
        if args.format == "kubevirt":
            from kvmcpuid_virt.cli.options import of_this_host, refuse_emulated

            this_host = of_this_host(refuse_emulated(dump))
    else:
        from kvmcpuid_virt.kvm import Kvm

        with Kvm(args.device) as kvm:
            table = kvm.supported_cpuid()
            msrs, delivery, note = live_msr_view(kvm, table)
        source = f"{args.device} KVM_GET_SUPPORTED_CPUID"
    if args.format == "kubevirt":
        sys.stdout.write(_kubevirt(table, this_host, not args.dump, delivery))
        return 0
    reg = registry()
    view = (msrs, delivery, note, msr_registry())
    if args.format == "json":
        text = render_json(table, reg, args.names, source, msr_view=view)
    else:
        text = render_table(table, reg, args.names, source, msr_view=view)
    sys.stdout.write(text)
    return 0


def _kubevirt(
    table: CpuidTable, this_host: bool, live: bool, delivery: MsrDelivery | None
) -> str:
    """The KubeVirt labels; live, with the feature-MSR bits a vCPU here
    accepts (none when the vCPU trial could not run); from a dump, with the
    feature MSRs it carries."""
    from kvmcpuid_virt.adapters.kubevirt import node_labels
    from kvmcpuid_virt.cli.options import learn_facts

    values: dict[int, int] | None = None  # None: what the table carries
    if live:
        values = {} if delivery is None else {t.index: t.deliverable for t in delivery.trials}
    labels = node_labels(table, learn_facts(), this_host=this_host, msr_values=values)
    if labels.note:
        sys.stderr.write(f"kvmcpuid features: warning: {labels.note}\n")
    return labels.text()


def live_msr_view(
    kvm: Any, table: CpuidTable
) -> tuple[FeatureMsrs, MsrDelivery | None, str | None]:
    """What `kvm` (a kvm.Kvm) reports of its feature MSRs, what a vCPU given
    `table` accepts of them, and a note when either could not be learned."""
    from kvmcpuid_virt.errors import KvmError
    from kvmcpuid_virt.kvm.msrs import msr_delivery

    msrs = kvm.read_feature_msrs()
    if not msrs.available:
        return msrs, None, NO_MSR_CAP
    try:
        return msrs, msr_delivery(kvm, table=table, values=msrs.as_dict()), None
    except KvmError as exc:
        return msrs, None, f"the vCPU trial failed: {exc}"


def _label(f: Feature, names: str) -> str:
    """The feature in the chosen tool's spelling; a name the tool does not
    know is shown in brackets (that tool cannot set the bit by name)."""
    chosen = f.qemu if names == "qemu" else f.libvirt
    if chosen is not None:
        return chosen
    return f"[{f.name if names == 'qemu' else (f.qemu or f.name)}]"


_MARK = {"kvm-pv": "", "plain": "", "dynamic": "~", "unsettable": "!"}


def _unnamed(table: CpuidTable, reg: Registry, leaf: int, sub: int, r: Register) -> int:
    known = 0
    for f in reg.in_word(leaf, sub, r):
        known |= f.mask
    return table.get(leaf, sub, r) & ~known


def render_table(
    table: CpuidTable, reg: Registry, names: str, source: str, *, msr_view: MsrView | None = None
) -> str:
    """Decoded fields, then the set features of each register, then (with
    `msr_view`: the feature MSRs, the vCPU trial, a note, the MSR registry)
    the feature MSRs, wrapped to 80 columns."""
    lines = [f"source        {source}", *_field_lines(table)]
    present = {id(f) for f in reg.present(table)}
    for leaf, sub, r in reg.words():
        feats = [f for f in reg.in_word(leaf, sub, r) if id(f) in present]
        extra = _unnamed(table, reg, leaf, sub, r) if feats else 0
        if not feats:
            continue
        title = f"CPUID.{leaf:02X}H" + (f".{sub}" if sub else "") + f":{r.upper()}"
        count = f"{len(feats)} of {len(reg.in_word(leaf, sub, r))} named bits set"
        if extra:
            count += f", unnamed {extra:#010x}"
        lines.append("")
        lines.append(f"{title}  ({count})")
        words = " ".join(_label(f, names) + _MARK[f.kind] for f in feats)
        lines.extend(_wrap(words, "  ", "  "))
    if msr_view is not None:
        lines += _msr_lines(names, *msr_view)
    lines.append("")
    lines.append(
        f"~ follows guest state   ! no QEMU/libvirt name sets it   "
        f"[x] unknown to {'QEMU' if names == 'qemu' else 'libvirt'}"
    )
    if msr_view is not None and msr_view[1] is not None:
        lines.append("refused: a vCPU here does not accept the bit (KVM_SET_MSRS)")
    return "\n".join(lines) + "\n"


def _msr_label(f: MsrFeature, names: str) -> str:
    chosen = f.qemu if names == "qemu" else f.libvirt
    if chosen is not None:
        return chosen
    return f"[{f.name if names == 'qemu' else (f.qemu or f.name)}]"


def _msr_lines(
    names: str,
    msrs: FeatureMsrs | None,
    delivery: MsrDelivery | None,
    note: str | None,
    mreg: MsrRegistry,
) -> list[str]:
    lines = [""]
    if msrs is None or not msrs.available:
        return [*lines, f"feature MSRs  {note or NO_MSRS_IN_DUMP}"]
    head = f"feature MSRs  {len(msrs)} listed by KVM_GET_MSR_FEATURE_INDEX_LIST"
    if delivery is not None:
        head += f"; tried on a vCPU ({delivery.seconds * 1000:.0f} ms)"
    lines.append(head)
    if note:
        lines.extend(_wrap(note, "  ", "  "))
    for index, value in msrs.items:
        info = mreg.msr(index)
        feats = mreg.in_msr(index)
        on = [f for f in feats if f.present(value)]
        title = info.label if info else f"MSR {index:X}H (not in the registry)"
        title += f" = {value:#x}"
        if feats:
            title += f"  ({len(on)} of {len(feats)} named bits set"
            extra = mreg.unnamed(index, value)
            title += f", unnamed {extra:#x})" if extra else ")"
        lines.append("")
        lines.extend(_wrap(title, "", "  "))  # a dump's values can be long: 80 columns
        trial = delivery.trial(index) if delivery is not None else None
        refused_bits = trial.refused if trial is not None else _recorded_refused(msrs, index)
        for f in on:
            ctl = f" (control {f.control})" if f.control is not None else ""
            label = _msr_label(f, names) + _MARK[f.kind]
            refused = refused_bits is not None and bool(refused_bits & f.mask)
            text = f"  bit {f.bit:2}{ctl}  {label}"
            lines.append(f"{text:<44} refused" if refused else text)
        if trial is not None and trial.refused:
            lines.extend(_wrap(f"a vCPU refuses {trial.refused:#x}: {trial.reason}", "  ", "  "))
        elif trial is None and refused_bits:
            lines.extend(_wrap(f"a vCPU of the dump's host refused {refused_bits:#x}", "  ", "  "))
    return lines


def _recorded_refused(msrs: FeatureMsrs, index: int) -> int | None:
    """The bits of MSR `index` a dump records its host's vCPU refused
    (None: the dump records no trial)."""
    accepts = msrs.deliverable_dict()
    if accepts is None:
        return None
    return (msrs.get(index) or 0) & ~accepts.get(index, 0)


def _wrap(text: str, first: str, rest: str) -> list[str]:
    # Feature names contain hyphens and must never be split across lines.
    return textwrap.wrap(
        text,
        WIDTH,
        initial_indent=first,
        subsequent_indent=rest,
        break_on_hyphens=False,
        break_long_words=False,
    )


def _human(n: int) -> str:
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            value = n / size
            return f"{value:g} {unit}" if value != int(value) else f"{int(value)} {unit}"
    return f"{n} B"


def _hex(v: int | None) -> str:
    return "-" if v is None else f"{v:#x}"


def _field_lines(table: CpuidTable) -> list[str]:
    from kvmcpuid_virt.cpuid import fields

    out = [f"vendor        {fields.vendor(table) or '-'}"]
    brand = fields.brand_string(table)
    out.append(f"brand         {brand if brand else '-'}")
    sig = fields.signature(table)
    if sig is not None:
        out.append(
            f"signature     family {sig.family:#x} model {sig.model:#x} stepping {sig.stepping}"
            f" ({sig.family}/{sig.model}/{sig.stepping}, eax {sig.raw:#010x})"
        )
    out.append(
        f"max leaves    basic {_hex(fields.max_basic_leaf(table))}, "
        f"extended {_hex(fields.max_extended_leaf(table))}, "
        f"hypervisor {_hex(fields.max_hypervisor_leaf(table))}"
    )
    hv = fields.hypervisor_signature(table)
    if hv:
        out.append(f"hypervisor    {hv}")
    addr = fields.address_sizes(table)
    if addr is not None:
        out.append(f"address bits  {addr.physical} physical, {addr.virtual} virtual")
    xs = fields.xsave(table)
    if xs is not None:
        out.append(
            f"xsave         xcr0 {xs.xcr0_mask:#x} xss {xs.xss_mask:#x}; max {xs.max_size}, "
            f"enabled {xs.enabled_size}, "
            # 0xD.1 EBX is 0 on CPUs without XSAVEC/XSAVES (Broadwell and older)
            + (f"compact {xs.compacted_size} bytes" if xs.compacted_size
               else "no compacted form")
        )
    cache_text = ", ".join(
        f"L{c.level}{ {'data': 'd', 'instruction': 'i'}.get(c.type, '') } {_human(c.size)} "
        f"{c.ways}-way/{c.shared_by}"
        for c in fields.caches(table)
    )
    if cache_text:
        out.extend(_wrap(cache_text, "caches        ", " " * 14))
    topo = fields.topology(table)
    if topo:
        leaf = topo[0].leaf
        text = ", ".join(f"{t.type} shift {t.shift}" for t in topo)
        out.append(f"topology      {text} (leaf {leaf:#x})")
    return out


def render_json(
    table: CpuidTable, reg: Registry, names: str, source: str, *, msr_view: MsrView | None = None
) -> str:
    from kvmcpuid_virt.cpuid import fields

    feats: list[dict[str, Any]] = [
        {
            "name": (f.qemu if names == "qemu" else f.libvirt) or f.name,
            "qemu": f.qemu,
            "libvirt": f.libvirt,
            "kind": str(f.kind),
            "leaf": f"{f.leaf:#x}",
            "subleaf": f.subleaf,
            "reg": f.reg,
            "bit": f.bit,
        }
        for f in reg.present(table)
    ]
    unnamed = []
    for leaf, sub, r in reg.words():
        extra = _unnamed(table, reg, leaf, sub, r)
        if extra:
            unnamed.append({"leaf": f"{leaf:#x}", "subleaf": sub, "reg": r, "mask": f"{extra:#x}"})
    doc: dict[str, Any] = {
        "source": source,
        "fields": fields.decode(table),
        "features": feats,
        "unnamed_bits": unnamed,
    }
    if msr_view is not None:
        doc["feature_msrs"] = _msr_json(names, *msr_view)
    return json.dumps(doc, indent=2) + "\n"


def _msr_json(
    names: str,
    msrs: FeatureMsrs | None,
    delivery: MsrDelivery | None,
    note: str | None,
    mreg: MsrRegistry,
) -> dict[str, Any]:
    """available false: nothing could be read (a dump, a kernel without
    KVM_CAP_GET_MSR_FEATURES); true with no msrs: KVM listed none."""
    doc: dict[str, Any] = {
        "available": bool(msrs is not None and msrs.available),
        "note": note,
        "msrs": [],
        "features": [],
        "vcpu_trial": None,
    }
    if msrs is None or not msrs.available:
        doc["note"] = note or NO_MSRS_IN_DUMP
        return doc
    if delivery is not None:
        doc["vcpu_trial"] = {
            "seconds": round(delivery.seconds, 6),
            "cpuid_lost": list(delivery.cpuid_lost),
        }
    for index, value in msrs.items:
        info = mreg.msr(index)
        trial = delivery.trial(index) if delivery is not None else None
        recorded = _recorded_refused(msrs, index) if trial is None else None
        vcpu: dict[str, Any] | None = None
        if trial is not None:
            vcpu = {"accepted": trial.accepted, "deliverable": f"{trial.deliverable:#x}",
                    "refused": f"{trial.refused:#x}", "reason": trial.reason}  # fmt: skip
        elif recorded is not None:
            # The dump's own record of its host's vCPU (no trial here).
            vcpu = {"accepted": not recorded, "deliverable": f"{value & ~recorded:#x}",
                    "refused": f"{recorded:#x}", "reason": None, "recorded": True}  # fmt: skip
        refused_bits = trial.refused if trial is not None else recorded
        doc["msrs"].append({
            "index": f"{index:#x}",
            "name": info.name if info else None,
            "value": f"{value:#x}",
            "unnamed": f"{mreg.unnamed(index, value):#x}",
            "vcpu": vcpu,
        })  # fmt: skip
        for f in mreg.in_msr(index):
            if not f.present(value):
                continue
            doc["features"].append({
                "name": (f.qemu if names == "qemu" else f.libvirt) or f.name,
                "qemu": f.qemu,
                "libvirt": f.libvirt,
                "sdm": f.sdm,
                "kind": str(f.kind),
                "msr": f"{index:#x}",
                "bit": f.bit,
                "control": f.control,
                "refused": None if refused_bits is None else bool(refused_bits & f.mask),
            })  # fmt: skip
    return doc
