"""The policy options shared by `kvmcpuid-qemu-flags` and `kvmcpuid
libvirt-xml`, and turning them into a CpuConfig. Stdlib-only at import time:
the command modules import this while argparse is being built."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvmcpuid_virt.policy.config import CpuConfig

__all__ = ["add_policy_options", "config_from_args", "warn_dropped"]


def add_policy_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--from", dest="from_", metavar="DUMP",
        help="read the supported CPUID from a dump (JSON, libvirt <cpudata>, "
        "`cpuid -1r` text; - for stdin) instead of /dev/kvm",
    )  # fmt: skip
    parser.add_argument(
        "--model", default="host",
        help="host (default: everything this host supports), auto (the newest "
        "named model this host fully supports, plus the rest), or a CPU model name",
    )  # fmt: skip
    parser.add_argument(
        "--enable", action="append", default=[], metavar="F",
        help="turn a feature on (QEMU or libvirt spelling; repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--disable", action="append", default=[], metavar="F",
        help="turn a feature off (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--allow-unsupported", action="store_true",
        help="drop features the host cannot give, with a warning, instead of failing",
    )  # fmt: skip


def config_from_args(args: argparse.Namespace) -> CpuConfig:
    """Read the table (/dev/kvm or --from) and build the CpuConfig."""
    from kvmcpuid_virt.policy.select import Policy, build

    if args.from_:
        from kvmcpuid_virt.cpuid.formats import load

        dump = load(args.from_)
        table, source = dump.table, dump.source
    else:
        from kvmcpuid_virt.kvm.system import Kvm

        with Kvm() as kvm:
            table, source = kvm.supported_cpuid(), "/dev/kvm"
    policy = Policy(
        model=args.model,
        enable=tuple(args.enable),
        disable=tuple(args.disable),
        allow_unsupported=args.allow_unsupported,
    )
    return build(table, policy, source=source)


def warn_dropped(prog: str, config: CpuConfig) -> None:
    for name in config.dropped:
        print(f"{prog}: warning: dropped {name}: this host cannot give it", file=sys.stderr)
