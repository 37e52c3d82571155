"""What this machine can give a guest, as analysis.compat judges it: the live
KVM table, this machine's QEMU facts, and the host-control probe's cached
result (which bits KVM_SET_CPUID2 does not decide here). Never probes and,
with `cached_only`, never starts QEMU either: the libvirt hook reads
everything from caches and /dev/kvm.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

from kvmcpuid_virt.analysis.compat import Control, Host
from kvmcpuid_virt.cpuid.formats import Dump
from kvmcpuid_virt.cpuid.table import CpuidTable, Register
from kvmcpuid_virt.kvm.system import Kvm
from kvmcpuid_virt.probe.hostcontrol import FORCED, HostControl, cache_dir, fingerprint
from kvmcpuid_virt.toolfacts.facts import ToolFacts

__all__ = ["cached_control", "control_of", "host_of", "live_table"]

log = logging.getLogger(__name__)

Word = tuple[int, int, Register]


def live_table() -> CpuidTable:
    with Kvm() as kvm:
        return kvm.supported_cpuid()


def control_of(hc: HostControl) -> Control:
    """compat's view of a HostControl: the uncontrolled bits, and of those
    the ones the probe saw forced to 1 or 0 (its reason reads
    "forced to host value (V...": hostcontrol's FORCED)."""
    on: dict[Word, int] = {}
    off: dict[Word, int] = {}
    for (leaf, sub, reg, bit), why in hc.reasons.items():
        if why.startswith(f"{FORCED} (1"):
            on[(leaf, sub, reg)] = on.get((leaf, sub, reg), 0) | 1 << bit
        elif why.startswith(f"{FORCED} (0"):
            off[(leaf, sub, reg)] = off.get((leaf, sub, reg), 0) | 1 << bit
    return Control(uncontrolled=dict(hc.uncontrolled()), forced_on=on, forced_off=off,
                   reasons=dict(hc.reasons))  # fmt: skip


def cached_control(table: CpuidTable) -> Control | None:
    """The host-control probe's cached result for this host as `table`
    shows it (probe/hostcontrol caches it as hostcontrol-KEY.json, KEY from
    its fingerprint), or None when it has not run here: no probe is started."""
    fp = fingerprint(table)
    key = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"hostcontrol-{key}.json")
    try:
        with open(path, encoding="utf-8") as f:
            hc = HostControl.from_json(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        log.warning("ignoring unreadable host-control cache %s: %s", path, exc)
        return None
    return control_of(hc) if hc.fingerprint == fp else None


def host_of(dump: Dump, facts: ToolFacts | None, *, this_host: bool) -> Host:
    """The Host compat judges: this machine's QEMU (`facts`) and host
    control speak only for this machine's own KVM table."""
    if not this_host:
        return Host(dump)
    return Host(dump, qemu=facts.qemu if facts else None, this_host=True,
                control=cached_control(dump.table))  # fmt: skip
