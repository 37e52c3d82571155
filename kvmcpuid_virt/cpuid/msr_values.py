"""FeatureMsrs: the feature-MSR values of a KVM or of a dump, as plain data.

Kept apart from the registry (cpuid/msr_features.py: json, difflib,
dataclasses) because CpuidTable carries one and `kvmcpuid dump` and the
memo-hit path must stay light (docs/ARCHITECTURE.md, Start-up).
"""

from __future__ import annotations

TYPE_CHECKING = False  # the fast path's typing stand-in: docs/ARCHITECTURE.md, Start-up
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from typing import Final

__all__ = ["FeatureMsrs"]

_U32: Final = 0xFFFF_FFFF
_U64: Final = 0xFFFF_FFFF_FFFF_FFFF


def _pairs(items: Iterable[tuple[int, int]], what: str) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    seen: set[int] = set()
    for index, value in items:
        for n in (index, value):
            if isinstance(n, bool) or not isinstance(n, int):
                raise ValueError(f"{what} {n!r} is not a number")
        if not 0 <= index <= _U32 or not 0 <= value <= _U64:
            raise ValueError(f"{what} {index:#x} = {value:#x} is out of range")
        if index in seen:
            raise ValueError(f"{what} {index:#x} given twice")
        seen.add(index)
        out.append((index, value))
    return tuple(out)


class FeatureMsrs:
    """The feature MSRs of a KVM (or of a dump): index -> value.

    `available` tells "absent" from "empty": False when nothing could be read
    (a kernel without KVM_CAP_GET_MSR_FEATURES), True when KVM answered, even
    with no MSR at all. `deliverable`, when known, is index -> the bits of
    that value a vCPU of that host accepts through KVM_SET_MSRS
    (kvm/msrs.msr_delivery); None when nobody tried. `why` says, for an
    absent set, why (not part of equality)."""

    __slots__ = ("available", "deliverable", "items", "why")

    items: tuple[tuple[int, int], ...]
    available: bool
    deliverable: tuple[tuple[int, int], ...] | None
    why: str

    def __init__(
        self,
        items: Iterable[tuple[int, int]] = (),
        available: bool = True,
        deliverable: Iterable[tuple[int, int]] | None = None,
        why: str = "",
    ) -> None:
        pairs = _pairs(items, "feature MSR")
        if pairs and not available:
            raise ValueError("feature MSR values given but marked unavailable")
        accepts = None if deliverable is None else _pairs(deliverable, "deliverable MSR")
        if accepts is not None:
            values = dict(pairs)
            for index, bits in accepts:
                if index not in values:
                    raise ValueError(f"deliverable bits for MSR {index:#x}, which has no value")
                if bits & ~values[index]:
                    raise ValueError(
                        f"MSR {index:#x}: deliverable bits {bits:#x} beyond its value "
                        f"{values[index]:#x}"
                    )
        setter = object.__setattr__
        setter(self, "items", pairs)
        setter(self, "available", bool(available))
        setter(self, "deliverable", accepts)
        setter(self, "why", str(why))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"FeatureMsrs is immutable (tried to set {name})")

    @classmethod
    def of(
        cls, values: Mapping[int, int], deliverable: Mapping[int, int] | None = None
    ) -> FeatureMsrs:
        """What a KVM that answered reported, sorted by index (with
        deliverable: see with_deliverable)."""
        out = cls(sorted((int(k), int(v)) for k, v in values.items()), True)
        return out if deliverable is None else out.with_deliverable(deliverable)

    @classmethod
    def absent(cls, why: str = "") -> FeatureMsrs:
        return cls((), False, None, why)

    def with_deliverable(self, deliverable: Mapping[int, int]) -> FeatureMsrs:
        """The same values with what a vCPU accepts of each (only the MSRs
        this set has; an MSR not tried delivers nothing)."""
        accepts = [(i, deliverable.get(i, 0) & v) for i, v in self.items]
        return FeatureMsrs(self.items, self.available, accepts, self.why)

    def _key(self) -> tuple[object, ...]:
        return (self.items, self.available, self.deliverable)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FeatureMsrs):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        if not self.available:
            return f"FeatureMsrs.absent({self.why!r})"
        shown = ", ".join(f"{i:#x}: {v:#x}" for i, v in self.items)
        return f"FeatureMsrs({{{shown}}}, deliverable={self.deliverable!r})"

    def __reduce__(self) -> tuple[type[FeatureMsrs], tuple[object, ...]]:
        return (FeatureMsrs, (self.items, self.available, self.deliverable, self.why))

    def as_dict(self) -> dict[int, int]:
        return dict(self.items)

    def deliverable_dict(self) -> dict[int, int] | None:
        """index -> the bits a vCPU accepts; None when not known."""
        return None if self.deliverable is None else dict(self.deliverable)

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, index: object) -> bool:
        return any(i == index for i, _ in self.items)

    def get(self, index: int, default: int | None = None) -> int | None:
        return self.as_dict().get(index, default)
