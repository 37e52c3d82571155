"""`kvmcpuid libvirt-xml`: print a libvirt `<cpu>` element for this host (or a
dump) under a policy, or patch it into a domain XML:

    virsh dumpxml VM | kvmcpuid libvirt-xml --patch - | virsh define /dev/stdin

Stdlib-only imports at module level; lxml is loaded inside run()."""

from __future__ import annotations

import argparse
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["add_parser", "run"]

PROG = "kvmcpuid libvirt-xml"
HELP = "print a libvirt <cpu> element, or replace the <cpu> of a domain XML"


def add_parser(subparsers: Any) -> None:  # argparse._SubParsersAction
    from kvmcpuid_virt.cli.options import add_policy_options

    parser = subparsers.add_parser("libvirt-xml", help=HELP, description=HELP)
    add_policy_options(parser)
    parser.add_argument(
        "--patch", metavar="DOMAIN.xml",
        help="replace the <cpu> of this domain XML (- for stdin) and print the "
        "whole domain; nothing else in it changes",
    )  # fmt: skip
    parser.add_argument(
        "-o", "--output", metavar="FILE", help="write to FILE (atomically) instead of stdout"
    )


def run(args: argparse.Namespace) -> int:
    from kvmcpuid_virt.adapters import libvirt as lv
    from kvmcpuid_virt.cli.options import config_from_args, dropped_warnings, learn_facts
    from kvmcpuid_virt.fsutil import read_text

    domain: str | None = None
    source = ""
    if args.patch is not None:
        # Read the domain before touching /dev/kvm: a bad path fails fast.
        domain, source = read_text(args.patch)
    facts = learn_facts()
    config = config_from_args(args, facts)
    model = lv.base_model(config, facts)
    text = (
        lv.patch_domain(domain, config, model, source) if domain is not None
        else lv.render(config, model) + "\n"
    )  # fmt: skip
    sys.stderr.write(dropped_warnings(PROG, config))
    # The paravirtual switches a <cpu> cannot carry, in two lines rather than
    # one per feature: where libvirt takes them, and what it cannot set.
    elsewhere = [u.where for u in lv.unexpressible(config) if u.expressible]
    nowhere = [f"{u.name}={'on' if u.on else 'off'}" for u in lv.unexpressible(config)
               if not u.expressible]  # fmt: skip
    if elsewhere:
        print(f"{PROG}: note: put in the domain's features: {' '.join(elsewhere)}",
              file=sys.stderr)  # fmt: skip
    if nowhere:
        print(f"{PROG}: note: libvirt XML cannot set {', '.join(nowhere)} "
              "(libvirt's and QEMU's defaults apply)", file=sys.stderr)  # fmt: skip
    if args.output:
        from kvmcpuid_virt.fsutil import atomic_write

        atomic_write(args.output, text)
    else:
        sys.stdout.write(text)
    return 0
