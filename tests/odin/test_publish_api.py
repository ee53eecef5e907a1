"""``POST /api/publish`` (``[publish]``): backends publish over HTTP on the client port, reached
with raw HTTP requests and real WebSocket subscribers."""

from __future__ import annotations

import json
from typing import Any

import jwt
import pytest
import trio

from odin_fanout.broker.memory import MemoryBroker
from odin_fanout.config import Config
from tests.helpers import Harness, capture_logs, http_exchange, make_config, running_server
from tests.nats.support import NatsServer, nats_config, odin_on_nats
from tests.publisher.support import stored_messages

pytestmark = pytest.mark.trio

KEY = "backend-key-0123456789"
OTHER_KEY = "second-key-abcdefghij"
SECRET = "a-test-secret-of-at-least-32-bytes!!"


def publish_config(**overrides: object) -> Config:
    return make_config(
        **{"publish.enabled": True, "publish.api_keys": f"{KEY},{OTHER_KEY}", **overrides}
    )


def post(
    body: bytes | dict[str, Any] | list[Any],
    *,
    credential: str | None = KEY,
    content_type: str | None = "application/json",
    headers: dict[str, str] | None = None,
    method: str = "POST",
    path: str = "/api/publish",
) -> bytes:
    """A raw request with its Content-Length."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(data)}"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if credential is not None:
        lines.append(f"Authorization: Bearer {credential}")
    lines.extend(f"{name}: {value}" for name, value in (headers or {}).items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


async def call(harness: Harness, request: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    status, headers, body = await http_exchange(harness.port, request)
    return status, headers, json.loads(body) if body.startswith(b"{") else {"raw": body}


def count(harness: Harness, result: str) -> float:
    value = harness.context.metrics.registry.get_sample_value(
        "odin_http_publish_total", {"result": result}
    )
    return value or 0.0


def token(**claims: Any) -> str:
    return jwt.encode({"sub": "backend", **claims}, SECRET, algorithm="HS256")


TRADE = {"channel": "BTC.trade", "data": {"price": 1.5, "type": "price:update"}}


async def test_the_api_is_off_unless_enabled() -> None:
    async with running_server(make_config()) as harness:
        status, _, body = await http_exchange(harness.port, post(TRADE))
    assert status == 404, body


async def test_a_publish_reaches_a_subscribed_client_with_its_data() -> None:
    async with running_server(publish_config()) as harness, harness.client() as client:
        await client.subscribe(["BTC.trade"])
        status, headers, answer = await call(harness, post(TRADE))
        assert status == 200, answer
        assert headers["content-type"] == "application/json"
        [event] = await client.events(1)
        assert event["channel"] == "BTC.trade"
        assert event["data"] == TRADE["data"]
        assert answer["published"] == 1
        [position] = answer["positions"]
        assert position["channel"] == "BTC.trade"
        assert position["seq"] == event["seq"]
        assert position["epoch"] == event["epoch"]
        assert count(harness, "ok") == 1


async def test_a_batch_is_published_in_order() -> None:
    events = [
        {"channel": "BTC.trade", "data": {"n": 1}},
        {"channel": "ETH.trade", "data": {"n": 2}},
        {"channel": "BTC.trade", "data": {"n": 3}},
    ]
    async with running_server(publish_config()) as harness, harness.client() as client:
        await client.subscribe(["*.trade"])
        status, _, answer = await call(harness, post({"events": events}))
        assert status == 200, answer
        assert answer["published"] == 3
        received = await client.events(3)
    assert [(e["channel"], e["data"]) for e in received] == [
        (e["channel"], e["data"]) for e in events
    ]
    assert [p["seq"] for p in answer["positions"]] == [e["seq"] for e in received]


BAD_REQUESTS = [
    # (request, status, code, field, part of the message)
    (post(b"{not json"), 400, "invalid_json", "body", "not JSON"),
    (post([TRADE]), 400, "invalid", "body", "JSON object"),
    (post({"data": {}}), 400, "invalid", "channel", "required"),
    (post({"channel": 5, "data": {}}), 400, "invalid", "channel", "string"),
    (post({"channel": "btc", "data": {}}), 400, "invalid", "channel", "SYMBOL.event"),
    (post({"channel": "BTC.*", "data": {}}), 400, "invalid", "channel", "pattern"),
    (post({"channel": "BTC.nope", "data": {}}), 400, "invalid", "channel", "unknown event"),
    (post({"channel": "BTC.trade", "data": [1]}), 400, "invalid", "data", "JSON object"),
    (post({"channel": "BTC.trade"}), 400, "invalid", "data", "required"),
    (post({**TRADE, "extra": 1}), 400, "invalid", "extra", "unknown field"),
    (post({"events": []}), 400, "invalid", "events", "non-empty"),
    (
        post({"events": [TRADE, {"channel": "BTC", "data": {}}]}),
        400, "invalid", "events[1].channel", "SYMBOL.event",
    ),
    (post({"events": [TRADE, 3]}), 400, "invalid", "events[1]", "object"),
    (post({"events": [TRADE] * 6}), 422, "too_many_events", "events", "publish.max_batch"),
    (
        post({"channel": "BTC.trade", "data": {"pad": "x" * 2048}}),
        413, "too_large", "body", "larger than 1024 bytes",
    ),
    (post(TRADE, content_type="text/plain"), 415, "unsupported_media_type", "Content-Type", ""),
    (post(TRADE, content_type=None), 415, "unsupported_media_type", "Content-Type", ""),
    (
        post(TRADE, headers={"Idempotency-Key": "has spaces"}),
        400, "invalid", "Idempotency-Key", "1-64",
    ),
    (
        post(TRADE, headers={"Idempotency-Key": "k" * 65}),
        400, "invalid", "Idempotency-Key", "1-64",
    ),
    (post(b"", method="GET"), 405, "method_not_allowed", None, "POST"),
]  # fmt: skip


@pytest.mark.parametrize(("request_bytes", "status", "code", "field", "message"), BAD_REQUESTS)
async def test_a_bad_request_is_refused_naming_the_field(
    request_bytes: bytes, status: int, code: str, field: str | None, message: str
) -> None:
    config = publish_config(**{"publish.max_body": 1024, "publish.max_batch": 5})
    async with running_server(config) as harness, harness.client() as client:
        await client.subscribe(["BTC.trade"])
        got, headers, answer = await call(harness, request_bytes)
        assert got == status, answer
        error = answer["error"]
        assert error["code"] == code
        assert error["field"] == field
        assert message in error["message"]
        if status == 405:
            assert headers["allow"] == "POST"
        # Nothing was published: the next event the client sees is one published after.
        seq = harness.publish("BTC.trade", {"after": True})
        [event] = await client.events(1)
        assert event["seq"] == seq
        result = {413: "too_large"}.get(status, "invalid")
        assert count(harness, result) == 1


async def test_a_body_declared_too_large_is_refused_before_it_is_read() -> None:
    config = publish_config(**{"publish.max_body": 1024})
    request = (
        b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {KEY}\r\nContent-Length: 100000000\r\n\r\n".encode()
        + b"{"
    )
    async with running_server(config) as harness:
        status, _, answer = await call(harness, request)
    assert status == 413
    assert answer["error"]["field"] == "body"


async def test_a_client_expecting_100_continue_is_told_to_go_on() -> None:
    body = json.dumps(TRADE).encode()
    head = (
        b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n".encode()
        + b"Expect: 100-continue\r\n\r\n"
    )
    async with running_server(publish_config()) as harness:
        stream = await trio.open_tcp_stream("127.0.0.1", harness.port)
        async with stream:
            with trio.fail_after(5):
                await stream.send_all(head)
                received = b""
                while b"\r\n\r\n" not in received:
                    received += await stream.receive_some(4096)
                assert received.startswith(b"HTTP/1.1 100 ")
                await stream.send_all(body)
                while b'"published":1' not in received:
                    data = await stream.receive_some(4096)
                    assert data
                    received += data
    assert b"HTTP/1.1 200 " in received


@pytest.mark.parametrize(
    ("credential", "reason"),
    [(None, "missing"), ("wrong-key-0123456789", "invalid"), (KEY + "x", "invalid")],
)
async def test_without_a_good_credential_it_is_401(credential: str | None, reason: str) -> None:
    async with running_server(publish_config()) as harness:
        with capture_logs() as logs:
            status, headers, answer = await call(harness, post(TRADE, credential=credential))
        assert status == 401
        assert answer["error"]["code"] == "unauthorized"
        assert answer["error"]["field"] == "Authorization"
        assert answer["error"]["message"].startswith(reason)
        assert headers["www-authenticate"].startswith("Bearer")
        assert count(harness, "unauthorized") == 1
    [line] = [entry for entry in logs if entry["event"] == "publish_refused"]
    assert line["result"] == "unauthorized"
    assert KEY not in json.dumps(line)


async def test_every_configured_key_may_publish_anywhere() -> None:
    async with running_server(publish_config()) as harness:
        for credential in (KEY, OTHER_KEY):
            request = post({"channel": "ZZZ.social", "data": {}}, credential=credential)
            status, _, answer = await call(harness, request)
            assert status == 200, answer


async def test_keys_may_come_from_a_file(tmp_path: Any) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# backends\n\n{OTHER_KEY}\n")
    config = make_config(**{"publish.enabled": True, "publish.api_keys_file": str(keys)})
    async with running_server(config) as harness:
        assert (await call(harness, post(TRADE, credential=OTHER_KEY)))[0] == 200
        assert (await call(harness, post(TRADE, credential=KEY)))[0] == 401


async def test_a_jwt_publishes_only_where_its_publish_claim_allows() -> None:
    config = publish_config(**{"auth.hmac_secret": SECRET})
    allowed = token(publish=["BTC.*", "*.social"])
    async with running_server(config) as harness, harness.client() as client:
        await client.subscribe(["BTC.trade"])
        status, _, answer = await call(harness, post(TRADE, credential=allowed))
        assert status == 200, answer
        [event] = await client.events(1)
        assert event["data"] == TRADE["data"]

        eth = {"channel": "ETH.trade", "data": {}}
        status, _, answer = await call(harness, post(eth, credential=allowed))
        assert status == 403
        assert answer["error"] == {
            "code": "forbidden",
            "field": "channel",
            "message": "the token's publish claim does not allow 'ETH.trade'",
        }
        batch = {"events": [TRADE, {"channel": "ETH.social", "data": {}}, eth]}
        status, _, answer = await call(harness, post(batch, credential=allowed))
        assert status == 403
        assert answer["error"]["field"] == "events[2].channel"

        no_claim = token()
        status, _, answer = await call(harness, post(TRADE, credential=no_claim))
        assert status == 403
        assert count(harness, "forbidden") == 3

        for bad in (
            jwt.encode({"publish": ["BTC.*"]}, "another-secret-of-at-least-32-bytes!", "HS256"),
            token(publish="BTC.*"),
            token(publish=["not a pattern"]),
        ):
            status, _, answer = await call(harness, post(TRADE, credential=bad))
            assert status == 401, answer
        assert count(harness, "unauthorized") == 3


class RecordingBroker:
    """The memory broker, seen only through the broker interface (no positions at once),
    recording the message ids it is given."""

    def __init__(self, inner: MemoryBroker) -> None:
        self.inner = inner
        self.msg_ids: list[tuple[str, str | None]] = []

    async def publish(self, channel: str, payload: bytes, msg_id: str | None = None) -> None:
        self.msg_ids.append((channel, msg_id))
        await self.inner.publish(channel, payload, msg_id)

    def __getattr__(self, name: str) -> Any:
        if name == "publish_nowait":
            raise AttributeError(name)
        return getattr(self.inner, name)


async def test_an_idempotency_key_becomes_the_message_id() -> None:
    config = publish_config()
    broker = RecordingBroker(MemoryBroker())
    async with running_server(config, broker) as harness:
        status, _, answer = await call(harness, post(TRADE, headers={"Idempotency-Key": "o-1"}))
        assert answer == {"published": 1}  # no positions from this broker
        batch = {"events": [TRADE, {"channel": "ETH.trade", "data": {}}]}
        status, _, answer = await call(harness, post(batch, headers={"Idempotency-Key": "b.2"}))
        assert answer == {"published": 2}
        status, _, answer = await call(harness, post(TRADE))
        assert status == 200
        await call(harness, post(batch))
    assert broker.msg_ids[:3] == [
        ("BTC.trade", "o-1"),
        ("BTC.trade", "b.2-0"),
        ("ETH.trade", "b.2-1"),
    ]
    # Without a key a request still gets one of its own (so the broker's retries store an
    # event once), a different one per request, suffixed per event in a batch.
    (_, alone), (_, first), (_, second) = broker.msg_ids[3:]
    assert alone and first and second
    assert first.rsplit("-", 1) == [second.rsplit("-", 1)[0], "0"]
    assert second.endswith("-1")
    assert alone != first.rsplit("-", 1)[0]


async def test_a_credential_over_its_rate_is_answered_429_with_retry_after() -> None:
    config = publish_config(**{"publish.rate_per_second": 0.5, "publish.burst": 3})
    async with running_server(config) as harness:
        batch = {"events": [TRADE, TRADE]}
        assert (await call(harness, post(batch)))[0] == 200
        assert (await call(harness, post(TRADE)))[0] == 200
        status, headers, answer = await call(harness, post(TRADE))
        assert status == 429
        assert answer["error"]["code"] == "rate_limited"
        assert headers["retry-after"] == "2"
        # The bucket is the credential's: another key still has its own.
        assert (await call(harness, post(TRADE, credential=OTHER_KEY)))[0] == 200
        # A batch larger than the bucket could ever hold is refused for what it is.
        status, _, answer = await call(harness, post({"events": [TRADE] * 4}))
        assert status == 422
        assert answer["error"]["field"] == "events"
        assert count(harness, "rate_limited") == 1


async def test_a_broker_refusal_is_503() -> None:
    class Refusing(RecordingBroker):
        async def publish(self, channel: str, payload: bytes, msg_id: str | None = None) -> None:
            from odin_fanout.broker.base import BrokerError

            raise BrokerError("the publish queue is full")

    broker = Refusing(MemoryBroker())
    async with running_server(publish_config(), broker) as harness:
        status, headers, answer = await call(harness, post(TRADE))
        assert status == 503
        assert answer["error"]["code"] == "broker_error"
        assert answer["published"] == 0
        assert "retry-after" in headers
        assert count(harness, "broker_error") == 1


@pytest.mark.slow
async def test_a_retried_post_with_an_idempotency_key_is_stored_once(
    nats_server: NatsServer,
) -> None:
    config = nats_config(nats_server.url, **{"publish.enabled": True, "publish.api_keys": KEY})
    async with odin_on_nats(config) as (harness, broker), harness.client() as client:
        await broker.wait_ready()
        await client.subscribe(["BTC.trade"])
        retried = post({"channel": "BTC.trade", "data": {"n": 1}},
                       headers={"Idempotency-Key": "order-77"})  # fmt: skip
        for _ in range(2):  # the backend did not see the first answer, and retried
            status, _, answer = await call(harness, retried)
            assert (status, answer) == (200, {"published": 1})
        later = post({"channel": "BTC.trade", "data": {"n": 2}})
        assert (await call(harness, later))[0] == 200
        # Stored in order: once the later one arrives, the retry was handled before it.
        events = await client.events(2, timeout=10)
        assert [event["data"] for event in events] == [{"n": 1}, {"n": 2}]
    stored = [
        m for m in await stored_messages(nats_server.port) if m["subject"].endswith("BTC.trade")
    ]
    assert [m["data"] for m in stored] == [{"n": 1}, {"n": 2}]
    assert "Nats-Msg-Id: order-77" in stored[0]["headers"]
