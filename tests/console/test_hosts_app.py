"""The console app with a host run by ``odin serve --workers N`` (fake sockets, the real
protocol): the host is one group with a row per worker, a restarting worker shows what its
supervisor says, a worker started in its place joins the group, and the one it replaced is let
go."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import Static

from odin_fanout.console.app import ConsoleApp
from odin_fanout.control.protocol import HostWorkers, Watch, WorkerInfo, Workers
from tests.console.conftest import ServerFactory
from tests.console.demo import FakeServer, demo_data, supervisor_data, worker_data
from tests.console.test_app import SIZE, console, figures, header, rendered, wait_until

SUPERVISOR = 4200


def up(socket_dir: Path, slot: int, pid: int, restarts: int = 0, last_exit: str = "") -> WorkerInfo:
    control = str(socket_dir / f"odin-{pid}.sock")
    return WorkerInfo(slot, "up", pid, restarts=restarts, last_exit=last_exit, control=control)


def reported(*workers: WorkerInfo) -> HostWorkers:
    return HostWorkers(len(workers), SUPERVISOR, 0.0, list(workers))


async def worker(
    fake_server: ServerFactory, slot: int, pid: int, connections: int, count: int = 2
) -> FakeServer:
    data = worker_data(
        f"w{pid}", pid, slot, count=count, supervisor_pid=SUPERVISOR, connections=connections
    )
    return await fake_server(data, pid=pid)


def hosts(app: ConsoleApp) -> str:
    widget = app.query_one("#hosts", Static)
    return rendered(widget) if widget.display else ""


def line_with(text: str, needle: str) -> str:
    return next((line for line in text.splitlines() if needle in line), "")


@pytest.mark.asyncio
async def test_a_host_shows_a_worker_up_and_one_restarting_then_both_up(
    fake_server: ServerFactory, socket_dir: Path
) -> None:
    restarting = WorkerInfo(1, "restarting", None, restarts=3, last_exit="signal SIGKILL")
    supervisor = await fake_server(
        supervisor_data(SUPERVISOR, [up(socket_dir, 0, 4301), restarting]), pid=SUPERVISOR
    )
    await worker(fake_server, 0, 4301, connections=240)
    await fake_server(demo_data("a100", 100, connections=30), pid=100)
    app = console(directory=socket_dir, scan_every=0.1)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(
            pilot,
            lambda: "host 4200: 1 of 2 workers up" in hosts(app) and "270 / 20,000" in figures(app),
            "the host, its worker and the server alone",
        )
        table = hosts(app)
        first = line_with(table, "4301")
        assert first.split()[:4] == ["0", "4301", "up", "240"]
        second = line_with(table, "restarting")
        assert second.split()[:3] == ["1", "-", "restarting"]
        assert "3" in second.split() and "signal SIGKILL" in second
        # A column for the host (its workers added up) and one for the server alone.
        assert "all (2)" in figures(app)
        assert "host 4200 (1/2)" in figures(app)
        assert "1 worker not up" in header(app)
        assert "2/2 servers up" in header(app)  # the supervisor is not a server of clients
        # The supervisor is asked for its workers, never watched.
        assert supervisor.commands(Workers) and not supervisor.commands(Watch)
        # Each socket can be chosen: a worker's bar names its slot.
        for _ in range(3):
            if app.selected == str(socket_dir / "odin-4301.sock"):
                break
            await pilot.press("s")
        info = app.query_one("#server-info", Static)
        await wait_until(pilot, lambda: "worker 0 of 2" in str(info.content), "the worker's bar")
        assert "instance w4301  pid 4301" in str(info.content)

        # The supervisor starts slot 1 again: its socket joins the host.
        await worker(fake_server, 1, 4302, connections=55)
        supervisor.data.workers = reported(
            up(socket_dir, 0, 4301), up(socket_dir, 1, 4302, 3, "signal SIGKILL")
        )
        await wait_until(
            pilot,
            lambda: "2 of 2 workers up" in hosts(app) and "55" in line_with(hosts(app), "4302"),
            "the restarted worker in its row",
        )
        assert line_with(hosts(app), "4302").split()[:4] == ["1", "4302", "up", "55"]
        assert "host 4200 (2/2)" in figures(app)
        assert "not up" not in header(app)


@pytest.mark.asyncio
async def test_a_replaced_worker_is_let_go_and_not_attached_again(
    fake_server: ServerFactory, socket_dir: Path
) -> None:
    supervisor = await fake_server(
        supervisor_data(SUPERVISOR, [up(socket_dir, 0, 4301)]), pid=SUPERVISOR
    )
    old = await worker(fake_server, 0, 4301, connections=10, count=1)
    app = console(directory=socket_dir, scan_every=0.1)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: "1 of 1 workers up" in hosts(app), "the host")
        # Killed: its socket file stays. The supervisor runs pid 4303 in its slot.
        await old.stop()
        supervisor.data.workers = reported(up(socket_dir, 0, 4303, 1, "signal SIGKILL"))
        await worker(fake_server, 0, 4303, connections=20, count=1)
        await wait_until(
            pilot, lambda: str(old.path) not in app.model.servers, "the old worker let go"
        )
        assert any("replaced by another worker" in text for text in app.outcomes)
        assert old.path.exists()
        await wait_until(pilot, lambda: "20" in line_with(hosts(app), "4303"), "the new one")
        # A server started after: attached by a later look in the directory, which left the
        # dead worker's socket alone.
        late = await fake_server(demo_data("a100", 100), pid=100)
        await wait_until(pilot, lambda: str(late.path) in app.clients, "a later scan")
        assert str(old.path) not in app.clients


@pytest.mark.asyncio
async def test_a_supervisors_socket_alone_brings_its_workers_sockets(
    fake_server: ServerFactory, socket_dir: Path
) -> None:
    supervisor = await fake_server(
        supervisor_data(SUPERVISOR, [up(socket_dir, 0, 4301)]), pid=SUPERVISOR
    )
    first = await worker(fake_server, 0, 4301, connections=12, count=1)
    app = console(supervisor.path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(
            pilot,
            lambda: str(first.path) in app.model.servers and "12 / 10,000" in figures(app),
            "the worker the supervisor named",
        )
        assert "host 4200: 1 of 1 workers up" in hosts(app)
