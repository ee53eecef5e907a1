"""The console's first line: what an operator must see from every view, at any width.

Servers up, connections and messages per second over every server, the workers of a host
that are not up (restarting, say), DRAINING and PAUSED when so. It is always live, paused or
not (pausing freezes the views, not the link). At 80 columns everything fits; narrower, the
title goes first, then the long words.
"""

from __future__ import annotations

from rich.text import Text
from textual.events import Resize
from textual.widgets import Static

from odin_fanout.console import format
from odin_fanout.console.model import ConsoleModel

TITLE = "Odin console"
SEPARATOR = " · "


def facts(model: ConsoleModel, paused: bool, *, short: bool = False) -> list[Text]:
    """The header's parts, most important first; ``short``: the narrow words."""
    live, attached = len(model.live()), len(model.processes())
    if attached:
        servers = f"{live}/{attached} up" if short else f"{live}/{attached} servers up"
    else:
        servers = "no server"
    parts = [Text(servers, style="" if live == attached and attached else "bold red")]
    missing = sum(host.expected - host.up for host in model.hosts())
    if missing > 0:
        words = "down" if short else f"worker{'s' if missing > 1 else ''} not up"
        parts.append(Text(f"{missing} {words}", style="bold red"))
    total = model.total()
    if total is not None:
        connections = format.count(total.connections)
        parts.append(Text(f"{connections} {'conns' if short else 'connections'}"))
        rate_in, rate_out = format.compact(total.in_per_s), format.compact(total.out_per_s)
        parts.append(Text(f"in {rate_in}/s  out {rate_out}/s"))
        if total.draining:
            parts.append(Text("DRAINING", style="bold red"))
    if paused:
        parts.append(Text("PAUSED", style="bold reverse"))
    return parts


class StatusLine(Static):
    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("", id=id)
        self._choices: list[Text] = []

    def show(self, model: ConsoleModel, paused: bool) -> None:
        separator = Text(SEPARATOR)
        long = separator.join(facts(model, paused))
        short = separator.join(facts(model, paused, short=True))
        titled = Text.assemble((TITLE, "bold"), SEPARATOR, long)
        self._choices = [titled, long, short]
        self._fit()

    def on_resize(self, _: Resize) -> None:
        self._fit()

    def _fit(self) -> None:
        if not self._choices:
            return
        room = (self.size.width or 80) - 2  # a space each side
        line = next((t for t in self._choices if t.cell_len <= room), self._choices[-1])
        self.update(Text.assemble(" ", line))
