"""Shared fixtures: the real /dev/kvm, the real CPU dumps, and skips with one
clear reason each where this machine lacks a part."""

from __future__ import annotations

import functools
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmcpuid_virt.host import pinned
from kvmcpuid_virt.kvm import Kvm
from kvmcpuid_virt.toolfacts.facts import ToolFacts

# A suite started as a script's background job or under nohup inherits
# SIGINT ignored, and so would every tool a test interrupts with it (Python
# and cli.main keep an inherited ignore). A handler of our own is reset to
# the default at exec, so the tools under test get Ctrl-C as from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parent.parent
# Real CPU dumps, in the repository (tests/data/cpuid/README.md says whence);
# KVMCPUID_DATA points at another directory of them.
DATA = Path(os.environ.get("KVMCPUID_DATA") or REPO / "tests" / "data" / "cpuid")
# QEMU 7.2's and libvirt 9.0's cpu_map answers on a Debian 12 KVM host, as
# scripts/record_toolfacts.py recorded them: the tool facts of pure-code tests,
# which then need neither QEMU nor libvirt and are functions of their inputs.
RECORDING = REPO / "tests" / "data" / "toolfacts-qemu-7.2.json"


@functools.cache
def recorded_facts() -> ToolFacts:
    with open(RECORDING, encoding="utf-8") as f:
        return ToolFacts.from_json(json.load(f))


FACTS = recorded_facts()


def host_vendor() -> str:
    """This host's CPU vendor as /proc/cpuinfo reports it (independent of
    KVM and of the code under test)."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    pytest.skip("no vendor_id in /proc/cpuinfo")


def spin_image() -> bytes:
    """A probe image that never exits (`jmp $` at the entry), for timeouts."""
    from kvmcpuid_virt.probe import image

    a = image.Asm(org=0)
    a.label("spin")
    a.jmp_short("spin")
    return image.flat_image(a.assemble())


def cpu_dump_paths() -> list[Path]:
    """The real CPU dumps (libvirt <cpudata>) in DATA."""
    return sorted(DATA.glob("*.xml"))


def qmp_reply_path(xml: Path) -> Path:
    return xml.with_suffix(".json")


@pytest.fixture(scope="session", autouse=True)
def fresh_cache_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh $XDG_CACHE_HOME for the whole session, in os.environ so that the
    CLI subprocesses tests start inherit it: no test may pass or fail because
    of a cache an earlier run (or the user) left behind. Tests about caching
    set their own directory on top of this one."""
    path = tmp_path_factory.mktemp("xdg-cache")
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(path)
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"no CPU dump directory at {DATA} (set KVMCPUID_DATA)")
    return DATA


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this machine")
    with Kvm() as k:
        yield k


@pytest.fixture(scope="session")
def qemu_binary() -> str:
    # $KVMCPUID_QEMU first, as the package itself resolves it (learn.find_qemu).
    from kvmcpuid_virt.toolfacts.learn import find_qemu

    path = find_qemu()
    if path is None:
        pytest.skip("qemu-system-x86_64 is not installed (or set KVMCPUID_QEMU)")
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this machine (QEMU tests use -accel kvm)")
    return path


@pytest.fixture(scope="session")
def live_facts(qemu_binary: str) -> ToolFacts:
    """What this machine's QEMU and cpu_map say now (toolfacts.learn)."""
    from kvmcpuid_virt.toolfacts.learn import learn

    return learn(qemu_binary)


@pytest.fixture(scope="session")
def libvirt_conn_uri() -> str:
    """qemu:///system when a libvirtd answers there."""
    try:
        import libvirt
    except ImportError:
        pytest.skip("libvirt-python is not installed")
    uri = os.environ.get("KVMCPUID_LIBVIRT_URI", "qemu:///system")
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        pytest.skip(f"libvirtd does not answer at {uri}: {exc}")
    conn.close()
    return uri


@pytest.fixture
def pin_cpu0() -> Iterator[None]:
    """KVM_GET_SUPPORTED_CPUID answers for the CPU the thread runs on (APIC
    IDs differ); pin to one CPU so repeated reads are comparable."""
    with pinned():
        yield


# Fixtures that reach a part of the machine, and the marker each implies: a
# test that takes one is not a unit test, whatever its own marks say, so
# `-m "not kvm and not qemu and not libvirt"` is the unit subset.
_FIXTURE_MARKERS = {
    "kvm": "kvm", "pin_cpu0": "kvm", "qemu_binary": "qemu", "live_facts": "qemu",
    "libvirt_conn_uri": "libvirt", "cpu_map_bits": "libvirt",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture in getattr(item, "fixturenames", ()):
            marker = _FIXTURE_MARKERS.get(fixture)
            if marker is not None:
                item.add_marker(marker)
