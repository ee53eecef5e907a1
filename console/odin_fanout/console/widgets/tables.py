"""A table that the server sorts, filters and pages: the base of the connections and channels
views.

The sort key, its direction and the filter go to the server with each request; the table
shows the page that comes back, nothing more. A worker fetches (the newest request cancels an
older one still waiting) and posts the page back as a message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

import attrs
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.message import Message
from textual.timer import Timer
from textual.widgets import DataTable, Input, Static

from odin_fanout.console.client import ControlClient, NotConnected, RequestFailed
from odin_fanout.console.widgets.cursor import CursorTable
from odin_fanout.control.protocol import Page

T = TypeVar("T")

PAGE_SIZE = 200
FILTER_DELAY = 0.3
"""Seconds of quiet typing before the filter goes to the server."""


@attrs.frozen
class Column(Generic[T]):
    key: str
    label: str
    cell: Callable[[T], str]
    sort: str | None = None
    """The server's sort key for this column; None: not sortable."""
    numeric: bool = True
    """Right-aligned, and sorted largest first."""


@attrs.frozen
class Query:
    server: str
    sort: str
    descending: bool
    filter: str
    offset: int


class PagedTable(Vertical, Generic[T]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("o", "cycle_sort", "Sort"),
        Binding("r", "reverse", "Reverse"),
        Binding("slash", "filter", "Filter"),
        Binding("left_square_bracket", "page(-1)", "Prev page"),
        Binding("right_square_bracket", "page(1)", "Next page"),
        Binding("escape", "leave_filter", "Back to the table", show=False),
    ]

    class Fetched(Message):
        def __init__(self, query: Query, page: Page[Any] | None, problem: str) -> None:
            super().__init__()
            self.query = query
            self.page = page
            self.problem = problem

    def __init__(
        self,
        columns: list[Column[T]],
        *,
        sort: str,
        client: Callable[[], tuple[str, ControlClient] | None],
        noun: str,
        id: str | None = None,
    ) -> None:
        super().__init__(id=id)
        self.columns = columns
        self.sort_key = sort
        self.sort_descending = self._column_for(sort).numeric
        self.filter_text = ""
        self.page_offset = 0
        self.total = 0
        self.problem = ""
        self.items: list[T] = []
        self._client = client
        self._noun = noun
        self._filter_timer: Timer | None = None

    # ---- what subclasses say -----------------------------------------------------------------

    async def fetch(self, client: ControlClient, query: Query) -> Page[T]:
        raise NotImplementedError

    def row_key(self, item: T) -> str:
        raise NotImplementedError

    # ---- layout ------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Input(placeholder=f"filter {self._noun} (/)", classes="filter")
        yield Static("", classes="table-status")
        yield CursorTable(cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        self._set_columns()
        self._show_status()

    @property
    def table(self) -> DataTable[str | Text]:
        return self.query_one(DataTable)

    def selected(self) -> T | None:
        """The item under the cursor."""
        table = self.table
        if not table.row_count or not 0 <= table.cursor_row < len(self.items):
            return None
        return self.items[table.cursor_row]

    def focus_table(self) -> None:
        self.table.focus()

    # ---- fetching ----------------------------------------------------------------------------

    def _query(self) -> Query:
        chosen = self._client()
        server = chosen[0] if chosen else ""
        return Query(
            server, self.sort_key, self.sort_descending, self.filter_text, self.page_offset
        )

    def reload(self) -> None:
        """Fetch the page for the current server, sort and filter."""
        self._load(self._query(), self._client())

    def reset(self) -> None:
        """Another server: forget this one's rows; its first page comes with the next reload."""
        self.page_offset = 0
        self.items = []
        self.total = 0
        self.problem = ""
        self.table.clear()
        self._show_status()

    # A worker made by ``@work`` creates its coroutine when it starts: a fetch replaced
    # before then (``exclusive``) leaves no coroutine never awaited behind, as
    # ``run_worker(self._load(...))`` did.
    @work(group="fetch", exclusive=True)
    async def _load(self, query: Query, chosen: tuple[str, ControlClient] | None) -> None:
        if chosen is None:
            self.post_message(self.Fetched(query, None, "no server selected"))
            return
        try:
            page = await self.fetch(chosen[1], query)
        except (NotConnected, RequestFailed) as exc:
            self.post_message(self.Fetched(query, None, str(exc)))
        else:
            self.post_message(self.Fetched(query, page, ""))

    @on(Fetched)
    def _fetched(self, message: PagedTable.Fetched) -> None:
        message.stop()
        if message.query != self._query():
            return  # an answer to a question no longer asked
        self.problem = message.problem
        if message.page is not None:
            self._fill(message.page)
        self._show_status()

    def _fill(self, page: Page[T]) -> None:
        table = self.table
        keep = self.selected()
        keep_key = self.row_key(keep) if keep is not None else None
        cursor = table.cursor_row
        self.items = list(page.items)
        self.total = page.total
        table.clear()
        for item in self.items:
            table.add_row(
                *[self._cell(column, item) for column in self.columns], key=self.row_key(item)
            )
        # The table sizes its columns to new rows when idle; without a message of its own to
        # handle (a cursor already on row 0 sends none) that would wait for the next key.
        table.check_idle()
        if not self.items:
            return
        keys = [self.row_key(item) for item in self.items]
        row = keys.index(keep_key) if keep_key in keys else min(max(cursor, 0), len(keys) - 1)
        table.move_cursor(row=row, animate=False)

    def _cell(self, column: Column[T], item: T) -> str | Text:
        text = column.cell(item)
        return Text(text, justify="right") if column.numeric else text

    # ---- sorting, filtering, paging ----------------------------------------------------------

    def _column_for(self, sort: str) -> Column[T]:
        return next(column for column in self.columns if column.sort == sort)

    def _set_columns(self) -> None:
        table = self.table
        table.clear(columns=True)
        for column in self.columns:
            label = column.label
            if column.sort == self.sort_key:
                label = f"{label} {'▼' if self.sort_descending else '▲'}"
            table.add_column(
                Text(label, justify="right") if column.numeric else label, key=column.key
            )

    def sort_by(self, sort: str, descending: bool) -> None:
        self.sort_key, self.sort_descending, self.page_offset = sort, descending, 0
        self._set_columns()
        self._show_status()
        self.reload()

    def action_cycle_sort(self) -> None:
        sorts = [column.sort for column in self.columns if column.sort is not None]
        following = sorts[(sorts.index(self.sort_key) + 1) % len(sorts)]
        self.sort_by(following, self._column_for(following).numeric)

    def action_reverse(self) -> None:
        self.sort_by(self.sort_key, not self.sort_descending)

    @on(DataTable.HeaderSelected)
    def _header_clicked(self, event: DataTable.HeaderSelected) -> None:
        event.stop()
        column = next(c for c in self.columns if c.key == event.column_key.value)
        if column.sort is None:
            self.notify(f"the server does not sort by {column.label}", severity="warning")
        elif column.sort == self.sort_key:
            self.action_reverse()
        else:
            self.sort_by(column.sort, column.numeric)

    def action_filter(self) -> None:
        self.query_one(Input).focus()

    def action_leave_filter(self) -> None:
        self.focus_table()

    def action_page(self, step: int) -> None:
        offset = self.page_offset + step * PAGE_SIZE
        if offset < 0 or (step > 0 and offset >= self.total):
            return
        self.page_offset = offset
        self.reload()

    @on(Input.Changed, ".filter")
    def _filter_typed(self, event: Input.Changed) -> None:
        event.stop()
        if self._filter_timer is not None:
            self._filter_timer.stop()
        self._filter_timer = self.set_timer(FILTER_DELAY, self._apply_filter)

    @on(Input.Submitted, ".filter")
    def _filter_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._apply_filter()
        self.focus_table()

    def _apply_filter(self) -> None:
        if self._filter_timer is not None:
            self._filter_timer.stop()
            self._filter_timer = None
        # The protocol takes at most 200 bytes of filter.
        text = self.query_one(Input).value.strip().encode()[:200].decode(errors="ignore")
        if text != self.filter_text:
            self.filter_text, self.page_offset = text, 0
            self._show_status()
            self.reload()

    def _show_status(self) -> None:
        column = self._column_for(self.sort_key)
        parts = []
        if self.total:
            last = self.page_offset + len(self.items)
            parts.append(f"{self.page_offset + 1}-{last} of {self.total:,} {self._noun}")
        else:
            parts.append(f"no {self._noun}")
        parts.append(f"sorted by {column.label} {'▼' if self.sort_descending else '▲'}")
        if self.filter_text:
            parts.append(f"filter {self.filter_text!r}")
        if self.total > PAGE_SIZE:
            parts.append("[ and ] turn pages")
        status = Text("  ·  ".join(parts))
        if self.problem:
            status.append(f"  ·  {self.problem}", style="red")
        self.query_one(".table-status", Static).update(status)
