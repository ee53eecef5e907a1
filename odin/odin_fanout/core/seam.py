"""The recovery seam: how a subscribe-with-recovery joins the live stream, per connection.

A recovery reads the history while the live feed goes on. So that nothing is lost and
nothing sent twice where the replay meets the live stream, each connection holds:

- per channel being recovered, the live messages (and gap notices) that arrived since the
  recovery began, up to ``hold_limit``; past it, only the range they covered;
- per channel handed over, a *floor*: the highest position the client was given. The history
  read may be ahead of this process's feed, so the feed can still bring messages the replay
  already contained; they are dropped until the first newer message arrives. That message
  must link to the floor: if its ``prev`` skips positions (the feed lost them, or this
  process never knew the channel's position), a ``Missed`` record comes before it, so the
  client is told of every hole whether or not the fan-out could see it.

``RecoverySeam`` owns that state and those rules, and nothing else: the shell keeps the hub,
the history reads, the frames and the metrics. Used as::

    seam.begin(channel)                                      # before the history read
    ...                                                      # live traffic: admit() and gap()
    sends = seam.hand_over(channel, last, replayed)          # after it, without awaiting
    # or, when no position could be had: sends = seam.release(channel)

``sends`` is everything to queue for the channel, in order: messages, and ``Missed`` records
the shell turns into gap notices.

Why this shape rather than one method per old attribute:

- ``admit`` both holds a message of a channel being recovered and applies the floor: the fan-out
  asks one question per delivery ("send it now?"), and ``active``, a plain attribute, lets it
  skip even that call while nothing is held or floored (the usual case).
- ``gap`` takes the gap notices the fan-out announces: while a channel is held they are kept in
  line with its messages and come out of ``hand_over`` (the old shell dropped them, so a hole
  after the last held message was never announced); while it is floored, a notice is cut to the
  positions after the floor, or dropped if the client already has them all.
- Every ``Missed`` links to what was handed over before it (``from_seq`` is one past it), like the
  history's own ``prev`` links: a client knows its position after each item.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

import attrs

from odin_fanout.core.history import Positioned

MISSED = "missed"
"""Positions the live stream skipped between two things handed over."""
RECOVERY_OVERFLOW = "recovery_overflow"
"""Live messages past ``hold_limit`` that arrived while the history was read."""


@attrs.frozen(slots=True)
class Missed:
    """Positions ``from_seq``..``to_seq`` (inclusive) of ``channel`` hold at least one message
    the client will not get: the shell sends a gap notice in its place.

    ``seq`` and ``prev`` make it ``Positioned``, standing in the sequence for the positions it
    covers, like the marker the shell puts in a replay: the next message's ``prev`` is
    ``to_seq`` at most.
    """

    channel: str
    from_seq: int
    to_seq: int
    reason: str

    @property
    def seq(self) -> int:
        return self.to_seq

    @property
    def prev(self) -> int:
        return self.from_seq - 1


P = TypeVar("P", bound=Positioned)


@attrs.define(slots=True)
class _Hold(Generic[P]):
    items: list[P | Missed] = attrs.Factory(list)
    """Live messages and gap notices in the order they came, at most ``hold_limit``."""
    overflow_to: int = 0
    """Non-zero once the hold is full: the highest position that came after that."""


class RecoverySeam(Generic[P]):
    """One connection's recovery seam, generic over its messages (``seq`` and ``prev``).

    Every live delivery costs O(1); ``hand_over`` and ``release`` cost what they return.
    Channels are independent of each other.
    """

    def __init__(self, hold_limit: int) -> None:
        if hold_limit < 1:
            raise ValueError("hold_limit must be positive")
        self.hold_limit = hold_limit
        """Live messages and notices kept per held channel (the shell: its writer's queue
        limit); may be changed, applies to what arrives next."""
        self.active = False
        """False when no channel is held or floored: every message may go straight out, and
        the shell need not call ``admit`` or ``gap``. Read it, never set it."""
        self._holds: dict[str, _Hold[P]] = {}
        self._floors: dict[str, int] = {}

    def _update(self) -> None:
        self.active = bool(self._holds) or bool(self._floors)

    # ---- a recovery ------------------------------------------------------------------------

    def begin(self, channel: str) -> None:
        """Hold the live messages of ``channel`` from now on (call it before reading the
        history). A channel already held keeps what it holds."""
        if channel not in self._holds:
            self._holds[channel] = _Hold()
            self.active = True

    def holding(self, channel: str) -> bool:
        return channel in self._holds

    def held_channels(self) -> list[str]:
        """The channels being held (for the operator console)."""
        return list(self._holds)

    def hand_over(self, channel: str, last: int, replayed: Sequence[P] = ()) -> list[P | Missed]:
        """Stop holding ``channel`` and say what to send, in order: ``replayed``, then what was
        held that comes after ``last``, with a ``Missed`` for every skipped range.

        ``last`` is the client's position once it has ``replayed`` (its last message's ``seq``;
        without any, the position the client is told). Held messages at or before it were in
        the history read already and are dropped; one whose ``prev`` skips positions gets a
        ``MISSED`` record before it; held notices are cut to the positions not yet covered; and
        what did not fit the hold becomes one ``RECOVERY_OVERFLOW`` record at the end.

        Afterwards the channel's floor is the last position handed over (at least ``last``):
        the feed may still bring messages the history read already gave. A channel that was not
        held hands over ``replayed`` alone, and gets its floor all the same.
        """
        if replayed and replayed[-1].seq != last:
            raise ValueError(f"last is {last} but the replay ends at {replayed[-1].seq}")
        hold = self._holds.pop(channel, None)
        sends: list[P | Missed] = list(replayed)
        cursor = last
        if hold is not None:
            cursor = _join(channel, last, hold, sends)
        self._floors[channel] = cursor
        self._update()
        return sends

    def release(self, channel: str) -> list[P | Missed]:
        """Stop holding ``channel`` without a position (nothing says where the client is): what
        was held, as it came, with a ``Missed`` where the held messages skip positions and one
        for what did not fit. Sets no floor."""
        hold = self._holds.pop(channel, None)
        self._update()
        sends: list[P | Missed] = []
        if hold is not None:
            _join(channel, None, hold, sends)
        return sends

    # ---- live traffic ----------------------------------------------------------------------

    def admit(self, channel: str, message: P) -> bool | Missed:
        """Whether a live message may be sent now. False when its channel is held (the message
        is kept for the hand-over) or when it is at or before the channel's floor (the client
        has it); the first message past the floor removes it, and when its ``prev`` is past
        the floor the answer is the ``Missed`` range to announce before sending it."""
        hold = self._holds.get(channel)
        if hold is not None:
            if len(hold.items) < self.hold_limit:
                hold.items.append(message)
            elif message.seq > hold.overflow_to:
                hold.overflow_to = message.seq
            return False
        floor = self._floors.get(channel)
        if floor is None:
            return True
        if message.seq <= floor:
            return False
        del self._floors[channel]
        self._update()
        if message.prev > floor:
            return Missed(channel, floor + 1, message.prev, MISSED)
        return True

    def gap(self, channel: str, from_seq: int, to_seq: int, reason: str) -> Missed | None:
        """A gap notice on its way to the client: the notice to send now, or None.

        None when the channel is held (the notice is kept and comes out of ``hand_over`` in its
        place among the messages) or when it covers nothing past the channel's floor. Past the
        floor, the notice starts right after it (``from_seq`` may differ from the one given,
        and the floor is gone: the feed has moved past it). Otherwise the notice as given.
        """
        hold = self._holds.get(channel)
        if hold is not None:
            if len(hold.items) < self.hold_limit:
                hold.items.append(Missed(channel, from_seq, to_seq, reason))
            elif to_seq > hold.overflow_to:
                hold.overflow_to = to_seq
            return None
        floor = self._floors.get(channel)
        if floor is None:
            return Missed(channel, from_seq, to_seq, reason)
        if to_seq <= floor:
            return None
        del self._floors[channel]
        self._update()
        return Missed(channel, floor + 1, to_seq, reason)

    # ---- the end of a subscription or of the connection ------------------------------------

    def forget(self, channel: str) -> None:
        """The client unsubscribed ``channel``: drop its floor and anything held."""
        self._floors.pop(channel, None)
        self._holds.pop(channel, None)
        self._update()

    def new_epoch(self) -> None:
        """The history was replaced (a new epoch): its positions start again, so floors from
        the old one would hide new messages, and what holds kept belongs to a history the
        client will not be placed in. Holds stay open, emptied: their recoveries end on their
        own, in the new numbering (the shell checks the epoch it decided them in)."""
        self._floors.clear()
        for hold in self._holds.values():
            hold.items.clear()
            hold.overflow_to = 0
        self._update()

    def clear(self) -> list[str]:
        """The connection is closing: drop everything; returns the channels that were held (the
        shell removes their subscription entries)."""
        held = list(self._holds)
        self._holds.clear()
        self._floors.clear()
        self.active = False
        return held


def _join(channel: str, cursor: int | None, hold: _Hold[P], sends: list[P | Missed]) -> int:
    """Append ``hold``'s items that come after ``cursor`` (None: the first item, whatever it
    is) to ``sends``, each linked to the one before; returns the last position appended."""
    for item in hold.items:
        if isinstance(item, Missed):
            if cursor is None:
                sends.append(item)
            elif item.to_seq > cursor:
                if item.from_seq != cursor + 1:  # cut to what is new, or linked to what was
                    item = Missed(channel, cursor + 1, item.to_seq, item.reason)
                sends.append(item)
            else:
                continue
            cursor = item.to_seq
            continue
        seq = item.seq
        if cursor is not None:
            if seq <= cursor:
                continue
            if item.prev > cursor:
                sends.append(Missed(channel, cursor + 1, item.prev, MISSED))
        sends.append(item)
        cursor = seq
    if cursor is None:  # nothing was held (a hold is never empty once it overflows)
        return 0
    if hold.overflow_to > cursor:
        sends.append(Missed(channel, cursor + 1, hold.overflow_to, RECOVERY_OVERFLOW))
        cursor = hold.overflow_to
    return cursor
