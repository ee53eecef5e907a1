"""A client written for the original server works unchanged against ``odin serve`` fed
through NATS: it asks for no subprotocol and counts every message that is not an ack or a
``pong`` as an event (as the original's filtering and load scripts do), and it counts exactly
the events published on its channels: no ``hello``, nothing extra."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol

from odin_fanout.protocol.negotiation import SUBPROTOCOL_V1
from tests.e2e.process import odin_process
from tests.nats.support import NatsServer, RawPublisher, odin_url_args

pytestmark = [pytest.mark.trio, pytest.mark.slow]

NOT_EVENTS = {"subscription_ack", "unsubscription_ack", "pong"}
PER_CHANNEL = 5
CHANNELS = ("BTC.trade", "ETH.trade", "SOL.trade")


class OriginalClient:
    """The original's test client: a plain WebSocket, every other message is an event."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []

    def _read_until(self, reply: str) -> dict[str, Any]:
        while True:
            message: dict[str, Any] = json.loads(self.ws.recv(timeout=10))
            if message.get("type") == reply:
                return message
            if message.get("type") not in NOT_EVENTS:
                self.events.append(message)

    def request(self, kind: str, channels: list[str], reply: str) -> dict[str, Any]:
        self.ws.send(json.dumps({"type": kind, "data": {"channels": channels}}))
        return self._read_until(reply)

    def collect(self) -> list[dict[str, Any]]:
        """Everything queued for this client so far: read up to the answer to a heartbeat
        (the server queues the pong after every event already fanned out to it)."""
        self.ws.send(json.dumps({"type": "heartbeat"}))
        self._read_until("pong")
        return self.events


@contextmanager
def original_client(url: str) -> Iterator[OriginalClient]:
    with connect(url, open_timeout=10) as ws:
        assert ws.subprotocol is None
        yield OriginalClient(ws)


async def test_subscribe_unsubscribe_several_channels_and_none_count_exactly(
    nats_server: NatsServer,
) -> None:
    with odin_process(odin_url_args(nats_server.url)) as odin:
        odin.wait_for("broker_ready")
        url = odin.wait_for("listening")["websocket"][0]
        with (
            original_client(url) as single,
            original_client(url) as several,
            original_client(url) as unsubscribed,
            original_client(url) as silent,
            connect(url, open_timeout=10, subprotocols=[Subprotocol(SUBPROTOCOL_V1)]) as witness,
        ):
            assert json.loads(witness.recv(timeout=10))["type"] == "hello"
            witness.send(json.dumps({"type": "subscribe", "data": {"channels": ["*.*"]}}))
            assert json.loads(witness.recv(timeout=10))["type"] == "subscription_ack"
            assert single.request("subscribe", ["BTC.trade"], "subscription_ack")["count"] == 1
            ack = several.request("subscribe", ["BTC.trade", "ETH.trade"], "subscription_ack")
            assert ack["count"] == 2
            unsubscribed.request("subscribe", ["BTC.trade", "ETH.trade"], "subscription_ack")
            ack = unsubscribed.request("unsubscribe", ["ETH.trade"], "unsubscription_ack")
            assert ack["count"] == 1

            publisher = await RawPublisher.connect(nats_server.port)
            for n in range(PER_CHANNEL):
                for channel in CHANNELS:
                    await publisher.publish(f"odin.token.{channel}", {"n": n, "ch": channel})
            await publisher.flush()
            await publisher.aclose()
            # The witness has every event once the fan-out has handled them all.
            total = PER_CHANNEL * len(CHANNELS)
            seen = [json.loads(witness.recv(timeout=10)) for _ in range(total)]
            assert all("seq" in message for message in seen)

            def published(*channels: str) -> list[tuple[str, int]]:
                return [(ch, n) for n in range(PER_CHANNEL) for ch in CHANNELS if ch in channels]

            def got(client: OriginalClient) -> list[tuple[str, int]]:
                return [(e["data"]["ch"], e["data"]["n"]) for e in client.collect()]

            assert got(single) == published("BTC.trade")
            assert got(several) == published("BTC.trade", "ETH.trade")
            assert got(unsubscribed) == published("BTC.trade")
            assert got(silent) == []
