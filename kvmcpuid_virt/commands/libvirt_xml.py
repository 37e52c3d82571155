"""`kvmcpuid libvirt-xml`: print a libvirt `<cpu>` element for this host (or a
dump) under a policy, or patch it into a domain XML:

    virsh dumpxml VM | kvmcpuid libvirt-xml --patch - | virsh define /dev/stdin

Stdlib-only imports at module level; lxml is loaded only when the output
is not memoized."""

from __future__ import annotations

import argparse
import sys

TYPE_CHECKING = False  # the fast path's typing stand-in: docs/ARCHITECTURE.md, Start-up
if TYPE_CHECKING:
    from typing import Any

    from kvmcpuid_virt.cpuid.table import CpuidTable

__all__ = ["add_parser", "run"]

PROG = "kvmcpuid libvirt-xml"
HELP = "print a libvirt <cpu> element, or replace the <cpu> of a domain XML"


def add_parser(subparsers: Any) -> None:  # argparse._SubParsersAction
    from kvmcpuid_virt.cli.options import add_policy_options

    parser = subparsers.add_parser("libvirt-xml", help=HELP, description=HELP)
    add_policy_options(parser)
    parser.add_argument(
        "--patch", metavar="DOMAIN.xml",
        help="replace the <cpu> of this domain XML (- for stdin), set the KVM switches "
        "libvirt takes in <features><kvm>, and print the whole domain; nothing else in "
        "it changes",
    )  # fmt: skip
    parser.add_argument(
        "--host-passthrough", action="store_true",
        help="with --from DUMP and --model host: render host-passthrough anyway, for a "
        "guest that will only ever run on the host the dump came from (default: only "
        "this host's /dev/kvm gives host-passthrough; a dump or baseline gets a named "
        "cpu_map model with explicit features, so that the guest can migrate)",
    )  # fmt: skip
    parser.add_argument(
        "-o", "--output", metavar="FILE", help="write to FILE (atomically) instead of stdout"
    )


def run(args: argparse.Namespace) -> int:
    from kvmcpuid_virt.cli import memo
    from kvmcpuid_virt.cli.options import policy_key, read_table, table_bytes
    from kvmcpuid_virt.fsutil import read_text

    domain: str | None = None
    source = ""
    if args.patch is not None:
        # Read the domain before touching /dev/kvm: a bad path fails fast.
        domain, source = read_text(args.patch)
    # As in qemu-flags: the table is read every time, what follows from it is
    # memoized under a key that covers every input (cli/memo.py), the domain
    # being patched included; this keeps the command near Python's start-up.
    table, table_source, this_host = read_table(args)
    k = memo.key("libvirt-xml", (*policy_key(args), this_host, args.host_passthrough, source,
                                 domain),
                 table_bytes(table))  # fmt: skip
    hit = memo.load(k)
    if hit is None:
        hit = _render(args, table, table_source, this_host, domain, source)
        memo.store(k, *hit)
    text, notes = hit
    sys.stderr.write(notes)
    if args.output:
        from kvmcpuid_virt.fsutil import atomic_write

        atomic_write(args.output, text)
    else:
        sys.stdout.write(text)
    return 0


def _render(args: argparse.Namespace, table: CpuidTable, table_source: str, this_host: bool,
            domain: str | None, source: str) -> tuple[str, str]:  # fmt: skip
    """(the output, the warnings and notes for stderr)."""
    from kvmcpuid_virt.adapters import libvirt as lv
    from kvmcpuid_virt.cli.options import config_from_args, dropped_warnings, learn_facts

    facts = learn_facts()
    config = config_from_args(args, facts, table, table_source, this_host)
    # Only this host's own CPU is host-passthrough (adapters/libvirt.own_host),
    # unless the user asks for it.
    passthrough = True if args.host_passthrough else None
    if args.host_passthrough and config.model != lv.HOST_PASSTHROUGH:
        from kvmcpuid_virt.errors import InputError

        raise InputError(f"--host-passthrough is for --model host, not {config.model!r}")
    model = lv.base_model(config, facts, passthrough=passthrough)
    if domain is not None:
        # The whole CPU configuration: <cpu>, and the paravirtual switches
        # libvirt takes in <features><kvm>.
        text = lv.patch_features(lv.patch_domain(domain, config, model, source), config, source)
    else:
        text = lv.render(config, model) + "\n"
    notes = dropped_warnings(PROG, config)
    identity = lv.identity_note(config, model)
    if identity is not None:
        notes += f"{PROG}: warning: {identity}\n"
    # The paravirtual switches a <cpu> cannot carry, in two lines rather than
    # one per feature: where libvirt takes them (patched in with --patch),
    # and what it cannot set.
    lost = lv.unexpressible(config, facts, passthrough=passthrough)
    elsewhere = [u.where for u in lost if u.expressible and domain is None]
    nowhere = [f"{u.name}={'on' if u.on else 'off'}" for u in lost if not u.expressible]
    if elsewhere:
        notes += f"{PROG}: note: put in the domain's features: {' '.join(elsewhere)}\n"
    if nowhere:
        notes += (f"{PROG}: note: libvirt XML cannot set {', '.join(nowhere)} "
                  "(libvirt's and QEMU's defaults apply)\n")  # fmt: skip
    return text, notes
