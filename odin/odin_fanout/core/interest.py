"""Interest over time: subscription keys that lost their last subscriber stay wanted for
``linger`` seconds, so a client that reconnects and subscribes again (the usual case after a
blip) finds its channel still consumed and its window still warm, and a busy channel does not
flap in and out of the broker's filter. (Which filters a set of keys needs is a matter of
channel names: ``odin_fanout.protocol.channels.filters_for``.)
"""

from __future__ import annotations

from collections.abc import Iterable


class Lingering:
    """Keys that lost their last subscriber, kept wanted for ``linger`` seconds."""

    def __init__(self, linger: float) -> None:
        self.linger = linger
        self._since: dict[str, float] = {}
        """Key -> when it was last seen with a subscriber; insertion order is expiry order."""
        self._live: frozenset[str] = frozenset()

    def wanted(self, live: Iterable[str], now: float) -> frozenset[str]:
        """The keys to consume: those with subscribers (``live``) and those that had some
        less than ``linger`` seconds ago."""
        current = frozenset(live)
        since = self._since
        for key in self._live - current:
            since.pop(key, None)
            since[key] = now
        for key in current:
            since.pop(key, None)
        self._live = current
        while since:
            key, left = next(iter(since.items()))
            if left + self.linger > now:
                break
            del since[key]
        return current | since.keys()

    def next_expiry(self) -> float | None:
        """When the oldest lingering key stops being wanted (None: none lingers)."""
        if not self._since:
            return None
        return next(iter(self._since.values())) + self.linger
