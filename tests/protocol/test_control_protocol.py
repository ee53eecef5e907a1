"""The control protocol's rules, without sockets: strict parsing with errors that name the
field, round trips of every command, the event ring's positions, the socket directory."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from odin_fanout.control import paths
from odin_fanout.control.protocol import (
    COMMANDS,
    KICKED,
    ControlError,
    ErrorCode,
    Kick,
    ListConnections,
    Reload,
    Reloaded,
    Reply,
    decode_line,
    encode_error,
    encode_request,
    encode_result,
    parse_request,
)
from odin_fanout.protocol.close_codes import CloseCode
from odin_fanout.server.events import EventRing


@pytest.mark.parametrize(
    ("line", "code", "words"),
    [
        (b"{nope", ErrorCode.BAD_JSON, "not JSON"),
        (b"[1, 2]", ErrorCode.BAD_REQUEST, "JSON object"),
        (b'{"id": 1}', ErrorCode.BAD_REQUEST, "cmd"),
        (b'{"id": 1, "cmd": "reboot"}', ErrorCode.UNKNOWN_COMMAND, "known: hello"),
        (b'{"id": 1, "cmd": "connections", "limit": "5"}', ErrorCode.BAD_REQUEST, "limit"),
        (b'{"id": 1, "cmd": "connections", "limit": 501}', ErrorCode.BAD_REQUEST, "limit"),
        (b'{"id": 1, "cmd": "connections", "sort": "x"}', ErrorCode.BAD_REQUEST, "sort"),
        (b'{"id": 1, "cmd": "connections", "descending": 1}', ErrorCode.BAD_REQUEST, "bool"),
        (b'{"id": 1, "cmd": "hello", "extra": 1}', ErrorCode.BAD_REQUEST, "extra"),
        (b'{"id": 1, "cmd": "kick"}', ErrorCode.BAD_REQUEST, "conn"),
        (b'{"id": 1, "cmd": "kick", "conn": "a-1", "code": 1006}', ErrorCode.BAD_REQUEST, "code"),
        (b'{"id": 1, "cmd": "watch", "interval": 0}', ErrorCode.BAD_REQUEST, "interval"),
        (b'{"id": 1, "cmd": "reload", "force": true}', ErrorCode.BAD_REQUEST, "force"),
        (b'{"id": [1], "cmd": "hello"}', ErrorCode.BAD_REQUEST, "id"),
    ],
)
def test_bad_requests_are_refused_with_a_reason(line: bytes, code: ErrorCode, words: str) -> None:
    with pytest.raises(ControlError) as caught:
        parse_request(line)
    assert caught.value.code is code
    assert words in caught.value.message


def test_the_id_is_kept_for_the_error_reply() -> None:
    with pytest.raises(ControlError) as caught:
        parse_request(b'{"id": "abc", "cmd": "connections", "limit": 0}')
    assert caught.value.request_id == "abc"
    reply = decode_line(encode_error("abc", caught.value.code, caught.value.message))
    assert reply == Reply("abc", False, None, "bad_request", caught.value.message)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_round_trips_with_its_defaults(name: str) -> None:
    kind = COMMANDS[name]
    needs_conn = kind is Kick or name in ("inspect", "tap")
    command = kind(conn="a-1") if needs_conn else kind()  # type: ignore[call-arg]
    assert parse_request(encode_request(3, command).rstrip(b"\n")) == (3, command)


@given(
    offset=st.integers(0, 10_000),
    limit=st.integers(1, 500),
    sort=st.sampled_from(["id", "age", "queue", "queue_age", "sent", "dropped", "channels"]),
    descending=st.booleans(),
    text=st.text(max_size=50),
)
def test_listing_requests_round_trip(
    offset: int, limit: int, sort: str, descending: bool, text: str
) -> None:
    command = ListConnections(offset, limit, sort, descending, text)
    assert parse_request(encode_request("x", command)) == ("x", command)


def test_results_decode_to_their_types() -> None:
    reply = decode_line(encode_result(9, {"conn": "a-1", "code": 4001}))
    assert isinstance(reply, Reply)
    assert reply.ok
    assert reply.result == {"conn": "a-1", "code": 4001}


def test_reload_is_a_command_and_its_reply_says_what_changed() -> None:
    assert parse_request(b'{"id": 5, "cmd": "reload"}') == (5, Reload())
    reloaded = Reloaded(changed=["log.level"], restart_required=["server.port", "nats.url"])
    reply = decode_line(encode_result(5, reloaded))
    assert isinstance(reply, Reply)
    assert reply.result == {
        "changed": ["log.level"],
        "restart_required": ["server.port", "nats.url"],
    }
    assert reply.result_as(Reloaded) == reloaded
    assert reply.result_as(Reloaded) != Reloaded([], [])


def test_a_refused_reload_carries_the_problems() -> None:
    message = "server.port: must be from 1 to 65535; log.level: unknown level"
    reply = decode_line(encode_error(5, ErrorCode.CONFIG_INVALID, message))
    assert reply == Reply(5, False, None, "config_invalid", message)
    assert ErrorCode("config_invalid") is ErrorCode.CONFIG_INVALID
    assert ErrorCode("unavailable") is ErrorCode.UNAVAILABLE


def test_kick_closes_with_the_operator_code_by_default() -> None:
    # The control protocol may not import the client protocol's codes: the two must agree.
    assert KICKED == int(CloseCode.KICKED) == 4001
    assert Kick("a-1").code == CloseCode.KICKED
    _, kick = parse_request(b'{"id": 1, "cmd": "kick", "conn": "a-1"}')
    assert kick == Kick("a-1", CloseCode.KICKED, "closed by operator")


def test_the_event_ring_says_what_a_reader_missed() -> None:
    ring = EventRing(capacity=5)
    assert ring.since(0, 10) == ([], 0)
    for n in range(3):
        ring.emit("conn_open", f"a-{n}")
    events, missed = ring.since(0, 10)
    assert [e.conn for e in events] == ["a-0", "a-1", "a-2"]
    assert missed == 0
    assert ring.since(3, 10) == ([], 0)
    for n in range(3, 10):
        ring.emit("conn_open", f"a-{n}")
    events, missed = ring.since(3, 10)  # 7 newer, only 5 kept
    assert [e.seq for e in events] == [6, 7, 8, 9, 10]
    assert missed == 2
    events, missed = ring.since(3, 2)  # a page of the newest
    assert [e.seq for e in events] == [9, 10]
    assert missed == 5


def test_sockets_go_in_the_runtime_directory_or_a_private_tmp_one(tmp_path: Path) -> None:
    assert paths.default_directory({"XDG_RUNTIME_DIR": "/run/user/7"}) == Path("/run/user/7/odin")
    assert paths.default_directory({}, uid=7) == Path("/tmp/odin-7")
    (tmp_path / paths.socket_name(11)).touch()
    (tmp_path / "notes.txt").touch()
    assert [p.name for p in paths.find_sockets(tmp_path)] == ["odin-11.sock"]
    assert paths.find_sockets(tmp_path / "missing") == []
