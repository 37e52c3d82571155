"""kvmcpuid_virt.qmp against the real qemu-system-x86_64: answers, errors that
name their cause, and no QEMU left behind (each QEMU is started with a
unique -name and looked for in /proc afterwards)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmcpuid_virt.errors import ToolError
from kvmcpuid_virt.qmp import monitor, run_commands
from tests.conftest import REPO

pytestmark = pytest.mark.qemu


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
