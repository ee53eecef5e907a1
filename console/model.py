"""The console's view-model: what it knows of each attached server, without any UI.

Per server: the link state, the identity, the latest snapshot and the recent rates (bounded
histories for the sparklines). Across servers: the event log (bounded) and the totals. The app
feeds it the client's reports and renders from it; the tests drive it directly.

Repeats of a kind that floods (``GROUPED``: a slow consumer is reported every time its queue
fills, many times a second) are one entry per connection, counted, with the first and last
time, for as long as they keep coming (``GROUP_GAP``); every other event is an entry of its
own.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import attrs

from console.link import LinkState, LinkStatus
from odin.control.protocol import (
    NatsState,
    Recoveries,
    ServerEvent,
    ServerIdentity,
    Snapshot,
    Update,
)

HISTORY: Final = 120
"""Points in each sparkline: two minutes at the default interval."""
EVENTS: Final = 1000
GROUPED: Final = frozenset({"slow_consumer"})
"""Kinds whose repeats for one connection are counted on one entry."""
GROUP_GAP: Final = 60.0
"""Seconds (server time) after a group's last event when a repeat starts a new entry: the
log then shows that it came back, instead of counting it on an entry far up."""


def describe_detail(detail: dict[str, str | int | float | bool | None]) -> str:
    """``code=1008 reason="slow consumer"``: empty values left out, text with spaces quoted."""
    parts = []
    for key, value in detail.items():
        if value is None or value == "":
            continue
        text = str(value)
        parts.append(f'{key}="{text}"' if " " in text else f"{key}={text}")
    return " ".join(parts)


@attrs.define(eq=False)
class LoggedEvent:
    """An entry of the log: one event, or a group of repeats (``count``) that shows the last
    one's details. Groups change in place; ``number`` stays."""

    number: int
    """Its place in the order of arrival at this console."""
    server: str
    event: ServerEvent
    """The last of the group."""
    count: int = 1
    first_time: float = attrs.field(
        default=attrs.Factory(lambda self: self.event.time, takes_self=True)
    )

    @property
    def key(self) -> tuple[str, str, str]:
        """What its repeats share: the server, the connection and the kind."""
        return self.server, self.event.conn, self.event.kind

    @property
    def details(self) -> str:
        last = describe_detail(self.event.detail)
        if self.count == 1:
            return last
        return f"×{self.count:,}, last: {last}" if last else f"×{self.count:,}"

    def repeat(self, event: ServerEvent) -> None:
        self.event = event
        self.count += 1

    def matches(self, text: str) -> bool:
        """Whether ``text`` (case-insensitive) is in its kind, connection or details."""
        needle = text.strip().lower()
        if not needle:
            return True
        haystack = f"{self.event.kind} {self.event.conn} {self.details} {self.server}"
        return needle in haystack.lower()


@attrs.define
class ServerView:
    key: str
    path: Path
    status: LinkStatus = attrs.Factory(lambda: LinkStatus(LinkState.CONNECTING))
    identity: ServerIdentity | None = None
    snapshot: Snapshot | None = None
    rate_in: deque[float] = attrs.Factory(lambda: deque(maxlen=HISTORY))
    rate_out: deque[float] = attrs.Factory(lambda: deque(maxlen=HISTORY))
    events_dropped: int = 0
    was_connected: bool = False

    @property
    def label(self) -> str:
        """The instance id once known (connection ids start with it), else the socket's name."""
        return self.identity.instance if self.identity is not None else self.path.name

    @property
    def up(self) -> bool:
        return self.status.up

    def banner(self) -> str | None:
        """What to tell the operator while the link is not up."""
        state, detail = self.status.state, self.status.detail
        suffix = f" ({detail})" if detail else ""
        if state is LinkState.CONNECTED:
            return None
        if state is LinkState.MISSING:
            return f"socket missing: {self.path} (retrying)"
        if state is LinkState.DENIED:
            return (
                f"permission denied: {self.path}{suffix}; run the console as the server's user"
                " or root"
            )
        if state is LinkState.VERSION_MISMATCH:
            return f"protocol version mismatch: {self.path}: {detail}; not attached"
        if state is LinkState.CONNECTING and not self.was_connected:
            return f"connecting to {self.path}…"
        return f"reconnecting to {self.path}…{suffix}"


class ConsoleModel:
    def __init__(self, history: int = HISTORY, events: int = EVENTS) -> None:
        self.history = history
        self.servers: dict[str, ServerView] = {}
        self.events: deque[LoggedEvent] = deque(maxlen=events)
        self.event_count = 0
        """Entries ever logged: the number of the next one."""
        self._groups: dict[tuple[str, str, str], LoggedEvent] = {}
        """The open group of each grouped kind and connection (entries still in the log)."""

    def attach(self, key: str, path: Path) -> ServerView:
        view = self.servers.get(key)
        if view is None:
            view = ServerView(
                key,
                path,
                rate_in=deque(maxlen=self.history),
                rate_out=deque(maxlen=self.history),
            )
            self.servers[key] = view
        return view

    def detach(self, key: str) -> None:
        self.servers.pop(key, None)

    def set_link(self, key: str, status: LinkStatus) -> None:
        view = self.servers.get(key)
        if view is None:
            return
        view.status = status
        if status.identity is not None:
            view.identity = status.identity
        if status.up:
            view.was_connected = True

    def apply_update(self, key: str, update: Update) -> list[LoggedEvent]:
        """Take in an update; returns the entries it added to the log or changed (a group that
        counted a repeat), each once, in the order of the log."""
        view = self.servers.get(key)
        if view is None:
            return []
        view.snapshot = update.snapshot
        view.rate_in.append(update.snapshot.in_per_s)
        view.rate_out.append(update.snapshot.out_per_s)
        # A group that counted several repeats is returned once (entries compare by identity).
        entries = dict.fromkeys(self._log(view.label, event) for event in update.events)
        added = sorted(entries, key=lambda logged: logged.number)
        if update.events_dropped:
            view.events_dropped += update.events_dropped
            # Said in the log itself, where the missing events would have been.
            note = ServerEvent(
                seq=0,
                time=update.snapshot.time,
                kind="events_dropped",
                detail={"count": update.events_dropped},
            )
            added.append(self._log(view.label, note))
        return added

    def note(
        self,
        server: str,
        kind: str,
        detail: dict[str, str | int | float | bool | None],
        when: float,
    ) -> LoggedEvent:
        """Log what the console itself has to say about a server (a failed reload)."""
        return self._log(server, ServerEvent(seq=0, time=when, kind=kind, detail=detail))

    def _log(self, server: str, event: ServerEvent) -> LoggedEvent:
        grouped = event.kind in GROUPED and bool(event.conn)
        if grouped:
            group = self._groups.get((server, event.conn, event.kind))
            if group is not None and event.time - group.event.time <= GROUP_GAP:
                group.repeat(event)
                return group
        logged = LoggedEvent(self.event_count, server, event)
        self.event_count += 1
        if len(self.events) == self.events.maxlen:
            oldest = self.events[0]  # about to fall out: its group (if any) closes with it
            if self._groups.get(oldest.key) is oldest:
                del self._groups[oldest.key]
        self.events.append(logged)
        if grouped:
            self._groups[logged.key] = logged
        return logged

    def events_matching(self, text: str) -> list[LoggedEvent]:
        return [logged for logged in self.events if logged.matches(text)]

    def banners(self) -> list[str]:
        return [text for view in self.servers.values() if (text := view.banner()) is not None]

    def live(self) -> list[ServerView]:
        """The servers whose link is up and whose state is known."""
        return [view for view in self.servers.values() if view.up and view.snapshot is not None]

    def total(self) -> Snapshot | None:
        """The sum over the servers that are up (None when none is)."""
        live = [view.snapshot for view in self.live() if view.snapshot is not None]
        return sum_snapshots(live) if live else None

    def total_history(self) -> tuple[list[float], list[float]]:
        """The live servers' rate histories summed, aligned on their latest points."""
        live = self.live()
        return (
            _sum_aligned([view.rate_in for view in live]),
            _sum_aligned([view.rate_out for view in live]),
        )


def _sum_aligned(histories: Iterable[deque[float]]) -> list[float]:
    total: list[float] = []
    for history in histories:
        points = list(history)
        if len(points) > len(total):
            total = [0.0] * (len(points) - len(total)) + total
        offset = len(total) - len(points)
        for index, value in enumerate(points):
            total[offset + index] += value
    return total


def _add(dicts: Iterable[dict[str, int]]) -> dict[str, int]:
    counter: Counter[str] = Counter()
    for counts in dicts:
        counter.update(counts)
    return dict(sorted(counter.items()))


def sum_snapshots(snapshots: list[Snapshot]) -> Snapshot:
    """Several servers' snapshots as one: counts and rates added, the worst queue kept."""
    nats = [snapshot.nats for snapshot in snapshots]
    connected = sum(state.connected for state in nats)
    return Snapshot(
        time=max(s.time for s in snapshots),
        uptime=max(s.uptime for s in snapshots),
        instance="all",
        connections=sum(s.connections for s in snapshots),
        max_connections=sum(s.max_connections for s in snapshots),
        subscriptions=sum(s.subscriptions for s in snapshots),
        channels=max(s.channels for s in snapshots),  # servers share channels: a lower bound
        draining=any(s.draining for s in snapshots),
        publications=sum(s.publications for s in snapshots),
        deliveries=sum(s.deliveries for s in snapshots),
        in_per_s=sum(s.in_per_s for s in snapshots),
        out_per_s=sum(s.out_per_s for s in snapshots),
        dropped=_add(s.dropped for s in snapshots),
        gaps=_add(s.gaps for s in snapshots),
        slow_consumers=_add(s.slow_consumers for s in snapshots),
        rate_limited=sum(s.rate_limited for s in snapshots),
        client_errors=sum(s.client_errors for s in snapshots),
        recoveries=Recoveries(
            recovered=sum(s.recoveries.recovered for s in snapshots),
            not_recovered=_add(s.recoveries.not_recovered for s in snapshots),
            messages=sum(s.recoveries.messages for s in snapshots),
        ),
        replays=_add(s.replays for s in snapshots),
        replayed_messages=sum(s.replayed_messages for s in snapshots),
        rejected=_add(s.rejected for s in snapshots),
        closed=_add(s.closed for s in snapshots),
        nats=NatsState(
            connected=connected == len(nats),
            detail=f"{connected} of {len(nats)} up",
            epoch="",
            pending=sum(state.pending for state in nats),
            reconnects=sum(state.reconnects for state in nats),
            ingest_dropped=sum(state.ingest_dropped for state in nats),
        ),
        rss_bytes=sum(s.rss_bytes for s in snapshots),
        memory_limit_bytes=sum(s.memory_limit_bytes for s in snapshots),
        cpu_seconds=sum(s.cpu_seconds for s in snapshots),
        deepest_queue=max(s.deepest_queue for s in snapshots),
        oldest_queued_age=max(s.oldest_queued_age for s in snapshots),
    )
