"""Many hosts at once: dump files read in bulk, and libvirt daemons asked
concurrently (a bounded pool), with a progress bar on a terminal.

The commands that take many hosts (`baseline`, `compat --matrix`, `compat
GUEST --connect ... --connect ...`) read them through here. A host that
cannot be read or reached is named with its cause, one line each: by
default the command fails with all of them (FleetError); with
`skip_unreachable` the others go on and the caller warns which were left out.
"""

from __future__ import annotations

import gc
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Final, TextIO, TypeVar

from kvmcpuid_virt.cpuid.formats import Dump
from kvmcpuid_virt.errors import KvmcpuidError, ToolError
from kvmcpuid_virt.fsutil import load_dump

__all__ = ["MAX_CONCURRENT", "TIMEOUT", "FleetError", "Progress", "ask_all", "load_dumps"]

# How many daemons are asked at once: each question is one connection and
# one domain-capabilities call, mostly waiting on the network.
MAX_CONCURRENT: Final = 8
# How long a host may take to answer (--connect-timeout): a daemon that hangs
# (stopped, or a network that drops packets) must not hang the command.
TIMEOUT: Final = 60.0

T = TypeVar("T")


class FleetError(ToolError):
    """Hosts that could not be asked (each was named on its own line)."""

    def __init__(self, failures: Sequence[tuple[str, str]], total: int,
                 message: str = "") -> None:  # fmt: skip
        self.failures = tuple(failures)
        names = ", ".join(h for h, _ in self.failures)
        super().__init__(message or f"{len(self.failures)} of {total} hosts could not be "
                         f"asked: {names} (--skip-unreachable goes on without them)")  # fmt: skip


def load_dumps(paths: Sequence[str], check: Callable[[Dump], Dump] = lambda d: d) -> list[Dump]:
    """Every dump file, in order (fsutil.load_dump, then `check`); the first
    bad one is its one-line error. The collector is paused while they are
    read, and they are frozen out of its later passes: thousands of
    long-lived tables, no cycles among them, and each of its passes would
    walk them all again."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        dumps = [check(load_dump(p)) for p in paths]
    finally:
        if enabled:
            gc.enable()
    # And kept out of the collector's later passes: they live as long as the
    # command does.
    gc.freeze()
    return dumps


class Progress:
    """A one-line progress bar on stderr when stderr is a terminal; nothing
    otherwise (piped output gets only warnings). Thread-safe."""

    def __init__(self, what: str, total: int, stream: TextIO | None = None) -> None:
        self._stream = sys.stderr if stream is None else stream
        self._on = total > 1 and self._stream.isatty()
        self._what = what
        self._total = total
        self._done = 0
        self._lock = threading.Lock()
        self._last = 0.0
        self._draw(force=True)

    def step(self, name: str) -> None:
        with self._lock:
            self._done += 1
            self._draw(name=name, force=self._done == self._total)

    def _draw(self, name: str = "", force: bool = False) -> None:
        if not self._on:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        width = 30
        filled = width * self._done // max(self._total, 1)
        bar = "#" * filled + "." * (width - filled)
        line = f"{self._what} [{bar}] {self._done}/{self._total} {name}"[:79]
        self._stream.write(f"\r{line:<79}")
        self._stream.flush()

    def close(self) -> None:
        if self._on:
            self._stream.write("\r" + " " * 79 + "\r")
            self._stream.flush()


def ask_all(
    hosts: Sequence[str], ask: Callable[[str], T], *, prog: str, what: str = "asking hosts",
    skip_unreachable: bool = False, limit: int = MAX_CONCURRENT,
    timeout: float = TIMEOUT, stream: TextIO | None = None,
) -> list[tuple[str, T]]:
    """ask(host) for every host, at most `limit` at a time, in daemon threads
    (a host that hangs cannot hold the process past a Ctrl-C or its end);
    a host without an answer after `timeout` seconds has failed: the
    answers, in the hosts' order. Each host that fails is one line on
    stderr, "PROG: HOST: CAUSE"; then, after every host was asked (the
    operator sees all of them at once), a FleetError, or with
    `skip_unreachable` a warning naming what was left out. A single failure
    without `skip_unreachable` is the FleetError alone, "HOST: CAUSE"."""
    out = sys.stderr if stream is None else stream
    results: dict[int, T] = {}
    failures: dict[int, str] = {}
    progress = Progress(what, len(hosts), out)
    pending = list(range(len(hosts)))
    lock = threading.Lock()
    done = threading.Event()

    def worker() -> None:
        while True:
            with lock:
                if not pending:
                    return
                i = pending.pop(0)
            try:
                answer = ask(hosts[i])
            except KvmcpuidError as exc:
                with lock:
                    failures[i] = _cause(str(exc), hosts[i])
            except Exception as exc:  # a thread's traceback would be no answer
                with lock:
                    failures[i] = f"{type(exc).__name__}: {_cause(str(exc), hosts[i])}"
            else:
                with lock:
                    results[i] = answer
            finally:
                progress.step(hosts[i])
                with lock:
                    if len(results) + len(failures) == len(hosts):
                        done.set()

    threads = [threading.Thread(target=worker, name=f"kvmcpuid-fleet-{n}", daemon=True)
               for n in range(max(1, min(limit, len(hosts))))]  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        for t in threads:
            t.start()
        # A bounded wait in a loop: the main thread stays where signals land.
        while hosts and not done.wait(0.2):
            if not any(t.is_alive() for t in threads) or time.monotonic() > deadline:
                break
    finally:
        progress.close()
    with lock:
        pending.clear()  # what no worker took yet is not asked any more
        answered = dict(results)
        for i in range(len(hosts)):
            if i not in answered and i not in failures:
                alive = any(t.is_alive() for t in threads)
                failures[i] = (f"no answer within {timeout:g} s" if alive
                               else "the question ended without an answer")  # fmt: skip
        failed = [(hosts[i], failures[i]) for i in sorted(failures)]
    if len(failed) == 1 and not skip_unreachable:
        host, cause = failed[0]
        raise FleetError(failed, len(hosts), f"{host}: {cause}")
    for host, cause in failed:
        out.write(f"{prog}: {host}: {cause}\n")
    if failed and not skip_unreachable:
        raise FleetError(failed, len(hosts))
    if failed:
        out.write(f"{prog}: warning: left out {len(failed)} of {len(hosts)} hosts "
                  f"(--skip-unreachable): {', '.join(h for h, _ in failed)}\n")  # fmt: skip
    return [(hosts[i], answered[i]) for i in sorted(answered)]


def _cause(message: str, host: str) -> str:
    """The error's message without the host it starts with, on one line."""
    text = " ".join(message.split())
    return text.removeprefix(f"{host}: ")
