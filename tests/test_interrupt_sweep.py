"""scripts/interrupt_sweep.py: its verdicts and its leftover checks see what
they must (a sweep that cannot see dirt proves nothing), and a small sweep
of real commands on this machine is clean."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "interrupt_sweep.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("interrupt_sweep", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["interrupt_sweep"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


sweep = _load()

NOTES = ["kvmcpuid libvirt-xml: note: a", "kvmcpuid libvirt-xml: note: b"]
CALIBRATION = sweep.Calibration(1.0, 0, NOTES, 0.05)
INT, TERM = int(signal.SIGINT), int(signal.SIGTERM)


def _judged(sent: list[int], status: int, stderr: str, installed: bool | None = True) -> Any:
    run = sweep.Run("libvirt-xml", "cold", 0.5, sent, sent=list(sent),
                    handler_installed=installed, status=status, stderr=stderr)  # fmt: skip
    sweep.judge(run, CALIBRATION)
    return run


@pytest.mark.parametrize(
    ("sent", "status", "stderr", "installed", "verdict"),
    [
        ([INT], 130, "kvmcpuid: interrupted\n", True, "clean"),
        ([TERM], 143, "kvmcpuid: terminated\n", True, "clean"),
        # the notes an uninterrupted run prints may come first
        ([TERM], 143, NOTES[0] + "\nkvmcpuid: terminated\n", True, "clean"),
        ([INT, TERM], 130, "kvmcpuid: interrupted\n", True, "clean"),
        ([INT], 0, "\n".join(NOTES) + "\n", True, "finished"),
        ([INT], -2, "", False, "start-up"),
        ([INT], 1, "Fatal Python error: init_import_site\nKeyboardInterrupt\n", False, "start-up"),
        ([TERM], -15, "", False, "start-up"),
        # dirty:
        ([INT], 130, "Task exception was never retrieved\nkvmcpuid: interrupted\n", True, "dirty"),
        ([INT], 130, "Exception ignored in: <...>\nkvmcpuid: interrupted\n", True, "dirty"),
        ([INT], 130, "kvmcpuid: oops\nkvmcpuid: interrupted\n", True, "dirty"),  # two lines
        ([INT], 130, "kvmcpuid: interrupted\nkvmcpuid: interrupted\n", True, "dirty"),
        ([INT], 143, "kvmcpuid: terminated\n", True, "dirty"),  # not the signal sent
        ([INT], 130, "Traceback (most recent call last):\n", True, "dirty"),
        ([TERM], -15, "", True, "dirty"),  # killed although the handler existed
        ([INT], 0, "kvmcpuid: interrupted\n", True, "dirty"),
        ([INT], 2, "kvmcpuid: QEMU exited\n", True, "dirty"),
    ],
)
def test_verdicts(sent: list[int], status: int, stderr: str, installed: bool, verdict: str) -> None:
    run = _judged(sent, status, stderr, installed)
    assert ("dirty" if run.reasons else run.verdict) == verdict, (run.verdict, run.reasons)


def test_plan_spreads_both_signals_over_the_run() -> None:
    runs = sweep.plan("verify", "cold", 10, sweep.Calibration(2.0, 0, [], 0.05))
    assert runs[0].delay == 0.0
    assert all(0.05 <= r.delay < 2.0 for r in runs[1:])
    assert sorted(r.delay for r in runs) == [r.delay for r in runs]
    assert {r.signals[0] for r in runs} == {INT, TERM}
    assert [len(r.signals) for r in runs] == [1, 1, 2] * 3 + [1]
    assert sum(sweep.shares(60, list(sweep.COMMANDS)).values()) == 60
    between = sweep.plan("verify", "cold", 10, sweep.Calibration(2.0, 0, [], 0.05), 0.5)
    assert all(0.05 < r.delay < 2.0 for r in between)
    assert not {r.delay for r in between} & {r.delay for r in runs}


def test_half_written_files_are_found(tmp_path: Path) -> None:
    cache = tmp_path / "kvmcpuid_virt"
    (cache / "memo").mkdir(parents=True)
    (cache / "qemu-x.json").write_text('{"ok": 1}')
    (cache / "memo" / "k1").write_text("out\0err")
    assert sweep._half_written(tmp_path) == []
    (cache / ".qemu-x.json.123.abcd").write_text("{")
    (cache / "cpu_map.json").write_text('{"models": [')
    (cache / "memo" / "k2").write_text("half of the out")
    assert len(sweep._half_written(tmp_path)) == 3


def test_a_process_of_the_run_is_found(tmp_path: Path) -> None:
    place = sweep.Place(None)
    try:
        child = subprocess.Popen(["sleep", "30"], env=place.env())
        try:
            found = [pid for pid, _ in sweep._processes(place)]
            # Only another process killing our `sleep` can end it this early.
            assert found == [child.pid], f"found {found}, child exit status {child.poll()}"
        finally:
            child.kill()
            child.wait()
        assert list(sweep._processes(place)) == []
        (place.tmp / "kvmcpuid-probe-left").mkdir()
        assert sweep.leftovers(place, time.time()) == ["left in TMPDIR: kvmcpuid-probe-left"]
    finally:
        place.remove()


def test_small_sweep_is_clean(
    kvm: object, qemu_binary: str, libvirt_conn_uri: str, tmp_path: Path
) -> None:
    """12 runs with a cold cache and 12 with a warm one, of the commands that
    talk to QEMU and libvirt (verify on every backend, verify --backend
    qemu, qemu-flags): SIGINT, SIGTERM and both, from 0 ms to the end."""
    report = tmp_path / "sweep.json"
    env = {k: v for k, v in os.environ.items() if k != "XDG_CACHE_HOME"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(report)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(report.read_text())
    assert [r["cache"] for r in results] == ["cold", "warm"]
    for r in results:
        assert r["signals"] >= 12 and r["dirty"] == 0, r
        assert r["clean"] + r["finished"] + r["start_up"] == r["runs"]
        assert r["clean"] >= 1, r  # signals did land inside the work
