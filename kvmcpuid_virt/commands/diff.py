"""`kvmcpuid diff A B`: named per-bit differences between two dumps.

Exit status as diff(1): 0 identical CPUID, 1 they differ, 2 error.
Stdlib-only imports at module level."""

from __future__ import annotations

import argparse
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["add_parser", "run"]

HELP = "named per-bit differences between two dumps or configurations"


def add_parser(subparsers: Any) -> None:  # argparse._SubParsersAction
    p = subparsers.add_parser(
        "diff", help=HELP,
        description="Feature bits one host has and the other lacks, by leaf and register, "
        "differing fields (family/model, max leaves, address sizes, XSAVE) and host "
        "fingerprints. Exit status: 0 identical CPUID, 1 different, 2 error.",
    )  # fmt: skip
    p.add_argument("a", metavar="A", help="a dump (JSON, <cpudata>, `cpuid -1r`; - for stdin)")
    p.add_argument("b", metavar="B", help="another dump")
    p.add_argument("--format", choices=("table", "json"), default="table",
                   help="default: table")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from kvmcpuid_virt.cpuid.formats import load
    from kvmcpuid_virt.policy.diff import diff, render_json, render_table

    result = diff(load(args.a), load(args.b))
    sys.stdout.write(render_json(result) if args.format == "json" else render_table(result))
    return 0 if result.identical else 1
