"""The overview: each server's rates as sparklines, then every figure side by side, with the
total over the servers that are up in the first column.

A host of ``odin serve --workers N`` is one row of rates and one column of figures (its
workers added up), and a table of its workers: slot, pid, state, connections, rates, restarts
and how the last one ended. A server alone keeps a row and a column of its own."""

from __future__ import annotations

from rich import box
from rich.console import Group
from rich.style import Style
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Label, Sparkline, Static

from odin_fanout.console import format
from odin_fanout.console.model import ConsoleModel, Host, ServerView, WorkerRow
from odin_fanout.control.protocol import Snapshot

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


class Hosts(Static):
    """Each host's workers, a row per slot (hidden when no host is attached)."""

    def show(self, hosts: list[Host], selected: str | None) -> None:
        self.display = bool(hosts)
        self.update(Group(*[_workers_table(host, selected) for host in hosts]))


WORKER_COLUMNS = ("worker", "pid", "state", "connections", "in/s", "out/s", "restarts")
STATE_STYLES = {"up": "", "starting": "yellow", "stopping": "yellow", "down": "bold red"}


def _workers_table(host: Host, selected: str | None) -> Table:
    table = Table(
        title=_host_heading(host),
        title_justify="left",
        title_style="bold",
        box=box.SIMPLE_HEAD,
        expand=True,
        pad_edge=False,
        show_edge=False,
    )
    for name in WORKER_COLUMNS:
        table.add_column(name, justify="left" if name == "state" else "right", no_wrap=True)
    table.add_column("last exit", ratio=1, overflow="fold")
    for row in host.rows:
        chosen = row.view is not None and row.view.key == selected
        table.add_row(*_worker_cells(row), style="bold underline" if chosen else "")
    return table


def _host_heading(host: Host) -> Text:
    heading = Text(f"{host.label}: {host.up} of {host.expected} workers up")
    if host.supervisor is None or not host.supervisor.up:
        heading.append("  (supervisor not attached: states from the workers)", style="dim")
    return heading


def _worker_cells(row: WorkerRow) -> list[str | Text]:
    snapshot = row.snapshot
    state = Text(row.state, style=STATE_STYLES.get(row.state, "bold red"))
    return [
        "?" if row.slot is None else str(row.slot),
        "-" if row.pid is None else str(row.pid),
        state,
        "-" if snapshot is None else format.count(snapshot.connections),
        "-" if snapshot is None else format.rate(snapshot.in_per_s),
        "-" if snapshot is None else format.rate(snapshot.out_per_s),
        format.count(row.restarts),
        row.last_exit or "-",
    ]


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
            rates.border_title = "messages per second (last hour)"
        yield Hosts(id="hosts")
        yield Figures(id="figures")
        url = self.grafana_url
        yield Static(
            Text.assemble("Deeper history in Grafana: ", (url, Style(link=url, underline=True))),
            id="grafana",
        )

    def sync(self, model: ConsoleModel, selected: str | None) -> None:
        """Show the model: a rate row per host and per server alone (added and removed as
        they come and go), each host's workers, the figures."""
        hosts, alone = model.hosts(), model.alone()
        rates = self.query_one("#rates", Vertical)
        wanted = [TOTAL, *(host.key for host in hosts), *(view.key for view in alone)]
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
        for host in hosts:
            row = self._rows[host.key]
            row.set_class(any(view.key == selected for view in host.views), "-selected")
            row.set_class(not host.live(), "-down")
            title = f"{host.label} ({host.up}/{host.expected})"
            row.show(title, host.total(), *host.total_history())
            columns.append((title, host.total()))
        for view in alone:
            row = self._rows[view.key]
            row.set_class(view.key == selected, "-selected")
            row.set_class(not view.up, "-down")
            row.show(_title(view), view.snapshot, list(view.rate_in), list(view.rate_out))
            columns.append((_title(view), view.snapshot))
        self.query_one(Hosts).show(hosts, selected)
        self.query_one(Figures).show(columns)


def _total_title(model: ConsoleModel) -> str:
    live, count = len(model.live()), len(model.processes())
    return f"all ({live} of {count} up)" if live != count else f"all ({count})"


def _title(view: ServerView) -> str:
    return view.label if view.up else f"{view.label} ({view.link_word})"
