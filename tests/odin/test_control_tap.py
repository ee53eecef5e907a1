"""The control socket's live tap: what one connection or one channel receives, in order, with
positions; bounded by its rate (the rest counted as skipped); ended by the tapped connection's
close; refused with the field named when asked badly."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from odin_fanout.control.protocol import TAP_BUFFER, TAP_TEXT_BYTES
from odin_fanout.protocol.close_codes import CloseCode
from odin_fanout.protocol.codec import text_frame
from odin_fanout.server.tap import describe
from tests.helpers import running_server
from tests.odin.test_control import Console, console, control_for


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="odin-tap-", dir="/tmp") as directory:
        yield Path(directory) / "run"


async def tap_lines(c: Console, count: int) -> list[dict[str, Any]]:
    """The next ``count`` tap lines (watch updates skipped)."""
    lines: list[dict[str, Any]] = []
    while len(lines) < count:
        line = await c.line()
        assert line is not None, "the server closed the control connection"
        if line.get("stream") == "tap":
            lines.append(line)
        else:
            assert line.get("stream") == "update", line
    return lines


def message(line: dict[str, Any]) -> dict[str, Any]:
    assert not line["truncated"] and not line["binary"], line
    result: dict[str, Any] = json.loads(line["text"])
    return result


@pytest.mark.trio
async def test_a_connections_acks_events_and_gaps_in_order_then_its_close(
    socket_dir: Path,
) -> None:
    async with (
        running_server() as harness,
        control_for(harness, socket_dir) as control,
        harness.client() as client,
        console(control) as c,
    ):
        conn = client.hello["connection_id"]
        started = await c.result("tap", conn=conn)
        assert started["conn"] == conn and started["rate"] == 50
        assert started["buffer"] == TAP_BUFFER
        await client.subscribe(["BTC.trade"])
        first = harness.publish("BTC.trade", {"n": 1})
        harness.broker.publish_nowait("BTC.trade", b'{"n": 2}', feed=False)  # the feed loses it
        third = harness.publish("BTC.trade", {"n": 3})
        await harness.settle()
        await client.events(2)

        lines = await tap_lines(c, 4)
        ack, event, gap, last = lines
        assert all(line["tap"] == started["tap"] and line["conn"] == conn for line in lines)
        assert message(ack)["type"] == "subscription_ack"
        assert (event["channel"], event["seq"]) == ("BTC.trade", first)
        assert message(event)["seq"] == first
        notice = message(gap)
        assert (gap["channel"], notice["type"], notice["reason"]) == ("BTC.trade", "gap", "missed")
        assert (notice["from"], notice["to"]) == (first + 1, third - 1)
        assert (last["seq"], message(last)["prev"]) == (third, first + 1)
        assert all(line["skipped"] == 0 for line in lines)

        await c.result("kick", conn=conn, code=4002, reason="enough")
        (end,) = await tap_lines(c, 1)
        assert end["closed"] == {"code": 4002, "reason": "enough", "why": "operator"}
        _, code, _ = await client.until_closed()
        assert code == 4002
        # The tap is over: the console goes on with the next command.
        assert (await c.result("hello"))["server"] == "odin"


@pytest.mark.trio
async def test_a_channel_pattern_across_connections(socket_dir: Path) -> None:
    async with (
        running_server() as harness,
        control_for(harness, socket_dir) as control,
        harness.client() as one,
        harness.client() as other,
        harness.client() as elsewhere,
        console(control) as c,
    ):
        await one.subscribe(["BTC.trade"])
        await other.subscribe(["BTC.*"])
        await elsewhere.subscribe(["ETH.trade"])
        await c.result("tap", channel="BTC.*", rate=1000)
        seq = harness.publish("BTC.trade", {"n": 1})
        harness.publish("ETH.trade", {"n": 2})
        later = harness.publish("BTC.liquidity", {"n": 3})
        await harness.settle()
        lines = await tap_lines(c, 3)
        seen = sorted((line["conn"], line["channel"], line["seq"]) for line in lines)
        ids = one.hello["connection_id"], other.hello["connection_id"]
        assert seen == sorted(
            [
                (ids[0], "BTC.trade", seq),
                (ids[1], "BTC.trade", seq),
                (ids[1], "BTC.liquidity", later),
            ]
        )
        # Untapped: the next line is the next reply, however much is published meanwhile.
        assert await c.result("untap") == {}
        harness.publish("BTC.trade", {"n": 4})
        await harness.settle()
        await other.events(3)
        assert (await c.result("hello"))["server"] == "odin"


@pytest.mark.trio
async def test_frames_beyond_the_rate_are_counted_as_skipped(socket_dir: Path) -> None:
    async with (
        running_server() as harness,
        control_for(harness, socket_dir) as control,
        harness.client() as client,
        console(control) as c,
    ):
        conn = client.hello["connection_id"]
        await client.subscribe(["BTC.trade"])
        await c.result("tap", conn=conn, rate=1)  # one frame now, then one a second
        seqs = [harness.publish("BTC.trade", {"n": n}) for n in range(5)]
        await harness.settle()
        await client.events(5)
        (shown,) = await tap_lines(c, 1)
        assert (shown["seq"], shown["skipped"]) == (seqs[0], 0)
        await client.ws.aclose()
        # Whatever the bucket let through since, every frame is either shown or counted.
        lines = await tap_lines(c, 1)
        while lines[-1]["closed"] is None:
            lines += await tap_lines(c, 1)
        assert lines[-1]["closed"]["code"] == 1000
        skipped = sum(line["skipped"] for line in lines)
        assert len(lines) - 1 + skipped == 4
        assert harness.sample("odin_control_tap_skipped_total") == skipped


@pytest.mark.trio
async def test_bad_taps_are_refused_naming_the_field(socket_dir: Path) -> None:
    async with (
        running_server() as harness,
        control_for(harness, socket_dir) as control,
        harness.client() as client,
        console(control) as c,
    ):
        conn = client.hello["connection_id"]
        for args, field in [
            ({}, "conn or channel"),
            ({"conn": conn, "channel": "BTC.trade"}, "conn or channel"),
            ({"conn": conn, "rate": 0}, "rate"),
            ({"conn": conn, "rate": 1001}, "rate"),
            ({"conn": conn, "rate": "5"}, "rate"),
            ({"channel": "btc"}, "channel"),
            ({"conn": conn, "follow": True}, "follow"),
        ]:
            reply = await c.call("tap", **args)
            assert reply["error"]["code"] == "bad_request", (args, reply)
            assert field in reply["error"]["message"], (args, reply)
        reply = await c.call("tap", conn="nobody-1")
        assert reply["error"]["code"] == "not_found"
        assert await c.result("untap") == {}  # no tap: nothing to stop, no error


def test_a_frame_is_described_cut_and_named() -> None:
    text, size, truncated, binary = describe(text_frame(b'{"a": 1}'))
    assert (text, size, truncated, binary) == ('{"a": 1}', 8, False, False)
    big = b"x" * 70_000
    text, size, truncated, binary = describe(text_frame(big))
    assert (len(text), size, truncated, binary) == (TAP_TEXT_BYTES, 70_000, True, False)
    assert describe(b"\x89\x00")[0] == "ping frame, 0 bytes"
    close = bytes([0x88, 2]) + int(CloseCode.KICKED).to_bytes(2, "big")
    assert describe(close)[:2] == ("close frame, 2 bytes", 2)
    # An event stream's block is text already.
    assert describe(b"id: 4\ndata: {}\n\n")[0] == "id: 4\ndata: {}\n\n"
