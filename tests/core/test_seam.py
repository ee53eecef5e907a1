"""The recovery seam: a recovery joins the live stream with nothing lost and nothing twice."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from odin_fanout.core.seam import MISSED, RECOVERY_OVERFLOW, Missed, RecoverySeam
from tests.core.positions import Msg, chain


def active(seam: RecoverySeam[Msg]) -> bool:
    """``seam.active``, read afresh (mypy would keep an earlier assertion's narrowing)."""
    return seam.active


def held(seam: RecoverySeam[Msg], channel: str, messages: list[Msg]) -> None:
    """Live messages arriving while ``channel`` is held: none may go out."""
    for message in messages:
        assert seam.admit(channel, message) is False


# One channel's history in these tests: positions 3, 5, 8, 9, 12, 14, 17, 20 (the others
# belong to other channels).
A = chain(3, 5, 8, 9, 12, 14, 17, 20)
M3, M5, M8, M9, M12, M14, M17, M20 = A


# ---- nothing held, nothing floored --------------------------------------------------------


def test_an_idle_seam_lets_everything_through():
    seam: RecoverySeam[Msg] = RecoverySeam(hold_limit=4)
    assert not active(seam)
    assert seam.admit("A", M3)
    assert seam.gap("A", 4, 5, "feed_overflow") == Missed("A", 4, 5, "feed_overflow")
    assert not active(seam)
    assert not seam.holding("A")
    assert seam.held_channels() == []


def test_hold_limit_must_be_positive():
    with pytest.raises(ValueError):
        RecoverySeam(hold_limit=0)


def test_missed_stands_for_the_positions_it_covers():
    missed = Missed("A", 10, 12, MISSED)
    assert (missed.prev, missed.seq) == (9, 12)


# ---- holding ------------------------------------------------------------------------------


def test_begin_holds_only_that_channel():
    seam: RecoverySeam[Msg] = RecoverySeam(hold_limit=4)
    seam.begin("A")
    assert active(seam)
    assert seam.holding("A")
    assert not seam.holding("B")
    assert seam.held_channels() == ["A"]
    assert seam.admit("A", M8) is False
    assert seam.admit("B", Msg(10, 0)) is True
    assert seam.gap("A", 9, 9, "feed_overflow") is None
    assert seam.gap("B", 11, 11, "feed_overflow") == Missed("B", 11, 11, "feed_overflow")


def test_begin_again_keeps_what_is_held():
    seam: RecoverySeam[Msg] = RecoverySeam(hold_limit=4)
    seam.begin("A")
    held(seam, "A", [M12])
    seam.begin("A")
    assert seam.hand_over("A", 9, chain(8, 9, prev=5)) == [M8, M9, M12]


# ---- hand_over ----------------------------------------------------------------------------


def test_held_messages_the_replay_contains_are_dropped_and_newer_ones_follow_in_order():
    seam: RecoverySeam[Msg] = RecoverySeam(hold_limit=10)
    seam.begin("A")
    # This process's feed lags the history read: it brings 8 and 9 again.
    held(seam, "A", [M8, M9, M12, M14])
    assert seam.hand_over("A", 9, [M8, M9]) == [M8, M9, M12, M14]
    assert not seam.holding("A")


def test_a_replay_newer_than_everything_held():
    seam: RecoverySeam[Msg] = RecoverySeam(hold_limit=10)
    seam.begin("A")
    held(seam, "A", [M8, M9])
    assert seam.hand_over("A", 12, [M8, M9, M12]) == [M8, M9, M12]


def test_a_hole_between_the_replay_and_the_held_messages_is_missed_exactly():
    seam: RecoverySeam[Msg] = RecoverySeam(hold_limit=10)
    seam.begin("A")
    # Replayed up to 9; the live stream's next message says the one before it was at 12.
    held(seam, "A", [M14, M17])
    assert seam.hand_over("A", 9, [M8, M9]) == [M8, M9, Missed("A", 10, 12, MISSED), M14, M17]


def test_a_hole_between_held_messages_is_missed_exactly():
    seam: RecoverySeam[Msg] = RecoverySeam(hold_limit=10)
    seam.begin("A")
    held(seam, "A", [M12, M17, M20])  # 14 never came
    assert seam.hand_over("A", 9, [M9]) == [M9, M12, Missed("A", 13, 14, MISSED), M17, M20]


def test_held_gap_notices_come_out_in_their_place():
    seam: RecoverySeam[Msg] = RecoverySeam(hold_limit=10)
    seam.begin("A")
    assert seam.admit("A", M12) is False
    assert seam.gap("A", 14, 14, "feed_overflow") is None
    assert seam.admit("A", M17) is False
    assert seam.hand_over("A", 9, [M9]) == [M9, M12, Missed("A", 13, 14, "feed_overflow"), M17]


def test_a_held_notice_at_the_end_is_not_lost():
    seam: RecoverySeam[Msg] = RecoverySeam(hold_limit=10)
    seam.begin("A")
    held(seam, "A", [M12])
    assert seam.gap("A", 14, 17, "feed_overflow") is None
    assert seam.hand_over("A", 12, [M12]) == [M12, Missed("A", 13, 17, "feed_overflow")]
    assert seam.admit("A", M20)  # the floor was the end of the notice


def test_a_held_notice_is_cut_to_what_the_replay_did_not_give():
    seam: RecoverySeam[Msg] = RecoverySeam(hold_limit=10)
    seam.begin("A")
    assert seam.gap("A", 8, 9, "feed_overflow") is None  # all replayed
    assert seam.gap("A", 12, 14, "feed_overflow") is None  # 12 replayed, 14 not
    held(seam, "A", [M17])
    assert seam.hand_over("A", 12, [M9, M12]) == [
        M9,
        M12,
        Missed("A", 13, 14, "feed_overflow"),
        M17,
    ]


def test_overflow_holds_up_to_the_limit_then_one_range_covers_the_rest():
    seam: RecoverySeam[Msg] = RecoverySeam(hold_limit=2)
    seam.begin("A")
    held(seam, "A", [M9, M12, M14, M17, M20])
    assert seam.hand_over("A", 8, [M8]) == [M8, M9, M12, Missed("A", 13, 20, RECOVERY_OVERFLOW)]
    assert seam.admit("A", M20) is False
    assert seam.admit("A", Msg(23, 20)) is True


def test_overflow_counts_notices_and_extends_over_them():
    seam: RecoverySeam[Msg] = RecoverySeam(hold_limit=2)
    seam.begin("A")
    assert seam.gap("A", 9, 9, "feed_overflow") is None
    held(seam, "A", [M12])
    assert seam.gap("A", 14, 20, "feed_overflow") is None  # past the limit
    held(seam, "A", [Msg(23, 20)])
    assert seam.gap("A", 25, 27, "feed_overflow") is None
    assert seam.hand_over("A", 8, [M8]) == [
        M8,
        Missed("A", 9, 9, "feed_overflow"),
        M12,
        Missed("A", 13, 27, RECOVERY_OVERFLOW),
    ]


def test_overflow_the_replay_covers_partly_is_cut_and_wholly_is_dropped():
    seam: RecoverySeam[Msg] = RecoverySeam(hold_limit=2)
    seam.begin("A")
    held(seam, "A", [M8, M9, M12, M14, M17])  # the feed lags far behind the history read
    assert seam.hand_over("A", 14, [M12, M14]) == [M12, M14, Missed("A", 15, 17, RECOVERY_OVERFLOW)]

    seam.begin("B")
    held(seam, "B", [M8, M9, M12, M14])
    assert seam.hand_over("B", 17, [M17]) == [M17]


def test_hand_over_checks_that_last_is_where_the_replay_ends():
    seam: RecoverySeam[Msg] = RecoverySeam(hold_limit=2)
    seam.begin("A")
    with pytest.raises(ValueError):
        seam.hand_over("A", 12, [M8, M9])


def test_hand_over_of_a_channel_not_held_hands_over_the_replay():
    seam: RecoverySeam[Msg] = RecoverySeam(hold_limit=2)
    assert seam.hand_over("A", 9, [M9]) == [M9]
    assert seam.admit("A", M9) is False


# ---- floors -------------------------------------------------------------------------------


def test_the_floor_drops_what_the_feed_still_brings_and_goes_at_the_first_newer_message():
    seam: RecoverySeam[Msg] = RecoverySeam(hold_limit=10)
    seam.begin("A")
    held(seam, "A", [M8])
    assert seam.hand_over("A", 12, [M9, M12]) == [M9, M12]
    assert active(seam)
    assert seam.admit("B", Msg(10, 0)), "another channel's messages are not floored"
    assert seam.admit("A", M9) is False
    assert seam.admit("A", M12) is False
    assert seam.admit("A", M14) is True
    assert not active(seam)
    assert seam.admit("A", M17) is True


def test_the_floor_is_the_last_position_handed_over():
    seam: RecoverySeam[Msg] = RecoverySeam(hold_limit=10)
    seam.begin("A")
    held(seam, "A", [M12, M14])
    seam.hand_over("A", 9, [M9])
    assert seam.admit("A", M14) is False
    assert seam.admit("A", M17) is True


def test_a_client_already_current_gets_a_floor_too():
    # Recovered with nothing to replay, or a new channel's position from the broker: the feed
    # may still bring the message at that position.
    seam: RecoverySeam[Msg] = RecoverySeam(hold_limit=10)
    seam.begin("A")
    assert seam.hand_over("A", 12) == []
    assert seam.admit("A", M12) is False
    assert seam.admit("A", M14) is True


def test_a_floor_at_position_zero_still_checks_the_first_message():
    # A client told "nothing yet" (position 0): a first message whose prev skips positions
    # was not the first one, and the client must hear of the rest.
    seam: RecoverySeam[Msg] = RecoverySeam(hold_limit=10)
    seam.begin("A")
    assert seam.hand_over("A", 0) == []
    assert seam.admit("A", M5) == Missed("A", 1, 3, MISSED)
    assert not active(seam)


def test_the_first_message_past_the_floor_that_skips_positions_comes_after_a_notice():
    # The floor is where the client was placed; the feed lost 13-14 (or this process never
    # saw them): told before the message that skips them, not left to the client's arithmetic.
    seam: RecoverySeam[Msg] = RecoverySeam(hold_limit=10)
    seam.begin("A")
    assert seam.hand_over("A", 12, [M12]) == [M12]
    assert seam.admit("A", M17) == Missed("A", 13, 14, MISSED)
    assert seam.admit("A", M20) is True  # the floor is gone: the fan-out checks from here
    assert not active(seam)


def test_a_new_epoch_empties_the_holds_but_keeps_them_open():
    # What was held belongs to the old numbering: handing it over after the new epoch's
    # position would go backwards, and its floor would hide the new epoch's messages.
    seam: RecoverySeam[Msg] = RecoverySeam(hold_limit=2)
    seam.begin("A")
    held(seam, "A", [M12, M14, M17])  # past the hold: an overflow range too
    seam.new_epoch()
    assert seam.holding("A")
    first, second = chain(1, 2)
    held(seam, "A", [first, second])
    assert seam.hand_over("A", 0) == [first, second]
    assert seam.admit("A", Msg(3, 2)) is True


def test_a_gap_notice_past_the_floor_is_cut_to_start_after_it():
    seam: RecoverySeam[Msg] = RecoverySeam(hold_limit=10)
    seam.begin("A")
    seam.hand_over("A", 12, [M12])
    assert seam.gap("A", 8, 9, "feed_overflow") is None  # the client has these
    assert seam.gap("A", 9, 14, "feed_overflow") == Missed("A", 13, 14, "feed_overflow")
    assert not active(seam)  # the feed is past the floor


def test_a_gap_notice_after_the_floor_links_to_it():
    seam: RecoverySeam[Msg] = RecoverySeam(hold_limit=10)
    seam.begin("A")
    seam.hand_over("A", 12, [M12])
    assert seam.gap("A", 14, 14, "feed_overflow") == Missed("A", 13, 14, "feed_overflow")


# ---- release, forget, clear ---------------------------------------------------------------


def test_release_returns_what_was_held_as_it_came():
    seam: RecoverySeam[Msg] = RecoverySeam(hold_limit=10)
    seam.begin("A")
    assert seam.gap("A", 7, 8, "feed_overflow") is None
    held(seam, "A", [M9, M12])
    assert seam.release("A") == [Missed("A", 7, 8, "feed_overflow"), M9, M12]
    assert not active(seam)  # no floor: there is no position
    assert seam.admit("A", M14)


def test_release_announces_holes_and_overflow():
    seam: RecoverySeam[Msg] = RecoverySeam(hold_limit=2)
    seam.begin("A")
    held(seam, "A", [M9, M14, M17, M20])
    assert seam.release("A") == [
        M9,
        Missed("A", 10, 12, MISSED),
        M14,
        Missed("A", 15, 20, RECOVERY_OVERFLOW),
    ]


def test_release_of_nothing():
    seam: RecoverySeam[Msg] = RecoverySeam(hold_limit=2)
    assert seam.release("A") == []
    seam.begin("A")
    assert seam.release("A") == []
    assert not active(seam)


def test_forget_drops_the_floor_and_the_hold():
    seam: RecoverySeam[Msg] = RecoverySeam(hold_limit=10)
    seam.begin("A")
    seam.hand_over("A", 12, [M12])
    seam.forget("A")
    assert not active(seam)
    assert seam.admit("A", M12), "after a new subscription, the feed's messages are new"
    seam.begin("B")
    held(seam, "B", [M9])
    seam.forget("B")
    assert not seam.holding("B")
    assert not active(seam)
    assert seam.release("B") == []


def test_clear_drops_everything_and_names_the_held_channels():
    seam: RecoverySeam[Msg] = RecoverySeam(hold_limit=10)
    seam.begin("A")
    seam.hand_over("A", 12, [M12])
    seam.begin("B")
    seam.begin("C")
    held(seam, "C", [M9])
    assert sorted(seam.clear()) == ["B", "C"]
    assert not active(seam)
    assert seam.held_channels() == []
    assert seam.admit("A", M12)
    assert seam.clear() == []


# ---- the property: whatever the timing, the client's stream is whole or says where not ----

HELD = ("A", "B")
"""Channels recovering in the property; C is subscribed all along and must be untouched."""
CHANNELS = (*HELD, "C")
FEED_GAP = "feed_overflow"


@attrs.frozen
class Notice:
    """A gap notice of the feed: it dropped ``first``..``last`` of ``channel``."""

    channel: str
    first: int
    last: int


@attrs.frozen
class Live:
    channel: str
    message: Msg


@attrs.frozen
class Recovery:
    mode: str
    """"recover": hand over at a position; "release": the broker could not say."""
    read_at: int
    """The feed index at which the history was read."""
    history_top: int
    """The channel's newest position in that read (the history is ahead of the feed)."""
    position: int
    """The client's position, at or before ``history_top``."""


@attrs.frozen
class Scenario:
    messages: dict[str, list[Msg]]
    dropped: frozenset[int]
    feed: list[Live | Notice]
    limit: int
    begin: int
    end: int
    recoveries: dict[str, Recovery]


def top(item: Live | Notice) -> int:
    return item.message.seq if isinstance(item, Live) else item.last


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    """Three channels share one stream of positions. The feed drops some messages and, as
    ``BoundedFeed`` does, announces each channel's dropped run before its next delivery. The
    connection holds A and B from feed index ``begin`` to ``end`` (the hand-over); each
    channel's history read happens in between, sees at least what the feed had handled by
    then and perhaps more (the broker's history is ahead of this process's feed), and the
    client's position is anywhere at or before the read's newest message."""
    count = draw(st.integers(0, 30))
    steps = draw(st.lists(st.integers(1, 3), min_size=count, max_size=count))
    owners = draw(st.lists(st.sampled_from(CHANNELS), min_size=count, max_size=count))
    drops = draw(st.lists(st.integers(0, 4), min_size=count, max_size=count))
    messages: dict[str, list[Msg]] = {channel: [] for channel in CHANNELS}
    dropped: set[int] = set()
    feed: list[Live | Notice] = []
    pending: dict[str, tuple[int, int]] = {}
    seq = 0
    for step, owner, drop in zip(steps, owners, drops, strict=True):
        seq += step  # positions between belong to channels nobody here subscribes to
        own = messages[owner]
        message = Msg(seq, own[-1].seq if own else 0)
        own.append(message)
        if drop == 0:  # the feed is full: the message is dropped, announced before the next
            dropped.add(seq)
            first, _ = pending.get(owner, (seq, 0))
            pending[owner] = (first, seq)
            continue
        feed.extend(Notice(channel, first, last) for channel, (first, last) in pending.items())
        pending.clear()
        feed.append(Live(owner, message))
    feed.extend(Notice(channel, first, last) for channel, (first, last) in pending.items())

    begin = draw(st.integers(0, len(feed)))
    end = draw(st.integers(begin, len(feed)))
    recoveries: dict[str, Recovery] = {}
    for channel in HELD:
        mode = draw(st.sampled_from(["recover", "recover", "release"]))
        read_at = draw(st.integers(begin, end))
        # The read sees at least everything the feed had handled by then.
        seen = max((top(item) for item in feed[:read_at]), default=0)
        positions = [0] + [message.seq for message in messages[channel]]
        floor = max(p for p in positions if p <= seen)
        history_top = draw(st.sampled_from([p for p in positions if p >= floor]))
        position = draw(st.sampled_from([p for p in positions if p <= history_top]))
        recoveries[channel] = Recovery(mode, read_at, history_top, position)
    return Scenario(
        messages, frozenset(dropped), feed, draw(st.integers(1, 5)), begin, end, recoveries
    )


def run(scenario: Scenario) -> tuple[dict[str, list[Msg | Missed]], set[int]]:
    """What the connection sends per channel, the shell's way: live traffic goes through
    ``admit`` and ``gap`` only while the seam is active. Also the ids of the notices the seam
    made (rather than passed on as the feed gave them)."""
    seam: RecoverySeam[Msg] = RecoverySeam(scenario.limit)
    sent: dict[str, list[Msg | Missed]] = {channel: [] for channel in CHANNELS}
    made: set[int] = set()

    def joined(items: list[Msg | Missed]) -> list[Msg | Missed]:
        made.update(id(item) for item in items if isinstance(item, Missed))
        return items

    subscribed = {"C"}
    for index in range(len(scenario.feed) + 1):
        if index == scenario.begin:
            for channel in HELD:
                seam.begin(channel)
                subscribed.add(channel)
        if index == scenario.end:
            for channel, recovery in scenario.recoveries.items():
                if recovery.mode == "release":
                    sent[channel].extend(joined(seam.release(channel)))
                    continue
                replayed = [
                    message
                    for message in scenario.messages[channel]
                    if recovery.position < message.seq <= recovery.history_top
                ]
                last = replayed[-1].seq if replayed else recovery.position
                sent[channel].extend(joined(seam.hand_over(channel, last, replayed)))
        if index == len(scenario.feed):
            break
        item = scenario.feed[index]
        if item.channel not in subscribed:
            continue
        if isinstance(item, Live):
            if not seam.active or seam.admit(item.channel, item.message):
                sent[item.channel].append(item.message)
        else:
            given = Missed(item.channel, item.first, item.last, FEED_GAP)
            notice: Missed | None = given
            if seam.active:
                notice = seam.gap(item.channel, item.first, item.last, FEED_GAP)
            if notice is not None:
                sent[item.channel].extend(joined([notice]) if notice != given else [notice])
    return sent, made


def lost(scenario: Scenario, channel: str) -> set[int]:
    """Positions of ``channel`` that could not reach the client: dropped by the feed, or past
    the hold's limit."""
    during = [
        item for item in scenario.feed[scenario.begin : scenario.end] if item.channel == channel
    ]
    overflowed = {item.message.seq for item in during[scenario.limit :] if isinstance(item, Live)}
    return overflowed | {m.seq for m in scenario.messages[channel] if m.seq in scenario.dropped}


def check_stream(
    sent: list[Msg | Missed],
    channel: str,
    start: int | None,
    messages: list[Msg],
    lost: set[int],
    made: set[int],
) -> None:
    """``sent`` is ``messages`` after ``start`` (None: after the first thing sent), in order, each
    exactly once, except for ranges a ``Missed`` announces: each starts after what came before
    it (right after it if the seam ``made`` it), skips no message, and covers only positions
    that were lost (at least one)."""
    positions = [message.seq for message in messages]
    cursor = start
    for item in sent:
        if isinstance(item, Missed):
            assert item.channel == channel
            if cursor is not None:
                # The seam's own notices start right after what was sent; the feed's (passed on
                # while nothing is held or floored) at the first position it dropped.
                if id(item) in made:
                    assert item.from_seq == cursor + 1, f"{item} does not follow {cursor}"
                assert item.from_seq > cursor, f"{item} goes back before {cursor}"
                skipped = [p for p in positions if cursor < p < item.from_seq]
                assert not skipped, f"{skipped} skipped before {item}"
            covered = [p for p in positions if item.from_seq <= p <= item.to_seq]
            assert covered, f"{item} covers no message"
            assert set(covered) <= lost, f"{item} covers messages that were not lost"
            cursor = item.to_seq
        else:
            assert item in messages
            if cursor is not None:
                assert item.prev == cursor, f"{item} does not follow {cursor}"
            cursor = item.seq
    if cursor is not None or start is not None:
        assert cursor == max([p for p in positions if start is None or p > start], default=start)


@settings(max_examples=1500, deadline=None)
@given(scenarios())
def test_whatever_the_timing_the_stream_is_whole_or_says_where_not(scenario: Scenario):
    sent, made = run(scenario)
    for channel, recovery in scenario.recoveries.items():
        messages = scenario.messages[channel]
        gone = lost(scenario, channel)
        if recovery.mode == "recover":
            check_stream(sent[channel], channel, recovery.position, messages, gone, made)
            continue
        # Released: what came from the moment the recovery began, as it came.
        check_stream(sent[channel], channel, None, messages, gone, made)
        first = next(
            (item for item in scenario.feed[scenario.begin :] if item.channel == channel), None
        )
        if first is None:
            assert sent[channel] == []
        elif isinstance(first, Live):
            assert sent[channel][0] == first.message
        else:
            assert sent[channel][0] == Missed(channel, first.first, first.last, FEED_GAP)
    # A channel that was not recovering gets the feed exactly.
    assert sent["C"] == [
        item.message if isinstance(item, Live) else Missed("C", item.first, item.last, FEED_GAP)
        for item in scenario.feed
        if item.channel == "C"
    ]


@settings(max_examples=500, deadline=None)
@given(scenarios())
def test_with_nothing_lost_nothing_is_announced(scenario: Scenario):
    sent, _ = run(scenario)
    for channel in HELD:
        if not lost(scenario, channel):
            assert not [item for item in sent[channel] if isinstance(item, Missed)]


@st.composite
def silent_holds(draw: st.DrawFn) -> tuple[list[Msg], int, int, list[Msg], int]:
    """A channel's history, the client's position, the end of the history read, and what the
    live stream brought meanwhile: any of the messages in order, some never (no notice said
    so, as when a channel's first message after an eviction skips positions)."""
    steps = draw(st.lists(st.integers(1, 3), max_size=25))
    positions = [sum(steps[: i + 1]) for i in range(len(steps))]
    messages = chain(*positions)
    top = draw(st.sampled_from([0, *positions]))
    position = draw(st.sampled_from([0, *[p for p in positions if p <= top]]))
    arrived = [m for m in messages if draw(st.integers(0, 3))]
    return messages, position, top, arrived, draw(st.integers(1, 6))


@settings(max_examples=1000, deadline=None)
@given(silent_holds())
def test_hand_over_announces_every_position_the_held_messages_skip(
    case: tuple[list[Msg], int, int, list[Msg], int],
):
    messages, position, top, arrived, limit = case
    seam: RecoverySeam[Msg] = RecoverySeam(limit)
    seam.begin("A")
    held(seam, "A", arrived)
    replayed = [m for m in messages if position < m.seq <= top]
    last = replayed[-1].seq if replayed else position
    sent = seam.hand_over("A", last, replayed)
    kept = {m.seq for m in arrived[:limit]}
    # Everything the client has after the hand-over is sent, the rest announced, in order.
    delivered = {m.seq for m in replayed} | {seq for seq in kept if seq > last}
    lost = {m.seq for m in messages if m.seq not in delivered}
    end = max([last, *(m.seq for m in arrived)])
    check_stream(
        sent,
        "A",
        position,
        [m for m in messages if m.seq <= end],
        lost,
        {id(item) for item in sent if isinstance(item, Missed)},
    )
    assert [m for m in sent if isinstance(m, Msg)] == sorted(
        [m for m in messages if m.seq in delivered], key=lambda m: m.seq
    )
    if all(m.seq in kept for m in messages if last < m.seq <= end):
        assert not [item for item in sent if isinstance(item, Missed)]
    # The floor is where the client now is.
    assert seam.admit("A", Msg(end, 0)) is False
    assert seam.admit("A", Msg(end + 1, end)) is True


def test_a_new_epoch_drops_the_floors_so_new_positions_get_through():
    seam: RecoverySeam[Msg] = RecoverySeam(10)
    seam.hand_over("A.trade", 9, chain(8, 9, prev=5))
    assert not seam.admit("A.trade", Msg(3, 0))  # below the floor of the old history
    seam.new_epoch()  # the stream was recreated: positions start again
    assert seam.admit("A.trade", Msg(3, 0))
    assert not seam.active
