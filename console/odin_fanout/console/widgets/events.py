"""The event log of every attached server, newest at the bottom, with a filter.

A group of repeats (see ``odin_fanout.console.model``) is one row, changed in place as it
counts: its times from first to last, its count and the last one's details.

``[`` asks for older events (``OlderWanted``: the app pages back through each server's ring);
they come in at the top, the cursor on the newest of them."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import DataTable, Input, Static

from odin_fanout.console import format
from odin_fanout.console.model import ConsoleModel, LoggedEvent
from odin_fanout.console.widgets.cursor import CursorTable

STYLES = {
    "conn_close": "yellow",
    "slow_consumer": "red",
    "rate_limited": "magenta",
    "kick": "bold red",
    "drain": "bold red",
    "events_dropped": "red",
    "recover": "cyan",
    "conn_open": "green",
    "reload": "bold yellow",
    "reload_failed": "bold red",
    "server_gone": "bold red",
}


class EventLog(Vertical):
    class OlderWanted(Message):
        """The operator asks for the events before the oldest in the log."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("slash", "filter", "Filter"),
        Binding("left_square_bracket", "older", "Older events"),
        Binding("escape", "leave_filter", "Back to the table", show=False),
    ]

    def __init__(self, model: ConsoleModel, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.model = model
        self.filter_text = ""
        self.shown: list[LoggedEvent] = []
        self._rows: set[int] = set()
        """The numbers of the entries shown (row keys)."""
        self.older_note = ""
        """What the last ``[`` found (shown in the status line)."""

    def compose(self) -> ComposeResult:
        yield Input(placeholder="filter events: kind, connection or details (/)", classes="filter")
        yield Static("", classes="table-status")
        table = CursorTable(cursor_type="row", zebra_stripes=True)
        table.add_column("time", key="time")
        table.add_column("server", key="server")
        table.add_column("kind", key="kind")
        table.add_column("connection", key="conn")
        table.add_column("details", key="details")
        yield table

    def on_mount(self) -> None:
        self.refill()

    @property
    def table(self) -> DataTable[str | Text]:
        return self.query_one(DataTable)

    def focus_table(self) -> None:
        self.table.focus()

    def append(self, events: list[LoggedEvent]) -> None:
        """Add the new entries that pass the filter and change the rows of groups that counted
        more, dropping the oldest beyond the model's bound."""
        fresh: list[LoggedEvent] = []
        for logged in dict.fromkeys(events):  # a group may come several times
            shown = logged.number in self._rows
            if shown != logged.matches(self.filter_text) and logged.number < self._next():
                # A group whose new details enter or leave the filter: its row is not at the
                # end, so the whole view is rebuilt (at most the model's thousand entries).
                self.refill()
                return
            if shown:
                self._change(logged)
            elif logged.matches(self.filter_text):
                fresh.append(logged)
        if not fresh:
            self.table.check_idle()
            return
        table = self.table
        following = not table.has_focus or table.cursor_row >= table.row_count - 1
        for event in fresh:
            self._add(event)
        limit = self.model.events.maxlen or len(self.shown)
        while len(self.shown) > limit:
            oldest = self.shown.pop(0)
            self._rows.discard(oldest.number)
            table.remove_row(str(oldest.number))
        if following:
            table.move_cursor(row=table.row_count - 1, animate=False)
            table.scroll_end(animate=False)
        table.check_idle()  # sizes the columns to the new rows (see PagedTable._fill)
        self._show_status()

    def refill(self) -> None:
        table = self.table
        table.clear()
        self.shown = []
        self._rows = set()
        for event in self.model.events_matching(self.filter_text):
            self._add(event)
        if self.shown:
            table.move_cursor(row=table.row_count - 1, animate=False)
            table.scroll_end(animate=False)
        table.check_idle()
        self._show_status()

    def show_older(self, entries: list[LoggedEvent], note: str) -> None:
        """Show the log with ``entries`` (just put at its top) and the cursor on the newest
        of them that passes the filter: up, or ``[`` again, goes on back."""
        self.older_note = note
        self.refill()
        shown = [logged for logged in entries if logged.number in self._rows]
        if shown:
            table = self.table
            table.move_cursor(row=table.get_row_index(str(shown[-1].number)), animate=False)

    def _next(self) -> int:
        """The number after the newest shown: a smaller one is an entry seen before."""
        return self.shown[-1].number + 1 if self.shown else 0

    def _add(self, logged: LoggedEvent) -> None:
        event = logged.event
        style = STYLES.get(event.kind, "")
        self.table.add_row(
            format.span(logged.first_time, event.time),
            logged.server,
            Text(event.kind, style=style),
            event.conn,
            logged.details,
            key=str(logged.number),
        )
        self.shown.append(logged)
        self._rows.add(logged.number)

    def _change(self, logged: LoggedEvent) -> None:
        key = str(logged.number)
        table = self.table
        time = format.span(logged.first_time, logged.event.time)
        table.update_cell(key, "time", time, update_width=True)
        table.update_cell(key, "details", logged.details, update_width=True)

    def _show_status(self) -> None:
        total = len(self.model.events)
        status = f"{len(self.shown):,} of {total:,} events"
        if self.filter_text:
            status += f"  ·  filter {self.filter_text!r}"
        status += f"  ·  {self.older_note or '[ older events'}"
        self.query_one(".table-status", Static).update(Text(status))

    @on(Input.Changed, ".filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        event.stop()
        # Local and cheap (at most a thousand events): no need to wait for the typing to stop.
        self.filter_text = event.value.strip()
        self.refill()

    @on(Input.Submitted, ".filter")
    def _filter_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.focus_table()

    def action_filter(self) -> None:
        self.query_one(Input).focus()

    def action_older(self) -> None:
        self.post_message(self.OlderWanted())

    def action_leave_filter(self) -> None:
        self.focus_table()
