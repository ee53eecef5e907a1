"""The NATS broker: JetStream as Odin's history, seen from Trio.

This package is the only code that touches asyncio, nats-py or trio-asyncio, and nothing of
theirs leaves it: callers see ``Publication``, ``HistoryPage``, ``BrokerStatus`` and
``BrokerError``.

Four connections (three for a publisher's broker, which reads no history). nats-py, on a
trio-asyncio loop, does what costs one runtime crossing (about 130 µs) per call rather than
per message: managing the stream. The paths with a NATS message per event run in Trio on
connections of their own that speak the NATS protocol directly (``link.py``): the stream's
messages arrive through ``delivery.py`` and ``_on_delivery`` turns each into a
``Publication`` for the feed; ``publish`` goes through ``publish.py``, pipelined, with
acknowledgements, retries and a bound; history reads (recovery, a channel's latest, a
channel's first predecessor) are direct gets through ``direct.py`` (a recovery of 100
messages: 1.7 ms and 1 ms of CPU there, 14 ms and 14 ms of CPU through nats-py).

Positions: ``seq`` is the stream sequence. ``prev`` is the stream sequence of the previous
message on the same subject. The consumer reads every message of the subjects it is given in
order, so the bridge knows ``prev`` for every channel it has seen a message of; for the first
message of a channel it asks the stream (``multi_last`` up to ``seq - 1``). When that
predecessor is gone (removed by the stream's limits) it reports ``prev = seq - 1``: the most
recent position it could have had, so a client that saw anything older sees a gap rather
than silence. The first messages of the channels in one read are looked up together, the
lookups pipelined, and the read's messages handed on in order once they are answered: one
round trip per read, however many channels it starts, instead of one per channel in turn.

Interest (``want``): the consumer delivers only the subjects the server's clients want.
A channel it stops delivering is forgotten (its next message, once wanted again, is looked up).
What a remembered ``prev`` relies on is that no message of its channel was removed before the
consumer reached it; limits remove the oldest first, so that needs the consumer to fall behind
the stream's retention. Consuming everything, a jump in stream positions shows it. With
filters, positions jump anyway, so it is checked where it can be seen: when a consumer starts
(the stream's first position past where it starts), at every stream check (the same, and a
backlog of half ``max_msgs_per_subject`` matching messages), and any of them forgets every
channel's last position (each next message is looked up: exact, or a gap).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, ParamSpec, TypeVar

import nats
import nats.errors
import trio
import trio_asyncio
from nats.aio.client import Client, Server
from nats.js import JetStreamContext
from nats.js.api import StreamInfo
from nats.js.errors import NotFoundError

from odin_fanout.broker.base import (
    BoundedFeed,
    BrokerError,
    BrokerStats,
    BrokerStatus,
    FeedItem,
    FeedStats,
    HistoryPage,
    open_bounded_feed,
)
from odin_fanout.broker.nats import jetstream
from odin_fanout.broker.nats.auth import Security
from odin_fanout.broker.nats.delivery import Delivery, DeliverySettings
from odin_fanout.broker.nats.direct import DirectReads, ReadLink
from odin_fanout.broker.nats.jetstream import (
    SUBJECTS,
    HistoryReads,
    NatsPyReads,
    ReadFailed,
    Stored,
)
from odin_fanout.broker.nats.link import LOST, Link, LinkSettings
from odin_fanout.broker.nats.publish import JetStreamPublisher, retry_window
from odin_fanout.config import NatsSection, nats_addresses
from odin_fanout.logs import Log
from odin_fanout.protocol.channels import Filters, channel_from_subject, covers, subject_for
from odin_fanout.protocol.publication import Publication

P = ParamSpec("P")
T = TypeVar("T")


async def aio(function: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run an asyncio coroutine function from Trio (trio-asyncio's ``aio_as_trio``, typed)."""
    result: T = await trio_asyncio.aio_as_trio(function)(*args, **kwargs)
    return result


_UNWANTED = ""
"""In the subject cache: a subject of a channel the consumer no longer delivers (a message
of it still in flight from before the change is not handed on)."""

# Channels whose last position the bridge remembers. Past it the memory is cleared: each
# channel's next message then looks its predecessor up in the stream (one read, then cached).
_REMEMBERED_CHANNELS = 100_000
_READ_TIMEOUT = 5.0
_FAILURES = (
    nats.errors.Error,
    ReadFailed,
    TimeoutError,
    OSError,
    KeyError,
    ValueError,
    *LOST,
)


class NatsBroker:
    """``consume=False`` makes a publisher's broker: no delivery of the stream (``open_feed``
    yields nothing), and a missing stream is created but an existing one is left as it is
    (the servers' configuration owns its limits)."""

    def __init__(
        self, settings: NatsSection, *, feed_capacity: int, log: Log, consume: bool = True
    ) -> None:
        self._settings = settings
        self._consume = consume
        self._feed_capacity = feed_capacity
        self._log = log.bind(broker="nats")
        self._addresses = nats_addresses(settings.url)
        self._security = Security.from_settings(settings)
        self._servers = [address.url for address in self._addresses]
        shown = ", ".join(address.display for address in self._addresses)
        self._location = f"{shown} (stream {settings.stream})"
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._epoch = ""
        self._lossless = False
        self._detail = "connecting"
        self._feeds: list[BoundedFeed] = []
        self.feed_stats = FeedStats()
        self._stats = BrokerStats()
        # Ingest state, touched only by ``_on_delivery``.
        self._last: dict[str, int] = {}
        """The last position of each channel seen: the next message's prev."""
        self._channels: dict[bytes, str] = {}
        """Channel of each subject seen (a cache of channel_from_subject), or ``_UNWANTED``."""
        self._last_stream_seq = 0
        self._filters: Filters = None
        """What the consumer delivers (None: every channel)."""
        self._backlog: list[tuple[str, int, float, bytes]] = []
        """Messages of the current read held back behind first-message lookups."""
        self._first_seen: dict[str, int] = {}
        """Channels of the backlog whose predecessor must be looked up: their first position."""
        self._delivery: Delivery | None = None
        self._publisher = JetStreamPublisher(
            self._link_settings(),
            ack_timeout=settings.publish_ack_timeout,
            capacity=settings.publish_queue,
            retry_for=retry_window(settings.duplicate_window),
            stats=self._stats,
            on_failure=self._publish_failed,
            log=self._log,
        )
        self._read_link = ReadLink(self._link_settings(), self._log)
        self._reads = DirectReads(self._read_link, settings.stream, _READ_TIMEOUT)
        self.trio_reads = consume
        """History reads on ``direct.py``'s Trio connection; False: through nats-py (the
        former path: a publisher's broker, which reads no history and so opens no connection
        for it, and ``stress/odin_fanout/stress/bench_recovery.py``'s comparison)."""
        self._logged: dict[str, float] = {}
        self._ready = trio.Event()
        self._closing = False
        self._stopping = False
        """Closing: publishes are refused."""

    # ---- Broker --------------------------------------------------------------------------

    @property
    def epoch(self) -> str:
        return self._epoch

    @property
    def lossless(self) -> bool:
        """Whether the stream has never removed a message (as last checked): a channel's
        first retained message is then its first (prev 0), else its prev is unknown."""
        return self._lossless

    @property
    def links(self) -> dict[str, Link]:
        """The broker's own Trio connections to NATS by role: ``delivery`` (once consuming),
        ``publish`` and ``reads``, each with ``connected`` and its ``server``."""
        links: dict[str, Link] = {"publish": self._publisher, "reads": self._read_link}
        if self._delivery is not None:
            links["delivery"] = self._delivery
        return links

    def status(self) -> BrokerStatus:
        nc = self._nc
        delivery = self._delivery
        connected = (
            nc is not None
            and nc.is_connected
            and bool(self._epoch)
            and (not self._consume or (delivery is not None and delivery.connected))
            # Reads (recovery, replay) have a connection of their own: ready means they work.
            and (not self.trio_reads or self._read_link.connected)
        )
        detail = self._detail
        if connected is False and self._detail == "connected":
            detail = "connected, waiting for the stream's deliveries and history reads"
        return BrokerStatus(connected, detail, self._location)

    def stats(self) -> BrokerStats:
        self._stats.connected = self.status().connected
        self._stats.ingest_dropped = self.feed_stats.dropped
        self._stats.publish_in_flight = self._publisher.in_flight
        if self._delivery is not None:
            self._stats.pending = self._delivery.pending
            self._stats.resumes = self._delivery.resumes
        return self._stats

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def publish(self, channel: str, payload: bytes, msg_id: str | None = None) -> None:
        """Queue a publish into the stream. With ``msg_id`` (``Nats-Msg-Id``) a publish whose
        acknowledgement fails or times out is retried, and the stream stores it once.

        While a connection is down (reconnecting) publishes are queued, not refused: they go
        out, in order, once it is back, or are dropped (counted) past the retry window. It
        refuses (``BrokerError``) only when the queue is full or the broker is closing.

        It does not yield: a caller publishing many in a row (the simulator's tick) lets the
        writer send them in one batch when it next waits."""
        publisher = self._require_publisher()
        try:
            publisher.publish(subject_for(channel), payload, msg_id)
        except BrokerError as exc:
            raise self._refusal(exc) from None

    def publish_plain(self, subject: str, payload: bytes) -> None:
        """A plain NATS publish, outside the stream (nothing stores it, nothing acknowledges
        it): for announcements such as market statistics. Queued like ``publish``."""
        publisher = self._require_publisher()
        try:
            publisher.publish_plain(subject, payload)
        except BrokerError as exc:
            raise self._refusal(exc) from None

    def _require_publisher(self) -> JetStreamPublisher:
        if self._stopping:
            self._stats.publish_failed += 1
            raise BrokerError("the NATS broker is closing")
        return self._publisher

    def _refusal(self, exc: BrokerError) -> BrokerError:
        """The publisher's refusal (its queue is full), saying which connection is down."""
        nc = self._nc
        if nc is not None and not nc.is_connected:
            return BrokerError(f"{exc}; the NATS management connection is {self._detail}")
        return exc

    def stop_publishing(self) -> None:
        """From now on ``publish`` refuses: the broker is closing (what is queued drains)."""
        self._stopping = True

    def open_feed(self) -> AbstractAsyncContextManager[trio.MemoryReceiveChannel[FeedItem]]:
        return open_bounded_feed(self._feeds, self._feed_capacity, self.feed_stats)

    async def read_after(self, channel: str, after: int, limit: int) -> HistoryPage:
        subject = subject_for(channel)
        try:
            if self.trio_reads:
                page = await self._read_after(self._direct(), subject, after, limit)
            else:
                page = await aio(self._read_after, self._nats_py(), subject, after, limit)
        except _FAILURES as exc:
            raise BrokerError(f"history read failed: {exc!r}") from exc
        self._stats.history_reads += 1
        return page

    async def latest(self, channel: str) -> Publication | None:
        subject = subject_for(channel)
        try:
            if self.trio_reads:
                return await self._latest(self._direct(), subject)
            return await aio(self._latest, self._nats_py(), subject)
        except _FAILURES as exc:
            raise BrokerError(f"history read failed: {exc!r}") from exc

    async def last_before(self, channel: str, seq: int) -> Stored | None:
        """The channel's last stored message before position ``seq`` (None: none retained),
        on the path ``trio_reads`` chooses: the read that links a page to its predecessor."""
        subject = subject_for(channel)
        try:
            if self.trio_reads:
                return await self._direct().last_before(subject, seq)
            return await aio(self._nats_py().last_before, subject, seq)
        except _FAILURES as exc:
            raise BrokerError(f"history read failed: {exc!r}") from exc

    async def latest_positions(self, pattern: str, limit: int) -> dict[str, int] | None:
        subjects = subject_for(pattern)
        try:
            if self.trio_reads:
                stored = await self._direct().last_of_each(subjects, limit + 1)
            else:
                stored = await aio(self._nats_py().last_of_each, subjects, limit + 1)
        except _FAILURES as exc:
            raise BrokerError(f"history read failed: {exc!r}") from exc
        if len(stored) > limit:
            return None
        positions = {}
        for message in stored:
            channel = channel_from_subject(message.subject)
            if channel is not None:
                positions[channel] = message.seq
        return positions

    async def want(self, filters: Filters) -> Filters:
        """Consume only the channels ``filters`` deliver (None: all) from now on; return once
        the consumer delivers them (at once before it first starts, which it does with them).
        Channels no longer delivered are forgotten: a message of one still in flight is not
        handed on, and when one is wanted again its first message is looked up."""
        if filters == self._filters:
            return filters
        self._filters = filters
        self._channels.clear()
        self._last_stream_seq = 0  # the new consumer's positions jump past the old filters'

        for channel in [c for c in self._last if not covers(filters, c)]:
            del self._last[channel]
        if self._delivery is not None:
            await self._delivery.set_filters(_subjects(filters))
        return filters

    def _direct(self) -> DirectReads:
        """The reads on the Trio connection: connected, with the stream's epoch known."""
        if not self._read_link.connected or not self._epoch:
            raise BrokerError(f"NATS history reads are not connected ({self._detail})")
        return self._reads

    def _nats_py(self) -> NatsPyReads:
        """The reads through nats-py: connected, with the stream's epoch known."""
        nc = self._nc
        if nc is None or not nc.is_connected or not self._epoch:
            raise BrokerError(f"NATS is not connected ({self._detail})")
        return NatsPyReads(nc, self._settings.stream, _READ_TIMEOUT)

    # ---- history reads (the same on either side: Trio, or asyncio inside ``aio``) ---------

    async def _read_after(
        self, reads: HistoryReads, subject: str, after: int, limit: int
    ) -> HistoryPage:
        epoch = self._epoch
        stored = await reads.read_after(subject, after, limit + 1)
        if not stored:
            newest = await reads.last_of(subject)
            if newest is not None and newest.seq > after:
                # Published between the two reads: read once more.
                stored = await reads.read_after(subject, after, limit + 1)
            else:
                return HistoryPage(epoch, newest.seq if newest else 0, [])
        first_prev = await self._prev_in_stream(reads, subject, stored[0].seq)
        return HistoryPage(epoch, stored[-1].seq, self._linked(subject, stored, first_prev))

    async def _latest(self, reads: HistoryReads, subject: str) -> Publication | None:
        newest = await reads.last_of(subject)
        if newest is None:
            return None
        prev = await self._prev_in_stream(reads, subject, newest.seq)
        return self._linked(subject, [newest], prev)[0]

    def _linked(self, subject: str, stored: list[Stored], first_prev: int) -> list[Publication]:
        channel = channel_from_subject(subject)
        assert channel is not None
        publications = []
        prev = first_prev
        for message in stored:
            publications.append(
                Publication(channel, message.seq, prev, self._epoch, message.ts, message.data)
            )
            prev = message.seq
        return publications

    async def _prev_in_stream(self, reads: HistoryReads, subject: str, seq: int) -> int:
        """The position before ``seq`` on ``subject``, from the stream."""
        before = await reads.last_before(subject, seq)
        if before is not None:
            return before.seq
        # Nothing retained before it: it is the channel's first message if the stream never
        # removed one; otherwise its predecessor is unknown, and seq - 1 is the safe answer.
        return 0 if self._lossless else seq - 1

    # ---- ingest (Trio side: the delivery reader awaits this for each message, in order) ----

    def _on_delivery(
        self, subject: bytes, seq: int, timestamp: float, payload: bytes
    ) -> Awaitable[None] | None:
        """One message of the stream, in order. Synchronous (it runs for every message): a
        channel's first message, whose predecessor is looked up in the stream, and every
        message after it in the same read wait in the backlog (``_on_batch_end``)."""
        if self._last_stream_seq and seq > self._last_stream_seq + 1 and self._filters is None:
            # Every message of the stream matches the consumer, so a jump means messages were
            # removed before we read them: which channels they belonged to is unknown.
            self._last.clear()
            self._stats.discontinuities += 1
        if seq > self._last_stream_seq:
            self._last_stream_seq = seq
        channel = self._channels.get(subject)
        if channel is None:
            name = subject.decode(errors="replace")
            channel = channel_from_subject(name)
            if channel is None:
                self._stats.bad_subjects += 1
                self._warn_once(f"subject:{name.count('.')}", "bad_subject", subject=name)
                return None
            if not covers(self._filters, channel):
                channel = _UNWANTED
            if len(self._channels) < _REMEMBERED_CHANNELS:
                self._channels[subject] = channel
        if not channel:  # _UNWANTED
            return None
        if self._backlog:
            self._backlog.append((channel, seq, timestamp, payload))
            if channel not in self._last and channel not in self._first_seen:
                self._first_seen[channel] = seq
            return None
        prev = self._last.get(channel)
        if prev is None:
            self._backlog.append((channel, seq, timestamp, payload))
            self._first_seen[channel] = seq
            return None
        self._deliver(channel, seq, prev, timestamp, payload)
        return None

    def _on_batch_end(self) -> Awaitable[None] | None:
        return self._deliver_backlog() if self._backlog else None

    async def _deliver_backlog(self) -> None:
        """Look up the predecessors of the backlog's new channels at once, then hand the
        backlog on in order."""
        first_seen, self._first_seen = self._first_seen, {}
        found: dict[str, int] = {}

        async def look_up(channel: str, seq: int) -> None:
            found[channel] = await self._first_prev(subject_for(channel), seq)

        async with trio.open_nursery() as nursery:
            for channel, seq in first_seen.items():
                nursery.start_soon(look_up, channel, seq)
        if len(self._last) > _REMEMBERED_CHANNELS:
            self._last.clear()
        backlog, self._backlog = self._backlog, []
        last = self._last
        for channel, seq, timestamp, payload in backlog:
            prev = last.get(channel)
            if prev is None:
                prev = found.get(channel, seq - 1)  # forgotten meanwhile: the safe answer
            self._deliver(channel, seq, prev, timestamp, payload)

    def _deliver(self, channel: str, seq: int, prev: int, timestamp: float, payload: bytes) -> None:
        self._last[channel] = seq
        publication = Publication(channel, seq, prev, self._epoch, timestamp, payload)
        self._stats.ingested += 1
        for feed in self._feeds:
            feed.push(publication)

    async def _first_prev(self, subject: str, seq: int) -> int:
        """``prev`` of the first message of a channel this process sees: from the stream."""
        try:
            if self.trio_reads:
                if not self._read_link.connected:
                    return seq - 1
                return await self._prev_in_stream(self._reads, subject, seq)
            nc = self._nc
            if nc is None:
                return seq - 1
            reads = NatsPyReads(nc, self._settings.stream, _READ_TIMEOUT)
            return await aio(self._prev_in_stream, reads, subject, seq)
        except _FAILURES:
            return seq - 1

    # ---- publishing ----------------------------------------------------------------------

    def _publish_failed(self, reason: str) -> None:
        """A publish lost for good (counted by the publisher)."""
        self._warn_once("publish", "publish_failed", error=reason, every=5.0)

    # ---- connection (asyncio callbacks) --------------------------------------------------

    async def _on_error(self, error: Exception) -> None:
        if self._closing:
            return
        self._warn_once(f"error:{type(error).__name__}", "nats_error", error=repr(error), every=10)

    async def _on_disconnected(self) -> None:
        if self._closing:
            return
        self._detail = "disconnected, reconnecting"
        self._stats.disconnects += 1
        self._log.warning("nats_disconnected")

    async def _on_reconnected(self) -> None:
        self._detail = "connected"
        self._stats.reconnects += 1
        nc = self._nc
        url = nc.connected_url if nc is not None else None
        server = f"nats://{url.hostname}:{url.port}" if url is not None else None
        self._log.info("nats_reconnected", server=server)  # never the URL's credentials

    async def _on_closed(self) -> None:
        self._detail = "closed"

    def _choose_server(self, servers: list[Server], _: dict[str, object]) -> tuple[Server, float]:
        """Reconnect forever, backing off exponentially with jitter (nats-py's default stops
        after 60 tries, about two minutes, and retries without jitter)."""
        server = min(servers, key=lambda candidate: candidate.reconnects)
        settings = self._settings
        wait = min(settings.reconnect_wait_max, settings.reconnect_wait_min * 2**server.reconnects)
        return server, wait * random.uniform(0.5, 1.0)

    def _warn_once(self, key: str, event: str, *, every: float = 0.0, **fields: object) -> None:
        """Log ``event`` once per ``key`` (or at most every ``every`` seconds)."""
        now = time.monotonic()  # called from both runtimes
        last = self._logged.get(key)
        if last is not None and (not every or now - last < every):
            return
        if len(self._logged) < 10_000:
            self._logged[key] = now
        self._log.warning(event, **fields)

    # ---- lifecycle (Trio side) -----------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect (retrying for ever), keep the stream and the consumer, watch the epoch."""
        task_status.started()
        await self._wait_until_reachable()
        settings = self._settings
        self._nc = await self._connect()
        self._js = self._nc.jetstream()
        self._detail = "connected"
        self._log.info("nats_connected", servers=[a.display for a in self._addresses])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._publisher.run)
            if self._consume:
                nursery.start_soon(self._read_link.run)
            await self._attach()
            if not self._consume:
                self._ready.set()
                self._log.info("broker_ready", stream=settings.stream, epoch=self._epoch)
                while True:
                    await trio.sleep(settings.stream_check_interval)
                    await self._check_stream()
            self._delivery = Delivery(
                DeliverySettings(
                    stream=settings.stream,
                    filter_subjects=_subjects(self._filters),
                    heartbeat=settings.consumer_heartbeat,
                ),
                self._link_settings(),
                self._on_delivery,
                self._on_stream,
                self._log,
                on_batch_end=self._on_batch_end,
            )
            # A channel's first delivery looks its predecessor up on the reads' connection.
            await self._read_link.ready.wait()
            nursery.start_soon(self._delivery.run)
            await self._delivery.ready.wait()
            self._ready.set()
            self._log.info("broker_ready", stream=settings.stream, epoch=self._epoch)
            while True:
                await trio.sleep(settings.stream_check_interval)
                await self._check_stream()

    def _connect_options(self) -> dict[str, Any]:
        """nats-py's connect options: TLS (its context; nats-py upgrades when the server
        requires it) and credentials, as the Trio connections use them."""
        settings = self._settings
        security = self._security
        options: dict[str, Any] = {}
        if security.context is not None:
            options["tls"] = security.context
        if security.server_name:
            options["tls_hostname"] = security.server_name
        if security.creds:
            options["user_credentials"] = security.creds
        elif security.nkey_seed:
            options["nkeys_seed"] = security.nkey_seed
        return dict(
            servers=self._servers,
            name="odin",
            connect_timeout=settings.connect_timeout,
            max_reconnect_attempts=-1,
            reconnect_time_wait=settings.reconnect_wait_min,
            reconnect_to_server_handler=self._choose_server,
            ping_interval=settings.ping_interval,
            max_outstanding_pings=settings.max_outstanding_pings,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            closed_cb=self._on_closed,
            **options,
        )

    async def _connect(self) -> Client:
        """nats-py's first connection, retried with backoff and jitter until it succeeds
        (a TLS or credentials problem is logged, once, and the broker stays disconnected)."""
        attempt = 0
        while True:
            try:
                return await aio(self._connect_once)
            except _FAILURES as exc:
                self._detail = f"connect failed: {exc!r}"
                if attempt == 0:
                    self._log.warning("nats_connect_failed", error=repr(exc))
                settings = self._settings
                wait = min(settings.reconnect_wait_max, settings.reconnect_wait_min * 2**attempt)
                attempt += 1
                await trio.sleep(wait * random.uniform(0.5, 1.0))

    async def _connect_once(self) -> Client:
        return await nats.connect(**self._connect_options())

    def _link_settings(self) -> LinkSettings:
        settings = self._settings
        return LinkSettings(
            servers=self._addresses,
            ping_interval=settings.ping_interval,
            max_outstanding_pings=settings.max_outstanding_pings,
            connect_timeout=settings.connect_timeout,
            reconnect_wait_min=settings.reconnect_wait_min,
            reconnect_wait_max=settings.reconnect_wait_max,
            security=self._security,
        )

    async def _wait_until_reachable(self) -> None:
        """Probe the servers' TCP ports with backoff and jitter until one answers (nats-py's
        first connect retries at a fixed pace)."""
        attempt = 0
        while True:
            for address in self._addresses:
                try:
                    with trio.fail_after(self._settings.connect_timeout):
                        stream = await trio.open_tcp_stream(address.host, address.port)
                except (OSError, trio.TooSlowError) as exc:
                    if attempt == 0:
                        self._log.warning(
                            "nats_unreachable", server=address.display, error=str(exc)
                        )
                    continue
                await stream.aclose()
                return
            self._detail = f"unreachable ({attempt + 1} attempts)"
            wait = min(
                self._settings.reconnect_wait_max, self._settings.reconnect_wait_min * 2**attempt
            )
            attempt += 1
            await trio.sleep(wait * random.uniform(0.5, 1.0))

    async def _attach(self) -> None:
        """Make sure the stream exists and adopt its epoch."""
        attempt = 0
        while True:
            try:
                info = await aio(self._ensure_stream)
                break
            except _FAILURES as exc:
                self._detail = f"stream unavailable: {exc!r}"
                if attempt == 0:
                    self._log.warning("stream_unavailable", stream=self._settings.stream,
                                      error=repr(exc))  # fmt: skip
                attempt += 1
                await trio.sleep(min(self._settings.reconnect_wait_max, 0.5 * 2**attempt))
        self._adopt(info)
        self._detail = "connected"

    async def _ensure_stream(self) -> StreamInfo:
        assert self._js is not None
        return await jetstream.ensure_stream(
            self._js,
            self._settings,
            update=self._consume and self._settings.manage_stream,
            log=self._log,
        )

    def _adopt(self, info: StreamInfo) -> None:
        epoch = jetstream.epoch_of(info)
        if self._epoch and epoch != self._epoch:
            self._log.warning("epoch_changed", stream=info.config.name, old=self._epoch, new=epoch)
        elif not self._epoch:
            self._log.info("stream_ready", stream=info.config.name, epoch=epoch,
                           messages=info.state.messages, last_seq=info.state.last_seq)  # fmt: skip
        self._epoch = epoch
        self._lossless = jetstream.lossless(info)

    async def _check_stream(self) -> None:
        """A stream that was deleted or recreated is a new history: new epoch, new consumer."""
        if self._nc is None or not self._nc.is_connected:
            return
        try:
            info = await aio(self._stream_info)
        except NotFoundError:
            self._log.warning("stream_lost", stream=self._settings.stream)
            await self._attach()
            self._new_history()
            return
        except _FAILURES:
            return
        if jetstream.epoch_of(info) != self._epoch:
            self._adopt(info)
            self._new_history()
            return
        self._lossless = jetstream.lossless(info)
        delivery = self._delivery
        if self._filters is not None and delivery is not None:
            reached = max(delivery.last_stream_seq, delivery.considered)
            if not self._check_removed(info.state.first_seq, reached):
                backlog = delivery.pending
                if backlog >= self._settings.max_msgs_per_subject // 2:
                    self._forget_positions("behind", backlog=backlog)

    def _check_removed(self, first_seq: int, reached: int) -> bool:
        """With filters: the stream's oldest message is past what the consumer had reached,
        so messages it had yet to read were removed (whose, it cannot tell)."""
        if reached and first_seq > reached + 1:
            self._forget_positions("removed_unread", first_seq=first_seq, reached=reached)
            return True
        return False

    def _forget_positions(self, reason: str, **fields: object) -> None:
        """Every channel's next message looks its predecessor up in the stream."""
        self._last.clear()
        self._stats.discontinuities += 1
        self._warn_once(f"discontinuity:{reason}", "nats_positions_forgotten", every=60,
                        reason=reason, **fields)  # fmt: skip

    def _on_stream(self, info: dict[str, Any], after: int) -> bool:
        """The delivery is about to (re)start after position ``after``: is the stream still the
        history we read, and does it still hold what comes after?"""
        state = info.get("state", {})
        first_seq = state.get("first_seq", 0)
        self._lossless = jetstream.lossless_state(first_seq, state.get("num_deleted", 0))
        epoch = jetstream.epoch_of_raw(info)
        if epoch == self._epoch:
            if self._filters is not None:
                self._check_removed(first_seq, after)
            return False
        self._log.warning("epoch_changed", stream=self._settings.stream, old=self._epoch, new=epoch)
        self._epoch = epoch
        self._last.clear()
        self._last_stream_seq = 0
        return True

    def _new_history(self) -> None:
        """Consume the new stream from its first message, with nothing remembered."""
        self._last.clear()
        self._backlog = []
        self._first_seen = {}
        self._last_stream_seq = 0
        if self._delivery is not None:
            self._delivery.last_stream_seq = 0
            self._delivery.restart("all")

    async def _stream_info(self) -> StreamInfo:
        assert self._js is not None
        return await self._js.stream_info(self._settings.stream)

    async def drain(self) -> None:
        """Return once what was published is written and acknowledged (bound it)."""
        await self._publisher.drain()

    def abandon_unsent(self) -> None:
        """After the drain: publishes never stored (NATS down, or too slow to acknowledge) are
        dropped, counted and logged (``publish_dropped``)."""
        self._publisher.abandon()

    async def close(self) -> None:
        """Close the management connection (asyncio side).

        Publications leave through the Trio connection, drained before this, so there is
        nothing of ours to flush here. ``close`` rather than nats-py's ``drain``: a drain
        while NATS is down, reconnecting or partitioned times out and leaves a cancelled
        gather behind, which trio-asyncio re-raises into Trio as a CancelledError traceback
        at exit."""
        nc = self._nc
        self._closing = True
        if nc is None or nc.is_closed:
            return
        try:
            await asyncio.wait_for(nc.close(), timeout=5)
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            self._log.warning("nats_close_failed", error=repr(exc))
        except asyncio.CancelledError:
            # nats-py's close awaits its socket's ``wait_closed``, which raises CancelledError
            # when the peer vanished while the socket closed (NATS killed during our exit):
            # the connection is closed all the same. Our own task being cancelled is not that.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            self._log.warning("nats_close_failed", error="the peer vanished while it closed")


@asynccontextmanager
async def open_nats_broker(
    settings: NatsSection, *, feed_capacity: int, log: Log, consume: bool = True
) -> AsyncIterator[NatsBroker]:
    """A NATS broker whose connection lives inside this block; it connects in the background
    (``status().connected`` says when) and retries for ever."""
    async with trio_asyncio.open_loop():
        broker = NatsBroker(settings, feed_capacity=feed_capacity, log=log, consume=consume)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(broker.run)
                yield broker
                broker.stop_publishing()
                with trio.move_on_after(2.0):
                    await broker.drain()
                broker.abandon_unsent()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await aio(broker.close)


def _subjects(filters: Filters) -> list[str]:
    """The consumer's filter subjects for ``filters`` (an empty list: nothing)."""
    if filters is None:
        return [SUBJECTS]
    return sorted(subject_for(key) for key in filters)
