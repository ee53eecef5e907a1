"""The WebSocket layer as a client sees it on the wire: a running server on a loopback port and
a raw client (wsproto for the handshake and for reading, frames built by hand where a client
breaks the rules). What a client sends that cannot be parsed is answered with the close code
that names it, then the socket closes; the handshake refuses what it cannot accept; bytes a
client sends right behind its upgrade request are not lost."""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Ping,
    Pong,
    Request,
    TextMessage,
)

from odin_fanout.protocol.negotiation import SUBPROTOCOL_V1
from odin_fanout.server.handshake import MessageSizeGuard
from tests.helpers import http_exchange, http_get, make_config, running_server, upgrade_request

pytestmark = pytest.mark.trio

TEXT, BINARY, CONTINUATION, CLOSE, PING = 0x1, 0x2, 0x0, 0x8, 0x9
MASK = b"\x37\xfa\x21\x3d"
LIMIT = 1024
# A server that waited for the client's close reply would wait this long: far beyond the
# bound on every test's waits, so each close below is one the server did not wait on.
SLOW_CLOSE = {"server.close_timeout": 60.0}


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    masked: bool = True,
    length: int | None = None,
) -> bytes:
    """One frame; ``length`` announces another payload length than ``payload``'s (to send a
    header alone)."""
    size = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | opcode])
    mask_bit = 0x80 if masked else 0
    if size < 126:
        head += bytes([mask_bit | size])
    elif size < 1 << 16:
        head += bytes([mask_bit | 126]) + size.to_bytes(2, "big")
    else:
        head += bytes([mask_bit | 127]) + size.to_bytes(8, "big")
    if not masked:
        return head + payload
    return head + MASK + bytes(byte ^ MASK[n % 4] for n, byte in enumerate(payload))


def subscribe_text(channel: str, size: int | None = None) -> bytes:
    """A subscribe request, padded with JSON whitespace to exactly ``size`` bytes."""
    text = json.dumps({"type": "subscribe", "data": {"channels": [channel]}}).encode()
    if size is not None:
        assert len(text) <= size
        text = text[:-1] + b" " * (size - len(text)) + b"}"
    return text


class RawClient:
    """A client on a bare loopback socket: it sends exactly the bytes it is given and parses
    what comes back with wsproto, until the server closes the socket."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: list[Event] = []
        self.eof = False

    @staticmethod
    def request() -> Request:
        return Request(host="127.0.0.1", target="/ws", subprotocols=[SUBPROTOCOL_V1])

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def read_until(self, done: Callable[[], bool], timeout: float = 5) -> None:
        with trio.fail_after(timeout):
            while not done():
                data = await self.stream.receive_some(65536)
                if not data:
                    self.eof = True
                    return
                self.ws.receive_data(data)
                self.events.extend(self.ws.events())

    async def read_to_eof(self, timeout: float = 5) -> None:
        await self.read_until(lambda: False, timeout)
        assert self.eof

    def messages(self) -> list[dict[str, Any]]:
        """The text messages received (the server's are never fragmented)."""
        found = []
        for event in self.events:
            if isinstance(event, TextMessage):
                assert event.message_finished
                found.append(json.loads(event.data))
        return found

    def has(self, kind: str) -> bool:
        return any(message["type"] == kind for message in self.messages())

    def closes(self) -> list[CloseConnection]:
        return [event for event in self.events if isinstance(event, CloseConnection)]


async def open_raw(port: int) -> RawClient:
    """Connected, upgraded, and past the server's hello."""
    client = RawClient(await trio.open_tcp_stream("127.0.0.1", port))
    await client.send(client.ws.send(client.request()))
    await client.read_until(lambda: client.has("hello"))
    assert any(isinstance(event, AcceptConnection) for event in client.events)
    return client


async def metric(port: int, name: str, **labels: str) -> float:
    """One sample of the server's /metrics exposition."""
    _, _, body = await http_get(port, "/metrics")
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"no sample {name}{labels}")


async def rejected_bad_requests(port: int) -> float:
    return await metric(port, "odin_connections_rejected_total", reason="bad_request")


async def assert_closed_with(client: RawClient, code: int) -> None:
    """The server's close frame with ``code`` arrives, then the end of the stream."""
    await client.read_to_eof()
    closes = client.closes()
    assert [close.code for close in closes] == [code]
    assert client.events[-1] is closes[0]  # nothing after the close frame


# ---- messages over the size limit ----------------------------------------------------------


@pytest.mark.parametrize("announced", [LIMIT + 1, 10**9])
async def test_a_header_announcing_too_big_a_message_is_refused_before_its_payload(
    announced: int,
) -> None:
    config = make_config(**{"server.max_message_size": LIMIT, **SLOW_CLOSE})
    async with running_server(config) as harness:
        client = await open_raw(harness.port)
        try:
            # The header and its masking key, and not one byte of the payload.
            await client.send(frame(TEXT, length=announced))
            await assert_closed_with(client, 1009)
        finally:
            await client.stream.aclose()
        await harness.wait_connections(0)
        port = harness.port
        assert await metric(port, "odin_connections_closed_total", reason="message_too_big") == 1
        assert await metric(port, "odin_connections_active") == 0


async def test_fragments_over_the_limit_are_refused_on_the_header_that_crosses_it() -> None:
    config = make_config(**{"server.max_message_size": LIMIT, **SLOW_CLOSE})
    async with running_server(config) as harness:
        client = await open_raw(harness.port)
        try:
            await client.send(frame(TEXT, b"x" * 600, fin=False))
            # The first fragment alone is within the limit: the connection stays open.
            await client.send(frame(PING, b"still there?"))
            await client.read_until(lambda: any(isinstance(e, Pong) for e in client.events))
            assert client.closes() == []
            await client.send(frame(CONTINUATION, length=600))  # 1200 bytes: the header only
            await assert_closed_with(client, 1009)
        finally:
            await client.stream.aclose()
        await harness.wait_connections(0)
        assert (
            await metric(harness.port, "odin_connections_closed_total", reason="message_too_big")
            == 1
        )


async def test_a_message_of_exactly_the_limit_is_served_however_it_is_fragmented() -> None:
    config = make_config(**{"server.max_message_size": LIMIT})
    async with running_server(config) as harness:
        client = await open_raw(harness.port)
        try:
            text = subscribe_text("BTC.trade", LIMIT)
            # Two fragments of 512 bytes with a ping between them: control frames do not count.
            await client.send(frame(TEXT, text[:512], fin=False))
            await client.send(frame(PING, b"p" * 125))
            await client.send(frame(CONTINUATION, text[512:]))
            await client.read_until(lambda: client.has("subscription_ack"))
            # The count starts again with each message.
            await client.send(frame(TEXT, subscribe_text("ETH.trade", LIMIT)))
            await client.read_until(
                lambda: sum(m["type"] == "subscription_ack" for m in client.messages()) == 2
            )
            acks = [m for m in client.messages() if m["type"] == "subscription_ack"]
            assert [ack["subscribed"] for ack in acks] == [["BTC.trade"], ["ETH.trade"]]
            assert client.closes() == []
        finally:
            await client.stream.aclose()


# ---- frames that break the rules --------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_frame", "code"),
    [
        pytest.param(frame(TEXT, b'{"type":"heartbeat"}', masked=False), 1002, id="unmasked"),
        pytest.param(frame(TEXT, b'{"type":"\xff\xfe"}'), 1007, id="invalid-utf8"),
        pytest.param(frame(0x3, b"?"), 1002, id="reserved-opcode"),
    ],
)
async def test_a_frame_that_breaks_the_rules_gets_its_close_code_then_eof(
    bad_frame: bytes, code: int
) -> None:
    async with running_server(make_config(**SLOW_CLOSE)) as harness:
        client = await open_raw(harness.port)
        try:
            await client.send(bad_frame)
            await assert_closed_with(client, code)
        finally:
            await client.stream.aclose()
        await harness.wait_connections(0)
        assert (
            await metric(harness.port, "odin_connections_closed_total", reason="protocol_error")
            == 1
        )


# ---- the close handshake and pings ---------------------------------------------------------


async def test_a_client_close_is_answered_with_a_close_frame_then_eof() -> None:
    async with running_server(make_config(**SLOW_CLOSE)) as harness:
        client = await open_raw(harness.port)
        try:
            await client.send(client.ws.send(CloseConnection(code=1000, reason="bye")))
            await assert_closed_with(client, 1000)
        finally:
            await client.stream.aclose()
        await harness.wait_connections(0)
        assert await metric(harness.port, "odin_connections_closed_total", reason="client") == 1


async def test_a_close_without_a_code_is_answered_without_one() -> None:
    async with running_server(make_config(**SLOW_CLOSE)) as harness:
        client = await open_raw(harness.port)
        try:
            await client.send(frame(CLOSE))
            # 1005 is what a reader reports for "no code"; it must never be on the wire
            # (wsproto would report a frame carrying it as a protocol error, 1002).
            await assert_closed_with(client, 1005)
        finally:
            await client.stream.aclose()


async def test_a_ping_is_answered_with_a_pong_carrying_its_payload() -> None:
    async with running_server() as harness:
        client = await open_raw(harness.port)
        try:
            await client.send(client.ws.send(Ping(payload=b"are you there?")))
            await client.send(frame(PING, b"\x00\x01binary\xff"))
            await client.read_until(lambda: sum(isinstance(e, Pong) for e in client.events) == 2)
            pongs = [bytes(e.payload) for e in client.events if isinstance(e, Pong)]
            assert pongs == [b"are you there?", b"\x00\x01binary\xff"]
            assert client.closes() == []
        finally:
            await client.stream.aclose()


# ---- the handshake --------------------------------------------------------------------------


async def test_a_handshake_for_another_websocket_version_gets_426_naming_13() -> None:
    async with running_server() as harness:
        request = upgrade_request().replace(
            b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8"
        )
        status, headers, _ = await http_exchange(harness.port, request)
        assert status == 426
        assert headers["sec-websocket-version"] == "13"
        assert await rejected_bad_requests(harness.port) == 1


KEY_LINE = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"


@pytest.mark.parametrize(
    "key_line",
    [
        pytest.param(b"", id="missing"),
        pytest.param(b"Sec-WebSocket-Key: not a key!\r\n", id="not-base64"),
        pytest.param(b"Sec-WebSocket-Key: c2hvcnQga2V5\r\n", id="not-16-bytes"),
        pytest.param(b"Sec-WebSocket-Key: \r\n", id="empty"),
    ],
)
async def test_a_handshake_without_a_valid_key_gets_400(key_line: bytes) -> None:
    async with running_server() as harness:
        request = upgrade_request()
        assert KEY_LINE in request
        status, _, _ = await http_exchange(harness.port, request.replace(KEY_LINE, key_line))
        assert status == 400
        assert await rejected_bad_requests(harness.port) == 1
        assert harness.context.registry.connections == {}


async def test_a_valid_handshake_gets_101_with_the_accept_token() -> None:
    async with running_server() as harness:
        status, headers, _ = await http_exchange(harness.port, upgrade_request())
        assert status == 101
        # RFC 6455 §1.3's example key and its answer.
        assert headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        assert headers["upgrade"].lower() == "websocket"


async def test_a_frame_sent_with_the_upgrade_request_is_not_lost() -> None:
    async with running_server() as harness:
        client = RawClient(await trio.open_tcp_stream("127.0.0.1", harness.port))
        try:
            head = client.ws.send(client.request())
            # One send: the request head and the first frame in the same packet.
            await client.send(head + frame(TEXT, subscribe_text("BTC.trade")))
            await client.read_until(lambda: client.has("subscription_ack"))
            assert any(isinstance(event, AcceptConnection) for event in client.events)
            kinds = [message["type"] for message in client.messages()]
            assert kinds == ["hello", "subscription_ack"]
            assert client.messages()[1]["subscribed"] == ["BTC.trade"]
            seq = harness.publish("BTC.trade", {"n": 1})
            await client.read_until(lambda: any("seq" in m for m in client.messages()))
            assert [m["seq"] for m in client.messages() if "seq" in m] == [seq]
        finally:
            await client.stream.aclose()


# ---- what a connection leaves behind -------------------------------------------------------


@contextmanager
def without_cyclic_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def parsers() -> int:
    """The server's wsproto parsers alive: each has its ``MessageSizeGuard``."""
    return sum(isinstance(thing, MessageSizeGuard) for thing in gc.get_objects())


async def ping_pong(client: RawClient) -> None:
    await client.send(client.ws.send(Ping(b"parse")))
    await client.read_until(lambda: any(isinstance(event, Pong) for event in client.events))


@pytest.mark.parametrize("ending", ["client-close", "vanished", "protocol-error"])
async def test_a_finished_connection_frees_its_parser_without_the_cyclic_collector(
    ending: str,
) -> None:
    """The server collects cycles rarely (odin_fanout.cli.GC_THRESHOLDS): a parser left in a
    reference cycle outlived its connection, memory lost for every connection served. (A
    protocol error ends wsproto's parser by itself: that ending checks the path, not the
    cycle.)"""
    with without_cyclic_collector():
        async with running_server(make_config(**SLOW_CLOSE)) as harness:
            before = parsers()
            for _ in range(3):
                client = await open_raw(harness.port)
                try:
                    await ping_pong(client)  # the parser has run
                    if ending == "client-close":
                        await client.send(client.ws.send(CloseConnection(code=1000)))
                        await client.read_to_eof()
                    elif ending == "protocol-error":
                        await client.send(frame(0x3, b"?"))
                        await client.read_to_eof()
                finally:
                    await client.stream.aclose()
            await harness.wait_connections(0)
            with trio.fail_after(5):
                await trio.testing.wait_all_tasks_blocked()  # the connections' tasks are over
            assert parsers() == before
