"""Named CPU models: from libvirt's installed cpu_map when present, otherwise
from the QEMU binary (QMP query-cpu-definitions / query-cpu-model-expansion).
No model contents are kept by hand in this package.

Both sources are expensive next to the 2x start-up budget of
kvmcpuid-qemu-flags (lxml import, a QEMU process), so their answers are cached
as JSON in $XDG_CACHE_HOME/kvmcpuid_virt, keyed by what they depend on: the
QEMU binary's path, mtime and size plus the running kernel and boot (its
`host` expansion follows KVM), or the cpu_map files' names, mtimes and sizes.
Cache files are written atomically; a corrupt or foreign one is ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal

from kvmcpuid_virt.errors import PolicyError, ToolError
from kvmcpuid_virt.fsutil import cache_dir, write_cache
from kvmcpuid_virt.host import boot_id
from kvmcpuid_virt.qmp import default_accel, run_commands

__all__ = [
    "CPU_MAP_DIR",
    "CpuModel",
    "ModelIdentity",
    "QemuInfo",
    "cpu_map_models",
    "find_qemu",
    "model",
    "models",
    "qemu_info",
]

log = logging.getLogger(__name__)

CPU_MAP_DIR: Final = "/usr/share/libvirt/cpu_map"
QEMU_BINARY: Final = "qemu-system-x86_64"
_CACHE_VERSION: Final = 2

Source = Literal["cpu_map", "qemu"]


@dataclasses.dataclass(frozen=True)
class CpuModel:
    """A named CPU model. `features` are spelled as the source spells them
    (libvirt names for cpu_map, QEMU property names for qemu); select.py maps
    them through the registry. `order` ranks models oldest first within a
    source (cpu_map's index.xml order)."""

    name: str
    vendor: str | None
    features: frozenset[str]
    source: Source
    order: int = 0


# --- cache ----------------------------------------------------------------------


def _read_cache(name: str, key: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(cache_dir(), name), encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError, RecursionError):
        # Missing, unreadable, corrupt, or nested deeper than json's C
        # recursion limit (a hostile or garbage file): recompute.
        return None
    if not isinstance(doc, dict) or doc.get("version") != _CACHE_VERSION or doc.get("key") != key:
        return None
    return doc


def _write_cache(name: str, doc: dict[str, Any]) -> None:
    # Best effort: an unwritable cache must not break the tool, only slow it.
    write_cache(os.path.join(cache_dir(), name), json.dumps(doc, sort_keys=True))


def _digest(parts: Sequence[object]) -> str:
    return hashlib.sha256(repr(tuple(parts)).encode()).hexdigest()[:32]


# --- QEMU -----------------------------------------------------------------------


def find_qemu() -> str | None:
    """$KVMCPUID_QEMU, else qemu-system-x86_64 on PATH."""
    explicit = os.environ.get("KVMCPUID_QEMU")
    if explicit:
        return explicit
    return shutil.which(QEMU_BINARY)


def _bool_props(expansion: Mapping[str, Any]) -> dict[str, bool]:
    props = expansion.get("model", {}).get("props", {})
    return {k: v for k, v in props.items() if isinstance(v, bool)}


@dataclasses.dataclass(frozen=True)
class QemuInfo:
    """What one QEMU binary says on this host.

    props:       every boolean property of the CPU object (the feature names
                 this QEMU accepts in -cpu, all spellings);
    host:        the `host` model's full expansion under KVM (empty under TCG);
    definitions: query-cpu-definitions: name -> unavailable features here.
    undeliverable: features QEMU lists for `host` but cannot set up a vCPU
                 with on this host (feature -> QEMU's error), see trial_start.
    """

    binary: str
    key: str
    props: frozenset[str]
    host: Mapping[str, bool]
    definitions: Mapping[str, tuple[str, ...]]
    undeliverable: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def expand(self, name: str) -> frozenset[str]:
        """The feature properties a named model turns on (cached per model)."""
        return self._expansion(name)[0]

    def identity(self, name: str) -> ModelIdentity:
        """What a named model says besides features: its max leaves and
        family/model/stepping, as QEMU sets them under this accelerator."""
        return self._expansion(name)[1]

    def _expansion(self, name: str) -> tuple[frozenset[str], ModelIdentity]:
        if name not in self.definitions:
            raise PolicyError(f"QEMU ({self.binary}) has no CPU model {name!r}")
        cache_name = f"qemu-{self.key}.json"
        doc = _read_cache(cache_name, self.key) or {}
        cached = doc.get("models", {}).get(name)
        ident = doc.get("identities", {}).get(name)
        if isinstance(cached, list) and isinstance(ident, dict):
            return frozenset(cached), ModelIdentity(**ident)
        (reply,) = run_commands(
            self.binary,
            [{"execute": "query-cpu-model-expansion",
              "arguments": {"type": "full", "model": {"name": name}}}],
        )  # fmt: skip
        on = sorted(k for k, v in _bool_props(reply).items() if v)
        props = reply.get("model", {}).get("props", {})
        try:
            identity = ModelIdentity(
                **{f.name: int(props[f.name.replace("_", "-")])
                   for f in dataclasses.fields(ModelIdentity)}
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise ToolError(f"QEMU ({self.binary}) expansion of {name}: no {exc}") from None
        if doc:
            doc.setdefault("models", {})[name] = on
            doc.setdefault("identities", {})[name] = dataclasses.asdict(identity)
            _write_cache(cache_name, doc)
        return frozenset(on), identity


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
    """A QEMU CPU model's non-feature CPUID content (QOM property names with
    '-' for '_'): max basic and extended leaves before QEMU raises them for
    enabled feature words, and the signature of leaf 1 EAX."""

    min_level: int
    min_xlevel: int
    family: int
    model: int
    stepping: int


# MSRs whose existence a CPUID feature announces, so that QEMU writes them
# when it creates the vCPU: "failed to set MSR 0x10a" means the feature that
# enumerates the MSR cannot be given. (IA32_ARCH_CAPABILITIES is enumerated by
# CPUID.7.0:EDX[29]; seen on this nested AMD host with QEMU 7.2 and Linux
# 6.18: KVM lists the bit and the MSR, then refuses QEMU's write to it.)
_MSR_FEATURE: Final = {0x10A: "arch-capabilities"}
_MSR_FAIL = re.compile(r"failed to set MSR (0x[0-9a-fA-F]+)")
TRIAL_LIMIT: Final = 4


def trial_start(binary: str) -> dict[str, str]:
    """Start `-cpu host` for real (a pc machine, stopped before the first
    instruction) and learn which features QEMU's host expansion lists but
    cannot set up a vCPU with. Bounded: at most TRIAL_LIMIT starts, each
    within kvmcpuid_virt.qmp.QMP_TIMEOUT. Returns feature -> QEMU's error
    line."""
    off: dict[str, str] = {}
    for _ in range(TRIAL_LIMIT):
        cpu = ",".join(["host", *(f"{f}=off" for f in sorted(off))])
        try:
            run_commands(binary, [], machine="pc", cpu=cpu, accel="kvm")
        except ToolError as exc:
            m = _MSR_FAIL.search(str(exc))
            feature = _MSR_FEATURE.get(int(m.group(1), 16)) if m else None
            if m is None or feature is None or feature in off:
                log.warning("%s -cpu %s does not start: %s", binary, cpu, exc)
                return off
            off[feature] = m.group(0)
        else:
            return off
    return off


def _qemu_key(binary: str) -> str:
    path = shutil.which(binary) or binary
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        raise ToolError(f"{binary}: not found") from None
    return _digest(
        (real, st.st_mtime_ns, st.st_size, os.uname().release, boot_id(), default_accel())
    )


def qemu_info(binary: str | None = None) -> QemuInfo:
    """QemuInfo for `binary` (default find_qemu()), from the cache when fresh."""
    binary = binary or find_qemu()
    if binary is None:
        raise ToolError(f"{QEMU_BINARY} not found (install qemu-system-x86 or set KVMCPUID_QEMU)")
    key = _qemu_key(binary)
    name = f"qemu-{key}.json"
    doc = _read_cache(name, key)
    if doc is None:
        accel = default_accel()
        cmds: list[dict[str, Any]] = [{"execute": "query-cpu-definitions"}]
        # `host` exists only under KVM; `max` names every property under TCG.
        cmds.append(
            {"execute": "query-cpu-model-expansion",
             "arguments": {"type": "full", "model": {"name": "host" if accel == "kvm" else "max"}}}
        )  # fmt: skip
        defs, expansion = run_commands(binary, cmds, accel=accel)
        props = _bool_props(expansion)
        undeliverable = trial_start(binary) if accel == "kvm" else {}
        doc = {
            "version": _CACHE_VERSION,
            "key": key,
            "binary": binary,
            "props": sorted(props),
            "host": props if accel == "kvm" else {},
            "definitions": {
                d["name"]: sorted(d.get("unavailable-features", []))
                for d in defs
                if isinstance(d, dict) and "name" in d
            },
            "models": {},
            "undeliverable": undeliverable,
        }
        _write_cache(name, doc)
    return QemuInfo(
        binary=binary,
        key=key,
        props=frozenset(doc["props"]),
        host=dict(doc["host"]),
        definitions={k: tuple(v) for k, v in doc["definitions"].items()},
        undeliverable=dict(doc.get("undeliverable", {})),
    )


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
    from kvmcpuid_virt.xmlutil import parse_file

    # index.xml lists the model files oldest first within each vendor family.
    order: list[str] = []
    index = directory / "index.xml"
    if index.exists():
        root = parse_file(index)
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
        for el in parse_file(path).iter("model"):
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


def cpu_map_models(directory: str | Path = CPU_MAP_DIR) -> dict[str, CpuModel]:
    """libvirt's x86 cpu_map models (empty when cpu_map is not installed)."""
    d = Path(directory)
    if not (d / "x86_features.xml").exists():
        return {}
    key = _cpu_map_key(d)
    doc = _read_cache("cpu_map.json", key)
    if doc is None:
        doc = {"version": _CACHE_VERSION, "key": key, "models": _parse_cpu_map(d)}
        _write_cache("cpu_map.json", doc)
    return {
        m["name"]: CpuModel(m["name"], m["vendor"], frozenset(m["features"]), "cpu_map", m["order"])
        for m in doc["models"]
    }


def models(cpu_map: str | Path | None = CPU_MAP_DIR, qemu: str | None = None) -> list[CpuModel]:
    """All models, oldest first: cpu_map's when installed, else the QEMU
    binary's (in query-cpu-definitions order, which carries no age; versioned
    names sort after their base)."""
    found = cpu_map_models(cpu_map) if cpu_map is not None else {}
    if found:
        return sorted(found.values(), key=lambda m: m.order)
    info = qemu_info(qemu)
    names = sorted(n for n in info.definitions if n not in ("host", "max", "base"))
    return [CpuModel(n, None, info.expand(n), "qemu", i) for i, n in enumerate(names)]


def model(name: str, cpu_map: str | Path | None = CPU_MAP_DIR, qemu: str | None = None) -> CpuModel:
    """One named model: cpu_map first, then the QEMU binary (which knows the
    versioned names such as Skylake-Server-v4 that cpu_map 9.0 lacks)."""
    found = cpu_map_models(cpu_map) if cpu_map is not None else {}
    if name in found:
        return found[name]
    try:
        info = qemu_info(qemu)
    except ToolError:
        if found:
            raise PolicyError(
                f"no CPU model {name!r} in libvirt's cpu_map, and no QEMU to ask"
            ) from None
        raise
    if name not in info.definitions:
        known = sorted(set(found) | set(info.definitions))
        import difflib

        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise PolicyError(f"unknown CPU model {name!r}{hint}")
    return CpuModel(name, None, info.expand(name), "qemu", 0)
