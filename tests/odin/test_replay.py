"""The in-connection ``replay`` request: answered from history per channel, and always ending
with ``replay_complete`` or ``replay_incomplete`` naming what could not be served."""

from __future__ import annotations

import pytest

from tests.helpers import Client, Message, make_broker, make_config, running_server

pytestmark = pytest.mark.trio


async def replay(client: Client, data: Message) -> tuple[list[Message], list[Message]]:
    """Send a replay; collect events and the per-channel end markers until each channel is
    answered (``data['expect']`` channels)."""
    expect = set(data.pop("expect"))
    await client.send({"type": "replay", "data": data, "id": "r"})
    events: list[Message] = []
    ends: list[Message] = []
    while expect:
        message = await client.recv()
        if "seq" in message:
            events.append(message)
        elif message["type"] in ("replay_complete", "replay_incomplete"):
            assert message["id"] == "r"
            ends.append(message)
            expect.discard(message["channel"])
        else:
            raise AssertionError(message)
    return events, ends


async def test_replay_since_a_position_for_every_subscribed_channel() -> None:
    async with running_server() as harness, harness.client() as client:
        await client.subscribe(["BTC.*", "ETH.trade"])
        seqs: dict[str, list[int]] = {
            ch: [] for ch in ("BTC.trade", "BTC.social", "ETH.trade", "SOL.trade")
        }
        for n in range(12):
            channel = list(seqs)[n % 4]
            seqs[channel].append(harness.publish(channel, {"n": n}))
        await client.events(9)  # the live copies of the subscribed channels
        since = seqs["BTC.trade"][0]
        events, ends = await replay(
            client, {"since": since, "expect": ["BTC.trade", "BTC.social", "ETH.trade"]}
        )
        by_channel: dict[str, list[int]] = {}
        for event in events:
            by_channel.setdefault(event["channel"], []).append(event["seq"])
        assert by_channel == {
            ch: [s for s in seqs[ch] if s > since] for ch in ("BTC.trade", "BTC.social",
                                                             "ETH.trade")
        }  # fmt: skip
        assert all(end["type"] == "replay_complete" for end in ends)
        assert {end["channel"]: end["sent"] for end in ends} == {
            ch: len(seqs) for ch, seqs in by_channel.items()
        }


async def test_replay_of_a_range_on_one_channel() -> None:
    async with running_server() as harness, harness.client() as client:
        seqs = [harness.publish("BTC.trade", {"n": n}) for n in range(10)]
        await harness.settle()
        events, (end,) = await replay(
            client,
            {"channel": "BTC.trade", "from": seqs[2], "to": seqs[5], "expect": ["BTC.trade"]},
        )
        assert [e["seq"] for e in events] == seqs[2:6]
        assert end == {"type": "replay_complete", "channel": "BTC.trade", "sent": 4, "id": "r"}


async def test_replay_beyond_the_history_says_what_is_missing() -> None:
    config = make_config(**{"history.max_messages": 4})
    async with running_server(config, make_broker(config)) as harness, harness.client() as client:
        seqs = [harness.publish("BTC.trade", {"n": n}) for n in range(10)]
        await harness.settle()
        events, (end,) = await replay(
            client, {"channel": "BTC.trade", "since": seqs[0], "expect": ["BTC.trade"]}
        )
        assert [e["seq"] for e in events] == seqs[6:]
        assert end["type"] == "replay_incomplete"
        assert end["reason"] == "history_expired"
        assert end["sent"] == 4
        assert end["missing"] == [{"from": seqs[0] + 1, "to": seqs[5]}]


async def test_replay_over_the_limit_stops_and_says_where_to_resume() -> None:
    config = make_config(**{"history.replay_max_messages": 3})
    async with running_server(config) as harness, harness.client() as client:
        seqs = [harness.publish("BTC.trade", {"n": n}) for n in range(8)]
        await harness.settle()
        events, (end,) = await replay(
            client, {"channel": "BTC.trade", "since": 0, "expect": ["BTC.trade"]}
        )
        assert [e["seq"] for e in events] == seqs[:3]
        assert end["reason"] == "limit_exceeded"
        assert end["missing"] == [{"from": seqs[2] + 1, "to": seqs[-1]}]


async def test_replay_with_a_stale_epoch_sends_nothing() -> None:
    async with running_server() as harness, harness.client() as client:
        harness.publish("BTC.trade", {"n": 0})
        await harness.settle()
        events, (end,) = await replay(
            client,
            {"channel": "BTC.trade", "since": 0, "epoch": "old-epoch", "expect": ["BTC.trade"]},
        )
        assert events == []
        assert (end["type"], end["reason"], end["sent"]) == (
            "replay_incomplete", "epoch_changed", 0
        )  # fmt: skip


async def test_replay_of_a_quiet_channel_is_complete_and_empty() -> None:
    async with running_server() as harness, harness.client() as client:
        seq = harness.publish("BTC.trade", {"n": 0})
        await harness.settle()
        events, (end,) = await replay(
            client, {"channel": "BTC.trade", "since": seq, "expect": ["BTC.trade"]}
        )
        assert events == []
        assert (end["type"], end["sent"]) == ("replay_complete", 0)
