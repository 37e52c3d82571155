"""The registry of named CPUID feature bits.

Each bit (leaf, subleaf, register, bit) carries the name QEMU uses on `-cpu`
(plus the aliases QEMU also accepts), the name libvirt's cpu_map uses, and a
kind saying how (or whether) a guest's value can be configured. The data is
shipped in cpuid/data/features.json (produced by scripts/gen_features.py from
QEMU 7.2 and libvirt 9.0's cpu_map) so that the registry works on hosts with
neither tool installed; it is read once, on first use.

Feature names are the only way names reach QEMU command lines and libvirt XML
(see DESIGN.md), so every name is validated against a strict alphabet on load.
"""

from __future__ import annotations

import enum
import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from kvmcpuid_virt.cpuid.fields import in_range, leaf_limits
from kvmcpuid_virt.cpuid.table import REGISTERS, CpuidTable, Register
from kvmcpuid_virt.errors import UnknownFeatureError

__all__ = ["NAME_RE", "Feature", "FeatureKind", "Registry", "load_registry", "registry"]

# Names end up in argv and XML attributes: nothing that could separate a QEMU
# option (",", "=") or need escaping in XML.
NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9_.-]*\Z")
_U32: Final = 0xFFFF_FFFF


class FeatureKind(enum.StrEnum):
    """How a guest's value of the bit is decided."""

    PLAIN = "plain"  # configurable by name through QEMU (and usually libvirt)
    KVM_PV = "kvm-pv"  # KVM paravirtual leaf 0x40000001
    DYNAMIC = "dynamic"  # follows guest state (OSXSAVE, OSPKE follow CR4)
    UNSETTABLE = "unsettable"  # neither QEMU nor libvirt can set it


@dataclass(frozen=True, slots=True)
class Feature:
    """One named CPUID bit."""

    leaf: int
    subleaf: int
    reg: Register
    bit: int
    qemu: str | None  # QEMU canonical name (None if QEMU cannot name it)
    qemu_aliases: tuple[str, ...]
    libvirt: str | None  # cpu_map name (None if libvirt has none)
    kind: FeatureKind
    # For KVM_PV bits libvirt sets via <features><kvm><NAME state='on'/>.
    libvirt_kvm: str | None = None
    # Linux's name, only for bits neither QEMU nor libvirt names (KVM PV bits
    # from kvm_para.h), so that every bit shown has some name.
    linux: str | None = None

    def __post_init__(self) -> None:
        if self.reg not in REGISTERS:
            raise ValueError(f"register {self.reg!r} is not one of {REGISTERS}")
        if not (0 <= self.leaf <= _U32 and 0 <= self.subleaf <= _U32 and 0 <= self.bit < 32):
            raise ValueError(f"bad position {self.leaf:#x}.{self.subleaf} {self.reg}[{self.bit}]")
        names = [self.qemu, *self.qemu_aliases, self.libvirt, self.libvirt_kvm, self.linux]
        for n in names:
            if n is not None and not NAME_RE.match(n):
                raise ValueError(f"feature name {n!r} has characters outside [a-z0-9_.-]")
        if self.qemu is None and self.libvirt is None and self.linux is None:
            raise ValueError(f"feature at {self.position} has no name")

    @property
    def name(self) -> str:
        """The project's canonical name: QEMU's, else libvirt's, else Linux's."""
        name = self.qemu or self.libvirt or self.linux
        assert name is not None  # guaranteed by __post_init__
        return name

    @property
    def names(self) -> tuple[str, ...]:
        """Every spelling that refers to this bit, canonical first."""
        out: list[str] = []
        for n in (self.qemu, *self.qemu_aliases, self.libvirt, self.linux):
            if n is not None and n not in out:
                out.append(n)
        return tuple(out)

    @property
    def mask(self) -> int:
        return 1 << self.bit

    @property
    def position(self) -> str:
        """Human-readable position, e.g. 'CPUID.07H.0:EBX[16]'."""
        return f"CPUID.{self.leaf:02X}H.{self.subleaf}:{self.reg.upper()}[{self.bit}]"

    def present(self, table: CpuidTable) -> bool:
        return bool(table.get(self.leaf, self.subleaf, self.reg) & self.mask)


class Registry:
    """All known features with lookups by any spelling and by position."""

    def __init__(self, features: tuple[Feature, ...]) -> None:
        self.features = features
        self._by_qemu: dict[str, Feature] = {}
        self._by_libvirt: dict[str, Feature] = {}
        self._by_name: dict[str, Feature] = {}
        self._at: dict[tuple[int, int, str, int], Feature] = {}
        self._words: dict[tuple[int, int, str], list[Feature]] = {}
        for f in features:
            key = (f.leaf, f.subleaf, f.reg, f.bit)
            if key in self._at:
                raise ValueError(f"two features at {f.position}")
            self._at[key] = f
            self._words.setdefault((f.leaf, f.subleaf, f.reg), []).append(f)
            for q in (f.qemu, *f.qemu_aliases):
                if q is not None:
                    self._claim(self._by_qemu, q, f, "QEMU")
            if f.libvirt is not None:
                self._claim(self._by_libvirt, f.libvirt, f, "libvirt")
            for n in f.names:
                self._claim(self._by_name, n, f, "any")
        for word in self._words.values():
            word.sort(key=lambda f: f.bit)

    @staticmethod
    def _claim(index: dict[str, Feature], name: str, f: Feature, what: str) -> None:
        # A QEMU name and a libvirt name may coincide for the same bit, but one
        # spelling must never mean two different bits.
        old = index.setdefault(name, f)
        if old is not f:
            raise ValueError(f"{what} name {name!r} names {old.position} and {f.position}")

    def __len__(self) -> int:
        return len(self.features)

    def lookup(self, name: str) -> Feature:
        """The feature for any spelling (QEMU canonical or alias, libvirt, Linux).

        Raises UnknownFeatureError with close matches for a name not known."""
        found = self._by_name.get(name)
        if found is None:
            # Users type "SSE4_1" as often as "sse4.1"; case is never meaningful.
            found = self._by_name.get(name.lower())
        if found is None:
            import difflib  # only for a name not known

            close = difflib.get_close_matches(name.lower(), self._by_name, n=10, cutoff=0.75)
            # Suggest each bit once, by its canonical name, not every spelling.
            suggestions = list(dict.fromkeys(self._by_name[c].name for c in close))[:3]
            raise UnknownFeatureError(name, suggestions)
        return found

    def hint(self, name: str, spelling: Callable[[Feature], str | None]) -> list[str]:
        """What to suggest for `name` in one tool's spelling (`spelling`:
        Feature -> that tool's name or None): the bit's own name there when
        `name` is the bit in any spelling, else the close matches that tool
        can spell."""
        try:
            known = self.lookup(name)
        except UnknownFeatureError as exc:
            return [s for c in exc.suggestions if (s := spelling(self.lookup(c))) is not None]
        own = spelling(known)
        return [own] if own is not None else []

    def by_qemu(self, name: str) -> Feature | None:
        return self._by_qemu.get(name)

    def by_libvirt(self, name: str) -> Feature | None:
        return self._by_libvirt.get(name)

    def at(self, leaf: int, subleaf: int, reg: str, bit: int) -> Feature | None:
        return self._at.get((leaf, subleaf, reg, bit))

    def in_word(self, leaf: int, subleaf: int, reg: str) -> list[Feature]:
        """The features of one register, by bit."""
        return list(self._words.get((leaf, subleaf, reg), ()))

    def words(self) -> list[tuple[int, int, Register]]:
        """Every (leaf, subleaf, register) that has named bits, sorted."""
        return sorted((leaf, sub, f[0].reg) for (leaf, sub, _), f in self._words.items())

    def present(self, table: CpuidTable) -> list[Feature]:
        """Features whose bit is set in the table, in registry order.

        A leaf beyond the table's max basic/extended/hypervisor leaf reads as
        absent: real CPUs answer such leaves with some other leaf's data, and
        a stale entry must not name features the CPU does not claim."""
        limits = leaf_limits(table)
        return [f for f in self.features if in_range(f.leaf, limits) and f.present(table)]


def _feature_from_json(raw: dict[str, Any]) -> Feature:
    reg = raw["reg"]
    if reg not in REGISTERS:
        raise ValueError(f"bad register {reg!r}")
    return Feature(
        leaf=int(raw["leaf"], 16),
        subleaf=int(raw["subleaf"]),
        reg=reg,
        bit=int(raw["bit"]),
        qemu=raw["qemu"],
        qemu_aliases=tuple(raw["qemu_aliases"]),
        libvirt=raw["libvirt"],
        kind=FeatureKind(raw["kind"]),
        libvirt_kvm=raw.get("libvirt_kvm"),
        linux=raw.get("linux"),
    )


def load_registry(text: str) -> Registry:
    """A Registry from features.json text (validated; ValueError if bad)."""
    doc = json.loads(text)
    return Registry(tuple(_feature_from_json(r) for r in doc["features"]))


@functools.cache
def registry() -> Registry:
    """The shipped registry, loaded on first call and cached."""
    from kvmcpuid_virt.cpuid import shipped_text

    text = shipped_text("features.json")
    return load_registry(text)
