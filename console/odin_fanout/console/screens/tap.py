"""A connection's frames, live, as the server's ``tap`` sends them: ``t`` on the connections
table. The log keeps the last ``MAX_LINES``; closing the screen stops the tap."""

from __future__ import annotations

import time
from typing import ClassVar, Final

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import RichLog, Static

from odin_fanout.console.client import ControlClient, NotConnected, RequestFailed
from odin_fanout.control.protocol import Tap, TapLine

MAX_LINES: Final = 1000
RATE: Final = 20
"""Frames a second the console asks for: what a person can read; the rest is counted."""


def tap_text(line: TapLine) -> str:
    """One line as the log shows it: time, position, skipped count, the frame's text."""
    stamp = time.strftime("%H:%M:%S", time.localtime(line.time))
    stamp += f".{int(line.time * 1000) % 1000:03d}"
    skipped = f" (skipped {line.skipped})" if line.skipped else ""
    if line.closed is not None:
        closed = line.closed
        return f"{stamp}{skipped} closed {closed.code} {closed.reason!r} ({closed.why})"
    where = f" {line.channel}" if line.channel else ""
    if line.seq:
        where += f"#{line.seq}"
    cut = f" [cut at {len(line.text)} of {line.bytes} bytes]" if line.truncated else ""
    return f"{stamp}{where}{skipped} {line.text}{cut}"


class TapScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,t", "close", "Stop the tap")]

    def __init__(self, client: ControlClient, conn: str) -> None:
        super().__init__()
        self.client = client
        self.conn = conn
        self.number: int | None = None
        """The tap's number from the server's reply: lines of any other are not ours."""
        self._early: list[TapLine] = []
        """Lines read before the reply reached us (the reply comes first, but its waiter
        resumes later), at most MAX_LINES."""

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog help"):
            yield Static(f"[b]tap {self.conn}[/b]  (esc stops)", id="tap-title")
            yield RichLog(id="tap-log", max_lines=MAX_LINES, wrap=True, markup=False)

    def on_mount(self) -> None:
        self._start()

    @work(group="tap", exclusive=True)
    async def _start(self) -> None:
        log = self.query_one(RichLog)
        try:
            started = await self.client.tap(Tap(conn=self.conn, rate=RATE), self._line)
        except (NotConnected, RequestFailed) as exc:
            log.write(f"tap {self.conn} failed: {exc}")
            return
        self.number = started.tap
        early, self._early = self._early, []
        for line in early:
            self._line(line)

    def _line(self, line: TapLine) -> None:
        if self.number is None:
            if len(self._early) < MAX_LINES:
                self._early.append(line)
        elif line.tap == self.number:
            self.query_one(RichLog).write(tap_text(line))

    async def action_close(self) -> None:
        await self.client.untap()
        self.dismiss()
