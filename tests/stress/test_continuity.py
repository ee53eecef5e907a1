"""The stress tool's stream checker: what it calls a silent gap, an announced gap, a duplicate,
an event out of order, and a right or wrong recovery answer. A load run's verdict rests on it."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from odin_fanout.stress.continuity import Continuity

EPOCH = "e1"


def ack(positions: dict[str, int], recovery: dict[str, Any] | None = None) -> dict[str, Any]:
    document: dict[str, Any] = {
        "type": "subscription_ack",
        "positions": {name: {"epoch": EPOCH, "seq": seq} for name, seq in positions.items()},
    }
    if recovery is not None:
        document["recovery"] = recovery
    return document


def feed(checker: Continuity, channel: str, chain: list[int], start: int) -> None:
    """Events of ``chain`` (positions), each linked to the one before (``start`` first)."""
    prev = start
    for seq in chain:
        checker.on_event(channel, seq, prev, EPOCH)
        prev = seq


def test_a_linked_stream_is_clean_and_positions_follow_it() -> None:
    checker = Continuity()
    checker.on_ack(ack({"BTC.trade": 10}))
    feed(checker, "BTC.trade", [14, 15, 20], start=10)
    assert checker.counts.events == 3
    assert checker.counts.violations == 0
    assert checker.positions() == {"BTC.trade": {"epoch": EPOCH, "seq": 20}}


def test_a_hole_without_a_notice_is_a_silent_gap_and_with_one_it_is_announced() -> None:
    checker = Continuity()
    checker.on_ack(ack({"BTC.trade": 10}))
    checker.on_event("BTC.trade", 14, 12, EPOCH)  # 12 never came
    assert checker.counts.silent_gaps == 1
    checker.on_gap("BTC.trade", 20)
    checker.on_event("BTC.trade", 22, 18, EPOCH)  # behind the notice: fine
    assert checker.counts.announced_gaps == 1
    assert checker.counts.silent_gaps == 1
    assert checker.counts.out_of_order == 0


def test_repeats_are_duplicates_and_stale_or_misplaced_events_are_out_of_order() -> None:
    checker = Continuity()
    checker.on_ack(ack({"BTC.trade": 0}))
    feed(checker, "BTC.trade", [3, 7, 9], start=0)
    checker.on_event("BTC.trade", 7, 3, EPOCH)  # seen
    checker.on_event("BTC.trade", 9, 7, EPOCH)  # the last, again
    assert checker.counts.duplicates == 2
    checker.on_event("BTC.trade", 5, 3, EPOCH)  # older than the last and never seen
    checker.on_event("BTC.trade", 11, 8, EPOCH)  # its prev is behind what we have
    assert checker.counts.out_of_order == 2
    assert checker.counts.silent_gaps == 0


def test_channels_are_independent_and_a_pattern_channel_starts_at_its_first_event() -> None:
    checker = Continuity()
    checker.on_ack(ack({"BTC.trade": 5}))
    checker.on_event("ETH.trade", 40, 33, EPOCH)  # first sight of a pattern's channel
    checker.on_event("BTC.trade", 41, 5, EPOCH)
    checker.on_event("ETH.trade", 42, 40, EPOCH)
    assert checker.counts.violations == 0
    assert checker.positions()["ETH.trade"]["seq"] == 42


def test_a_full_recovery_must_be_followed_by_the_linked_history() -> None:
    checker = Continuity()
    checker.on_ack(ack({"BTC.trade": 10}))
    feed(checker, "BTC.trade", [11, 12], start=10)
    requested = checker.positions()
    good = ack({"BTC.trade": 12}, {"BTC.trade": {"recovered": True, "count": 2}})
    checker.on_ack(good, requested)
    feed(checker, "BTC.trade", [13, 14, 15], start=12)
    assert (checker.counts.recoveries, checker.counts.recovered) == (1, 1)
    assert checker.counts.violations == 0
    # Another "recovered" answer whose history then skips what was missed: a silent gap.
    requested = checker.positions()
    checker.on_ack(good, requested)
    checker.on_event("BTC.trade", 30, 20, EPOCH)
    assert checker.counts.silent_gaps == 1


def test_a_failed_recovery_restarts_at_the_latest_value_which_is_not_a_duplicate() -> None:
    checker = Continuity()
    checker.on_ack(ack({"BTC.trade": 10}))
    requested = checker.positions()
    answer = ack(
        {"BTC.trade": 500},
        {"BTC.trade": {"recovered": False, "count": 0, "reason": "history_expired"}},
    )
    checker.on_ack(answer, requested)
    checker.on_event("BTC.trade", 500, 480, EPOCH)  # the latest value, handed over
    checker.on_event("BTC.trade", 510, 500, EPOCH)
    assert checker.counts.not_recovered == 1
    assert checker.counts.violations == 0


def test_recovery_answers_that_break_the_protocol_are_counted() -> None:
    checker = Continuity()
    checker.on_ack(ack({"BTC.trade": 10, "ETH.trade": 10, "SOL.trade": 10}))
    requested = checker.positions()
    answer = ack(
        {"BTC.trade": 10, "ETH.trade": 10},
        {
            "BTC.trade": {"recovered": False, "reason": "because"},  # unknown reason
            "ETH.trade": {"recovered": False, "reason": "history_expired"},
            # SOL.trade: not reported at all
        },
    )
    checker.on_ack(answer, requested)
    assert checker.counts.bad_recoveries == 2
    assert checker.counts.not_recovered == 1


def test_a_new_epoch_starts_the_channel_again() -> None:
    checker = Continuity()
    checker.on_ack(ack({"BTC.trade": 900}))
    checker.on_event("BTC.trade", 3, 0, "e2")
    checker.on_event("BTC.trade", 4, 3, "e2")
    assert checker.counts.epoch_changes == 1
    assert checker.counts.violations == 0
    assert checker.positions()["BTC.trade"] == {"epoch": "e2", "seq": 4}


@st.composite
def delivered(draw: st.DrawFn) -> tuple[list[int], list[tuple[str, int, int]], dict[str, int]]:
    """A channel's true history, and what a server delivered of it: each event kept, dropped
    with a notice, dropped silently, or sent twice. Returns the history, the deliveries
    (``event``/``gap`` with positions) and the faults expected."""
    steps = draw(st.lists(st.integers(1, 5), min_size=1, max_size=60))
    history: list[int] = []
    seq = 0
    for step in steps:
        seq += step
        history.append(seq)
    fate = draw(st.lists(st.sampled_from("kkkkgsd"), min_size=len(history),
                         max_size=len(history)))  # fmt: skip
    deliveries: list[tuple[str, int, int]] = []
    expected = {"silent_gaps": 0, "announced_gaps": 0, "duplicates": 0}
    prev = 0
    hole = None  # "g" or "s": the kind of hole open before the next kept event
    for position, kind in zip(history, fate, strict=True):
        if kind in "gs":
            if kind == "g":
                # A notice covers every position up to its end (docs/protocol.md, gap).
                deliveries.append(("gap", position, position))
                expected["announced_gaps"] += 1
                hole = "g"
            else:
                hole = "s"
        else:
            if hole == "s":
                expected["silent_gaps"] += 1
            hole = None
            deliveries.append(("event", position, prev))
            if kind == "d":
                deliveries.append(("event", position, prev))
                expected["duplicates"] += 1
        prev = position
    return history, deliveries, expected


@given(delivered())
def test_every_fault_is_classified_as_what_it_is(
    case: tuple[list[int], list[tuple[str, int, int]], dict[str, int]],
) -> None:
    _, deliveries, expected = case
    checker = Continuity()
    checker.on_ack(ack({"BTC.trade": 0}))
    for kind, position, prev in deliveries:
        if kind == "gap":
            checker.on_gap("BTC.trade", position)
        else:
            checker.on_event("BTC.trade", position, prev, EPOCH)
    counts = checker.counts
    assert counts.silent_gaps == expected["silent_gaps"]
    assert counts.announced_gaps == expected["announced_gaps"]
    assert counts.duplicates == expected["duplicates"]
    assert counts.out_of_order == 0
