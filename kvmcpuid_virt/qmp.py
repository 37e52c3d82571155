"""QEMU's monitor (QMP) through qemu.qmp: the one client path of this package,
for a short-lived QEMU asked about CPU models (converse(), run_commands(),
monitor(): toolfacts.learn) and for the probe guest's QOM view (Session:
probe.qemu).

Why a thread. qemu.qmp's API is the asyncio QMPClient; its synchronous
wrapper (qemu.qmp.legacy) exists for the old scripts in QEMU's tree and runs
the event loop in the caller's thread, one run_until_complete per command, so
a Ctrl-C lands inside asyncio's machinery and leaves "Task exception was never
retrieved" and "Exception ignored in ... QEMUMonitorProtocol" behind. A Session
runs QMPClient on an event loop of its own, in a thread of its own, for one
conversation. Python runs signal handlers in the main thread only, so no
signal ever lands inside the loop: the caller waits for each step on a future;
when it is interrupted (KeyboardInterrupt, or cli's Terminated) the step is
cancelled, the client disconnected, the loop stopped and closed, and the
interrupt goes on. Every step ends with a value, never with an exception that
nobody retrieves.

Waiting. Every step is bounded by the session's Deadline, and QEMU's exit
ends it at once (a pidfd in the loop): a QEMU that dies at start-up (a bad
-cpu) is its error message, not a timeout. converse() gives QEMU one end of a
socket pair as its monitor (`-chardev socket,fd=N`): nothing to connect to,
no socket file; QEMU is killed when the deadline comes. QEMU's stderr goes to
an unnamed temporary file (a pipe could fill up); its last lines say why when
QEMU exits early.

Transient failures are tried again, a bounded number of times with a backoff
(retrying()): QEMU ended from outside or short of a resource, or its monitor
broke while QEMU ran on (transient_end() says which and why). A deterministic
failure (a bad -cpu, an assertion, an error reply) is not tried again.

qemu.qmp and asyncio cost ~30 ms to import: they are imported inside the
functions, so commands that find QEMU's answers cached do not pay for them.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from typing import IO, TYPE_CHECKING, Any, Final, TypeVar

from kvmcpuid_virt.errors import ToolError
from kvmcpuid_virt.process import Deadline, kill_process, signals_deferred, start

if TYPE_CHECKING:
    import asyncio

__all__ = [
    "ATTEMPTS",
    "QMP_TIMEOUT",
    "QemuExited",
    "Session",
    "TransientError",
    "close_sessions",
    "converse",
    "default_accel",
    "monitor",
    "retrying",
    "run_commands",
    "transient_end",
    "transient_oserror",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Bounds the whole life of one QEMU (start, every command, quit).
QMP_TIMEOUT: Final = 60.0
# How long QEMU may take to exit after answering `quit`, or after its
# monitor broke (longer, and the monitor broke with QEMU still running).
_EXIT_GRACE: Final = 2.0
# Lines of QEMU's stderr quoted when it exits early ("error: failed to set
# MSR 0x10a" comes one line before the assertion that aborts QEMU).
_STDERR_LINES: Final = 2
# Bounds a disconnect and the loop's shutdown in Session.close().
_CLOSE_TIMEOUT: Final = 5.0
# Attempts at a conversation (or a probe run) that failed transiently, and
# the first pause between two (doubled each time): 0.1 + 0.2 s at most.
ATTEMPTS: Final = 3
_BACKOFF: Final = 0.1
# Without pidfd_open (Linux < 5.3, a seccomp filter): how often to look for QEMU's exit.
_EXIT_POLL: Final = 0.01

# Signals QEMU does not send itself: the OOM killer's SIGKILL, an operator's
# or a service manager's SIGTERM, SIGHUP, SIGINT. The next QEMU may well
# live. (SIGABRT and SIGSEGV are QEMU's own assertion or crash: the same
# command line meets them again.)
_TRANSIENT_SIGNALS: Final = frozenset(
    {signal.SIGKILL, signal.SIGTERM, signal.SIGHUP, signal.SIGINT}
)
# The same in QEMU's words: it catches SIGTERM, SIGINT and SIGHUP and exits 0
# saying so; the others are strerror() of a resource that was short at that
# moment (EAGAIN, ENOMEM, EBUSY, EINTR: "failed to initialize kvm: Cannot
# allocate memory"). "Property not found", "can't apply global" (a bad -cpu)
# and "failed to set MSR" (what KVM refuses) say nothing of the kind.
_TRANSIENT_WORDS: Final = (
    "terminating on signal",
    "Resource temporarily unavailable",
    "Cannot allocate memory",
    "Device or resource busy",
    "Interrupted system call",
)
# fork/exec of QEMU failing for lack of processes or memory (ENOENT, EACCES: never).
_TRANSIENT_ERRNOS: Final = frozenset({errno.EAGAIN, errno.ENOMEM, errno.EINTR})


def default_accel() -> str:
    """kvm when /dev/kvm is usable by this process, else tcg."""
    return "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


# --- failures worth another attempt --------------------------------------------


class TransientError(ToolError):
    """A QEMU-side failure another attempt may not meet (transient_end(),
    transient_oserror(), a monitor that broke while QEMU ran on). `__cause__`
    is what broke."""


class QemuExited(Exception):
    """The QEMU a Session watches exited while the session waited on it."""


def transient_end(status: int, diagnostics: Iterable[str]) -> bool:
    """Whether a QEMU that ended with exit `status` (negative: the signal that
    killed it) after saying `diagnostics` (its stderr lines) may well run if
    started again: ended from outside, or short of a resource for a moment."""
    if status < 0:
        return -status in _TRANSIENT_SIGNALS
    return any(word in line for line in diagnostics for word in _TRANSIENT_WORDS)


def transient_oserror(exc: OSError) -> bool:
    """Whether starting QEMU failed for a moment's lack of processes or memory."""
    return exc.errno in _TRANSIENT_ERRNOS


def retrying(attempt: Callable[[], T], deadline: Deadline, what: str,
             attempts: int = ATTEMPTS) -> T:  # fmt: skip
    """`attempt()`, again after a pause (0.1 s, doubled each time) while it
    raises TransientError: at most `attempts` times and within `deadline`.
    Anything else it raises (a deterministic failure, an interrupt) goes on at
    once. The last TransientError goes on with the attempts counted in its
    message and the previous one as its cause."""
    pause = _BACKOFF
    n = 1
    while True:
        try:
            return attempt()
        except TransientError as exc:
            if n >= attempts or deadline.remaining() <= pause:
                if n == 1:
                    raise
                raise TransientError(f"{exc} ({n} attempts)") from exc
            log.info("%s: %s; trying again in %g s", what, exc, pause)
        time.sleep(pause)
        pause *= 2
        n += 1


# --- the session -----------------------------------------------------------------

# Sessions not closed yet, for close_sessions(). A set: add/discard are atomic.
_sessions: set[Session] = set()


def close_sessions() -> None:
    """Close every Session still open: the command line's backstop on its way
    out (a signal can come between a session's creation and its `with`)."""
    for session in list(_sessions):
        session.close()


class Session:
    """One QMP conversation: qemu.qmp's QMPClient on an event loop of its own,
    run by a thread of its own (see the module docstring). Every step waits
    within `deadline` (TimeoutError) and ends when the process given to
    watch() exits (QemuExited); qemu.qmp's own errors (ExecuteError for an
    error reply, ConnectError, ExecInterruptedError ...) go to the caller.
    A context manager; close() is idempotent."""

    def __init__(self, deadline: Deadline, *, name: str = "qmp") -> None:
        import asyncio

        from qemu.qmp import QMPClient

        self.deadline = deadline
        self.expired = False  # the deadline came and watch(kill_at_deadline) killed QEMU
        self._client = QMPClient(name)
        self._steps: set[asyncio.Task[Any]] = set()
        self._exited: asyncio.Future[None] | None = None
        self._poller: asyncio.Task[None] | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._pidfd: int | None = None
        self._closed = False
        # The loop, its thread and the registration exist together or not at all.
        with signals_deferred():
            self._loop = asyncio.new_event_loop()
            # A daemon: a caller killed before close() must not keep the
            # interpreter from exiting (its QEMU dies with it: dies_with_us).
            self._thread = threading.Thread(target=self._serve, name=f"kvmcpuid-{name}",
                                            daemon=True)  # fmt: skip
            try:
                self._thread.start()
            except BaseException:
                self._loop.close()
                raise
            _sessions.add(self)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what callers do (from any one thread) --

    def connect(self, sock: socket.socket) -> None:
        """Greeting and capability negotiation over `sock`, one end of a
        socket pair whose other end is QEMU's monitor."""
        self._step(self._client.connect, sock)

    def listen(self, path: str) -> None:
        """Listen on the Unix socket `path` (QEMU will connect to it)."""
        self._step(self._client.start_server, path)

    def accept(self) -> None:
        """Take QEMU's connection on listen()'s socket, then negotiate."""
        self._step(self._client.accept)

    def cmd(self, name: str, **arguments: object) -> Any:
        """QMP command `name`: its "return" value."""
        return self._step(self._client.execute, name, arguments or None)

    def watch(self, proc: subprocess.Popen[bytes], *, kill_at_deadline: bool = False) -> None:
        """End every wait (QemuExited) as soon as `proc` exits; with
        `kill_at_deadline`, SIGKILL it when the deadline comes (`expired`)."""
        try:
            self._pidfd = os.pidfd_open(proc.pid)
        except OSError as exc:
            log.debug("pidfd_open: %s; polling for the exit of pid %d", exc, proc.pid)
        self._step(self._watch, proc, kill_at_deadline, bounded=False)

    def close(self) -> None:
        """Disconnect, stop and close the loop, end the thread. A broken
        conversation's disconnect error is logged, not raised: the caller has
        its error already, or is on its way out. Not cut short by a signal
        (process.signals_deferred), and bounded."""
        import asyncio

        if self._closed:
            return
        self._closed = True
        with signals_deferred():
            try:
                done = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
                try:
                    done.result(timeout=2 * _CLOSE_TIMEOUT)
                except Exception as exc:  # its own bound passed: the thread still ends
                    log.debug("QMP session shutdown: %r", exc)
            finally:
                self._thread.join(2 * _CLOSE_TIMEOUT)
                if self._pidfd is not None and not self._thread.is_alive():
                    os.close(self._pidfd)
                    self._pidfd = None
                _sessions.discard(self)

    # -- the caller's side of a step --

    def _step(self, make: Callable[..., Coroutine[Any, Any, T]], *args: Any,
              bounded: bool = True) -> T:  # fmt: skip
        """Run `make(*args)` in the loop; wait for it here (interruptibly).
        No coroutine is made in this thread: the loop makes it (_begin), so a
        signal here can never leave one never awaited (a RuntimeWarning on
        stderr, seen in a SIGTERM mid-conversation when the step was made
        here and the signal came before the loop had it)."""
        import concurrent.futures

        if self._closed:
            raise RuntimeError("QMP session is closed")
        future: concurrent.futures.Future[tuple[bool, Any]] = concurrent.futures.Future()
        self._loop.call_soon_threadsafe(self._begin, future, make, args, bounded)
        try:
            ok, value = future.result()
        except BaseException:
            # Interrupted while waiting: stop the step (_begin's callback
            # cancels its task); close() disconnects.
            future.cancel()
            raise
        if ok:
            result: T = value
            return result
        raise value

    # -- the loop's side (the session's thread) --

    def _serve(self) -> None:
        import asyncio

        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            # _shutdown() leaves nothing behind when it finishes; whatever is
            # left is run to its end, so no task is destroyed pending.
            leftovers = asyncio.all_tasks(loop)
            for task in leftovers:
                task.cancel()
            if leftovers:
                loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _begin(self, future: Any, make: Callable[..., Coroutine[Any, Any, Any]],
               args: tuple[Any, ...], bounded: bool) -> None:  # fmt: skip
        """In the loop: the step's task, its outcome copied to `future`, and
        `future`'s cancelling (the caller interrupted) cancels the task."""
        import concurrent.futures

        if future.cancelled():
            return  # the caller left before the loop got here: nothing made
        task = self._loop.create_task(self._outcome(make, args, bounded))

        def copy(done: Any) -> None:
            if not done.cancelled():
                with suppress(concurrent.futures.InvalidStateError):  # cancelled meanwhile
                    future.set_result(done.result())

        def stop(_: Any) -> None:
            if future.cancelled():
                self._loop.call_soon_threadsafe(task.cancel)

        task.add_done_callback(copy)
        future.add_done_callback(stop)

    async def _outcome(self, make: Callable[..., Coroutine[Any, Any, T]], args: tuple[Any, ...],
                       bounded: bool) -> tuple[bool, Any]:  # fmt: skip
        """The step's result or exception as a value: the task never ends
        with an exception nobody retrieves (its caller may have gone)."""
        import asyncio

        task = asyncio.current_task()
        assert task is not None
        self._steps.add(task)
        try:
            return True, await self._race(make(*args), bounded)
        except BaseException as exc:  # CancelledError too: its caller was interrupted
            return False, exc
        finally:
            self._steps.discard(task)

    async def _race(self, step: Coroutine[Any, Any, T], bounded: bool) -> T:
        """`step`, unless QEMU exits or the deadline comes first."""
        import asyncio

        work = asyncio.ensure_future(step)
        waiters: set[asyncio.Future[Any]] = {work}
        if self._exited is not None:
            waiters.add(self._exited)
        timeout = self.deadline.remaining() if bounded else None
        try:
            done, _ = await asyncio.wait(waiters, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        except BaseException:
            await _stopped(work)
            raise
        if work in done:
            return work.result()
        await _stopped(work)
        if self._exited is not None and self._exited.done():
            raise QemuExited("QEMU exited")
        raise TimeoutError(f"no QMP answer within {self.deadline.timeout:g} s")

    async def _watch(self, proc: subprocess.Popen[bytes], kill_at_deadline: bool) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        self._exited = loop.create_future()
        if self._pidfd is not None:
            loop.add_reader(self._pidfd, self._on_exit)
        else:
            self._poller = loop.create_task(self._poll(proc))
        if kill_at_deadline:
            self._expiry = loop.call_later(self.deadline.remaining(), self._expire, proc)

    def _on_exit(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(None)

    async def _poll(self, proc: subprocess.Popen[bytes]) -> None:
        import asyncio

        while proc.poll() is None:
            await asyncio.sleep(_EXIT_POLL)
        self._on_exit()

    def _expire(self, proc: subprocess.Popen[bytes]) -> None:
        self.expired = True
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)  # no pid reuse race
            else:
                proc.kill()
        except OSError:
            pass  # gone already

    async def _shutdown(self) -> None:
        import asyncio

        from qemu.qmp import Runstate

        loop = asyncio.get_running_loop()
        try:
            if self._expiry is not None:
                self._expiry.cancel()
            if self._pidfd is not None:
                loop.remove_reader(self._pidfd)
            if self._poller is not None:
                await _stopped(self._poller)
            # Steps whose caller was interrupted end first (an accept() that is
            # cancelled disconnects by itself): two disconnects must not overlap.
            steps = set(self._steps)
            for task in steps:
                task.cancel()
            if steps:
                await asyncio.wait(steps, timeout=_CLOSE_TIMEOUT)
            if self._client.runstate != Runstate.IDLE:
                try:
                    await asyncio.wait_for(self._client.disconnect(), _CLOSE_TIMEOUT)
                except Exception as exc:  # EOF after `quit` or QEMU's death, a reset
                    log.debug("QMP disconnect: %r", exc)
        finally:
            loop.stop()


async def _stopped(task: asyncio.Future[Any]) -> None:
    """Cancel `task`, let it finish, and retrieve its exception (if any): it
    is not logged as "never retrieved" when it is collected."""
    import asyncio

    if not task.done():
        task.cancel()
        await asyncio.wait({task})
    if not task.cancelled():
        task.exception()


# --- a short-lived QEMU with its monitor on a socket pair ----------------------------


def _broken() -> tuple[type[BaseException], ...]:
    """What a conversation that broke raises (qemu.qmp imported on demand)."""
    from qemu.qmp import QMPError

    return (QMPError, EOFError, OSError, QemuExited)  # OSError includes TimeoutError


def _monitor_argv(binary: str, machine: str, cpu: str | None, accel: str | None,
                  extra: Sequence[str]) -> list[str]:  # fmt: skip
    argv = [binary, "-machine", machine, "-accel", accel or default_accel()]
    if cpu is not None:
        argv += ["-cpu", cpu, "-S"]
    return [*argv, "-nodefaults", "-no-user-config", "-display", "none", *extra]


@contextmanager
def _conversation(binary: str, argv: Sequence[str], deadline: Deadline) -> Iterator[Session]:
    """Start `argv` with its monitor on a socket pair, negotiate, yield the
    session; then `quit` QEMU and reap it. Every QEMU-side failure, at the
    start or in the block, is a ToolError (TransientError when another
    attempt may do better); QEMU never outlives the block."""
    broken = _broken()
    with ExitStack() as stack:
        ours, theirs = socket.socketpair()
        stack.callback(ours.close)
        stack.callback(theirs.close)
        stderr = stack.enter_context(tempfile.TemporaryFile())
        monitor_args = ["-chardev", f"socket,id=qmp,fd={theirs.fileno()}",
                        "-mon", "chardev=qmp,mode=control"]  # fmt: skip
        try:
            proc = start([*argv, *monitor_args], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=stderr,
                         pass_fds=(theirs.fileno(),))  # fmt: skip
        except OSError as exc:
            kind = TransientError if transient_oserror(exc) else ToolError
            raise kind(f"cannot run {binary}: {exc.strerror or exc}") from exc
        # Only once our copy of QEMU's end is closed is QEMU's exit an EOF.
        theirs.close()
        stack.callback(kill_process, proc)
        session = stack.enter_context(Session(deadline))
        try:
            session.watch(proc, kill_at_deadline=True)
            session.connect(ours)
            yield session
        except broken as exc:
            raise _failure(binary, proc, stderr, session, exc) from exc
        try:
            session.cmd("quit")
        except broken as exc:  # QEMU may go before it answers
            log.debug("QMP quit: %r", exc)
        with suppress(subprocess.TimeoutExpired):  # then kill_process kills it
            proc.wait(timeout=_EXIT_GRACE)


def _failure(binary: str, proc: subprocess.Popen[bytes], stderr: IO[bytes], session: Session,
             exc: BaseException) -> ToolError:  # fmt: skip
    """The error for a conversation that broke: the error reply, the
    deadline, or QEMU's own words once it exited."""
    from qemu.qmp import ExecuteError

    if isinstance(exc, ExecuteError):
        name = exc.sent.get("execute", "?")
        return ToolError(f"{binary}: QMP {name} failed: {exc}")
    if session.expired or isinstance(exc, TimeoutError):
        return ToolError(
            f"{binary}: QMP did not finish within {session.deadline.timeout:g} s (QEMU killed)"
        )
    try:
        status = proc.wait(timeout=_EXIT_GRACE)  # EOF comes just before the exit
    except subprocess.TimeoutExpired:
        # QEMU runs on but its monitor broke (a reset): a new QEMU may answer.
        return TransientError(f"{binary}: QMP conversation failed: {exc!r}")
    stderr.seek(0)
    prefix = f"{os.path.basename(binary)}: "
    lines = [
        line.strip().removeprefix(prefix)
        for line in stderr.read().decode(errors="replace").splitlines()
        if line.strip()
    ]
    detail = "; ".join(lines[-_STDERR_LINES:]) or "no message"
    kind = TransientError if transient_end(status, lines) else ToolError
    return kind(f"{binary} exited with status {status}: {detail}")


def converse(
    binary: str,
    talk: Callable[[Session], T],
    *,
    machine: str = "none",
    cpu: str | None = None,
    accel: str | None = None,
    extra: Sequence[str] = (),
    timeout: float = QMP_TIMEOUT,
) -> T:
    """`talk(session)` with a QEMU started for it (an argument list: no
    shell), and its result; then QEMU is told to quit and reaped. The whole
    conversation is tried again (retrying()) when it failed transiently, so
    `talk` must only ask (queries, no changes). `timeout` bounds everything,
    the attempts included.

    `machine` "none" has no CPU, which is all model queries need (and it
    avoids vCPU realize, which aborts for `-cpu host` on some nested hosts).
    With `cpu`, QEMU is started stopped (-S): the vCPU exists, never runs.
    `accel` defaults to default_accel(); `extra` is appended to the command
    line. A missing binary, QEMU exiting early, an error reply and the
    timeout are ToolErrors; QEMU never outlives the call."""
    deadline = Deadline(timeout)
    argv = _monitor_argv(binary, machine, cpu, accel, extra)

    def attempt() -> T:
        with _conversation(binary, argv, deadline) as session:
            return talk(session)

    return retrying(attempt, deadline, binary)


def run_commands(
    binary: str,
    commands: Sequence[Mapping[str, Any]],
    *,
    machine: str = "none",
    cpu: str | None = None,
    accel: str | None = None,
    extra: Sequence[str] = (),
    timeout: float = QMP_TIMEOUT,
) -> list[Any]:
    """Run `commands` ({"execute": NAME, "arguments": {...}}, arguments
    optional) against one QEMU (see converse()) and return each one's
    "return" value, in order. A command's error reply is a ToolError naming it."""
    return converse(
        binary, lambda s: [s.cmd(c["execute"], **c.get("arguments", {})) for c in commands],
        machine=machine, cpu=cpu, accel=accel, extra=extra, timeout=timeout,
    )  # fmt: skip


@contextmanager
def monitor(
    binary: str,
    *,
    machine: str = "none",
    cpu: str | None = None,
    accel: str | None = None,
    extra: Sequence[str] = (),
    timeout: float = QMP_TIMEOUT,
) -> Iterator[Session]:
    """converse() as a block: the Session of a QEMU started for it. Only the
    start is tried again on a transient failure (the block's commands are the
    caller's); failures in the block are ToolErrors, and QEMU never outlives it."""
    deadline = Deadline(timeout)
    argv = _monitor_argv(binary, machine, cpu, accel, extra)
    with ExitStack() as stack:
        session = retrying(
            lambda: stack.enter_context(_conversation(binary, argv, deadline)), deadline, binary
        )
        yield session
