"""The broker boundary: what Odin needs from the bus that carries and keeps publications.

A broker positions every publication in its history (``seq``, ``prev``, ``epoch``: see
``odin_fanout.protocol.publication``), hands them to the server in history order through a bounded
feed, and answers history reads for recovery and replay. The in-memory broker implements it
in-process; the NATS broker implements it on JetStream so positions are shared by every
server process and survive restarts. Callers never see a broker's own types or errors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

import attrs
import trio

from odin_fanout.protocol.channels import Filters
from odin_fanout.protocol.publication import Gap, Publication

FeedItem = Publication | Gap
"""The feed carries publications in history order, and a ``Gap`` where the broker knows it
had to skip some (for example a full feed)."""


class BrokerError(Exception):
    """The broker could not do what was asked; ``__cause__`` holds the underlying error."""


@attrs.frozen
class HistoryPage:
    """A read of one channel's history after a position."""

    epoch: str
    latest_seq: int
    """The channel's newest position at the time of the read (0 if it has none)."""
    messages: list[Publication]
    """The oldest retained messages after the position, oldest first, at most limit + 1."""


@attrs.frozen
class BrokerStatus:
    connected: bool
    detail: str
    """Human-readable state, for /health."""
    location: str = ""
    """Where the history is (server URLs and stream), for /health and people."""


@attrs.define
class BrokerStats:
    """What a broker has done, for metrics (read at scrape time)."""

    connected: bool = False
    reconnects: int = 0
    disconnects: int = 0
    ingested: int = 0
    """Publications received from the bus."""
    ingest_dropped: int = 0
    """Publications the feed had to drop (announced to clients as gaps)."""
    bad_subjects: int = 0
    """Messages on subjects that are not ``odin.token.SYMBOL.event``."""
    discontinuities: int = 0
    """Times messages left the history before this process could read them."""
    resumes: int = 0
    """Times delivery of the history started again after the last message read (after a
    skipped delivery, a lost connection or a silent consumer)."""
    pending: int = 0
    """Messages in the history not yet delivered to this process."""
    history_reads: int = 0
    published: int = 0
    """Publications the broker acknowledged (stored)."""
    publish_failed: int = 0
    """Publications refused or lost (after their retries)."""
    publish_retries: int = 0
    """Publications sent again after a failed or missing acknowledgement."""
    publish_dropped: int = 0
    """Publications given up after their retries outlasted their bound (also counted in
    ``publish_failed``)."""
    publish_retrying: int = 0
    """Publications being retried now (waiting for their next attempt or its answer)."""
    publish_in_flight: int = 0
    """Publications handed over and not yet settled (queued, awaiting their acknowledgement,
    or being retried): zero once everything handed over is stored or counted failed."""


@attrs.define
class FeedStats:
    delivered: int = 0
    dropped: int = 0
    """Publications the feed could not take (the server fell behind); announced as gaps."""


@attrs.define(eq=False)
class BoundedFeed:
    """One consumer's bounded feed. A publication that does not fit is dropped and remembered
    per channel; the next time there is room, a ``Gap`` naming the dropped positions goes first."""

    send: trio.MemorySendChannel[FeedItem]
    stats: FeedStats
    missed: dict[str, tuple[int, int]] = attrs.Factory(dict)

    def push(self, publication: Publication) -> None:
        try:
            while self.missed:
                channel, (first, last) = next(iter(self.missed.items()))
                self.send.send_nowait(Gap(channel, first, last, "feed_overflow"))
                del self.missed[channel]
            self.send.send_nowait(publication)
            self.stats.delivered += 1
        except trio.WouldBlock:
            self.stats.dropped += 1
            first, _ = self.missed.get(publication.channel, (publication.seq, 0))
            self.missed[publication.channel] = (first, publication.seq)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


@asynccontextmanager
async def open_bounded_feed(
    feeds: list[BoundedFeed], capacity: int, stats: FeedStats
) -> AsyncIterator[trio.MemoryReceiveChannel[FeedItem]]:
    """A broker's ``open_feed``: a new feed in ``feeds`` (which the broker pushes to) for the
    duration of the block."""
    send, receive = trio.open_memory_channel[FeedItem](capacity)
    feed = BoundedFeed(send, stats)
    feeds.append(feed)
    try:
        with send, receive:
            yield receive
    finally:
        feeds.remove(feed)


class Broker(Protocol):
    @property
    def epoch(self) -> str:
        """The current history's name."""
        ...

    def status(self) -> BrokerStatus: ...

    def stats(self) -> BrokerStats: ...

    async def wait_ready(self) -> None:
        """Return once the broker has connected and knows its history (at least once)."""
        ...

    async def publish(self, channel: str, payload: bytes, msg_id: str | None = None) -> None:
        """Publish a JSON payload on a channel; raise BrokerError if it cannot be taken.
        ``msg_id`` lets the broker store a retried publish once."""
        ...

    def open_feed(self) -> AbstractAsyncContextManager[trio.MemoryReceiveChannel[FeedItem]]:
        """Every publication from now on, in history order, through a bounded channel."""
        ...

    async def want(self, filters: Filters) -> Filters:
        """From now on feed only the channels ``filters`` deliver (None: every channel);
        return, once every message stored from then on that they match will be fed, what it
        feeds now (None from a broker that always feeds everything). A channel's messages fed
        after a pause in its interest carry its true ``prev``."""
        ...

    async def read_after(self, channel: str, after: int, limit: int) -> HistoryPage:
        """Up to ``limit + 1`` of the oldest retained messages of ``channel`` after ``after``."""
        ...

    async def latest(self, channel: str) -> Publication | None:
        """The newest retained message of ``channel``."""
        ...

    async def latest_positions(self, pattern: str, limit: int) -> dict[str, int] | None:
        """The newest retained position of every channel ``pattern`` covers that has one;
        None when more than ``limit`` channels do."""
        ...
