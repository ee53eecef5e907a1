"""The control socket's past: ``history``, the last hour of per-second figures in a ring of
fixed size, and ``events``, pages back through the ring of recent events to its start; both
refuse bad arguments naming the field."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from odin_fanout.control.protocol import HISTORY_SECONDS
from odin_fanout.server.control_state import RateRing
from tests.helpers import running_server
from tests.odin.test_control import console, control_for


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="odin-hist-", dir="/tmp") as directory:
        yield Path(directory) / "run"


@pytest.mark.trio
async def test_history_keeps_the_last_hour_with_the_newest_last(
    socket_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with (
        running_server(memory=True) as harness,
        control_for(harness, socket_dir) as control,
        console(control) as c,
    ):
        await trio.sleep(HISTORY_SECONDS + 30)  # virtual: a sample a second, beyond the ring
        async with harness.client() as client:
            await client.subscribe(["BTC.trade"])
            for n in range(5):
                harness.publish("BTC.trade", {"n": n})
            await client.events(5)
            await trio.sleep(2.5)  # two more samples, with the client connected
            history = await c.result("history")
            assert history["step"] == 1
            assert history["interval"] == 1.0
            assert history["capacity"] == HISTORY_SECONDS
            columns = ("time", "in_per_s", "out_per_s", "connections", "dropped", "gaps")
            assert {len(history[name]) for name in columns} == {HISTORY_SECONDS}
            # The oldest samples are from before the client, the newest from after it.
            assert history["connections"][0] == 0
            assert history["connections"][-1] == 1
            assert sum(history["in_per_s"][-3:]) > 0
            assert history["time"] == sorted(history["time"])

            # The last minute, ten seconds a point: each ends on a sample, the newest last.
            merged = await c.result("history", seconds=60, step=10)
            assert merged["step"] == 10
            assert len(merged["time"]) == 6
            assert merged["connections"][-1] == 1
            assert merged["time"][-1] == history["time"][-1]


def test_the_ring_keeps_its_capacity_the_newest_last_and_counts_per_sample() -> None:
    ring = RateRing(3)
    totals = [(0, 0, 0, 0, 0), (1, 5, 1, 0, 0), (2, 5, 1, 2, 1), (3, 9, 4, 2, 1), (4, 9, 4, 2, 1)]
    for second, sample in enumerate(totals):
        ring.add(100.0 + second, float(second), 10.0 * second, sample)
    assert len(ring) == 3
    history = ring.read(3600, 1, 1.0)
    assert history.time == [102.0, 103.0, 104.0]
    assert history.in_per_s == [2.0, 3.0, 4.0]
    assert history.connections == [2, 3, 4]
    assert history.dropped == [0, 4, 0]  # what happened since the sample before
    assert history.gaps == [0, 3, 0]
    assert history.recovered == [2, 0, 0]
    assert history.not_recovered == [1, 0, 0]
    # Merged two at a time, ending on the newest: the oldest point has the one left.
    merged = ring.read(3, 2, 1.0)
    assert merged.time == [102.0, 104.0]
    assert merged.in_per_s == [2.0, 3.5]
    assert merged.connections == [2, 4]
    assert merged.dropped == [0, 4]
    assert ring.read(1, 1, 1.0).time == [104.0]
    assert RateRing(5).read(3600, 1, 1.0).time == []


@pytest.mark.trio
async def test_events_page_back_to_the_start_of_the_ring(socket_dir: Path) -> None:
    async with (
        running_server(memory=True) as harness,
        control_for(harness, socket_dir) as control,
        console(control) as c,
    ):
        events = harness.server.context.events
        assert (await c.result("events")) == {
            "events": [],
            "first": 0,
            "last": 0,
            "capacity": events.capacity,
            "more": False,
        }
        for n in range(events.capacity + 100):
            events.emit("kick", f"x-{n}", code=4001)
        newest = await c.result("events")
        assert [e["seq"] for e in newest["events"]] == list(range(2001, 2101))  # 100 by default
        assert (newest["first"], newest["last"], newest["more"]) == (101, 2100, True)
        seen: list[int] = []
        before = 0
        while True:
            page = await c.result("events", before=before, limit=500)
            seqs = [e["seq"] for e in page["events"]]
            assert seqs == sorted(seqs)
            seen = seqs + seen
            if not page["more"]:
                break
            before = seqs[0]
        assert seen == list(range(101, 2101))  # the ring's start: the oldest 100 are gone
        assert page["events"][0]["conn"] == "x-100"
        assert (await c.result("events", before=101))["events"] == []


@pytest.mark.parametrize(
    ("cmd", "args", "field"),
    [
        ("history", {"seconds": 0}, "seconds"),
        ("history", {"seconds": 3601}, "seconds"),
        ("history", {"step": 0}, "step"),
        ("history", {"seconds": "60"}, "seconds"),
        ("history", {"hours": 1}, "hours"),
        ("events", {"limit": 501}, "limit"),
        ("events", {"limit": 0}, "limit"),
        ("events", {"before": -1}, "before"),
        ("events", {"before": 1.5}, "before"),
        ("events", {"since": 3}, "since"),
    ],
)
@pytest.mark.trio
async def test_bad_arguments_are_refused_naming_the_field(
    socket_dir: Path, cmd: str, args: dict[str, object], field: str
) -> None:
    async with (
        running_server(memory=True) as harness,
        control_for(harness, socket_dir) as control,
        console(control) as c,
    ):
        reply = await c.call(cmd, **args)
        assert reply["error"]["code"] == "bad_request"
        assert field in reply["error"]["message"]
        assert (await c.call("hello"))["ok"]  # and the console stays
