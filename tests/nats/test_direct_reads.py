"""History reads on the Trio connection (``direct.py``) answer exactly what the nats-py path
answered: reads after a position, the message before one, a channel's latest, nothing for an
unknown channel, reads across deleted messages, and a BrokerError while disconnected."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import orjson
import pytest
import trio
import trio.testing

from odin_fanout.broker.base import BrokerError, HistoryPage
from odin_fanout.broker.nats import NatsBroker, open_nats_broker
from odin_fanout.broker.nats.jetstream import Stored
from odin_fanout.logs import get_logger
from odin_fanout.protocol.publication import Publication
from tests.nats.support import NatsServer, RawPublisher, nats_config, wait_until

pytestmark = [pytest.mark.trio, pytest.mark.slow]

STREAM_SUBJECT = "odin.token.{}"


@asynccontextmanager
async def broker_on(server: NatsServer) -> AsyncIterator[NatsBroker]:
    config = nats_config(server.url)
    log = get_logger(service="odin-test")
    async with open_nats_broker(config.nats, feed_capacity=1000, log=log) as broker:
        await broker.wait_ready()
        yield broker


async def fill(broker: NatsBroker, port: int, channels: list[str], count: int) -> None:
    """``count`` messages, round robin over ``channels`` (message n at stream position n+1),
    returning once the broker has received them all from the stream (so they are stored)."""
    before = broker.stats().ingested
    publisher = await RawPublisher.connect(port)
    for n in range(count):
        channel = channels[n % len(channels)]
        await publisher.publish(STREAM_SUBJECT.format(channel), {"n": n})
    await publisher.flush()
    await publisher.aclose()
    await wait_until(lambda: broker.stats().ingested >= before + count, timeout=10)


async def both_pages(broker: NatsBroker, channel: str, after: int, limit: int) -> HistoryPage:
    """``read_after`` on both paths; they must agree."""
    broker.trio_reads = False
    before = await broker.read_after(channel, after, limit)
    broker.trio_reads = True
    after_page = await broker.read_after(channel, after, limit)
    assert after_page == before, (channel, after, limit)
    return after_page


async def both_latest(broker: NatsBroker, channel: str) -> Publication | None:
    broker.trio_reads = False
    before = await broker.latest(channel)
    broker.trio_reads = True
    latest = await broker.latest(channel)
    assert latest == before, channel
    return latest


async def both_last_before(broker: NatsBroker, channel: str, seq: int) -> Stored | None:
    broker.trio_reads = False
    before = await broker.last_before(channel, seq)
    broker.trio_reads = True
    new = await broker.last_before(channel, seq)
    assert new == before, (channel, seq)
    return new


async def test_reads_after_a_position_match_the_nats_py_path(nats_server: NatsServer) -> None:
    async with broker_on(nats_server) as broker:
        await fill(broker, nats_server.port, ["BTC.trade", "ETH.trade", "SOL.trade"], 300)
        # BTC.trade holds positions 1, 4, 7, ... 298.
        page = await both_pages(broker, "BTC.trade", 0, 150)
        assert [p.seq for p in page.messages] == list(range(1, 300, 3))
        assert page.messages[0].prev == 0
        assert all(p.epoch == broker.epoch for p in page.messages)
        assert [orjson.loads(p.payload)["n"] for p in page.messages] == list(range(0, 300, 3))
        for after, limit in [(0, 10), (4, 5), (5, 100), (100, 1), (297, 10), (298, 10), (500, 3)]:
            page = await both_pages(broker, "BTC.trade", after, limit)
            assert all(p.seq > after for p in page.messages)
            assert len(page.messages) <= limit + 1
        page = await both_pages(broker, "ETH.trade", 50, 20)
        assert page.messages[0].seq == 53
        assert page.messages[0].prev == 50


async def test_the_last_before_a_position_and_the_latest_match(nats_server: NatsServer) -> None:
    async with broker_on(nats_server) as broker:
        await fill(broker, nats_server.port, ["BTC.trade", "ETH.trade"], 20)
        # BTC.trade: 1, 3, ..., 19; ETH.trade: 2, 4, ..., 20.
        assert await both_last_before(broker, "BTC.trade", 1) is None
        assert await both_last_before(broker, "BTC.trade", 2) is not None
        for seq in (3, 4, 10, 19, 20, 21):
            found = await both_last_before(broker, "BTC.trade", seq)
            assert found is not None, seq
            assert found.seq == max(s for s in range(1, 20, 2) if s < seq)
        await both_last_before(broker, "BTC.trade", 1000)  # past the stream's end: the same
        latest = await both_latest(broker, "ETH.trade")
        assert latest is not None
        assert (latest.seq, latest.prev) == (20, 18)
        assert orjson.loads(latest.payload) == {"n": 19}


async def test_an_empty_or_unknown_channel_reads_nothing(nats_server: NatsServer) -> None:
    async with broker_on(nats_server) as broker:
        page = await both_pages(broker, "BTC.trade", 0, 10)
        assert page == HistoryPage(broker.epoch, 0, [])
        assert await both_latest(broker, "BTC.trade") is None
        await fill(broker, nats_server.port, ["ETH.trade"], 5)
        page = await both_pages(broker, "DOGE.trade", 0, 10)
        assert page == HistoryPage(broker.epoch, 0, [])
        assert await both_latest(broker, "DOGE.trade") is None
        assert await both_last_before(broker, "DOGE.trade", 5) is None
        # Nothing after the channel's newest: the page says where it is.
        page = await both_pages(broker, "ETH.trade", 5, 10)
        assert page == HistoryPage(broker.epoch, 5, [])


async def test_a_read_across_deleted_messages_matches(nats_server: NatsServer) -> None:
    async with broker_on(nats_server) as broker:
        await fill(broker, nats_server.port, ["BTC.trade", "ETH.trade"], 40)
        admin = await RawPublisher.connect(nats_server.port)
        stream = nats_config(nats_server.url).nats.stream
        for seq in (5, 7, 9, 2, 1):
            answer = orjson.loads(
                await admin.request(
                    f"$JS.API.STREAM.MSG.DELETE.{stream}", orjson.dumps({"seq": seq})
                )
            )
            assert answer.get("success") is True, answer
        await admin.aclose()
        await wait_until(lambda: not broker.lossless, timeout=5)  # the stream check saw it
        page = await both_pages(broker, "BTC.trade", 0, 10)
        # 1, 5, 7, 9 are gone: BTC.trade reads 3, 11, 13, ...
        assert [p.seq for p in page.messages][:3] == [3, 11, 13]
        assert page.messages[0].prev == 2  # nothing retained before it: seq - 1
        assert page.messages[1].prev == 3
        page = await both_pages(broker, "BTC.trade", 3, 5)
        assert page.messages[0].seq == 11
        assert page.messages[0].prev == 3
        assert await both_last_before(broker, "BTC.trade", 11) == await both_last_before(
            broker, "BTC.trade", 4
        )
        await both_latest(broker, "ETH.trade")


async def test_a_read_while_disconnected_is_a_broker_error(nats_server: NatsServer) -> None:
    async with broker_on(nats_server) as broker:
        await fill(broker, nats_server.port, ["BTC.trade"], 10)
        assert len((await broker.read_after("BTC.trade", 0, 10)).messages) == 10
        nats_server.stop()
        await wait_until(lambda: not broker.status().connected, timeout=10)
        with pytest.raises(BrokerError):
            await broker.read_after("BTC.trade", 0, 10)
        with pytest.raises(BrokerError):
            await broker.latest("BTC.trade")
        # Back: reads work again on the new connection.
        nats_server.start()
        await wait_until(lambda: broker.status().connected, timeout=15)
        with trio.fail_after(10):
            page = await broker.read_after("BTC.trade", 0, 10)
        assert [p.seq for p in page.messages] == list(range(1, 11))


async def test_a_read_cut_off_by_a_lost_connection_fails_at_once(nats_server: NatsServer) -> None:
    """A request in flight when the connection goes: a BrokerError, not a 5 s timeout."""
    async with broker_on(nats_server) as broker:
        await fill(broker, nats_server.port, ["BTC.trade"], 10)
        process = nats_server.process
        assert process is not None
        process.send_signal(signal.SIGSTOP)  # the request goes unanswered
        try:
            # The signal is delivered asynchronously: a request sent before the server has
            # stopped would still be answered.
            await wait_stopped(process.pid)
            async with trio.open_nursery() as nursery:
                failed = trio.Event()

                async def read() -> None:
                    with pytest.raises(BrokerError):
                        await broker.read_after("BTC.trade", 0, 10)
                    failed.set()

                nursery.start_soon(read)
                # The read has sent its request and waits for the reply (every task blocked).
                with trio.fail_after(5):
                    await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                nats_server.kill()  # the connection is lost while the read waits
                with trio.fail_after(2):
                    await failed.wait()
        finally:
            if nats_server.process is not None:
                nats_server.process.send_signal(signal.SIGCONT)


def _state(pid: int) -> str:
    """A process's state letter (R, S, T, ...) from /proc."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


async def wait_stopped(pid: int) -> None:
    """Return once process ``pid`` is stopped (state T), bounded."""
    with trio.fail_after(5):
        while _state(pid) != "T":
            await trio.sleep(0.005)
