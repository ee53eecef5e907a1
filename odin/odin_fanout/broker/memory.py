"""The in-process broker: the embedded default for one process, and the twin used by tests.

It behaves like the JetStream-backed broker on a smaller scale: one history stream shared by
all channels, positions assigned at publish, history bounded by count and age, a new random
epoch each time the broker starts (its history dies with the process), and bounded feeds
that announce what they had to drop. Positions are valid only inside this process.

It feeds every channel whatever the server ``want``s, unless made with ``interest=True``:
then it feeds only the channels wanted, as the NATS broker does (for tests of the server's
side of interest; one process gains nothing from it).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import trio

from odin_fanout.broker.base import (
    BoundedFeed,
    BrokerStats,
    BrokerStatus,
    FeedItem,
    FeedStats,
    HistoryPage,
    open_bounded_feed,
)
from odin_fanout.core.history import HistoryLog
from odin_fanout.protocol.channels import Filters, covers, matches
from odin_fanout.protocol.publication import Publication


def new_epoch() -> str:
    return secrets.token_hex(6)


class MemoryBroker:
    def __init__(
        self,
        *,
        max_messages: int = 1000,
        max_age: float = 300.0,
        max_channels: int = 10_000,
        feed_capacity: int = 10_000,
        wall_clock: Callable[[], float] = time.time,
        interest: bool = False,
    ) -> None:
        self._history: HistoryLog[Publication] = HistoryLog(
            max_messages=max_messages, max_age=max_age, max_channels=max_channels
        )
        self._feed_capacity = feed_capacity
        self._wall_clock = wall_clock
        self._epoch = new_epoch()
        self._seq = 0
        self._feeds: list[BoundedFeed] = []
        self.feed_stats = FeedStats()
        self._stats = BrokerStats(connected=True)
        self._interest = interest
        self.filters: Filters = None
        """What the server last wanted (None: everything)."""
        self.wants = 0
        """How many times the server changed what it wants."""

    @property
    def epoch(self) -> str:
        return self._epoch

    @property
    def last_seq(self) -> int:
        """The newest position assigned."""
        return self._seq

    def status(self) -> BrokerStatus:
        return BrokerStatus(connected=True, detail="in-process memory broker", location="memory")

    def stats(self) -> BrokerStats:
        self._stats.ingested = self._seq
        self._stats.published = self._seq
        self._stats.ingest_dropped = self.feed_stats.dropped
        return self._stats

    async def wait_ready(self) -> None:
        await trio.lowlevel.checkpoint()

    async def publish(self, channel: str, payload: bytes, msg_id: str | None = None) -> None:
        """Publish; ``msg_id`` is not needed: one process never publishes a message twice."""
        del msg_id
        self.publish_nowait(channel, payload)
        await trio.lowlevel.checkpoint()

    def publish_nowait(self, channel: str, payload: bytes, *, feed: bool = True) -> Publication:
        """Publish at once; ``feed=False`` stores it in the history only, as a message the
        feed lost (a consumer cut off, a stream read past) would be."""
        self._seq += 1
        publication = Publication(
            channel=channel,
            seq=self._seq,
            prev=self._history.last_seq(channel),
            epoch=self._epoch,
            ts=self._wall_clock(),
            payload=payload,
        )
        self._history.append(channel, publication, trio.current_time())
        if feed and (not self._interest or covers(self.filters, channel)):
            for consumer in self._feeds:
                consumer.push(publication)
        return publication

    async def want(self, filters: Filters) -> Filters:
        if filters != self.filters:
            self.filters = filters
            self.wants += 1
        await trio.lowlevel.checkpoint()
        return filters if self._interest else None

    def open_feed(self) -> AbstractAsyncContextManager[trio.MemoryReceiveChannel[FeedItem]]:
        return open_bounded_feed(self._feeds, self._feed_capacity, self.feed_stats)

    async def read_after(self, channel: str, after: int, limit: int) -> HistoryPage:
        await trio.lowlevel.checkpoint()
        return HistoryPage(
            epoch=self._epoch,
            latest_seq=self._history.last_seq(channel),
            messages=self._history.after(channel, after, limit, trio.current_time()),
        )

    async def latest_positions(self, pattern: str, limit: int) -> dict[str, int] | None:
        await trio.lowlevel.checkpoint()
        history = self._history
        found = [name for name in history.channels() if matches(pattern, name)]
        if len(found) > limit:
            return None
        return {name: history.last_seq(name) for name in found}

    async def latest(self, channel: str) -> Publication | None:
        await trio.lowlevel.checkpoint()
        return self._history.latest(channel, trio.current_time())

    def lose_history(self) -> None:
        """Drop the history, as a broker restart would: a new epoch begins."""
        self._history.clear()
        self._epoch = new_epoch()
        self._seq = 0
