"""Confirmation before an action that changes a server: drain, reload (one server or all),
and kick (with its code)."""

from __future__ import annotations

from typing import ClassVar, Final, Literal

import attrs
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from odin_fanout.control.protocol import KICKED, Kick

OFFERED_CODES: Final[dict[int, str]] = {
    KICKED: "closed by an operator",
    1000: "normal close",
    1001: "going away",
    1008: "policy violation",
    1011: "internal error",
}
"""The close codes the kick dialog offers, with what a client reads in each (docs/protocol.md's
table says the same; tests/test_docs.py checks it). 4000-4999 are accepted too."""


class ConfirmScreen(ModalScreen[bool]):
    """A question answered yes (``y``) or no (``n``, escape); the focus starts on no."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str, action: str) -> None:
        super().__init__()
        self.question = question
        self.action = action

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.question, classes="question")
            with Horizontal(classes="buttons"):
                yield Button(f"{self.action} (y)", variant="error", id="yes")
                yield Button("Cancel (n)", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.action_answer(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


@attrs.frozen
class KickChoice:
    code: int
    reason: str


class KickScreen(ModalScreen[KickChoice | None]):
    """Kick one connection: the close code (``KICKED`` unless changed) and reason can be
    edited."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "confirm", "Kick"),
        Binding("n,escape", "cancel", "Cancel"),
    ]

    def __init__(self, conn: str, peer: str, server: str) -> None:
        super().__init__()
        self.conn = conn
        self.peer = peer
        self.server = server

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(
                f"Kick connection [b]{self.conn}[/b] ({self.peer}) on {self.server}?",
                classes="question",
            )
            with Horizontal(classes="field"):
                yield Label("close code")
                yield Input(str(KICKED), id="code", restrict=r"[0-9]*", max_length=4)
            yield Static(_offered(), id="codes")
            with Horizontal(classes="field"):
                yield Label("reason")
                yield Input("closed by operator", id="reason", max_length=120)
            yield Static("", id="problem")
            with Horizontal(classes="buttons"):
                yield Button("Kick (y)", variant="error", id="yes")
                yield Button("Cancel (n)", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "yes":
            self.action_confirm()
        else:
            self.action_cancel()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_confirm()

    def action_confirm(self) -> None:
        code_text = self.query_one("#code", Input).value
        reason = self.query_one("#reason", Input).value
        try:
            # The protocol's own checks: 1000, 1001, 1008, 1011 or 4000-4999; 120 bytes.
            kick = Kick(self.conn, int(code_text or "0"), reason)
        except ValueError as exc:
            self.query_one("#problem", Static).update(Text(str(exc), style="red"))
            return
        self.dismiss(KickChoice(kick.code, kick.reason))

    def action_cancel(self) -> None:
        self.dismiss(None)


def _offered() -> Text:
    codes = ", ".join(f"{code} {meaning}" for code, meaning in OFFERED_CODES.items())
    return Text(f"codes: {codes}; or 4000-4999", style="dim")


ReloadScope = Literal["selected", "all"]


class ReloadScreen(ModalScreen[ReloadScope | None]):
    """Reload the configuration of the selected server (``y``) or, with several attached,
    of all of them (``a``); the focus starts on Cancel."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer('selected')", "Reload the selected server"),
        Binding("a", "answer('all')", "Reload every server"),
        Binding("n,escape", "answer(None)", "Cancel"),
    ]

    def __init__(self, question: str, selected: str, servers: int) -> None:
        super().__init__()
        self.question = question
        self.selected = selected
        self.servers = servers

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.question, classes="question")
            with Horizontal(classes="buttons"):
                yield Button(f"Reload {self.selected} (y)", variant="error", id="yes")
                if self.servers > 1:
                    yield Button(f"All {self.servers} (a)", variant="warning", id="all")
                yield Button("Cancel (n)", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        answers: dict[str | None, ReloadScope] = {"yes": "selected", "all": "all"}
        self.action_answer(answers.get(event.button.id))

    def action_answer(self, scope: ReloadScope | None) -> None:
        if scope == "all" and self.servers < 2:
            return  # not offered: one server only
        self.dismiss(scope)
