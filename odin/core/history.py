"""Bounded per-channel history: the retained messages of every channel, newest last.

One copy per message, shared by every connection (the original kept 100 copies per client).
Each channel keeps at most ``max_messages`` entries and none older than ``max_age`` seconds;
at most ``max_channels`` channels are tracked, the least recently published one is forgotten
first. A channel remembers its last position even after its entries expire, so a client that
is already current is still told so.
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
    entries: deque[tuple[float, E]] = attrs.Factory(deque)
    """(stored at, entry), oldest first."""
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


APPENDED = Appended()
DUPLICATE = Appended(duplicate=True)


@attrs.define
class HistoryStats:
    channels_evicted: int = 0
    messages_expired: int = 0
    messages_trimmed: int = 0


class HistoryLog(Generic[E]):
    def __init__(self, *, max_messages: int, max_age: float, max_channels: int) -> None:
        if max_messages < 1 or max_channels < 1 or max_age <= 0:
            raise ValueError("history limits must be positive")
        self.max_messages = max_messages
        self.max_age = max_age
        self.max_channels = max_channels
        self.stats = HistoryStats()
        self._logs: OrderedDict[str, ChannelLog[E]] = OrderedDict()

    def append(self, channel: str, entry: E, now: float) -> Appended:
        """Store ``entry`` as the channel's newest. On the fan-out's path for every
        publication, so the usual outcome allocates nothing (``APPENDED``)."""
        logs = self._logs
        log = logs.get(channel)
        if log is None:
            log = logs[channel] = ChannelLog()
            if len(logs) > self.max_channels:
                logs.popitem(last=False)
                self.stats.channels_evicted += 1
        else:
            logs.move_to_end(channel)
        last = log.last_seq
        seq = entry.seq
        if seq <= last:
            return DUPLICATE
        result = APPENDED
        if last and entry.prev > last:
            result = Appended(missed_from=last + 1, missed_to=entry.prev)
        log.last_seq = seq
        entries = log.entries
        entries.append((now, entry))
        if len(entries) > self.max_messages:
            entries.popleft()
            self.stats.messages_trimmed += 1
        if entries[0][0] < now - self.max_age:
            self._expire(log, now)
        return result

    def _expire(self, log: ChannelLog[E], now: float) -> None:
        cutoff = now - self.max_age
        entries = log.entries
        while entries and entries[0][0] < cutoff:
            entries.popleft()
            self.stats.messages_expired += 1

    def skip_to(self, channel: str, seq: int) -> None:
        """Record that positions up to ``seq`` passed without an entry (already announced as a
        gap), so the next entry is not reported as missing them again."""
        log = self._logs.get(channel)
        if log is not None and seq > log.last_seq:
            log.last_seq = seq

    def expire_all(self, now: float) -> None:
        """Drop expired entries of every channel (reads and appends expire lazily too)."""
        for log in self._logs.values():
            self._expire(log, now)

    def last_seq(self, channel: str) -> int:
        log = self._logs.get(channel)
        return log.last_seq if log else 0

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
        for _, entry in reversed(log.entries):
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
            return 0, 0, 0
        recent = 0
        for stored_at, _ in reversed(log.entries):
            if stored_at < now - window:
                break
            recent += 1
        return len(log.entries), log.last_seq, recent

    def knows(self, channel: str) -> bool:
        return channel in self._logs

    def channels(self) -> list[str]:
        return list(self._logs)

    def clear(self) -> None:
        """Forget everything: the history these positions belonged to is gone."""
        self._logs.clear()

    def message_count(self) -> int:
        return sum(len(log.entries) for log in self._logs.values())
