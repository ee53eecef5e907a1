"""JetStream publishes from Trio, pipelined, on a connection of their own.

Each publish is written with a reply subject (``<inbox>.a<n>``); JetStream answers it with
``{"stream":..,"seq":..}`` (stored, or ``"duplicate": true`` when its ``Nats-Msg-Id`` was
stored already) or an error. Writes are batched: whatever is queued when the writer wakes
goes out in one ``send_all``. Acknowledgements are matched in the read loop without awaiting.

A publish that carries a message id is retried (up to ``attempts`` in all) when its
acknowledgement is an error, does not come within ``ack_timeout``, or its connection is lost
before it came; the stream's duplicate window stores it once. One without an id is counted
failed instead, since sending it again could store it twice. Everything is bounded: queued
plus unacknowledged publishes never exceed ``capacity``; beyond it ``publish`` refuses.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable

import trio

from odin.broker.base import BrokerError, BrokerStats
from odin.broker.nats.link import YIELD_EVERY, Link, LinkSettings
from odin.logs import Log

_BATCH_BYTES = 256 * 1024
_SWEEP_EVERY = 0.25


class Outgoing:
    __slots__ = ("attempt", "deadline", "jetstream", "msg_id", "payload", "subject")

    def __init__(self, subject: bytes, payload: bytes, msg_id: bytes, jetstream: bool) -> None:
        self.subject = subject
        self.payload = payload
        self.msg_id = msg_id
        """Empty: none (the publish is not retried)."""
        self.jetstream = jetstream
        """False: a plain publish, nothing acknowledges it."""
        self.attempt = 1
        self.deadline = 0.0


class JetStreamPublisher(Link):
    def __init__(
        self,
        link: LinkSettings,
        *,
        ack_timeout: float,
        capacity: int,
        attempts: int,
        stats: BrokerStats,
        on_failure: Callable[[str], None],
        log: Log,
    ) -> None:
        super().__init__(link, log, "publisher")
        self._ack_timeout = ack_timeout
        self._capacity = capacity
        self._attempts = attempts
        self._stats = stats
        self._on_failure = on_failure
        self._queue: deque[Outgoing] = deque()
        """Not written yet."""
        self._pending: dict[bytes, Outgoing] = {}
        """Written, waiting for their acknowledgement, by reply subject, oldest first."""
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
        if len(self._queue) + len(self._pending) >= self._capacity:
            self._stats.publish_failed += 1
            raise BrokerError("the publish queue is full")
        self._queue.append(outgoing)
        self._wake.set()

    @property
    def in_flight(self) -> int:
        """Publishes queued or waiting for their acknowledgement."""
        return len(self._queue) + len(self._pending)

    # ---- the connection ------------------------------------------------------------------

    async def _connected(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._writer)
        nursery.start_soon(self._expire)

    def _disconnected(self) -> None:
        # Their acknowledgements would come on the lost connection: send them again.
        lost = list(self._pending.values())
        self._pending.clear()
        for outgoing in reversed(lost):
            self._failed(outgoing, "connection lost before the acknowledgement", front=True)
        self._settled.set()

    async def _writer(self) -> None:
        queue, pending = self._queue, self._pending
        while True:
            while not queue:
                self._wake = trio.Event()
                await self._wake.wait()
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
                self._failed(outgoing, f"no acknowledgement within {self._ack_timeout:g} s")
                self._settled.set()

    def _failed(self, outgoing: Outgoing, reason: str, *, front: bool = False) -> None:
        if outgoing.jetstream and outgoing.msg_id and outgoing.attempt < self._attempts:
            outgoing.attempt += 1
            self._stats.publish_retries += 1
            if front:
                self._queue.appendleft(outgoing)
            else:
                self._queue.append(outgoing)
            self._wake.set()
            return
        self._stats.publish_failed += 1
        self._on_failure(reason)

    # ---- what arrives --------------------------------------------------------------------

    def _parse(self, data: bytes, position: int) -> tuple[int, Awaitable[None] | None, bool]:
        find = data.find
        pending = self._pending
        stats = self._stats
        follow_up: Awaitable[None] | None = None
        for _ in range(YIELD_EVERY):
            end = find(b"\r\n", position)
            if end < 0:
                return position, None, True
            op = data[position]
            if op == 77 or op == 72:  # MSG <subject> <sid> <size>, HMSG ... <hsize> <size>
                parts = data[position + (4 if op == 77 else 5) : end].split(b" ")
                start = end + 2
                stop = start + int(parts[-1])
                if len(data) < stop + 2:
                    return position, None, True  # the payload has not all arrived
                position = stop + 2
                outgoing = pending.pop(parts[0], None)
                if outgoing is None:
                    if parts[1] == b"1":  # a reply to a request, or a late acknowledgement
                        self._reply(parts[0], data[start:stop])
                    continue
                if op == 72:  # a status instead of an answer: 503, no stream has the subject
                    self._failed(outgoing, "no stream captures the subject (503)")
                elif data.find(b'"error"', start, stop) >= 0:
                    self._failed(outgoing, data[start:stop].decode(errors="replace"))
                else:
                    stats.published += 1
                self._settled.set()
            else:
                line = data[position:end]
                position = end + 2
                follow_up = self._control(line)
                if follow_up is not None:
                    return position, follow_up, False
        return position, None, False

    # ---- shutdown ------------------------------------------------------------------------

    async def drain(self) -> None:
        """Return once everything queued is written and acknowledged (or counted failed), or
        the connection is down (bound it with a timeout)."""
        while self.connected and (self._queue or self._pending):
            self._settled = trio.Event()
            await self._settled.wait()
