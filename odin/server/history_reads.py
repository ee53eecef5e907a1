"""Reading history for recovery and replay: the server's window first, the broker beyond it.

The window (``ServerContext.history``) answers most requests without awaiting, which also
means without any live message slipping in between. When it cannot prove continuity (the
position is older than the window, or the window has a hole from a feed gap) the broker's
history is read, bounded by ``history.read_timeout``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import trio

from odin.broker.base import BrokerError
from odin.core.recovery import linked
from odin.server.fanout import Event, make_event

if TYPE_CHECKING:
    from odin.server.context import ServerContext


class HistoryUnavailable(Exception):
    """The broker's history could not be read in time."""


@attrs.frozen
class Slice:
    """The oldest retained events of a channel after a position."""

    epoch: str
    latest_seq: int
    events: list[Event]
    source: str
    """window or broker"""


def current_epoch(context: ServerContext) -> str:
    return context.epoch or context.broker.epoch


def read_window(context: ServerContext, channel: str, after: int, limit: int) -> Slice:
    history = context.history
    events = history.after(channel, after, limit, trio.current_time())
    return Slice(current_epoch(context), history.last_seq(channel), events, "window")


def window_proves(slice_: Slice, after: int, limit: int) -> bool:
    """True if the window alone shows everything after ``after`` (or that nothing came):
    linked from the position to the newest one, or to beyond ``limit`` messages."""
    if after >= slice_.latest_seq and slice_.latest_seq:
        return True
    events = slice_.events
    return (
        bool(events)
        and events[0].prev <= after
        and linked(events)
        and (len(events) > limit or events[-1].seq == slice_.latest_seq)
    )


@attrs.define(eq=False)
class SharedRead:
    """A history read in progress that other readers of the same range wait for."""

    done: trio.Event = attrs.Factory(trio.Event)
    result: Slice | None = None
    failed: bool = False


async def read_broker(context: ServerContext, channel: str, after: int, limit: int) -> Slice:
    """Read the broker's history. Identical reads in flight at once (clients of one channel
    reconnecting together after an outage) share one broker read."""
    key = (channel, after, limit)
    while (flight := context.reads.get(key)) is not None:
        context.metrics.history_reads.labels("shared").inc()
        await flight.done.wait()
        if flight.result is not None:
            return flight.result
        if flight.failed:
            raise HistoryUnavailable("the shared read failed")
        # The reader was cancelled (its client left): read again.
    flight = context.reads[key] = SharedRead()
    try:
        flight.result = await _read_broker(context, channel, after, limit)
        return flight.result
    except HistoryUnavailable:
        flight.failed = True
        raise
    finally:
        del context.reads[key]
        flight.done.set()


async def _read_broker(context: ServerContext, channel: str, after: int, limit: int) -> Slice:
    metrics = context.metrics
    try:
        with trio.fail_after(context.config.history.read_timeout):
            page = await context.broker.read_after(channel, after, limit)
    except (trio.TooSlowError, BrokerError) as exc:
        metrics.history_reads.labels("error").inc()
        context.log.warning("history_read_failed", channel=channel, error=repr(exc))
        raise HistoryUnavailable(str(exc)) from exc
    metrics.history_reads.labels("ok").inc()
    max_payload = context.config.broker.max_payload
    events = [make_event(publication, max_payload) for publication in page.messages]
    return Slice(page.epoch, page.latest_seq, events, "broker")


async def latest_event(context: ServerContext, channel: str) -> Event | None:
    """The channel's newest message, from the window if it has one."""
    event = context.history.latest(channel, trio.current_time())
    if event is not None:
        return event
    try:
        with trio.fail_after(context.config.history.read_timeout):
            publication = await context.broker.latest(channel)
    except (trio.TooSlowError, BrokerError):
        context.metrics.history_reads.labels("error").inc()
        return None
    if publication is None:
        return None
    return make_event(publication, context.config.broker.max_payload)
