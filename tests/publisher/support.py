"""The publisher in this process, talked to over HTTP, and the stream read back raw."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from odin_fanout.logs import get_logger
from odin_fanout.publisher.cli import serve
from odin_fanout.publisher.config import load
from tests.helpers import http_exchange
from tests.nats.support import RawPublisher


@asynccontextmanager
async def running_publisher(
    nats_url: str, settings: dict[str, object] | None = None, *, wait_ready: bool = True
) -> AsyncIterator[int]:
    """``odin-publisher`` as ``serve`` runs it, on a free port; yields the port once it is
    ready (connected to NATS, the stream known) unless told not to wait."""
    overrides: dict[str, object] = {
        "nats.url": nats_url,
        "http.port": 0,
        "nats.reconnect_wait_min": 0.1,
        "nats.reconnect_wait_max": 0.5,
        "nats.ping_interval": 0.5,
        **(settings or {}),
    }
    config, _ = load(environ={}, overrides=overrides)
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve, config, get_logger(service="publisher-test"))
        port = int(binds[0].rsplit(":", 1)[1])
        with trio.fail_after(15):
            while wait_ready and (await call(port, "GET", "/ready"))[0] != 200:
                await trio.sleep(0.02)  # an HTTP endpoint: polled, bounded
        yield port
        nursery.cancel_scope.cancel()


async def call(
    port: int, method: str, path: str, body: bytes | dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    """One HTTP request; the status and the JSON body."""
    data = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    request = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode() + data
    status, _, response = await http_exchange(port, request)
    return status, json.loads(response) if response else {}


async def wait_for_stats(port: int, condition: Any, timeout: float = 15) -> dict[str, Any]:
    """Poll ``GET /stats`` until ``condition(stats_document)`` holds (bounded)."""
    with trio.fail_after(timeout):
        while True:
            _, document = await call(port, "GET", "/stats")
            if condition(document):
                return document
            await trio.sleep(0.05)  # an HTTP endpoint: polled, bounded


async def stored_messages(nats_port: int, stream: str = "ODIN_TOKENS") -> list[dict[str, Any]]:
    """Every message the stream holds: subject, seq, headers (text) and data (JSON)."""
    client = await RawPublisher.connect(nats_port)
    try:
        info = json.loads(await client.request(f"$JS.API.STREAM.INFO.{stream}"))
        state = info["state"]
        messages = []
        for seq in range(state["first_seq"], state["last_seq"] + 1):
            request = json.dumps({"seq": seq}).encode()
            reply = json.loads(await client.request(f"$JS.API.STREAM.MSG.GET.{stream}", request))
            if "message" not in reply:
                continue  # deleted
            message = reply["message"]
            messages.append(
                {
                    "subject": message["subject"],
                    "seq": message["seq"],
                    "headers": base64.b64decode(message.get("hdrs", "")).decode(),
                    "data": json.loads(base64.b64decode(message["data"])),
                }
            )
        return messages
    finally:
        await client.aclose()
