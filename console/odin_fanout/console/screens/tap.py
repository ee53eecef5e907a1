"""A connection's or a channel's frames, live, as the servers' ``tap`` sends them: ``t`` on the
connections table (the server that has the connection) or on the channels table (every worker
of the selected server's host: each serves its own clients, and their lines are merged, each
named by its connection, whose id starts with its server's instance). The log keeps the last
``MAX_LINES``; closing the screen stops the taps."""

from __future__ import annotations

import functools
from typing import ClassVar, Final

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import RichLog, Static
from textual.worker import Worker

from odin_fanout.console.client import ControlClient, NotConnected, RequestFailed
from odin_fanout.control.protocol import Tap, TapLine
from odin_fanout.control.text import tap_text

MAX_LINES: Final = 1000
RATE: Final = 20
"""Frames a second the console asks each server for: what a person can read; the rest is
counted."""


class TapScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,t", "close", "Stop the tap")]

    def __init__(self, clients: list[ControlClient], *, conn: str = "", channel: str = "") -> None:
        super().__init__()
        self.clients = clients
        self.command = Tap(conn=conn, channel=channel, rate=RATE)
        self.numbers: dict[ControlClient, int] = {}
        """Each server's tap number from its reply: lines of any other are not ours."""
        self._early: dict[ControlClient, list[TapLine]] = {client: [] for client in clients}
        """Lines read before a reply reached us (the reply comes first, but its waiter
        resumes later), at most MAX_LINES a server."""

    @property
    def what(self) -> str:
        return self.command.conn or self.command.channel

    def compose(self) -> ComposeResult:
        servers = len(self.clients)
        where = f" on {servers} servers" if servers > 1 else ""
        with Vertical(classes="dialog help"):
            yield Static(f"[b]tap {self.what}[/b]{where}  (esc stops)", id="tap-title")
            yield RichLog(id="tap-log", max_lines=MAX_LINES, wrap=True, markup=False)

    def on_mount(self) -> None:
        for client in self.clients:
            self._start(client)

    def _start(self, client: ControlClient) -> Worker[None]:
        # The coroutine is made when the worker runs: one cancelled first leaves none behind.
        return self.run_worker(functools.partial(self._tap, client), group="tap")

    async def _tap(self, client: ControlClient) -> None:
        log = self.query_one(RichLog)
        try:
            started = await client.tap(self.command, lambda line: self._line(client, line))
        except (NotConnected, RequestFailed) as exc:
            log.write(f"tap {self.what} on {client.path.name} failed: {exc}")
            return
        self.numbers[client] = started.tap
        early, self._early[client] = self._early[client], []
        for line in early:
            self._line(client, line)

    def _line(self, client: ControlClient, line: TapLine) -> None:
        number = self.numbers.get(client)
        if number is None:
            if len(self._early[client]) < MAX_LINES:
                self._early[client].append(line)
        elif line.tap == number:
            # A channel's frames come from many connections: each line names its own.
            self.query_one(RichLog).write(tap_text(line, conn=bool(self.command.channel)))

    async def action_close(self) -> None:
        for client in self.clients:
            await client.untap()
        self.dismiss()
