"""The overview: each server's rates as sparklines, then every figure side by side, with the
total over the servers that are up in the first column."""

from __future__ import annotations

from rich import box
from rich.style import Style
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Label, Sparkline, Static

from console import format
from console.model import ConsoleModel, ServerView
from odin.control.protocol import Snapshot

TOTAL = "all"


class RateRow(Horizontal):
    """One server's (or the total's) messages per second, in and out, with their recent
    past."""

    def __init__(self, name: str, *, total: bool = False) -> None:
        super().__init__(classes="rate-row total" if total else "rate-row")
        self._label = name
        self._figures: tuple[str, list[float], str, list[float]] = ("", [], "", [])

    def compose(self) -> ComposeResult:
        yield Label(self._label, classes="rate-name")
        yield Label("", classes="rate-in rate-value")
        yield Sparkline([], classes="spark-in")
        yield Label("", classes="rate-out rate-value")
        yield Sparkline([], classes="spark-out")

    def on_mount(self) -> None:
        self._paint()

    def show(
        self, name: str, snapshot: Snapshot | None, rate_in: list[float], rate_out: list[float]
    ) -> None:
        self._label = name
        if snapshot is None:
            self._figures = ("in -", [], "out -", [])
        else:
            self._figures = (
                f"in {format.rate(snapshot.in_per_s)}/s",
                rate_in,
                f"out {format.rate(snapshot.out_per_s)}/s",
                rate_out,
            )
        self._paint()

    def _paint(self) -> None:
        if not self.is_mounted or not self.children:
            return
        text_in, data_in, text_out, data_out = self._figures
        self.query_one(".rate-name", Label).update(self._label)
        self.query_one(".rate-in", Label).update(text_in)
        self.query_one(".rate-out", Label).update(text_out)
        self.query_one(".spark-in", Sparkline).data = data_in
        self.query_one(".spark-out", Sparkline).data = data_out


class Figures(Static):
    """The figures of every server in columns (a Rich table, wrapped to the width)."""

    def show(self, columns: list[tuple[str, Snapshot | None]]) -> None:
        table = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False, show_edge=False)
        table.add_column("", style="dim", no_wrap=True, width=15)
        values: list[list[str]] = []
        for title, snapshot in columns:
            table.add_column(title, overflow="fold", ratio=1)
            values.append(
                ["-"] * len(format.FIGURES) if snapshot is None else format.figures(snapshot)
            )
        for index, label in enumerate(format.FIGURES):
            table.add_row(label, *[_emphasise(label, column[index]) for column in values])
        self.update(table)


def _emphasise(label: str, cell: str) -> Text:
    """Draw the eye to what needs it: a drain, NATS down."""
    if (label == "draining" and cell == "YES") or (label == "NATS" and cell.startswith("DOWN")):
        return Text(cell, style="bold red")
    return Text(cell)


class Overview(VerticalScroll):
    """Rates, figures, and where deeper history is."""

    def __init__(self, grafana_url: str, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.grafana_url = grafana_url
        self._rows: dict[str, RateRow] = {}

    def compose(self) -> ComposeResult:
        with Vertical(id="rates") as rates:
            rates.border_title = "messages per second (last 2 minutes)"
        yield Figures(id="figures")
        url = self.grafana_url
        yield Static(
            Text.assemble("Deeper history in Grafana: ", (url, Style(link=url, underline=True))),
            id="grafana",
        )

    def sync(self, model: ConsoleModel, selected: str | None) -> None:
        """Show the model: a rate row per server (added and removed as they come and go)."""
        rates = self.query_one("#rates", Vertical)
        wanted = [TOTAL, *model.servers]
        for key in list(self._rows):
            if key not in wanted:
                self._rows.pop(key).remove()
        for key in wanted:
            if key not in self._rows:
                self._rows[key] = row = RateRow(key, total=key == TOTAL)
                rates.mount(row)
        total = model.total()
        history_in, history_out = model.total_history()
        self._rows[TOTAL].show(_total_title(model), total, history_in, history_out)
        columns: list[tuple[str, Snapshot | None]] = [(_total_title(model), total)]
        for key, view in model.servers.items():
            row = self._rows[key]
            row.set_class(key == selected, "-selected")
            row.set_class(not view.up, "-down")
            row.show(_title(view), view.snapshot, list(view.rate_in), list(view.rate_out))
            columns.append((_title(view), view.snapshot))
        self.query_one(Figures).show(columns)


def _total_title(model: ConsoleModel) -> str:
    live, count = len(model.live()), len(model.servers)
    return f"all ({live} of {count} up)" if live != count else f"all ({count})"


def _title(view: ServerView) -> str:
    return view.label if view.up else f"{view.label} (down)"
