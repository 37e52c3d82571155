"""`kvmcpuid dump`: this host's supported (or emulated) CPUID table as a file."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "dump",
        help="write this host's supported (or emulated) CPUID table",
        description="Read KVM_GET_SUPPORTED_CPUID (or KVM_GET_EMULATED_CPUID) from /dev/kvm "
        "and write it as a JSON dump with host metadata, libvirt <cpudata>, or `cpuid -1r` text.",
    )
    p.add_argument("--emulated", action="store_true", help="KVM_GET_EMULATED_CPUID instead")
    p.add_argument(
        "--format", choices=("json", "cpudata", "cpuid"), default="json", help="default: json"
    )
    p.add_argument("-o", "--output", default="-", metavar="FILE",
                   help="write FILE atomically (default: standard output)")
    p.add_argument("--device", default="/dev/kvm", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from kvmcpuid_virt.cpuid.formats import Dump, dumps
    from kvmcpuid_virt.fsutil import atomic_write
    from kvmcpuid_virt.host import host_metadata
    from kvmcpuid_virt.kvm import Kvm

    with Kvm(args.device) as kvm:
        table = kvm.emulated_cpuid() if args.emulated else kvm.supported_cpuid()
        meta = host_metadata(kvm.api_version())
    dump = Dump(table, "emulated" if args.emulated else "supported", meta)
    atomic_write(args.output, dumps(dump, args.format))
    return 0
