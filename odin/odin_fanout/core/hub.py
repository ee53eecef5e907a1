"""The subscription index: which subscribers receive a channel's messages.

Keys are channel names and patterns exactly as clients subscribed them; a message on
``BTC.trade`` goes to the subscribers of at most four keys (see ``channels.match_keys``), so
matching costs four dictionary lookups however many patterns exist.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

from odin_fanout.protocol.channels import match_keys

S = TypeVar("S", bound=Hashable)

# Channels whose match keys are remembered; past this the cache starts over.
_KEY_CACHE = 100_000


class Hub(Generic[S]):
    def __init__(self) -> None:
        self._index: dict[str, set[S]] = {}
        self.on_key_emptied: Callable[[str], None] | None = None
        """Called when a key loses its last subscriber (interest follows the hub)."""
        self._subscriptions = 0
        self._keys: dict[str, tuple[str, str, str, str]] = {}
        """match_keys per channel, computed once (the channel names of the market repeat)."""

    def add(self, key: str, subscriber: S) -> None:
        members = self._index.setdefault(key, set())
        if subscriber not in members:
            members.add(subscriber)
            self._subscriptions += 1

    def remove(self, key: str, subscriber: S) -> None:
        members = self._index.get(key)
        if members is None or subscriber not in members:
            return
        members.discard(subscriber)
        self._subscriptions -= 1
        if not members:
            # Empty sets are dropped so the index never outgrows the live subscriptions.
            del self._index[key]
            if self.on_key_emptied is not None:
                self.on_key_emptied(key)

    def remove_all(self, keys: Iterable[str], subscriber: S) -> None:
        for key in keys:
            self.remove(key, subscriber)

    def match(self, channel: str) -> tuple[S, ...]:
        """A snapshot of everyone who receives ``channel``, each once.

        A snapshot, because delivering may evict a slow subscriber from the index.
        """
        index = self._index
        if not index:
            return ()
        keys = self._keys.get(channel)
        if keys is None:
            if len(self._keys) >= _KEY_CACHE:
                self._keys.clear()
            keys = self._keys[channel] = match_keys(channel)
        found = [members for key in keys if (members := index.get(key))]
        if not found:
            return ()
        if len(found) == 1:
            return tuple(found[0])
        return tuple(set().union(*found))

    def count_matching(self, channel: str) -> int:
        return len(self.match(channel))

    def subscribers_of(self, key: str) -> int:
        return len(self._index.get(key, ()))

    def key_names(self) -> list[str]:
        """Every channel and pattern with at least one subscriber."""
        return list(self._index)

    def exact_keys(self) -> list[str]:
        """Channels subscribed by name (not by a pattern)."""
        return [key for key in self._index if "*" not in key]

    @property
    def keys(self) -> int:
        """Distinct channels and patterns with at least one subscriber."""
        return len(self._index)

    @property
    def subscriptions(self) -> int:
        """(key, subscriber) pairs in the index."""
        return self._subscriptions
