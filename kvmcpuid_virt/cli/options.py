"""The policy options shared by `kvmcpuid-qemu-flags` and `kvmcpuid
libvirt-xml`, and turning them into a CpuConfig. Stdlib-only at import time:
the command modules import this while argparse is being built."""

from __future__ import annotations

import argparse

TYPE_CHECKING = False  # the fast path's typing stand-in: docs/ARCHITECTURE.md, Start-up

if TYPE_CHECKING:
    from kvmcpuid_virt.config.cpuconfig import CpuConfig
    from kvmcpuid_virt.cpuid.formats import Dump
    from kvmcpuid_virt.cpuid.table import CpuidTable
    from kvmcpuid_virt.toolfacts.facts import ToolFacts

__all__ = [
    "add_policy_options",
    "config_from_args",
    "dropped_warnings",
    "learn_facts",
    "of_this_host",
    "policy_key",
    "read_table",
    "refuse_emulated",
    "table_bytes",
]  # fmt: skip


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
        "--max-model", metavar="NAME",
        help="never expose more than CPU model NAME (features outside it are turned off), "
        "the way an operator emulates older hardware",
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


def refuse_emulated(dump: Dump) -> Dump:
    """`dump`, unless it is a KVM_GET_EMULATED_CPUID dump, which says what KVM
    emulates in software, not what a host supports (an InputError then)."""
    if dump.kind == "emulated":
        from kvmcpuid_virt.errors import InputError

        raise InputError(
            f"{dump.source}: a KVM_GET_EMULATED_CPUID dump (what KVM emulates in "
            "software), not what it supports: take `kvmcpuid dump` without --emulated"
        )
    return dump


def of_this_host(dump: Dump) -> bool:
    """Whether `dump` is KVM_GET_SUPPORTED_CPUID of this machine as it runs
    now (by its fingerprint): what QEMU's start trial here speaks for."""
    from kvmcpuid_virt.host import is_this_host

    return dump.kind == "supported" and is_this_host(dump.host)


def read_table(args: argparse.Namespace) -> tuple[CpuidTable, str, bool]:
    """The supported table: from --from DUMP, else live from /dev/kvm; its
    source; and whether it is this machine's own KVM as it runs now (live, or
    a dump whose fingerprint is this host's), which is what QEMU's start
    trial here speaks for (policy/select.build)."""
    if args.from_:
        from kvmcpuid_virt.fsutil import load_dump

        dump = refuse_emulated(load_dump(args.from_))
        return dump.table, dump.source, of_this_host(dump)
    from kvmcpuid_virt.kvm.system import Kvm

    with Kvm() as kvm:
        return kvm.supported_cpuid(), "/dev/kvm", True


def policy_key(args: argparse.Namespace) -> tuple[object, ...]:
    """Every policy option, for the output memo's key."""
    return (args.from_, args.model, getattr(args, "max_model", None), tuple(args.enable),
            tuple(args.disable), args.allow_unsupported)  # fmt: skip


def table_bytes(table: CpuidTable) -> bytes:
    # The feature MSRs a dump carries decide MSR features too (config/msr_policy).
    rows = [(e.function, e.index, int(e.flags), *e.regs()) for e in table]
    return repr((rows, table.msrs)).encode()


def learn_facts() -> ToolFacts:
    """What this machine's QEMU and cpu_map say (cached): learned once per
    command, here at its boundary, and passed down."""
    from kvmcpuid_virt.toolfacts.learn import learn

    return learn()


def config_from_args(
    args: argparse.Namespace, facts: ToolFacts, table: CpuidTable | None = None,
    source: str = "", this_host: bool | None = None,
) -> CpuConfig:
    """Build the CpuConfig for the table (read_table's when not given)."""
    from kvmcpuid_virt.config.build import Policy, build

    if table is None:
        table, source, this_host = read_table(args)
    policy = Policy(
        model=args.model,
        enable=tuple(args.enable),
        disable=tuple(args.disable),
        allow_unsupported=args.allow_unsupported,
    )
    config = build(table, policy, facts=facts, source=source, this_host=this_host)
    max_model = getattr(args, "max_model", None)
    if max_model:
        from kvmcpuid_virt.config.max_model import limit_to_model

        config, _ = limit_to_model(config, max_model, facts)
    return config


def dropped_warnings(prog: str, config: CpuConfig) -> str:
    """One line naming every feature --allow-unsupported dropped ('' if none)."""
    names = (*config.dropped, *config.msr_dropped)  # CPUID, then feature-MSR bits
    if not names:
        return ""
    return (f"{prog}: warning: dropped (this host cannot give them): "
            f"{', '.join(names)}\n")  # fmt: skip
