"""The whole console path for real: ``odin serve --simulate`` as a subprocess, WebSocket
clients of a third-party library on it, and ``odin-console`` attached to its control socket,
showing their numbers."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from rich.console import Console
from textual.pilot import Pilot
from textual.widgets import DataTable, Static

from odin_fanout.console.app import ConsoleApp
from tests.e2e.process import odin_process

pytestmark = pytest.mark.slow

SIZE = (150, 50)


@pytest.fixture
def socket_path() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="oe-", dir="/tmp") as directory:
        yield Path(directory) / "odin.sock"


async def wait_until(pilot: Pilot[None], predicate: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + 15
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within 15 s: {what}")
        await pilot.pause(0.05)


def figures(app: ConsoleApp, widget_id: str = "#figures") -> str:
    widget = app.query_one(widget_id, Static)
    out = Console(file=io.StringIO(), width=widget.size.width or SIZE[0], record=True)
    out.print(widget.content)
    return out.export_text()


async def subscribed_client(url: str, channels: list[str]) -> websockets.ClientConnection:
    # The test stops reading while the console looks; with the library's bounded receive queue
    # a client that does not read cannot see the server's close frame either.
    client = await websockets.connect(url, max_queue=None)
    await client.send(json.dumps({"type": "subscribe", "data": {"channels": channels}}))
    async with asyncio.timeout(10):
        while "channel" not in json.loads(await client.recv()):  # an event
            pass
    return client


@pytest.mark.asyncio
async def test_the_console_shows_a_running_servers_clients(socket_path: Path) -> None:
    args = ["serve", "--port", "0", "--simulate", "--rate", "50",
            "--set", f"control.path={socket_path}"]  # fmt: skip
    with odin_process(args) as odin:
        url = odin.wait_for("listening")["websocket"][0]
        assert odin.wait_for("control_listening")["path"] == str(socket_path)
        clients = [
            await subscribed_client(url, ["BTC.*"]),
            await subscribed_client(url, ["ETH.trade", "SOL.trade"]),
            await subscribed_client(url, ["*.*"]),
        ]
        try:
            app = ConsoleApp(sockets=[socket_path], interval=0.2)
            async with app.run_test(size=SIZE) as pilot:
                view = app.model.servers[str(socket_path)]
                await wait_until(pilot, lambda: view.snapshot is not None, "a snapshot")
                assert view.snapshot is not None
                shown = f"3 / {view.snapshot.max_connections:,}"  # derived from the memory
                await wait_until(pilot, lambda: shown in figures(app), "3 connections")
                await wait_until(
                    pilot,
                    lambda: view.snapshot is not None and view.snapshot.out_per_s > 0,
                    "deliveries per second",
                )
                assert "connected" in figures(app)  # NATS, the embedded server
                await pilot.press("2")
                table = app.query_one("#connections-view").query_one(DataTable)
                await wait_until(pilot, lambda: table.row_count == 3, "three rows")
                peers = {str(table.get_row_at(n)[1]) for n in range(3)}
                local = {f"127.0.0.1:{c.local_address[1]}" for c in clients}
                assert peers == local
        finally:
            for client in clients:
                await client.close()


@pytest.mark.asyncio
async def test_the_console_shows_every_worker_of_a_host_and_one_restarting(
    socket_path: Path,
) -> None:
    """``odin-console --socket`` on a supervisor: one host, a row per worker with its pid and
    clients, the host's total; a worker killed shows as restarting, then up again."""
    args = ["serve", "--workers", "2", "--port", "0", "--simulate", "--rate", "50",
            "--set", f"control.path={socket_path}"]  # fmt: skip
    with odin_process(args) as odin:
        odin.follow()
        url = odin.wait_for("workers_ready")["websocket"][0]
        clients = [await subscribed_client(url, ["BTC.*"]) for _ in range(4)]
        try:
            app = ConsoleApp(sockets=[socket_path], interval=0.2, scan_every=0.5)
            async with app.run_test(size=SIZE) as pilot:

                def rows() -> list[Any]:
                    hosts = app.model.hosts()
                    return hosts[0].rows if len(hosts) == 1 else []

                def serving() -> bool:
                    current = rows()
                    return len(current) == 2 and all(
                        row.state == "up" and row.view is not None and row.view.snapshot
                        for row in current
                    )

                await wait_until(pilot, serving, "both workers up, each with a snapshot")
                host = app.model.hosts()[0]
                assert host.expected == 2
                await wait_until(
                    pilot,
                    lambda: (t := app.model.hosts()[0].total()) is not None and t.connections == 4,
                    "the host's total of 4 clients",
                )
                pids = [str(row.pid) for row in rows()]
                await wait_until(
                    pilot,
                    lambda: all(pid in figures(app, "#hosts") for pid in pids),
                    "a row per worker, with its pid",
                )

                victim = next(row for row in rows() if row.slot == 1)
                assert victim.pid is not None
                os.kill(victim.pid, signal.SIGKILL)
                await wait_until(
                    pilot,
                    lambda: any(r.slot == 1 and r.restarts == 1 for r in rows()),
                    "worker 1's restart counted",
                )
                await wait_until(
                    pilot,
                    lambda: serving() and next(r for r in rows() if r.slot == 1).pid != victim.pid,
                    "worker 1 up again with a new pid",
                )
        finally:
            for client in clients:
                await client.close()
