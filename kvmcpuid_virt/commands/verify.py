"""`kvmcpuid verify`: boot a probe guest on raw KVM, QEMU and/or libvirt and
check, bit by bit, that it sees the configured CPUID."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_parser", "run"]

HELP = "boot a probe guest and check the CPUID it sees"
ALL = "all"  # --backend: every backend the configuration's form can boot on


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from kvmcpuid_virt.analysis.backend import Backend
    from kvmcpuid_virt.cli.options import add_policy_options

    p = sub.add_parser(
        "verify", help=HELP,
        description="Boot a tiny probe guest with the configuration on raw KVM, QEMU and/or "
        "libvirt and compare every feature bit it sees with what was configured. Exit 0 only "
        "when every bit this host controls matches; bits the host-control probe finds this "
        "host overrides are reported but do not fail.",
    )  # fmt: skip
    # Plain strings: argparse's "invalid choice" message lists repr()s.
    p.add_argument("--backend", choices=(*(b.value for b in Backend), ALL), default=ALL,
                   help="where to boot the guest (default: all)")
    given = p.add_mutually_exclusive_group()
    given.add_argument("--qemu-flags", metavar="STR",
                       help="verify this -cpu value (with or without the leading '-cpu ')")
    given.add_argument("--libvirt-xml", metavar="FILE",
                       help="verify the <cpu> of this domain XML or <cpu> element (- for stdin)")
    add_policy_options(p)
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="per-guest timeout in seconds (default 10)")
    p.add_argument("--no-host-control", action="store_true",
                   help="do not probe (or use the cached probe of) which bits this host controls")
    p.add_argument("--qemu", metavar="PATH",
                   help="QEMU binary of the qemu backend (default: $KVMCPUID_QEMU, else "
                   "qemu-system-x86_64 on PATH)")  # fmt: skip
    p.add_argument("--connect", metavar="URI",
                   help="libvirtd of the libvirt backend, on this machine (default: "
                   "$KVMCPUID_LIBVIRT_URI, else qemu:///system)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    import json
    import os

    from kvmcpuid_virt.analysis.backend import Backend
    from kvmcpuid_virt.cli.options import config_from_args, read_table
    from kvmcpuid_virt.errors import InputError
    from kvmcpuid_virt.toolfacts.learn import learn
    from kvmcpuid_virt.verify import BACKENDS, target_for, verify

    chosen = None if args.backend == ALL else Backend(args.backend)

    if args.timeout <= 0:
        raise InputError("--timeout must be positive")
    if args.qemu is not None and not (os.path.isfile(args.qemu) and os.access(args.qemu, os.X_OK)):
        raise InputError(f"--qemu {args.qemu}: not an executable file")
    uri = args.connect or os.environ.get("KVMCPUID_LIBVIRT_URI") or "qemu:///system"
    if chosen in (Backend.LIBVIRT, None):
        from kvmcpuid_virt.probe.libvirt import is_local

        if not is_local(uri):
            raise InputError(f"--connect {uri}: the libvirt backend needs libvirtd on this "
                             "machine (qemu:///system or qemu:///session)")  # fmt: skip
    table, source, this_host = read_table(args)
    facts = learn(uri=uri)
    if args.qemu_flags is not None:
        from kvmcpuid_virt.analysis.given import qemu_config, qemu_cpu_value

        value = qemu_cpu_value(args.qemu_flags, "--qemu-flags")
        config = qemu_config(value, "--qemu-flags", table, source, facts)
        target = target_for(config, facts, qemu_cpu=value, label="--qemu-flags")
        backends: tuple[Backend, ...] = (Backend.QEMU,) if chosen is None else (chosen,)
    elif args.libvirt_xml is not None:
        from lxml import etree

        from kvmcpuid_virt.analysis.given import libvirt_cpu
        from kvmcpuid_virt.fsutil import read_text

        given_cpu = libvirt_cpu(*read_text(args.libvirt_xml))
        config = given_cpu.config(table, source, facts)
        features_text = (None if given_cpu.features is None
                         else etree.tostring(given_cpu.features, encoding="unicode"))  # fmt: skip
        cpu_text = etree.tostring(given_cpu.cpu, encoding="unicode")
        target = target_for(config, facts, libvirt_cpu=cpu_text,
                            libvirt_features=features_text, label="--libvirt-xml")
        backends = (Backend.LIBVIRT,) if chosen is None else (chosen,)
    else:
        config = config_from_args(args, facts, table, source, this_host)
        target = target_for(config, facts)
        backends = BACKENDS if chosen is None else (chosen,)

    uncontrolled = reasons = None
    notes: list[str] = []
    if not args.no_host_control:
        from kvmcpuid_virt.probe.hostcontrol import host_control

        hc = host_control()
        uncontrolled = dict(hc.uncontrolled())
        reasons = dict(hc.reasons)
        notes = hc.summary()
    reports = verify(target, backends, supported=table, uncontrolled=uncontrolled,
                     reasons=reasons, timeout=args.timeout, qemu=args.qemu, libvirt_uri=uri)
    ok = all(r.ok for r in reports)
    if args.format == "json":
        doc = {
            "ok": ok,
            "model": config.model,
            "dropped": list(config.dropped),
            "host_does_not_control": notes,
            "backends": [r.as_json() for r in reports],
        }
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        given = args.qemu_flags is not None or args.libvirt_xml is not None
        if config.dropped:
            names = ", ".join(config.dropped)
            if given:
                print(f"note: requested, but this host's KVM does not support them: {names}")
            else:
                print(f"note: dropped (--allow-unsupported), this host cannot give them: {names}")
        for r in reports:
            print(r.text(include_host=args.verbose > 0))
        if args.verbose and notes:
            print("this host does not control:")
            for line in notes:
                print(f"  {line}")
    return 0 if ok else 1
