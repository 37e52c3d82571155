"""ToolFacts: everything this package learns from the tools on this machine
(the QEMU binary and libvirt's cpu_map), as plain data.

Nothing here touches the machine: toolfacts.learn builds a ToolFacts by
asking QEMU and reading cpu_map (and caches it), tests build one from
recorded replies (`from_json`, `QemuFacts.from_replies`). Everything that
computes a configuration takes a ToolFacts as an argument, so its answer is
a function of its inputs.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from typing import Any, Final

from kvmcpuid_virt.cpuid.msr_features import MsrDelivery
from kvmcpuid_virt.cpuid.msr_values import FeatureMsrs
from kvmcpuid_virt.errors import PolicyError, ToolError

__all__ = [
    "FORMAT_VERSION",
    "NO_TOOLS",
    "CpuModel",
    "ModelIdentity",
    "ModelSource",
    "QemuFacts",
    "ToolFacts",
    "msrs_from_json",
    "msrs_to_json",
]

# The version of to_json()'s format (the cache and the recordings). Version 3
# (no feature-MSR facts) still reads, with them unknown.
FORMAT_VERSION: Final = 4
_READ_VERSIONS: Final = (3, 4)
QEMU_BINARY: Final = "qemu-system-x86_64"
DEFAULT_LIBVIRT_URI: Final = "qemu:///system"
# query-cpu-definitions names that are not CPU models one can cap at.
_NOT_MODELS: Final = frozenset({"host", "max", "base"})


class ModelSource(enum.StrEnum):
    """Where a named model's feature list comes from: libvirt's cpu_map
    (libvirt feature names) or QEMU's own definition (QEMU property names)."""

    CPU_MAP = "cpu_map"
    QEMU = "qemu"


@dataclasses.dataclass(frozen=True)
class CpuModel:
    """A named CPU model. `features` are spelled as the source spells them
    (libvirt names for cpu_map, QEMU property names for qemu); config.build
    maps them through the registry. `order` ranks models oldest first within
    a source (cpu_map's index.xml order)."""

    name: str
    vendor: str | None
    features: frozenset[str]
    source: ModelSource
    order: int = 0


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

    @classmethod
    def from_props(cls, props: Mapping[str, Any], what: str) -> ModelIdentity:
        try:
            return cls(**{f.name: int(props[f.name.replace("_", "-")])
                          for f in dataclasses.fields(cls)})  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise ToolError(f"{what}: no {exc}") from None


def _bool_props(expansion: Mapping[str, Any]) -> dict[str, bool]:
    model = expansion.get("model", {}) if isinstance(expansion, Mapping) else {}
    props = model.get("props", {}) if isinstance(model, Mapping) else {}
    return {k: v for k, v in props.items() if isinstance(v, bool)}


@dataclasses.dataclass(frozen=True)
class QemuFacts:
    """What one QEMU binary says on this host.

    props:         every boolean property of the CPU object (the feature
                   names this QEMU accepts in -cpu, all spellings);
    host:          the `host` model's full expansion under KVM (empty under TCG);
    definitions:   query-cpu-definitions: name -> unavailable features here;
    expansions:    every named model's features (QEMU property names);
    identities:    every named model's max leaves and family/model/stepping;
    undeliverable: features QEMU lists for `host` but cannot set up a vCPU
                   with on this host (feature -> why), from this host's
                   feature-MSR trial (ToolFacts.msr_delivery; recordings
                   before it: a trial start of `-cpu host`).
    """

    binary: str
    version: str
    accel: str
    props: frozenset[str]
    host: Mapping[str, bool]
    definitions: Mapping[str, tuple[str, ...]]
    expansions: Mapping[str, frozenset[str]]
    identities: Mapping[str, ModelIdentity]
    undeliverable: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_replies(
        cls, *, binary: str, version: str, accel: str,
        definitions: Iterable[Mapping[str, Any]], host_expansion: Mapping[str, Any],
        expansions: Mapping[str, Mapping[str, Any]],
        undeliverable: Mapping[str, str] | None = None,
    ) -> QemuFacts:  # fmt: skip
        """From QMP replies ("return" values): query-cpu-definitions, the
        full expansion of `host` (of `max` under TCG) and of each model."""
        props = _bool_props(host_expansion)
        expanded: dict[str, frozenset[str]] = {}
        identities: dict[str, ModelIdentity] = {}
        for name, reply in expansions.items():
            expanded[name] = frozenset(k for k, v in _bool_props(reply).items() if v)
            identities[name] = ModelIdentity.from_props(
                reply.get("model", {}).get("props", {}), f"QEMU ({binary}) expansion of {name}"
            )
        return cls(
            binary=binary, version=version, accel=accel, props=frozenset(props),
            host=props if accel == "kvm" else {},
            definitions={str(d["name"]): tuple(sorted(d.get("unavailable-features", [])))
                         for d in definitions if isinstance(d, Mapping) and "name" in d},
            expansions=expanded, identities=identities, undeliverable=dict(undeliverable or {}),
        )  # fmt: skip

    def expand(self, name: str) -> frozenset[str]:
        """The feature properties a named model turns on."""
        if name not in self.definitions or name not in self.expansions:
            raise PolicyError(f"QEMU ({self.binary}) has no CPU model {name!r}")
        return self.expansions[name]

    def identity(self, name: str) -> ModelIdentity:
        """What a named model says besides features (see ModelIdentity)."""
        if name not in self.identities:
            raise PolicyError(f"QEMU ({self.binary}) has no CPU model {name!r}")
        return self.identities[name]

    def model(self, name: str) -> CpuModel:
        return CpuModel(name, None, self.expand(name), ModelSource.QEMU, 0)

    def models(self) -> list[CpuModel]:
        """Every named model, in name order (query-cpu-definitions carries no
        age; versioned names sort after their base)."""
        names = sorted(n for n in self.definitions if n not in _NOT_MODELS)
        return [CpuModel(n, None, self.expand(n), ModelSource.QEMU, i)
                for i, n in enumerate(names) if n in self.expansions]  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {
            "binary": self.binary, "version": self.version, "accel": self.accel,
            "props": sorted(self.props), "host": dict(sorted(self.host.items())),
            "definitions": {k: list(v) for k, v in sorted(self.definitions.items())},
            "expansions": {k: sorted(v) for k, v in sorted(self.expansions.items())},
            "identities": {k: dataclasses.asdict(v) for k, v in sorted(self.identities.items())},
            "undeliverable": dict(sorted(self.undeliverable.items())),
        }  # fmt: skip

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> QemuFacts:
        return cls(
            binary=str(doc["binary"]), version=str(doc["version"]), accel=str(doc["accel"]),
            props=frozenset(doc["props"]), host={str(k): bool(v) for k, v in doc["host"].items()},
            definitions={str(k): tuple(v) for k, v in doc["definitions"].items()},
            expansions={str(k): frozenset(v) for k, v in doc["expansions"].items()},
            identities={str(k): ModelIdentity(**v) for k, v in doc["identities"].items()},
            undeliverable={str(k): str(v) for k, v in doc["undeliverable"].items()},
        )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ToolFacts:
    """What the tools on this machine told us, passed down explicitly.

    qemu:         the QEMU binary's facts, None when there is no QEMU to ask
                  (qemu_missing says why);
    cpu_map:      libvirt's cpu_map models by name (empty when not installed);
    msr_features: cpu_map feature names defined by an MSR, not a CPUID bit;
    libvirt_uri:  the libvirt connection in use;
    host_msrs:    this host's KVM feature MSRs with the bits a vCPU here
                  accepts of each (None: not learned, e.g. no /dev/kvm);
    msr_delivery: the vCPU trial behind host_msrs (kvm/msrs.msr_delivery).
    """

    qemu: QemuFacts | None
    cpu_map: Mapping[str, CpuModel] = dataclasses.field(default_factory=dict)
    msr_features: frozenset[str] = frozenset()
    libvirt_uri: str = DEFAULT_LIBVIRT_URI
    qemu_missing: str = f"{QEMU_BINARY} not found (install qemu-system-x86 or set KVMCPUID_QEMU)"
    host_msrs: FeatureMsrs | None = None
    msr_delivery: MsrDelivery | None = None

    def undeliverable(self) -> Mapping[str, str]:
        """CPUID features this host's vCPUs cannot be given, feature -> a
        one-line note: from the feature-MSR trial when learned, else what an
        older recording's QEMU start trial found."""
        if self.msr_delivery is not None:
            return self.msr_delivery.cpuid_notes()
        return self.qemu.undeliverable if self.qemu is not None else {}

    def require_qemu(self) -> QemuFacts:
        """The QEMU facts, or the ToolError that says why there are none."""
        if self.qemu is None:
            raise ToolError(self.qemu_missing)
        return self.qemu

    def models(self) -> list[CpuModel]:
        """All models, oldest first: cpu_map's when installed, else QEMU's."""
        if self.cpu_map:
            return sorted(self.cpu_map.values(), key=lambda m: m.order)
        return self.require_qemu().models()

    def model(self, name: str) -> CpuModel:
        """One named model: cpu_map first, then QEMU (which knows versioned
        names such as Skylake-Server-v4 that cpu_map 9.0 lacks)."""
        if name in self.cpu_map:
            return self.cpu_map[name]
        if self.qemu is None:
            if self.cpu_map:
                raise PolicyError(f"no CPU model {name!r} in libvirt's cpu_map, and no QEMU to ask")
            raise ToolError(self.qemu_missing)
        if name not in self.qemu.definitions:
            known = sorted(set(self.cpu_map) | set(self.qemu.definitions))
            import difflib  # only for a name not known

            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise PolicyError(f"unknown CPU model {name!r}{hint}")
        return self.qemu.model(name)

    def to_json(self) -> dict[str, Any]:
        """The cache and recording format (from_json reads it back)."""
        return {
            "version": FORMAT_VERSION,
            "qemu": None if self.qemu is None else self.qemu.to_json(),
            "qemu_missing": self.qemu_missing,
            "cpu_map": [_model_json(m) for m in sorted(self.cpu_map.values(),
                                                       key=lambda m: (m.order, m.name))],
            "msr_features": sorted(self.msr_features),
            "libvirt_uri": self.libvirt_uri,
            "host_msrs": None if self.host_msrs is None else msrs_to_json(self.host_msrs),
            "msr_delivery": None if self.msr_delivery is None else self.msr_delivery.to_json(),
        }  # fmt: skip

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ToolFacts:
        """A ToolFacts from to_json()'s output (a ValueError for another
        version, KeyError/TypeError for a damaged document)."""
        if doc.get("version") not in _READ_VERSIONS:
            raise ValueError(f"tool facts version {doc.get('version')!r}, not {FORMAT_VERSION}")
        qemu = doc["qemu"]
        host_msrs, delivery = doc.get("host_msrs"), doc.get("msr_delivery")
        return cls(
            qemu=None if qemu is None else QemuFacts.from_json(qemu),
            cpu_map={str(m["name"]): _model_from_json(m) for m in doc["cpu_map"]},
            msr_features=frozenset(doc["msr_features"]),
            libvirt_uri=str(doc["libvirt_uri"]),
            qemu_missing=str(doc["qemu_missing"]),
            host_msrs=None if host_msrs is None else msrs_from_json(host_msrs),
            msr_delivery=None if delivery is None else MsrDelivery.from_json(delivery),
        )


def msrs_to_json(msrs: FeatureMsrs) -> dict[str, Any]:
    return {
        "available": msrs.available, "why": msrs.why,
        "values": {f"{i:#x}": f"{v:#x}" for i, v in msrs.items},
        "deliverable": None if msrs.deliverable is None else
        {f"{i:#x}": f"{v:#x}" for i, v in msrs.deliverable},
    }  # fmt: skip


def msrs_from_json(doc: Mapping[str, Any]) -> FeatureMsrs:
    values = [(int(k, 16), int(v, 16)) for k, v in doc["values"].items()]
    raw = doc["deliverable"]
    accepts = None if raw is None else [(int(k, 16), int(v, 16)) for k, v in raw.items()]
    return FeatureMsrs(values, bool(doc["available"]), accepts, str(doc["why"]))


def _model_json(m: CpuModel) -> dict[str, Any]:
    return {"name": m.name, "vendor": m.vendor, "features": sorted(m.features),
            "order": m.order}  # fmt: skip


def _model_from_json(m: Mapping[str, Any]) -> CpuModel:
    vendor = m["vendor"]
    return CpuModel(str(m["name"]), None if vendor is None else str(vendor),
                    frozenset(m["features"]), ModelSource.CPU_MAP, int(m["order"]))  # fmt: skip


# No QEMU, no cpu_map: what a machine without the tools knows.
NO_TOOLS: Final = ToolFacts(qemu=None)
