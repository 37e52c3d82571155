"""`kvmcpuid compat GUEST`: can a guest with this CPU run on this host (or
the host of `--host DUMP`, or of a libvirt daemon at `--connect URI`)? The
verdict goes register by register (the rules: docs/compat.md), and each
reason names the feature or field and the layer that cannot give it.

Exit status: 0 fits, 1 does not fit, 2 error. Stdlib-only imports at module
level."""

from __future__ import annotations

import argparse
import sys

from kvmcpuid_virt.cli.fleet_options import add_fleet_options

TYPE_CHECKING = False  # the fast path's typing stand-in: docs/ARCHITECTURE.md, Start-up
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from kvmcpuid_virt.analysis.compat import Host
    from kvmcpuid_virt.toolfacts.facts import ToolFacts

__all__ = ["add_parser", "run"]

PROG = "kvmcpuid compat"
HELP = "can a guest with this CPU run on this host (or a dump's, or which of many)?"


def add_parser(subparsers: Any) -> None:  # argparse._SubParsersAction
    p = subparsers.add_parser(
        "compat", help=HELP,
        description="Whether a guest's CPU fits this host: feature bits a subset of what "
        "the host can give, max leaves and counts no greater, vendor and XSAVE layout "
        "equal (docs/compat.md). With several hosts (HOST dumps, repeated --connect): "
        "which of them can take the guest. With --matrix: every ordered pair of the "
        "hosts. Exit status: 0 fits (every host, every pair), 1 does not fit, 2 error.",
    )  # fmt: skip
    p.add_argument("operands", nargs="*", metavar="GUEST [HOST ...]",
                   help="GUEST: a domain XML, a libvirt <cpu>, a file with `-cpu VALUE` (or "
                   "kvmcpuid-qemu-flags output), or a dump of what a guest sees; - for "
                   "stdin. HOST: dumps of hosts to judge it on (with --matrix every "
                   "operand is a HOST)")  # fmt: skip
    p.add_argument("--host", metavar="DUMP",
                   help="judge against this dump's supported CPUID instead of this "
                   "host's /dev/kvm")  # fmt: skip
    p.add_argument("--connect", metavar="URI", action="append", default=[],
                   help="judge against the host-model CPU of the libvirt daemon at URI "
                   "(feature bits only: a host-model names no max leaves); repeatable, "
                   "the daemons are asked concurrently")  # fmt: skip
    p.add_argument("--matrix", action="store_true",
                   help="for every ordered pair (A, B) of the hosts: can a guest with A's "
                   "full CPU run on B")  # fmt: skip
    add_fleet_options(p)
    p.add_argument("--format", choices=("table", "json", "html"), default="table",
                   help="default: table (html: --matrix only)")  # fmt: skip
    p.add_argument("-o", "--output", default="-", metavar="FILE",
                   help="write FILE atomically (default: standard output)")


def run(args: argparse.Namespace) -> int:
    from kvmcpuid_virt.errors import InputError

    if args.matrix:
        if args.host:
            raise InputError("--matrix takes its hosts as operands: HOST... (dumps) and "
                             "--connect URI")  # fmt: skip
        return _matrix(args)
    if not args.operands:
        raise InputError("no guest: give GUEST (a domain XML, <cpu>, -cpu file or dump)")
    if args.format == "html":
        raise InputError("--format html is the --matrix page")
    if len(args.operands) > 1 or len(args.connect) > 1 or (args.host and args.connect):
        return _fleet(args)
    return _single(args)


def _write(args: argparse.Namespace, text: str) -> None:
    from kvmcpuid_virt.fsutil import atomic_write

    if args.output == "-":
        sys.stdout.write(text)
    else:
        atomic_write(args.output, text)


def _single(args: argparse.Namespace) -> int:
    from functools import cache

    from kvmcpuid_virt.analysis.compat import judge_text
    from kvmcpuid_virt.analysis.given import classify
    from kvmcpuid_virt.cli.options import learn_facts
    from kvmcpuid_virt.fsutil import read_text
    from kvmcpuid_virt.toolfacts.facts import NO_TOOLS

    # The guest first: a bad path or file fails before /dev/kvm or QEMU.
    text, source = read_text(args.operands[0])
    # The tool facts (QEMU's model definitions) only where they are used: to
    # apply a configuration, or as the QEMU layer of this machine.
    facts = cache(learn_facts)
    host = _host(args, facts)
    verdict = judge_text(text, source, host, facts() if classify(text) != "dump" else NO_TOOLS)
    _write(args, verdict.render_json() if args.format == "json" else verdict.render_table())
    return 0 if verdict.fits else 1


def _hosts(args: argparse.Namespace, dumps: list[str], facts: Callable[[], ToolFacts],
           *, this_machine: bool = True) -> list[Host]:  # fmt: skip
    """The hosts named: dumps (HOST operands, --host), then --connect URIs
    (asked concurrently), in that order. A dump of this machine as it runs
    now is judged with this machine's QEMU and host control, as `--host`
    (unless not `this_machine`: the matrix reads every host as its dump)."""
    from kvmcpuid_virt.analysis.compat import Host
    from kvmcpuid_virt.cli.options import of_this_host, refuse_emulated
    from kvmcpuid_virt.fleet import load_dumps
    from kvmcpuid_virt.hostview import host_of

    hosts = []
    for d in load_dumps(dumps, refuse_emulated):
        mine = this_machine and of_this_host(d)
        hosts.append(_with_msrs(host_of(d, facts() if mine else None, this_host=mine), facts))
    if args.connect:
        from kvmcpuid_virt.fleet import ask_all
        from kvmcpuid_virt.libvirt_caps import connect_dump

        learned = facts()
        answers = ask_all(args.connect, lambda uri: connect_dump(uri, learned), prog=PROG,
                          what="host-models", skip_unreachable=args.skip_unreachable,
                          timeout=args.connect_timeout)  # fmt: skip
        hosts += [Host(model.dump) for _, model in answers]
    return hosts


def _fleet(args: argparse.Namespace) -> int:
    """Which of several hosts can take GUEST: one verdict per host."""
    from functools import cache

    from kvmcpuid_virt.analysis.compat import judge_text
    from kvmcpuid_virt.analysis.given import classify
    from kvmcpuid_virt.analysis.matrix_report import fleet_json, fleet_table
    from kvmcpuid_virt.cli.options import learn_facts
    from kvmcpuid_virt.fsutil import read_text
    from kvmcpuid_virt.toolfacts.facts import NO_TOOLS

    text, source = read_text(args.operands[0])
    facts = cache(learn_facts)
    dumps = [*([args.host] if args.host else []), *args.operands[1:]]
    hosts = _hosts(args, dumps, facts)
    tools = facts() if classify(text) != "dump" else NO_TOOLS
    verdicts = [judge_text(text, source, h, tools) for h in hosts]
    _write(args, fleet_json(source, verdicts) if args.format == "json"
           else fleet_table(source, verdicts))  # fmt: skip
    return 0 if all(v.fits for v in verdicts) else 1


def _matrix(args: argparse.Namespace) -> int:
    """Every ordered pair of the hosts (analysis/matrix.py)."""
    from functools import cache

    from kvmcpuid_virt.analysis import matrix_report as report
    from kvmcpuid_virt.analysis.matrix import matrix
    from kvmcpuid_virt.cli.options import learn_facts
    from kvmcpuid_virt.errors import InputError

    hosts = _hosts(args, list(args.operands), cache(learn_facts), this_machine=False)
    if len(hosts) < 2:
        raise InputError("--matrix needs at least two hosts (HOST dumps, --connect URI)")
    m = matrix([h.dump for h in hosts])
    if args.format == "json":
        text = report.matrix_json(m)
    elif args.format == "html":
        text = report.matrix_html(m)
    else:
        text = report.matrix_table(m)
    _write(args, text)
    return 0 if all(m.fits(g, h) for g in range(len(m.groups))
                    for h in range(len(m.groups))) else 1  # fmt: skip


def _host(args: argparse.Namespace, facts: Callable[[], ToolFacts]) -> Host:
    """This machine's live KVM table, a dump (this machine's QEMU and host
    control count only if the dump is this machine's), or a libvirt host-model."""
    from kvmcpuid_virt.analysis.compat import Host
    from kvmcpuid_virt.cpuid.formats import Dump
    from kvmcpuid_virt.hostview import host_of, live_table

    if args.connect:
        from kvmcpuid_virt.libvirt_caps import connect_dump

        return Host(connect_dump(args.connect[0], facts()).dump)
    if args.host:
        from kvmcpuid_virt.cli.options import of_this_host, refuse_emulated
        from kvmcpuid_virt.fsutil import load_dump

        dump = refuse_emulated(load_dump(args.host))
        mine = of_this_host(dump)
        return _with_msrs(host_of(dump, facts() if mine else None, this_host=mine), facts)
    live = Dump(live_table(), "supported", source="/dev/kvm")
    return _with_msrs(host_of(live, facts(), this_host=True), facts)


def _with_msrs(host: Host, facts: Callable[[], ToolFacts]) -> Host:
    """This machine's feature MSRs, with what its vCPUs accept, for a host
    that is this machine (a dump's own otherwise: msr_policy.msrs_for)."""
    if not host.this_host:
        return host
    from dataclasses import replace

    from kvmcpuid_virt.config.msr_policy import msrs_for

    return replace(host, msrs=msrs_for(host.dump.table, facts(), True))
