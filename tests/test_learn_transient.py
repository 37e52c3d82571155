"""toolfacts.learn through qmp's one client path: a QEMU that fails
transiently every time gives no facts, and nothing is cached as its answer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvmcpuid_virt.qmp import TransientError
from kvmcpuid_virt.toolfacts.learn import learn_qemu


def test_trial_start_killed_every_time_simulated_is_not_cached(
    qemu_binary: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wrapper SIGKILLs every QEMU started with -cpu (the trial start):
    the OOM killer at the worst moment, which this machine cannot produce on
    demand. The model queries (no -cpu) are the real QEMU's."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("the trial start runs under KVM only")
    script = tmp_path / "qemu-system-x86_64"
    script.write_text("#!/bin/sh\n"
                      'for a in "$@"; do [ "$a" = -cpu ] && kill -KILL $$; done\n'
                      f'exec "{qemu_binary}" "$@"\n')  # fmt: skip
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
