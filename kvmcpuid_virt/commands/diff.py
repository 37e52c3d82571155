"""`kvmcpuid diff A B`: named per-bit differences between two dumps or
configurations. A configuration (a QEMU -cpu string, a libvirt <cpu> or a
domain XML) counts as the CPUID a guest would get from it on this host, or
on the host of `--from DUMP`.

Exit status as diff(1): 0 identical CPUID, 1 they differ, 2 error.
Stdlib-only imports at module level."""

from __future__ import annotations

import argparse
import sys

TYPE_CHECKING = False  # the fast path's typing stand-in: docs/ARCHITECTURE.md, Start-up
if TYPE_CHECKING:
    from typing import Any

    from kvmcpuid_virt.cpuid.table import CpuidTable
    from kvmcpuid_virt.toolfacts.facts import ToolFacts

__all__ = ["add_parser", "run"]

HELP = "named per-bit differences between two dumps or configurations"


def add_parser(subparsers: Any) -> None:  # argparse._SubParsersAction
    p = subparsers.add_parser(
        "diff", help=HELP,
        description="Feature bits one host has and the other lacks, by leaf and register, "
        "differing fields (family/model, max leaves, address sizes, XSAVE) and host "
        "fingerprints. Exit status: 0 identical CPUID, 1 different, 2 error.",
    )  # fmt: skip
    p.add_argument("a", metavar="A",
                   help="a dump (JSON, <cpudata>, `cpuid -1r`) or a configuration (a file "
                   "with `-cpu VALUE` or kvmcpuid-qemu-flags output, a libvirt <cpu> or "
                   "domain XML); - for stdin")  # fmt: skip
    p.add_argument("b", metavar="B", help="another dump or configuration")
    p.add_argument("--from", dest="from_", metavar="DUMP",
                   help="apply configurations to this dump's supported CPUID instead of "
                   "this host's /dev/kvm")  # fmt: skip
    p.add_argument("--format", choices=("table", "json"), default="table",
                   help="default: table")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from functools import cache

    from kvmcpuid_virt.analysis.diff import diff, render_json, render_table
    from kvmcpuid_virt.analysis.given import classify, load_operand
    from kvmcpuid_virt.cli.options import learn_facts, read_table
    from kvmcpuid_virt.fsutil import read_text

    @cache
    def supported() -> tuple[CpuidTable, str]:
        # Read once, and only when a configuration needs it.
        table, source, _ = read_table(args)
        return table, source

    @cache
    def base() -> tuple[CpuidTable, str, ToolFacts]:
        return (*supported(), learn_facts())

    operands = []
    notes = []
    for path in (args.a, args.b):
        text, source = read_text(path)
        # The table and the tool facts only when a configuration needs them.
        dump, config = load_operand(text, source, None if classify(text) == "dump" else base())
        operands.append(dump)
        left_out = () if config is None else (*config.dropped, *config.msr_dropped)
        if left_out:
            notes.append(f"{dump.source}: left out, this host cannot give them: "
                         f"{', '.join(left_out)}")  # fmt: skip
    result = diff(operands[0], operands[1], notes=tuple(notes))
    sys.stdout.write(render_json(result) if args.format == "json" else render_table(result))
    return 0 if result.identical else 1
