"""A pytest plugin for a conformance run against a libvirtd that refuses
every domain with the cgroup BPF EAGAIN (simulated on the real daemon,
tests/simulated_libvirt.py): each guest is tried twice, then given up.
Loaded by tests/test_conformance_cli.py with `-p tests.plugin_refusing_libvirtd`."""

from __future__ import annotations

from typing import Any

import pytest

from kvmcpuid_virt.probe import libvirt as probe_libvirt
from kvmcpuid_virt.probe.retry import RetryPolicy
from tests.simulated_libvirt import Refusals, SimulatedRefusingDaemon

POLICY = RetryPolicy(attempts=2, base=0.01, cap=0.02)


def pytest_configure(config: pytest.Config) -> None:
    def refusing(uri: str, **kwargs: Any) -> SimulatedRefusingDaemon:
        return SimulatedRefusingDaemon(uri, Refusals(create=10**9), retry=POLICY, **kwargs)

    # conformance/backends.py looks LibvirtProbe up when it runs a batch.
    probe_libvirt.LibvirtProbe = refusing  # type: ignore[misc,assignment]
