"""Learn the ToolFacts of this machine: ask the QEMU binary (QMP
query-version, query-cpu-definitions, query-cpu-model-expansion of `host` and
of every model), read libvirt's installed cpu_map, and ask a vCPU of this
host's KVM which feature-MSR values it accepts (kvm/msrs.msr_delivery: what
`-cpu host` would abort on, found without starting QEMU). The one place those
tools are asked; callers build the facts once, at the command boundary, and
pass them down.

The answers are cached as JSON in $XDG_CACHE_HOME/kvmcpuid_virt, keyed by
what they depend on: the QEMU binary's path, mtime and size plus the running
kernel and boot (its `host` expansion follows KVM), the cpu_map files'
names, mtimes and sizes, or the kernel and boot (the MSR trial). Cache files
are written atomically; a corrupt or foreign one is ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

from kvmcpuid_virt.cpuid.msr_features import MsrDelivery
from kvmcpuid_virt.cpuid.msr_values import FeatureMsrs
from kvmcpuid_virt.errors import InputError, KvmError, ToolError
from kvmcpuid_virt.fsutil import cache_dir, parse_xml_file, write_cache
from kvmcpuid_virt.host import boot_id
from kvmcpuid_virt.toolfacts.facts import (
    DEFAULT_LIBVIRT_URI,
    FORMAT_VERSION,
    QEMU_BINARY,
    CpuModel,
    ModelSource,
    QemuFacts,
    ToolFacts,
    msrs_from_json,
    msrs_to_json,
)

__all__ = [
    "CPU_MAP_DIR",
    "cpu_map_models",
    "find_qemu",
    "learn",
    "learn_msrs",
    "learn_qemu",
    "libvirt_uri",
    "msr_features",
]

TYPE_CHECKING = False  # the fast path's typing stand-in: docs/ARCHITECTURE.md, Start-up
if TYPE_CHECKING:
    from kvmcpuid_virt.qmp import Session

T = TypeVar("T")

# Where the answers are cached, these are read, not QEMU: qmp (socket,
# subprocess), logging, hashlib's OpenSSL and the KVM bindings are imported
# only where they are used (~15 ms of a command that reads the cache).
_KVM_PATH: Final = "/dev/kvm"  # kvm/system.KVM_PATH (tests/test_learn_lazy.py)


def _debug(msg: str, *args: object) -> None:
    import logging

    logging.getLogger(__name__).debug(msg, *args)


def converse(binary: str, talk: Callable[[Session], T], **kwargs: Any) -> T:
    """qmp.converse (a module attribute: tests replace it)."""
    from kvmcpuid_virt.qmp import converse as talk_to

    return talk_to(binary, talk, **kwargs)


def _sha256(data: bytes) -> str:
    # The builtin module: hashlib loads OpenSSL first (~3 ms); the same digest.
    try:
        from _sha256 import sha256  # type: ignore[import-not-found]
    except ImportError:
        from hashlib import sha256
    digest: str = sha256(data).hexdigest()
    return digest


def default_accel() -> str:
    """qmp.default_accel: kvm when /dev/kvm is usable by this process, else
    tcg (here without qmp's imports; tests/test_learn_lazy.py holds them equal)."""
    return "kvm" if os.access(_KVM_PATH, os.R_OK | os.W_OK) else "tcg"

CPU_MAP_DIR: Final = "/usr/share/libvirt/cpu_map"


def learn(
    qemu: str | None = None, cpu_map: str | Path = CPU_MAP_DIR, uri: str | None = None
) -> ToolFacts:
    """The facts of this machine's tools: the QEMU binary `qemu` (default
    find_qemu(); none when there is no QEMU: the facts then say why),
    libvirt's cpu_map at `cpu_map`, and the libvirt URI in use."""
    binary = qemu or find_qemu()
    qemu_facts: QemuFacts | None = None
    missing = f"{QEMU_BINARY} not found (install qemu-system-x86 or set KVMCPUID_QEMU)"
    if binary is not None:
        try:
            qemu_facts = learn_qemu(binary)
        except ToolError as exc:
            if qemu is not None:
                raise  # asked for by name: its failure is the answer
            _debug("no QEMU to ask: %s", exc)
            missing = str(exc)
    models, msr = _cpu_map(Path(cpu_map))
    host_msrs, delivery = learn_msrs()
    if qemu_facts is not None and delivery is not None and qemu_facts.accel == "kvm":
        # What QEMU cannot set up a vCPU with here, said by the vCPU trial.
        qemu_facts = dataclasses.replace(qemu_facts, undeliverable=delivery.cpuid_notes())
    return ToolFacts(qemu=qemu_facts, cpu_map=models, msr_features=msr,
                     libvirt_uri=uri or libvirt_uri(), qemu_missing=missing,
                     host_msrs=host_msrs, msr_delivery=delivery)  # fmt: skip


def libvirt_uri() -> str:
    """$KVMCPUID_LIBVIRT_URI, else qemu:///system."""
    return os.environ.get("KVMCPUID_LIBVIRT_URI") or DEFAULT_LIBVIRT_URI


def find_qemu() -> str | None:
    """$KVMCPUID_QEMU, else qemu-system-x86_64 on PATH."""
    explicit = os.environ.get("KVMCPUID_QEMU")
    if explicit:
        return explicit
    return shutil.which(QEMU_BINARY)


# --- cache ----------------------------------------------------------------------


def _read_cache(name: str, key: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(cache_dir(), name), encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError, RecursionError):
        # Missing, unreadable, corrupt, or nested deeper than json's C
        # recursion limit (a hostile or garbage file): recompute.
        return None
    if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION or doc.get("key") != key:
        return None
    return doc


def _write_cache(name: str, doc: dict[str, Any]) -> None:
    # Best effort: an unwritable cache must not break the tool, only slow it.
    write_cache(os.path.join(cache_dir(), name), json.dumps(doc, sort_keys=True))


def _digest(parts: Sequence[object]) -> str:
    return _sha256(repr(tuple(parts)).encode())[:32]


# --- QEMU -----------------------------------------------------------------------

def qemu_key(binary: str) -> str:
    """What QEMU's answers depend on: the binary, the kernel and boot, and
    whether KVM is usable here."""
    path = shutil.which(binary) or binary
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        raise ToolError(f"{binary}: not found") from None
    return _digest(
        (real, st.st_mtime_ns, st.st_size, os.uname().release, boot_id(), default_accel())
    )


def _ask_qemu(binary: str) -> QemuFacts:
    """One QEMU conversation (the version, the definitions, every expansion:
    ~0.3 s for QEMU 7.2's 132 models)."""
    accel = default_accel()

    def expansion(session: Session, name: str) -> Any:
        return session.cmd("query-cpu-model-expansion", type="full", model={"name": name})

    def talk(session: Session) -> tuple[Any, Any, Any, list[str], list[Any]]:
        version = session.cmd("query-version")
        defs = session.cmd("query-cpu-definitions")
        # `host` exists only under KVM; `max` names every property under TCG.
        host = expansion(session, "host" if accel == "kvm" else "max")
        names = sorted(
            str(d["name"]) for d in defs
            if isinstance(d, dict) and "name" in d and d["name"] not in ("host", "max")
        )  # fmt: skip
        return version, defs, host, names, [expansion(session, n) for n in names]

    version, defs, host, names, replies = converse(binary, talk, accel=accel)
    qemu_ver = version.get("qemu", {}) if isinstance(version, dict) else {}
    text = ".".join(str(qemu_ver.get(k, "?")) for k in ("major", "minor", "micro"))
    return QemuFacts.from_replies(
        binary=binary, version=text, accel=accel, definitions=defs, host_expansion=host,
        expansions=dict(zip(names, replies, strict=True)),
    )  # fmt: skip


def learn_qemu(binary: str) -> QemuFacts:
    """QemuFacts for `binary`, from the cache when fresh."""
    key = qemu_key(binary)
    name = f"qemu-{key}.json"
    doc = _read_cache(name, key)
    if doc is not None:
        try:
            facts = QemuFacts.from_json(doc["facts"])
        except (KeyError, TypeError, ValueError, AttributeError):
            pass  # a damaged cache file: ask again
        else:
            if facts.binary == binary:
                return facts
    facts = _ask_qemu(binary)
    _write_cache(name, {"version": FORMAT_VERSION, "key": key, "facts": facts.to_json()})
    return facts


# --- this host's feature MSRs ------------------------------------------------------


def learn_msrs(device: str = _KVM_PATH) -> tuple[FeatureMsrs | None, MsrDelivery | None]:
    """This host's KVM feature MSRs with the bits a vCPU accepts of each, and
    the vCPU trial behind them (kvm/msrs.msr_delivery, ~1.3 ms), cached per
    kernel and boot; (None, None) where there is no usable KVM. A kernel
    without KVM_CAP_GET_MSR_FEATURES gives them absent and an empty trial."""
    if not os.path.exists(device):
        return None, None
    key = _digest((device, os.uname().release, boot_id()))
    doc = _read_cache("msrs.json", key)
    if doc is not None:
        try:
            return msrs_from_json(doc["msrs"]), MsrDelivery.from_json(doc["delivery"])
        except (KeyError, TypeError, ValueError, AttributeError):
            pass  # a damaged cache file: ask again
    from kvmcpuid_virt.kvm.msrs import msr_delivery
    from kvmcpuid_virt.kvm.system import Kvm

    try:
        with Kvm(device) as kvm:
            msrs = kvm.read_feature_msrs()
            delivery = msr_delivery(kvm, values=msrs.as_dict()) if msrs.available else \
                MsrDelivery(())  # fmt: skip
    except (KvmError, OSError) as exc:
        _debug("no feature-MSR trial: %s", exc)
        return None, None
    if msrs.available:
        msrs = msrs.with_deliverable({t.index: t.deliverable for t in delivery.trials})
    doc = {"version": FORMAT_VERSION, "key": key, "msrs": msrs_to_json(msrs),
           "delivery": delivery.to_json()}  # fmt: skip
    _write_cache("msrs.json", doc)
    return msrs, delivery


# --- libvirt cpu_map -------------------------------------------------------------


def _cpu_map_key(directory: Path) -> str:
    parts: list[object] = [str(directory)]
    for p in sorted(directory.glob("x86_*.xml")):
        st = p.stat()
        parts.append((p.name, st.st_mtime_ns, st.st_size))
    index = directory / "index.xml"
    if index.exists():
        parts.append(("index.xml", index.stat().st_mtime_ns))
    return _digest(parts)


def _parse_cpu_map(directory: Path) -> list[dict[str, Any]]:
    # index.xml lists the model files oldest first within each vendor family.
    order: list[str] = []
    index = directory / "index.xml"
    if index.exists():
        root = parse_xml_file(index)
        for inc in root.iter("include"):
            fname = inc.get("filename", "")
            if fname.startswith("x86_") and fname not in ("x86_features.xml", "x86_vendors.xml"):
                order.append(fname)
    files = order or sorted(
        p.name for p in directory.glob("x86_*.xml")
        if p.name not in ("x86_features.xml", "x86_vendors.xml")
    )  # fmt: skip
    raw: dict[str, dict[str, Any]] = {}
    for n, fname in enumerate(files):
        path = directory / fname
        if not path.exists():
            continue
        for el in parse_xml_file(path).iter("model"):
            name = el.get("name")
            parent = el.getparent()
            if not name or parent is None or parent.tag != "cpus":
                continue  # <model name='Parent'/> inside a model, handled below
            vendor_el = el.find("vendor")
            parent_el = el.find("model")
            raw[name] = {
                "name": name,
                "vendor": vendor_el.get("name") if vendor_el is not None else None,
                "parent": parent_el.get("name") if parent_el is not None else None,
                "features": [f.get("name") for f in el.findall("feature") if f.get("name")],
                "order": n,
            }
    # Old cpu_map files build a model on a parent (<model name='Parent'/>).
    out = []
    for name, m in raw.items():
        feats, vendor, seen, cur = set(m["features"]), m["vendor"], {name}, m
        while cur["parent"] and cur["parent"] in raw and cur["parent"] not in seen:
            seen.add(cur["parent"])
            cur = raw[cur["parent"]]
            feats |= set(cur["features"])
            vendor = vendor or cur["vendor"]
        out.append({"name": name, "vendor": vendor, "features": sorted(feats), "order": m["order"]})
    return out


def msr_features(cpu_map: str | Path) -> frozenset[str]:
    """The names x86_features.xml defines by an <msr> rather than a <cpuid>."""
    path = Path(cpu_map) / "x86_features.xml"
    try:
        root = parse_xml_file(path)
    except InputError:
        return frozenset()
    return frozenset(
        str(f.get("name")) for f in root.iter("feature")
        if f.get("name") and f.find("msr") is not None and f.find("cpuid") is None
    )  # fmt: skip


def _cpu_map(d: Path) -> tuple[dict[str, CpuModel], frozenset[str]]:
    if not (d / "x86_features.xml").exists():
        return {}, frozenset()
    key = _cpu_map_key(d)
    doc = _read_cache("cpu_map.json", key)
    if doc is None:
        doc = {"version": FORMAT_VERSION, "key": key, "models": _parse_cpu_map(d),
               "msr_features": sorted(msr_features(d))}  # fmt: skip
        _write_cache("cpu_map.json", doc)
    models = {
        m["name"]: CpuModel(m["name"], m["vendor"], frozenset(m["features"]),
                            ModelSource.CPU_MAP, m["order"])
        for m in doc["models"]
    }  # fmt: skip
    return models, frozenset(doc.get("msr_features", ()))


def cpu_map_models(directory: str | Path = CPU_MAP_DIR) -> dict[str, CpuModel]:
    """libvirt's x86 cpu_map models (empty when cpu_map is not installed)."""
    return _cpu_map(Path(directory))[0]
