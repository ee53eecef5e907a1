"""The console's view-model: what it knows of each attached server, without any UI.

Per server: the link state, the identity, the latest snapshot and the recent rates (bounded
histories for the sparklines). Across servers: the event log (bounded) and the totals. The app
feeds it the client's reports and renders from it; the tests drive it directly.

A host run by ``odin serve --workers N`` is one group (``Host``): the workers' sockets, whose
hello names their supervisor, and the supervisor's own socket, which reports every worker's
state (one that is restarting has no socket to attach to, but it has a row).

On attach the rate histories are filled from the server's last hour (``history``). The event
log can page back (``add_older``): each server's events older than the oldest it has given
this console, put at the top, as many as the log has room for.

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

from odin_fanout.console.link import SUPERVISOR, LinkState, LinkStatus
from odin_fanout.control.protocol import (
    EventPage,
    HostWorkers,
    NatsState,
    RateHistory,
    Recoveries,
    ServerEvent,
    ServerIdentity,
    Snapshot,
    Update,
)

HISTORY: Final = 3600
"""Points in each sparkline: the last hour at the default interval (a server's history fills
them on attach)."""
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
    workers: HostWorkers | None = None
    """A supervisor's workers, as it last reported them."""
    oldest_seq: int = 0
    """Position of the oldest of its events in the log (0: none yet): paging back asks for
    those before it."""
    paged_upto: int = 0
    """Position of the newest event that came in a page back taken from the newest (none of
    its events in the log yet): an update that carries it again, or one before it, skips it."""
    events_start: bool = False
    """The server keeps nothing older than ``oldest_seq``."""
    pages_events: bool = True
    """False once it answered ``events`` with ``unknown_command`` (an older server)."""
    events_kept: int = 0
    """How many events the server keeps (from its last page back; 0: not known)."""

    def seen(self, seq: int) -> None:
        """Note that its event at position ``seq`` is in the log."""
        if seq > 0:
            self.oldest_seq = min(self.oldest_seq, seq) if self.oldest_seq else seq

    @property
    def label(self) -> str:
        """The instance id once known (connection ids start with it), else the socket's name;
        a supervisor (which has no connections) by its pid."""
        if self.identity is None:
            return self.path.name
        if self.is_supervisor:
            return f"supervisor {self.identity.pid}"
        return self.identity.instance

    @property
    def is_supervisor(self) -> bool:
        return self.identity is not None and self.identity.role == SUPERVISOR

    @property
    def host_pid(self) -> int | None:
        """The supervisor whose host this socket belongs to: its own pid for a supervisor,
        its supervisor's for a worker; None for a server alone (or not known yet)."""
        identity = self.identity
        if identity is None:
            return None
        return identity.pid if self.is_supervisor else identity.supervisor_pid

    @property
    def up(self) -> bool:
        return self.status.up

    @property
    def link_word(self) -> str:
        """The link in a word or two, for titles and rows: up, down or not answering."""
        if self.up:
            return "up"
        return "not answering" if self.status.state is LinkState.NOT_ANSWERING else "down"

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
        if state is LinkState.NOT_ANSWERING:
            return f"not answering: {self.path}{suffix} (retrying)"
        if state is LinkState.GONE:
            return f"server gone: {self.path}{suffix} (retrying)"
        if state is LinkState.CONNECTING and not self.was_connected:
            return f"connecting to {self.path}…"
        return f"reconnecting to {self.path}…{suffix}"


@attrs.frozen
class WorkerRow:
    """One worker of a host: what its supervisor says of it, and its own socket's view."""

    slot: int | None
    state: str
    """The supervisor's word (starting, up, restarting, stopping, stopped); without one, up,
    down or not answering, as the console's link to the worker is."""
    pid: int | None
    view: ServerView | None = None
    """Its socket, when attached."""
    restarts: int = 0
    last_exit: str = ""

    @property
    def snapshot(self) -> Snapshot | None:
        view = self.view
        return view.snapshot if view is not None and view.up else None


@attrs.frozen
class Host:
    """A supervisor and its workers: ``odin serve --workers N`` on one host."""

    pid: int
    """The supervisor's."""
    supervisor: ServerView | None
    """Its socket, when attached."""
    rows: list[WorkerRow]
    """A row per worker, by slot."""
    expected: int

    @property
    def key(self) -> str:
        return f"host:{self.pid}"

    @property
    def label(self) -> str:
        return f"host {self.pid}"

    @property
    def views(self) -> list[ServerView]:
        """Every socket of the host that is attached, the supervisor's first."""
        workers = [row.view for row in self.rows if row.view is not None]
        return [self.supervisor, *workers] if self.supervisor is not None else workers

    @property
    def up(self) -> int:
        return sum(1 for row in self.rows if row.state == "up")

    def live(self) -> list[ServerView]:
        return [row.view for row in self.rows if row.view is not None and row.snapshot is not None]

    def total(self) -> Snapshot | None:
        """The sum over its workers that are up (None when none is)."""
        live = [row.snapshot for row in self.rows if row.snapshot is not None]
        return sum_snapshots(live) if live else None

    def total_history(self) -> tuple[list[float], list[float]]:
        live = self.live()
        return (
            _sum_aligned([view.rate_in for view in live]),
            _sum_aligned([view.rate_out for view in live]),
        )


class ConsoleModel:
    def __init__(self, history: int = HISTORY, events: int = EVENTS) -> None:
        self.history = history
        self.servers: dict[str, ServerView] = {}
        self.events: deque[LoggedEvent] = deque(maxlen=events)
        self.event_count = 0
        """Entries ever logged: the number of the next one."""
        self._older_number = 0
        """Entries paged back are numbered down from here: they go before every other."""
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
            if view.identity is not None and _restarted(view.identity, status.identity):
                # Another process behind the socket: its positions start again at 1.
                view.oldest_seq = view.paged_upto = 0
                view.events_start, view.pages_events = False, True
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
        fresh = [event for event in update.events if event.seq <= 0 or event.seq > view.paged_upto]
        for event in fresh:
            view.seen(event.seq)
        # A group that counted several repeats is returned once (entries compare by identity).
        entries = dict.fromkeys(self._log(view.label, event) for event in fresh)
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

    def apply_history(self, key: str, history: RateHistory) -> None:
        """Replace a server's rate histories with what it kept (its last hour)."""
        view = self.servers.get(key)
        if view is None:
            return
        for points, values in (
            (view.rate_in, history.in_per_s),
            (view.rate_out, history.out_per_s),
        ):
            points.clear()
            points.extend(values)

    @property
    def room(self) -> int:
        """Entries the log can take before it lets the oldest go."""
        return (self.events.maxlen or 0) - len(self.events)

    def add_older(self, pages: dict[str, EventPage]) -> list[LoggedEvent]:
        """Put the servers' older events (a page each, from ``events``) at the top of the log,
        in time order: the newest of them, as many as it has room for (the log is bounded; a
        full one takes none). Returns the entries added, oldest first."""
        candidates: list[tuple[float, int, ServerView, ServerEvent]] = []
        for key, page in pages.items():
            view = self.servers.get(key)
            if view is None:
                continue
            older = [e for e in page.events if not view.oldest_seq or e.seq < view.oldest_seq]
            candidates += [(event.time, event.seq, view, event) for event in older]
        candidates.sort(key=lambda item: (item[0], item[1]))
        room = self.room
        kept = candidates[max(0, len(candidates) - room) :] if room > 0 else []
        left = {id(item[2]) for item in candidates[: len(candidates) - len(kept)]}
        for key, page in pages.items():
            view = self.servers.get(key)
            if view is not None:
                view.events_kept = page.capacity
                view.events_start = not page.more and id(view) not in left
        # Pages of servers with no event in the log yet were taken from the newest.
        from_newest = {id(item[2]) for item in kept if not item[2].oldest_seq}
        entries: list[LoggedEvent] = []
        groups: dict[tuple[str, str, str], LoggedEvent] = {}
        for *_, view, event in kept:
            if id(view) in from_newest:
                view.paged_upto = max(view.paged_upto, event.seq)
            view.seen(event.seq)
            group = groups.get((view.label, event.conn, event.kind))
            if group is not None and event.time - group.event.time <= GROUP_GAP:
                group.repeat(event)
                continue
            logged = LoggedEvent(0, view.label, event)
            entries.append(logged)
            if event.kind in GROUPED and event.conn:
                groups[logged.key] = logged
        self._older_number -= len(entries)
        for offset, logged in enumerate(entries):
            logged.number = self._older_number + offset
        self.events.extendleft(reversed(entries))
        return entries

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

    def apply_workers(self, key: str, workers: HostWorkers) -> None:
        """Take in what a supervisor reports of its workers."""
        view = self.servers.get(key)
        if view is not None:
            view.workers = workers

    def hosts(self) -> list[Host]:
        """The hosts of supervisors and workers, in the order their first socket came."""
        groups: dict[int, list[ServerView]] = {}
        for view in self.servers.values():
            pid = view.host_pid
            if pid is not None:
                groups.setdefault(pid, []).append(view)
        return [_host(pid, views) for pid, views in groups.items()]

    def alone(self) -> list[ServerView]:
        """The servers that run alone (and those whose hello has not come yet)."""
        return [view for view in self.servers.values() if view.host_pid is None]

    def processes(self) -> list[ServerView]:
        """The servers that serve clients: every one attached but supervisors."""
        return [view for view in self.servers.values() if not view.is_supervisor]

    def replaced(self) -> list[ServerView]:
        """Workers whose link is down and whose supervisor, up, no longer lists their pid: a
        worker that died and whose slot runs another one now."""
        gone = []
        for host in self.hosts():
            supervisor = host.supervisor
            if supervisor is None or not supervisor.up or supervisor.workers is None:
                continue
            pids = {worker.pid for worker in supervisor.workers.workers}
            gone += [
                view
                for view in host.views
                if not view.is_supervisor
                and not view.up
                and view.identity is not None
                and view.identity.pid not in pids
            ]
        return gone

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


def _restarted(before: ServerIdentity, after: ServerIdentity) -> bool:
    return (before.pid, before.instance, before.started_at) != (
        after.pid,
        after.instance,
        after.started_at,
    )


def _host(pid: int, views: list[ServerView]) -> Host:
    """A host's rows: the supervisor's report while its link is up, each matched to the
    worker's socket by pid; workers it does not list (yet), or all without a report, from
    their own sockets."""
    supervisor = next((view for view in views if view.is_supervisor), None)
    workers = [view for view in views if not view.is_supervisor and view.identity is not None]
    report = supervisor.workers if supervisor is not None and supervisor.up else None
    rows: list[WorkerRow] = []
    if report is not None:
        by_pid = {view.identity.pid: view for view in workers if view.identity is not None}
        for info in report.workers:
            view = by_pid.pop(info.pid, None) if info.pid is not None else None
            rows.append(
                WorkerRow(info.slot, info.state, info.pid, view, info.restarts, info.last_exit)
            )
        workers = list(by_pid.values())
    for view in workers:
        assert view.identity is not None
        state = view.link_word
        rows.append(WorkerRow(view.identity.worker, state, view.identity.pid, view))
    rows.sort(key=lambda row: (row.slot is None, row.slot or 0))
    if report is not None:
        expected = report.expected
    else:  # what the workers' hellos say
        expected = max([len(rows), *(v.identity.workers for v in views if v.identity)])
    return Host(pid, supervisor, rows, expected)


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
