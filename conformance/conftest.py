"""The conformance suite: does this KVM host (its kernel, QEMU and libvirt)
give guests exactly the CPUID they were configured with? Parts whose
prerequisite is missing skip with one clear reason each."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from kvmcpuid_virt.kvm import Kvm


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm: the KVM API checks need a KVM host")
    with Kvm() as k:
        yield k
