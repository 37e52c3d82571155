"""`kvmcpuid hook install|uninstall|status`: the libvirt hook that refuses,
at start, restore and incoming migration, a domain whose CPU this host
cannot give (kvmcpuid_virt.libvirt_hook; installing: hook_install).

Exit status: install/uninstall 0 done, 2 error; status 0 when the hook is
installed and libvirt runs it, 1 when not. Stdlib-only imports at module
level."""

from __future__ import annotations

import argparse
import sys

TYPE_CHECKING = False  # the fast path's typing stand-in: docs/ARCHITECTURE.md, Start-up
if TYPE_CHECKING:
    from typing import Any

__all__ = ["add_parser", "run"]

HELP = "install, remove or check the libvirt hook that runs compat at start"


def add_parser(subparsers: Any) -> None:  # argparse._SubParsersAction
    p = subparsers.add_parser(
        "hook", help=HELP,
        description="A libvirt hook (/etc/libvirt/hooks/qemu.d/kvmcpuid) that checks, at "
        "`virsh start`, restore and incoming migration, that this host can give the "
        "domain's CPU (kvmcpuid compat), and refuses (enforce) or logs (warn) what it "
        "cannot. See docs/compat.md.",
    )  # fmt: skip
    p.add_argument("--connect", metavar="URI", default=None,
                   help="the libvirt daemon (default: $KVMCPUID_LIBVIRT_URI or qemu:///system)")
    p.add_argument("--hooks-dir", metavar="DIR", default=None,
                   help="libvirt's hook directory (default: /etc/libvirt/hooks)")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    inst = sub.add_parser("install", help="install the hook and make libvirt run it")
    inst.add_argument("--mode", choices=("enforce", "warn"), default="enforce",
                      help="enforce: refuse what does not fit (default); warn: log it and "
                      "let the domain go")  # fmt: skip
    inst.add_argument("--fail-closed", action="store_true",
                      help="refuse a domain when the tool itself fails (default: let it go "
                      "and log why)")  # fmt: skip
    inst.add_argument("--log", metavar="FILE", default=None,
                      help="the hook's log (default: /var/log/libvirt/kvmcpuid-hook.log)")
    inst.add_argument("--domains", metavar="GLOB", default="*",
                      help="judge only domains whose name matches this shell glob (default: "
                      "every domain)")  # fmt: skip
    inst.add_argument("--restart", action="store_true",
                      help="restart the daemon instead of reloading it (SIGHUP), which "
                      "is enough for libvirt to look for hooks again")  # fmt: skip
    sub.add_parser("uninstall", help="remove the hook and what installing it created")
    sub.add_parser("status", help="exit 0 when the hook is installed and libvirt runs it")


def run(args: argparse.Namespace) -> int:
    from kvmcpuid_virt import hook_install
    from kvmcpuid_virt.toolfacts.learn import libvirt_uri

    uri = args.connect or libvirt_uri()
    hooks_dir = args.hooks_dir or hook_install.HOOKS_DIR
    if args.action == "status":
        st = hook_install.status(uri=uri, hooks_dir=hooks_dir)
        sys.stdout.write("".join(f"{line}\n" for line in st.lines))
        return 0 if st.active else 1
    if args.action == "install":
        said = hook_install.install(mode=args.mode, fail_closed=args.fail_closed,
                                    log=args.log or hook_install.DEFAULT_LOG,
                                    restart=args.restart, domains=args.domains, uri=uri,
                                    hooks_dir=hooks_dir)  # fmt: skip
    else:
        said = hook_install.uninstall(uri=uri, hooks_dir=hooks_dir)
    sys.stdout.write("".join(f"{line}\n" for line in said))
    return 0
