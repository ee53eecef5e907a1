"""The control API's contract against a real nats-server: the original's requests and answers,
and every bad request refused with a 4xx that names the field, changing nothing."""

from __future__ import annotations

from typing import Any

import pytest

from tests.nats.support import NatsServer
from tests.publisher.support import call, running_publisher, wait_for_stats

pytestmark = [pytest.mark.trio, pytest.mark.slow]

BAD_REQUESTS: list[tuple[bytes | dict[str, Any], int, str, str | None]] = [
    (b"not json", 400, "bad_json", None),
    (b"[1, 2]", 400, "bad_request", None),
    (b"", 400, "bad_request", None),
    ({"action": "jump"}, 400, "invalid_action", "action"),
    ({"messagesPerSecond": 5}, 400, "invalid_action", "action"),
    ({"action": "start", "messagePerSecond": 5}, 400, "unknown_field", "messagePerSecond"),
    ({"action": "start", "messagesPerSecond": -1}, 422, "invalid_value", "messagesPerSecond"),
    ({"action": "start", "messagesPerSecond": 0}, 422, "invalid_value", "messagesPerSecond"),
    ({"action": "start", "messagesPerSecond": "10"}, 422, "invalid_value", "messagesPerSecond"),
    ({"action": "start", "messagesPerSecond": True}, 422, "invalid_value", "messagesPerSecond"),
    ({"action": "start", "messagesPerSecond": 1e9}, 422, "invalid_value", "messagesPerSecond"),
    ({"action": "start", "tokens": []}, 422, "invalid_value", "tokens"),
    ({"action": "start", "tokens": ["BTC.trade"]}, 422, "invalid_value", "tokens"),
    ({"action": "start", "tokens": [7]}, 422, "invalid_value", "tokens"),
    ({"action": "configure", "duration": -5}, 422, "invalid_value", "duration"),
    ({"action": "configure", "duration": 1.5}, 422, "invalid_value", "duration"),
    ({"action": "configure", "events": ["trade", "gossip"]}, 422, "invalid_value", "events"),
    ({"action": "stop", "messagesPerSecond": 5}, 400, "bad_request", "action"),
    ({"action": "stop"}, 409, "conflict", "action"),
]


async def test_bad_requests_get_a_4xx_naming_the_field_and_change_nothing(
    nats_server: NatsServer,
) -> None:
    async with running_publisher(nats_server.url) as port:
        _, before = await call(port, "GET", "/stats")
        for body, status, code, field in BAD_REQUESTS:
            got, document = await call(port, "POST", "/control", body)
            assert (got, document["error"]["code"], document["error"]["field"]) == (
                status,
                code,
                field,
            ), body
            assert document["success"] is False
            assert document["message"]
        too_big = {"action": "configure", "tokens": ["A" * 8] * 10_000}
        status, document = await call(port, "POST", "/control", too_big)
        assert status == 413
        assert (await call(port, "GET", "/nowhere"))[0] == 404
        assert (await call(port, "GET", "/control"))[0] == 405
        _, after = await call(port, "GET", "/stats")
    assert after == before
    assert after["isPublishing"] is False


async def test_start_configure_stop_and_their_conflicts(nats_server: NatsServer) -> None:
    async with running_publisher(nats_server.url) as port:
        status, health = await call(port, "GET", "/health")
        assert (status, health["status"], health["nats"], health["publishing"]) == (
            200,
            "healthy",
            "connected",
            False,
        )
        assert (await call(port, "GET", "/ready"))[0] == 200

        status, started = await call(
            port, "POST", "/control",
            {"action": "start", "messagesPerSecond": 40, "tokens": ["BTC", "XYZ"],
             "connections": 7000},
        )  # fmt: skip
        assert status == 200
        assert started["success"] is True
        assert started["message"] == "Started publishing with 40 msg/sec for 2 tokens"
        assert started["activeTokens"] == ["BTC", "XYZ"]

        status, again = await call(port, "POST", "/control", {"action": "start"})
        assert (status, again["message"]) == (409, "Publishing already active")

        await wait_for_stats(port, lambda s: s["stats"]["messagesPublished"] >= 10)
        status, configured = await call(
            port, "POST", "/control",
            {"action": "configure", "messagesPerSecond": 200, "events": ["trade", "social"]},
        )  # fmt: skip
        assert status == 200
        assert configured["configuration"] == {
            "connections": 7000,
            "messagesPerSecond": 200.0,
            "tokens": ["BTC", "XYZ"],
            "events": ["trade", "social"],
            "duration": 0,
        }
        stats = await wait_for_stats(port, lambda s: s["stats"]["messagesPublished"] >= 100)
        assert stats["isPublishing"] is True
        assert stats["stats"]["errors"] == 0

        status, stopped = await call(port, "POST", "/control", {"action": "stop"})
        assert (status, stopped["message"]) == (200, "Publishing stopped")
        status, again = await call(port, "POST", "/control", {"action": "stop"})
        assert (status, again["message"]) == (409, "Publishing not active")

        _, final = await call(port, "GET", "/stats")
        assert final["isPublishing"] is False
        assert final["stats"]["startTime"] == started["stats"]["startTime"]
        status, _ = await call(port, "POST", "/control", {"action": "start", "duration": 200})
        assert status == 200
        await wait_for_stats(port, lambda s: not s["isPublishing"])  # the duration ended it
        metrics_status, _ = await call(port, "GET", "/ready")
        assert metrics_status == 200
