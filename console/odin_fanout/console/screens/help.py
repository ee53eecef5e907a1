"""``?`` (or ``h``): every key binding, by where it works, read from the bindings themselves so
that it cannot drift from them; the palette's commands; and where deeper history is."""

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

from odin_fanout.console.screens.confirm import ConfirmScreen, KickScreen, ReloadScreen
from odin_fanout.console.screens.detail import DetailScreen
from odin_fanout.console.screens.tap import TapScreen
from odin_fanout.console.widgets.channels import ChannelsView
from odin_fanout.console.widgets.connections import ConnectionsView
from odin_fanout.console.widgets.cursor import CursorTable
from odin_fanout.console.widgets.events import EventLog
from odin_fanout.console.widgets.tables import PagedTable

KEY_NAMES = {
    "question_mark": "?",
    "slash": "/",
    "left_square_bracket": "[",
    "right_square_bracket": "]",
    "escape": "esc",
    "colon": ":",
}


def key_text(binding: Binding) -> str:
    return binding.key_display or ", ".join(
        KEY_NAMES.get(key.strip(), key.strip()) for key in binding.key.split(",")
    )


def help_sections(everywhere: Sequence[BindingType]) -> list[tuple[str, Sequence[Binding]]]:
    """Every binding of the console, by where it works: the app's (``everywhere``), then the
    views' and the dialogs', from their classes."""
    sections: list[tuple[str, Sequence[BindingType]]] = [
        ("everywhere", everywhere),
        ("tables, events", CursorTable.BINDINGS),
        ("connections, channels", PagedTable.BINDINGS),
        ("connections", ConnectionsView.BINDINGS),
        ("channels", ChannelsView.BINDINGS),
        ("events", EventLog.BINDINGS),
        ("connection detail", DetailScreen.BINDINGS),
        ("tap", TapScreen.BINDINGS),
        ("kick question", KickScreen.BINDINGS),
        ("drain question", ConfirmScreen.BINDINGS),
        ("reload question", ReloadScreen.BINDINGS),
        ("this help", HelpScreen.BINDINGS),
    ]
    return [
        (where, [binding for binding in bindings if isinstance(binding, Binding)])
        for where, bindings in sections
    ]


def rows(bindings: Sequence[Binding]) -> list[tuple[str, str]]:
    """Key and description of each binding that has a description; keys bound to the same
    action with the same words share a row (``?, h``)."""
    merged: dict[tuple[str, str], list[str]] = {}
    for binding in bindings:
        if binding.description:
            keys = merged.setdefault((binding.action, binding.description), [])
            keys.append(key_text(binding))
    return [(", ".join(keys), description) for (_, description), keys in merged.items()]


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q,question_mark,h", "dismiss", "Close")
    ]

    def __init__(
        self,
        sections: Sequence[tuple[str, Sequence[Binding]]],
        grafana_url: str,
        commands: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.sections = sections
        self.grafana_url = grafana_url
        self.commands = commands
        """The command palette's commands, by title."""

    def compose(self) -> ComposeResult:
        table = Table(box=box.SIMPLE_HEAD, expand=True)
        table.add_column("key", style="bold", no_wrap=True)
        table.add_column("action")
        table.add_column("where", style="dim")
        for where, bindings in self.sections:
            for keys, description in rows(bindings):
                table.add_row(keys, description, where)
        with VerticalScroll(classes="dialog help"):
            yield Static("[b]Odin console: keys[/b]  (esc closes)")
            yield Static(table, id="help-keys")
            if self.commands:
                yield Static(
                    ": then a few letters of a command, enter runs it: " + ", ".join(self.commands),
                    id="help-commands",
                    markup=False,
                )
            yield Static(
                "The arrows and page up and down move in a table as usual; enter on a"
                " connection inspects it. ctrl+p opens the palette too, ctrl+q quits.\n"
                "A click on a table's header sorts by that column; a second click reverses it.\n"
                f"Deeper history (hours, days): Grafana at {self.grafana_url}"
            )
