"""The selected server's channels: subscribers, publication rate, position, history held."""

from __future__ import annotations

from collections.abc import Callable

from odin_fanout.console import format
from odin_fanout.console.client import ControlClient
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
    def __init__(
        self, client: Callable[[], tuple[str, ControlClient] | None], *, id: str | None = None
    ) -> None:
        super().__init__(COLUMNS, sort="subscribers", client=client, noun="channels", id=id)

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
