"""`kvmcpuid qemu-flags` / `kvmcpuid-qemu-flags`: print the -cpu option for
this host (or a dump) under a policy.

    qemu-system-x86_64 -accel kvm $(kvmcpuid-qemu-flags) ...

Stdlib-only imports at module level; the work happens in run()."""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_parser", "main", "run"]

PROG = "kvmcpuid-qemu-flags"
HELP = "print `-cpu MODEL,feat=on,...,feat=off,enforce` for QEMU"


def _configure(parser: argparse.ArgumentParser) -> None:
    from kvmcpuid_virt.policy.options import add_policy_options

    add_policy_options(parser)
    parser.add_argument(
        "--format", choices=("arg", "argv", "json"), default="arg",
        help="arg: `-cpu VALUE` on one line; argv: one argument per line; "
        "json: argv and the decisions",
    )  # fmt: skip
    parser.set_defaults(func=run, prog_name=PROG)


def add_parser(subparsers: Any) -> None:
    """Register `qemu-flags` on the `kvmcpuid` command's subparsers."""
    parser = subparsers.add_parser("qemu-flags", help=HELP, description=HELP)
    _configure(parser)


def run(args: argparse.Namespace) -> int:
    from kvmcpuid_virt.adapters.qemu import render
    from kvmcpuid_virt.policy.options import config_from_args, warn_dropped

    config = config_from_args(args)
    warn_dropped(getattr(args, "prog_name", PROG), config)
    sys.stdout.write(render(config, args.format))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The `kvmcpuid-qemu-flags` console script."""
    from kvmcpuid_virt.errors import KvmcpuidError

    parser = argparse.ArgumentParser(prog=PROG, description=HELP)
    _configure(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except KvmcpuidError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message
        print(f"{PROG}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
