"""`kvmcpuid` and `kvmcpuid-qemu-flags`: argument parsing and error handling.

The one error handling of both: a KvmcpuidError is `PROG: message` on one
line (exit 2), SIGINT (Ctrl-C) is `PROG: interrupted` (130), SIGTERM is
`PROG: terminated` (143), a reader that left (`... | head`) ends the command
quietly (0). `kvmcpuid-qemu-flags` is
`main(["qemu-flags", ...], prog="kvmcpuid-qemu-flags")`.

Signals. main() installs handlers for SIGINT and SIGTERM first thing. The
first signal raises KeyboardInterrupt or Terminated in the main thread, so
every `finally` and context manager on the way out runs (QEMU killed and
reaped, domains destroyed, temporary directories removed); where a signal
must not cut a step in two (creating a resource and registering it, a
cleanup) the exception waits for the step's end (process.signals_deferred).
Later signals, and any signal once the work is done, change nothing: one
line, one exit status. On the way out, what a cut-short cleanup left is
finished (qmp.close_sessions, process.cleanup_leftovers), and an
interrupted program then ends without the interpreter's shutdown (_exit_now).
What remains, as far as Python allows: before main() runs (the interpreter's
start-up, the imports of the console script: ~30 ms here) the signals are
Python's own. SIGTERM then kills the process (status -15) and SIGINT either
kills it (-2) or raises KeyboardInterrupt in the start-up code, which Python
reports with a traceback (exit 1); nothing of ours exists yet to be left
behind. An exception raised in a finalizer (`__del__`) is printed and lost,
so a signal that arrives in one is raised once the finalizer has returned.

Each subcommand lives in kvmcpuid_virt/commands/<module>.py with
`add_parser(subparsers)` and `run(args) -> int`. Only the module of the
command being run is imported, so `kvmcpuid dump` never pays for lxml,
libvirt or the feature registry.
"""

from __future__ import annotations

import _thread
import argparse
import importlib
import itertools
import os
import signal
import sys
from collections.abc import Callable, Sequence

TYPE_CHECKING = False  # the fast path's typing stand-in: docs/ARCHITECTURE.md, Start-up
if TYPE_CHECKING:
    from typing import Any, Final

__all__ = ["COMMANDS", "Terminated", "main"]

PROG: Final = "kvmcpuid"
EXIT_ERROR: Final = 2
EXIT_INTERRUPTED: Final = 130  # 128 + SIGINT, what a shell reports for a process the signal killed
EXIT_TERMINATED: Final = 143  # 128 + SIGTERM

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


class Terminated(BaseException):
    """SIGTERM, raised in the main thread as Python raises KeyboardInterrupt
    for SIGINT: not an Exception, so only cleanup (`finally`, context
    managers, `except BaseException`) sees it on its way out."""


# signal -> (exit status, the word on stderr)
_SIGNAL_EXIT: Final[dict[int, tuple[int, str]]] = {
    signal.SIGINT: (EXIT_INTERRUPTED, "interrupted"),
    signal.SIGTERM: (EXIT_TERMINATED, "terminated"),
}


# How soon a signal that came during a finalizer is asked for again.
_FINALIZER_RETRY: Final = 0.002


class _Signals:
    """SIGINT and SIGTERM during one main() call (the module docstring)."""

    def __init__(self) -> None:
        self._count = itertools.count()  # next() is atomic: one handler call gets 0
        self.armed = True  # False once the work is done or being unwound
        self.first: int | None = None
        self.held: int | None = None  # came during a finalizer, not raised yet
        self._previous: dict[int, Any] = {}
        self._previous_hook: Callable[[Any], Any] = sys.unraisablehook

    def install(self) -> None:
        self._previous_hook = sys.unraisablehook
        sys.unraisablehook = self._unraisable
        # SIGTERM last: a process that catches SIGTERM (SigCgt in
        # /proc/PID/status) has both handlers (scripts/interrupt_sweep.py).
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is signal.SIG_IGN:
                continue  # as Python does: a background job of a script, nohup
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        sys.unraisablehook = self._previous_hook

    def _unraisable(self, unraisable: Any) -> None:
        """Our exception raised where CPython can only print it and go on (a
        weakref callback such as the import system's module-lock `cb`, seen
        once in a SIGTERMed verify: "Exception ignored in ...", then exit 0):
        ask for the signal again in a moment, as for a finalizer."""
        exc = unraisable.exc_value
        signum = self.first
        if not (self.armed and signum is not None
                and isinstance(exc, (KeyboardInterrupt, Terminated))):  # fmt: skip
            self._previous_hook(unraisable)
            return
        self.first, self.held = None, signum
        self._count = itertools.count()
        self._ask_again(signum)

    @staticmethod
    def _ask_again(signum: int) -> None:
        # Not at once: the next check can come inside this very handler.
        import threading

        again = threading.Timer(_FINALIZER_RETRY, _thread.interrupt_main,
                                (signal.Signals(signum),))  # fmt: skip
        again.daemon = True
        again.start()

    def ignore(self) -> None:
        for signum in self._previous:
            signal.signal(signum, signal.SIG_IGN)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.armed and self.first is None and _in_finalizer(frame):
            self.held = signum  # main() honours it if the work ends first
            # An exception raised in __del__ is printed and lost: ask again in
            # a moment, until the finalizer has returned.
            self._ask_again(signum)
            return
        if next(self._count) or not self.armed:
            return  # one signal is being acted on, or the work is done
        self.first = signum
        exc = KeyboardInterrupt() if signum == signal.SIGINT else Terminated()
        # getattr: the signal may come while process.py is being imported.
        defer = getattr(sys.modules.get("kvmcpuid_virt.process"), "defer_signal", None)
        if defer is not None and defer(exc):
            return  # raised when the step that must not be cut in two ends
        raise exc


def _in_finalizer(frame: Any) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _leftovers() -> None:
    """Finish what a cleanup cut short by a signal left: only modules in use
    can have any (getattr: one may have been cut short in its import)."""
    for module, name in (("qmp", "close_sessions"), ("process", "cleanup_leftovers")):
        finish = getattr(sys.modules.get(f"kvmcpuid_virt.{module}"), name, None)
        if finish is not None:
            finish()


def _exit_now(status: int) -> None:
    """End an interrupted program without the interpreter's shutdown. Its
    children are reaped, its directories removed, its sessions closed
    (_leftovers); what the unwinding cut short is still on the heap, in
    reference cycles, and the shutdown's collection of it can crash CPython
    3.11 (a memoryview cleared while exported, python/cpython#77894: seen here
    once in ~120 interrupted runs, "Exception ignored in tp_clear of
    memoryview", then SIGSEGV)."""
    from contextlib import suppress

    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):  # a reader that left, a closed stream
            stream.flush()
    os._exit(status)


def _called_as_program() -> bool:
    """Whether main() runs for a `__main__` module (a console script,
    `python -m`, `python -c`) rather than for a caller that goes on (a test):
    then nothing but the exit follows it."""
    try:
        frame = sys._getframe(2)
    except ValueError:  # called from C, with no Python caller
        return False
    while frame is not None and str(frame.f_globals.get("__name__", "")).startswith(
        "kvmcpuid_virt."
    ):
        frame = frame.f_back  # type: ignore[assignment]
    return frame is not None and frame.f_globals.get("__name__") == "__main__"


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


def _interrupted(signals: _Signals, exc: BaseException, prog: str) -> int:
    signum = signals.first
    if signum is None:  # raised by other means than our handler (a test, _thread.interrupt_main)
        signum = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
    status, word = _SIGNAL_EXIT[signum]
    print(f"{prog}: {word}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """The `kvmcpuid` console script (argv: sys.argv[1:] when None); `prog`
    is the name errors carry (see the module docstring)."""
    signals = _Signals()
    signals.install()
    program = _called_as_program()
    try:
        try:
            try:
                args = list(sys.argv[1:] if argv is None else argv)
                command = next((a for a in args if not a.startswith("-")), None)
                status = _run(args, prog, command)
            finally:
                signals.armed = False
                _leftovers()
            if signals.first is None and signals.held is not None:
                # It came during a finalizer and the work ended before it
                # could be raised: it still came during the work.
                signals.first = signals.held
                raise KeyboardInterrupt
            return status
        except (KeyboardInterrupt, Terminated) as exc:
            signals.armed = False  # in case the signal came before the line above
            _leftovers()
            status = _interrupted(signals, exc, prog)
            if program:
                _exit_now(status)
            return status
    finally:
        if program:
            # Nothing but the exit follows; the interpreter's shutdown puts
            # back SIG_DFL for Python handlers (a signal would then kill the
            # process after its work, or its message), but leaves SIG_IGN.
            signals.ignore()
        else:
            signals.restore()  # a caller that goes on gets its handlers back
