"""`kvmcpuid compat GUEST`: can a guest with this CPU run on this host (or
the host of `--host DUMP`, or of a libvirt daemon at `--connect URI`)? The
verdict goes register by register (the rules: docs/compat.md), and each
reason names the feature or field and the layer that cannot give it.

Exit status: 0 fits, 1 does not fit, 2 error. Stdlib-only imports at module
level."""

from __future__ import annotations

import argparse
import sys

TYPE_CHECKING = False  # the fast path's typing stand-in: docs/ARCHITECTURE.md, Start-up
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from kvmcpuid_virt.analysis.compat import Host
    from kvmcpuid_virt.toolfacts.facts import ToolFacts

__all__ = ["add_parser", "run"]

HELP = "can a guest with this CPU run on this host (or a dump's)?"


def add_parser(subparsers: Any) -> None:  # argparse._SubParsersAction
    p = subparsers.add_parser(
        "compat", help=HELP,
        description="Whether a guest's CPU fits this host: feature bits a subset of what "
        "the host can give, max leaves and counts no greater, vendor and XSAVE layout "
        "equal (docs/compat.md). Exit status: 0 fits, 1 does not fit, 2 error.",
    )  # fmt: skip
    p.add_argument("guest", metavar="GUEST",
                   help="a domain XML, a libvirt <cpu>, a file with `-cpu VALUE` (or "
                   "kvmcpuid-qemu-flags output), or a dump of what a guest sees; "
                   "- for stdin")  # fmt: skip
    where = p.add_mutually_exclusive_group()
    where.add_argument("--host", metavar="DUMP",
                       help="judge against this dump's supported CPUID instead of this "
                       "host's /dev/kvm")  # fmt: skip
    where.add_argument("--connect", metavar="URI",
                       help="judge against the host-model CPU of the libvirt daemon at URI "
                       "(feature bits only: a host-model names no max leaves)")  # fmt: skip
    p.add_argument("--format", choices=("table", "json"), default="table",
                   help="default: table")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from functools import cache

    from kvmcpuid_virt.analysis.compat import judge_text
    from kvmcpuid_virt.analysis.given import classify
    from kvmcpuid_virt.cli.options import learn_facts
    from kvmcpuid_virt.fsutil import read_text
    from kvmcpuid_virt.toolfacts.facts import NO_TOOLS

    # The guest first: a bad path or file fails before /dev/kvm or QEMU.
    text, source = read_text(args.guest)
    # The tool facts (QEMU's model definitions) only where they are used: to
    # apply a configuration, or as the QEMU layer of this machine.
    facts = cache(learn_facts)
    host = _host(args, facts)
    verdict = judge_text(text, source, host, facts() if classify(text) != "dump" else NO_TOOLS)
    sys.stdout.write(verdict.render_json() if args.format == "json" else verdict.render_table())
    return 0 if verdict.fits else 1


def _host(args: argparse.Namespace, facts: Callable[[], ToolFacts]) -> Host:
    """This machine's live KVM table, a dump (this machine's QEMU and host
    control count only if the dump is this machine's), or a libvirt host-model."""
    from kvmcpuid_virt.analysis.compat import Host
    from kvmcpuid_virt.cpuid.formats import Dump
    from kvmcpuid_virt.hostview import host_of, live_table

    if args.connect:
        from kvmcpuid_virt.libvirt_caps import connect_dump

        return Host(connect_dump(args.connect, facts()).dump)
    if args.host:
        from kvmcpuid_virt.cli.options import of_this_host, refuse_emulated
        from kvmcpuid_virt.fsutil import load_dump

        dump = refuse_emulated(load_dump(args.host))
        mine = of_this_host(dump)
        return host_of(dump, facts() if mine else None, this_host=mine)
    return host_of(Dump(live_table(), "supported", source="/dev/kvm"), facts(), this_host=True)
