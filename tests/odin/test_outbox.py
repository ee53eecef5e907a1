"""The outbound queue of one connection, without I/O: its bounds, how partial writes are taken
off its head, and the slow-consumer policies (conflate, discard before a close)."""

from __future__ import annotations

from odin_fanout.server.outbox import Outbox


def gap(channel: str, first: int, last: int) -> bytes:
    return f"<gap {channel} {first}-{last}>".encode()


def event(channel: str, seq: int) -> bytes:
    return f"<{channel}#{seq}>".encode()


def contents(outbox: Outbox) -> list[bytes]:
    """What is queued, oldest first, as it would go to the socket."""
    return [bytes(part) for part in outbox.head(len(outbox))]


def wire(outbox: Outbox) -> bytes:
    return b"".join(contents(outbox))


def half_empty(outbox: Outbox) -> bool:
    # A call, not the property itself: mypy would narrow the property across the asserts.
    return outbox.half_empty


def test_queued_frames_leave_oldest_first() -> None:
    outbox = Outbox(10, 1000)
    frames = [b"one", b"two", b"three"]
    for n, frame in enumerate(frames):
        assert outbox.offer(frame, None, 0, now=float(n))
    assert contents(outbox) == frames
    assert [bytes(part) for part in outbox.head(2)] == frames[:2]
    assert len(outbox) == 3
    assert outbox.queued_bytes == len(b"onetwothree")
    assert outbox.oldest_queued_at() == 0.0


def test_bound_in_messages_refuses_and_queues_nothing() -> None:
    outbox = Outbox(3, 1000)
    for n in range(3):
        assert outbox.offer(event("a", n), "a", n, now=0)
    assert not outbox.offer(b"refused", "a", 3, now=0)
    assert len(outbox) == 3
    assert outbox.queued_bytes == sum(len(event("a", n)) for n in range(3))
    assert b"refused" not in wire(outbox)


def test_bound_in_bytes_admits_exactly_the_limit() -> None:
    outbox = Outbox(100, 10)
    assert outbox.offer(b"123456", None, 0, now=0)
    assert not outbox.offer(b"12345", None, 0, now=0)  # 11 bytes > 10
    assert outbox.queued_bytes == 6
    assert outbox.offer(b"1234", None, 0, now=0)  # exactly 10
    assert outbox.queued_bytes == 10
    assert not outbox.offer(b"x", None, 0, now=0)
    assert contents(outbox) == [b"123456", b"1234"]


def test_an_empty_queue_takes_one_frame_larger_than_the_byte_bound() -> None:
    outbox = Outbox(100, 10)
    big = b"b" * 50
    assert outbox.offer(big, "a", 1, now=0)
    assert outbox.queued_bytes == 50
    # ...but only one: the queue is now over its bound.
    assert not outbox.offer(b"x", "a", 2, now=0)
    assert contents(outbox) == [big]


def test_force_passes_the_bound() -> None:
    outbox = Outbox(1, 4)
    assert outbox.offer(b"abcd", "a", 1, now=0)
    assert not outbox.offer(b"close", None, 0, now=0)
    assert outbox.offer(b"close", None, 0, now=0, force=True)
    assert outbox.offer(b"pong", None, 0, now=0, force=True)
    assert contents(outbox) == [b"abcd", b"close", b"pong"]
    assert outbox.queued_bytes == 13


def test_consume_drops_whole_frames_and_trims_a_partial_one() -> None:
    outbox = Outbox(10, 1000)
    for frame in (b"aaaa", b"bbbb", b"cccc"):
        outbox.offer(frame, None, 0, now=0)
    outbox.consume(6)  # all of the first frame, half of the second
    assert contents(outbox) == [b"bb", b"cccc"]
    assert len(outbox) == 2
    assert outbox.queued_bytes == 6
    outbox.consume(1)
    assert contents(outbox) == [b"b", b"cccc"]
    outbox.consume(5)
    assert contents(outbox) == []
    assert outbox.queued_bytes == 0
    assert not outbox


def test_the_written_bytes_plus_the_queue_are_the_stream() -> None:
    outbox = Outbox(100, 10_000)
    frames = [bytes([65 + n]) * (n + 1) for n in range(20)]
    for frame in frames:
        outbox.offer(frame, "a", 0, now=0)
    sent = b""
    step = 7
    while outbox:
        chunk = b"".join(bytes(part) for part in outbox.head(3))[:step]
        sent += chunk
        outbox.consume(len(chunk))
        assert outbox.queued_bytes == len(wire(outbox))
    assert sent == b"".join(frames)


def test_conflate_keeps_the_newest_event_of_each_channel_behind_one_gap_notice() -> None:
    outbox = Outbox(100, 10_000)
    queued = [("a", 1), ("b", 1), ("a", 2), ("a", 3), ("b", 2), ("c", 7)]
    for channel, seq in queued:
        outbox.offer(event(channel, seq), channel, seq, now=seq)
    dropped, gaps = outbox.conflate(gap)
    assert dropped == 3
    assert sorted(gaps) == [("a", 1, 2), ("b", 1, 1)]
    # Each notice right before the event it precedes; c lost nothing, so it gets no notice.
    assert contents(outbox) == [
        gap("a", 1, 2),
        event("a", 3),
        gap("b", 1, 1),
        event("b", 2),
        event("c", 7),
    ]
    assert outbox.queued_bytes == len(wire(outbox))


def test_conflate_announces_the_exact_range_even_with_holes_in_the_positions() -> None:
    outbox = Outbox(100, 10_000)
    for seq in (10, 12, 15, 20):
        outbox.offer(event("a", seq), "a", seq, now=0)
    dropped, gaps = outbox.conflate(gap)
    assert (dropped, gaps) == (3, [("a", 10, 15)])
    assert contents(outbox) == [gap("a", 10, 15), event("a", 20)]


def test_conflate_never_moves_a_channel_s_frames_across_a_control_frame() -> None:
    # An ack may give a position: the events before it must stay before it.
    outbox = Outbox(100, 10_000)
    outbox.offer(b"<hello>", None, 0, now=0)
    for seq in (1, 2):
        outbox.offer(event("a", seq), "a", seq, now=0)
    outbox.offer(b"<ack>", None, 0, now=0)
    for seq in (3, 4):
        outbox.offer(event("a", seq), "a", seq, now=0)
    outbox.offer(b"<pong>", None, 0, now=0)
    outbox.offer(event("a", 5), "a", 5, now=0)
    dropped, gaps = outbox.conflate(gap)
    assert (dropped, gaps) == (2, [("a", 1, 1), ("a", 3, 3)])
    assert contents(outbox) == [
        b"<hello>",
        gap("a", 1, 1),
        event("a", 2),
        b"<ack>",
        gap("a", 3, 3),
        event("a", 4),
        b"<pong>",
        event("a", 5),
    ]


def test_conflate_merges_the_channel_s_notices_into_the_one_before_its_newest_event() -> None:
    outbox = Outbox(100, 10_000)
    outbox.offer(event("a", 1), "a", 1, now=0)
    outbox.offer(gap("a", 2, 3), None, 0, now=0, gap=("a", 2, 3, "missed"))
    outbox.offer(event("a", 4), "a", 4, now=0)
    outbox.offer(event("b", 1), "b", 1, now=0)
    outbox.offer(gap("a", 5, 6), None, 0, now=0, gap=("a", 5, 6, "feed_overflow"))
    outbox.offer(event("a", 7), "a", 7, now=0)
    outbox.offer(gap("a", 8, 8), None, 0, now=0, gap=("a", 8, 8, "missed"))
    dropped, gaps = outbox.conflate(gap)
    # One notice from the smallest to the largest position it replaces; the notice after the
    # newest event stays where it is.
    assert (dropped, gaps) == (2, [("a", 1, 6)])
    assert contents(outbox) == [event("b", 1), gap("a", 1, 6), event("a", 7), gap("a", 8, 8)]
    assert outbox.queued_bytes == len(wire(outbox))


def test_conflate_leaves_notices_alone_when_it_drops_nothing_of_their_channel() -> None:
    outbox = Outbox(100, 10_000)
    outbox.offer(gap("a", 1, 2), None, 0, now=0, gap=("a", 1, 2, "missed"))
    outbox.offer(gap("a", 3, 3), None, 0, now=0, gap=("a", 3, 3, "invalid_payload"))
    outbox.offer(event("a", 4), "a", 4, now=0)
    assert outbox.conflate(gap) == (0, [])
    assert contents(outbox) == [gap("a", 1, 2), gap("a", 3, 3), event("a", 4)]


def test_conflate_never_spans_an_epoch_change() -> None:
    # The history was recreated while the client was behind: positions start again lower.
    outbox = Outbox(100, 10_000)
    for seq in (2408, 2409):
        outbox.offer(event("a", seq), "a", seq, now=0)
    outbox.offer(gap("a", 1, 155), None, 0, now=0, gap=("a", 1, 155, "missed"))
    for seq in (156, 157):
        outbox.offer(event("a", seq), "a", seq, now=0)
    dropped, gaps = outbox.conflate(gap)
    assert (dropped, gaps) == (2, [("a", 2408, 2408), ("a", 1, 156)])
    assert contents(outbox) == [
        gap("a", 2408, 2408),
        event("a", 2409),
        gap("a", 1, 156),
        event("a", 157),
    ]


def test_conflate_never_drops_forced_frames_nor_merges_across_them() -> None:
    # A subscribe's hand-over is forced: it stays whole and in place.
    outbox = Outbox(100, 10_000)
    outbox.offer(event("a", 1), "a", 1, now=0)
    outbox.offer(event("a", 2), "a", 2, now=0, force=True)
    outbox.offer(gap("a", 3, 3), None, 0, now=0, force=True, gap=("a", 3, 3, "missed"))
    for seq in (4, 5, 6):
        outbox.offer(event("a", seq), "a", seq, now=0)
    dropped, gaps = outbox.conflate(gap)
    assert (dropped, gaps) == (2, [("a", 4, 5)])
    assert contents(outbox) == [
        event("a", 1),
        event("a", 2),
        gap("a", 3, 3),
        gap("a", 4, 5),
        event("a", 6),
    ]
    assert outbox.queued_bytes == len(wire(outbox))


def test_conflate_widens_a_queued_notice_instead_of_adding_a_second() -> None:
    outbox = Outbox(100, 10_000)
    for seq in (1, 2, 3):
        outbox.offer(event("a", seq), "a", seq, now=0)
    outbox.conflate(gap)
    assert contents(outbox) == [gap("a", 1, 2), event("a", 3)]
    for seq in (4, 5):
        outbox.offer(event("a", seq), "a", seq, now=0)
    dropped, gaps = outbox.conflate(gap)
    assert dropped == 2
    assert gaps == []  # no new notice: the queued one now covers 1-4 (counted once, when added)
    assert contents(outbox) == [gap("a", 1, 4), event("a", 5)]
    assert outbox.queued_bytes == len(wire(outbox))


def test_conflate_never_drops_or_rewrites_a_frame_cut_in_the_middle() -> None:
    outbox = Outbox(100, 10_000)
    for seq in (1, 2, 3):
        outbox.offer(event("a", seq), "a", seq, now=0)
    outbox.consume(3)  # "<a#" of the first event is on the wire
    rest_of_first = event("a", 1)[3:]
    dropped, gaps = outbox.conflate(gap)
    assert (dropped, gaps) == (1, [("a", 2, 2)])
    assert contents(outbox) == [rest_of_first, gap("a", 2, 2), event("a", 3)]
    assert outbox.queued_bytes == len(wire(outbox))


def test_a_notice_cut_in_the_middle_is_finished_and_a_new_one_follows() -> None:
    outbox = Outbox(100, 10_000)
    for seq in (1, 2, 3):
        outbox.offer(event("a", seq), "a", seq, now=0)
    outbox.conflate(gap)  # [gap a 1-2, a#3]
    outbox.consume(5)  # part of the notice is on the wire: it cannot change any more
    rest_of_notice = gap("a", 1, 2)[5:]
    for seq in (4, 5):
        outbox.offer(event("a", seq), "a", seq, now=0)
    dropped, _ = outbox.conflate(gap)
    assert dropped == 2
    assert contents(outbox) == [rest_of_notice, gap("a", 3, 4), event("a", 5)]


def test_conflate_without_notices_for_legacy_clients() -> None:
    outbox = Outbox(100, 10_000)
    for seq in (1, 2, 3):
        outbox.offer(event("a", seq), "a", seq, now=0)
    outbox.offer(b"<ctl>", None, 0, now=0)
    dropped, gaps = outbox.conflate(lambda channel, first, last: None)
    assert (dropped, gaps) == (2, [])
    assert contents(outbox) == [event("a", 3), b"<ctl>"]
    assert outbox.queued_bytes == len(wire(outbox))


def test_conflate_frees_room_for_the_refused_frame() -> None:
    outbox = Outbox(4, 10_000)
    for seq in (1, 2, 3, 4):
        outbox.offer(event("a", seq), "a", seq, now=0)
    assert not outbox.offer(event("a", 5), "a", 5, now=0)
    outbox.conflate(gap)
    assert len(outbox) == 2
    assert outbox.offer(event("a", 5), "a", 5, now=0)


def test_discard_keeps_what_came_before_the_first_event_and_the_frame_on_the_wire() -> None:
    outbox = Outbox(100, 10_000)
    outbox.offer(event("a", 1), "a", 1, now=0)
    outbox.offer(b"<ack>", None, 0, now=0)
    outbox.offer(event("a", 2), "a", 2, now=0)
    outbox.offer(event("b", 1), "b", 1, now=0)
    outbox.offer(b"<pong>", None, 0, now=0)
    outbox.consume(2)  # the first event is started
    dropped = outbox.discard_events()
    assert dropped == 2
    assert contents(outbox) == [event("a", 1)[2:], b"<ack>"]
    assert outbox.queued_bytes == len(wire(outbox))


def test_discard_drops_the_notices_and_acks_queued_after_a_dropped_event() -> None:
    # Past events the client never gets, they would make it recover from too far on.
    outbox = Outbox(100, 10_000)
    outbox.offer(gap("a", 1, 1), None, 0, now=0, gap=("a", 1, 1, "missed"))
    outbox.offer(event("a", 2), "a", 2, now=0)
    outbox.offer(gap("a", 3, 4), None, 0, now=0, gap=("a", 3, 4, "missed"))
    outbox.offer(b"<ack a at 5>", None, 0, now=0, force=True)
    outbox.offer(event("a", 5), "a", 5, now=0, force=True)
    assert outbox.discard_events() == 2  # events; the notice and the ack are not counted
    assert contents(outbox) == [gap("a", 1, 1)]
    assert outbox.queued_bytes == len(wire(outbox))
    # What was forced went with them: the bound is whole again.
    outbox.set_limits(2, 10_000)
    assert outbox.offer(event("a", 6), "a", 6, now=0)
    assert not outbox.offer(event("a", 7), "a", 7, now=0)


def test_discard_with_no_event_queued_keeps_everything() -> None:
    outbox = Outbox(100, 10_000)
    outbox.offer(b"<ack>", None, 0, now=0)
    outbox.offer(gap("a", 1, 1), None, 0, now=0, gap=("a", 1, 1, "missed"))
    assert outbox.discard_events() == 0
    assert contents(outbox) == [b"<ack>", gap("a", 1, 1)]


def test_half_empty_in_messages_and_in_bytes() -> None:
    outbox = Outbox(4, 100)
    assert half_empty(outbox)
    outbox.offer(b"x" * 10, None, 0, now=0)
    outbox.offer(b"x" * 10, None, 0, now=0)
    assert half_empty(outbox)  # 2 of 4 messages, 20 of 100 bytes
    outbox.offer(b"x" * 10, None, 0, now=0)
    assert not half_empty(outbox)  # 3 of 4 messages
    outbox.consume(20)
    assert half_empty(outbox)
    outbox.offer(b"y" * 41, None, 0, now=0)
    assert not half_empty(outbox)  # 2 messages, but 51 of 100 bytes
    outbox.consume(1)
    assert half_empty(outbox)  # 50 bytes


def test_set_limits_keeps_what_is_queued_and_applies_to_what_comes() -> None:
    outbox = Outbox(10, 1000)
    for _ in range(6):
        assert outbox.offer(b"frame", None, 0, now=0)
    outbox.set_limits(4, 1000)
    assert len(outbox) == 6  # nothing dropped
    assert not outbox.offer(b"frame", None, 0, now=0)
    assert not half_empty(outbox)
    outbox.consume(5 * 4)  # two left
    assert half_empty(outbox)
    assert outbox.offer(b"frame", None, 0, now=0)
    outbox.set_limits(100, 16)
    assert not outbox.offer(b"frame", None, 0, now=0)  # 15 queued + 5 > 16 bytes
    outbox.set_limits(100, 20)
    assert outbox.offer(b"frame", None, 0, now=0)


def test_clear_empties_the_queue() -> None:
    outbox = Outbox(10, 1000)
    outbox.offer(b"abc", "a", 1, now=5)
    outbox.clear()
    assert (len(outbox), outbox.queued_bytes, outbox.oldest_queued_at()) == (0, 0, None)


def test_forced_frames_do_not_count_against_the_bound() -> None:
    # A hand-over larger than the bound leaves live messages the whole bound.
    outbox = Outbox(3, 1000)
    for seq in range(1, 6):
        assert outbox.offer(event("a", seq), None, 0, now=0, force=True)
    for seq in (6, 7, 8):
        assert outbox.offer(event("a", seq), "a", seq, now=0)
    assert not outbox.offer(event("a", 9), "a", 9, now=0)
    assert len(outbox) == 8
    # The forced frames leave first, partly then whole; the bound stays three live frames.
    outbox.consume(3)
    assert not outbox.offer(event("a", 9), "a", 9, now=0)
    outbox.consume(len(wire(outbox)) - 3 * len(event("a", 6)))
    assert contents(outbox) == [event("a", seq) for seq in (6, 7, 8)]
    assert not outbox.offer(event("a", 9), "a", 9, now=0)
    outbox.consume(len(event("a", 6)))
    assert outbox.offer(event("a", 9), "a", 9, now=0)


def test_forced_bytes_do_not_count_against_the_byte_bound() -> None:
    outbox = Outbox(100, 10)
    assert outbox.offer(b"f" * 30, None, 0, now=0, force=True)
    assert outbox.offer(b"123456", "a", 1, now=0)
    assert outbox.offer(b"1234", "a", 2, now=0)  # exactly 10 live bytes
    assert not outbox.offer(b"x", "a", 3, now=0)
    outbox.consume(29)  # all but one byte of the forced frame
    assert not outbox.offer(b"x", "a", 3, now=0)
    outbox.consume(1 + 6)
    assert outbox.offer(b"x" * 6, "a", 3, now=0)
    assert outbox.queued_bytes == 10


def test_behind_forced_frames_alone_one_frame_over_the_byte_bound_is_taken() -> None:
    outbox = Outbox(100, 10)
    assert outbox.offer(b"<ack>", None, 0, now=0, force=True)
    assert outbox.offer(b"b" * 50, "a", 1, now=0)
    assert not outbox.offer(b"x", "a", 2, now=0)


def test_half_empty_counts_forced_frames_too() -> None:
    # A paced replay's own frames are forced: it must still wait for them to drain.
    outbox = Outbox(4, 100)
    for _ in range(3):
        outbox.offer(b"x" * 10, None, 0, now=0, force=True)
    assert not half_empty(outbox)
    outbox.consume(10)
    assert half_empty(outbox)


def test_clear_forgets_the_forced_frames() -> None:
    outbox = Outbox(1, 1000)
    outbox.offer(b"forced", None, 0, now=0, force=True)
    outbox.clear()
    assert outbox.offer(b"one", "a", 1, now=0)
    assert not outbox.offer(b"two", "a", 2, now=0)


def test_conflate_keeps_the_forced_frames_out_of_the_bound() -> None:
    outbox = Outbox(3, 10_000)
    for seq in (1, 2):
        outbox.offer(event("a", seq), None, 0, now=0, force=True)
    for seq in (3, 4, 5):
        outbox.offer(event("a", seq), "a", seq, now=0)
    assert not outbox.offer(event("a", 6), "a", 6, now=0)
    assert outbox.conflate(gap) == (2, [("a", 3, 4)])
    assert outbox.offer(event("a", 6), "a", 6, now=0)  # notice, a#5, a#6: three
    assert not outbox.offer(event("a", 7), "a", 7, now=0)


def test_set_limits_leaves_forced_frames_outside_the_new_bound() -> None:
    outbox = Outbox(1, 1000)
    outbox.offer(b"forced 1", None, 0, now=0, force=True)
    outbox.offer(b"forced 2", None, 0, now=0, force=True)
    outbox.set_limits(2, 1000)
    assert outbox.offer(b"one", "a", 1, now=0)
    assert outbox.offer(b"two", "a", 2, now=0)
    assert not outbox.offer(b"three", "a", 3, now=0)
    outbox.set_limits(2, 1000 + 16)  # the forced bytes never counted: nothing changes
    assert not outbox.offer(b"three", "a", 3, now=0)
