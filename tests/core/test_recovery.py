"""Recovery and replay decisions taken from a read of the history."""

from __future__ import annotations

from collections.abc import Sequence

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from odin_fanout.core.history import HistoryLog
from odin_fanout.core.recovery import (
    NotRecovered,
    Reason,
    Recovered,
    ReplayPlan,
    Unknown,
    assess_history,
    assess_local,
    linked,
    plan_replay,
)
from tests.core.positions import Msg, chain

# The channel's history in these tests: positions 3, 5, 8, 9, 12 (others belong to other
# channels), the first with nothing before it.
HISTORY = chain(3, 5, 8, 9, 12)


def after(position: int, messages: Sequence[Msg] = HISTORY, limit: int = 100) -> list[Msg]:
    """What a history read returns: the oldest ``limit + 1`` messages after ``position``."""
    return [message for message in messages if message.seq > position][: limit + 1]


# ---- linked -----------------------------------------------------------------------------------


def test_linked():
    assert linked([])
    assert linked([Msg(5, 3)])
    assert linked(chain(1, 2, 7))
    assert not linked([Msg(1, 0), Msg(7, 2)])


# ---- assess_history ---------------------------------------------------------------------------


def test_history_epoch_changed():
    result = assess_history(5, "old", "new", 12, after(5), limit=10)
    assert result == NotRecovered(Reason.EPOCH_CHANGED)


def test_history_already_current():
    assert assess_history(12, "e", "e", 12, [], limit=10) == Recovered(())
    # A channel that never had a message, and a client that saw none.
    assert assess_history(0, "e", "e", 0, [], limit=10) == Recovered(())


def test_history_position_ahead_is_unknown():
    assert assess_history(13, "e", "e", 12, [], limit=10) == NotRecovered(Reason.UNKNOWN_POSITION)


def test_history_recovers_everything_after_the_position():
    assert assess_history(5, "e", "e", 12, after(5), limit=10) == Recovered(chain(8, 9, 12, prev=5))
    assert assess_history(0, "e", "e", 12, after(0), limit=10) == Recovered(HISTORY)


def test_history_recovers_from_a_position_of_another_channel():
    # 6 and 7 were other channels' messages: the next one of this channel links to 5 <= 6.
    assert assess_history(6, "e", "e", 12, after(6), limit=10) == Recovered(chain(8, 9, 12, prev=5))


def test_history_expired_when_the_first_message_after_is_gone():
    trimmed = HISTORY[2:]  # 3 and 5 have left the history
    assert assess_history(3, "e", "e", 12, after(3, trimmed), limit=10) == NotRecovered(
        Reason.HISTORY_EXPIRED
    )
    # From 5 on, the retained 8 (prev 5) proves nothing is missing.
    assert assess_history(5, "e", "e", 12, after(5, trimmed), limit=10) == Recovered(
        chain(8, 9, 12, prev=5)
    )


def test_history_expired_when_nothing_is_retained():
    assert assess_history(5, "e", "e", 12, [], limit=10) == NotRecovered(Reason.HISTORY_EXPIRED)


def test_history_expired_when_the_chain_is_broken():
    holed = [HISTORY[2], HISTORY[4]]  # 8 then 12 (prev 9): 9 is missing
    assert assess_history(5, "e", "e", 12, holed, limit=10) == NotRecovered(Reason.HISTORY_EXPIRED)


def test_history_limit_exceeded():
    assert assess_history(0, "e", "e", 12, after(0, limit=3), limit=3) == NotRecovered(
        Reason.LIMIT_EXCEEDED
    )
    # Exactly ``limit`` messages still recover.
    assert assess_history(3, "e", "e", 12, after(3, limit=4), limit=4) == Recovered(HISTORY[1:])


# ---- assess_local -----------------------------------------------------------------------------


def test_local_epoch_changed():
    assert assess_local(5, "old", "new", 12, after(5), limit=10) == NotRecovered(
        Reason.EPOCH_CHANGED
    )


def test_local_already_current():
    assert assess_local(12, "e", "e", 12, [], limit=10) == Recovered(())


def test_local_window_that_saw_nothing_cannot_decide():
    # last_seq 0: the window never saw the channel, it may still have a history.
    assert assess_local(0, "e", "e", 0, [], limit=10) == Unknown()


def test_local_position_ahead_of_the_window_cannot_decide():
    # The window may lag the history: ask the broker instead of calling it unknown.
    assert assess_local(13, "e", "e", 12, [], limit=10) == Unknown()


def test_local_recovers_from_a_window_that_proves_continuity():
    assert assess_local(5, "e", "e", 12, after(5), limit=10) == Recovered(chain(8, 9, 12, prev=5))


def test_local_window_too_short_cannot_decide():
    window = HISTORY[3:]  # starts at 9 (prev 8)
    assert assess_local(5, "e", "e", 12, after(5, window), limit=10) == Unknown()
    assert assess_local(5, "e", "e", 12, [], limit=10) == Unknown()


def test_local_window_with_a_hole_cannot_decide():
    assert assess_local(5, "e", "e", 12, [HISTORY[2], HISTORY[4]], limit=10) == Unknown()


def test_local_window_missing_its_newest_positions_cannot_decide():
    # The window saw 3 and 4, then the feed reported a gap over 5 (``skip_to``): last_seq is 5
    # but no entry holds it. A client at 3 has missed 4 and 5; the window only proves 4.
    log: HistoryLog[Msg] = HistoryLog(max_messages=10, max_age=60.0, max_channels=10)
    log.append("A.trade", Msg(3, 0), now=0.0)
    log.append("A.trade", Msg(4, 3), now=0.0)
    log.skip_to("A.trade", 5)
    window = log.after("A.trade", 3, limit=10, now=0.0)
    assert window == [Msg(4, 3)]
    result = assess_local(3, "e", "e", log.last_seq("A.trade"), window, limit=10)
    assert result == Unknown(), "claims a recovery although position 5 was never delivered"


def test_local_limit_exceeded():
    assert assess_local(0, "e", "e", 12, after(0, limit=2), limit=2) == NotRecovered(
        Reason.LIMIT_EXCEEDED
    )


# ---- plan_replay ------------------------------------------------------------------------------


def test_replay_complete():
    assert plan_replay(5, None, 12, after(5), limit=10) == ReplayPlan(
        chain(8, 9, 12, prev=5), [], None
    )


def test_replay_nothing_to_do():
    assert plan_replay(12, None, 12, [], limit=10) == ReplayPlan((), [], None)
    assert plan_replay(20, None, 12, [], limit=10) == ReplayPlan((), [], None)
    assert plan_replay(5, 5, 12, after(5), limit=10) == ReplayPlan((), [], None)


def test_replay_with_an_upper_bound():
    # from 6 to 9: after 5, until 9.
    assert plan_replay(5, 9, 12, after(5), limit=10) == ReplayPlan(chain(8, 9, prev=5), [], None)
    # An upper bound past the latest position is capped at the latest.
    assert plan_replay(5, 100, 12, after(5), limit=10) == ReplayPlan(
        chain(8, 9, 12, prev=5), [], None
    )


def test_replay_with_a_trimmed_start():
    retained = HISTORY[3:]  # 9 (prev 8), 12
    plan = plan_replay(3, None, 12, after(3, retained), limit=10)
    assert plan == ReplayPlan(retained, [(4, 8)], Reason.HISTORY_EXPIRED)


def test_replay_truncated_by_the_limit():
    plan = plan_replay(0, None, 12, after(0, limit=2), limit=2)
    assert plan == ReplayPlan(chain(3, 5), [(6, 12)], Reason.LIMIT_EXCEEDED)
    bounded = plan_replay(0, 10, 12, after(0, limit=2), limit=2)
    assert bounded == ReplayPlan(chain(3, 5), [(6, 10)], Reason.LIMIT_EXCEEDED)


def test_replay_trimmed_and_truncated():
    retained = HISTORY[2:]  # 8 (prev 5), 9, 12
    plan = plan_replay(0, None, 12, after(0, retained, limit=1), limit=1)
    assert plan == ReplayPlan([Msg(8, 5)], [(1, 5), (9, 12)], Reason.HISTORY_EXPIRED)


def test_replay_nothing_retained_in_range_with_proof():
    # Asked for 6..7; the next retained message (8, prev 5) proves the channel had none there.
    assert plan_replay(5, 7, 12, after(5), limit=10) == ReplayPlan((), [], None)


def test_replay_nothing_retained_without_proof():
    assert plan_replay(5, None, 12, [], limit=10) == ReplayPlan(
        (), [(6, 12)], Reason.HISTORY_EXPIRED
    )
    # The next retained message links past the range: 6..7 may have held messages.
    assert plan_replay(5, 7, 12, [Msg(12, 9)], limit=10) == ReplayPlan(
        (), [(6, 7)], Reason.HISTORY_EXPIRED
    )


def test_replay_limit_zero():
    assert plan_replay(5, None, 12, after(5, limit=0), limit=0) == ReplayPlan(
        [], [(6, 12)], Reason.LIMIT_EXCEEDED
    )


def test_replay_limit_zero_with_a_trimmed_start_reports_disjoint_ranges():
    # A multi-channel replay whose budget is spent reaches later channels with limit 0. The
    # missing ranges must not overlap (a client adding them up would count 6..8 twice).
    retained = HISTORY[3:]  # 9 (prev 8), 12
    plan = plan_replay(5, None, 12, after(5, retained, limit=0), limit=0)
    assert plan.messages == []
    assert plan.reason is not None
    covered = [seq for first, last in plan.missing for seq in range(first, last + 1)]
    assert sorted(covered) == list(range(6, 13)), plan.missing


# ---- properties -------------------------------------------------------------------------------


@attrs.frozen
class Case:
    full: list[Msg]
    """The channel's whole history."""
    trimmed: int
    """How many of the oldest messages have left the retained history."""
    hole: int | None
    """Index in the retained messages of one more missing (a window with a hole), or None."""
    client: int
    limit: int

    @property
    def latest(self) -> int:
        return self.full[-1].seq if self.full else 0

    @property
    def retained(self) -> list[Msg]:
        """The history trimmed from the front: what a broker still holds."""
        return self.full[self.trimmed :]

    @property
    def window(self) -> list[Msg]:
        """The retained messages, with the hole if there is one."""
        return [m for i, m in enumerate(self.retained) if i != self.hole]

    @property
    def missed(self) -> list[Msg]:
        """What the client at ``client`` has not seen."""
        return [m for m in self.full if m.seq > self.client]


def read(messages: Sequence[Msg], position: int, limit: int) -> list[Msg]:
    return [m for m in messages if m.seq > position][: limit + 1]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    gaps = draw(st.lists(st.integers(1, 4), max_size=12))
    seqs = [sum(gaps[: i + 1]) for i in range(len(gaps))]
    full = chain(*seqs)
    trimmed = draw(st.integers(0, len(full)))
    retained = len(full) - trimmed
    hole = draw(st.none() | st.integers(0, retained - 1)) if retained else None
    client = draw(st.integers(0, (seqs[-1] if seqs else 0) + 2))
    return Case(full, trimmed, hole, client, limit=draw(st.integers(0, 6)))


@settings(max_examples=200)
@given(cases())
def test_history_recovers_exactly_the_missed_messages_or_refuses(case):
    missed = case.missed
    # The broker's history is trimmed from the front; a hole inside it must be detected, but
    # it always holds the channel's newest message unless it holds nothing.
    newest_lost = case.hole is not None and case.hole == len(case.retained) - 1
    window = case.retained if newest_lost else case.window
    messages = read(window, case.client, case.limit)
    result = assess_history(case.client, "e", "e", case.latest, messages, case.limit)
    all_retained = all(m in window for m in missed)
    if isinstance(result, Recovered):
        assert list(result.messages) == missed
        assert len(missed) <= case.limit
        assert all_retained
        return
    # Never refuses what it could recover...
    assert not (all_retained and len(missed) <= case.limit and case.client <= case.latest)
    # ...and the reason is true.
    assert result.reason is not Reason.EPOCH_CHANGED
    assert (result.reason is Reason.UNKNOWN_POSITION) == (case.client > case.latest)
    if result.reason is Reason.HISTORY_EXPIRED:
        assert not all_retained
    if result.reason is Reason.LIMIT_EXCEEDED:
        assert len(missed) > case.limit


@settings(max_examples=200)
@given(cases())
def test_local_never_claims_a_recovery_the_history_would_not(case):
    messages = read(case.window, case.client, case.limit)
    result = assess_local(case.client, "e", "e", case.latest, messages, case.limit)
    if isinstance(result, Recovered):
        assert list(result.messages) == case.missed
        assert len(case.missed) <= case.limit
    elif isinstance(result, NotRecovered):
        assert result.reason is Reason.LIMIT_EXCEEDED
        assert len(case.missed) > case.limit


@settings(max_examples=200)
@given(cases(), st.none() | st.integers(0, 50))
def test_replay_sends_only_requested_messages_and_accounts_for_the_rest(case, until):
    # A replay reads the broker's history, trimmed from the front but without holes.
    messages = read(case.retained, case.client, case.limit)
    plan = plan_replay(case.client, until, case.latest, messages, case.limit)
    top = case.latest if until is None else min(until, case.latest)
    wanted = [m for m in case.full if case.client < m.seq <= top]
    sent = list(plan.messages)
    assert len(sent) <= case.limit
    assert sent == [m for m in wanted if m in sent]  # requested ones, oldest first
    assert linked(sent)
    if plan.reason is None:
        assert sent == wanted
        assert plan.missing == []
    else:
        assert plan.missing
        for first, last in plan.missing:
            assert case.client < first <= last <= top
        # Every requested message not sent lies in a reported missing range.
        for message in wanted:
            if message not in sent:
                assert any(first <= message.seq <= last for first, last in plan.missing)
