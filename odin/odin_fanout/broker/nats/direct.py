"""History reads (JetStream direct gets) on a Trio connection: recovery at the data path's
speed.

Through nats-py every read crossed into asyncio (about 130 µs a crossing) and every reply
message cost several asyncio callbacks: recovering 100 missed messages took 17 ms (p50) and
19 ms of CPU. Here the same direct-get requests go out on a ``Link`` of their own, and the
replies of a batch are parsed in the link's read loop and handed over at once, with one
wakeup for the whole batch (``stress/odin_fanout/stress/bench_recovery.py`` has the figures).

A connection of its own, not the delivery's: a channel's first message looks its predecessor
up from inside the delivery's read loop (which could not read its own reply), and recovery
reads should not queue behind the stream's firehose.

The requests and their answers (https://docs.nats.io/nats-concepts/jetstream/js_direct_get
and ADR-31): ``{"seq": s, "next_by_subj": subject, "batch": n}`` is answered by up to ``n``
messages, then ``NATS/1.0 204 EOB``; ``{"multi_last": [subject], "up_to_seq": s}`` by the
subject's last message up to ``s`` and the same end; ``{"last_by_subj": subject}`` by one
message. Nothing found: ``NATS/1.0 404``. Each message carries ``Nats-Subject``,
``Nats-Sequence`` and ``Nats-Time-Stamp`` headers.

``ReadLink.request_many`` is what this needs of a connection: a request answered by several
replies, each with its headers. ``Link`` has no public method for it yet (``request``
returns one reply's payload, without headers), so ``ReadLink`` takes its connection's replies
in ``_handle`` (the subclass hook); the rest of this module sees only ``Replies``.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol

import orjson
import trio

from odin_fanout.broker.nats.jetstream import ReadFailed, Stored, parse_time
from odin_fanout.broker.nats.link import ConnectionLost, Link, LinkSettings
from odin_fanout.broker.nats.protocol import HMSG, Op, header_fields, status
from odin_fanout.logs import Log

Reply = tuple[bytes, bytes]
"""A reply's header block (``NATS/1.0...``; empty for a reply without headers) and payload."""


class Replies(Protocol):
    """A NATS connection that can send a request answered by several replies."""

    @property
    def connected(self) -> bool: ...

    async def request_many(
        self, subject: str, body: bytes, within: float, *, single: bool = False
    ) -> list[Reply]:
        """Send a request; return its replies, up to and including the first that carries a
        status (``NATS/1.0 204 EOB``), or only the first with ``single``. Raises
        ``ConnectionLost`` when not connected, when the connection is lost meanwhile, or after
        ``within`` seconds."""
        ...


# ---- the connection -------------------------------------------------------------------------


class _Pending:
    __slots__ = ("done", "lost", "replies", "single")

    def __init__(self, single: bool) -> None:
        self.single = single
        self.replies: list[Reply] = []
        self.done = trio.Event()
        self.lost = False

    def add(self, headers: bytes, payload: bytes) -> None:
        if self.done.is_set():
            return
        self.replies.append((headers, payload))
        if self.single or headers[8:9] == b" ":  # "NATS/1.0 204 EOB": a status ends it
            self.done.set()


class ReadLink(Link):
    """A ``Link`` for requests only: it subscribes nothing but its inbox, and hands each
    reply, headers and all, to the request waiting for it."""

    def __init__(self, settings: LinkSettings, log: Log, name: str = "reads") -> None:
        super().__init__(settings, log, name)
        self._pending: dict[bytes, _Pending] = {}
        self._batch_number = 0
        self.ready = trio.Event()
        """Set the first time the link is connected."""

    async def request_many(
        self, subject: str, body: bytes, within: float, *, single: bool = False
    ) -> list[Reply]:
        if not self.connected:
            raise ConnectionLost("not connected")
        self._batch_number += 1
        token = f"{self._inbox}.b{self._batch_number}"
        pending = _Pending(single)
        key = token.encode()
        self._pending[key] = pending
        try:
            await self._send(f"PUB {subject} {token} {len(body)}\r\n".encode() + body + b"\r\n")
            with trio.fail_after(within):
                await pending.done.wait()
        except trio.TooSlowError:
            raise ConnectionLost(f"no answer to {subject}") from None
        finally:
            del self._pending[key]
        if pending.lost:
            raise ConnectionLost("connection lost during the request")
        return pending.replies

    async def _connected(self, nursery: trio.Nursery) -> None:  # noqa: ARG002
        self.ready.set()

    def _disconnected(self) -> None:
        for pending in self._pending.values():
            pending.lost = True
            pending.done.set()

    def _handle(self, ops: list[Op], index: int) -> tuple[int, Awaitable[None] | None]:
        pending = self._pending
        count = len(ops)
        while index < count:
            op = ops[index]
            index += 1
            if op[0] <= HMSG:  # MSG or HMSG: a reply (a late one, to a request given up: dropped)
                waiting = pending.get(op[1])
                if waiting is not None:
                    waiting.add(op[4], op[5])
                continue
            follow_up = self._control(op)
            if follow_up is not None:
                return index, follow_up
        return index, None


# ---- the reads ------------------------------------------------------------------------------


def _stored(headers: bytes, payload: bytes) -> Stored:
    fields = header_fields(headers)
    try:
        return Stored(
            seq=int(fields[b"Nats-Sequence"]),
            ts=parse_time(fields[b"Nats-Time-Stamp"].decode()),
            subject=fields[b"Nats-Subject"].decode(),
            data=payload,
        )
    except KeyError as exc:
        raise ReadFailed(f"direct get: a reply without {exc}") from None


def _messages(replies: list[Reply]) -> list[Stored]:
    """The messages of a batch's replies; its end (204, or 404: nothing) checked."""
    stored = []
    for headers, payload in replies:
        if headers[8:9] != b" ":
            stored.append(_stored(headers, payload))
            continue
        code, description = status(headers)
        if code not in (204, 404):
            raise ReadFailed(f"direct get: {code} {description.decode(errors='replace')}")
    return stored


class DirectReads:
    """The history reads ``bridge`` makes, as direct gets on ``link``."""

    def __init__(self, link: Replies, stream: str, within: float) -> None:
        self._link = link
        self._subject = f"$JS.API.DIRECT.GET.{stream}"
        self._within = within

    async def read_after(self, subject: str, after: int, limit: int) -> list[Stored]:
        """The oldest messages of ``subject`` after position ``after``, at most ``limit``."""
        request = {"seq": after + 1, "next_by_subj": subject, "batch": limit}
        return _messages(await self._batch(request))

    async def last_before(self, subject: str, seq: int) -> Stored | None:
        """The retained message of ``subject`` just before position ``seq``, if any."""
        if seq <= 1:
            return None  # up_to_seq 0 would mean "no limit" to the server
        stored = _messages(await self._batch({"multi_last": [subject], "up_to_seq": seq - 1}))
        return stored[-1] if stored else None

    async def last_of(self, subject: str) -> Stored | None:
        """The newest retained message of ``subject``, if any."""
        replies = await self._link.request_many(
            self._subject, orjson.dumps({"last_by_subj": subject}), self._within, single=True
        )
        stored = _messages(replies)
        return stored[0] if stored else None

    async def last_of_each(self, subjects: str, limit: int) -> list[Stored]:
        """The newest retained message of each subject matching the wildcard ``subjects``, at
        most ``limit`` of them."""
        return _messages(await self._batch({"multi_last": [subjects], "batch": limit}))

    async def _batch(self, request: dict[str, object]) -> list[Reply]:
        return await self._link.request_many(self._subject, orjson.dumps(request), self._within)
