"""The pure core (cpuid/, config/, adapters/, analysis/, toolfacts.facts,
xmlutil) does no I/O at any depth. import-linter checks its imports
statically (`tox -e lint`); this test checks what it does at run time: every
kind of pure computation runs on real inputs in a child process under an
audit hook (PEP 578) that records any file opened outside the package, any
process, socket, ioctl, mmap or library load, and any import of a module that
talks to the machine. The inputs are read before the hook goes in."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import RECORDING, REPO

CHILD = r'''
import json, os, sys
dumps = [open(p, encoding="utf-8").read() for p in sys.argv[2:]]
recording = json.load(open(sys.argv[1], encoding="utf-8"))

from kvmcpuid_virt.adapters import libvirt as lv, qemu
from kvmcpuid_virt.analysis import baseline, compare, diff, given
from kvmcpuid_virt.config import build, host_model, max_model
from kvmcpuid_virt.cpuid import fields, formats
from kvmcpuid_virt.toolfacts.facts import ToolFacts

PKG = os.path.dirname(os.path.abspath(__import__("kvmcpuid_virt").__file__))
MACHINE = ("subprocess", "asyncio", "socket", "ctypes", "fcntl", "mmap", "qemu", "libvirt",
           "kvmcpuid_virt.kvm", "kvmcpuid_virt.probe", "kvmcpuid_virt.qmp",
           "kvmcpuid_virt.process", "kvmcpuid_virt.host", "kvmcpuid_virt.fsutil",
           "kvmcpuid_virt.toolfacts.learn", "kvmcpuid_virt.libvirt_caps")
seen = []
import importlib.machinery
MODULE_FILES = (*importlib.machinery.all_suffixes(), ".pyc")

def hook(event, args):
    if event == "open":
        path = args[0]
        if isinstance(path, int) or os.path.abspath(str(path)).startswith(PKG + os.sep):
            return  # an fd already open, or the package's own data
        if str(path).endswith(MODULE_FILES):
            return  # a module being loaded: the "import" event judges it
        seen.append(f"open {path}")
    elif event == "import":
        name = args[0]
        if any(name == m or name.startswith(m + ".") for m in MACHINE):
            seen.append(f"import {name}")
    elif event.split(".")[0] in ("subprocess", "socket", "fcntl", "mmap", "ctypes") or \
            event in ("os.system", "os.exec", "os.posix_spawn", "os.fork", "os.listdir",
                      "os.scandir", "os.kill", "os.remove", "os.rename", "os.mkdir"):
        seen.append(f"{event} {args[:1]!r}")

sys.addaudithook(hook)

facts = ToolFacts.from_json(recording)
tables = [formats.loads(text, f"dump{i}") for i, text in enumerate(dumps)]
amd = next(d for d in tables if fields.vendor(d.table) == "AuthenticAMD")
intel = next(d for d in tables if fields.vendor(d.table) == "GenuineIntel")
built = 0
for d in tables:
    for fmt in ("json", "cpudata", "cpuid"):
        formats.loads(formats.dumps(d, fmt), fmt)
    fields.caches(d.table), fields.xsave(d.table), fields.signature(d.table)
    for policy in (build.Policy(), build.Policy(model="auto"),
                   build.Policy(model="qemu64", allow_unsupported=True)):
        try:
            config = build.build(d.table, policy, facts=facts, source=d.source)
        except Exception as exc:  # a policy this CPU cannot meet: still pure
            continue
        built += 1
        capped, _ = max_model.limit_to_model(config, "Nehalem", facts)
        for fmt in ("arg", "argv", "json"):
            qemu.render(capped, fmt)
        model = lv.base_model(config, facts)
        cpu = lv.render(config, model)
        lv.patch_domain("<domain type='kvm'><name>x</name><memory>65536</memory></domain>",
                        config, model)
        given.applied(lv.parse(cpu), d.table, facts)
        given.load_operand("-cpu " + qemu.cpu_value(config), "flags", (d.table, "t", facts))
        compare.compare(config.expected, config.expected, backend="qemu",
                        supported=d.table)
result = baseline.baseline([amd, amd])
diff.render_table(diff.diff(amd, intel)), diff.render_json(diff.diff(amd, intel))
domcaps = ("<domainCapabilities><cpu><mode name='host-model' supported='yes'>"
           "<model fallback='forbid'>EPYC</model><vendor>AMD</vendor>"
           "<feature policy='require' name='mds-no'/></mode></cpu></domainCapabilities>")
host_model.host_model_dump(domcaps, "domcaps", facts)
print(json.dumps({"seen": seen, "built": built}))
'''


def test_pure_core_does_no_io(data_dir: Path) -> None:
    dumps = sorted(str(p) for p in data_dir.glob("*.xml"))
    if not dumps:
        pytest.skip(f"no CPU dumps in {data_dir}")
    r = subprocess.run([sys.executable, "-c", CHILD, str(RECORDING), *dumps],
                       capture_output=True, text=True, cwd=REPO, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["seen"] == []
    assert out["built"] >= len(dumps) * 2  # host and auto at least, for every CPU


def test_the_audit_hook_sees_io() -> None:
    """The check above can fail: the same hook, with a pure function that
    reads a file and starts a process, records both."""
    probe = CHILD.replace("facts = ToolFacts.from_json(recording)",
                          "open('/etc/hostname').close(); "
                          "subprocess = __import__('subprocess'); "
                          "subprocess.run(['true']); raise SystemExit(print(json.dumps(seen)))")
    r = subprocess.run([sys.executable, "-c", probe, str(RECORDING)], capture_output=True,
                       text=True, cwd=REPO, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert any(s.startswith("open /etc/hostname") for s in seen), seen
    assert any(s.startswith("import subprocess") for s in seen), seen
    assert any(s.startswith("subprocess.Popen") for s in seen), seen
