"""The one error handling of `kvmcpuid` and `kvmcpuid-qemu-flags`
(cli._run): one-line errors under the right name, Ctrl-C, and a reader that
leaves the pipe early."""

from __future__ import annotations

import os
import subprocess
import sys
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
    assert r.stderr.count("\n") == 1 and "avx512f" in r.stderr and "sha-ni" in r.stderr
    assert "avx512f=off" in r.stdout and "sha-ni=off" in r.stdout


def test_an_emulated_dump_is_refused_as_a_supported_table(kvm: object, tmp_path: Path) -> None:
    emulated = tmp_path / "emulated.json"
    assert cli.main(["dump", "--emulated", "-o", str(emulated)]) == 0
    r = subprocess.run([sys.executable, "-m", "kvmcpuid_virt.cli", "qemu-flags", "--from",
                        str(emulated)], capture_output=True, text=True, check=False)  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "KVM_GET_EMULATED_CPUID" in r.stderr and r.stdout == ""
