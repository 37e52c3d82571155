"""kvmcpuid_virt.qmp against the real qemu-system-x86_64: answers, errors that
name their cause, no QEMU left behind (each QEMU is started with a unique
-name and looked for in /proc afterwards), interrupts that leave no asyncio
noise, and which failures are tried again (the transient ones only)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmcpuid_virt import qmp
from kvmcpuid_virt.errors import ToolError
from kvmcpuid_virt.process import start as real_start
from kvmcpuid_virt.qmp import TransientError, monitor, run_commands, transient_end
from tests.conftest import REPO

pytestmark = pytest.mark.qemu

# What qemu.qmp's legacy wrapper printed when a Ctrl-C landed in its loop,
# and anything else an interrupt must not print.
NOISE = ("Traceback", "Exception ignored", "Task exception", "Task was destroyed",
         "never retrieved", "Error", "Fatal")  # fmt: skip


def _running(marker: str) -> list[int]:
    """Pids of live (not zombie) processes whose command line holds `marker`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rpartition(b")")[2].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and state != b"Z":
            pids.append(int(entry))
    return pids


@pytest.fixture
def name() -> Iterator[tuple[str, ...]]:
    """`-name MARKER` for QEMU; after the test, no such process may exist."""
    marker = f"kvmcpuid-test-qmp-{uuid.uuid4().hex[:12]}"
    yield ("-name", marker)
    assert _running(marker) == []


def test_query_version_is_what_version_prints(qemu_binary: str, name: tuple[str, ...]) -> None:
    text = subprocess.run(
        [qemu_binary, "--version"], capture_output=True, text=True, check=True
    ).stdout
    m = re.search(r"version (\d+)\.(\d+)", text)
    assert m, text
    (reply,) = run_commands(qemu_binary, [{"execute": "query-version"}], extra=name)
    assert (reply["qemu"]["major"], reply["qemu"]["minor"]) == (int(m[1]), int(m[2]))


def test_commands_answer_in_order(qemu_binary: str, name: tuple[str, ...]) -> None:
    version, status = run_commands(
        qemu_binary, [{"execute": "query-version"}, {"execute": "query-status"}], extra=name
    )
    assert "qemu" in version
    assert "status" in status


def test_cpu_is_created_and_never_runs(qemu_binary: str, name: tuple[str, ...]) -> None:
    cpus, status = run_commands(
        qemu_binary,
        [{"execute": "query-cpus-fast"}, {"execute": "query-status"}],
        machine="pc",
        cpu="base",
        extra=("-m", "16", *name),
    )
    assert len(cpus) == 1
    assert status["running"] is False


def test_failing_command_is_a_tool_error_naming_it(qemu_binary: str, name: tuple[str, ...]) -> None:
    with pytest.raises(ToolError, match=r"qom-get failed: .*/no/such/object"):
        run_commands(
            qemu_binary,
            [
                {"execute": "query-version"},
                {"execute": "qom-get", "arguments": {"path": "/no/such/object", "property": "x"}},
            ],
            extra=name,
        )


def test_qemu_exiting_early_says_why(qemu_binary: str, name: tuple[str, ...]) -> None:
    start = time.monotonic()
    with pytest.raises(ToolError, match=r"exited with status \d+: .*no-such-feature"):
        run_commands(
            qemu_binary, [], machine="pc", cpu="base,no-such-feature=on", extra=("-m", "16", *name)
        )
    assert time.monotonic() - start < 5  # seen at once, not after the timeout


def test_missing_binary_is_a_tool_error(tmp_path: Path) -> None:
    missing = tmp_path / "qemu-system-x86_64"
    with pytest.raises(ToolError, match=f"cannot run {re.escape(str(missing))}"):
        run_commands(str(missing), [{"execute": "query-version"}])


def test_timeout_kills_qemu(qemu_binary: str, name: tuple[str, ...]) -> None:
    with (
        pytest.raises(ToolError, match=r"within 0\.5 s"),
        monitor(qemu_binary, extra=name, timeout=0.5) as qmp,
    ):
        time.sleep(1.0)
        qmp.cmd("query-version")


def test_error_in_the_block_still_ends_qemu(qemu_binary: str, name: tuple[str, ...]) -> None:
    with pytest.raises(KeyError), monitor(qemu_binary, extra=name) as qmp:
        qmp.cmd("query-version")
        assert len(_running(name[1])) == 1  # the check in `name` does see QEMU
        raise KeyError("the caller's own error")


@pytest.mark.parametrize("how", ["qmp-monitor", "qemu-probe"])
def test_qemu_dies_with_a_tool_killed_by_sigkill(
    qemu_binary: str, name: tuple[str, ...], how: str, tmp_path: Path
) -> None:
    """SIGKILL runs none of our cleanup. A QEMU paused for its monitor (or
    running a guest that never ends) must still not outlive the tool: it is
    started with the kernel's parent-death signal (probe.process.dies_with_us)."""
    marker = name[1]
    code = {
        "qmp-monitor": (
            "import sys\n"
            "from kvmcpuid_virt.qmp import monitor\n"
            f"with monitor({qemu_binary!r}, extra=({name[0]!r}, {marker!r}), timeout=60) as q:\n"
            "    print('ready', flush=True)\n"
            "    sys.stdin.read()\n"
        ),
        "qemu-probe": (
            "import sys, threading, time\n"
            "from kvmcpuid_virt.probe import image, qemu\n"
            "from tests.conftest import spin_image\n"
            "image.build = lambda queries: spin_image()\n"
            "real = qemu.qemu_argv\n"
            f"qemu.qemu_argv = lambda *a, **k: [*real(*a, **k), {name[0]!r}, {marker!r}]\n"
            "threading.Timer(1.0, lambda: print('ready', flush=True)).start()\n"
            f"qemu.run_qemu('host,arch-capabilities=off', [(0, 0)], 60, {qemu_binary!r})\n"
        ),
    }[how]
    # The killed tool cannot remove its temporary directory: keep it in ours.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    tool = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)  # fmt: skip
    try:
        assert tool.stdout is not None and tool.stdout.readline().strip() == "ready"
        assert _running(marker), "QEMU did not start"
    finally:
        tool.kill()
        tool.wait()
    deadline = time.monotonic() + 5
    while _running(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _running(marker) == []


# --- interrupts --------------------------------------------------------------------


@pytest.mark.parametrize("interrupt", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("after", [0.0, 0.013, 0.041, 0.097])
def test_interrupt_mid_conversation_is_quiet_and_ends_qemu(
    qemu_binary: str, name: tuple[str, ...], interrupt: str, after: float
) -> None:
    """A conversation that asks without end, interrupted at a few points of
    its commands: the interrupt reaches the caller as the exception its
    handler raises (KeyboardInterrupt; for SIGTERM a BaseException like cli's
    Terminated), nothing else is printed (no "Task exception was never
    retrieved", no "Exception ignored"), and QEMU is gone."""
    code = (
        "import signal, sys, time\n"
        "from kvmcpuid_virt.qmp import monitor\n"
        "class Terminated(BaseException): pass\n"
        "def term(signum, frame): raise Terminated\n"
        "signal.signal(signal.SIGTERM, term)\n"
        "try:\n"
        f"    with monitor({qemu_binary!r}, extra={name!r}) as q:\n"
        "        q.cmd('query-version')\n"
        "        print('ready', flush=True)\n"
        "        while True:\n"
        "            q.cmd('query-cpu-model-expansion', type='full', model={'name': 'max'})\n"
        "except (KeyboardInterrupt, Terminated) as exc:\n"
        "    print(type(exc).__name__, flush=True)\n"
    )
    tool = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)  # fmt: skip
    try:
        assert tool.stdout is not None and tool.stdout.readline().strip() == "ready"
        time.sleep(after)
        tool.send_signal(getattr(signal, interrupt))
        out, err = tool.communicate(timeout=30)
    finally:
        tool.kill()
        tool.wait()
    assert out.strip() == {"SIGINT": "KeyboardInterrupt", "SIGTERM": "Terminated"}[interrupt]
    assert not [word for word in NOISE if word in err], err
    assert err == ""
    assert tool.returncode == 0


# --- what is tried again ---------------------------------------------------------


@pytest.fixture
def starts(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The command line of every QEMU qmp starts (the real start())."""
    started: list[list[str]] = []

    def counting(argv: list[str], **popen: object) -> subprocess.Popen[bytes]:
        started.append(list(argv))
        return real_start(argv, **popen)

    monkeypatch.setattr(qmp, "start", counting)
    return started


def _wrapper(tmp_path: Path, qemu_binary: str, first_time: str, *, every_time: bool = False) -> str:
    """A QEMU binary that does `first_time` (shell) on its first start (or on
    every one) and is the real QEMU otherwise."""
    once = tmp_path / "started-once"
    script = tmp_path / "qemu-system-x86_64"
    condition = "true" if every_time else f'[ ! -e "{once}" ]'
    script.write_text(
        "#!/bin/bash\n"
        f'if {condition}; then touch "{once}"; {first_time}; fi\n'
        f'exec "{qemu_binary}" "$@"\n'
    )
    script.chmod(0o755)
    return str(script)


def test_qemu_killed_by_the_oom_killer_simulated_is_tried_again(
    qemu_binary: str, name: tuple[str, ...], tmp_path: Path, starts: list[list[str]]
) -> None:
    """The OOM killer's SIGKILL cannot be had on demand here; the wrapper
    kills its first QEMU with it before the monitor answers. That is
    transient: a second QEMU answers."""
    binary = _wrapper(tmp_path, qemu_binary, "kill -KILL $$")
    (reply,) = run_commands(binary, [{"execute": "query-version"}], extra=name)
    assert "qemu" in reply
    assert len(starts) == 2


def test_monitor_that_resets_with_qemu_running_simulated_is_tried_again(
    qemu_binary: str, name: tuple[str, ...], tmp_path: Path, starts: list[list[str]]
) -> None:
    """A monitor that breaks while QEMU runs on (this QEMU never does it):
    the wrapper closes the monitor's socket and stays, the first time."""
    close_monitor = (
        'for a in "$@"; do case "$a" in socket,id=qmp,fd=*) eval "exec ${a##*fd=}>&-";; '
        "esac; done; exec sleep 60"
    )
    binary = _wrapper(tmp_path, qemu_binary, close_monitor)
    assert run_commands(binary, [{"execute": "query-status"}], extra=name)
    assert len(starts) == 2


def test_transient_failure_every_time_gives_up_with_its_cause(
    qemu_binary: str, name: tuple[str, ...], tmp_path: Path, starts: list[list[str]]
) -> None:
    binary = _wrapper(tmp_path, qemu_binary, "kill -KILL $$", every_time=True)
    start = time.monotonic()
    attempts = rf"exited with status -9: .*\({qmp.ATTEMPTS} attempts\)"
    with pytest.raises(TransientError, match=attempts) as info:
        run_commands(binary, [{"execute": "query-version"}], extra=name)
    assert len(starts) == qmp.ATTEMPTS
    assert time.monotonic() - start < 10  # 0.1 + 0.2 s of pauses, not the timeout
    # The cause is kept: the last attempt's error, and what broke under it.
    last = info.value.__cause__
    assert isinstance(last, TransientError) and "status -9" in str(last)
    assert last.__cause__ is not None


@pytest.mark.parametrize(
    ("cpu", "why"),
    [("base,no-such-feature=on", "a bad -cpu"), ("host", "KVM refuses an MSR: abort")],
)
def test_deterministic_failure_is_not_tried_again(
    qemu_binary: str, name: tuple[str, ...], starts: list[list[str]], cpu: str, why: str
) -> None:
    try:
        run_commands(qemu_binary, [], machine="pc", cpu=cpu, accel="kvm",
                     extra=("-m", "16", *name))  # fmt: skip
    except ToolError as exc:
        assert not isinstance(exc, TransientError), exc
        assert "exited with status" in str(exc)
    else:
        assert why.startswith("KVM"), "a bad -cpu started"
        pytest.skip("-cpu host starts on this host")
    assert len(starts) == 1


def test_missing_binary_is_not_tried_again(tmp_path: Path, starts: list[list[str]]) -> None:
    with pytest.raises(ToolError) as info:
        run_commands(str(tmp_path / "qemu-system-x86_64"), [{"execute": "query-version"}])
    assert not isinstance(info.value, TransientError)
    assert isinstance(info.value.__cause__, FileNotFoundError)  # the cause is kept


def test_transient_end_names_outside_ends_and_short_resources() -> None:
    assert transient_end(-9, [])  # SIGKILL: the OOM killer
    assert transient_end(0, ["qemu-system-x86_64: terminating on signal 15 from pid 1"])
    assert transient_end(1, ["failed to initialize kvm: Cannot allocate memory"])
    assert transient_end(1, ["fork: Resource temporarily unavailable"])
    assert not transient_end(-6, ["error: failed to set MSR 0x10a to 0x69", "Assertion"])
    assert not transient_end(-11, [])  # QEMU's own crash
    assert not transient_end(1, ["can't apply global base-x86_64-cpu.no-such-feature=on"])
    assert not transient_end(1, ["Property 'x' not found"])


def test_a_step_interrupted_while_being_handed_over_leaves_no_coroutine_unawaited(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A signal that lands as the command is handed to the loop (inside
    call_soon_threadsafe: Python code, it can): no coroutine of it may be
    left never awaited on stderr (seen in a SIGTERM mid-conversation).
    Simulated: the hand-over raises KeyboardInterrupt as the signal handler
    would. No QEMU needed."""
    import gc
    import warnings

    from kvmcpuid_virt.process import Deadline

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    session = qmp.Session(Deadline(30))
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            monkeypatch.setattr(session._loop, "call_soon_threadsafe", interrupted)
            with pytest.raises(KeyboardInterrupt):
                session.cmd("query-version")
            monkeypatch.undo()
            gc.collect()
        unawaited = [str(w.message) for w in seen if "never awaited" in str(w.message)]
        assert unawaited == []
    finally:
        session.close()
