"""Retrying a daemon's transient refusals, and keeping the number of guests
in flight to what the daemon sustains. Used by the libvirt probe
(probe/libvirt.py decides which libvirt errors are transient); nothing here
knows libvirt.

- `RetryPolicy`: a bounded exponential backoff with jitter: a cap on the
  tries, on each pause and on the time spent retrying one guest.
- `AdaptiveLimit`: how many guests may be in flight, additive increase and
  multiplicative decrease (AIMD, as TCP's congestion window): halved when the
  daemon refuses one for want of resources, one more after a window of
  guests that ran.
- `RetryStats`: what happened (guests, attempts, retries and give-ups by
  cause, time spent backing off, the limit's history), for reports.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

from kvmcpuid_virt.errors import ProbeError

__all__ = ["DEFAULT_POLICY", "AdaptiveLimit", "RetryPolicy", "RetryStats", "Slot"]

# How often a thread waiting for a slot looks at its cancel event.
_WAKE: Final = 0.05


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """attempts: tries in all, the first one included; base: the first
    pause's ceiling, doubled at each retry up to cap; total: no retry starts
    later than this many seconds after the first try."""

    attempts: int = 6
    base: float = 0.2
    cap: float = 3.0
    total: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base < 0 or self.cap < self.base or self.total < 0:
            raise ValueError(f"inconsistent retry policy: {self}")

    def backoff(self, retry: int, rng: random.Random) -> float:
        """The pause before retry number `retry` (1 for the first): "equal
        jitter", half the ceiling plus a random part of the other half, so
        that clients refused together do not come back together, and each
        still leaves the daemon at least half the pause."""
        ceiling = min(self.cap, self.base * 2.0 ** (retry - 1))
        return ceiling / 2 + rng.uniform(0, ceiling / 2)

    def gives_up(self, tries: int, elapsed: float, pause: float) -> bool:
        """Whether to stop after `tries` tries, `elapsed` seconds in, rather
        than pause `pause` seconds and try again."""
        return tries >= self.attempts or elapsed + pause > self.total


DEFAULT_POLICY: Final = RetryPolicy()


class Slot:
    """One guest's place in an AdaptiveLimit; `refused` tells the limit,
    at release, that the daemon refused this guest for want of resources."""

    __slots__ = ("generation", "refused")

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.refused = False


class AdaptiveLimit:
    """At most `limit` guests in flight, `limit` between `minimum` and
    `maximum`: halved (from the guests then in flight) when one is refused,
    raised by one after `limit` guests in a row ran. Refusals of guests that
    were started under the same limit halve it once: each slot remembers the
    limit's generation it was taken in (TCP reduces once per window too),
    so a burst of refusals does not collapse the limit to its minimum."""

    def __init__(self, maximum: int, *, minimum: int = 1, initial: int | None = None) -> None:
        if not 1 <= minimum <= maximum:
            raise ValueError(f"need 1 <= minimum <= maximum, got {minimum}, {maximum}")
        start = maximum if initial is None else initial
        if not minimum <= start <= maximum:
            raise ValueError(f"initial limit {start} outside [{minimum}, {maximum}]")
        self.maximum = maximum
        self.minimum = minimum
        self._limit = float(start)
        self._in_flight = 0
        self._generation = 0
        self._cond = threading.Condition()
        self.lowest = start
        self.peak = 0  # the most guests in flight at once
        self.decreases = 0

    @property
    def limit(self) -> int:
        return max(self.minimum, int(self._limit))

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def try_acquire(self) -> Slot | None:
        """A slot now, or None when `limit` guests are in flight."""
        with self._cond:
            return self._take()

    def _take(self) -> Slot | None:
        if self._in_flight >= self.limit:
            return None
        self._in_flight += 1
        self.peak = max(self.peak, self._in_flight)
        return Slot(self._generation)

    def acquire(self, cancel: threading.Event | None = None) -> Slot:
        """Wait for a slot; ProbeError("probe cancelled") once `cancel` is set."""
        with self._cond:
            while True:
                if cancel is not None and cancel.is_set():
                    raise ProbeError("probe cancelled")
                slot = self._take()
                if slot is not None:
                    return slot
                self._cond.wait(_WAKE)

    def release(self, slot: Slot) -> None:
        with self._cond:
            flight = self._in_flight
            self._in_flight -= 1
            if slot.refused:
                if slot.generation == self._generation:
                    self._limit = float(max(self.minimum, min(self.limit, flight) // 2))
                    self._generation += 1
                    self.decreases += 1
                    self.lowest = min(self.lowest, self.limit)
            else:
                self._limit = min(float(self.maximum), self._limit + 1 / self.limit)
            self._cond.notify_all()

    @contextmanager
    def slot(self, cancel: threading.Event | None = None) -> Iterator[Slot]:
        taken = self.acquire(cancel)
        try:
            yield taken
        finally:
            self.release(taken)

    def as_json(self) -> dict[str, int]:
        return {"maximum": self.maximum, "limit": self.limit, "lowest": self.lowest,
                "peak_in_flight": self.peak, "decreases": self.decreases}


class RetryStats:
    """Counts, thread-safe: guests asked for, attempts (domains tried),
    retries and give-ups by cause, one message per cause (the latest),
    seconds spent backing off."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.guests = 0
        self.attempts = 0
        self.retries: Counter[str] = Counter()
        self.gave_up: Counter[str] = Counter()
        self.messages: dict[str, str] = {}
        self.backoff_seconds = 0.0

    def guest(self) -> None:
        with self._lock:
            self.guests += 1

    def attempt(self) -> None:
        with self._lock:
            self.attempts += 1

    def retried(self, cause: str, pause: float, message: str) -> None:
        with self._lock:
            self.retries[cause] += 1
            self.messages[cause] = message
            self.backoff_seconds += pause

    def give_up(self, cause: str, message: str) -> None:
        with self._lock:
            self.gave_up[cause] += 1
            self.messages[cause] = message

    def as_json(self, limit: AdaptiveLimit | None = None) -> dict[str, object]:
        with self._lock:
            doc: dict[str, object] = {
                "guests": self.guests, "attempts": self.attempts,
                "retries": dict(sorted(self.retries.items())),
                "gave_up": dict(sorted(self.gave_up.items())),
                "backoff_seconds": round(self.backoff_seconds, 3),
                "messages": dict(sorted(self.messages.items())),
            }
        if limit is not None:
            doc["in_flight"] = limit.as_json()
        return doc

    def summary(self, limit: AdaptiveLimit | None = None) -> str:
        """One line: "64 guests, 66 attempts, 2 retries (cgroup-bpf-eagain: 2), none
        given up, 0.3 s backing off; in flight: at most 16, limit 16 (lowest 8)"."""
        with self._lock:
            retries = sum(self.retries.values())
            by = ", ".join(f"{k}: {v}" for k, v in sorted(self.retries.items()))
            lost = ", ".join(f"{k}: {v}" for k, v in sorted(self.gave_up.items()))
            text = (f"{self.guests} guests, {self.attempts} attempts, {retries} retries"
                    + (f" ({by})" if by else "")
                    + (f", given up: {lost}" if lost else ", none given up")
                    + f", {self.backoff_seconds:.1f} s backing off")
        if limit is not None:
            text += (f"; in flight: at most {limit.peak}, limit {limit.limit} of {limit.maximum}"
                     f" (lowest {limit.lowest}, {limit.decreases} decrease(s))")
        return text
