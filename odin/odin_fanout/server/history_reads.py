"""Reading history for recovery and replay: the server's window first, the broker beyond it.

``HistoryReader`` owns everything a recovery or a replay reads: the window of recent events
the fan-out appends to (``window``), the epoch they belong to, and the broker reads in flight.
The window answers most requests without awaiting, which also means without any live message
slipping in between. When it cannot prove continuity (the position is older than the window,
or the window has a hole from a feed gap) the broker's history is read, bounded by
``history.read_timeout``; identical reads in flight at once share one broker read.

The window is bounded in bytes too (``history.max_bytes``; the fan-out measures each event,
``fanout.event_size``): what a bound drops is counted in ``odin_history_evicted_total{reason}``, and
the byte bound dropping messages is logged (``history_bytes_evicting``) at most once a minute.
A recovery that needed dropped events finds the window short and reads the broker.
"""

from __future__ import annotations

import time

import attrs
import trio

from odin_fanout.broker.base import Broker, BrokerError
from odin_fanout.config import Config
from odin_fanout.core.history import HistoryLog
from odin_fanout.core.recovery import linked
from odin_fanout.logs import Log
from odin_fanout.metrics import Metrics
from odin_fanout.protocol.publication import Publication
from odin_fanout.server.fanout import Event, make_event

EVICTION_LOG_INTERVAL = 60.0
"""Seconds between two ``history_bytes_evicting`` warnings while the byte bound drops."""


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


class HistoryReader:
    def __init__(self, config: Config, broker: Broker, metrics: Metrics, log: Log) -> None:
        history = config.history
        self.window: HistoryLog[Event] = HistoryLog(
            max_messages=history.max_messages,
            max_age=history.max_age,
            max_channels=history.max_channels,
            max_bytes=history.max_bytes,
        )
        """Recent events of every channel, appended by the fan-out."""
        self.epoch = ""
        """The epoch of the last publication the fan-out handled."""
        self._config = config
        self._broker = broker
        self._metrics = metrics
        self._log = log
        self._reads: dict[tuple[str, int, int], SharedRead] = {}
        self._flushed = (0, 0, 0, 0)
        self._evicted_logged = 0
        self._logged_at: float | None = None
        metrics.before_scrape(self.flush_metrics)

    def flush_metrics(self) -> None:
        """Bring the window's counts into the metrics (every second, and before a scrape),
        and warn when the byte bound has dropped messages since the last warning (at most
        once per ``EVICTION_LOG_INTERVAL``)."""
        window = self.window
        stats = window.stats
        counts = (
            stats.messages_evicted,
            stats.messages_trimmed,
            stats.messages_expired,
            stats.messages_forgotten,
        )
        evicted = self._metrics.history_evicted
        for reason, count, flushed in zip(
            ("max_bytes", "max_messages", "max_age", "max_channels"),
            counts,
            self._flushed,
            strict=True,
        ):
            if count > flushed:
                evicted.labels(reason).inc(count - flushed)
        self._flushed = counts
        self._metrics.history_bytes.set(window.bytes)
        dropped = stats.messages_evicted - self._evicted_logged
        now = time.monotonic()
        if dropped and (self._logged_at is None or now - self._logged_at >= EVICTION_LOG_INTERVAL):
            self._log.warning(
                "history_bytes_evicting",
                evicted=dropped,
                bytes=window.bytes,
                max_bytes=window.max_bytes,
                channels=window.channel_count(),
            )
            self._evicted_logged = stats.messages_evicted
            self._logged_at = now

    def reconfigure(self, config: Config) -> None:
        """A reload: read limits and timeouts change live (the window's size does not)."""
        self._config = config

    def current_epoch(self) -> str:
        return self.epoch or self._broker.epoch

    async def until_ready(self) -> bool:
        """Wait (``history.read_timeout`` at most) for a broker that has not been ready yet:
        clients reconnecting to a server that has just started are recovered from its
        history, not told it is unavailable, and a subscription is acknowledged once the
        broker feeds what is published after it. (Later outages do not wait: the broker knew
        its history, and its reads fail on their own.) True once the broker knows its
        history."""
        if not self.current_epoch():
            with trio.move_on_after(self._config.history.read_timeout):
                await self._broker.wait_ready()
        return bool(self.current_epoch())

    def read_window(self, channel: str, after: int, limit: int) -> Slice:
        window = self.window
        events = window.after(channel, after, limit, trio.current_time())
        return Slice(self.current_epoch(), window.last_seq(channel), events, "window")

    async def read_broker(self, channel: str, after: int, limit: int) -> Slice:
        """Read the broker's history. Identical reads in flight at once (clients of one
        channel reconnecting together after an outage) share one broker read."""
        key = (channel, after, limit)
        while (flight := self._reads.get(key)) is not None:
            self._metrics.history_reads.labels("shared").inc()
            await flight.done.wait()
            if flight.result is not None:
                return flight.result
            if flight.failed:
                raise HistoryUnavailable("the shared read failed")
            # The reader was cancelled (its client left): read again.
        flight = self._reads[key] = SharedRead()
        try:
            flight.result = await self._read_broker(channel, after, limit)
            return flight.result
        except HistoryUnavailable:
            flight.failed = True
            raise
        finally:
            del self._reads[key]
            flight.done.set()

    async def _read_broker(self, channel: str, after: int, limit: int) -> Slice:
        metrics = self._metrics
        try:
            with trio.fail_after(self._config.history.read_timeout):
                page = await self._broker.read_after(channel, after, limit)
        except (trio.TooSlowError, BrokerError) as exc:
            metrics.history_reads.labels("error").inc()
            self._log.warning("history_read_failed", channel=channel, error=repr(exc))
            raise HistoryUnavailable(str(exc)) from exc
        metrics.history_reads.labels("ok").inc()
        max_payload = self._config.broker.max_payload
        events = [make_event(publication, max_payload) for publication in page.messages]
        return Slice(page.epoch, page.latest_seq, events, "broker")

    async def latest_event(self, channel: str) -> Event | None:
        """The channel's newest message, from the window if it has one."""
        event = self.window.latest(channel, trio.current_time())
        if event is not None:
            return event
        _, publication = await self._latest_in_broker(channel)
        if publication is None:
            return None
        return make_event(publication, self._config.broker.max_payload)

    async def latest_position(self, channel: str) -> int | None:
        """The channel's newest position: from the window if it has seen the channel, else
        from the broker (0: no message yet); None if the broker cannot say."""
        known = await self.latest_known(channel)
        return known[1] if known is not None else None

    async def latest_known(self, channel: str) -> tuple[str, int] | None:
        """``latest_position`` with the history it belongs to: a broker read may answer from
        a history that has been replaced by the time the caller uses it."""
        if self.window.knows(channel):
            return self.current_epoch(), self.window.last_seq(channel)
        known, publication = await self._latest_in_broker(channel)
        if not known:
            return None
        if publication is None:
            return self._broker.epoch, 0
        return publication.epoch, publication.seq

    async def latest_positions(self, pattern: str, limit: int) -> dict[str, int] | None:
        """The newest position of every channel ``pattern`` covers, from the broker (this
        process's window knows only the channels its clients took); None when more than
        ``limit`` channels match. Raises HistoryUnavailable when the broker cannot say."""
        try:
            with trio.fail_after(self._config.history.read_timeout):
                positions = await self._broker.latest_positions(pattern, limit)
        except (trio.TooSlowError, BrokerError) as exc:
            self._metrics.history_reads.labels("error").inc()
            self._log.warning("history_read_failed", channel=pattern, error=repr(exc))
            raise HistoryUnavailable(str(exc)) from exc
        self._metrics.history_reads.labels("ok").inc()
        return positions

    async def _latest_in_broker(self, channel: str) -> tuple[bool, Publication | None]:
        """(whether the broker answered in time, its newest message of the channel)."""
        try:
            with trio.fail_after(self._config.history.read_timeout):
                publication = await self._broker.latest(channel)
        except (trio.TooSlowError, BrokerError):
            self._metrics.history_reads.labels("error").inc()
            return False, None
        self._metrics.history_reads.labels("ok").inc()
        return True, publication
