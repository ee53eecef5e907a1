"""One connection in full, as ``inspect`` answers: enter or ``i`` on the connections table."""

from __future__ import annotations

from typing import ClassVar

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from odin_fanout.console import format
from odin_fanout.control.protocol import ConnectionDetail


def detail_rows(detail: ConnectionDetail) -> list[tuple[str, str]]:
    conn = detail.connection
    return [
        ("id", conn.id),
        ("peer", conn.peer),
        ("user", conn.user or "-"),
        ("origin", detail.origin or "-"),
        ("age", format.duration(conn.age)),
        ("channels", ", ".join(conn.channels) or "-"),
        ("subscriptions", format.count(detail.subscriptions)),
        ("recovering", ", ".join(detail.recovering) or "-"),
        ("queued", f"{format.count(conn.queued)} frames, {format.nbytes(detail.queued_bytes)}"),
        ("oldest queued", format.age(conn.queued_age)),
        ("sent", format.count(conn.sent)),
        ("dropped", format.count(conn.dropped)),
        ("rate-limited", format.count(conn.rate_limited)),
        ("closing", "yes" if conn.closing else "no"),
    ]


class DetailScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,enter,i", "dismiss", "Close")]

    def __init__(self, detail: ConnectionDetail) -> None:
        super().__init__()
        self.detail = detail

    def compose(self) -> ComposeResult:
        table = Table(box=None, show_header=False, expand=True)
        table.add_column(style="dim", no_wrap=True)
        table.add_column(overflow="fold")
        for label, value in detail_rows(self.detail):
            table.add_row(label, value)
        with VerticalScroll(classes="dialog help"):
            yield Static(f"[b]connection {self.detail.connection.id}[/b]  (esc closes)")
            yield Static(table, id="detail")
