"""The broker boundary: what Odin needs from the bus that carries and keeps publications.

A broker positions every publication in its history (``seq``, ``prev``, ``epoch``: see
``odin.protocol.publication``), hands them to the server in history order through a bounded
feed, and answers history reads for recovery and replay. The in-memory broker implements it
in-process; the NATS broker implements it on JetStream so positions are shared by every
server process and survive restarts. Callers never see a broker's own types or errors.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Protocol

import attrs
import trio

from odin.protocol.publication import Gap, Publication

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


@attrs.define
class FeedStats:
    delivered: int = 0
    dropped: int = 0
    """Publications the feed could not take (the server fell behind); announced as gaps."""


class Broker(Protocol):
    @property
    def epoch(self) -> str:
        """The current history's name."""
        ...

    def status(self) -> BrokerStatus: ...

    async def publish(self, channel: str, payload: bytes) -> None:
        """Publish a JSON payload on a channel; raise BrokerError if it cannot be taken."""
        ...

    def open_feed(self) -> AbstractAsyncContextManager[trio.MemoryReceiveChannel[FeedItem]]:
        """Every publication from now on, in history order, through a bounded channel."""
        ...

    async def read_after(self, channel: str, after: int, limit: int) -> HistoryPage:
        """Up to ``limit + 1`` of the oldest retained messages of ``channel`` after ``after``."""
        ...

    async def latest(self, channel: str) -> Publication | None:
        """The newest retained message of ``channel``."""
        ...
