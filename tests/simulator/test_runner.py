"""The paced simulator runner (``odin_fanout.simulator.runner``), on Trio's virtual clock.

``run_simulator`` publishes the market's events at an even total rate: event ``n`` at
``start + n / rate``, with no bursts and no drift; it counts broker failures and carries on;
when it falls behind it publishes what is due at once, at most ``max_burst`` per wake-up,
and counts the rest as skipped. The tests use pytest-trio's ``autojump_clock`` fixture
(``MockClock(autojump_threshold=0)``; its ``mock_clock`` fixture never jumps by itself), so
ten virtual seconds take no real time.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import Counter
from functools import partial
from typing import Any

import orjson
import pytest
import trio
import trio.testing

from odin_fanout.broker.base import BrokerError
from odin_fanout.logs import get_logger
from odin_fanout.simulator.model import DEFAULT_TOKENS, Market
from odin_fanout.simulator.runner import SimulatorStats, run_simulator

pytestmark = pytest.mark.trio

LOG = get_logger(service="test")
SECONDS = 10.0
# Event times n/rate are exact binary fractions at this rate, so the floating-point pacing
# defect reported below cannot show; the original's rate of 100 runs in its own test.
EXACT_RATE = 128.0


class StallGuard(trio.abc.Instrument):
    """Cancels ``scope`` when the scheduler keeps going round without virtual time moving.

    With the autojump clock a task that busy-waits stops virtual time, so without this a
    busy-waiting runner would hang the test instead of failing it.
    """

    def __init__(self, scope: trio.CancelScope, limit: int = 1000) -> None:
        self._scope = scope
        self._token = trio.lowlevel.current_trio_token()
        self._limit = limit
        self._last = -1.0
        self._rounds = 0
        self.stalled_at: float | None = None

    def before_io_wait(self, timeout: float) -> None:
        now = trio.current_time()
        if now != self._last:
            self._last, self._rounds = now, 0
            return
        self._rounds += 1
        if self._rounds == self._limit:
            self.stalled_at = now
            self._token.run_sync_soon(self._scope.cancel)


class Recorder:
    """A fake ``publish``: records (virtual time, channel, payload) of each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, str, dict[str, Any]]] = []

    async def __call__(self, channel: str, data: bytes) -> None:
        self.calls.append((trio.current_time(), channel, orjson.loads(data)))

    @property
    def times(self) -> list[float]:
        return [t for t, _, _ in self.calls]

    @property
    def channels(self) -> list[str]:
        return [channel for _, channel, _ in self.calls]


def new_market() -> Market:
    return Market(DEFAULT_TOKENS, ("trade",), rng=random.Random(7), clock=lambda: 1_000.0)


async def run_for(
    seconds: float, publish: Any, market: Market, rate: float, **kwargs: Any
) -> SimulatorStats:
    """Run the simulator for ``seconds`` of virtual time; its stats as ``started`` gave them."""
    stats = SimulatorStats(published=-1)
    async with trio.open_nursery() as nursery:
        guard = StallGuard(nursery.cancel_scope)
        trio.lowlevel.add_instrument(guard)
        try:
            started: SimulatorStats = await nursery.start(
                partial(run_simulator, publish, market, rate, log=LOG, **kwargs)
            )
            stats = started
            await trio.sleep(seconds)
            nursery.cancel_scope.cancel()
        finally:
            trio.lowlevel.remove_instrument(guard)
    assert guard.stalled_at is None, (
        f"run_simulator busy-waited at virtual t={guard.stalled_at!r} "
        f"after {stats.published} events"
    )
    return stats


def assert_round_robin(channels: list[str]) -> None:
    n = len(DEFAULT_TOKENS)
    symbols = [channel.split(".")[0] for channel in channels]
    for i in range(len(symbols) - n + 1):
        assert sorted(symbols[i : i + n]) == sorted(DEFAULT_TOKENS), f"window at {i}"


async def check_even_pacing(rate: float) -> None:
    publish = Recorder()
    start = trio.current_time()
    stats = await run_for(SECONDS, publish, new_market(), rate)
    times = publish.times
    assert abs(len(times) - SECONDS * rate) <= 1
    assert stats.published == len(times)
    assert (stats.failed, stats.skipped) == (0, 0)
    assert times[0] == start, "the first event goes out at once"
    assert max(Counter(times).values()) == 1, "no two events at the same instant"
    for before, after in itertools.pairwise(times):
        assert after - before == pytest.approx(1 / rate, rel=1e-6)
    # No drift: event n is published at start + n / rate.
    assert times[-1] - start == pytest.approx((len(times) - 1) / rate, rel=1e-9)
    # Tokens take turns, so each token's own events are evenly spaced too.
    assert_round_robin(publish.channels)
    for _, channel, payload in publish.calls:
        assert payload["tokenId"] == channel.split(".")[0]


async def test_the_original_rate_is_paced_evenly(autojump_clock: trio.testing.MockClock) -> None:
    await check_even_pacing(100.0)


@pytest.mark.parametrize("rate", [EXACT_RATE, 32.0])
async def test_events_are_paced_evenly_at_the_total_rate(
    autojump_clock: trio.testing.MockClock, rate: float
) -> None:
    await check_even_pacing(rate)


async def test_the_stats_passed_in_are_the_ones_updated_and_started_with(
    autojump_clock: trio.testing.MockClock,
) -> None:
    mine = SimulatorStats(published=5)
    stats = await run_for(1.0, Recorder(), new_market(), EXACT_RATE, stats=mine)
    assert stats is mine
    assert abs(mine.published - (5 + EXACT_RATE)) <= 1


async def test_broker_errors_are_counted_and_publishing_carries_on(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    publish = Recorder()
    attempts: list[float] = []

    async def flaky(channel: str, data: bytes) -> None:
        attempts.append(trio.current_time())
        if len(attempts) % 4 == 1:
            raise BrokerError("broker down")
        await publish(channel, data)

    seconds = 9.5  # failures at 0 s and from 5 s are logged, and none at the 10 s boundary
    with caplog.at_level(logging.WARNING, logger="odin"):
        stats = await run_for(seconds, flaky, new_market(), EXACT_RATE)
    assert abs(len(attempts) - seconds * EXACT_RATE) <= 1
    assert stats.failed == len(attempts[::4])
    assert stats.published == len(publish.calls) == len(attempts) - stats.failed
    assert stats.skipped == 0
    # Failures do not disturb the pacing.
    assert max(Counter(attempts).values()) == 1
    for before, after in itertools.pairwise(attempts):
        assert after - before == pytest.approx(1 / EXACT_RATE)
    # Failures are logged at most every five seconds.
    warnings = [r for r in caplog.records if r.getMessage() == "simulator_publish_failed"]
    assert len(warnings) == 2


async def test_an_unexpected_publish_error_is_not_swallowed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def broken(channel: str, data: bytes) -> None:
        raise RuntimeError("bug")

    with pytest.RaisesGroup(RuntimeError, flatten_subgroups=True):
        await run_for(SECONDS, broken, new_market(), EXACT_RATE)


async def test_after_a_slow_publish_it_catches_up_without_drift(
    autojump_clock: trio.testing.MockClock,
) -> None:
    publish = Recorder()

    async def slow_once(channel: str, data: bytes) -> None:
        await publish(channel, data)
        if len(publish.calls) == 1:
            await trio.sleep(0.5)

    start = trio.current_time()
    stats = await run_for(SECONDS, slow_once, new_market(), EXACT_RATE)
    times = publish.times
    due_at_half = int(0.5 * EXACT_RATE)  # events 1 .. 64 fell due while the first was slow
    assert Counter(times)[start + 0.5] == due_at_half
    assert max(Counter(times).values()) == due_at_half
    assert stats.skipped == 0
    # Back on schedule afterwards: event n at start + n / rate, the same total.
    assert abs(len(times) - SECONDS * EXACT_RATE) <= 1
    for n, t in enumerate(times[1 + due_at_half :], start=1 + due_at_half):
        assert t == pytest.approx(start + n / EXACT_RATE)
    assert stats.published == len(times)
    assert_round_robin(publish.channels)


async def test_catching_up_is_capped_at_max_burst_and_the_rest_is_skipped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    publish = Recorder()
    market = new_market()

    async def slow_once(channel: str, data: bytes) -> None:
        await publish(channel, data)
        if len(publish.calls) == 1:
            await trio.sleep(0.5)

    start = trio.current_time()
    stats = await run_for(SECONDS, slow_once, market, EXACT_RATE, max_burst=10)
    times = publish.times
    behind = int(0.5 * EXACT_RATE)
    assert Counter(times)[start + 0.5] == 10
    assert max(Counter(times).values()) <= 10
    assert stats.skipped == behind - 10
    # Every event due was either published or skipped; none was invented.
    assert abs(stats.published + stats.skipped - SECONDS * EXACT_RATE) <= 1
    assert stats.published == len(times)
    # Skipped events are not drawn from the market, so tokens still take turns.
    assert_round_robin(publish.channels)
    # And pacing resumes on the original schedule.
    for n, t in enumerate(times[11:], start=1 + behind):
        assert t == pytest.approx(start + n / EXACT_RATE)
