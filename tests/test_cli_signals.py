"""A signal whose exception is raised where CPython can only print it (a
weakref callback, like the import system's module-lock `cb`) must still end
the work: seen once in a SIGTERMed `kvmcpuid verify` in a fresh root, which
printed "Exception ignored in ..." and exited 0."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_CHILD = """
import os, signal, sys, time, weakref
from kvmcpuid_virt import cli

class Thing: pass

signals = cli._Signals()
signals.install()
try:
    thing = Thing()
    def callback(_ref):
        os.kill(os.getpid(), signal.SIG{sig})
        for _ in range(1000):  # the handler runs here, inside the callback
            pass
    ref = weakref.ref(thing, callback)
    del thing  # the callback runs now; its exception cannot propagate
    print("after the callback", flush=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.01)
    print("not interrupted", flush=True)
except (KeyboardInterrupt, cli.Terminated) as exc:
    print(type(exc).__name__, signals.first == signal.SIG{sig}, flush=True)
finally:
    signals.restore()
"""


def _run(sig: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _CHILD.format(sig=sig)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_sigterm_raised_inside_a_weakref_callback_still_ends_the_work() -> None:
    r = _run("TERM")
    assert r.stdout.splitlines() == ["after the callback", "Terminated True"], r.stdout + r.stderr
    assert r.stderr == ""  # nothing "ignored", no traceback


def test_sigint_raised_inside_a_weakref_callback_still_ends_the_work() -> None:
    r = _run("INT")
    assert r.stdout.splitlines() == ["after the callback", "KeyboardInterrupt True"], (
        r.stdout + r.stderr)
    assert r.stderr == ""


def test_an_inherited_sigint_ignore_is_kept_as_python_keeps_it() -> None:
    """A script's background job (`kvmcpuid verify &`) or nohup inherits
    SIGINT ignored so that the terminal's Ctrl-C is not its to act on: Python
    keeps that, and so does cli.main; SIGTERM is still handled."""
    code = (
        "import signal\n"
        "from kvmcpuid_virt import cli\n"
        "python_kept = signal.getsignal(signal.SIGINT) is signal.SIG_IGN\n"
        "s = cli._Signals(); s.install()\n"
        "print(python_kept, signal.getsignal(signal.SIGINT) is signal.SIG_IGN,\n"
        "      signal.getsignal(signal.SIGTERM) == s._handle)\n"
        "s.restore()\n"
        "print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=60, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert r.stdout.split() == ["True", "True", "True", "True"], r.stdout + r.stderr
