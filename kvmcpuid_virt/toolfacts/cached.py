"""The ToolFacts toolfacts.learn cached, read without ever starting QEMU:
for callers on a budget that must not start processes (the libvirt hook runs
on every domain start).

learn.py caches a QEMU binary's facts as `qemu-{qemu_key(binary)}.json` in
fsutil.cache_dir(); the key covers the binary (path, mtime, size), the
kernel and boot, and whether KVM is usable. When that file is missing (a
kernel or QEMU upgrade, a reboot, nobody ran the tool yet) the facts are
stale: `cached_facts` then returns facts without QEMU (the registry view with
libvirt's cpu_map) and says why, and any command that learns the facts
(`kvmcpuid hook install`, `kvmcpuid libvirt-xml`, ...) refreshes them.
The feature-MSR facts come from learn.learn_msrs: its cache, else its vCPU
trial (/dev/kvm only, ~1.3 ms; never QEMU).
"""

from __future__ import annotations

import dataclasses
import json
import os

from kvmcpuid_virt.errors import ToolError
from kvmcpuid_virt.fsutil import cache_dir
from kvmcpuid_virt.toolfacts.facts import FORMAT_VERSION, QemuFacts, ToolFacts
from kvmcpuid_virt.toolfacts.learn import (
    CPU_MAP_DIR,
    cpu_map_models,
    find_qemu,
    learn_msrs,
    libvirt_uri,
    msr_features,
    qemu_key,
)

__all__ = ["CachedFacts", "cached_facts", "qemu_cache_path"]


@dataclasses.dataclass(frozen=True)
class CachedFacts:
    """The facts, and why they lack QEMU's part when they do (None: fresh)."""

    facts: ToolFacts
    stale: str | None


def qemu_cache_path(binary: str) -> str:
    """Where learn.learn_qemu caches `binary`'s facts on this kernel and boot."""
    return os.path.join(cache_dir(), f"qemu-{qemu_key(binary)}.json")


def _read_qemu(binary: str) -> QemuFacts | str:
    """The cached QemuFacts of `binary`, or why there are none."""
    try:
        key = qemu_key(binary)
    except ToolError as exc:
        return str(exc)
    path = os.path.join(cache_dir(), f"qemu-{key}.json")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return (f"no cached QEMU facts for {binary} on this kernel and boot ({path}): "
                "QEMU, the kernel or the boot changed since they were learned")  # fmt: skip
    except (OSError, ValueError, RecursionError) as exc:
        return f"unreadable QEMU facts cache {path}: {exc}"
    if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION or doc.get("key") != key:
        return f"QEMU facts cache {path} is of another version or key"
    try:
        facts = QemuFacts.from_json(doc["facts"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return f"damaged QEMU facts cache {path}: {exc!r}"
    if facts.binary != binary:
        return f"QEMU facts cache {path} is for {facts.binary}, not {binary}"
    return facts


def cached_facts(qemu: str | None = None, cpu_map: str = CPU_MAP_DIR) -> CachedFacts:
    """This machine's ToolFacts from the caches only: QEMU's part when
    learn.py cached it for `qemu` (default find_qemu()) on this kernel and
    boot, else none (with the reason in `stale`); libvirt's cpu_map (its own
    cache, else read from the files: no process either way)."""
    binary = qemu or find_qemu()
    found: QemuFacts | str = (
        "qemu-system-x86_64 not found" if binary is None else _read_qemu(binary)
    )  # fmt: skip
    models = cpu_map_models(cpu_map)
    msr = msr_features(cpu_map) if models else frozenset()
    host_msrs, delivery = learn_msrs()
    if isinstance(found, str):
        facts = ToolFacts(qemu=None, cpu_map=models, msr_features=msr,
                          libvirt_uri=libvirt_uri(), qemu_missing=found,
                          host_msrs=host_msrs, msr_delivery=delivery)  # fmt: skip
        return CachedFacts(facts, found)
    if delivery is not None and found.accel == "kvm":
        found = dataclasses.replace(found, undeliverable=delivery.cpuid_notes())
    facts = ToolFacts(qemu=found, cpu_map=models, msr_features=msr, libvirt_uri=libvirt_uri(),
                      host_msrs=host_msrs, msr_delivery=delivery)  # fmt: skip
    return CachedFacts(facts, None)
