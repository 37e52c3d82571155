"""Interrupt real `kvmcpuid` commands with SIGINT and SIGTERM at delays spread
over each command's measured run, with a cold cache (a fresh XDG_CACHE_HOME
per run: QEMU's models are learned) and a warm one, and check every run:

    .venv/bin/python scripts/interrupt_sweep.py                 # 60 signals cold, 60 warm
    .venv/bin/python scripts/interrupt_sweep.py --signals 90
    .venv/bin/python scripts/interrupt_sweep.py --quick         # 12 + 12, for CI and tests

A run is clean when
- it exits 130 (SIGINT) or 143 (SIGTERM) and its stderr is `kvmcpuid:
  interrupted` / `kvmcpuid: terminated`, after at most the lines an
  uninterrupted run prints (its notes), or it exits as the uninterrupted run
  did, printing the same, when the command finished before the signal
  (counted apart: "finished");
- nothing says 'Traceback', 'Exception ignored', 'Task exception', ...;
- it leaves nothing behind: no process started with its environment (every
  QEMU it starts inherits a marker variable) or naming its private TMPDIR,
  still alive 2 s after the tool exited; no `kvmcpuid-probe-*` libvirt domain
  whose XML names its TMPDIR; no /var/log/libvirt/qemu/kvmcpuid-probe-*.log
  newer than the run that names it; nothing in its TMPDIR (where every
  /tmp/kvmcpuid-* directory of the tool goes); no half-written file in its
  cache or output directory (every file parses, no atomic-write temp file).
A signal sent before the tool has installed its handlers (the interpreter's
start-up: the tool's /proc/PID/status shows no caught SIGTERM) gets Python's
own behaviour, which is counted apart ("start-up"), not as clean.
Every third run sends a second signal (the other one) 20 ms after the first,
during the cleanup the first started. Delays: the first run of each command
at 0 ms (the interpreter's start-up), the others evenly spread from the
moment the tool's handlers exist to the end of its run, both measured in an
uninterrupted run; SIGINT and SIGTERM alternate along them. The same plan
every time: no random delays.

Counts: `--signals N` runs per cache mode are planned (each sends one
signal, every third two); a run whose command ended before its signal was
due sends none, so more runs are added between the delays already tried
until N signals reached a running tool (at most four more passes).

Exit status: 0 when every run was clean (or finished, or start-up), 1 when
any was dirty (each with its reasons), 2 when a command does not run at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any, Final

REPO: Final = Path(__file__).resolve().parent.parent
MARKER: Final = "KVMCPUID_SWEEP_RUN"  # in every run's environment, so its children carry it
DOMAIN_PREFIX: Final = "kvmcpuid-probe-"
LIBVIRT_LOGS: Final = Path("/var/log/libvirt/qemu")
NOISE: Final = ("Traceback", "Exception ignored", "Task exception", "Task was destroyed",
                "Fatal Python error", "Error in atexit", "never retrieved")  # fmt: skip
WORDS: Final[dict[int, tuple[int, str]]] = {
    signal.SIGINT: (130, "interrupted"),
    signal.SIGTERM: (143, "terminated"),
}
# How long a process of a run may take to die once the tool is gone (the
# kernel's parent-death SIGKILL is immediate; exiting takes QEMU a moment).
GRACE: Final = 2.0
SECOND_SIGNAL_AFTER: Final = 0.02
CALIBRATIONS: Final = 3  # uninterrupted runs per command and cache mode
# The extra passes' offsets (fractions of a step), until enough signals were sent.
TOP_UP: Final = (0.5, 0.25, 0.75, 0.125)

# name -> arguments ({out}: the run's output directory)
COMMANDS: Final[dict[str, tuple[str, ...]]] = {
    "verify": ("verify",),
    "verify-qemu": ("verify", "--backend", "qemu"),
    "qemu-flags": ("qemu-flags",),
    "libvirt-xml": ("libvirt-xml",),
    "dump": ("dump", "-o", "{out}/dump.json"),
    "baseline": ("baseline", "--this-host"),
}

# --quick: the commands that talk to QEMU and libvirt, four runs each: every
# delay quarter, both signals and a double one.
QUICK: Final = ("verify", "verify-qemu", "qemu-flags")


def kvmcpuid() -> list[str]:
    """The console script next to this Python (the venv's), else `python -m`."""
    script = Path(sys.executable).with_name("kvmcpuid")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "kvmcpuid_virt.cli"]


# --- one run -----------------------------------------------------------------------


@dataclasses.dataclass
class Calibration:
    """An uninterrupted run: how long it takes, its exit status and stderr lines."""

    seconds: float
    status: int
    stderr: list[str]
    startup: float  # when the tool's handlers existed (its SigCgt shows SIGTERM)


@dataclasses.dataclass
class Run:
    command: str
    cache: str  # cold | warm
    delay: float
    signals: list[int]  # as planned
    sent: list[int] = dataclasses.field(default_factory=list)
    handler_installed: bool | None = None  # when the first signal was sent
    status: int | None = None
    stderr: str = ""
    seconds: float = 0.0
    verdict: str = ""  # clean | finished | start-up | dirty
    reasons: list[str] = dataclasses.field(default_factory=list)

    def line(self) -> str:
        names = "+".join(signal.Signals(s).name for s in self.sent) or "none sent"
        why = f": {'; '.join(self.reasons)}" if self.reasons else ""
        return (f"{self.cache:4} {self.command:12} {self.delay * 1000:7.1f} ms {names:15} "
                f"-> {self.status!s:>4} {self.verdict}{why}")  # fmt: skip


class Place:
    """The private directories of one run: TMPDIR, output, cache (cold)."""

    def __init__(self, cache: Path | None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="kvmcpuid-sweep-"))
        # libvirt's QEMU user must reach the probe's image through TMPDIR.
        self.root.chmod(0o711)
        self.tmp = self.root / "tmp"
        self.out = self.root / "out"
        self.tmp.mkdir(mode=0o711)
        self.tmp.chmod(0o711)
        self.out.mkdir()
        self.cache = cache if cache is not None else self.root / "cache"
        self.marker = uuid.uuid4().hex

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVMCPUID_SWEEP")}
        # PYTHONFAULTHANDLER: a crash, or the SIGABRT sent to a run that
        # hangs, prints every thread's stack.
        env.update(XDG_CACHE_HOME=str(self.cache), TMPDIR=str(self.tmp), PYTHONUNBUFFERED="1",
                   PYTHONFAULTHANDLER="1")  # fmt: skip
        env[MARKER] = self.marker
        return env

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def handler_installed(pid: int) -> bool | None:
    """Whether `pid` catches SIGTERM (cli.main installs SIGTERM's handler
    after SIGINT's; Python alone never catches it); None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return None


def launch(argv: Sequence[str], place: Place, stderr_path: Path) -> subprocess.Popen[bytes]:
    with open(stderr_path, "wb") as err:
        # A session of its own: a Ctrl-C at the sweep's terminal is not the test.
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, env=place.env(), cwd=place.root,
                                start_new_session=True)  # fmt: skip


def argv_of(command: str, place: Place) -> list[str]:
    return [*kvmcpuid(), *(a.format(out=place.out) for a in COMMANDS[command])]


def calibrate(command: str, place: Place, timeout: float) -> Calibration:
    """One uninterrupted run, with the moment its handlers existed."""
    err = place.root / "stderr"
    start = time.monotonic()
    proc = launch(argv_of(command, place), place, err)
    startup = 0.0
    while proc.poll() is None and time.monotonic() - start < timeout:
        if handler_installed(proc.pid):
            startup = time.monotonic() - start
            break
        time.sleep(0.0005)
    try:
        status = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        message = f"interrupt_sweep: {command} did not finish within {timeout:g} s"
        raise SystemExit(message) from None
    seconds = time.monotonic() - start
    text = err.read_text(errors="replace")
    # verify: 1 a mismatch, 3 a backend could not run (docs/exit-codes.md).
    if status not in (0, 1, 3) or any(word in text for word in NOISE):
        raise SystemExit(f"interrupt_sweep: {command} does not run cleanly uninterrupted "
                         f"(status {status}):\n{text}")  # fmt: skip
    return Calibration(seconds, status, text.splitlines(), startup or seconds)


def measure(command: str, warm: Path | None, times: int = CALIBRATIONS) -> Calibration:
    """The median of `times` uninterrupted runs (a loaded machine makes one
    run a poor measure), each with a fresh cache (cold) or the warm one
    (warmed up first)."""
    runs = []
    for n in range(times + (warm is not None)):
        place = Place(warm)
        try:
            one = calibrate(command, place, 600)
        finally:
            place.remove()
        if warm is None or n > 0:
            runs.append(one)
    # What most runs do (a busy libvirtd can make one verify exit 3).
    usual = Counter((r.status, tuple(r.stderr)) for r in runs).most_common(1)[0][0]
    median = len(runs) // 2
    return Calibration(sorted(r.seconds for r in runs)[median], usual[0], list(usual[1]),
                       sorted(r.startup for r in runs)[median])  # fmt: skip


def interrupt(run: Run, place: Place, calibration: Calibration, timeout: float,
              group: bool) -> None:  # fmt: skip
    """Start the command, send the run's signals, wait, and judge it."""
    err = place.root / "stderr"
    t0 = time.time()
    start = time.monotonic()
    proc = launch(argv_of(run.command, place), place, err)
    target = proc.pid if not group else -proc.pid
    for n, signum in enumerate(run.signals):
        at = start + run.delay + n * SECOND_SIGNAL_AFTER
        time.sleep(max(0.0, at - time.monotonic()))
        if proc.poll() is not None:
            break
        if n == 0:
            run.handler_installed = handler_installed(proc.pid)
        try:
            os.kill(target, signum)
        except ProcessLookupError:
            break
        run.sent.append(signum)
    try:
        run.status = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        run.reasons.append(f"still running after {timeout:g} s (SIGABRT: its stacks follow)")
        os.kill(proc.pid, signal.SIGABRT)  # faulthandler prints where it hangs
        try:
            run.status = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            run.status = proc.wait()
    run.seconds = time.monotonic() - start
    run.stderr = err.read_text(errors="replace")
    judge(run, calibration)
    if run.reasons and ("Fatal Python error" in run.stderr or "Thread 0x" in run.stderr):
        run.reasons.append("stderr:\n" + run.stderr[-8000:])
    run.reasons += leftovers(place, t0)
    if run.reasons:
        run.verdict = "dirty"


def judge(run: Run, calibration: Calibration) -> None:
    """The verdict from the exit status and stderr (leftovers are added after)."""
    lines = run.stderr.splitlines()
    noise = [word for word in NOISE if word in run.stderr]
    if not run.sent:
        # Finished before the first signal was due.
        run.verdict = "finished"
        if run.status != calibration.status or lines != calibration.stderr:
            run.reasons.append(f"exit {run.status} / stderr {lines!r} unlike an uninterrupted run")
        return
    expected = {WORDS[s][0]: WORDS[s][1] for s in run.sent}
    if run.status in expected:
        run.verdict = "clean"
        if noise:
            run.reasons.append("stderr has " + ", ".join(repr(w) for w in noise))
        if not lines or lines[-1] != f"kvmcpuid: {expected[run.status]}":
            run.reasons.append(f"last stderr line is not 'kvmcpuid: {expected[run.status]}': "
                               f"{lines[-3:]!r}")  # fmt: skip
        elif lines[:-1] != calibration.stderr[: len(lines) - 1]:
            run.reasons.append(f"stderr has more than one line of its own: {lines!r}")
        return
    first = run.sent[0]
    if run.handler_installed is False and (
        run.status == -first or (first == signal.SIGINT and run.status == 1)
    ):
        # Before cli.main installed its handlers: Python's own behaviour
        # (killed by the signal; SIGINT may also give a start-up traceback).
        run.verdict = "start-up"
        return
    if run.status == calibration.status:
        # The signal came once the work was done: the command's own result.
        run.verdict = "finished"
        if noise or lines != calibration.stderr:
            run.reasons.append(f"stderr unlike an uninterrupted run: {lines[-5:]!r}")
        return
    run.verdict = "dirty"
    run.reasons.append(f"exit {run.status}, stderr {lines[-5:]!r}")


# --- leftovers -----------------------------------------------------------------------


def _processes(place: Place) -> Iterator[tuple[int, str]]:
    """Live (non-zombie) processes of the run: its marker in their
    environment, or its TMPDIR on their command line."""
    marker = f"{MARKER}={place.marker}".encode()
    tmp = str(place.tmp).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rpartition(b")")[2].split()[0]
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    environ = f.read()
            except OSError:
                environ = b""
        except OSError:
            continue
        if state != b"Z" and (marker in environ.split(b"\0") or tmp in cmdline):
            yield int(entry), cmdline.replace(b"\0", b" ").decode(errors="replace")[:120]


def _domains(place: Place) -> list[str]:
    try:
        import libvirt
    except ImportError:
        return []
    libvirt.registerErrorHandler(lambda *_: None, None)
    try:
        conn = libvirt.open(os.environ.get("KVMCPUID_LIBVIRT_URI", "qemu:///system"))
    except libvirt.libvirtError:
        return []
    try:
        names = []
        for dom in conn.listAllDomains():
            if not dom.name().startswith(DOMAIN_PREFIX):
                continue
            try:
                if str(place.tmp) in dom.XMLDesc():
                    names.append(dom.name())
                    dom.destroy()  # do not disturb the next runs
            except libvirt.libvirtError:
                continue  # gone meanwhile
        return names
    finally:
        conn.close()


def _logs(place: Place, since: float) -> list[Path]:
    found = []
    for path in LIBVIRT_LOGS.glob(DOMAIN_PREFIX + "*.log"):
        try:
            if path.stat().st_mtime >= since - 1 and str(place.tmp) in path.read_text(
                errors="replace"
            ):
                found.append(path)
        except OSError:
            continue
    return found


def _half_written(directory: Path) -> list[str]:
    """Files an interrupted write left: atomic-write temp files (dot names),
    JSON files that do not parse, output memos without their NUL separator."""
    bad = []
    for path in sorted(directory.rglob("*")):
        if not path.is_file():
            continue
        name = path.relative_to(directory)
        try:
            if path.name.startswith("."):
                bad.append(f"temp file {name}")
            elif path.suffix == ".json":
                json.loads(path.read_text())
            elif path.parent.name == "memo" and b"\0" not in path.read_bytes():
                bad.append(f"torn {name}")
        except (OSError, ValueError):
            bad.append(f"torn {name}")
    return bad


def leftovers(place: Place, since: float) -> list[str]:
    """What the run left behind, as reasons (and removed, so the next runs start clean)."""
    reasons = []
    deadline = time.monotonic() + GRACE
    procs = list(_processes(place))
    while procs and time.monotonic() < deadline:
        time.sleep(0.05)
        procs = list(_processes(place))
    for pid, cmdline in procs:
        reasons.append(f"process {pid} outlived the tool: {cmdline}")
        with suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    reasons += [f"libvirt domain {name} left" for name in _domains(place)]
    for path in _logs(place, since):
        reasons.append(f"domain log {path} left")
        path.unlink(missing_ok=True)
    reasons += [f"left in TMPDIR: {p.name}" for p in sorted(place.tmp.iterdir())]
    for where in (place.cache, place.out):
        if where.exists():
            reasons += _half_written(where)
    return reasons


# --- the sweep ------------------------------------------------------------------------


def delays(count: int, startup: float, seconds: float, offset: float | None = None) -> list[float]:
    """0, then the rest evenly over [startup, seconds); with `offset` (a
    fraction of a step) only the latter, shifted: between those of before."""
    span = max(0.0, seconds - startup)
    if offset is not None:
        return [startup + span * (i + offset) / count for i in range(count)]
    if count == 1:
        return [startup + span / 2]
    return [0.0] + [startup + span * i / (count - 1) for i in range(count - 1)]


def plan(command: str, cache: str, count: int, calibration: Calibration,
         offset: float | None = None) -> list[Run]:  # fmt: skip
    """`count` runs at delays(), SIGINT and SIGTERM alternating; every third
    run sends the other signal too, 20 ms later."""
    runs = []
    spread = delays(count, calibration.startup, calibration.seconds, offset)
    for i, delay in enumerate(spread):
        first = signal.SIGINT if i % 2 == 0 else signal.SIGTERM
        other = signal.SIGTERM if first == signal.SIGINT else signal.SIGINT
        signals = [first, other] if i % 3 == 2 else [first]
        runs.append(Run(command, cache, delay, [int(s) for s in signals]))
    return runs


def shares(total: int, names: Sequence[str]) -> dict[str, int]:
    """`total` runs over the commands, as evenly as it goes (at least one each)."""
    base, extra = divmod(total, len(names))
    return {n: max(1, base + (i < extra)) for i, n in enumerate(names)}


def sweep(cache: str, total: int, commands: Sequence[str], *, verbose: bool, group: bool,
          timeout: float | None) -> list[Run]:  # fmt: skip
    warm_dir: Path | None = None
    if cache == "warm":
        warm_dir = Path(tempfile.mkdtemp(prefix="kvmcpuid-sweep-cache-"))
    runs: list[Run] = []

    def one(run: Run, calibration: Calibration) -> None:
        place = Place(warm_dir)
        try:
            bound = timeout or max(60.0, 10 * calibration.seconds)
            interrupt(run, place, calibration, bound, group)
        finally:
            place.remove()
        if verbose or run.verdict == "dirty":
            print(run.line(), flush=True)
        runs.append(run)

    def sent() -> int:
        return sum(len(r.sent) for r in runs)

    try:
        counts = shares(total, commands)
        calibrations: dict[str, Calibration] = {}
        for command, count in counts.items():
            calibrations[command] = calibration = measure(command, warm_dir)
            if verbose:
                print(f"{cache} {command}: {calibration.seconds:.3f} s uninterrupted "
                      f"(handlers at {calibration.startup * 1000:.1f} ms), "
                      f"exit {calibration.status}", flush=True)  # fmt: skip
            for run in plan(command, cache, count, calibration):
                one(run, calibration)
        # Runs that ended before their signal sent none: more, between the
        # delays already tried, until `total` signals reached a running tool.
        for offset in TOP_UP:
            for command, count in counts.items():
                for run in plan(command, cache, count, calibrations[command], offset):
                    if sent() >= total:
                        return runs
                    one(run, calibrations[command])
    finally:
        if warm_dir is not None:
            leftover = _half_written(warm_dir)
            if leftover:
                print(f"warm cache: {leftover}", flush=True)
            shutil.rmtree(warm_dir, ignore_errors=True)
    return runs


def summary(cache: str, runs: list[Run]) -> dict[str, Any]:
    verdicts = Counter(r.verdict for r in runs)
    by_signal = Counter(signal.Signals(r.sent[0]).name for r in runs
                        if r.verdict == "clean")  # fmt: skip
    return {
        "cache": cache,
        "runs": len(runs),
        "signals": sum(len(r.sent) for r in runs),
        "clean": verdicts["clean"],
        "clean_by_first_signal": dict(by_signal),
        "finished": verdicts["finished"],
        "start_up": verdicts["start-up"],
        "dirty": verdicts["dirty"],
        "dirty_runs": [r.line() for r in runs if r.verdict == "dirty"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signals", type=int, default=60,
                        help="signals that reach a running tool, at least, per cache mode "
                        "(default 60)")
    parser.add_argument("--quick", action="store_true",
                        help=f"--signals 12, of {', '.join(QUICK)} (unless --commands)")
    parser.add_argument("--cache", choices=("cold", "warm", "both"), default="both")
    parser.add_argument("--commands", nargs="+", choices=tuple(COMMANDS),
                        help="default: every command")
    parser.add_argument("--group", action="store_true",
                        help="signal the tool's process group (as a terminal's Ctrl-C does), "
                        "not the tool alone")
    parser.add_argument("--timeout", type=float, help="per run (default 10x its duration, >= 60 s)")
    parser.add_argument("--json", metavar="FILE", help="write the summary as JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per run")
    args = parser.parse_args(argv)  # fmt: skip
    total = 12 if args.quick else args.signals
    commands = args.commands or (list(QUICK) if args.quick else list(COMMANDS))
    caches = ("cold", "warm") if args.cache == "both" else (args.cache,)
    results = []
    for cache in caches:
        runs = sweep(cache, total, commands, verbose=args.verbose, group=args.group,
                     timeout=args.timeout)  # fmt: skip
        result = summary(cache, runs)
        results.append(result)
        print(f"{cache}: {result['runs']} runs, {result['signals']} signals: "
              f"{result['clean']} clean {result['clean_by_first_signal']}, "
              f"{result['finished']} finished before the signal, "
              f"{result['start_up']} during Python's start-up, {result['dirty']} dirty",
              flush=True)  # fmt: skip
        for line in result["dirty_runs"]:
            print(f"  dirty: {line}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 1 if any(r["dirty"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
