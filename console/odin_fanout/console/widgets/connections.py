"""The selected server's connections: sortable, filterable, inspected, tapped and kicked from
here."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from textual import on, work
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.widgets import DataTable

from odin_fanout.console import format
from odin_fanout.console.client import ControlClient, NotConnected, RequestFailed
from odin_fanout.console.messages import ActionOutcome
from odin_fanout.console.screens.confirm import KickChoice, KickScreen
from odin_fanout.console.screens.detail import DetailScreen
from odin_fanout.console.screens.tap import TapScreen
from odin_fanout.console.widgets.tables import PAGE_SIZE, Column, PagedTable, Query
from odin_fanout.control.protocol import (
    ConnectionDetail,
    ConnectionInfo,
    Inspect,
    Kick,
    Kicked,
    ListConnections,
    Page,
)

COLUMNS: list[Column[ConnectionInfo]] = [
    Column("id", "id", lambda c: c.id, sort="id", numeric=False),
    Column("peer", "peer", lambda c: c.peer, numeric=False),
    Column("user", "user", lambda c: c.user or "-", numeric=False),
    Column(
        "channels",
        "channels",
        lambda c: format.channels(c.channels),
        sort="channels",
        numeric=False,
    ),
    Column("queued", "queued", lambda c: format.count(c.queued), sort="queue"),
    Column("queue_age", "oldest queued", lambda c: format.age(c.queued_age), sort="queue_age"),
    Column("sent", "sent", lambda c: format.count(c.sent), sort="sent"),
    Column("dropped", "dropped", lambda c: format.count(c.dropped), sort="dropped"),
    Column("age", "age", lambda c: format.duration(c.age), sort="age"),
]


class ConnectionsView(PagedTable[ConnectionInfo]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("i", "inspect", "Inspect"),
        # K, not k: k moves the cursor up (as in k9s). Asks first, as R does.
        Binding("K", "kick", "Kick", key_display="K"),
        Binding("t", "tap", "Tap"),
    ]

    def __init__(
        self,
        client: Callable[[], tuple[str, ControlClient] | None],
        server_label: Callable[[], str],
        *,
        id: str | None = None,
    ) -> None:
        super().__init__(COLUMNS, sort="queue", client=client, noun="connections", id=id)
        self._server_label = server_label

    async def fetch(self, client: ControlClient, query: Query) -> Page[ConnectionInfo]:
        command = ListConnections(
            offset=query.offset,
            limit=PAGE_SIZE,
            sort=query.sort,
            descending=query.descending,
            filter=query.filter,
        )
        return await client.request(command, Page[ConnectionInfo])

    def row_key(self, item: ConnectionInfo) -> str:
        return item.id

    @on(DataTable.RowSelected)
    def _row_chosen(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_inspect()

    def action_inspect(self) -> None:
        chosen = self.selected()
        if chosen is not None:
            self._inspect(chosen.id)

    @work(group="inspect", exclusive=True)
    async def _inspect(self, conn: str) -> None:
        chosen = self._client()
        if chosen is None:
            return
        try:
            detail = await chosen[1].request(Inspect(conn), ConnectionDetail)
        except (NotConnected, RequestFailed) as exc:
            self.post_message(ActionOutcome(f"inspect {conn} failed: {exc}", error=True))
        else:
            self.post_message(self.Inspected(detail))

    class Inspected(Message):
        def __init__(self, detail: ConnectionDetail) -> None:
            super().__init__()
            self.detail = detail

    @on(Inspected)
    def _inspected(self, message: ConnectionsView.Inspected) -> None:
        message.stop()
        self.app.push_screen(DetailScreen(message.detail))

    def action_kick(self) -> None:
        chosen = self.selected()
        if chosen is None:
            self.notify("no connection selected", severity="warning")
            return
        conn = chosen.id

        def decided(choice: KickChoice | None) -> None:
            if choice is not None:
                self._kick(conn, choice)

        self.app.push_screen(KickScreen(conn, chosen.peer, self._server_label()), decided)

    @work(group="action")
    async def _kick(self, conn: str, choice: KickChoice) -> None:
        chosen = self._client()
        if chosen is None:
            self.post_message(ActionOutcome(f"kick {conn}: no server selected", error=True))
            return
        try:
            kicked = await chosen[1].request(Kick(conn, choice.code, choice.reason), Kicked)
        except (NotConnected, RequestFailed) as exc:
            self.post_message(ActionOutcome(f"kick {conn} failed: {exc}", error=True))
        else:
            self.post_message(ActionOutcome(f"kicked {kicked.conn} (close code {kicked.code})"))
            self.reload()

    def action_tap(self) -> None:
        chosen = self.selected()
        client = self._client()
        if chosen is None or client is None:
            self.notify("no connection selected", severity="warning")
            return
        self.app.push_screen(TapScreen([client[1]], conn=chosen.id))
