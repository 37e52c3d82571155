"""toolfacts.learn reads its cache without qmp, logging, hashlib or the KVM
bindings (they cost ~15 ms of every command that renders a configuration),
and its stand-ins say what the real ones say: the accelerator rule and KVM's
device path as qmp and kvm.system have them, the digest as hashlib's."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

from kvmcpuid_virt import qmp
from kvmcpuid_virt.kvm import system
from kvmcpuid_virt.toolfacts import learn


def test_the_stand_ins_agree_with_the_modules_they_stand_for() -> None:
    assert learn.default_accel() == qmp.default_accel()
    assert learn._KVM_PATH == system.KVM_PATH
    data = b"kvmcpuid"
    assert learn._sha256(data) == hashlib.sha256(data).hexdigest()


def test_a_cached_learn_imports_none_of_them(qemu_binary: str) -> None:
    # Learned once (the cache filled), then learned again in a fresh process
    # with that cache: the heavy modules stay out.
    learn.learn(qemu_binary)
    code = (
        "import sys\n"
        "from kvmcpuid_virt.toolfacts.learn import learn\n"
        f"facts = learn({qemu_binary!r})\n"
        "assert facts.qemu is not None\n"
        "heavy = {'kvmcpuid_virt.qmp', 'logging', 'hashlib', 'kvmcpuid_virt.kvm.system',\n"
        "         'socket', 'subprocess'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ), check=True)  # fmt: skip
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
