"""Whether a client's position can be recovered, decided from the history alone.

The rule (Centrifugo's, with ``prev`` links instead of contiguous offsets): a client at
position ``after`` recovers when the history still holds the first message after it, proven by
that message's ``prev`` being ``<= after``, and every later message links to the one before.
Otherwise it does not recover, and never partially: the caller sends the latest value instead.

``assess_local`` judges the server's own window and may answer ``Unknown`` (the window is too
short or has a hole); ``assess_history`` judges the broker's history and always decides.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Sequence
from typing import Generic, TypeVar

import attrs

from odin_fanout.core.history import Positioned


class Reason(enum.StrEnum):
    """Why a position could not be recovered; sent to clients and used as a metric label."""

    EPOCH_CHANGED = "epoch_changed"
    """The history the position belongs to is gone (broker restarted, stream recreated)."""
    HISTORY_EXPIRED = "history_expired"
    """Messages after the position have left the history (count or age limit)."""
    LIMIT_EXCEEDED = "limit_exceeded"
    """More messages were missed than one recovery may replay."""
    UNKNOWN_POSITION = "unknown_position"
    """The position is ahead of the history: it was never issued in this epoch."""
    BROKER_UNAVAILABLE = "broker_unavailable"
    """The history could not be read in time."""


P = TypeVar("P", bound=Positioned)


@attrs.frozen
class Recovered(Generic[P]):
    messages: Sequence[P]
    """Everything after the position, oldest first, each linked to the one before."""


@attrs.frozen
class NotRecovered:
    reason: Reason


@attrs.frozen
class Unknown:
    """The local window cannot decide; ask the broker's history."""


def linked(messages: Sequence[Positioned]) -> bool:
    """True if each message's ``prev`` is the position of the message before it."""
    return all(later.prev == earlier.seq for earlier, later in itertools.pairwise(messages))


def assess_history(
    after: int,
    client_epoch: str,
    epoch: str,
    latest_seq: int,
    messages: Sequence[P],
    limit: int,
) -> Recovered[P] | NotRecovered:
    """Judge a read of the authoritative history: ``messages`` are the oldest retained ones
    after ``after`` (up to ``limit + 1``), ``latest_seq`` the channel's newest position."""
    if client_epoch != epoch:
        return NotRecovered(Reason.EPOCH_CHANGED)
    if after == latest_seq:
        return Recovered(())
    if after > latest_seq:
        return NotRecovered(Reason.UNKNOWN_POSITION)
    if not messages or messages[0].prev > after or not linked(messages):
        return NotRecovered(Reason.HISTORY_EXPIRED)
    if len(messages) > limit:
        return NotRecovered(Reason.LIMIT_EXCEEDED)
    if messages[-1].seq != latest_seq:
        # The channel's newest messages are gone (for example expired) while older ones stay.
        return NotRecovered(Reason.HISTORY_EXPIRED)
    return Recovered(messages)


def assess_local(
    after: int,
    client_epoch: str,
    epoch: str,
    last_seq: int,
    messages: Sequence[P],
    limit: int,
) -> Recovered[P] | NotRecovered | Unknown:
    """Judge the server's window, which may be shorter than the history or have holes."""
    if client_epoch != epoch:
        return NotRecovered(Reason.EPOCH_CHANGED)
    if last_seq and after == last_seq:
        return Recovered(())
    if after > last_seq or not messages or messages[0].prev > after or not linked(messages):
        return Unknown()
    if len(messages) > limit:
        return NotRecovered(Reason.LIMIT_EXCEEDED)
    if messages[-1].seq != last_seq:
        # The window skipped its newest positions (a feed gap): only the broker can tell.
        return Unknown()
    return Recovered(messages)


@attrs.frozen
class ReplayPlan(Generic[P]):
    messages: Sequence[P]
    """What to send, oldest first."""
    missing: list[tuple[int, int]]
    """Position ranges of the request that cannot be served."""
    reason: Reason | None
    """None when the replay is complete."""


def plan_replay(
    after: int,
    until: int | None,
    latest_seq: int,
    messages: Sequence[P],
    limit: int,
) -> ReplayPlan[P]:
    """Plan a replay of positions ``after`` < seq <= ``until`` (or the latest) from a read of
    the oldest retained messages after ``after`` (up to ``limit + 1`` of them)."""
    top = latest_seq if until is None else min(until, latest_seq)
    if top <= after:
        return ReplayPlan((), [], None)
    wanted = [message for message in messages if message.seq <= top]
    missing: list[tuple[int, int]] = []
    reason: Reason | None = None
    if not wanted:
        # Nothing retained in range: fine only if the next retained message proves that the
        # channel had nothing there.
        if messages and messages[0].prev <= after:
            return ReplayPlan((), [], None)
        return ReplayPlan((), [(after + 1, top)], Reason.HISTORY_EXPIRED)
    if wanted[0].prev > after:
        missing.append((after + 1, wanted[0].prev))
        reason = Reason.HISTORY_EXPIRED
    if len(wanted) > limit:
        wanted = wanted[:limit]
        if wanted:
            resume = wanted[-1].seq + 1
        else:  # nothing fits: the rest starts after any range already missing
            resume = missing[-1][1] + 1 if missing else after + 1
        missing.append((resume, top))
        reason = reason or Reason.LIMIT_EXCEEDED
    return ReplayPlan(wanted, missing, reason)
