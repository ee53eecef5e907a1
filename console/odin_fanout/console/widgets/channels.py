"""The selected server's channels: subscribers, publication rate, position, history held;
tapped from here (on every worker of the server's host)."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from textual.binding import Binding, BindingType

from odin_fanout.console import format
from odin_fanout.console.client import ControlClient
from odin_fanout.console.screens.tap import TapScreen
from odin_fanout.console.widgets.tables import PAGE_SIZE, Column, PagedTable, Query
from odin_fanout.control.protocol import ChannelInfo, ListChannels, Page

COLUMNS: list[Column[ChannelInfo]] = [
    Column("name", "name", lambda c: c.name, sort="name", numeric=False),
    Column("subscribers", "subscribers", lambda c: format.count(c.subscribers), sort="subscribers"),
    Column("rate", "rate/s", lambda c: format.rate(c.rate), sort="rate"),
    Column("last_seq", "last seq", lambda c: format.count(c.last_seq), sort="last_seq"),
    Column("retained", "retained", lambda c: format.count(c.retained), sort="retained"),
]


class ChannelsView(PagedTable[ChannelInfo]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("t", "tap", "Tap")]

    def __init__(
        self,
        client: Callable[[], tuple[str, ControlClient] | None],
        tap_clients: Callable[[], list[ControlClient]],
        *,
        id: str | None = None,
    ) -> None:
        super().__init__(COLUMNS, sort="subscribers", client=client, noun="channels", id=id)
        self._tap_clients = tap_clients

    async def fetch(self, client: ControlClient, query: Query) -> Page[ChannelInfo]:
        command = ListChannels(
            offset=query.offset,
            limit=PAGE_SIZE,
            sort=query.sort,
            descending=query.descending,
            filter=query.filter,
        )
        return await client.request(command, Page[ChannelInfo])

    def row_key(self, item: ChannelInfo) -> str:
        return item.name

    def action_tap(self) -> None:
        chosen = self.selected()
        clients = self._tap_clients()
        if chosen is None or not clients:
            self.notify("no channel selected", severity="warning")
            return
        self.app.push_screen(TapScreen(clients, channel=chosen.name))
