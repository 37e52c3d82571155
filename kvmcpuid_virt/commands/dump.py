"""`kvmcpuid dump`: this host's supported (or emulated) CPUID table as a file."""

from __future__ import annotations

import argparse

TYPE_CHECKING = False  # the fast path's typing stand-in: docs/ARCHITECTURE.md, Start-up
if TYPE_CHECKING:
    from kvmcpuid_virt.cpuid.msr_values import FeatureMsrs
    from kvmcpuid_virt.cpuid.table import CpuidTable
    from kvmcpuid_virt.kvm import Kvm

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "dump",
        help="write this host's supported (or emulated) CPUID table",
        description="Read KVM_GET_SUPPORTED_CPUID (or KVM_GET_EMULATED_CPUID) from /dev/kvm "
        "and write it as a JSON dump with host metadata and the feature MSRs (with what a vCPU "
        "accepts of each), libvirt <cpudata> (CPUID and MSR values), or `cpuid -1r` text "
        "(CPUID only).",
    )
    p.add_argument("--emulated", action="store_true", help="KVM_GET_EMULATED_CPUID instead")
    p.add_argument(
        "--msr-trial", action="store_true",
        help="also record which feature-MSR values a vCPU of this host accepts "
        "(KVM_SET_MSRS on a throw-away vCPU, ~15 ms): what a baseline on another host "
        "needs to know that, e.g., plain -cpu host aborts here",
    )  # fmt: skip
    p.add_argument(
        "--format", choices=("json", "cpudata", "cpuid"), default="json", help="default: json"
    )
    p.add_argument("-o", "--output", default="-", metavar="FILE",
                   help="write FILE atomically (default: standard output)")
    p.add_argument("--device", default="/dev/kvm", help=argparse.SUPPRESS)


def feature_msrs(kvm: Kvm, table: CpuidTable, *, trial: bool = True) -> FeatureMsrs:
    """KVM's feature MSRs (absent, saying why, on a kernel without
    KVM_CAP_GET_MSR_FEATURES) and, with `trial`, what a vCPU given `table`
    accepts of each (kvm/msrs.msr_delivery). The trial is off the default
    dump path: it costs the ctypes, typing and logging imports the start-up
    budget keeps out (tests/test_cli.py). A trial that fails leaves the
    accepted bits unknown, never the command failed."""
    msrs = kvm.read_feature_msrs()
    if not msrs.available or not trial:
        return msrs
    from kvmcpuid_virt.errors import KvmError
    from kvmcpuid_virt.kvm.msrs import msr_delivery

    try:
        delivery = msr_delivery(kvm, table=table, values=msrs.as_dict())
    except KvmError:
        return msrs
    return msrs.with_deliverable({t.index: t.deliverable for t in delivery.trials})


def run(args: argparse.Namespace) -> int:
    from kvmcpuid_virt.cpuid.formats import Dump, dumps
    from kvmcpuid_virt.fsutil import atomic_write
    from kvmcpuid_virt.host import host_metadata
    from kvmcpuid_virt.kvm import Kvm

    with Kvm(args.device) as kvm:
        table = kvm.emulated_cpuid() if args.emulated else kvm.supported_cpuid()
        meta = host_metadata(kvm.api_version())
        if not args.emulated:
            table = table.with_msrs(feature_msrs(kvm, table, trial=args.msr_trial))
    dump = Dump(table, "emulated" if args.emulated else "supported", meta)
    atomic_write(args.output, dumps(dump, args.format))
    return 0
