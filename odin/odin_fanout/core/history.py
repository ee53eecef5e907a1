"""Bounded per-channel history: the retained messages of every channel, newest last.

One copy per message, shared by every connection (the original kept 100 copies per client).
Each channel keeps at most ``max_messages`` entries and none older than ``max_age`` seconds;
at most ``max_channels`` channels are tracked, the least recently published one is forgotten
first. A channel remembers its last position even after its entries expire, so a client that
is already current is still told so.

With ``max_bytes`` (and a ``size`` function giving each entry's bytes) the entries' total size
is bounded too: past it, the oldest entries of the least recently published channel go first,
then the next channel's. A channel so emptied becomes *idle*: only its last position is kept,
out of the published channels' order, so the next eviction does not walk past it again and an
append costs the same however many channels are idle. Channels that are idle were published
less recently than any that is not, so the channel bound forgets idle ones first.

A reader that needs entries the window dropped (for any of these bounds) sees a shorter window
or none, never a wrong one: the entries kept are always the channel's newest, consecutive.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Generic, Protocol, TypeVar

import attrs


class Positioned(Protocol):
    @property
    def seq(self) -> int: ...

    @property
    def prev(self) -> int: ...


E = TypeVar("E", bound=Positioned)


@attrs.define
class ChannelLog(Generic[E]):
    entries: deque[tuple[float, E, int]] = attrs.Factory(deque)
    """(stored at, entry, its size), oldest first."""
    last_seq: int = 0
    """The newest position seen on the channel, kept after its entry expires."""


@attrs.frozen
class Appended:
    """Outcome of ``HistoryLog.append``."""

    duplicate: bool = False
    """The position was not newer than the channel's last one; nothing was stored."""
    missed_from: int = 0
    missed_to: int = 0
    """When non-zero: positions the log never saw before this entry (``prev`` skipped them)."""


EVICTION_SLACK = 64
"""Past ``max_bytes`` the window drops entries until it holds 1/64 less than the bound."""

APPENDED = Appended()
DUPLICATE = Appended(duplicate=True)


@attrs.define
class HistoryStats:
    channels_evicted: int = 0
    messages_expired: int = 0
    """Entries older than ``max_age``."""
    messages_trimmed: int = 0
    """Entries beyond ``max_messages`` of their channel."""
    messages_evicted: int = 0
    """Entries dropped to keep the total size within ``max_bytes``."""
    messages_forgotten: int = 0
    """Entries dropped with their channel (``max_channels``)."""


class HistoryLog(Generic[E]):
    def __init__(
        self,
        *,
        max_messages: int,
        max_age: float,
        max_channels: int,
        max_bytes: int | None = None,
    ) -> None:
        """``max_bytes`` bounds the total of the sizes ``append`` is given (None: no bound)."""
        if max_messages < 1 or max_channels < 1 or max_age <= 0:
            raise ValueError("history limits must be positive")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("history limits must be positive")
        self.max_messages = max_messages
        self.max_age = max_age
        self.max_channels = max_channels
        self.max_bytes = max_bytes
        self.stats = HistoryStats()
        self.bytes = 0
        """Total size of the retained entries, as ``append`` was told them."""
        self._evict_above = max_bytes if max_bytes is not None else 1 << 62
        self._evict_to = max_bytes - max_bytes // EVICTION_SLACK if max_bytes is not None else 0
        self._logs: OrderedDict[str, ChannelLog[E]] = OrderedDict()
        """Channels with entries (or emptied by expiry), least recently published first."""
        self._idle: dict[str, int] = {}
        """Last position of channels the byte bound emptied, in the order it did."""

    def append(self, channel: str, entry: E, now: float, size: int = 0) -> Appended:
        """Store ``entry`` as the channel's newest; ``size`` is its bytes, counted against
        ``max_bytes`` (the caller measures: this module does not know what an entry holds).
        On the fan-out's path for every publication, so the usual outcome allocates nothing
        (``APPENDED``) and calls nothing to measure."""
        logs = self._logs
        log = logs.get(channel)
        known = True
        if log is None:
            known = channel in self._idle
            log = self._add(channel)
        else:
            logs.move_to_end(channel)
        last = log.last_seq
        seq = entry.seq
        if seq <= last:
            return DUPLICATE
        result = APPENDED
        # A channel seen for the first time has no position to compare with; a known one
        # (at 0 after a new epoch began) does.
        if entry.prev > last and known:
            result = Appended(missed_from=last + 1, missed_to=entry.prev)
        log.last_seq = seq
        entries = log.entries
        # The size is kept with the entry: whichever bound drops it subtracts the same number.
        entries.append((now, entry, size))
        held = self.bytes + size
        if len(entries) > self.max_messages:
            held -= entries.popleft()[2]
            self.stats.messages_trimmed += 1
        self.bytes = held
        if entries[0][0] < now - self.max_age:
            self._expire(log, now)
        if held > self._evict_above:
            self._evict_bytes()
        return result

    def _add(self, channel: str) -> ChannelLog[E]:
        """Start tracking ``channel`` as the most recently published one (an idle channel
        keeps its last position), forgetting the least recently published beyond the bound."""
        logs = self._logs
        idle = self._idle
        log = logs[channel] = ChannelLog()
        if idle and channel in idle:
            log.last_seq = idle.pop(channel)
        elif len(logs) + len(idle) > self.max_channels:
            self.stats.channels_evicted += 1
            if idle:
                del idle[next(iter(idle))]
            else:
                _, forgotten = logs.popitem(last=False)
                self._drop(forgotten.entries)
                self.stats.messages_forgotten += len(forgotten.entries)
        return log

    def _drop(self, entries: deque[tuple[float, E, int]]) -> None:
        self.bytes -= sum(measured for _, _, measured in entries)

    def _evict_bytes(self) -> None:
        """Drop the oldest entries of the least recently published channels until the total
        is ``EVICTION_SLACK`` below the bound (so that this runs once per many appends, not
        for each); a channel emptied becomes idle. An entry is dropped once, a channel goes
        idle once per append that refilled it: the cost per append stays flat."""
        logs = self._logs
        held = self.bytes
        if held <= self._evict_above:  # expiry made room already
            return
        target = self._evict_to
        evicted = 0
        while held > target and logs:
            channel, log = next(iter(logs.items()))
            entries = log.entries
            while entries and held > target:
                held -= entries.popleft()[2]
                evicted += 1
            if not entries:
                del logs[channel]
                self._idle[channel] = log.last_seq
        self.bytes = held
        self.stats.messages_evicted += evicted

    def _expire(self, log: ChannelLog[E], now: float) -> None:
        cutoff = now - self.max_age
        entries = log.entries
        while entries and entries[0][0] < cutoff:
            self.bytes -= entries.popleft()[2]
            self.stats.messages_expired += 1

    def skip_to(self, channel: str, seq: int) -> None:
        """Record that positions up to ``seq`` passed without an entry (already announced as a
        gap), so the next entry is not reported as missing them again."""
        log = self._logs.get(channel)
        if log is not None:
            if seq > log.last_seq:
                log.last_seq = seq
        elif seq > self._idle.get(channel, seq):
            self._idle[channel] = seq

    def expire_all(self, now: float) -> None:
        """Drop expired entries of every channel (reads and appends expire lazily too)."""
        for log in self._logs.values():
            self._expire(log, now)

    def last_seq(self, channel: str) -> int:
        log = self._logs.get(channel)
        return log.last_seq if log else self._idle.get(channel, 0)

    def latest(self, channel: str, now: float) -> E | None:
        log = self._logs.get(channel)
        if log is None:
            return None
        self._expire(log, now)
        return log.entries[-1][1] if log.entries else None

    def after(self, channel: str, seq: int, limit: int, now: float) -> list[E]:
        """Retained entries with position > ``seq``, oldest first; at most ``limit + 1`` of
        the oldest such entries, so a caller can tell that more than ``limit`` exist."""
        log = self._logs.get(channel)
        if log is None:
            return []
        self._expire(log, now)
        found: deque[E] = deque()
        # Recoveries are usually near the end of the log: scan from the newest entry.
        for _, entry, _ in reversed(log.entries):
            if entry.seq <= seq:
                break
            found.appendleft(entry)
            if len(found) > limit + 1:
                found.pop()
        return list(found)

    def channel_stats(self, channel: str, now: float, window: float) -> tuple[int, int, int]:
        """(entries retained, last position, entries stored in the last ``window`` seconds)
        of one channel, for the operator console."""
        log = self._logs.get(channel)
        if log is None:
            return 0, self._idle.get(channel, 0), 0
        recent = 0
        for stored_at, _, _ in reversed(log.entries):
            if stored_at < now - window:
                break
            recent += 1
        return len(log.entries), log.last_seq, recent

    def knows(self, channel: str) -> bool:
        return channel in self._logs or channel in self._idle

    def channels(self) -> list[str]:
        return [*self._logs, *self._idle]

    def channel_count(self) -> int:
        return len(self._logs) + len(self._idle)

    def forget(self, channel: str) -> None:
        """Forget one channel, entries and last position: this process stops (or stopped)
        receiving it, so what it holds would soon be, or already is, out of date."""
        log = self._logs.pop(channel, None)
        if log is not None:
            self._drop(log.entries)
        self._idle.pop(channel, None)

    def clear(self) -> None:
        """Forget everything: the history these positions belonged to is gone."""
        self._logs.clear()
        self._idle.clear()
        self.bytes = 0

    def restart(self) -> None:
        """A new history began (a new epoch): its positions start from 0. Entries go; the
        channels stay known, at position 0, so that a first message whose ``prev`` skips
        positions is reported as missing them like any other."""
        channels = self.channels()
        self.clear()
        self._idle = dict.fromkeys(channels, 0)

    def message_count(self) -> int:
        return sum(len(log.entries) for log in self._logs.values())
