"""`kvmcpuid baseline`: the CPU configuration every given host can run.

    kvmcpuid baseline a.json b.json --connect qemu+ssh://c/system --format qemu

Inputs: `kvmcpuid dump` files (any dump format; raw CPU dumps are read as what
that CPU could give), libvirt connections (their host-model CPU), and this
host's /dev/kvm with --this-host. Notes about non-flag fields go to stderr
(or into the JSON dump's "notes" list). Stdlib-only imports at module level.
"""

from __future__ import annotations

import argparse
import sys

from kvmcpuid_virt.cli.fleet_options import add_fleet_options

TYPE_CHECKING = False  # the fast path's typing stand-in: docs/ARCHITECTURE.md, Start-up
if TYPE_CHECKING:
    from typing import Any

    from kvmcpuid_virt.config.cpuconfig import CpuConfig
    from kvmcpuid_virt.toolfacts.facts import ToolFacts

__all__ = ["add_parser", "run"]

PROG = "kvmcpuid baseline"
HELP = "the configuration every given host can run"
FORMATS = ("qemu", "libvirt", "json", "cpudata", "cpuid", "firecracker")


def add_parser(subparsers: Any) -> None:  # argparse._SubParsersAction
    p = subparsers.add_parser(
        "baseline", help=HELP,
        description="Intersect the supported CPUID of several hosts: feature bits every host "
        "has, the smallest max leaves and address sizes, XSAVE sizes for the common "
        "components; rendered as QEMU -cpu flags, libvirt <cpu> XML, or a dump.",
    )  # fmt: skip
    p.add_argument("dumps", nargs="*", metavar="DUMP",
                   help="dump files (JSON from `kvmcpuid dump`, <cpudata>, `cpuid -1r`)")
    p.add_argument("--connect", action="append", default=[], metavar="URI",
                   help="a libvirt host (e.g. qemu+ssh://host/system): its host-model CPU "
                   "(repeatable; asked concurrently)")  # fmt: skip
    add_fleet_options(p)
    p.add_argument("--this-host", action="store_true",
                   help="include this host's KVM_GET_SUPPORTED_CPUID")
    p.add_argument("--allow-mixed-vendors", action="store_true",
                   help="allow Intel and AMD hosts together: only vendor-neutral features")
    p.add_argument("--format", choices=FORMATS, default="qemu", help="default: qemu")
    p.add_argument("--model", default="host",
                   help="base of the rendered config: host (default) or a CPU model name")
    p.add_argument("--max-model", metavar="NAME",
                   help="never expose more than CPU model NAME (features outside it turn off)")
    p.add_argument("-o", "--output", default="-", metavar="FILE",
                   help="write FILE atomically (default: standard output)")


def _note(text: str) -> None:
    sys.stderr.write(f"{PROG}: note: {text}\n")


def _on_named_model(config: CpuConfig, facts: ToolFacts) -> CpuConfig:
    """A baseline of other hosts on QEMU's `-cpu MODEL` (libvirt's choice of
    model, every feature explicit), not `-cpu host`: that gives the guest
    each host's own identity and caches, and QEMU cannot migrate it between
    different hosts."""
    import dataclasses

    from kvmcpuid_virt.adapters import libvirt as lv
    from kvmcpuid_virt.errors import PolicyError

    try:
        model = lv.base_model(config, facts)
    except PolicyError as exc:  # no cpu_map here, or no model fits
        sys.stderr.write(f"{PROG}: warning: -cpu host (each host's own identity and caches: "
                         f"no migration between different hosts): {exc}\n")  # fmt: skip
        return config
    sys.stderr.write(f"{PROG}: warning: the baseline is not one host's own CPU, so -cpu "
                     f"names {model!r} with explicit features, not host (each host's own "
                     f"identity and caches, no migration between different hosts): the "
                     f"guest sees {model}'s family/model/stepping, max leaves and brand "
                     f"string\n")  # fmt: skip
    return dataclasses.replace(config, model=model)


def run(args: argparse.Namespace) -> int:
    from functools import cache

    from kvmcpuid_virt.analysis import baseline as bl
    from kvmcpuid_virt.cli.options import learn_facts, of_this_host, refuse_emulated
    from kvmcpuid_virt.cpuid.formats import Dump, dumps
    from kvmcpuid_virt.errors import InputError
    from kvmcpuid_virt.fleet import load_dumps
    from kvmcpuid_virt.fsutil import atomic_write

    inputs: list[Dump] = load_dumps(args.dumps, refuse_emulated)
    notes: list[str] = []
    # The tool facts only where they are used (a host-model's features
    # through cpu_map, a rendered configuration, --max-model).
    learned = cache(learn_facts)
    if args.connect:
        from kvmcpuid_virt.fleet import ask_all
        from kvmcpuid_virt.libvirt_caps import connect_dump

        facts = learned()
        answers = ask_all(args.connect, lambda uri: connect_dump(uri, facts), prog=PROG,
                          what="host-models", skip_unreachable=args.skip_unreachable,
                          timeout=args.connect_timeout)  # fmt: skip
    else:
        answers = []
    for uri, host_model in answers:
        inputs.append(host_model.dump)
        if host_model.msr_left_out:
            # The others are in the dump's feature MSRs and in the intersection.
            notes.append(f"{uri}: host-model MSR features the feature-MSR registry cannot "
                         f"place, left out: {', '.join(host_model.msr_left_out)}")  # fmt: skip
        if host_model.unknown:
            notes.append(f"{uri}: host-model features the registry does not know: "
                         f"{', '.join(host_model.unknown)}")  # fmt: skip
    if args.this_host:
        from kvmcpuid_virt.commands.dump import feature_msrs
        from kvmcpuid_virt.host import host_metadata
        from kvmcpuid_virt.kvm.system import Kvm

        with Kvm() as kvm:
            table = kvm.supported_cpuid()
            # Its feature MSRs with what a vCPU here accepts, as `dump --msr-trial`.
            table = table.with_msrs(feature_msrs(kvm, table))
            inputs.append(Dump(table, "supported", host_metadata(kvm.api_version()),
                               "/dev/kvm"))  # fmt: skip
    if not inputs:
        raise InputError("no hosts: give dump files, --connect URI or --this-host")
    result = bl.baseline(inputs, allow_mixed_vendors=args.allow_mixed_vendors)
    notes.extend(result.notes)
    # With this machine among the hosts, what QEMU cannot set up here (its
    # start trial, toolfacts/learn.trial_start) is not common to every host.
    among_hosts = any(of_this_host(d) for d in inputs)

    if args.format == "firecracker":  # a custom CPU template (docs/exports.md)
        from kvmcpuid_virt.adapters.firecracker import render as firecracker

        keep = _config(result, args, among_hosts, learned()).enabled() if args.max_model else None
        text, more = firecracker(result.table, inputs, keep=keep)
        for n in (*notes, *more):
            _note(n)
        atomic_write(args.output, text)
        return 0

    if args.format in ("json", "cpudata", "cpuid"):
        out = Dump(result.table, "supported", {"baseline_of": ", ".join(result.sources)},
                   "baseline")  # fmt: skip
        if args.max_model:
            # A dump has no model; cap its feature bits through a config.
            config = _config(result, args, among_hosts, learned())
            out = Dump(config.expected, "supported", out.host, "baseline")
        text = dumps(out, args.format)
        if args.format == "json":
            import json

            # The dump reader ignores keys it does not know; "notes" rides along.
            text = text.replace("{\n", "{\n  \"notes\": " + json.dumps(notes) + ",\n", 1)
        else:
            for n in notes:
                _note(n)
        atomic_write(args.output, text)
        return 0

    config = _config(result, args, among_hosts, learned())
    facts = learned()
    for n in notes:
        _note(n)
    if args.format == "qemu":
        from kvmcpuid_virt.adapters.qemu import render

        if config.model == "host" and (args.dumps or args.connect):
            config = _on_named_model(config, facts)
        text = render(config, "arg")
    else:
        from kvmcpuid_virt.adapters import libvirt as lv

        model = lv.base_model(config, facts)
        text = lv.render(config, model)
        identity = lv.identity_note(config, model)
        if identity is not None:  # the named model's identity, not the hosts'
            sys.stderr.write(f"{PROG}: warning: {identity}\n")
        if not text.endswith("\n"):
            text += "\n"
    if config.dropped:
        sys.stderr.write(f"{PROG}: warning: dropped: {', '.join(config.dropped)}\n")
    atomic_write(args.output, text)
    return 0


def _config(result: Any, args: argparse.Namespace, among_hosts: bool, facts: Any) -> Any:
    from kvmcpuid_virt.config.build import Policy, build
    from kvmcpuid_virt.config.max_model import limit_to_model

    config = build(result.table, Policy(model=args.model), facts=facts, source="baseline",
                   this_host=among_hosts)
    if args.max_model:
        config, off = limit_to_model(config, args.max_model, facts)
        if off:
            _note(f"--max-model {args.max_model} turns off: {', '.join(off)}")
    return config
