"""The per-client check of each channel's stream: pure, no I/O.

A client feeds it what arrives (acks, events, gap notices) in arrival order; it keeps, per
channel, the last position seen and says what went wrong. The rules are those a client of
docs/protocol.md relies on:

- an event continues the channel when its ``prev`` is the last position seen;
- ``prev`` beyond it, without a ``gap`` notice covering the hole, is a **silent gap**;
- a ``gap`` notice moves the position on to its ``to`` (the next ``prev`` is at most that):
  an **announced gap**, not an error;
- a position already seen is a **duplicate**; one older than the last that was not seen
  (or whose ``prev`` falls behind the last) is **out of order**;
- after a recovery that says ``recovered: true`` the missed events must follow, linked from
  the client's position; one that says ``recovered: false`` must give a known reason and
  the position to continue from (the channel's latest event, which then follows, is not a
  duplicate);
- a new epoch is a new history: positions start again (counted, not an error).

The client's positions (for ``recover`` on reconnect) come from here too.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

import attrs

RECOVERY_REASONS = frozenset(
    {"epoch_changed", "history_expired", "limit_exceeded", "unknown_position",
     "broker_unavailable"}
)  # fmt: skip
_RECENT = 64
"""Positions remembered per channel to tell a duplicate from an out-of-order event."""


@attrs.define
class Counts:
    """What one client (or, summed, a whole run) saw."""

    events: int = 0
    silent_gaps: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    announced_gaps: int = 0
    epoch_changes: int = 0
    recoveries: int = 0
    recovered: int = 0
    """Channels a recovery restored in full."""
    not_recovered: int = 0
    """Channels a recovery answered ``recovered: false`` (with a known reason)."""
    bad_recoveries: int = 0
    """Recovery answers that break the protocol: a channel asked for and not reported, an
    unknown reason, ``recovered: false`` without a position to continue from."""

    def add(self, other: Counts) -> None:
        for field in attrs.fields(Counts):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    @property
    def violations(self) -> int:
        """Broken invariants: any of these fails a run."""
        return self.silent_gaps + self.duplicates + self.out_of_order + self.bad_recoveries


@attrs.define
class _Channel:
    epoch: str
    last: int
    recent: deque[int] = attrs.Factory(lambda: deque(maxlen=_RECENT))
    latest_follows: bool = False
    """After ``recovered: false`` the channel's latest event (at ``last``) comes next."""
    after_gap: bool = False
    """A gap notice moved ``last`` on: the next event's ``prev`` is at most ``last``."""


class Continuity:
    __slots__ = ("_channels", "counts")

    def __init__(self) -> None:
        self._channels: dict[str, _Channel] = {}
        self.counts = Counts()

    def positions(self) -> dict[str, dict[str, Any]]:
        """Where each channel stands: ``recover`` for the next subscribe."""
        return {
            name: {"epoch": channel.epoch, "seq": channel.last}
            for name, channel in self._channels.items()
            if channel.epoch
        }

    # ---- what arrives ---------------------------------------------------------------------

    def on_ack(
        self,
        ack: Mapping[str, Any],
        requested: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """A ``subscription_ack``; ``requested`` is the ``recover`` the subscribe sent."""
        positions = ack.get("positions") or {}
        recovery = ack.get("recovery") or {}
        counts = self.counts
        for name in requested or {}:
            counts.recoveries += 1
            outcome = recovery.get(name)
            position = positions.get(name)
            if not isinstance(outcome, Mapping):
                counts.bad_recoveries += 1
            elif outcome.get("recovered") is True:
                counts.recovered += 1  # what was missed follows; the links will tell
            elif outcome.get("reason") in RECOVERY_REASONS and isinstance(position, Mapping):
                counts.not_recovered += 1
                self._restart(name, position, latest_follows=True)
            else:
                counts.bad_recoveries += 1
        for name, position in positions.items():
            fresh = name not in (requested or {}) and name not in self._channels
            if fresh and isinstance(position, Mapping):
                self._restart(name, position, latest_follows=False)

    def on_event(self, channel: str, seq: int, prev: int, epoch: str) -> None:
        counts = self.counts
        counts.events += 1
        state = self._channels.get(channel)
        if state is None or state.epoch != epoch:
            if state is not None:
                counts.epoch_changes += 1
            state = self._channels[channel] = _Channel(epoch, seq)
            state.recent.append(seq)
            return
        last = state.last
        if state.latest_follows:
            state.latest_follows = False
            if seq == last:
                state.recent.append(seq)
                return
        if seq <= last:
            if seq in state.recent or seq == last:
                counts.duplicates += 1
            else:
                counts.out_of_order += 1
            return
        if prev > last:
            counts.silent_gaps += 1
        elif prev < last and not state.after_gap:
            counts.out_of_order += 1  # it skips an event we already have after its prev
        state.last = seq
        state.after_gap = False
        state.recent.append(seq)

    def on_gap(self, channel: str, last: int) -> None:
        """A ``gap`` notice: positions up to ``last`` will not come."""
        self.counts.announced_gaps += 1
        state = self._channels.get(channel)
        if state is not None and last > state.last:
            state.last = last
            state.latest_follows = False
            state.after_gap = True

    def _restart(self, name: str, position: Mapping[str, Any], *, latest_follows: bool) -> None:
        seq = position.get("seq")
        epoch = position.get("epoch")
        if isinstance(seq, int) and isinstance(epoch, str):
            state = self._channels.get(name)
            if state is not None and state.epoch != epoch:
                self.counts.epoch_changes += 1
            self._channels[name] = _Channel(epoch, seq, latest_follows=latest_follows)
