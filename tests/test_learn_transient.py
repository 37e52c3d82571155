"""toolfacts.learn through qmp's one client path: a QEMU that fails
transiently every time gives no facts, and nothing is cached as its answer;
the feature-MSR facts come from a vCPU, never from a QEMU start."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvmcpuid_virt.qmp import TransientError
from kvmcpuid_virt.toolfacts.learn import learn_qemu


def test_qemu_killed_every_time_simulated_is_not_cached(
    qemu_binary: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wrapper SIGKILLs every QEMU it starts: the OOM killer at the
    worst moment, which this machine cannot produce on demand."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("the model queries run under KVM here")
    script = tmp_path / "qemu-system-x86_64"
    script.write_text("#!/bin/sh\nkill -KILL $$\n")
    script.chmod(0o755)
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    with pytest.raises(TransientError, match=r"status -9"):
        learn_qemu(str(script))
    assert not list(cache.rglob("qemu-*.json"))
    # The same binary without the simulated kill: learned, and cached.
    script.write_text(f'#!/bin/sh\nexec "{qemu_binary}" "$@"\n')
    facts = learn_qemu(str(script))
    assert facts.expansions
    assert list(cache.rglob("qemu-*.json"))


def test_learn_finds_the_cpu_host_abort_without_starting_qemu_with_cpu(
    qemu_binary: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """learn() no longer trial-starts `-cpu host`: a wrapper that refuses any
    -cpu argument changes nothing, and what QEMU cannot be given here comes
    from the vCPU trial (ToolFacts.msr_delivery)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("needs /dev/kvm")
    from kvmcpuid_virt.toolfacts.learn import learn

    script = tmp_path / "qemu-system-x86_64"
    script.write_text("#!/bin/sh\n"
                      'for a in "$@"; do [ "$a" = -cpu ] && exit 99; done\n'
                      f'exec "{qemu_binary}" "$@"\n')  # fmt: skip
    script.chmod(0o755)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    facts = learn(str(script))
    assert facts.qemu is not None and facts.msr_delivery is not None
    assert facts.qemu.undeliverable == facts.undeliverable() == \
        facts.msr_delivery.cpuid_notes()  # fmt: skip
