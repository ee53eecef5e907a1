"""Per-connection inbound rate limiting, on time passed in by the caller.

A token bucket admits frames (original defaults: burst 100, 10 per second). Rejected frames
feed a leaky "abuse" counter that drains at the refill rate: a client that only bursts now
and then never trips it, one that keeps sending well above the rate does, after roughly
``threshold / (its rate - refill rate)`` seconds.
"""

from __future__ import annotations

import attrs


@attrs.define
class TokenBucket:
    capacity: float
    rate: float
    """Tokens added per second."""
    tokens: float
    updated: float

    @classmethod
    def full(cls, capacity: float, rate: float, now: float) -> TokenBucket:
        return cls(capacity=capacity, rate=rate, tokens=capacity, updated=now)

    def try_take(self, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens if there are enough; refill lazily from elapsed time."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False


@attrs.define
class LeakyCounter:
    """A count that drains continuously; ``add`` returns the level after adding."""

    drain_per_second: float
    level: float = 0.0
    updated: float = 0.0

    def add(self, now: float, amount: float = 1.0) -> float:
        elapsed = max(0.0, now - self.updated)
        self.level = max(0.0, self.level - elapsed * self.drain_per_second) + amount
        self.updated = now
        return self.level
