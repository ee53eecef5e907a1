"""JetStream publishes from Trio, pipelined, on a connection of their own.

Each publish is written with a reply subject (``<inbox>.a<n>``); JetStream answers it with
``{"stream":..,"seq":..}`` (stored, or ``"duplicate": true`` when its ``Nats-Msg-Id`` was
stored already) or an error. Writes are batched: whatever is queued when the writer wakes
goes out in one ``send_all``. Acknowledgements are matched in the read loop without awaiting.

Retries. A publish that carries a message id is retried when its acknowledgement is an error
(a 503 "no responders" while a stream leader is elected, or the stream is missing), does not
come within ``ack_timeout``, or its connection is lost before it came; the stream's
duplicate window stores it once. It is sent again with exponential backoff and jitter (from
50 ms, doubling to 1 s) for as long as ``publish`` took it less than ``retry_for`` ago (see
``retry_window``: half the duplicate window, at most 30 s, so every retry reaches the server
well within the window of its first write, which came later). Past that it is dropped:
counted in ``publish_failed`` and ``publish_dropped`` and logged (``publish_dropped``, at
most one line a second, with the count). A publish without an id is counted failed at
once, since sending it again could store it twice.

Order. While any retry is waiting or in flight, fresh publishes stay queued (the queue
pauses): a retry written after newer publishes would be stored after them, and a channel's
events would be reordered. Retries go out in the order of their first write. A leader
election stops every subject anyway, so pausing all of them costs nothing more. Only
publishes already written when the stream came back can be stored out of order (one that
failed just before, one stored just after): pipelining cannot take back what was written.

While the connection is down. ``publish`` still takes publishes: they wait in the queue
(behind the ones being retried) and go out, in order, with their message ids, once the
connection is back. A publish is given up ``retry_for`` after ``publish`` took it, whether it
is still queued or waiting to be retried: past that it is dropped (counted and logged as
above, within a sweep of a quarter second). So an outage or a leader election shorter than
``retry_for`` loses nothing; a longer one loses what waited longer.

Everything is bounded: queued plus unacknowledged plus waiting-to-retry publishes never
exceed ``capacity``; beyond it ``publish`` refuses (counted in ``publish_failed``). The
bookkeeping of retries costs nothing on the path of a publish that succeeds but a clock
reading (its deadline).
"""

from __future__ import annotations

import random
from bisect import insort
from collections import deque
from collections.abc import Awaitable, Callable
from operator import attrgetter

import trio

from odin_fanout.broker.base import BrokerError, BrokerStats
from odin_fanout.broker.nats.link import Link, LinkSettings
from odin_fanout.broker.nats.protocol import HMSG, Op
from odin_fanout.logs import Log

_BATCH_BYTES = 256 * 1024
_SWEEP_EVERY = 0.25
RETRY_FIRST = 0.05
"""Seconds before the first retry; each round doubles it, up to ``RETRY_MAX``."""
RETRY_MAX = 1.0
RETRY_FOR_MAX = 30.0
_LOG_EVERY = 1.0
_ORDER = attrgetter("order")


def retry_window(duplicate_window: float) -> float:
    """Seconds after ``publish`` took it during which a publish with a message id is written
    (queued while the connection is down) or retried:
    half the stream's duplicate window (a retry must reach the server while the first copy's
    id is remembered, whatever the clocks and queues add), at most ``RETRY_FOR_MAX``."""
    return min(duplicate_window / 2, RETRY_FOR_MAX)


class Outgoing:
    __slots__ = ("attempt", "deadline", "expires", "jetstream", "msg_id", "order", "payload",
                 "subject")  # fmt: skip

    def __init__(self, subject: bytes, payload: bytes, msg_id: bytes, jetstream: bool) -> None:
        self.subject = subject
        self.payload = payload
        self.msg_id = msg_id
        """Empty: none (the publish is not retried)."""
        self.jetstream = jetstream
        """False: a plain publish, nothing acknowledges it."""
        self.attempt = 1
        self.deadline = 0.0
        """When its acknowledgement is due (of the last write)."""
        self.order = 0
        """Retries only: the number of its first write (retries go out in this order)."""
        self.expires = 0.0
        """No write after this: ``retry_for`` after ``publish`` took it."""


class JetStreamPublisher(Link):
    def __init__(
        self,
        link: LinkSettings,
        *,
        ack_timeout: float,
        capacity: int,
        retry_for: float,
        stats: BrokerStats,
        on_failure: Callable[[str], None],
        log: Log,
    ) -> None:
        super().__init__(link, log, "publisher")
        self._ack_timeout = ack_timeout
        self._capacity = capacity
        self._retry_for = retry_for
        self._stats = stats
        self._on_failure = on_failure
        self._queue: deque[Outgoing] = deque()
        """Not written yet."""
        self._pending: dict[bytes, Outgoing] = {}
        """Written, waiting for their acknowledgement, by reply subject, oldest first."""
        self._waiting: list[Outgoing] = []
        """Failed, waiting to be sent again, in the order of their first write."""
        self._retrying = 0
        """Publishes being retried (waiting or written again): while any, the queue pauses."""
        self._retry_at: float | None = None
        """When the waiting ones go out next (None: not scheduled)."""
        self._backoff = RETRY_FIRST
        self._bulk = False
        """The next retries go all at once (a probe was just stored), not one probe."""
        self._unlogged_drops = 0
        self._unlogged_reason = ""
        self._ack_prefix = f"{self._inbox}.a".encode()
        self._next_ack = 0
        self._wake = trio.Event()
        self._settled = trio.Event()
        """Set when acknowledgements arrive, expire, or the connection goes (for drain)."""

    # ---- from the broker -----------------------------------------------------------------

    def publish(self, subject: str, payload: bytes, msg_id: str | None) -> None:
        self._enqueue(Outgoing(subject.encode(), payload, (msg_id or "").encode(), True))

    def publish_plain(self, subject: str, payload: bytes) -> None:
        self._enqueue(Outgoing(subject.encode(), payload, b"", False))

    def _enqueue(self, outgoing: Outgoing) -> None:
        if len(self._queue) + len(self._pending) + len(self._waiting) >= self._capacity:
            self._stats.publish_failed += 1
            state = "" if self.connected else ", its connection is down, reconnecting"
            raise BrokerError(f"the publish queue is full ({self._capacity}{state})")
        outgoing.expires = trio.current_time() + self._retry_for
        self._queue.append(outgoing)
        self._wake.set()

    @property
    def in_flight(self) -> int:
        """Publishes queued, waiting for their acknowledgement, or waiting to be retried."""
        return len(self._queue) + len(self._pending) + len(self._waiting)

    @property
    def retrying(self) -> int:
        """Publishes being retried (waiting for their next attempt or its acknowledgement)."""
        return self._retrying

    # ---- the connection ------------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._drop_expired)
            await super().run()

    async def _connected(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._writer)
        nursery.start_soon(self._expire)

    def _disconnected(self) -> None:
        # Their acknowledgements would come on the lost connection: send them again.
        lost = list(self._pending.items())
        self._pending.clear()
        for reply, outgoing in lost:
            self._failed(outgoing, reply, "connection lost before the acknowledgement")
        self._settled.set()

    async def _writer(self) -> None:
        queue = self._queue
        while True:
            if self._waiting and self._retry_at is not None:
                if trio.current_time() >= self._retry_at:
                    await self._send_retries()
                    continue
            elif queue and not self._retrying:
                await self._send_fresh()
                continue
            self._wake = trio.Event()
            with trio.move_on_at(self._retry_at if self._retry_at is not None else float("inf")):
                await self._wake.wait()

    async def _send_fresh(self) -> None:
        queue, pending = self._queue, self._pending
        batch = bytearray()
        deadline = trio.current_time() + self._ack_timeout
        while queue and len(batch) < _BATCH_BYTES:
            outgoing = queue.popleft()
            subject, payload = outgoing.subject, outgoing.payload
            if not outgoing.jetstream:
                batch += b"PUB %s %d\r\n%s\r\n" % (subject, len(payload), payload)
                continue
            self._next_ack += 1
            reply = b"%s%d" % (self._ack_prefix, self._next_ack)
            outgoing.deadline = deadline
            pending[reply] = outgoing
            if outgoing.msg_id:
                header = b"NATS/1.0\r\nNats-Msg-Id: %s\r\n\r\n" % outgoing.msg_id
                batch += b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
                    subject, reply, len(header), len(header) + len(payload), header, payload
                )  # fmt: skip
            else:
                batch += b"PUB %s %s %d\r\n%s\r\n" % (subject, reply, len(payload), payload)
        await self._send(bytes(batch))

    async def _send_retries(self) -> None:
        """After a backoff, only the oldest waiting publish goes (a probe): were they all sent
        and the stream came back halfway through, the later ones would be stored before the
        earlier ones. Once the probe is stored the rest go at once, in order, in one write
        (they fit in ``capacity``); what fails again waits for a longer backoff."""
        now = trio.current_time()
        live = []
        for outgoing in self._waiting:
            if now >= outgoing.expires:
                self._drop("its retries outlasted the bound")
            else:
                live.append(outgoing)
        if self._bulk:
            chosen, self._waiting = live, []
        else:
            chosen, self._waiting = live[:1], live[1:]
        self._bulk = False
        self._retry_at = None
        deadline = now + self._ack_timeout
        batch = bytearray()
        for outgoing in chosen:
            outgoing.attempt += 1
            self._stats.publish_retries += 1
            self._next_ack += 1
            reply = b"%s%d" % (self._ack_prefix, self._next_ack)
            outgoing.deadline = deadline
            self._pending[reply] = outgoing
            header = b"NATS/1.0\r\nNats-Msg-Id: %s\r\n\r\n" % outgoing.msg_id
            batch += b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
                outgoing.subject, reply, len(header), len(header) + len(outgoing.payload),
                header, outgoing.payload,
            )  # fmt: skip
        if batch:
            await self._send(bytes(batch))

    async def _expire(self) -> None:
        pending = self._pending
        while True:
            await trio.sleep(_SWEEP_EVERY)
            now = trio.current_time()
            while pending:
                reply, outgoing = next(iter(pending.items()))
                if outgoing.deadline > now:
                    break  # oldest first: the rest are younger
                del pending[reply]
                self._failed(outgoing, reply, f"no acknowledgement within {self._ack_timeout:g} s")
                self._settled.set()

    def _failed(self, outgoing: Outgoing, reply: bytes, reason: str) -> None:
        if outgoing.attempt == 1:
            if not (outgoing.jetstream and outgoing.msg_id):
                self._stats.publish_failed += 1
                self._on_failure(reason)
                return
            # The first failure: from now on it is retried, in the order of this first write.
            outgoing.order = int(reply[len(self._ack_prefix) :])
            self._retrying += 1
            self._stats.publish_retrying = self._retrying
        now = trio.current_time()
        if now >= outgoing.expires:
            self._drop(reason)
            return
        insort(self._waiting, outgoing, key=_ORDER)
        if self._retry_at is None:
            self._retry_at = now + self._backoff * random.uniform(0.5, 1.0)
            self._backoff = min(self._backoff * 2, RETRY_MAX)
        self._wake.set()

    def _retry_done(self) -> None:
        """A retry stored or dropped."""
        self._retrying -= 1
        self._stats.publish_retrying = self._retrying
        if not self._retrying:  # the queue goes on
            self._backoff = RETRY_FIRST
            self._wake.set()

    def _retry_stored(self) -> None:
        self._retry_done()
        if self._waiting:  # the stream answers again: the rest at once
            self._bulk = True
            self._retry_at = trio.current_time()
            self._wake.set()

    def _drop(self, reason: str) -> None:
        """A retried publish past its bound: lost for good (counted, logged once a second)."""
        self._count_drop(reason)
        self._retry_done()  # no longer retried (not stored either)
        self._settled.set()

    def _count_drop(self, reason: str) -> None:
        self._stats.publish_failed += 1
        self._stats.publish_dropped += 1
        self._unlogged_drops += 1
        self._unlogged_reason = reason

    async def _drop_expired(self) -> None:
        """Also while disconnected: drop what waited past its bound, and log the drops."""
        last_log = -_LOG_EVERY
        while True:
            await trio.sleep(_SWEEP_EVERY)
            now = trio.current_time()
            queue = self._queue
            if queue and queue[0].expires <= now:  # taken in order: the oldest first
                while queue and queue[0].expires <= now:
                    queue.popleft()
                    self._count_drop("queued past the bound (the connection was down)")
                self._settled.set()
            if self._waiting and any(o.expires <= now for o in self._waiting):
                keep = []
                for outgoing in self._waiting:
                    if outgoing.expires <= now:
                        self._drop("its retries outlasted the bound")
                    else:
                        keep.append(outgoing)
                self._waiting = keep
                if not keep:
                    self._retry_at = None
            if self._unlogged_drops and now - last_log >= _LOG_EVERY:
                last_log = now
                self._log.warning(
                    "publish_dropped",
                    count=self._unlogged_drops,
                    total=self._stats.publish_dropped,
                    error=self._unlogged_reason,
                    retry_for=self._retry_for,
                )
                self._unlogged_drops = 0

    # ---- what arrives --------------------------------------------------------------------

    def _handle(self, ops: list[Op], index: int) -> tuple[int, Awaitable[None] | None]:
        pending = self._pending
        stats = self._stats
        count = len(ops)
        while index < count:
            op = ops[index]
            index += 1
            kind, subject, sid, _, _, payload = op
            if kind > HMSG:
                follow_up = self._control(op)
                if follow_up is not None:
                    return index, follow_up
                continue
            outgoing = pending.pop(subject, None)
            if outgoing is None:
                if sid == b"1":  # a reply to a request, or a late acknowledgement
                    self._reply_op(op)
                continue
            if kind == HMSG:  # a status instead of an answer: 503, no stream has the subject
                self._failed(outgoing, subject, "no stream captures the subject (503)")
            elif b'"error"' in payload:
                self._failed(outgoing, subject, payload.decode(errors="replace"))
            else:
                stats.published += 1
                if outgoing.attempt > 1:
                    self._retry_stored()
            self._settled.set()
        return index, None

    # ---- shutdown ------------------------------------------------------------------------

    async def drain(self) -> None:
        """Return once everything queued is written and acknowledged (or counted failed), or
        the connection is down (bound it with a timeout)."""
        while self.connected and (self._queue or self._pending or self._waiting):
            self._settled = trio.Event()
            await self._settled.wait()

    def abandon(self) -> int:
        """At close, after the drain: what is still unsettled (queued while the connection
        was down, or unacknowledged) is dropped, counted and logged, never lost silently.
        Returns how many."""
        unsettled = [
            outgoing
            for outgoing in (*self._queue, *self._pending.values(), *self._waiting)
            if outgoing.jetstream
        ]
        self._queue.clear()
        self._pending.clear()
        self._waiting = []
        self._retrying = self._stats.publish_retrying = 0
        if unsettled:
            for _ in unsettled:
                self._count_drop("the broker closed before they were stored")
            self._unlogged_drops = 0
            self._log.warning(
                "publish_dropped",
                count=len(unsettled),
                total=self._stats.publish_dropped,
                error="the broker closed before they were stored",
                retry_for=self._retry_for,
            )
        return len(unsettled)
