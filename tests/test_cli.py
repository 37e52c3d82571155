"""The one error handling of `kvmcpuid` and `kvmcpuid-qemu-flags`
(cli.main): one-line errors under the right name, SIGINT and SIGTERM (one
line, 130 / 143, cleanup not cut short, a second signal changing nothing,
leftovers finished), and a reader that leaves the pipe early."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvmcpuid_virt import cli
from kvmcpuid_virt.commands import qemu_flags
from kvmcpuid_virt.errors import InputError
from tests.conftest import cpu_dump_paths

REPO = Path(__file__).resolve().parent.parent

# What the console scripts run (pyproject.toml [project.scripts]), spelled so
# that they work without the scripts installed.
COMMANDS = {
    "kvmcpuid-qemu-flags": [
        "-c", "import sys; from kvmcpuid_virt.commands.qemu_flags import main; sys.exit(main())",
    ],
    "kvmcpuid qemu-flags": [
        "-c", "import sys; from kvmcpuid_virt.cli import main; sys.exit(main())", "qemu-flags",
    ],
}  # fmt: skip


def _dump() -> Path:
    dumps = cpu_dump_paths()
    if not dumps:
        pytest.skip("no CPU dumps (set KVMCPUID_DATA)")
    return dumps[0]


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("command", COMMANDS)
def test_reader_gone_is_quiet(command: str, buffered: bool, tmp_path: Path) -> None:
    """`kvmcpuid-qemu-flags | head -c0`: the reader is gone before anything
    is written. The read end is closed before the command starts, so every
    write fails with EPIPE (`| head -c0` itself would race with head's exit).
    Buffered (a pipe's default) the failure comes at the last flush;
    unbuffered (PYTHONUNBUFFERED) at the write itself."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    env["XDG_CACHE_HOME"] = str(tmp_path)  # a cold memo: the real work
    try:
        proc = subprocess.run(
            [sys.executable, *COMMANDS[command], "--from", str(_dump())],
            stdout=write_end, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
            timeout=120, check=False,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "BrokenPipeError" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr


def _fail(args: object) -> int:
    raise InputError("first line\n  second line\twith a tab\n")


@pytest.mark.parametrize(
    ("main", "prog"),
    [
        (lambda: qemu_flags.main([]), "kvmcpuid-qemu-flags"),
        (lambda: cli.main(["qemu-flags"]), "kvmcpuid"),
    ],
    ids=["kvmcpuid-qemu-flags", "kvmcpuid"],
)
def test_multi_line_error_is_one_line(
    main: object, prog: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(qemu_flags, "run", _fail)
    assert callable(main)
    assert main() == cli.EXIT_ERROR
    assert capsys.readouterr().err == f"{prog}: first line second line with a tab\n"


def test_interrupt(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(qemu_flags, "run", interrupted)
    assert qemu_flags.main([]) == cli.EXIT_INTERRUPTED
    assert capsys.readouterr().err == "kvmcpuid-qemu-flags: interrupted\n"


def test_termination(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def terminated(args: object) -> int:
        raise cli.Terminated

    monkeypatch.setattr(qemu_flags, "run", terminated)
    assert cli.main(["qemu-flags"]) == cli.EXIT_TERMINATED
    assert capsys.readouterr().err == "kvmcpuid: terminated\n"


def test_a_caller_that_goes_on_gets_its_handlers_back(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def run(args: object) -> int:
        seen["int"] = signal.getsignal(signal.SIGINT)
        seen["term"] = signal.getsignal(signal.SIGTERM)
        return 0

    monkeypatch.setattr(qemu_flags, "run", run)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert cli.main(["qemu-flags"]) == 0
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert seen["int"] is not before[0] and seen["term"] is not before[1]  # cli's, meanwhile


# --- signals, in a real process ----------------------------------------------------
#
# `kvmcpuid dump` with its run() replaced by `body`: the child says where it
# is on stdout, the test sends its signals at those points (no sleeps to
# guess at), then reads the exit status, stderr and the rest of stdout.

_CHILD = """\
import os, sys, time
from kvmcpuid_virt import cli
from kvmcpuid_virt.commands import dump

def say(word):
    print(word, flush=True)

def run(args):
{body}

dump.run = run
sys.argv = ["kvmcpuid", "dump"]
sys.exit(cli.main())
"""


def _child(body: str) -> subprocess.Popen[str]:
    code = _CHILD.format(body=textwrap.indent(textwrap.dedent(body), "    "))
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)  # fmt: skip


def _until(child: subprocess.Popen[str], word: str) -> None:
    assert child.stdout is not None
    line = child.stdout.readline().strip()
    assert line == word, (line, child.stderr.read() if child.stderr else "")


def _end(child: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
        child.wait()
    return child.returncode, out, err


@pytest.mark.parametrize(
    ("first", "status", "line"),
    [(signal.SIGINT, 130, "kvmcpuid: interrupted"), (signal.SIGTERM, 143, "kvmcpuid: terminated")],
)
def test_signal_is_one_line_and_its_status(first: int, status: int, line: str) -> None:
    child = _child("""
        try:
            say("ready")
            time.sleep(60)
        finally:
            say("cleaned up")
    """)
    _until(child, "ready")
    child.send_signal(first)
    assert _end(child) == (status, "cleaned up\n", line + "\n")


def test_second_signal_during_cleanup_changes_nothing() -> None:
    child = _child("""
        try:
            say("ready")
            time.sleep(60)
        finally:
            say("cleaning")
            end = time.monotonic() + 0.5
            while time.monotonic() < end:  # bytecode all along: handlers get to run
                pass
            say("cleaned up")
    """)
    _until(child, "ready")
    child.send_signal(signal.SIGINT)
    _until(child, "cleaning")
    child.send_signal(signal.SIGTERM)
    child.send_signal(signal.SIGINT)
    assert _end(child) == (130, "cleaned up\n", "kvmcpuid: interrupted\n")


def test_signal_in_a_deferred_section_comes_at_its_end() -> None:
    child = _child("""
        from kvmcpuid_virt.process import signals_deferred
        with signals_deferred():
            say("in")
            end = time.monotonic() + 0.5
            while time.monotonic() < end:
                pass
            say("section done")
        say("not reached")
    """)
    _until(child, "in")
    child.send_signal(signal.SIGTERM)
    assert _end(child) == (143, "section done\n", "kvmcpuid: terminated\n")


@pytest.mark.parametrize("then", ["work goes on", "work ends"])
def test_signal_in_a_finalizer_is_raised_after_it(then: str) -> None:
    """An exception raised in __del__ would be printed and lost: it is raised
    once the finalizer has returned, or, if the work ends first, the
    command still ends as interrupted."""
    more = """
        end = time.monotonic() + 1
        while time.monotonic() < end:
            pass
    """ if then == "work goes on" else ""
    child = _child("""
        class Slow:
            def __del__(self):
                say("in __del__")
                end = time.monotonic() + 0.5
                while time.monotonic() < end:
                    pass
                say("__del__ done")
        Slow()
    """.rstrip(" ") + more.lstrip("\n").rstrip(" ") + """
        say("work done")
    """)
    _until(child, "in __del__")
    child.send_signal(signal.SIGINT)
    status, out, err = _end(child)
    assert (status, err) == (130, "kvmcpuid: interrupted\n")
    if then == "work goes on":
        assert out == "__del__ done\n"
    else:
        assert out in ("__del__ done\n", "__del__ done\nwork done\n")


def test_signals_after_the_work_change_nothing() -> None:
    """Once main() is done the program ignores them, through the
    interpreter's shutdown (which would put SIG_DFL back for a handler)."""
    child = _child("""
        import atexit
        def last():
            say("exiting")
            time.sleep(0.5)
            say("exited")
        atexit.register(last)
        say("done")
        return 0
    """)
    _until(child, "done")
    _until(child, "exiting")
    child.send_signal(signal.SIGTERM)
    child.send_signal(signal.SIGINT)
    assert _end(child) == (0, "exited\n", "")


def test_what_a_cut_short_cleanup_left_is_finished(tmp_path: Path) -> None:
    """A directory and a child whose cleanup a signal skipped (simulated:
    entered and never left) are removed and reaped on the way out."""
    child = _child(f"""
        from kvmcpuid_virt.process import private_tempdir, start
        os.environ["TMPDIR"] = {str(tmp_path)!r}
        import tempfile; tempfile.tempdir = None
        held = private_tempdir()  # kept: a collected generator would clean up
        directory = held.__enter__()
        sleeper = start(["sleep", "60"])
        say(str(directory))
        say(str(sleeper.pid))
        time.sleep(60)
    """)
    assert child.stdout is not None
    directory = Path(child.stdout.readline().strip())
    pid = int(child.stdout.readline().strip())
    assert directory.is_dir() and directory.parent == tmp_path
    child.send_signal(signal.SIGINT)
    assert _end(child) == (130, "", "kvmcpuid: interrupted\n")
    assert not directory.exists()
    assert not Path(f"/proc/{pid}").exists()  # killed and reaped by the tool, not by init


def test_usage_errors_name_the_script(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        qemu_flags.main(["--format", "bogus"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: kvmcpuid-qemu-flags ")
    assert "\nkvmcpuid-qemu-flags: error: argument --format" in err


def test_console_script_entry_point_is_kept() -> None:
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["kvmcpuid-qemu-flags"] == "kvmcpuid_virt.commands.qemu_flags:main"
    assert scripts["kvmcpuid"] == "kvmcpuid_virt.cli:main"


def test_dump_path_imports_stay_light(kvm: object, tmp_path: Path) -> None:
    # Issue 2's start-up budget: `kvmcpuid dump` must not pay for lxml,
    # libvirt, ctypes (the CPUID buffer is struct-packed), typing or logging.
    out_file = tmp_path / "host.json"
    code = (
        "import sys; from kvmcpuid_virt.cli import main; rc = main(['dump', '-o', sys.argv[1]]); "
        "print(rc, [n for n in ('lxml', 'libvirt', 'ctypes', 'typing', 'logging') "
        "if n in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(out_file)], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "0 []"
    assert out_file.read_text().startswith("{")


def test_allow_unsupported_warns_once_naming_every_dropped_feature() -> None:
    # Broadwell-U (Core i7-5600U) lacks AVX-512F (CPUID.7.0:EBX[16]) and
    # SHA (CPUID.7.0:EBX[29]) in its dump: both are dropped, in one line.
    dump = next((p for p in cpu_dump_paths() if "Core-i7-5600U" in p.name), None)
    if dump is None:
        pytest.skip("no Core i7-5600U dump")
    r = subprocess.run(
        [sys.executable, "-m", "kvmcpuid_virt.cli", "qemu-flags", "--from", str(dump),
         "--enable", "avx512f", "--enable", "sha-ni", "--allow-unsupported"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    dropped = [line for line in r.stderr.splitlines() if "dropped" in line]
    assert len(dropped) == 1 and "avx512f" in dropped[0] and "sha-ni" in dropped[0]
    assert "avx512f=off" in r.stdout and "sha-ni=off" in r.stdout


def test_an_emulated_dump_is_refused_as_a_supported_table(kvm: object, tmp_path: Path) -> None:
    emulated = tmp_path / "emulated.json"
    assert cli.main(["dump", "--emulated", "-o", str(emulated)]) == 0
    r = subprocess.run([sys.executable, "-m", "kvmcpuid_virt.cli", "qemu-flags", "--from",
                        str(emulated)], capture_output=True, text=True, check=False)  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "KVM_GET_EMULATED_CPUID" in r.stderr and r.stdout == ""
