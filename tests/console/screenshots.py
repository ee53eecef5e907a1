"""``python -m tests.console.screenshots OUTDIR``: SVG screenshots of the console for the docs.

Two fake servers (``tests.console.demo``) with fixed invented data; the console attaches to both,
and each view is saved as ``console-<view>.svg``. Clocks are the data's own and shown in UTC,
so the files come out the same on every run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import attrs
from textual.pilot import Pilot
from textual.widgets import DataTable

from odin_fanout.console.app import ConsoleApp
from odin_fanout.console.cli import DEFAULT_GRAFANA
from odin_fanout.console.model import HISTORY
from odin_fanout.control.protocol import NatsState
from tests.console.demo import FakeServer, demo_data, sample_history

SIZE: Final = (140, 45)
VIEWS: Final = ("overview", "connections", "channels", "events")


@contextmanager
def _utc() -> Iterator[None]:
    before = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    try:
        yield
    finally:
        if before is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = before
        time.tzset()


def _servers(directory: Path) -> list[FakeServer]:
    first = demo_data("3f9a1c", 4242, connections=812, seed=7)
    second = demo_data("c81e07", 4317, connections=655, seed=11, scale=0.8)
    # The second has had a worse day, so that the columns differ.
    second.snapshot = attrs.evolve(
        second.snapshot,
        dropped={"conflated": 5_412, "slow_consumer": 140},
        gaps={"conflated": 2_210, "feed_overflow": 12, "missed": 0},
        slow_consumers={"closed": 9, "conflated": 133},
        rate_limited=2,
        nats=NatsState(True, "connected", "e7c1", pending=41, reconnects=3, ingest_dropped=12),
        deepest_queue=977,
        oldest_queued_age=4.2,
        uptime=2_040.0,
    )
    # Each answers history with its last hour, the wave slowed to fit it.
    first.history = sample_history(HISTORY, stretch=30)
    second.history = sample_history(HISTORY, 0.8, stretch=30)
    return [
        FakeServer(directory / "odin-4242.sock", first),
        FakeServer(directory / "odin-4317.sock", second),
    ]


async def _wait(pilot: Pilot[None], ready: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the console did not show {what}")
        await pilot.pause(0.05)
    await _settle(pilot)


async def _settle(pilot: Pilot[None]) -> None:
    """Until every message is handled, the tab's underline has slid and the screen is
    painted: a busy machine must give the same picture as an idle one."""
    await pilot.pause(0.3)
    await pilot.wait_for_scheduled_animations()
    await pilot.pause()


def _has_rows(table: DataTable[object], *showing: str) -> Callable[[], bool]:
    """Ready once the table has rows, and a cell with each of ``showing``: rows the picture
    is meant to show (a page fetched from one server may be shown before the merged one)."""

    def ready() -> bool:
        if table.row_count == 0:
            return False
        cells = [str(cell) for row in range(table.row_count) for cell in table.get_row_at(row)]
        return all(any(text in cell for cell in cells) for text in showing)

    return ready


async def capture(outdir: Path) -> list[Path]:
    """Save the four views into ``outdir`` (which exists); returns the files."""
    directory = Path(tempfile.mkdtemp(prefix="odin-shots-", dir="/tmp"))
    servers = _servers(directory)
    events = sum(len(server.data.events) for server in servers)
    saved: list[Path] = []
    try:
        for server in servers:
            await server.start()
        app = ConsoleApp(
            sockets=[server.path for server in servers],
            directory=directory,
            grafana_url=DEFAULT_GRAFANA,
            refresh_every=3600,  # one fetch per view: the tables stay as first shown
        )
        with _utc():
            async with app.run_test(size=SIZE) as pilot:
                model = app.model

                def overview_ready() -> bool:
                    views = list(model.servers.values())
                    histories = all(v.up and len(v.rate_in) == HISTORY for v in views)
                    return histories and len(model.events) == events

                await _wait(pilot, overview_ready, "both servers")
                for number, view in enumerate(VIEWS, start=1):
                    await pilot.press(str(number))
                    if view in ("connections", "channels"):
                        table = app.query_one(f"#{view}-view").query_one(DataTable)
                        showing = ("3f9a1c-25",) if view == "connections" else ()
                        await _wait(pilot, _has_rows(table, *showing), view)
                    else:
                        await _settle(pilot)
                    saved.append(Path(app.save_screenshot(f"console-{view}.svg", str(outdir))))
    finally:
        for server in servers:
            await server.stop()
        shutil.rmtree(directory, ignore_errors=True)
    return saved


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.console.screenshots", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("outdir", type=Path, help="where to write console-<view>.svg")
    args = parser.parse_args(argv)
    args.outdir.mkdir(parents=True, exist_ok=True)
    for path in asyncio.run(capture(args.outdir)):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
