"""The console's control client against a fake server and a few raw sockets: ids match
replies, updates arrive, and every way a link fails is reported and retried."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import orjson
import pytest

from odin_fanout.console.client import ControlClient, NotConnected, RequestFailed
from odin_fanout.console.link import LinkState, LinkStatus
from odin_fanout.control.paths import owner_running
from odin_fanout.control.protocol import (
    ChannelInfo,
    ConnectionDetail,
    ConnectionInfo,
    Hello,
    History,
    Inspect,
    ListChannels,
    ListConnections,
    Page,
    RateHistory,
    ServerEvent,
    SnapshotRequest,
    Update,
    Watch,
)
from tests.console.conftest import (
    ServerFactory,
    dead_pid,
    eventually,
    left_socket,
    owner_unknown,
)
from tests.console.demo import connections_page, demo_data, sample_history


class Recorder:
    def __init__(self) -> None:
        self.statuses: list[LinkStatus] = []
        self.updates: list[Update] = []
        self.histories: list[RateHistory] = []

    @property
    def state(self) -> LinkState | None:
        return self.statuses[-1].state if self.statuses else None


def make_client(path: Path, recorder: Recorder, **options: object) -> ControlClient:
    options.setdefault("owner_running", owner_unknown)
    return ControlClient(
        path,
        on_link=recorder.statuses.append,
        on_update=recorder.updates.append,
        on_history=recorder.histories.append,
        backoff=(0.05, 0.2),
        **options,  # type: ignore[arg-type]
    )


@contextlib.asynccontextmanager
async def running(client: ControlClient) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(client.run())
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_server(path: Path, handler: Handler) -> AsyncIterator[None]:
    """A socket that says what ``handler`` says, protocol or not."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_unix_server(serve, path)
    try:
        yield
    finally:
        server.close()


@pytest.mark.asyncio
async def test_hello_snapshot_and_watch_then_updates_and_matched_replies(
    fake_server: ServerFactory,
) -> None:
    server = await fake_server()
    recorder = Recorder()
    client = make_client(server.path, recorder, interval=0.5)
    async with running(client):
        await eventually(lambda: client.status.up and server.watchers, "connected and watching")
        assert [type(c) for c in server.received] == [Hello, History, SnapshotRequest, Watch]
        assert server.commands(Watch) == [Watch(0.5)]
        # The fake answers history as an older server does: the charts start empty.
        assert server.commands(History) == [History(3600, 1)]
        assert recorder.histories == []
        identity = client.status.identity
        assert identity is not None
        assert identity.instance == "a3f9"
        assert recorder.statuses[0].state is LinkState.CONNECTING
        await eventually(lambda: len(recorder.updates) == 2, "the snapshot and a first update")
        assert recorder.updates[0].events == []
        assert len(recorder.updates[1].events) == 14  # the demo's events, sent after watch
        server.data.events = [ServerEvent(9, 1.0, "kick", "a3f9-3")]
        await server.push()
        await eventually(lambda: len(recorder.updates) == 3, "the pushed update")
        assert [e.conn for e in recorder.updates[2].events] == ["a3f9-3"]

        # Several requests at once: each reply goes to its own request.
        by_sent, by_id, channels = await asyncio.gather(
            client.request(ListConnections(limit=3, sort="sent"), Page[ConnectionInfo]),
            client.request(
                ListConnections(limit=2, sort="id", descending=False), Page[ConnectionInfo]
            ),
            client.request(ListChannels(limit=4, filter="BTC"), Page[ChannelInfo]),
        )
        expected = connections_page(server.data.connections, ListConnections(limit=3, sort="sent"))
        assert by_sent == expected
        assert [c.id for c in by_id.items] == ["a3f9-1", "a3f9-2"]
        assert {c.name for c in channels.items} == {"BTC.trade", "BTC.liquidity", "BTC.metadata"}
        detail = await client.request(Inspect("a3f9-1"), ConnectionDetail)
        assert detail.connection.id == "a3f9-1"
        with pytest.raises(RequestFailed) as failed:
            await client.request(Inspect("nobody"), ConnectionDetail)
        assert failed.value.code == "not_found"


@pytest.mark.asyncio
async def test_the_servers_last_hour_comes_before_the_snapshot(
    fake_server: ServerFactory,
) -> None:
    data = demo_data("a3f9", 101)
    data.history = sample_history(3600)
    server = await fake_server(data)
    recorder = Recorder()
    # A point per update: 5 s apart at --interval 5, so 720 for the hour.
    client = make_client(server.path, recorder, interval=5.0)
    async with running(client):
        await eventually(lambda: recorder.histories and recorder.updates, "history and snapshot")
        assert server.commands(History) == [History(3600, 5)]
        assert recorder.histories == [data.history]


@pytest.mark.asyncio
async def test_a_lost_server_is_reported_and_found_again_at_the_same_path(
    fake_server: ServerFactory,
) -> None:
    server = await fake_server()
    recorder = Recorder()
    client = make_client(server.path, recorder)
    async with running(client):
        await eventually(lambda: client.status.up, "connected")
        await server.stop()
        await eventually(lambda: recorder.state is LinkState.LOST, "lost")
        with pytest.raises(NotConnected):
            await client.request(Inspect("a3f9-1"), ConnectionDetail)
        await server.start()
        await eventually(lambda: client.status.up, "connected again")
        await eventually(lambda: len(server.commands(Watch)) == 2, "watching again")


@pytest.mark.parametrize(
    ("owner", "state", "detail"),
    [
        ("dead", LinkState.GONE, "socket left by pid {pid}, not running"),
        ("running", LinkState.NOT_ANSWERING, "connection refused; pid {pid} is running"),
        ("unnamed", LinkState.LOST, "connection refused"),
    ],
)
@pytest.mark.asyncio
async def test_a_refused_socket_is_told_by_its_process(
    socket_dir: Path, owner: str, state: LinkState, detail: str
) -> None:
    pid = {"dead": dead_pid(), "running": os.getpid(), "unnamed": 0}[owner]
    name = f"odin-{pid}.sock" if owner != "unnamed" else "control.sock"
    path = left_socket(socket_dir / name)
    recorder = Recorder()
    async with running(make_client(path, recorder, owner_running=owner_running)):
        await eventually(lambda: recorder.state is state, state.value)
    assert recorder.statuses[-1].detail == detail.format(pid=pid)


@pytest.mark.asyncio
async def test_a_missing_socket_is_said_and_attached_once_it_appears(
    fake_server: ServerFactory,
) -> None:
    server = await fake_server(start=False)
    recorder = Recorder()
    client = make_client(server.path, recorder)
    async with running(client):
        await eventually(lambda: recorder.state is LinkState.MISSING, "missing")
        await server.start()
        await eventually(lambda: client.status.up, "connected")


@pytest.mark.asyncio
async def test_eacces_on_connect_is_permission_denied(
    socket_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    # The tests run as root, whom file modes do not stop: play the kernel's answer.
    monkeypatch.setattr(asyncio, "open_unix_connection", refuse)
    recorder = Recorder()
    async with running(make_client(socket_dir / "odin-1.sock", recorder)):
        await eventually(lambda: recorder.state is LinkState.DENIED, "denied")
    assert recorder.statuses[-1].detail == "Permission denied"


@pytest.mark.asyncio
async def test_a_permission_denied_reply_is_permission_denied(fake_server: ServerFactory) -> None:
    server = await fake_server(deny=True)
    recorder = Recorder()
    async with running(make_client(server.path, recorder)):
        await eventually(lambda: recorder.state is LinkState.DENIED, "denied")
        await eventually(lambda: len(server.commands(Hello)) >= 2, "a retry")
    assert recorder.statuses[-1].detail == "uid 1001"


@pytest.mark.parametrize(
    ("code", "state"),
    [("permission_denied", LinkState.DENIED), ("too_many_clients", LinkState.LOST)],
)
@pytest.mark.asyncio
async def test_a_refusal_at_attach_time_is_reported(
    socket_dir: Path, code: str, state: LinkState
) -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # As the server refuses: an error with a null id, then the close.
        error = {"code": code, "message": "not for you"}
        writer.write(orjson.dumps({"id": None, "ok": False, "error": error}) + b"\n")
        await writer.drain()

    path = socket_dir / "odin-2.sock"
    recorder = Recorder()
    async with raw_server(path, refuse), running(make_client(path, recorder)):
        await eventually(lambda: recorder.state is state, state.value)
        await eventually(lambda: "not for you" in recorder.statuses[-1].detail, "why")


@pytest.mark.asyncio
async def test_another_protocol_version_stops_the_client(fake_server: ServerFactory) -> None:
    server = await fake_server(demo_data(protocol=2))
    recorder = Recorder()
    async with running(make_client(server.path, recorder)) as task:
        await eventually(task.done, "the client gave up")
    assert recorder.state is LinkState.VERSION_MISMATCH
    assert recorder.statuses[-1].detail == "the server speaks protocol 2, this console 1"
    assert [type(c) for c in server.received] == [Hello]


@pytest.mark.asyncio
async def test_a_line_over_the_limit_is_a_protocol_error(socket_dir: Path) -> None:
    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b'{"id": 1, "ok": true, "result": "' + b"x" * 4096 + b'"}\n')
        await writer.drain()
        await reader.read()

    path = socket_dir / "odin-3.sock"
    recorder = Recorder()
    async with raw_server(path, flood), running(make_client(path, recorder, max_line=1024)):
        await eventually(lambda: recorder.state is LinkState.LOST, "lost")
    assert recorder.statuses[-1].detail == "protocol error: a line longer than 1024 bytes"


@pytest.mark.asyncio
async def test_a_request_without_reply_times_out(socket_dir: Path) -> None:
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    path = socket_dir / "odin-4.sock"
    recorder = Recorder()
    async with raw_server(path, mute), running(make_client(path, recorder, request_timeout=0.2)):
        await eventually(lambda: recorder.state is LinkState.NOT_ANSWERING, "not answering")
    assert recorder.statuses[-1].detail == "timeout: no reply to hello in 0.2 s"
