"""The sans-IO NATS protocol parser (``odin_fanout.broker.nats.protocol``)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from odin_fanout.broker.nats.protocol import (
    ERR,
    HMSG,
    INFO,
    MSG,
    OK,
    PING,
    PONG,
    Op,
    Parser,
    ProtocolError,
    decode_info,
    header_fields,
    status,
)


def encode(op: Op) -> bytes:
    """What a server sends for ``op``."""
    kind, subject, sid, reply, headers, payload = op
    if kind == MSG:
        fields = [b"MSG", subject, sid, *([reply] if reply else []), b"%d" % len(payload)]
        return b" ".join(fields) + b"\r\n" + payload + b"\r\n"
    if kind == HMSG:
        sizes = [b"%d" % len(headers), b"%d" % (len(headers) + len(payload))]
        fields = [b"HMSG", subject, sid, *([reply] if reply else []), *sizes]
        return b" ".join(fields) + b"\r\n" + headers + payload + b"\r\n"
    words = {PING: b"PING", PONG: b"PONG", OK: b"+OK", ERR: b"-ERR", INFO: b"INFO"}
    return words[kind] + (b" " + payload if payload else b"") + b"\r\n"


def parse(*chunks: bytes, parser: Parser | None = None) -> list[Op]:
    parser = parser or Parser()
    ops: list[Op] = []
    for chunk in chunks:
        parser.feed(chunk)
        while batch := parser.operations(1000):
            ops.extend(batch)
    return ops


def msg(subject: bytes, sid: bytes, reply: bytes, payload: bytes) -> Op:
    return (MSG, subject, sid, reply, b"", payload)


def hmsg(subject: bytes, sid: bytes, reply: bytes, headers: bytes, payload: bytes) -> Op:
    return (HMSG, subject, sid, reply, headers, payload)


ACK = b"$JS.ACK.odin.C1.1.42.7.1764950000123456789.3"
FLOW_CONTROL = b"NATS/1.0 100 FlowControl Request\r\n\r\n"
HEARTBEAT = b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 7\r\nNats-Last-Stream: 42\r\n\r\n"
SAMPLE_OPS: list[Op] = [
    (INFO, b"", b"", b"", b"", b'{"server_id":"N1","connect_urls":["10.0.0.2:4222"]}'),
    (PONG, b"", b"", b"", b"", b""),
    msg(b"odin.ch1", b"2", ACK, b'{"a":1}'),
    msg(b"_INBOX.odin1.r1", b"1", b"", b'{"stream":"odin","seq":1}'),
    msg(b"odin.empty", b"2", b"", b""),
    msg(b"odin.crlf", b"2", b"", b"MSG x 1 3\r\nabc\r\n"),
    hmsg(b"odin.ch2", b"2", ACK, b"NATS/1.0\r\nNats-Msg-Id: m1\r\n\r\n", b'{"b":2}'),
    hmsg(b"_odin.deliver.x.2", b"2", b"", HEARTBEAT, b""),
    hmsg(b"_odin.deliver.x.2", b"2", b"$JS.FC.odin.C1.abc", FLOW_CONTROL, b""),
    hmsg(b"_INBOX.odin1.r2", b"1", b"", b"NATS/1.0 503\r\n\r\n", b""),
    hmsg(b"_INBOX.odin1.b1", b"1", b"", b"NATS/1.0 409 Consumer Deleted\r\n\r\n", b""),
    (PING, b"", b"", b"", b"", b""),
    (OK, b"", b"", b"", b"", b""),
    (ERR, b"", b"", b"", b"", b"'Authorization Violation'"),
    (INFO, b"", b"", b"", b"", b'{"ldm":true}'),
]  # fmt: skip
SAMPLE = b"".join(encode(op) for op in SAMPLE_OPS)


# ---- each operation ------------------------------------------------------------------------


def test_each_operation_is_parsed() -> None:
    assert parse(SAMPLE) == SAMPLE_OPS


def test_the_wire_forms_are_read_as_servers_write_them() -> None:
    data = (
        b"MSG odin.a 2 5\r\nhello\r\n"
        b"MSG odin.a 2 r.1 0\r\n\r\n"
        b"HMSG odin.a 3 22 27\r\nNATS/1.0\r\nX-Key: v\r\n\r\nhello\r\n"
        b"HMSG odin.a 3 r.2 12 12\r\nNATS/1.0\r\n\r\n\r\n"
        b"PING\r\nPONG\r\n+OK\r\n-ERR 'Unknown Protocol Operation'\r\nINFO {}\r\n"
    )
    assert parse(data) == [
        msg(b"odin.a", b"2", b"", b"hello"),
        msg(b"odin.a", b"2", b"r.1", b""),
        hmsg(b"odin.a", b"3", b"", b"NATS/1.0\r\nX-Key: v\r\n\r\n", b"hello"),
        hmsg(b"odin.a", b"3", b"r.2", b"NATS/1.0\r\n\r\n", b""),
        (PING, b"", b"", b"", b"", b""),
        (PONG, b"", b"", b"", b"", b""),
        (OK, b"", b"", b"", b"", b""),
        (ERR, b"", b"", b"", b"", b"'Unknown Protocol Operation'"),
        (INFO, b"", b"", b"", b"", b"{}"),
    ]


def test_control_lines_are_case_insensitive_and_tolerate_tabs() -> None:
    assert [op[0] for op in parse(b"ping\r\nPong\r\n+ok\r\n")] == [PING, PONG, OK]
    assert parse(b"MSG\todin.a  2\t3\r\nabc\r\n") == [msg(b"odin.a", b"2", b"", b"abc")]


def test_operations_returns_at_most_the_limit_and_keeps_the_rest() -> None:
    parser = Parser()
    parser.feed(b"PING\r\n" * 5 + b"PO")
    assert len(parser.operations(3)) == 3
    assert len(parser.operations(3)) == 2
    assert parser.operations(3) == []
    assert parser.buffered == 2
    parser.feed(b"NG\r\n")
    assert parser.operations(3) == [(PONG, b"", b"", b"", b"", b"")]
    assert parser.buffered == 0


# ---- split frames --------------------------------------------------------------------------


def test_a_stream_split_at_every_byte_parses_the_same() -> None:
    for cut in range(len(SAMPLE) + 1):
        assert parse(SAMPLE[:cut], SAMPLE[cut:]) == SAMPLE_OPS, cut


def test_a_stream_split_at_every_pair_of_boundaries_of_a_message_parses_the_same() -> None:
    data = encode(SAMPLE_OPS[6])  # an HMSG with a reply, headers and a payload
    for first in range(len(data) + 1):
        for second in range(first, len(data) + 1):
            chunks = (data[:first], data[first:second], data[second:])
            assert parse(*chunks) == [SAMPLE_OPS[6]], (first, second)


def test_a_stream_fed_byte_by_byte_parses_the_same() -> None:
    assert parse(*(SAMPLE[i : i + 1] for i in range(len(SAMPLE)))) == SAMPLE_OPS


def test_a_message_waits_for_its_whole_payload_and_its_crlf() -> None:
    parser = Parser()
    parser.feed(b"MSG a 2 3\r\nabc")
    assert parser.operations() == []
    parser.feed(b"\r")
    assert parser.operations() == []
    parser.feed(b"\n")
    assert parser.operations() == [msg(b"a", b"2", b"", b"abc")]


# ---- headers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (b"NATS/1.0 503\r\n\r\n", (503, b"")),
        (b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 7\r\n\r\n", (100, b"Idle Heartbeat")),
        (b"NATS/1.0 100 FlowControl Request\r\n\r\n", (100, b"FlowControl Request")),
        (b"NATS/1.0 409 Consumer is push based\r\n\r\n", (409, b"Consumer is push based")),
        (b"NATS/1.0 404 No Messages\r\n\r\n", (404, b"No Messages")),
        (b"NATS/1.0\r\nNats-Msg-Id: m1\r\n\r\n", (0, b"")),
        (b"NATS/1.0 \r\n\r\n", (0, b"")),
        (b"", (0, b"")),
    ],
)  # fmt: skip
def test_the_status_of_a_header_block(headers: bytes, expected: tuple[int, bytes]) -> None:
    assert status(headers) == expected


def test_header_fields_are_read_with_their_values_stripped() -> None:
    block = (
        b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 7\r\n"
        b"Nats-Consumer-Stalled:  $JS.FC.odin.C1.x \r\nX-Colon: a:b\r\nno colon\r\n"
        b"X-Colon: c\r\n\r\n"
    )
    assert header_fields(block) == {
        b"Nats-Last-Consumer": b"7",
        b"Nats-Consumer-Stalled": b"$JS.FC.odin.C1.x",
        b"X-Colon": b"c",
    }
    assert header_fields(b"NATS/1.0\r\n\r\n") == {}


def test_a_header_block_up_to_the_limit_is_read_and_a_larger_one_refused_at_once() -> None:
    block = b"NATS/1.0\r\nX-Big: " + b"x" * 1000 + b"\r\n\r\n"
    assert parse(encode(hmsg(b"a", b"2", b"", block, b"p")), parser=Parser(max_header=len(block)))
    parser = Parser(max_header=len(block) - 1)
    parser.feed(b"HMSG a 2 %d %d\r\n" % (len(block), len(block) + 1))  # no block yet
    with pytest.raises(ProtocolError, match="header size"):
        parser.operations()


def test_a_header_block_larger_than_the_message_is_refused() -> None:
    with pytest.raises(ProtocolError, match="header size"):
        parse(b"HMSG a 2 20 10\r\nNATS/1.0\r\n\r\n\r\n")


# ---- limits --------------------------------------------------------------------------------


def test_a_control_line_over_the_limit_is_refused_before_its_end_arrives() -> None:
    parser = Parser(max_control_line=100)
    parser.feed(b"INFO " + b"x" * 95)  # 100 bytes: may still end
    assert parser.operations() == []
    parser.feed(b"x")
    with pytest.raises(ProtocolError, match="too long"):
        parser.operations()


def test_a_control_line_over_the_limit_is_refused_with_its_end() -> None:
    line = b"INFO {" + b" " * 200 + b"}\r\n"
    with pytest.raises(ProtocolError, match="too long"):
        parse(line, parser=Parser(max_control_line=100))
    assert parse(line, parser=Parser(max_control_line=len(line) - 2))[0][0] == INFO


def test_a_payload_over_the_limit_is_refused_before_it_arrives() -> None:
    parser = Parser(max_payload=10)
    parser.feed(b"MSG a 2 10\r\n0123456789\r\nMSG a 2 11\r\n")
    assert parser.operations() == [msg(b"a", b"2", b"", b"0123456789")]
    with pytest.raises(ProtocolError, match="size"):
        parser.operations()
    parser = Parser(max_payload=10)
    parser.feed(b"HMSG a 2 12 23\r\n")
    with pytest.raises(ProtocolError, match="too large"):
        parser.operations()


def test_the_buffer_stays_bounded_while_a_huge_stream_arrives() -> None:
    parser = Parser(max_control_line=1024)
    chunk = encode(msg(b"odin.a", b"2", ACK, b"x" * 150)) * 100
    for _ in range(50):
        parser.feed(chunk)
        while parser.operations(256):
            pass
        assert parser.buffered == 0


# ---- malformed -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"HELLO\r\n",
        b"PUB a 1\r\nx\r\n",
        b"\r\n",
        b"MSG\r\n",
        b"MSG a 2\r\n",
        b"MSG a 2 r 3 4\r\nabc\r\n",
        b"MSG a 2 three\r\nabc\r\n",
        b"MSG a 2 -3\r\nabc\r\n",
        b"MSG a 2 3\r\nabcd\r\n",
        b"HMSG a 2 3\r\nabc\r\n",
        b"HMSG a 2 r x 4 5 6\r\n",
        b"HMSG a 2 x 5\r\nabcde\r\n",
        b"HMSG a 2 -1 5\r\nabcde\r\n",
        b"HMSG a 2 12 12\r\nNATS/1.0\r\n\r\nX\r\n",
        b"msg a 2 3\r\nabc\r\n",
    ],
)  # fmt: skip
def test_malformed_input_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse(data)


def test_operations_before_a_malformed_one_are_returned_first() -> None:
    for bad, error in ((b"BAD\r\n", "unknown operation"), (b"MSG a 2 x\r\n", "malformed")):
        parser = Parser()
        parser.feed(b"PING\r\nMSG a 2 1\r\nx\r\n" + bad + b"PONG\r\n")
        assert [op[0] for op in parser.operations(256)] == [PING, MSG]
        for _ in range(2):  # and again: the stream cannot go on
            with pytest.raises(ProtocolError, match=error):
                parser.operations(256)


# ---- INFO ----------------------------------------------------------------------------------


def test_info_json_is_decoded() -> None:
    [op] = parse(b'INFO {"server_id":"N2","connect_urls":["a:4222","b:4222"],"ldm":true}\r\n')
    info = decode_info(op[5])
    assert info["connect_urls"] == ["a:4222", "b:4222"]
    assert info["ldm"] is True
    assert decode_info(b"not json") == {}
    assert decode_info(b"[1]") == {}
    assert decode_info(b"") == {}


# ---- properties ----------------------------------------------------------------------------

_token = st.binary(min_size=1, max_size=12).filter(lambda b: b.split() == [b])
_sid = st.integers(min_value=1, max_value=10**6).map(lambda n: b"%d" % n)
_reply = st.one_of(st.just(b""), _token)
_payload = st.binary(max_size=64)
_header_lines = st.lists(
    st.tuples(
        st.binary(min_size=1, max_size=10).filter(lambda b: not any(c in b":\r\n" for c in b)),
        st.binary(max_size=20).filter(lambda b: b"\r" not in b and b"\n" not in b),
    ),
    max_size=4,
)
_status_line = st.sampled_from(
    [b"NATS/1.0", b"NATS/1.0 503", b"NATS/1.0 100 Idle Heartbeat", b"NATS/1.0 409 Consumer Deleted"]
)


@st.composite
def _headers(draw: st.DrawFn) -> bytes:
    lines = [draw(_status_line)] + [name + b": " + value for name, value in draw(_header_lines)]
    return b"\r\n".join(lines) + b"\r\n\r\n"


_text = st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b)
_op: st.SearchStrategy[Op] = st.one_of(
    st.builds(msg, _token, _sid, _reply, _payload),
    st.builds(hmsg, _token, _sid, _reply, _headers(), _payload),
    st.just((PING, b"", b"", b"", b"", b"")),
    st.just((PONG, b"", b"", b"", b"", b"")),
    st.just((OK, b"", b"", b"", b"", b"")),
    st.builds(lambda text: (ERR, b"", b"", b"", b"", b"'" + text + b"'"), _text),
    st.builds(
        lambda urls: (INFO, b"", b"", b"", b"", b'{"connect_urls":[%s]}' % b",".join(urls)),
        st.lists(st.sampled_from([b'"a:4222"', b'"[::1]:4223"']), max_size=3),
    ),
)


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(_op, max_size=20), data=st.data())
def test_any_operations_split_anywhere_parse_back(ops: list[Op], data: st.DataObject) -> None:
    stream = b"".join(encode(op) for op in ops)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    limit = data.draw(st.integers(1, 5))
    parser = Parser()
    parsed: list[Op] = []
    for chunk in chunks:
        parser.feed(chunk)
        while batch := parser.operations(limit):
            assert len(batch) <= limit
            parsed.extend(batch)
    assert parsed == ops
    assert parser.buffered == 0
