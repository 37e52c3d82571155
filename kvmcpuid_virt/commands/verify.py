"""`kvmcpuid verify`: boot a probe guest on raw KVM, QEMU and/or libvirt and
check, bit by bit, that it sees the configured CPUID."""

from __future__ import annotations

import argparse
import sys

from kvmcpuid_virt.cli.fleet_options import add_fleet_options

TYPE_CHECKING = False  # the fast path's typing stand-in: docs/ARCHITECTURE.md, Start-up
if TYPE_CHECKING:  # annotations only: the command module imports nothing else at load
    from collections.abc import Sequence

    from kvmcpuid_virt.analysis.backend import Backend
    from kvmcpuid_virt.analysis.compare import Word
    from kvmcpuid_virt.analysis.given import LibvirtCpu
    from kvmcpuid_virt.config.cpuconfig import CpuConfig
    from kvmcpuid_virt.cpuid.table import CpuidTable, Register
    from kvmcpuid_virt.toolfacts.facts import ToolFacts
    from kvmcpuid_virt.verify import BackendReport, Target, TopologyReport

    BitKey = tuple[int, int, Register, int]

__all__ = [
    "EXIT_COULD_NOT_RUN",
    "EXIT_INTERRUPTED",
    "EXIT_MISMATCH",
    "EXIT_OK",
    "EXIT_TERMINATED",
    "EXIT_USAGE",
    "add_parser",
    "exit_status",
    "run",
]

HELP = "boot a probe guest and check the CPUID it sees"
ALL = "all"  # --backend: every backend the configuration's form can boot on

# The exit statuses (docs/exit-codes.md). 2, 130 and 143 are cli's, for every command.
EXIT_OK = 0  # every bit this host controls matches, on every backend asked
EXIT_MISMATCH = 1  # a bit differs, or a backend refused the configuration
EXIT_USAGE = 2  # bad arguments or input (cli: a KvmcpuidError before any verdict)
EXIT_COULD_NOT_RUN = 3  # no mismatch, but a backend's machinery could not run the guest
EXIT_INTERRUPTED = 130  # Ctrl-C (cli)
EXIT_TERMINATED = 143  # SIGTERM (cli): cleaned up as for Ctrl-C

EPILOG = (
    "Exit status: 0 every bit this host controls matches on every backend; "
    "1 a bit differs, or a backend refused the configuration (libvirt rejected the domain, "
    "QEMU its -cpu flags, KVM the table); "
    "2 bad arguments or input (nothing was booted); "
    "3 no mismatch, but a backend could not run the guest for reasons of its own "
    "(libvirtd unreachable or still refusing after retries, /dev/kvm unusable, the guest "
    "did not finish in time): no verdict for that backend; "
    "130 interrupted (Ctrl-C); 143 terminated (SIGTERM). A mismatch wins over a backend "
    "that could not run (1, not 3). Whatever the status, no guest, domain or temporary "
    "file is left behind. See docs/exit-codes.md."
)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from kvmcpuid_virt.analysis.backend import Backend
    from kvmcpuid_virt.cli.options import add_policy_options

    p = sub.add_parser(
        "verify", help=HELP,
        description="Boot a tiny probe guest with the configuration on raw KVM, QEMU and/or "
        "libvirt and compare every field and bit of its CPUID with what was configured "
        "(docs/field-rules.md). Exit 0 only "
        "when every bit this host controls matches; bits the host-control probe finds this "
        "host overrides are reported but do not fail.",
        epilog=EPILOG,
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
    p.add_argument("--topology", metavar="sockets=S,cores=C,threads=T",
                   help="also boot a guest with this many vCPUs in this topology (QEMU -smp, "
                   "libvirt <topology>) and check what each vCPU reports of it: APIC IDs, "
                   "leaf 1 counts, 0xB levels, 0x80000008, 0x8000001E")  # fmt: skip
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="per-guest timeout in seconds (default 10)")
    p.add_argument("--no-host-control", action="store_true",
                   help="do not probe (or use the cached probe of) which bits this host controls")
    p.add_argument("--qemu", metavar="PATH",
                   help="QEMU binary of the qemu backend (default: $KVMCPUID_QEMU, else "
                   "qemu-system-x86_64 on PATH)")  # fmt: skip
    p.add_argument("--connect", metavar="URI", action="append", default=[],
                   help="libvirtd of the libvirt backend, on this machine (default: "
                   "$KVMCPUID_LIBVIRT_URI, else qemu:///system); repeatable: the libvirt "
                   "backend then runs on each daemon (concurrently), one report each")  # fmt: skip
    add_fleet_options(p, timeout=False)


def run(args: argparse.Namespace) -> int:
    """Check, boot, compare, report; the exit status says how it went (EPILOG).
    Ctrl-C and SIGTERM are cli's (130, 143): every backend cleans up on the way."""
    chosen, uris = _checked_arguments(args)
    if args.topology is not None:
        from kvmcpuid_virt.config.topology import Topology

        Topology.parse(args.topology)  # a bad spelling fails before anything boots
    given = _given(args)  # bad flags or XML fail here, before /dev/kvm or QEMU is asked
    return _boot_and_report(args, given, chosen, uris)


def _boot_and_report(args: argparse.Namespace, given: str | LibvirtCpu | None,
                     chosen: Backend | None, uris: Sequence[str]) -> int:  # fmt: skip
    from kvmcpuid_virt.analysis.backend import Backend
    from kvmcpuid_virt.cli.options import read_table
    from kvmcpuid_virt.toolfacts.learn import learn
    from kvmcpuid_virt.verify import verify, verify_libvirt_hosts

    uri = uris[0]
    table, source, this_host = read_table(args)
    facts = learn(uri=uri)
    target, backends = _target(args, given, chosen, table, source, this_host, facts)
    uncontrolled, reasons, notes = _host_control(args)
    several = len(uris) > 1 and Backend.LIBVIRT in backends
    here = tuple(b for b in backends if b != Backend.LIBVIRT) if several else backends
    hosts: list[BackendReport] = []
    if several:
        # The daemons first: one that cannot be reached ends the command
        # before anything else boots (no verdict: EXIT_COULD_NOT_RUN).
        from kvmcpuid_virt.fleet import FleetError

        try:
            hosts = verify_libvirt_hosts(
                target, uris, supported=table, uncontrolled=uncontrolled, reasons=reasons,
                timeout=args.timeout, skip_unreachable=args.skip_unreachable)  # fmt: skip
        except FleetError as exc:
            sys.stderr.write(f"kvmcpuid verify: {' '.join(str(exc).split())}\n")
            return EXIT_COULD_NOT_RUN
    reports = verify(target, here, supported=table, uncontrolled=uncontrolled,
                     reasons=reasons, timeout=args.timeout, qemu=args.qemu, libvirt_uri=uri)
    reports += hosts  # one report per daemon, last (the order of --backend all)
    topology: list[TopologyReport] = []
    if args.topology is not None:
        from kvmcpuid_virt.config.topology import Topology
        from kvmcpuid_virt.verify import verify_topology

        topology = verify_topology(target, Topology.parse(args.topology), backends,
                                   timeout=args.timeout, qemu=args.qemu, libvirt_uri=uri)
    status = exit_status([*reports, *topology])
    if args.format == "json":
        _write_json(status, target.config, notes, reports, topology)
    else:
        _write_text(args, target.config, notes, reports)
        for t in topology:
            print(t.text())
    return status


def exit_status(reports: Sequence[BackendReport | TopologyReport]) -> int:
    """EXIT_MISMATCH when a backend saw a mismatch or refused the
    configuration, else EXIT_COULD_NOT_RUN when a backend's machinery failed,
    else EXIT_OK: a finding outranks a backend that gave none."""
    if any(not r.ok and not r.could_not_run for r in reports):
        return EXIT_MISMATCH
    if any(r.could_not_run for r in reports):
        return EXIT_COULD_NOT_RUN
    return EXIT_OK


def _checked_arguments(args: argparse.Namespace) -> tuple[Backend | None, list[str]]:
    """The chosen backend (None: all) and the libvirt URIs (at least one);
    InputError before any work."""
    import os

    from kvmcpuid_virt.analysis.backend import Backend
    from kvmcpuid_virt.errors import InputError

    chosen = None if args.backend == ALL else Backend(args.backend)
    if args.timeout <= 0:
        raise InputError("--timeout must be positive")
    if args.qemu is not None and not (os.path.isfile(args.qemu) and os.access(args.qemu, os.X_OK)):
        raise InputError(f"--qemu {args.qemu}: not an executable file")
    uris = list(dict.fromkeys(args.connect)) or [
        os.environ.get("KVMCPUID_LIBVIRT_URI") or "qemu:///system"]
    if chosen in (Backend.LIBVIRT, None):
        from kvmcpuid_virt.probe.libvirt import is_local

        for uri in uris:
            if not is_local(uri):
                raise InputError(f"--connect {uri}: the libvirt backend needs libvirtd on this "
                                 "machine (qemu:///system or qemu:///session)")  # fmt: skip
    if len(uris) > 1 and args.topology is not None:
        raise InputError("--topology with --connect repeated is not supported yet: give one "
                         "--connect")  # fmt: skip
    return chosen, uris


def _given(args: argparse.Namespace) -> str | LibvirtCpu | None:
    """The configuration the user handed in, read and parsed: the -cpu value
    of --qemu-flags, the <cpu> of --libvirt-xml, or None (the policy's)."""
    if args.qemu_flags is not None:
        from kvmcpuid_virt.adapters.qemu import parse
        from kvmcpuid_virt.analysis.given import qemu_cpu_value
        from kvmcpuid_virt.errors import InputError

        value = qemu_cpu_value(args.qemu_flags, "--qemu-flags")
        try:
            parse(value)
        except InputError as exc:
            raise InputError(f"--qemu-flags: {exc}") from None
        return value
    if args.libvirt_xml is not None:
        from kvmcpuid_virt.adapters.libvirt import parse as parse_cpu
        from kvmcpuid_virt.analysis.given import libvirt_cpu
        from kvmcpuid_virt.fsutil import read_text

        given_cpu = libvirt_cpu(*read_text(args.libvirt_xml))
        parse_cpu(given_cpu.cpu, given_cpu.source)
        return given_cpu
    return None


def _target(
    args: argparse.Namespace, given: str | LibvirtCpu | None, chosen: Backend | None,
    table: CpuidTable, source: str, this_host: bool, facts: ToolFacts,
) -> tuple[Target, tuple[Backend, ...]]:
    """What to boot, and where: the user's flags or XML as given, else the policy's config."""
    if isinstance(given, str):
        return _qemu_flags_target(given, chosen, table, source, facts)
    if given is not None:
        return _libvirt_xml_target(given, chosen, table, source, facts)
    from kvmcpuid_virt.cli.options import config_from_args
    from kvmcpuid_virt.verify import BACKENDS, target_for

    config = config_from_args(args, facts, table, source, this_host)
    return target_for(config, facts), BACKENDS if chosen is None else (chosen,)


def _qemu_flags_target(
    value: str, chosen: Backend | None, table: CpuidTable, source: str, facts: ToolFacts,
) -> tuple[Target, tuple[Backend, ...]]:
    """--qemu-flags: that -cpu value, booted on QEMU unless --backend says else."""
    from kvmcpuid_virt.analysis.backend import Backend
    from kvmcpuid_virt.analysis.given import qemu_config
    from kvmcpuid_virt.verify import target_for

    config = qemu_config(value, "--qemu-flags", table, source, facts)
    target = target_for(config, facts, qemu_cpu=value, label="--qemu-flags")
    return target, (Backend.QEMU,) if chosen is None else (chosen,)


def _libvirt_xml_target(
    given_cpu: LibvirtCpu, chosen: Backend | None, table: CpuidTable, source: str,
    facts: ToolFacts,
) -> tuple[Target, tuple[Backend, ...]]:
    """--libvirt-xml: its <cpu> and <features>, booted on libvirt unless --backend says else."""
    from lxml import etree

    from kvmcpuid_virt.analysis.backend import Backend
    from kvmcpuid_virt.verify import target_for

    config = given_cpu.config(table, source, facts)
    features_text = (None if given_cpu.features is None
                     else etree.tostring(given_cpu.features, encoding="unicode"))  # fmt: skip
    cpu_text = etree.tostring(given_cpu.cpu, encoding="unicode")
    target = target_for(config, facts, libvirt_cpu=cpu_text,
                        libvirt_features=features_text, label="--libvirt-xml")
    return target, (Backend.LIBVIRT,) if chosen is None else (chosen,)


def _host_control(
    args: argparse.Namespace,
) -> tuple[dict[Word, int] | None, dict[BitKey, str] | None, list[str]]:
    """This host's uncontrolled bits, their reasons, its summary; none with --no-host-control."""
    if args.no_host_control:
        return None, None, []
    from kvmcpuid_virt.probe.hostcontrol import host_control

    hc = host_control()
    return dict(hc.uncontrolled()), dict(hc.reasons), hc.summary()


_STATUS_NAMES = {EXIT_OK: "match", EXIT_MISMATCH: "mismatch",
                 EXIT_COULD_NOT_RUN: "could-not-run"}  # fmt: skip


def _write_json(status: int, config: CpuConfig, notes: list[str], reports: list[BackendReport],
                topology: Sequence[TopologyReport] = ()) -> None:  # fmt: skip
    """--format json: one document on stdout ("exit_status" is the command's)."""
    import json

    doc = {
        "ok": status == EXIT_OK,
        "status": _STATUS_NAMES[status],
        "exit_status": status,
        "model": config.model,
        "dropped": list(config.dropped),
        "host_does_not_control": notes,
        "backends": [r.as_json() for r in reports],
        "topology": [t.as_json() for t in topology],
    }
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")


def _write_text(args: argparse.Namespace, config: CpuConfig, notes: list[str],
                reports: list[BackendReport]) -> None:  # fmt: skip
    """--format table: dropped features, each backend's table, with -v the uncontrolled bits."""
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
