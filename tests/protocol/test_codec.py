"""Decoding client frames, encoding replies and events, and the hand-built WebSocket frame."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol, Opcode

from odin_fanout.protocol.codec import (
    decode_request,
    encode,
    encode_event,
    encode_gap,
    event_type,
    text_frame,
)
from odin_fanout.protocol.errors import ClientError, ErrorCode
from odin_fanout.protocol.messages import (
    ChannelsData,
    Error,
    GapNotice,
    Heartbeat,
    Hello,
    Pong,
    Range,
    Reconnect,
    RecoveryReport,
    Replay,
    ReplayComplete,
    ReplayData,
    ReplayIncomplete,
    Request,
    Subscribe,
    SubscribeData,
    SubscriptionAck,
    Unsubscribe,
    UnsubscriptionAck,
)
from odin_fanout.protocol.publication import Position, Publication


def frame(document: object) -> str:
    return json.dumps(document)


def refused(raw: str | bytes) -> ClientError:
    with pytest.raises(ClientError) as info:
        decode_request(raw)
    return info.value


# ---- decode_request: accepted messages --------------------------------------------------


def test_decode_subscribe():
    request = decode_request(
        frame({"type": "subscribe", "data": {"channels": ["BTC.trade", "ETH.*"]}})
    )
    assert request == Request(Subscribe(SubscribeData(["BTC.trade", "ETH.*"])), id=None)


def test_decode_subscribe_with_recover_and_id():
    request = decode_request(
        frame(
            {
                "type": "subscribe",
                "id": "req-1",
                "data": {
                    "channels": ["BTC.trade"],
                    "recover": {"BTC.trade": {"epoch": "e1", "seq": 42}},
                },
            }
        )
    )
    assert request == Request(
        Subscribe(SubscribeData(["BTC.trade"], recover={"BTC.trade": Position("e1", 42)})),
        id="req-1",
    )


def test_decode_unsubscribe():
    request = decode_request(
        frame({"type": "unsubscribe", "id": 7, "data": {"channels": ["BTC.trade"]}})
    )
    assert request == Request(Unsubscribe(ChannelsData(["BTC.trade"])), id=7)


@pytest.mark.parametrize("request_id", [None, 0, -3, 12345678901, "", "x" * 64])
def test_decode_heartbeat_echoes_any_valid_id(request_id):
    document: dict[str, Any] = {"type": "heartbeat"}
    if request_id is not None:
        document["id"] = request_id
    assert decode_request(frame(document)) == Request(Heartbeat(), id=request_id)


def test_decode_null_id_is_no_id():
    assert decode_request('{"type":"heartbeat","id":null}') == Request(Heartbeat(), id=None)


def test_decode_accepts_bytes():
    assert decode_request(b'{"type":"heartbeat","id":1}') == Request(Heartbeat(), id=1)


def test_decode_ignores_unknown_fields():
    # Newer clients may send fields this server does not know.
    request = decode_request(frame({"type": "heartbeat", "data": {}, "extra": [1, 2], "id": "h"}))
    assert request == Request(Heartbeat(), id="h")


def test_decode_replay_since():
    request = decode_request(
        frame({"type": "replay", "data": {"channel": "BTC.trade", "since": 10, "epoch": "e1"}})
    )
    assert request == Request(Replay(ReplayData(channel="BTC.trade", since=10, epoch="e1")))


def test_decode_replay_from_to_uses_the_wire_names():
    request = decode_request(
        frame({"type": "replay", "id": 3, "data": {"channels": ["A.trade"], "from": 5, "to": 9}})
    )
    assert request == Request(
        Replay(ReplayData(channels=["A.trade"], from_seq=5, to=9)),
        id=3,
    )


def test_decode_replay_python_name_is_not_the_wire_name():
    # ``from_seq`` is the attribute name, not a wire field: it is ignored like any unknown key.
    request = decode_request(frame({"type": "replay", "data": {"from_seq": 5, "to": 9}}))
    assert isinstance(request.message, Replay)
    assert request.message.data == ReplayData(to=9)


# ---- decode_request: refusals ------------------------------------------------------------


@pytest.mark.parametrize("raw", ["", "not json", "{", '{"type": "heartbeat",}', b"\xff\xfe"])
def test_invalid_json(raw):
    error = refused(raw)
    assert error.code is ErrorCode.INVALID_JSON
    assert error.message.startswith("not valid JSON")


@pytest.mark.parametrize("raw", ["[]", "5", '"heartbeat"', "null", '[{"type":"heartbeat"}]'])
def test_json_that_is_not_an_object(raw):
    error = refused(raw)
    assert error.code is ErrorCode.INVALID_MESSAGE
    assert "JSON object" in error.message


@pytest.mark.parametrize("document", [{}, {"type": 5}, {"type": None}, {"type": ["subscribe"]}])
def test_missing_or_non_string_type(document):
    error = refused(frame({**document, "id": "q"}))
    assert error.code is ErrorCode.INVALID_MESSAGE
    assert "'type'" in error.message
    assert error.request_id == "q"


def test_unknown_type_names_it_and_the_known_types():
    error = refused(frame({"type": "subscribed", "id": 9}))
    assert error.code is ErrorCode.UNKNOWN_TYPE
    assert "'subscribed'" in error.message
    assert "auth, heartbeat, refresh, replay, subscribe, unsubscribe" in error.message
    assert error.request_id == 9


@pytest.mark.parametrize("request_id", [True, False, 1.5, "x" * 65, [1], {"a": 1}])
def test_invalid_id(request_id):
    error = refused(frame({"type": "heartbeat", "id": request_id}))
    assert error.code is ErrorCode.INVALID_MESSAGE
    assert "'id'" in error.message
    assert error.request_id is None


@pytest.mark.parametrize(
    ("document", "path", "problem"),
    [
        ({"type": "subscribe"}, "$.data", "required field missing"),
        ({"type": "subscribe", "data": []}, "$.data", "expected an object, got list"),
        ({"type": "subscribe", "data": {}}, "$.data.channels", "required field missing"),
        (
            {"type": "subscribe", "data": {"channels": "BTC.trade"}},
            "$.data.channels",
            "expected a list, got str",
        ),
        (
            {"type": "subscribe", "data": {"channels": {"BTC.trade": 1}}},
            "$.data.channels",
            "expected a list, got dict",
        ),
        (
            {"type": "subscribe", "data": {"channels": ["BTC.trade", 5]}},
            "$.data.channels[1]",
            "expected str, got int",
        ),
        (
            {"type": "subscribe", "data": {"channels": ["A.trade"], "recover": ["A.trade"]}},
            "$.data.recover",
            "expected an object, got list",
        ),
        (
            {
                "type": "subscribe",
                "data": {"channels": ["A.trade"], "recover": {"A.trade": {"epoch": "e"}}},
            },
            "$.data.recover['A.trade'].seq",
            "required field missing",
        ),
        (
            {
                "type": "subscribe",
                "data": {
                    "channels": ["A.trade"],
                    "recover": {"A.trade": {"epoch": "e", "seq": "5"}},
                },
            },
            "$.data.recover['A.trade'].seq",
            "expected int, got str",
        ),
        (
            {
                "type": "subscribe",
                "data": {"channels": ["A.trade"], "recover": {"A.trade": {"epoch": 1, "seq": 5}}},
            },
            "$.data.recover['A.trade'].epoch",
            "expected str, got int",
        ),
        (
            {"type": "unsubscribe", "data": {"channels": "BTC.trade"}},
            "$.data.channels",
            "expected a list, got str",
        ),
        (
            {"type": "replay", "data": {"channel": "A.trade", "since": True}},
            "$.data.since",
            "expected int, got bool",
        ),
        (
            {"type": "replay", "data": {"channel": "A.trade", "since": "5"}},
            "$.data.since",
            "expected int, got str",
        ),
        (
            {"type": "replay", "data": {"channel": "A.trade", "since": 5.0}},
            "$.data.since",
            "expected int, got float",
        ),
        (
            {"type": "replay", "data": {"channel": ["A.trade"], "since": 5}},
            "$.data.channel",
            "expected str, got list",
        ),
        (
            {"type": "replay", "data": {"channels": "A.trade", "since": 5}},
            "$.data.channels",
            "expected a list, got str",
        ),
        (
            {"type": "replay", "data": {"since": 5, "epoch": 3}},
            "$.data.epoch",
            "expected str, got int",
        ),
        (
            {"type": "replay", "data": {"from": 1, "to": False}},
            "$.data.to",
            "expected int, got bool",
        ),
    ],
)
def test_wrong_shapes_name_the_field_path(document, path, problem):
    error = refused(frame({**document, "id": "r"}))
    assert error.code is ErrorCode.INVALID_MESSAGE
    assert error.message == f"{document['type']}: {problem} @ {path}"
    assert error.request_type == document["type"]
    assert error.request_id == "r"


@pytest.mark.parametrize("value", ["5", True, 5.5])
def test_replay_from_errors_name_the_wire_field(value):
    # The client sent "from"; the error must name "from", not the internal "from_seq".
    error = refused(frame({"type": "replay", "data": {"from": value, "to": 9}}))
    assert error.code is ErrorCode.INVALID_MESSAGE
    assert error.request_type == "replay"
    assert error.message.endswith("@ $.data.from"), error.message


# ---- encode --------------------------------------------------------------------------------


def decoded(data: bytes) -> dict[str, Any]:
    value = orjson.loads(data)
    assert isinstance(value, dict)
    return value


def test_encode_puts_type_first_and_omits_none():
    data = encode(Pong(ts=1234))
    assert data == b'{"type":"pong","ts":1234}'
    assert list(decoded(encode(Pong(ts=1, id="p")))) == ["type", "ts", "id"]
    assert decoded(encode(Pong(ts=1, id=0))) == {"type": "pong", "ts": 1, "id": 0}


def test_encode_error():
    message = Error(code=ErrorCode.UNKNOWN_TYPE, message="nope", request="subscribe", id=4)
    assert decoded(encode(message)) == {
        "type": "error",
        "code": "UNKNOWN_TYPE",
        "message": "nope",
        "request": "subscribe",
        "id": 4,
    }
    assert decoded(encode(Error(code=ErrorCode.INVALID_JSON, message="m"))) == {
        "type": "error",
        "code": "INVALID_JSON",
        "message": "m",
    }


def test_encode_subscription_ack_plain():
    ack = SubscriptionAck(subscribed=["BTC.trade", "ETH.*"], count=2)
    assert decoded(encode(ack)) == {
        "type": "subscription_ack",
        "subscribed": ["BTC.trade", "ETH.*"],
        "count": 2,
    }


def test_encode_subscription_ack_with_recovery_keeps_false_values():
    ack = SubscriptionAck(
        subscribed=["BTC.trade", "ETH.trade"],
        count=2,
        positions={"BTC.trade": Position("e1", 10), "ETH.trade": Position("e1", 0)},
        recovered=False,
        recovery={
            "BTC.trade": RecoveryReport(recovered=True, count=3),
            "ETH.trade": RecoveryReport(recovered=False, count=0, reason="history_expired"),
        },
        id="s",
    )
    assert decoded(encode(ack)) == {
        "type": "subscription_ack",
        "subscribed": ["BTC.trade", "ETH.trade"],
        "count": 2,
        "positions": {
            "BTC.trade": {"epoch": "e1", "seq": 10},
            "ETH.trade": {"epoch": "e1", "seq": 0},
        },
        "recovered": False,
        "recovery": {
            "BTC.trade": {"recovered": True, "count": 3},
            "ETH.trade": {"recovered": False, "count": 0, "reason": "history_expired"},
        },
        "id": "s",
    }


def test_encode_other_replies():
    assert decoded(encode(UnsubscriptionAck(unsubscribed=["A.trade"], count=0))) == {
        "type": "unsubscription_ack",
        "unsubscribed": ["A.trade"],
        "count": 0,
    }
    assert decoded(encode(ReplayComplete(channel="A.trade", sent=0, id=1))) == {
        "type": "replay_complete",
        "channel": "A.trade",
        "sent": 0,
        "id": 1,
    }
    assert decoded(encode(Reconnect(after_ms=500, reason="server shutting down"))) == {
        "type": "reconnect",
        "after_ms": 500,
        "reason": "server shutting down",
    }
    hello = Hello(version=1, connection_id="c1", ts=99, limits={"burst": 100, "rate": 10.0})
    assert decoded(encode(hello)) == {
        "type": "hello",
        "version": 1,
        "connection_id": "c1",
        "ts": 99,
        "limits": {"burst": 100, "rate": 10.0},
    }


def test_encode_ranges_use_from_and_to():
    incomplete = ReplayIncomplete(
        channel="A.trade",
        sent=2,
        total=7,
        missing=[Range(1, 4), Range(9, 9)],
        reason="history_expired",
        message="gone",
    )
    assert decoded(encode(incomplete)) == {
        "type": "replay_incomplete",
        "channel": "A.trade",
        "sent": 2,
        "total": 7,
        "missing": [{"from": 1, "to": 4}, {"from": 9, "to": 9}],
        "reason": "history_expired",
        "message": "gone",
    }
    gap = GapNotice(channel="A.trade", from_seq=5, to_seq=7, reason="broker_gap")
    expected = {"type": "gap", "channel": "A.trade", "from": 5, "to": 7, "reason": "broker_gap"}
    assert decoded(encode(gap)) == expected
    assert list(decoded(encode(gap))) == list(expected)
    assert encode_gap("A.trade", 5, 7, "broker_gap") == encode(gap)


# ---- events --------------------------------------------------------------------------------


def test_encode_event_splices_the_payload_verbatim():
    payload = b'{"price": 1.10, "qty":[1,  2], "s":"\\u00e9"}'
    publication = Publication(
        channel="BTC.trade", seq=7, prev=3, epoch="e1", ts=1700000000.123456, payload=payload
    )
    data = encode_event(publication, "trade:update")
    assert data.endswith(b',"data":' + payload + b"}")
    document = decoded(data)
    assert list(document) == ["type", "channel", "seq", "prev", "epoch", "ts", "data"]
    assert document == {
        "type": "trade:update",
        "channel": "BTC.trade",
        "seq": 7,
        "prev": 3,
        "epoch": "e1",
        "ts": 1700000000123,
        "data": orjson.loads(payload),
    }


# Positions are 64-bit on the wire (NATS JetStream sequences).
positions = st.integers(min_value=0, max_value=2**63 - 1)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=60)
@given(json_values, st.integers(min_value=0, max_value=2**40), positions)
def test_encode_event_is_valid_json_for_any_payload(value, ts_ms, seq):
    payload = json.dumps(value, indent=1).encode()
    publication = Publication(
        channel="ETH.liquidity", seq=seq, prev=0, epoch="e", ts=ts_ms / 1000, payload=payload
    )
    document = decoded(encode_event(publication, "x"))
    assert document["data"] == orjson.loads(payload)
    assert document["seq"] == seq
    assert abs(document["ts"] - ts_ms) <= 1


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"type": "price:update"}, "price:update"),
        ({"type": "x" * 64}, "x" * 64),
        ({"price": 1}, "trade:update"),
        ({"type": ""}, "trade:update"),
        ({"type": "x" * 65}, "trade:update"),
        ({"type": 5}, "trade:update"),
        ({"type": None}, "trade:update"),
        (["type", "price:update"], "trade:update"),
        ("price:update", "trade:update"),
        (None, "trade:update"),
    ],
)
def test_event_type(payload, expected):
    assert event_type("BTC.trade", payload) == expected


@pytest.mark.parametrize(
    "reserved",
    [
        "hello",
        "pong",
        "subscription_ack",
        "unsubscription_ack",
        "error",
        "replay_complete",
        "replay_incomplete",
        "gap",
        "reconnect",
    ],
)
def test_event_type_never_claims_a_control_reply_type(reserved):
    assert event_type("ETH.liquidity", {"type": reserved}) == "liquidity:update"


# ---- property tests ------------------------------------------------------------------------

CLIENT_TYPES = ["subscribe", "unsubscribe", "heartbeat", "replay", "other"]
DATA_KEYS = ["channels", "channel", "recover", "since", "from", "to", "epoch"]


def documents_with_a_type() -> st.SearchStrategy[dict[str, Any]]:
    """Objects that get past the ``type`` check, so the structuring code runs on junk."""
    data = st.dictionaries(st.sampled_from(DATA_KEYS), json_values, max_size=5) | json_values
    return st.fixed_dictionaries(
        {"type": st.sampled_from(CLIENT_TYPES)},
        optional={"data": data, "id": json_values},
    )


def outcome(raw: str | bytes) -> Request | ClientError:
    """The decoded request or the ClientError; any other exception propagates."""
    try:
        return decode_request(raw)
    except ClientError as error:
        return error


def assert_refuses_only_as_client_error(raw: str | bytes) -> None:
    result = outcome(raw)
    if isinstance(result, ClientError):
        assert isinstance(result.code, ErrorCode)
        assert result.message
    else:
        assert isinstance(result, Request)


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(json_values | documents_with_a_type())
def test_decode_request_on_any_json_raises_only_client_error(value):
    assert_refuses_only_as_client_error(json.dumps(value))


@settings(max_examples=100)
@given(st.text() | st.binary())
def test_decode_request_on_any_text_or_bytes_raises_only_client_error(raw):
    assert_refuses_only_as_client_error(raw)


@settings(max_examples=80)
@given(documents_with_a_type())
def test_every_refusal_can_be_sent_back(value):
    # A refusal becomes an ``error`` reply: its message must always be encodable.
    result = outcome(json.dumps(value))
    if isinstance(result, ClientError):
        reply = Error(code=result.code, message=result.message, request=result.request_type)
        assert decoded(encode(reply))["code"] == result.code.value


BOUNDARY_SIZES = [0, 1, 124, 125, 126, 127, 65535, 65536, 65537, 70000]


def parse_as_client(data: bytes, split: int) -> tuple[str, bool]:
    """Feed a server frame to wsproto's client-side parser in two pieces; return the text and
    whether the message finished."""
    protocol = FrameProtocol(client=True, extensions=[])
    text = ""
    finished = False
    for piece in (data[:split], data[split:]):
        protocol.receive_bytes(piece)
        for received in protocol.received_frames():
            assert received.opcode in (Opcode.TEXT, Opcode.CONTINUATION)
            assert isinstance(received.payload, str)
            text += received.payload
            finished = received.message_finished
    return text, finished


@settings(max_examples=40, deadline=None)
@given(
    st.text(max_size=40),
    st.sampled_from(BOUNDARY_SIZES),
    st.booleans(),
    st.floats(min_value=0.0, max_value=1.0),
)
def test_text_frame_is_parsed_by_wsproto(text, size, text_at_end, split_at):
    # Arbitrary (multi-byte) text, padded with ASCII to sit exactly on a length boundary.
    padding = "x" * max(0, size - len(text.encode()))
    payload_text = padding + text if text_at_end else text + padding
    payload = payload_text.encode()
    assert len(payload) == max(size, len(text.encode()))
    data = text_frame(payload)
    header = len(data) - len(payload)
    if len(payload) < 126:
        assert header == 2
    elif len(payload) < 65536:
        assert header == 4
    else:
        assert header == 10
    parsed, finished = parse_as_client(data, int(len(data) * split_at))
    assert parsed == payload_text
    assert finished


@settings(max_examples=60)
@given(
    st.text(max_size=20),
    positions,
    st.lists(st.tuples(positions, positions), max_size=4),
    st.sampled_from(["history_expired", "limit_exceeded", "epoch_changed"]),
    st.text(max_size=30),
    st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.text(max_size=64),
)
def test_replay_incomplete_round_trip(channel, sent, ranges, reason, message, request_id):
    reply = ReplayIncomplete(
        channel=channel,
        sent=sent,
        total=sent + 1,
        missing=[Range(first, last) for first, last in ranges],
        reason=reason,
        message=message,
        id=request_id,
    )
    expected: dict[str, Any] = {
        "type": "replay_incomplete",
        "channel": channel,
        "sent": sent,
        "total": sent + 1,
        "missing": [{"from": first, "to": last} for first, last in ranges],
        "reason": reason,
        "message": message,
    }
    if request_id is not None:
        expected["id"] = request_id
    assert decoded(encode(reply)) == expected


@settings(max_examples=60)
@given(st.text(max_size=20), positions, positions, st.text())
def test_gap_notice_round_trip(channel, first, last, reason):
    assert decoded(encode(GapNotice(channel, first, last, reason))) == {
        "type": "gap",
        "channel": channel,
        "from": first,
        "to": last,
        "reason": reason,
    }


@settings(max_examples=60)
@given(
    st.integers(min_value=1, max_value=2**53),
    st.integers(min_value=1, max_value=2**53),
    st.none() | st.text(max_size=8),
)
def test_replay_range_round_trips_from_the_wire(first, last, epoch):
    document: dict[str, Any] = {"type": "replay", "data": {"from": first, "to": last}}
    if epoch is not None:
        document["data"]["epoch"] = epoch
    request = decode_request(orjson.dumps(document))
    assert request.message == Replay(ReplayData(from_seq=first, to=last, epoch=epoch))
