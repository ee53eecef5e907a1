"""Confirmation before an action that changes a server: drain, and kick (with its code)."""

from __future__ import annotations

from typing import ClassVar

import attrs
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from odin.control.protocol import Kick


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
    """Kick one connection: the close code (4001 unless changed) and reason can be edited."""

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
                yield Input("4001", id="code", restrict=r"[0-9]*", max_length=4)
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
