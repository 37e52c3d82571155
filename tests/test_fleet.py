"""fleet.ask_all with simulated hosts (a callable standing in for the
libvirt question: this machine cannot make real daemons fail in each of
these ways on demand; tests/test_fleet_connect.py does it with real ones):
answers in the hosts' order, a bound on concurrency, failures one line each,
a hung host bounded by the timeout, --skip-unreachable, the progress bar
only on a terminal."""

from __future__ import annotations

import io
import threading
import time

import pytest

from kvmcpuid_virt.errors import ToolError
from kvmcpuid_virt.fleet import FleetError, ask_all


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _simulated(host: str) -> str:
    if host.startswith("refuses"):
        raise ToolError(f"{host}: Failed to connect socket: Connection refused")
    if host.startswith("buggy"):
        raise RuntimeError("something not ours")
    if host.startswith("hangs"):
        time.sleep(30)
    time.sleep(0.05)
    return host.upper()


def test_simulated_fleet_answers_in_order_at_most_limit_at_once() -> None:
    running = 0
    most = 0
    lock = threading.Lock()

    def ask(host: str) -> str:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return host * 2

    hosts = [f"h{i}" for i in range(20)]
    err = io.StringIO()
    assert ask_all(hosts, ask, prog="p", limit=4, stream=err) == [(h, h * 2) for h in hosts]
    assert most == 4
    assert err.getvalue() == ""  # not a terminal: nothing drawn


def test_simulated_failures_are_one_line_each_then_the_count() -> None:
    err = io.StringIO()
    hosts = ["ok1", "refuses1", "buggy1", "ok2"]
    with pytest.raises(FleetError) as info:
        ask_all(hosts, _simulated, prog="p", stream=err)
    assert err.getvalue().splitlines() == [
        "p: refuses1: Failed to connect socket: Connection refused",
        "p: buggy1: RuntimeError: something not ours",
    ]
    assert "2 of 4 hosts could not be asked: refuses1, buggy1" in str(info.value)
    assert "\n" not in str(info.value)


def test_simulated_single_failure_is_the_error_alone() -> None:
    err = io.StringIO()
    with pytest.raises(FleetError) as info:
        ask_all(["ok", "refuses"], _simulated, prog="p", stream=err)
    assert str(info.value) == "refuses: Failed to connect socket: Connection refused"
    assert err.getvalue() == ""


def test_simulated_hung_host_is_bounded_and_skippable() -> None:
    err = io.StringIO()
    start = time.monotonic()
    out = ask_all(["ok1", "hangs", "ok2"], _simulated, prog="p", skip_unreachable=True,
                  timeout=1.0, stream=err)  # fmt: skip
    assert time.monotonic() - start < 5
    assert out == [("ok1", "OK1"), ("ok2", "OK2")]
    assert err.getvalue().splitlines() == [
        "p: hangs: no answer within 1 s",
        "p: warning: left out 1 of 3 hosts (--skip-unreachable): hangs",
    ]


def test_simulated_progress_bar_on_a_terminal_only() -> None:
    tty = _Tty()
    ask_all(["a", "b", "c"], _simulated, prog="p", what="host-models", stream=tty)
    drawn = tty.getvalue()
    assert f"host-models [{'#' * 30}] 3/3" in drawn
    assert drawn.endswith("\r" + " " * 79 + "\r")  # erased when done
    one = _Tty()
    ask_all(["a"], _simulated, prog="p", stream=one)
    assert one.getvalue() == ""  # one host: no bar
