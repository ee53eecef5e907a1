"""The control client on a supervisor's socket: it asks for the workers, at once and then
every interval, and never for a snapshot or a watch, which a supervisor does not serve."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from odin_fanout.console.client import ControlClient
from odin_fanout.console.link import LinkStatus
from odin_fanout.control.protocol import (
    Drain,
    Draining,
    Hello,
    HostWorkers,
    SnapshotRequest,
    Update,
    Watch,
    WorkerInfo,
    Workers,
)
from tests.console.conftest import ServerFactory, eventually
from tests.console.demo import supervisor_data
from tests.console.test_client import running


@pytest.mark.asyncio
async def test_a_supervisor_is_polled_for_its_workers(
    fake_server: ServerFactory, socket_dir: Path
) -> None:
    workers = [WorkerInfo(0, "up", 4301, control=str(socket_dir / "odin-4301.sock"))]
    server = await fake_server(supervisor_data(4200, workers), pid=4200)
    statuses: list[LinkStatus] = []
    updates: list[Update] = []
    reports: list[HostWorkers] = []
    client = ControlClient(
        server.path,
        on_link=statuses.append,
        on_update=updates.append,
        on_workers=reports.append,
        interval=0.2,
        backoff=(0.05, 0.2),
    )
    async with running(client):
        await eventually(lambda: len(reports) >= 2, "the workers, then again")
        identity = client.status.identity
        assert identity is not None and identity.role == "supervisor"
        assert reports[0].workers == workers
        assert server.commands(Hello) == [Hello()]
        assert not server.commands(SnapshotRequest)
        assert not server.commands(Watch)
        assert updates == []

        # Each poll brings what the supervisor says now.
        restarting = WorkerInfo(0, "restarting", None, restarts=1, last_exit="exit 1")
        server.data.workers = attrs.evolve(reports[0], workers=[restarting])
        await eventually(lambda: reports[-1].workers == [restarting], "the restart")
        assert len(server.commands(Workers)) >= len(reports)

        # Requests still go through, as to any server.
        assert await client.request(Drain(), Draining) == Draining(0, 0.0)
