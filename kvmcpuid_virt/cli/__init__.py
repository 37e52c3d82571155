"""`kvmcpuid` and `kvmcpuid-qemu-flags`: argument parsing and error handling.

The one error handling of both: a KvmcpuidError is `PROG: message` on one
line (exit 2), Ctrl-C is `PROG: interrupted` (130), a reader that left
(`... | head`) ends the command quietly (0). `kvmcpuid-qemu-flags` is
`main(["qemu-flags", ...], prog="kvmcpuid-qemu-flags")`.

Each subcommand lives in kvmcpuid_virt/commands/<module>.py with
`add_parser(subparsers)` and `run(args) -> int`. Only the module of the
command being run is imported, so `kvmcpuid dump` never pays for lxml,
libvirt or the feature registry.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

TYPE_CHECKING = False  # the fast path's typing stand-in: docs/ARCHITECTURE.md, Start-up
if TYPE_CHECKING:
    from typing import Any, Final

__all__ = ["COMMANDS", "main"]

PROG: Final = "kvmcpuid"
EXIT_ERROR: Final = 2
EXIT_INTERRUPTED: Final = 130

# command -> (module in kvmcpuid_virt.commands, one-line summary)
COMMANDS: Final[dict[str, tuple[str, str]]] = {
    "dump": ("dump", "write this host's supported (or emulated) CPUID table"),
    "features": ("features", "list the named CPUID features of this host or a dump"),
    "qemu-flags": ("qemu_flags", "print QEMU -cpu flags for a CPU configuration"),
    "libvirt-xml": ("libvirt_xml", "print or patch a libvirt <cpu> element"),
    "verify": ("verify", "boot a probe guest and check the CPUID it sees"),
    "baseline": ("baseline", "the configuration every given host can run"),
    "diff": ("diff", "named per-bit differences between two dumps or configurations"),
    "compat": ("compat", "can a guest with this CPU run on this host (or a dump's)?"),
    "hook": ("hook", "install, remove or check the libvirt hook that runs compat at start"),
}


def _load(module: str) -> object | None:
    try:
        return importlib.import_module(f"kvmcpuid_virt.commands.{module}")
    except ModuleNotFoundError as exc:
        if exc.name == f"kvmcpuid_virt.commands.{module}":
            return None  # not built yet in this version
        raise


def _available() -> dict[str, tuple[str, str]]:
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "commands")
    return {
        name: spec
        for name, spec in COMMANDS.items()
        if os.path.exists(os.path.join(here, spec[0] + ".py"))
    }


class _Formatter(argparse.HelpFormatter):
    def __init__(self, prog: str) -> None:
        # argparse would import shutil (~2 ms) just for the terminal width.
        try:
            width = int(os.environ.get("COLUMNS", "")) or os.get_terminal_size().columns
        except (ValueError, OSError):
            width = 80
        super().__init__(prog, width=max(width - 2, 40))


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


def _parser(
    command: str | None, prog: str = PROG
) -> tuple[argparse.ArgumentParser, object | None]:
    """The parser, with only `command`'s module imported (returned too).
    With a `prog` of its own (a console script for one command), that
    command's usage and errors carry `prog` rather than `kvmcpuid COMMAND`."""
    from kvmcpuid_virt import __version__

    parser = _Parser(
        prog=PROG,
        description="What this host's KVM can give a guest: named, rendered for QEMU "
        "and libvirt, and verified inside a booted guest.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (repeatable)")
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )
    available = _available()
    if command in available:
        # Only the chosen command's parser: each placeholder costs ~0.5 ms.
        chosen = _load(available[command][0])
        chosen.add_parser(sub)  # type: ignore[attr-defined]
        if prog != PROG:
            sub.choices[command].prog = prog
        return parser, chosen
    for name, (_module, summary) in available.items():
        # Every command appears in --help without importing its module.
        sub.add_parser(name, help=summary, add_help=False)
    return parser, None


def _setup_logging(prog: str, verbose: int) -> None:
    # logging costs ~10 ms to import; without -v, warnings still reach stderr
    # through logging's last-resort handler.
    if verbose:
        import logging

        logging.basicConfig(
            level=logging.WARNING - 10 * min(verbose, 2),
            format=f"{prog}: %(levelname)s: %(message)s",
        )


def _run(argv: Sequence[str], prog: str, command: str | None) -> int:
    try:
        parser, module = _parser(command, prog)
        args = parser.parse_args(argv)
        _setup_logging(prog, getattr(args, "verbose", 0))
        run: Callable[[argparse.Namespace], int] = module.run  # type: ignore[union-attr,attr-defined]
        status = run(args)
        # Output to a pipe is buffered: a reader that left shows up at this
        # flush, inside the handlers below, not in the interpreter's exit-time
        # flush (which prints "Exception ignored ... BrokenPipeError").
        sys.stdout.flush()
        return status
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `kvmcpuid ... | head`: the reader left; nothing more to say.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as exc:
        from kvmcpuid_virt.errors import KvmcpuidError

        if isinstance(exc, KvmcpuidError):
            # One line whatever the message (QEMU's stderr, multi-line XML
            # errors): scripts and logs read errors a line at a time.
            message = " ".join(str(exc).split())
            print(f"{prog}: {message}", file=sys.stderr)
            return EXIT_ERROR
        raise


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """The `kvmcpuid` console script (argv: sys.argv[1:] when None); `prog`
    is the name errors carry (see the module docstring)."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args if not a.startswith("-")), None)
    return _run(args, prog, command)
