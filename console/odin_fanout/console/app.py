"""The Textual app: a control client per server (each in a worker), the view-model they feed,
and the views over it.

Clients post what they hear as messages; the app folds them into the model at once but paints
at most every ``flush_every`` seconds, so a burst of updates costs one repaint. The tables ask
the selected server for a page when shown, on a change of sort, filter or server, and every
``refresh_every`` seconds while visible.

Sockets come from ``--socket`` or a look in the directory every ``scan_every`` seconds (at most
``MAX_SOCKETS``). A supervisor's socket is polled for its workers instead of watched; with
``--socket``, the workers' sockets it reports are attached too. A worker that died and whose
slot now runs another is let go once its supervisor stops listing it. A socket found whose
server is gone (refused, and its process not running) is said once and let go. A socket let
go is not attached again while its file stays the same: a killed process leaves it behind.

On attach each server's last hour fills its charts (``history``); ``[`` in the event log pages
back through the servers' rings of events (``events``), into the log's free room.

Paused (``p``), the model still takes in every update but the views stand still: the event
log, the overview and the tables' periodic refresh; the header stays live and says PAUSED.
Resuming paints what arrived meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar, Final

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.css.query import NoMatches
from textual.widget import Widget
from textual.widgets import Footer, Label, Select, Static, TabbedContent, TabPane
from textual.worker import Worker

from odin_fanout.console.cli import DEFAULT_GRAFANA
from odin_fanout.console.client import ControlClient, NotConnected, RequestFailed
from odin_fanout.console.commands import COMMANDS, ConsoleCommands
from odin_fanout.console.link import LinkState, LinkStatus
from odin_fanout.console.messages import (
    ActionOutcome,
    HistoryArrived,
    LinkChanged,
    UpdateArrived,
    WorkersArrived,
)
from odin_fanout.console.model import EVENTS, ConsoleModel, LoggedEvent, ServerView
from odin_fanout.console.screens.confirm import ConfirmScreen, ReloadScope, ReloadScreen
from odin_fanout.console.screens.help import HelpScreen, help_sections
from odin_fanout.console.widgets.channels import ChannelsView
from odin_fanout.console.widgets.connections import ConnectionsView
from odin_fanout.console.widgets.events import EventLog
from odin_fanout.console.widgets.header import StatusLine
from odin_fanout.console.widgets.overview import Overview
from odin_fanout.console.widgets.tables import PagedTable
from odin_fanout.control.paths import default_directory, find_sockets, owner_running
from odin_fanout.control.protocol import (
    Drain,
    Draining,
    ErrorCode,
    EventPage,
    HostWorkers,
    ListEvents,
    RateHistory,
    Reload,
    Reloaded,
    Update,
)

TABS = ("overview", "connections", "channels", "events")
MAX_SOCKETS: Final = 128
"""Sockets attached at most besides those named with ``--socket``: found in the directory or
reported by a supervisor."""

OLDER_PAGE: Final = 200
"""Events asked of each server by one ``[`` in the event log (the protocol allows 500)."""

FileIdentity = tuple[int, int, int]
"""A file's device, inode and modification time: another server binding the same path makes
another file."""


class ConsoleApp(App[None]):
    CSS_PATH = "console.tcss"
    TITLE = "Odin console"
    # The tabs' titles show their keys, so the footer need not.
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("1", "show_tab('overview')", "Overview", show=False),
        Binding("2", "show_tab('connections')", "Connections", show=False),
        Binding("3", "show_tab('channels')", "Channels", show=False),
        Binding("4", "show_tab('events')", "Events", show=False),
        Binding("s", "next_server", "Next server"),
        Binding("d", "drain", "Drain"),
        # R, not r: r reverses a table's order. Asks first.
        Binding("R", "reload", "Reload config", key_display="R"),
        # One key, two bindings: the footer says which one p does now.
        Binding("p", "pause", "Pause"),
        Binding("p", "resume", "Resume (paused)"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("h", "help", "Help", show=False),
        # Textual's command palette, with the console's commands (odin_fanout.console.commands).
        Binding("colon", "command_palette", "Commands", key_display=":"),
        Binding("q", "quit", "Quit"),
    ]
    COMMANDS = App.COMMANDS | {ConsoleCommands}

    def __init__(
        self,
        *,
        sockets: Sequence[Path] = (),
        directory: Path | None = None,
        grafana_url: str = DEFAULT_GRAFANA,
        interval: float = 1.0,
        scan_every: float = 2.0,
        refresh_every: float = 2.0,
        flush_every: float = 0.25,
        owner_running: Callable[[Path], bool | None] = owner_running,
    ) -> None:
        super().__init__()
        self.sockets = list(sockets)
        """Fixed sockets; when empty, every socket found in ``directory``."""
        self.directory = directory if directory is not None else default_directory()
        self.grafana_url = grafana_url
        self.interval = interval
        self.scan_every = scan_every
        self.refresh_every = refresh_every
        self.flush_every = flush_every
        self.owner_running = owner_running
        """Whether the process that created a socket runs (None: not known): tells a server
        gone from one not answering."""
        self.model = ConsoleModel()
        self.clients: dict[str, ControlClient] = {}
        self.selected: str | None = None
        self.outcomes: list[str] = []
        """Every action's outcome, as notified."""
        self.paused = False
        self._missed = 0
        """Events that arrived while paused."""
        self._links: dict[str, Worker[None]] = {}
        self._fresh: list[LoggedEvent] = []
        self._dirty = True
        self._misses: dict[str, int] = {}
        self._options: list[tuple[str, str]] = []
        self._let_go: dict[str, FileIdentity] = {}
        """Sockets found and let go (a server gone, a worker replaced) whose file stays
        (SIGKILL leaves it): not attached again unless another process binds there."""
        self._left_out = 0
        """Sockets found but not attached: beyond MAX_SOCKETS."""

    # ---- layout ------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield StatusLine(id="header")
        yield Static("", id="banner")
        with Horizontal(id="server-bar"):
            yield Label("server", id="server-label")
            yield Select[str]([], id="server", prompt="no server yet")
            yield Static("", id="server-info")
        with TabbedContent(initial="overview", id="tabs"):
            with TabPane("1 Overview", id="overview"):
                yield Overview(self.grafana_url, id="overview-view")
            with TabPane("2 Connections", id="connections"):
                yield ConnectionsView(
                    self.selected_client, self.selected_label, id="connections-view"
                )
            with TabPane("3 Channels", id="channels"):
                yield ChannelsView(self.selected_client, self.host_clients, id="channels-view")
            with TabPane("4 Events", id="events"):
                yield EventLog(self.model, id="events-view")
        # Compact, without the palette's hint (ctrl+p still opens it): at 80 columns the
        # footer then holds a table's keys and most of the global ones.
        yield Footer(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        self.sub_title = f"deeper history in Grafana: {self.grafana_url}"
        for path in self.sockets:
            self.attach_server(path)
        self._scan()
        self.set_interval(self.scan_every, self._scan)
        self.set_interval(self.flush_every, self.paint)
        self.set_interval(self.refresh_every, self._refresh_table)
        self.paint()

    async def on_unmount(self) -> None:
        # Textual cancels workers as it exits but does not wait for them: a link cancelled
        # that way never closed its socket (ResourceWarning: unclosed socket). Each link's own
        # cleanup closes it; this waits for that, briefly.
        links = list(self._links.values())
        for worker in links:
            worker.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                # Each ends cancelled (WorkerCancelled): collected, not raised.
                await asyncio.gather(*(worker.wait() for worker in links), return_exceptions=True)

    # ---- servers -----------------------------------------------------------------------------

    def attach_server(self, path: Path) -> None:
        key = str(path)
        if key in self.clients:
            return
        self.model.attach(key, path)

        def on_link(status: LinkStatus) -> None:
            self.post_message(LinkChanged(key, status))

        def on_update(update: Update) -> None:
            self.post_message(UpdateArrived(key, update))

        def on_workers(workers: HostWorkers) -> None:
            self.post_message(WorkersArrived(key, workers))

        def on_history(history: RateHistory) -> None:
            self.post_message(HistoryArrived(key, history))

        client = ControlClient(
            path,
            on_link=on_link,
            on_update=on_update,
            on_workers=on_workers,
            on_history=on_history,
            interval=self.interval,
            owner_running=self.owner_running,
        )
        self.clients[key] = client
        self._links[key] = self.run_worker(
            client.run(), name=f"link {path.name}", group="links", description=str(path)
        )
        if self.selected is None:
            self._select(key)
        self._dirty = True

    def detach_server(
        self, key: str, why: str = "its socket is gone", *, announce: bool = True
    ) -> None:
        worker = self._links.pop(key, None)
        if worker is not None:
            worker.cancel()
        self.clients.pop(key, None)
        view = self.model.servers.get(key)
        self.model.detach(key)
        self._misses.pop(key, None)
        if view is not None and announce:
            self.report(f"{view.label}: {why} ({view.path.name}); detached")
        if self.selected == key:
            self._select(next(iter(self.model.servers), None))
        self._dirty = True

    def _attach_found(self, path: Path) -> None:
        """Attach a socket found (not named with ``--socket``), within MAX_SOCKETS."""
        key = str(path)
        if key in self.clients:
            return
        let_go = self._let_go.get(key)
        if let_go is not None:
            if let_go == _file_identity(path):
                return  # the dead process's file, still there
            del self._let_go[key]
        if len(self.clients) - len(self.sockets) >= MAX_SOCKETS:
            self._left_out += 1
            return
        self.attach_server(path)

    def _scan(self) -> None:
        """Attach to new sockets in the directory; let go of those gone while their link is
        down (a server that stopped), and of workers replaced in their slot."""
        self._left_out = 0
        fixed = {str(path) for path in self.sockets}
        if not self.sockets:
            found = {str(path): path for path in find_sockets(self.directory)}
            for key, path in found.items():
                self._misses.pop(key, None)
                self._attach_found(path)
            for key in list(self.clients):
                view = self.model.servers.get(key)
                if key in found or (view is not None and view.up):
                    continue
                self._misses[key] = self._misses.get(key, 0) + 1
                if self._misses[key] >= 2:  # twice: not a server in the middle of restarting
                    self.detach_server(key)
        for view in self.model.replaced():
            if view.key not in fixed:
                self._remember_let_go(view.path)
                self.detach_server(view.key, "replaced by another worker")
        # A file that went away can come back only as another server's.
        self._let_go = {
            key: file for key, file in self._let_go.items() if _file_identity(Path(key))
        }

    def _remember_let_go(self, path: Path) -> None:
        file = _file_identity(path)
        if file is not None:
            self._let_go[str(path)] = file

    def _server_gone(self, key: str, status: LinkStatus) -> None:
        """Say once that a socket found has no server any more, and let it go (one named
        with ``--socket`` is kept: its banner says it)."""
        view = self.model.servers.get(key)
        if view is None or view.path in self.sockets:
            return
        self._log_note(view.label, "server_gone", {"socket": view.path.name, "why": status.detail})
        self.report(f"server gone: {view.label} ({status.detail})")
        self._remember_let_go(view.path)
        self.detach_server(key, announce=False)

    def selected_view(self) -> ServerView | None:
        return self.model.servers.get(self.selected) if self.selected is not None else None

    def selected_client(self) -> tuple[str, ControlClient] | None:
        if self.selected is None or self.selected not in self.clients:
            return None
        return self.selected, self.clients[self.selected]

    def host_clients(self) -> list[ControlClient]:
        """The links to every server of the selected one's host that serve clients (its
        workers, each with its own), up; the selected server alone when it runs alone."""
        view = self.selected_view()
        if view is None:
            return []
        keys = [self.selected] if view.host_pid is None else [
            key
            for key, other in self.model.servers.items()
            if other.host_pid == view.host_pid and not other.is_supervisor
        ]  # fmt: skip
        clients = [self.clients[key] for key in keys if key in self.clients]
        return [client for client in clients if client.status.up]

    def selected_label(self) -> str:
        view = self.selected_view()
        return view.label if view is not None else "no server"

    def _select(self, key: str | None) -> None:
        if key == self.selected:
            return
        self.selected = key
        self._dirty = True
        for table in self.query(PagedTable):
            table.reset()
        self._refresh_table(asked=True)

    def action_next_server(self) -> None:
        keys = list(self.model.servers)
        if not keys:
            return
        index = keys.index(self.selected) + 1 if self.selected in keys else 0
        self._select(keys[index % len(keys)])
        self._sync_select()

    @on(Select.Changed, "#server")
    def _server_chosen(self, event: Select.Changed) -> None:
        if isinstance(event.value, str) and event.value in self.model.servers:
            self._select(event.value)

    # ---- messages from the clients -----------------------------------------------------------

    @on(LinkChanged)
    def _link_changed(self, message: LinkChanged) -> None:
        view = self.model.servers.get(message.key)
        if view is None:
            return
        was_up = view.up
        self.model.set_link(message.key, message.status)
        self._dirty = True
        if message.status.state is LinkState.GONE:
            self._server_gone(message.key, message.status)
            return
        if message.status.up and not was_up and message.key == self.selected:
            self._refresh_table()

    @on(UpdateArrived)
    def _update_arrived(self, message: UpdateArrived) -> None:
        added = self.model.apply_update(message.key, message.update)
        if self.paused:
            # Counted, not kept: on resume the log is rebuilt from the (bounded) model.
            self._missed += len(message.update.events) + message.update.events_dropped
        else:
            self._fresh += added
        self._dirty = True

    @on(HistoryArrived)
    def _history_arrived(self, message: HistoryArrived) -> None:
        self.model.apply_history(message.key, message.history)
        self._dirty = True

    @on(WorkersArrived)
    def _workers_arrived(self, message: WorkersArrived) -> None:
        self.model.apply_workers(message.key, message.workers)
        if self.sockets:
            # Sockets named on the command line: a supervisor's brings its workers' along
            # (in the directory, the scan finds them).
            for worker in message.workers.workers:
                if worker.control and worker.state == "up":
                    self._attach_found(Path(worker.control))
        self._dirty = True

    @on(ActionOutcome)
    def _action_outcome(self, message: ActionOutcome) -> None:
        self.report(message.text, error=message.error)

    def report(self, text: str, *, error: bool = False) -> None:
        self.outcomes.append(text)
        self.notify(text, severity="error" if error else "information", timeout=8 if error else 4)

    # ---- painting ----------------------------------------------------------------------------

    def _shutting_down(self) -> bool:
        """Timers can still fire while the app closes, when its widgets are gone."""
        return not self.query("#tabs")

    def paint(self) -> None:
        if not self._dirty or self._shutting_down():
            return
        try:
            self._paint()
        except NoMatches:
            # The app is closing: its widgets went away between the check and the paint.
            return

    def _paint(self) -> None:
        self._dirty = False
        lines = self.model.banners()
        if not self.sockets and not self.model.servers:
            lines.append(
                f"no Odin server found in {self.directory}; waiting for one"
                " (odin serve creates odin-<pid>.sock there)"
            )
        if self._left_out:
            lines.append(f"{self._left_out} more sockets not attached (at most {MAX_SOCKETS})")
        banner = self.query_one("#banner", Static)
        banner.update(Text("\n".join(lines)))
        banner.display = bool(lines)
        self.query_one(StatusLine).show(self.model, self.paused)
        if not self.paused:
            self.query_one(Overview).sync(self.model, self.selected)
            if self._fresh:
                fresh, self._fresh = self._fresh, []
                self.query_one(EventLog).append(fresh)
        self._sync_select()

    def _sync_select(self) -> None:
        options = [(_option(view), key) for key, view in self.model.servers.items()]
        select: Select[str] = self.query_one("#server", Select)
        if options != self._options:
            self._options = options
            select.set_options(options)
        if self.selected is not None and select.value != self.selected:
            select.value = self.selected
        view = self.selected_view()
        info = ""
        if view is not None:
            identity = view.identity
            # Under the directory searched, the name says it all (and screenshots stay the same).
            shown = view.path.name if view.path.parent == self.directory else view.path
            info = f"socket {shown}"
            if identity is not None:
                # Two short lines beside the list: they fit in the 42 columns left at 80.
                if view.is_supervisor:
                    first = f"supervisor pid {identity.pid}  of {identity.workers} workers"
                    where = "serves no clients"
                else:
                    first = f"instance {identity.instance}  pid {identity.pid}"
                    if identity.worker is not None:
                        first += f"  worker {identity.worker} of {identity.workers}"
                    where = ", ".join(identity.websocket)
                info = f"{first}  {identity.server} {identity.version}\n{where}  {shown}"
            if not view.up:
                info = f"{info}  ·  link {view.status.state.value}"
        self.query_one("#server-info", Static).update(Text(info))

    # ---- tabs and tables ---------------------------------------------------------------------

    def action_show_tab(self, tab: str) -> None:
        # Focus first, into the view shown: a focused widget that is hidden hands its focus to
        # a sibling in its own (hidden) pane, and the tabs follow the focus back there.
        target = self._focus_target(tab)
        if target is not None:
            self.screen.set_focus(target, scroll_visible=False)
        self.query_one(TabbedContent).active = tab

    def _focus_target(self, tab: str) -> Widget | None:
        if tab == "overview":
            return self.query_one(Overview)
        if tab == "connections":
            return self.query_one(ConnectionsView).table
        if tab == "channels":
            return self.query_one(ChannelsView).table
        if tab == "events":
            return self.query_one(EventLog).table
        return None

    @on(TabbedContent.TabActivated)
    def _tab_activated(self, _: TabbedContent.TabActivated) -> None:
        view = self._active_view()
        if isinstance(view, PagedTable):
            view.reload()
        if isinstance(view, PagedTable | EventLog):
            view.focus_table()

    def _active_view(self) -> PagedTable[object] | EventLog | None:
        active = self.query_one(TabbedContent).active
        if active == "connections":
            return self.query_one(ConnectionsView)  # type: ignore[return-value]
        if active == "channels":
            return self.query_one(ChannelsView)  # type: ignore[return-value]
        if active == "events":
            return self.query_one(EventLog)
        return None

    def _refresh_table(self, *, asked: bool = False) -> None:
        """Fetch the shown table's page again; while paused only when ``asked`` (another
        server chosen), not on the timer."""
        if (self.paused and not asked) or self._shutting_down():
            return
        try:
            view = self._active_view()
        except NoMatches:  # closing, as in paint
            return
        if isinstance(view, PagedTable):
            view.reload()

    # ---- actions -----------------------------------------------------------------------------

    def action_drain(self) -> None:
        view = self.selected_view()
        if view is None or not view.up:
            self.notify("no connected server selected", severity="warning")
            return
        if view.is_supervisor:
            host = next(host for host in self.model.hosts() if host.supervisor is view)
            total = host.total()
            connections = total.connections if total is not None else 0
            question = (
                f"Drain every worker of {host.label} ({view.path.name}, {connections:,}"
                " connections)?\nEach worker tells its clients to reconnect elsewhere and"
                " stops, as on SIGTERM to the supervisor."
            )
        else:
            connections = view.snapshot.connections if view.snapshot is not None else 0
            question = (
                f"Drain {view.label} ({view.path.name}, {connections:,} connections)?\n"
                "Every client is told to reconnect elsewhere and the server stops taking new"
                " connections, as on SIGTERM."
            )
        key = view.key

        def decided(yes: bool | None) -> None:
            if yes:
                self._drain(key)

        self.push_screen(ConfirmScreen(question, "Drain"), decided)

    @work(group="action")
    async def _drain(self, key: str) -> None:
        client = self.clients.get(key)
        label = self.model.servers[key].label if key in self.model.servers else key
        if client is None:
            self.post_message(ActionOutcome(f"drain {label}: no longer attached", error=True))
            return
        try:
            draining = await client.request(Drain(), Draining)
        except (NotConnected, RequestFailed) as exc:
            self.post_message(ActionOutcome(f"drain {label} failed: {exc}", error=True))
        else:
            view = self.model.servers.get(key)
            if view is not None and view.is_supervisor:
                text = f"{label}: every worker is draining"
            else:
                text = (
                    f"{label} is draining: {draining.connections:,} connections told to"
                    f" reconnect, closing within {draining.timeout:g} s"
                )
            self.post_message(ActionOutcome(text))

    def action_reload(self) -> None:
        view = self.selected_view()
        if view is None or not view.up:
            self.notify("no connected server selected", severity="warning")
            return
        live = [other.key for other in self.model.live()]
        question = (
            f"Reload the configuration of {view.label} ({view.path.name})"
            + (f", or of all {len(live)} servers" if len(live) > 1 else "")
            + "?\nAs on SIGHUP: what can change while running applies at once; what cannot is"
            " listed as needing a restart. A file with errors changes nothing."
        )
        key = view.key

        def decided(scope: ReloadScope | None) -> None:
            if scope is not None:
                keys = live if scope == "all" else [key]
                for each in keys:
                    self._reload(each)

        self.push_screen(ReloadScreen(question, view.label, len(live)), decided)

    @work(group="action")
    async def _reload(self, key: str) -> None:
        client = self.clients.get(key)
        label = self.model.servers[key].label if key in self.model.servers else key
        if client is None:
            self.post_message(ActionOutcome(f"reload {label}: no longer attached", error=True))
            return
        try:
            reloaded = await client.request(Reload(), Reloaded)
        except (NotConnected, RequestFailed) as exc:
            # Kept in the log as well: the notification goes, the problems are worth reading.
            self._log_note(label, "reload_failed", {"error": str(exc)})
            self.post_message(ActionOutcome(f"reload {label} failed: {exc}", error=True))
            return
        changed = ", ".join(reloaded.changed) or "nothing"
        text = f"{label} reloaded: changed {changed}"
        if reloaded.restart_required:
            text += f"; needs a restart: {', '.join(reloaded.restart_required)}"
        # The server's own reload event says it in every console's log.
        self.post_message(ActionOutcome(text))

    def _log_note(
        self, server: str, kind: str, detail: dict[str, str | int | float | bool | None]
    ) -> None:
        logged = self.model.note(server, kind, detail, time.time())
        if not self.paused:
            self._fresh.append(logged)
        self._dirty = True

    # ---- older events ------------------------------------------------------------------------

    @on(EventLog.OlderWanted)
    def _older_wanted(self, _: EventLog.OlderWanted) -> None:
        self._load_older()

    @work(group="older", exclusive=True)
    async def _load_older(self) -> None:
        """Ask each server that may have older events for a page before the oldest of its
        events in the log, and put them at the top, as many as the log has room for."""
        model = self.model
        asked = [
            key
            for key, view in model.servers.items()
            if key in self.clients
            and view.up
            and not view.is_supervisor
            and view.pages_events
            and not view.events_start
        ]
        limit = min(OLDER_PAGE, model.room)
        results = await asyncio.gather(*(self._older_page(key, limit) for key in asked))
        entries = model.add_older({key: page for key, page in results if page is not None})
        note = self._older_outcome(len(entries))
        if not self._shutting_down():
            self.query_one(EventLog).show_older(entries, note)
        self.report(note)

    async def _older_page(self, key: str, limit: int) -> tuple[str, EventPage | None]:
        client, view = self.clients.get(key), self.model.servers.get(key)
        if client is None or view is None or limit <= 0:
            return key, None
        try:
            return key, await client.request(ListEvents(view.oldest_seq, limit), EventPage)
        except RequestFailed as exc:
            if exc.code == ErrorCode.UNKNOWN_COMMAND:
                view.pages_events = False
            else:
                self.report(f"older events of {view.label}: {exc}", error=True)
        except NotConnected:
            pass
        return key, None

    def _older_outcome(self, added: int) -> str:
        """What a ``[`` found, in a line: how many, and why not more."""
        model = self.model
        views = [view for view in model.servers.values() if not view.is_supervisor]
        parts = [f"{added:,} older event{'s' if added != 1 else ''}"] if added else []
        if model.room <= 0:
            parts.append(f"the log is full ({EVENTS:,} lines): no room for older events")
        paging = [view for view in views if view.pages_events]
        if paging and all(view.events_start for view in paging):
            kept = max(view.events_kept for view in paging)
            whose = "the server keeps" if len(paging) == 1 else "each server keeps"
            parts.append(f"no older events: {whose} the last {kept:,}")
        old = [view.label for view in views if not view.pages_events]
        if old:
            parts.append(f"{', '.join(old)}: an older server, no events to page back")
        return "; ".join(parts) or "no older events"

    # ---- pause -------------------------------------------------------------------------------

    def check_action(
        self,
        action: str,
        parameters: tuple[object, ...],  # noqa: ARG002 (Textual's signature)
    ) -> bool | None:
        if action == "pause":
            return not self.paused
        if action == "resume":
            return self.paused
        return True

    def action_pause(self) -> None:
        self.paused = True
        self._missed = 0
        self._fresh = []
        self._dirty = True
        self.refresh_bindings()
        self.paint()

    def action_resume(self) -> None:
        self.paused = False
        self._fresh = []
        self.refresh_bindings()
        self.query_one(EventLog).refill()
        self._dirty = True
        self.paint()
        self._refresh_table()
        missed = self._missed
        self.report(f"resumed: {missed:,} event{'s' if missed != 1 else ''} arrived while paused")

    def action_help(self) -> None:
        titles = [command.title for command in COMMANDS]
        self.push_screen(HelpScreen(help_sections(self.BINDINGS), self.grafana_url, titles))


def _option(view: ServerView) -> str:
    identity = view.identity
    if identity is None:
        return view.path.name
    if view.is_supervisor:
        return f"supervisor (pid {identity.pid})"
    if identity.worker is not None:
        return f"{identity.instance} w{identity.worker} (pid {identity.pid})"
    return f"{identity.instance} (pid {identity.pid})"


def _file_identity(path: Path) -> FileIdentity | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino, info.st_mtime_ns
