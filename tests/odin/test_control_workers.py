"""The control sockets of a host run by ``odin serve --workers N``: a worker's names its slot and
its supervisor and relays the supervisor's view of the workers; the supervisor's own answers
hello, workers, reload and drain, and sends every other command to the workers' sockets."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from odin_fanout.config import ConfigError, ControlSection
from odin_fanout.control.host_state import write_state
from odin_fanout.control.protocol import (
    COMMANDS,
    PROTOCOL_VERSION,
    HostWorkers,
    ServerIdentity,
    WorkerInfo,
    converter,
)
from odin_fanout.host.control import SupervisorControl
from odin_fanout.logs import get_logger
from odin_fanout.server.worker_role import WorkerRole
from tests.helpers import capture_logs, running_server
from tests.odin.test_control import Console, FakeReload, control_for

pytestmark = pytest.mark.trio

SUPERVISOR = 4200


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="odin-wk-", dir="/tmp") as directory:
        yield Path(directory)


def host_state(directory: Path, *, restarting: bool = False) -> HostWorkers:
    second = (
        WorkerInfo(1, "restarting", None, restarts=2, since=20.0, last_exit="signal SIGKILL")
        if restarting
        else WorkerInfo(1, "up", 4302, since=20.0, control=str(directory / "odin-4302.sock"))
    )
    return HostWorkers(
        expected=2,
        supervisor_pid=SUPERVISOR,
        started_at=10.0,
        workers=[
            WorkerInfo(0, "up", 4301, since=11.0, control=str(directory / "odin-4301.sock")),
            second,
        ],
    )


@asynccontextmanager
async def attached(path: Path) -> AsyncIterator[Console]:
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        yield Console(stream)


# ---- a worker's own socket -----------------------------------------------------------------


async def test_a_server_alone_says_so_and_has_no_workers_to_report(socket_dir: Path) -> None:
    async with (
        running_server() as harness,
        control_for(harness, socket_dir / "run") as control,
        attached(control.path) as c,
    ):
        hello = await c.result("hello")
        assert (hello["role"], hello["worker"], hello["workers"]) == ("server", None, 1)
        assert hello["supervisor_pid"] is None
        reply = await c.call("workers")
        assert reply["error"]["code"] == "unavailable"
        assert reply["error"]["message"] == "this server runs alone, not under a supervisor"


async def test_a_worker_names_its_slot_and_supervisor_and_relays_the_host(
    socket_dir: Path,
) -> None:
    host_dir = socket_dir / "host"
    host_dir.mkdir()
    async with running_server() as harness:
        harness.server.context.worker = WorkerRole(1, 2, SUPERVISOR, host_dir)
        async with control_for(harness, socket_dir / "run") as control, attached(control.path) as c:
            hello = await c.result("hello")
            assert hello["protocol"] == PROTOCOL_VERSION
            assert (hello["role"], hello["worker"], hello["workers"]) == ("server", 1, 2)
            assert hello["supervisor_pid"] == SUPERVISOR
            assert hello["pid"] == os.getpid()

            # Before the supervisor has published anything: unavailable, not a crash.
            reply = await c.call("workers")
            assert reply["error"]["code"] == "unavailable"

            write_state(host_dir, host_state(socket_dir))
            workers = converter.structure(await c.result("workers"), HostWorkers)
            assert workers == host_state(socket_dir)
            # Each answer is what the supervisor published last.
            write_state(host_dir, host_state(socket_dir, restarting=True))
            workers = converter.structure(await c.result("workers"), HostWorkers)
            assert (workers.up, workers.workers[1].last_exit) == (1, "signal SIGKILL")


# ---- the supervisor's socket ---------------------------------------------------------------


class Supervisor:
    """What SupervisorControl calls: a host whose state tests change, and each action."""

    def __init__(self, directory: Path) -> None:
        self.host = host_state(directory)
        self.reload = FakeReload((["log.level"], ["server.port"]))
        self.drains = 0

    def identity(self) -> ServerIdentity:
        return ServerIdentity(
            PROTOCOL_VERSION, "odin", "0.1.0", "", SUPERVISOR, 10.0, role="supervisor", workers=2
        )

    def drain(self) -> None:
        self.drains += 1

    def control(self, path: Path, **settings: Any) -> SupervisorControl:
        return SupervisorControl(
            ControlSection(path=str(path), **settings),
            get_logger(service="odin-test"),
            state=lambda: self.host,
            identity=self.identity,
            reload=self.reload,
            drain=self.drain,
            path=path,
        )


@asynccontextmanager
async def serving(control: SupervisorControl) -> AsyncIterator[SupervisorControl]:
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            assert await nursery.start(control.run) == control.path
        yield control
        nursery.cancel_scope.cancel()


async def test_the_supervisor_says_who_it_is_and_reports_its_workers(socket_dir: Path) -> None:
    supervisor = Supervisor(socket_dir)
    control = supervisor.control(socket_dir / "run" / "odin-4200.sock")
    async with serving(control):
        assert stat.S_IMODE(os.stat(socket_dir / "run").st_mode) == 0o700
        assert stat.S_IMODE(os.stat(control.path).st_mode) == 0o600
        with capture_logs() as logs:
            async with attached(control.path) as c:
                hello = await c.result("hello")
                assert (hello["role"], hello["pid"], hello["workers"]) == ("supervisor", 4200, 2)
                assert converter.structure(await c.result("workers"), HostWorkers) == (
                    supervisor.host
                )
                # The current view each time.
                supervisor.host = host_state(socket_dir, restarting=True)
                workers = converter.structure(await c.result("workers"), HostWorkers)
                assert [w.state for w in workers.workers] == ["up", "restarting"]
        commands = [log["cmd"] for log in logs if log["event"] == "control_command"]
        assert commands == ["hello", "workers", "workers"]
    assert not control.path.exists()


async def test_the_supervisor_reloads_its_workers_or_says_why_not(socket_dir: Path) -> None:
    supervisor = Supervisor(socket_dir)
    async with (
        serving(supervisor.control(socket_dir / "odin.sock")) as control,
        attached(control.path) as c,
    ):
        with capture_logs() as logs:
            reloaded = await c.result("reload")
        assert reloaded == {"changed": ["log.level"], "restart_required": ["server.port"]}
        assert supervisor.reload.calls == 1
        said = [log for log in logs if log["event"] == "control_reload"]
        assert [(log["level"], log["outcome"]) for log in said] == [("warning", "applied")]

        supervisor.reload.answer = ConfigError(["server.port: must be from 1 to 65535"])
        reply = await c.call("reload")
        assert reply["error"] == {
            "code": "config_invalid",
            "message": "server.port: must be from 1 to 65535",
        }
        assert control.errors["config_invalid"] == 1


async def test_drain_stops_every_worker_once(socket_dir: Path) -> None:
    supervisor = Supervisor(socket_dir)
    async with (
        serving(supervisor.control(socket_dir / "odin.sock")) as control,
        attached(control.path) as c,
    ):
        with capture_logs() as logs:
            assert await c.result("drain") == {"connections": 0, "timeout": 0.0}
        assert supervisor.drains == 1
        assert any(log["event"] == "control_drain" and log["pid"] == os.getpid() for log in logs)
        assert (await c.call("drain"))["error"]["code"] == "draining"
        assert supervisor.drains == 1


@pytest.mark.parametrize(
    "command",
    sorted(set(COMMANDS) - {"hello", "workers", "reload", "drain"}),
)
async def test_every_other_command_points_to_the_workers_sockets(
    socket_dir: Path, command: str
) -> None:
    supervisor = Supervisor(socket_dir)
    conn = {"conn": "x-1"}
    arguments: dict[str, dict[str, Any]] = {"inspect": conn, "kick": conn, "tap": conn}
    async with (
        serving(supervisor.control(socket_dir / "odin.sock")) as control,
        attached(control.path) as c,
    ):
        reply = await c.call(command, **arguments.get(command, {}))
        assert reply["error"]["code"] == "unavailable"
        message = reply["error"]["message"]
        assert message.startswith(f"{command}: a supervisor serves no clients")
        assert str(socket_dir / "odin-4301.sock") in message
        assert str(socket_dir / "odin-4302.sock") in message
        assert control.errors["unavailable"] == 1
        assert (await c.result("hello"))["role"] == "supervisor"  # the console stays


async def test_the_supervisor_keeps_the_limits_and_the_allowed_users(socket_dir: Path) -> None:
    supervisor = Supervisor(socket_dir)
    control = supervisor.control(
        socket_dir / "odin.sock", command_burst=2, commands_per_second=0.01, allow_root=False
    )
    async with serving(control):
        async with attached(control.path) as c:
            await c.result("hello")
            await c.result("workers")
            assert (await c.call("workers"))["error"]["code"] == "rate_limited"
        control.uid = os.getuid() + 4242  # as if the supervisor ran as another user
        async with attached(control.path) as c:
            refusal = await c.line()
            assert refusal is not None
            assert refusal["error"]["code"] == "permission_denied"
            assert await c.line() is None
        assert control.errors == {"rate_limited": 1, "permission_denied": 1}


async def test_a_socket_it_cannot_set_up_leaves_the_supervisor_running(socket_dir: Path) -> None:
    (socket_dir / "odin.sock").write_text("not a socket")
    supervisor = Supervisor(socket_dir)
    control = supervisor.control(socket_dir / "odin.sock")
    with capture_logs() as logs:
        async with serving(control):
            pass
    refused = [log for log in logs if log["event"] == "control_unavailable"]
    assert refused and "is not a socket" in refused[0]["error"]
    assert (socket_dir / "odin.sock").read_text() == "not a socket"
