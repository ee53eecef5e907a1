"""The fan-out benchmark's report: a line for each run as it ends, then the tables of every
run and of the ratios to the peers, rendered with rich; and the JSON document written.

``text_table`` is the plain-text table ``bench_workers`` prints its runs with."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from odin_fanout.stress.fanout.results import BURST_FIGURES, IDLE_FIGURES, RATE_FIGURES

UNBOUNDED = 10_000
"""Width tables are measured in: wider than any of them."""
Columns = list[tuple[str, str]]
"""(title, format) of each column; the format is applied to a row with ``str.format(**row)``."""

RATE_COLUMNS = [
    ("server", "{server}"),
    ("rate", "{rate:g}"),
    ("rep", "{repeat}"),
    ("offered/s", "{offered_per_s:,.0f}"),
    ("delivered/s", "{delivered_per_s:,.0f}"),
    ("ratio", "{delivered_ratio:.3f}"),
    ("srv CPU%", "{server_cpu_pct:.1f}"),
    ("µs/deliv", "{server_cpu_us_per_delivery:.2f}"),
    ("p50 ms", "{p50}"),
    ("p90 ms", "{p90}"),
    ("p99 ms", "{p99}"),
    ("max ms", "{max}"),
    ("sched p50", "{sched_p50}"),
    ("sched p99", "{sched_p99}"),
    ("cli CPU%", "{client_cpu_pct_publishing:.1f}"),
    ("other%", "{other_cpu_pct_publishing:.0f}"),
    ("frame B", "{frame_bytes:.0f}"),
    ("RSS MiB", "{rss_mib:.1f}"),
]
BURST_COLUMNS = [
    ("server", "{server}"),
    ("burst", "{burst}"),
    ("rep", "{repeat}"),
    ("conns", "{connected}"),
    ("delivered", "{delivered:,}"),
    ("ratio", "{delivered_ratio:.3f}"),
    ("delivered/s", "{delivered_per_s:,.0f}"),
    ("span s", "{delivery_span_s:.2f}"),
    ("srv CPU%", "{server_cpu_pct:.1f}"),
    ("µs/deliv", "{server_cpu_us_per_delivery:.2f}"),
    ("cli CPU%", "{client_cpu_pct_publishing:.1f}"),
    ("other%", "{other_cpu_pct_publishing:.0f}"),
    ("frame B", "{frame_bytes:.0f}"),
    ("RSS MiB", "{rss_mib:.1f}"),
]
IDLE_COLUMNS = [
    ("server", "{server}"),
    ("rep", "{repeat}"),
    ("conns", "{connected}"),
    ("connect s", "{connect_s:.2f}"),
    ("RSS before MiB", "{before_mib:.1f}"),
    ("RSS after MiB", "{after_mib:.1f}"),
    ("KiB/conn", "{kib_per_conn:.2f}"),
    ("accept ms/conn", "{accept_ms:.3f}"),
    ("idle CPU %", "{idle_cpu}"),
]


def _cells(columns: Columns, row: dict[str, Any]) -> list[str]:
    """A row's cells, ``-`` where a figure is missing or not a number."""
    cells = []
    for _, fmt in columns:
        try:
            cells.append(fmt.format(**row))
        except (TypeError, ValueError, KeyError):
            cells.append("-")
    return cells


def text_table(columns: Columns, rows: list[dict[str, Any]]) -> str:
    """A plain table: a header, a rule, a line a row; the first column left-aligned."""
    cells = [[title for title, _ in columns]] + [_cells(columns, row) for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    text = []
    for index, line in enumerate(cells):
        text.append(
            "  ".join(
                cell.ljust(width) if i == 0 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(line, widths, strict=True))
            )
        )
        if index == 0:
            text.append("  ".join("-" * width for width in widths))
    return "\n".join(text)


def rich_table(columns: Columns, rows: list[dict[str, Any]], title: str | None = None) -> Table:
    """The same table for rich: the first column left-aligned, the figures right-aligned."""
    table = Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False
    )
    for index, (name, _) in enumerate(columns):
        table.add_column(name, justify="left" if index == 0 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*_cells(columns, row))
    return table


def run_line(columns: Columns, row: dict[str, Any]) -> str:
    """One row as ``title value`` pairs: the line printed as each run ends."""
    return ", ".join(
        f"{title} {cell}" for (title, _), cell in zip(columns, _cells(columns, row), strict=True)
    )


def _load_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            **run,
            **(run["latency_ms"] or {}),
            **{f"sched_{key}": value for key, value in (run["latency_sched_ms"] or {}).items()},
            "rss_mib": (run["server_rss_kib"] or 0) / 1024,
        }
        for run in runs
    ]


def _idle_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            **run,
            "before_mib": run["rss_before_kib"] / 1024,
            "after_mib": run["rss_after_kib"] / 1024,
            "accept_ms": 1000 * run["server_cpu_s_connect"] / max(1, run["connected"]),
            "idle_cpu": "-" if run.get("idle_cpu_pct") is None else run["idle_cpu_pct"],
        }
        for run in runs
    ]


def ratio_columns(key: str, figures: list[tuple[str, Any]]) -> Columns:
    columns = [("peer", "{peer}")]
    if key:
        columns.append((key, "{" + key + ":g}"))
    return columns + [(title, f"{{fig{index}:.2f}}") for index, (title, _) in enumerate(figures)]


def ratio_rows(rows: list[dict[str, Any]], figures: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    return [
        {**row, **{f"fig{index}": row[title] for index, (title, _) in enumerate(figures)}}
        for row in rows
    ]


class Report:
    """Where the benchmark prints: stdout through rich. Off a terminal the tables are as wide
    as they need (not cut at 80 columns) and carry no colour."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(highlight=False, soft_wrap=True)

    def line(self, text: str) -> None:
        self.console.print(text, markup=False)
        sys.stdout.flush()

    def table(self, table: Table) -> None:
        """``table`` at its natural width: a narrow terminal wraps its lines rather than rich
        squeezing the figures into ellipses."""
        unbounded = self.console.options.update(width=UNBOUNDED)
        width = Measurement.get(self.console, unbounded, table).maximum
        former = self.console.width
        self.console.width = max(former, width)
        try:
            self.console.print()
            self.console.print(table, crop=False)
        finally:
            self.console.width = former
        sys.stdout.flush()

    def load_run(self, record: dict[str, Any]) -> None:
        columns = RATE_COLUMNS if record["mode"] == "rate" else BURST_COLUMNS
        self.line(run_line(columns, _load_rows([record])[0]))
        self.anomalies(record)

    def idle_run(self, record: dict[str, Any]) -> None:
        self.line(run_line(IDLE_COLUMNS, _idle_rows([record])[0]))
        self.anomalies(record)

    def anomalies(self, record: dict[str, Any]) -> None:
        for anomaly in record["anomalies"]:
            self.line(f"    ! {anomaly}")

    def summary(self, document: dict[str, Any], reference: str) -> None:
        """Every run's table, then the ratios of ``reference``'s figures to each peer's."""
        runs = document["runs"]
        for mode, columns in (("rate", RATE_COLUMNS), ("burst", BURST_COLUMNS)):
            rows = _load_rows([run for run in runs if run["mode"] == mode])
            if rows:
                self.table(rich_table(columns, rows, title=f"{mode} runs"))
        if document["idle"]:
            self.table(rich_table(IDLE_COLUMNS, _idle_rows(document["idle"]), "idle runs"))
        kinds = (
            ("rate", "rate", RATE_FIGURES, "delivered/s above 1, the others below 1"),
            ("burst", "burst", BURST_FIGURES, "delivered/s above 1, µs/deliv below 1"),
            ("idle", "", IDLE_FIGURES, "below 1"),
        )
        for kind, key, figures, better in kinds:
            rows = document["ratios"][kind]
            if rows:
                title = (
                    f"{kind}: {reference} ÷ peer, medians over repeats "
                    f"({better} favour {reference})"
                )
                self.table(
                    rich_table(ratio_columns(key, figures), ratio_rows(rows, figures), title)
                )


def write_json(path: Path | None, document: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(document, indent=2) + "\n")
    temporary.replace(path)
