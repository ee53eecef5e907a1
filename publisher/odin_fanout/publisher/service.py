"""The publisher's state and its publishing task, in Trio.

One ``PublisherService`` per process. ``run`` owns a nursery; ``start`` launches the
publishing task in it under a cancel scope of its own (so ``stop``, a ``duration`` and
shutdown all end it the same way); ``configure`` applies at once, relaunching the pacing
when publishing (the original applied a new rate only at the next start). The market (token
prices, trends) survives stop, start and configure.

Every event is published into JetStream with a ``Nats-Msg-Id`` (``<instance>-<n>``): the
bridge retries a publish whose acknowledgement fails or times out (a stream leader election,
a lost connection), with backoff, for up to half the duplicate window (at most 30 s), and
the stream's duplicate window stores it once (odin_fanout.broker.nats.publish).
"""

from __future__ import annotations

import random
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import attrs
import orjson
import trio

from odin_fanout.broker.base import BrokerError, BrokerStats, BrokerStatus
from odin_fanout.logs import Log
from odin_fanout.publisher.config import SimulationSection
from odin_fanout.publisher.control import Changes, ControlError
from odin_fanout.simulator.model import Market
from odin_fanout.simulator.runner import SimulatorStats, run_simulator, wall_clock

STATISTICS_SUBJECT = "odin.market.statistics"
_RATE_WINDOW = 10.0
"""Seconds over which the achieved rate is measured."""
_REPORT_EVERY = 30.0
"""Seconds between ``publisher_stats`` log lines while publishing (as the original)."""


class Conflict(ControlError):
    def __init__(self, message: str) -> None:
        super().__init__(409, "conflict", message, "action")


class PublishingBroker(Protocol):
    """What the service needs of the NATS bridge."""

    def status(self) -> BrokerStatus: ...

    def stats(self) -> BrokerStats: ...

    async def publish(self, channel: str, payload: bytes, msg_id: str | None = None) -> None: ...

    def publish_plain(self, subject: str, payload: bytes) -> None: ...


@attrs.define
class Targets:
    rate: float
    tokens: tuple[str, ...]
    events: tuple[str, ...]
    connections: int = 100
    """Informational, as in the original (the clients it expects)."""
    duration_ms: int = 0
    """Stop after this long; 0: until stopped."""


class PublisherService:
    def __init__(
        self,
        settings: SimulationSection,
        broker: PublishingBroker,
        log: Log,
        *,
        clock: Callable[[], float] = wall_clock,
    ) -> None:
        self._settings = settings
        self._broker = broker
        self._log = log
        self._clock = clock
        self.targets = Targets(settings.rate, settings.tokens, settings.events)
        self.market = Market(
            settings.tokens, settings.events, rng=random.Random(settings.seed), clock=clock
        )
        self.simulator = SimulatorStats()
        self.started_at: float | None = None
        """Wall-clock time of the current (or last) start."""
        self.began = time.monotonic()
        self._instance = secrets.token_hex(4)
        self._sent = 0
        self._scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._samples: deque[tuple[float, int]] = deque()
        self.statistics_failed = 0

    @property
    def broker(self) -> PublishingBroker:
        return self._broker

    @property
    def publishing(self) -> bool:
        return self._scope is not None

    # ---- control -------------------------------------------------------------------------

    def start(self, changes: Changes) -> None:
        if self.publishing:
            raise Conflict("Publishing already active")
        self._apply(changes)
        self.started_at = self._clock()
        self._launch()
        self._log.info(
            "publishing_started",
            rate=self.targets.rate,
            tokens=list(self.targets.tokens),
            events=list(self.targets.events),
            duration_ms=self.targets.duration_ms,
        )

    def stop(self) -> None:
        if self._scope is None:
            raise Conflict("Publishing not active")
        self._end("request")

    def configure(self, changes: Changes) -> None:
        self._apply(changes)
        self._log.info(
            "publishing_configured",
            rate=self.targets.rate,
            tokens=list(self.targets.tokens),
            events=list(self.targets.events),
            publishing=self.publishing,
        )
        if self.publishing:  # a new pace (and duration) from now
            old, self._scope = self._scope, None
            assert old is not None
            old.cancel()
            self._launch()

    def _apply(self, changes: Changes) -> None:
        targets = self.targets
        if changes.rate is not None:
            targets.rate = changes.rate
        if changes.tokens is not None:
            self.market.set_tokens(changes.tokens)
            targets.tokens = changes.tokens
        if changes.events is not None:
            self.market.set_events(changes.events)
            targets.events = changes.events
        if changes.connections is not None:
            targets.connections = changes.connections
        if changes.duration_ms is not None:
            targets.duration_ms = changes.duration_ms

    def _launch(self) -> None:
        assert self._nursery is not None, "run() first"
        scope = self._scope = trio.CancelScope()
        if self.targets.duration_ms:
            scope.deadline = trio.current_time() + self.targets.duration_ms / 1000
        self._nursery.start_soon(self._publish, scope, self.targets.rate)

    def _end(self, reason: str) -> None:
        scope, self._scope = self._scope, None
        if scope is not None:
            scope.cancel()
        self._log.info("publishing_stopped", reason=reason, **self.summary())

    # ---- tasks ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._measure)
            if self._settings.autostart:
                self.start(Changes())
            task_status.started()
            await trio.sleep_forever()

    async def _publish(self, scope: trio.CancelScope, rate: float) -> None:
        with scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._statistics)
                await run_simulator(
                    self._send, self.market, rate, log=self._log, stats=self.simulator
                )
        if self._scope is scope:  # it ended by itself: its duration passed
            self._end("duration")

    async def _send(self, channel: str, payload: bytes) -> None:
        self._sent += 1
        await self._broker.publish(channel, payload, msg_id=f"{self._instance}-{self._sent}")

    async def _statistics(self) -> None:
        while True:
            await trio.sleep(self._settings.statistics_interval)
            try:
                self._broker.publish_plain(
                    STATISTICS_SUBJECT, orjson.dumps(self.market.statistics())
                )
            except BrokerError:
                self.statistics_failed += 1

    async def _measure(self) -> None:
        """Sample the acknowledged count each second for the achieved rate, and log a
        summary every 30 s while publishing."""
        last_report = trio.current_time()
        while True:
            now = trio.current_time()
            self._samples.append((now, self._broker.stats().published))
            while self._samples and self._samples[0][0] < now - _RATE_WINDOW:
                self._samples.popleft()
            if self.publishing and now - last_report >= _REPORT_EVERY:
                last_report = now
                self._log.info("publisher_stats", **self.summary())
            await trio.sleep(1.0)

    # ---- reading -------------------------------------------------------------------------

    def achieved_rate(self) -> float:
        """Acknowledged publishes per second over the last ten seconds."""
        if len(self._samples) < 2:
            return 0.0
        (first, before), (last, after) = self._samples[0], self._samples[-1]
        return (after - before) / (last - first) if last > first else 0.0

    def summary(self) -> dict[str, object]:
        stats = self._broker.stats()
        return {
            "published": stats.published,
            "failed": stats.publish_failed,
            "retries": stats.publish_retries,
            "dropped": stats.publish_dropped,
            "retrying": stats.publish_retrying,
            "in_flight": stats.publish_in_flight,
            "skipped": self.simulator.skipped,
            "rate": round(self.achieved_rate(), 1),
            "tokens": len(self.targets.tokens),
            "uptime_s": round(time.monotonic() - self.began),
        }
