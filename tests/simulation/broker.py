"""The simulation's broker: the real ``MemoryBroker`` (history, epochs, bounded feeds), with a
fault that the NATS path has and one process does not, and a record of the truth.

- ``publish_nowait(..., feed=False)`` (a dark publication) stores a publication in the
  history without feeding it to the server, as a message lost between the broker and one
  server would be: the server sees the next one's ``prev`` skip positions (a ``missed``
  gap), and recoveries find it in the history.
- ``lag``: publications reach the history at once and the server's feed a little later (the
  publisher calls ``flush_feed``), so a recovery may read messages the feed has yet to bring.
- History reads take a virtual while (a function of the channel and position only, so it
  does not depend on the tasks' interleaving), so live messages arrive while a recovery reads:
  the seam between replay and live is exercised.
- ``truth`` keeps, per epoch and channel, every position published with its ``prev`` and
  body: what the checker compares every delivered event and gap notice against.
"""

from __future__ import annotations

import bisect
import zlib
from contextlib import AbstractAsyncContextManager

import attrs
import trio

from odin_fanout.broker.base import BoundedFeed, FeedItem, FeedStats, HistoryPage, open_bounded_feed
from odin_fanout.broker.memory import MemoryBroker
from odin_fanout.protocol.publication import Publication


@attrs.define
class ChannelTruth:
    seqs: list[int] = attrs.Factory(list)
    """Positions of the channel's publications, ascending."""
    messages: dict[int, tuple[int, bytes]] = attrs.Factory(dict)
    """seq -> (prev, body)."""

    def between(self, low: int, high: int) -> list[int]:
        """Positions in ``low``..``high`` inclusive."""
        return self.seqs[bisect.bisect_left(self.seqs, low) : bisect.bisect_right(self.seqs, high)]

    def last(self) -> int:
        return self.seqs[-1] if self.seqs else 0


@attrs.define
class Truth:
    epochs: list[str] = attrs.Factory(list)
    channels: dict[tuple[str, str], ChannelTruth] = attrs.Factory(dict)
    published: int = 0
    dark: int = 0

    def record(self, publication: Publication, dark: bool) -> None:
        if not self.epochs or self.epochs[-1] != publication.epoch:
            self.epochs.append(publication.epoch)
        key = (publication.epoch, publication.channel)
        channel = self.channels.get(key)
        if channel is None:
            channel = self.channels[key] = ChannelTruth()
        channel.seqs.append(publication.seq)
        channel.messages[publication.seq] = (publication.prev, publication.payload)
        self.published += 1
        self.dark += dark

    def channel(self, epoch: str, channel: str) -> ChannelTruth:
        return self.channels.get((epoch, channel)) or ChannelTruth()

    def epoch_index(self, epoch: str) -> int:
        return self.epochs.index(epoch) if epoch in self.epochs else -1


class SimBroker(MemoryBroker):
    def __init__(
        self,
        *,
        max_messages: int,
        feed_capacity: int,
        read_latency: float,
        latest_latency: float,
        max_age: float = 1e9,
    ) -> None:
        super().__init__(max_messages=max_messages, max_age=max_age, feed_capacity=feed_capacity)
        self.truth = Truth([self.epoch])
        self.sim_feeds: list[BoundedFeed] = []
        self.sim_feed_stats = FeedStats()
        self._sim_capacity = feed_capacity
        self._read_latency = read_latency
        self._latest_latency = min(read_latency, latest_latency)
        self.lag = False
        """Keep publications from the feed until ``flush_feed``: the history is ahead of the
        server's feed meanwhile, as JetStream's is of a consumer's."""
        self._lagging: list[Publication] = []

    def open_feed(self) -> AbstractAsyncContextManager[trio.MemoryReceiveChannel[FeedItem]]:
        # The server's feed is ours (the parent's list of feeds stays empty), so that a
        # publication can go to the history without reaching the server.
        return open_bounded_feed(self.sim_feeds, self._sim_capacity, self.sim_feed_stats)

    def publish_nowait(self, channel: str, payload: bytes, *, feed: bool = True) -> Publication:
        """``feed=False``: a dark publication, in the history but never fed to the server."""
        publication = super().publish_nowait(channel, payload)
        self.truth.record(publication, not feed)
        if feed:
            if self.lag:
                self._lagging.append(publication)
            else:
                self._push(publication)
        return publication

    def flush_feed(self) -> None:
        """Feed what ``lag`` kept back, in order."""
        lagging, self._lagging = self._lagging, []
        for publication in lagging:
            self._push(publication)

    def _push(self, publication: Publication) -> None:
        for feed in self.sim_feeds:
            feed.push(publication)

    def lose_history(self) -> None:
        super().lose_history()
        self.truth.epochs.append(self.epoch)

    async def _latency(self, channel: str, after: int, most: float) -> None:
        if most:
            fraction = zlib.crc32(f"{channel}/{after}".encode()) / 0xFFFFFFFF
            await trio.sleep(most * fraction)

    async def read_after(self, channel: str, after: int, limit: int) -> HistoryPage:
        await self._latency(channel, after, self._read_latency)
        return await super().read_after(channel, after, limit)

    async def latest(self, channel: str) -> Publication | None:
        await self._latency(channel, -1, self._latest_latency)
        return await super().latest(channel)
