"""Sockets left behind by servers that died (SIGKILL leaves the file): the console says once
that such a server is gone and lets its socket go, does not find it again while the file
stays, picks up a server that binds there later, and keeps a socket whose process runs but
does not answer. The sockets are named after real pids (the process that ran is reaped, or
is this test's), and the console checks them as it does on a host."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from odin_fanout.console.app import ConsoleApp
from odin_fanout.control.paths import owner_running
from tests.console.conftest import ServerFactory, dead_pid, left_socket
from tests.console.demo import demo_data
from tests.console.test_app import SIZE, banner, console, figures, header, wait_until


def scanning(directory: Path) -> ConsoleApp:
    return console(directory=directory, scan_every=0.1, owner_running=owner_running)


def gone_said(app: ConsoleApp) -> list[str]:
    return [text for text in app.outcomes if text.startswith("server gone:")]


def gone_logged(app: ConsoleApp) -> list[str]:
    return [logged.details for logged in app.model.events if logged.event.kind == "server_gone"]


@pytest.mark.asyncio
async def test_a_dead_servers_socket_is_said_gone_once_dropped_and_not_found_again(
    fake_server: ServerFactory, socket_dir: Path
) -> None:
    pid = dead_pid()
    stale = left_socket(socket_dir / f"odin-{pid}.sock")
    live = await fake_server(demo_data("a3f9", os.getpid()), pid=os.getpid())
    app = scanning(socket_dir)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(
            pilot,
            lambda: gone_said(app) and str(stale) not in app.model.servers,
            "the dead server said gone and let go",
        )
        assert gone_said(app) == [
            f"server gone: {stale.name} (socket left by pid {pid}, not running)"
        ]
        assert gone_logged(app) == [
            f'socket={stale.name} why="socket left by pid {pid}, not running"'
        ]
        await wait_until(pilot, lambda: "1/1 servers up" in header(app), "only the live one")
        assert list(app.model.servers) == [str(live.path)]

        # Later looks in the directory leave the file alone: a server started after is found,
        # the dead one is neither attached nor said gone again.
        late = await fake_server(demo_data("c81e", 303), pid=303)
        await wait_until(pilot, lambda: len(app.model.live()) == 2, "the later server")
        assert str(stale) not in app.clients
        assert stale.exists()
        assert len(gone_said(app)) == 1 and len(gone_logged(app)) == 1
        assert "connection refused" not in banner(app)

        # Another server binding the same path makes another file: attached.
        again = await fake_server(demo_data("d00d", pid), pid=pid)
        assert again.path == stale
        await wait_until(pilot, lambda: len(app.model.live()) == 3, "the new server at that path")
        assert str(late.path) in app.clients


@pytest.mark.asyncio
async def test_a_server_restarting_under_the_console_goes_and_its_successor_appears(
    fake_server: ServerFactory, socket_dir: Path
) -> None:
    pid = dead_pid()  # the pid the old server had, which is not running any more
    old = await fake_server(demo_data("a3f9", pid), pid=pid)
    app = scanning(socket_dir)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: "all (1)" in figures(app), "the first server")
        await old.stop()  # killed: its socket file stays
        new = await fake_server(demo_data("b7e2", os.getpid()), pid=os.getpid())
        await wait_until(
            pilot,
            lambda: list(app.model.servers) == [str(new.path)] and len(app.model.live()) == 1,
            "the old server let go, the new one up",
        )
        assert gone_said(app) == [f"server gone: a3f9 (socket left by pid {pid}, not running)"]
        assert old.path.exists()
        await wait_until(pilot, lambda: "1/1 servers up" in header(app), "the header")
        await wait_until(pilot, lambda: "b7e2" in figures(app), "the new one's column")
        assert "a3f9" not in figures(app)


@pytest.mark.asyncio
async def test_a_socket_whose_process_runs_but_does_not_answer_stays(
    fake_server: ServerFactory, socket_dir: Path
) -> None:
    # Named after this test's process, which runs: a server stuck, or not listening yet.
    stuck = left_socket(socket_dir / f"odin-{os.getpid()}.sock")
    await fake_server(demo_data("c81e", 303), pid=303)
    app = scanning(socket_dir)
    async with app.run_test(size=SIZE) as pilot:
        expected = f"not answering: {stuck} (connection refused; pid {os.getpid()} is running)"
        await wait_until(pilot, lambda: expected in banner(app), "the banner")
        await wait_until(pilot, lambda: f"{stuck.name} (not answering)" in figures(app), "title")
        # Looks in the directory after that keep it.
        late = await fake_server(demo_data("d00d", 404), pid=404)
        await wait_until(pilot, lambda: str(late.path) in app.clients, "a later look")
        assert str(stuck) in app.model.servers
        assert gone_said(app) == []
        await wait_until(pilot, lambda: "2/3 servers up" in header(app), "the header")
