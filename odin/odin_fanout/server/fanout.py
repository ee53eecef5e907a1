"""The fan-out: each broker publication is encoded once and handed to every subscriber.

The feed is consumed by one task, in history order. For each publication the envelope and
its WebSocket frame are built once (``Event``), stored in the shared history window, and the
same bytes object is offered to every matching connection. Nothing here awaits, so frames of
one channel reach each connection in publication order, and a slow connection only ever
costs a failed non-blocking write: its queue, not the fan-out, absorbs the delay.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import orjson

from odin_fanout.broker.base import FeedItem
from odin_fanout.core.history import APPENDED, HistoryLog
from odin_fanout.protocol.codec import encode_event, encode_gap, event_type, text_frame
from odin_fanout.protocol.publication import Gap, Publication

if TYPE_CHECKING:
    from odin_fanout.server.context import ServerContext


class Event:
    """A publication with its frame, encoded once and shared by every connection.

    A publication that cannot be delivered (its body is not JSON, or too large) keeps its
    place in history, but its frame is a ``gap`` notice for its own position: ``refused``
    says why, and ``detail`` adds what the operator needs.
    """

    # channel, seq and prev are copied, not properties: the fan-out and the history read them
    # for every delivery.
    __slots__ = ("channel", "detail", "frame", "prev", "publication", "refused", "seq", "sse")

    def __init__(
        self,
        publication: Publication,
        frame: bytes,
        refused: str | None = None,
        detail: str = "",
    ) -> None:
        self.publication = publication
        self.channel = publication.channel
        self.seq = publication.seq
        self.prev = publication.prev
        self.frame = frame
        self.refused = refused
        self.detail = detail
        self.sse: bytes | None = None
        """Its Server-Sent Events block, made by the first SSE stream that sends it and
        shared by the rest (odin/odin_fanout/server/sse.py)."""


EVENT_OVERHEAD = 400
"""Bytes an event in the history window holds besides its frame and body: the Event, its
Publication, their numbers and the window's (stored at, event) pair (``sys.getsizeof``)."""


def event_size(event: Event) -> int:
    """What one event costs the history window: its frame, the body it was built from (kept
    even when refused, so a too-large body counts in full) and its objects."""
    return len(event.frame) + len(event.publication.payload) + EVENT_OVERHEAD


INVALID_PAYLOAD = "invalid_payload"
PAYLOAD_TOO_LARGE = "payload_too_large"


def make_event(publication: Publication, max_payload: int) -> Event:
    """Encode a publication once: its envelope frame, or a gap notice for its position if its
    body is not JSON or larger than ``max_payload`` bytes."""
    seq = publication.seq
    if len(publication.payload) > max_payload:
        frame = gap_frame(publication.channel, seq, seq, PAYLOAD_TOO_LARGE)
        detail = f"{len(publication.payload)} bytes, limit {max_payload}"
        return Event(publication, frame, PAYLOAD_TOO_LARGE, detail)
    try:
        document = orjson.loads(publication.payload)
    except orjson.JSONDecodeError as exc:
        frame = gap_frame(publication.channel, seq, seq, INVALID_PAYLOAD)
        return Event(publication, frame, INVALID_PAYLOAD, str(exc))
    envelope = encode_event(publication, event_type(publication.channel, document))
    return Event(publication, text_frame(envelope))


def gap_frame(channel: str, first: int, last: int, reason: str) -> bytes:
    return text_frame(encode_gap(channel, first, last, reason))


class Fanout:
    def __init__(self, context: ServerContext) -> None:
        self._context = context
        self._logged_refusals: set[tuple[str, str]] = set()
        self.last_seq = 0
        """Position of the last publication handled (for tests and the console)."""
        self.received = 0
        self.delivered = 0
        self.delivered_bytes = 0
        self._flushed = (0, 0, 0)
        self._max_payload = context.config.broker.max_payload
        context.metrics.before_scrape(self.flush_metrics)

    @property
    def history(self) -> HistoryLog[Event]:
        return self._context.reader.window

    def handle(self, item: FeedItem, now: float, *, alone: bool = False) -> None:
        if isinstance(item, Gap):
            history = self.history
            first = item.from_seq
            if history.knows(item.channel):
                # The feed names what it dropped; positions between the last one handled and
                # those may hold messages it never had (lost before it), unseen all the same.
                first = min(first, history.last_seq(item.channel) + 1)
            self._announce_gap(item.channel, first, item.to_seq, item.reason)
            history.skip_to(item.channel, item.to_seq)
            return
        self.publish(item, now, alone=alone)

    def publish(self, publication: Publication, now: float, *, alone: bool = False) -> None:
        """The hot path: once per publication, however many subscribers."""
        context = self._context
        self.received += 1
        self.last_seq = publication.seq
        if publication.epoch != context.reader.epoch:
            self._new_epoch(publication.epoch)
        event = make_event(publication, self._max_payload)
        if event.refused is not None:
            self._refused(event)
        # event_size, inline: a call would cost a fifth of the window's append.
        size = len(event.frame) + len(publication.payload) + EVENT_OVERHEAD
        appended = self.history.append(publication.channel, event, now, size)
        if appended is not APPENDED:
            if appended.duplicate:
                context.metrics.duplicates.inc()
                return
            self._announce_gap(
                publication.channel, appended.missed_from, appended.missed_to, "missed"
            )
        connections = context.hub.match(publication.channel)
        if not connections:
            return
        delivered = 0
        for connection in connections:
            if connection.deliver(event, now, alone):
                delivered += 1
        if delivered:
            self.delivered += delivered
            self.delivered_bytes += delivered * len(event.frame)
            context.metrics.latency.observe(max(0.0, time.time() - publication.ts))

    def flush_metrics(self) -> None:
        """Move the hot path's plain counts into Prometheus (before each scrape): an ``inc``
        per publication would cost as much as the rest of a publication without subscribers."""
        metrics = self._context.metrics
        metrics.publications.inc(self.received - self._flushed[0])
        metrics.deliveries.inc(self.delivered - self._flushed[1])
        metrics.frames_sent.inc(self.delivered - self._flushed[1])
        metrics.bytes_sent.inc(self.delivered_bytes - self._flushed[2])
        self._flushed = (self.received, self.delivered, self.delivered_bytes)

    def _refused(self, event: Event) -> None:
        context = self._context
        reason = event.refused
        assert reason is not None
        context.metrics.refused_publications.labels(reason).inc()
        context.metrics.gaps[reason].inc(context.hub.count_matching(event.channel))
        # Logged once per channel and reason (bounded), not once per message.
        key = (event.channel, reason)
        if key not in self._logged_refusals and len(self._logged_refusals) < 1000:
            self._logged_refusals.add(key)
            context.log.warning(reason, channel=event.channel, seq=event.seq, error=event.detail)

    def _announce_gap(self, channel: str, first: int, last: int, reason: str) -> None:
        frame = gap_frame(channel, first, last, reason)
        told = 0
        for connection in self._context.hub.match(channel):
            if connection.send_gap(channel, first, last, reason, frame):
                told += 1
        self._context.metrics.gaps[reason].inc(told)

    def _new_epoch(self, epoch: str) -> None:
        context = self._context
        if context.reader.epoch:
            context.log.warning("epoch_changed", old=context.reader.epoch, new=epoch)
        # Positions of the old history mean nothing in the new one; the channels this process
        # is fed start again from 0 (the first position it is fed in the new history that
        # skips some is announced as missed, like any other).
        self.history.restart()
        for connection in context.registry.connections.values():
            connection.seam.new_epoch()
        context.reader.epoch = epoch
