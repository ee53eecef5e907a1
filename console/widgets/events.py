"""The event log of every attached server, newest at the bottom, with a filter."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.widgets import DataTable, Input, Static

from console import format
from console.model import ConsoleModel, LoggedEvent

STYLES = {
    "conn_close": "yellow",
    "slow_consumer": "red",
    "rate_limited": "magenta",
    "kick": "bold red",
    "drain": "bold red",
    "events_dropped": "red",
    "recover": "cyan",
    "conn_open": "green",
}


class EventLog(Vertical):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("slash", "filter", "Filter"),
        Binding("escape", "leave_filter", "Back to the table", show=False),
    ]

    def __init__(self, model: ConsoleModel, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.model = model
        self.filter_text = ""
        self.shown: list[LoggedEvent] = []

    def compose(self) -> ComposeResult:
        yield Input(placeholder="filter events: kind, connection or details (/)", classes="filter")
        yield Static("", classes="table-status")
        table: DataTable[str | Text] = DataTable(cursor_type="row", zebra_stripes=True)
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
        """Add the events that pass the filter, dropping the oldest beyond the model's bound."""
        fresh = [event for event in events if event.matches(self.filter_text)]
        if not fresh:
            return
        table = self.table
        following = not table.has_focus or table.cursor_row >= table.row_count - 1
        for event in fresh:
            self._add(event)
        limit = self.model.events.maxlen or len(self.shown)
        while len(self.shown) > limit:
            table.remove_row(str(self.shown.pop(0).number))
        if following:
            table.move_cursor(row=table.row_count - 1, animate=False)
            table.scroll_end(animate=False)
        table.check_idle()  # sizes the columns to the new rows (see PagedTable._fill)
        self._show_status()

    def refill(self) -> None:
        table = self.table
        table.clear()
        self.shown = []
        for event in self.model.events_matching(self.filter_text):
            self._add(event)
        if self.shown:
            table.move_cursor(row=table.row_count - 1, animate=False)
            table.scroll_end(animate=False)
        table.check_idle()
        self._show_status()

    def _add(self, logged: LoggedEvent) -> None:
        event = logged.event
        style = STYLES.get(event.kind, "")
        self.table.add_row(
            format.clock(event.time),
            logged.server,
            Text(event.kind, style=style),
            event.conn,
            logged.details,
            key=str(logged.number),
        )
        self.shown.append(logged)

    def _show_status(self) -> None:
        total = len(self.model.events)
        status = f"{len(self.shown):,} of {total:,} events"
        if self.filter_text:
            status += f"  ·  filter {self.filter_text!r}"
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

    def action_leave_filter(self) -> None:
        self.focus_table()
