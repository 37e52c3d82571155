"""`kvmcpuid qemu-flags` / `kvmcpuid-qemu-flags`: print the -cpu option for
this host (or a dump) under a policy.

    qemu-system-x86_64 -accel kvm $(kvmcpuid-qemu-flags) ...

Stdlib-only imports at module level; the work happens in run()."""

from __future__ import annotations

import argparse
import sys

TYPE_CHECKING = False  # the fast path's typing stand-in: docs/ARCHITECTURE.md, Start-up
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

__all__ = ["add_parser", "main", "run"]

PROG = "kvmcpuid-qemu-flags"
HELP = "print `-cpu MODEL,feat=on,...,feat=off,enforce` for QEMU"


def _configure(parser: argparse.ArgumentParser) -> None:
    from kvmcpuid_virt.cli.options import add_policy_options

    add_policy_options(parser)
    parser.add_argument(
        "--format", choices=("arg", "argv", "json"), default="arg",
        help="arg: `-cpu VALUE` on one line; argv: one argument per line; "
        "json: argv and the decisions",
    )  # fmt: skip


def add_parser(subparsers: Any) -> None:  # argparse._SubParsersAction
    """Register `qemu-flags` on the `kvmcpuid` command's subparsers."""
    parser = subparsers.add_parser("qemu-flags", help=HELP, description=HELP)
    _configure(parser)


def run(args: argparse.Namespace) -> int:
    from kvmcpuid_virt.cli import memo
    from kvmcpuid_virt.cli.options import policy_key, read_table, table_bytes

    # The table is read every time (live KVM, or the dump); everything derived
    # from it is memoized under a key that covers all inputs (cli/memo.py),
    # which keeps this command within 2x of a bare `import kvmcpuid_virt`.
    table, source, this_host = read_table(args)
    k = memo.key("qemu-flags", (*policy_key(args), args.format, this_host), table_bytes(table))
    hit = memo.load(k)
    if hit is None:
        from kvmcpuid_virt.adapters.qemu import render
        from kvmcpuid_virt.cli.options import config_from_args, dropped_warnings, learn_facts
        from kvmcpuid_virt.config.msr_policy import UNKNOWN

        config = config_from_args(args, learn_facts(), table, source, this_host)
        # Said where it matters: MSR features left to QEMU's defaults.
        unknown = "".join(f"{PROG}: warning: {n}\n" for n in config.notes if UNKNOWN in n)
        hit = (render(config, args.format), dropped_warnings(PROG, config) + unknown)
        memo.store(k, *hit)
    sys.stderr.write(hit[1])
    sys.stdout.write(hit[0])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The `kvmcpuid-qemu-flags` console script: `kvmcpuid qemu-flags` with
    its own name in usage and errors, and the same error handling
    (cli._run)."""
    from kvmcpuid_virt import cli

    args = sys.argv[1:] if argv is None else argv
    return cli.main(["qemu-flags", *args], prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
