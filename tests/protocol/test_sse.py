"""The event-stream encoding and the SSE cursor, sans-IO."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from odin_fanout.protocol.codec import text_frame
from odin_fanout.protocol.sse import (
    BadCursor,
    Cursor,
    block,
    cursor_only,
    frame_payload,
    parse_channels,
    parse_cursor,
)


def browser_reads(stream: bytes) -> list[tuple[str, str, str]]:
    """(event, data, last id) of each dispatched event, as the HTML standard's parser."""
    found, event, data, last = [], "", list[str](), ""
    for line in stream.decode().replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line:
            if data:
                found.append((event or "message", "\n".join(data), last))
            event, data = "", []
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
        elif name == "id":
            last = value
    return found


def test_a_cursor_reads_back_as_it_was_written() -> None:
    cursor = Cursor("79b4be241f9a", 1041)
    assert parse_cursor(cursor.encode().decode()) == cursor
    assert parse_cursor("  ") is None


@pytest.mark.parametrize("text", ["yesterday", "abc:", ":12", "a:b", "a:-1", "x" * 80 + ":1"])
def test_anything_else_is_refused_with_what_was_sent(text: str) -> None:
    with pytest.raises(BadCursor, match="not an Odin position"):
        parse_cursor(text)


def test_channels_may_be_listed_and_repeated() -> None:
    assert parse_channels(["BTC.trade,ETH.*", " SOL.trade ,", ""]) == [
        "BTC.trade",
        "ETH.*",
        "SOL.trade",
    ]


@given(st.recursive(st.none() | st.integers(-(2**63), 2**63 - 1) | st.text(), st.lists))
def test_any_json_arrives_whole_however_its_publisher_broke_its_lines(document: object) -> None:
    pretty = orjson.dumps(document, option=orjson.OPT_INDENT_2).replace(b"\n", b"\r\n")
    (event,) = browser_reads(block(pretty, event=b"x", cursor=b"e:1"))
    assert event[0] == "x"
    assert orjson.loads(event[1]) == document
    assert event[2] == "e:1"


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_a_frame_s_payload_is_its_payload_at_every_header_length(size: int) -> None:
    payload = b"x" * size
    assert frame_payload(text_frame(payload)) == payload


def test_an_id_alone_moves_the_cursor_without_an_event() -> None:
    stream = cursor_only(Cursor("e", 7)) + block(b"{}")
    assert browser_reads(stream) == [("message", "{}", "e:7")]
