"""``?``: every key binding, by where it works, and where deeper history is."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from rich import box
from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

KEY_NAMES = {
    "question_mark": "?",
    "slash": "/",
    "left_square_bracket": "[",
    "right_square_bracket": "]",
    "escape": "esc",
}


def key_text(binding: Binding) -> str:
    return binding.key_display or ", ".join(
        KEY_NAMES.get(key.strip(), key.strip()) for key in binding.key.split(",")
    )


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,question_mark", "dismiss", "Close")]

    def __init__(self, sections: Sequence[tuple[str, Sequence[Binding]]], grafana_url: str) -> None:
        super().__init__()
        self.sections = sections
        self.grafana_url = grafana_url

    def compose(self) -> ComposeResult:
        table = Table(box=box.SIMPLE_HEAD, expand=True)
        table.add_column("key", style="bold", no_wrap=True)
        table.add_column("action")
        table.add_column("where", style="dim")
        for where, bindings in self.sections:
            for binding in bindings:
                table.add_row(key_text(binding), binding.description, where)
        with VerticalScroll(classes="dialog help"):
            yield Static("[b]Odin console: keys[/b]  (esc closes)")
            yield Static(table, id="help-keys")
            yield Static(
                "A click on a table's header sorts by that column; a second click reverses it.\n"
                f"Deeper history (hours, days): Grafana at {self.grafana_url}"
            )
