"""The control socket: who may attach, what it answers, that bad input and greedy consoles
get an error and never a crash, that kick and drain really act on clients, and that reload
calls the server's reload and reports what it did or why it refused."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from odin_fanout.config import ConfigError, ControlSection
from odin_fanout.control.protocol import MAX_LINE_BYTES, PROTOCOL_VERSION
from odin_fanout.protocol.close_codes import CloseCode
from odin_fanout.server.control import ControlServer
from tests.helpers import Harness, capture_logs, make_config, running_server

pytestmark = pytest.mark.trio


class Console:
    """A bare control client: one line out, lines in."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.ids = iter(range(1, 1_000_000))

    async def send_line(self, line: bytes) -> None:
        await self.stream.send_all(line + b"\n")

    async def line(self, timeout: float = 5) -> dict[str, Any] | None:
        """The next line, or None at end of stream."""
        with trio.fail_after(timeout):
            while (end := self.buffer.find(b"\n")) < 0:
                data = await self.stream.receive_some(1 << 16)
                if not data:
                    return None
                self.buffer += data
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 1]
        result: dict[str, Any] = json.loads(line)
        return result

    async def reply(self, timeout: float = 5) -> dict[str, Any]:
        """The next line that is not a watch update."""
        while True:
            line = await self.line(timeout)
            assert line is not None, "the server closed the control connection"
            if line.get("stream") != "update":
                return line

    async def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        request_id = next(self.ids)
        await self.send_line(json.dumps({"id": request_id, "cmd": cmd, **args}).encode())
        reply = await self.reply()
        assert reply["id"] == request_id, reply
        return reply

    async def result(self, cmd: str, **args: Any) -> Any:
        reply = await self.call(cmd, **args)
        assert reply["ok"], reply
        return reply["result"]

    async def update(self, timeout: float = 5) -> dict[str, Any]:
        while True:
            line = await self.line(timeout)
            assert line is not None
            if line.get("stream") == "update":
                return line


@pytest.fixture
def socket_dir() -> Any:
    # Unix socket paths are limited to 107 bytes: pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="odin-ctl-", dir="/tmp") as directory:
        yield Path(directory) / "run"


@asynccontextmanager
async def control_for(
    harness: Harness,
    directory: Path,
    *,
    reload: Callable[[], tuple[list[str], list[str]]] | None = None,
    **settings: Any,
) -> AsyncIterator[ControlServer]:
    config = ControlSection(path=str(directory / "odin.sock"), **settings)
    control = ControlServer(
        harness.server, config, websocket=harness.listening.websocket, reload=reload
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(control.run)
        yield control
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def console(control: ControlServer) -> AsyncIterator[Console]:
    stream = await trio.open_unix_socket(str(control.path))
    async with stream:
        yield Console(stream)


# ---- the socket and who may attach --------------------------------------------------------


async def test_the_socket_is_private_and_removed_at_stop(socket_dir: Path) -> None:
    async with running_server() as harness:
        async with control_for(harness, socket_dir) as control:
            assert stat.S_IMODE(os.stat(socket_dir).st_mode) == 0o700
            assert stat.S_IMODE(os.stat(control.path).st_mode) == 0o600
            assert stat.S_ISSOCK(os.stat(control.path).st_mode)
        with pytest.raises(FileNotFoundError):
            os.stat(control.path)


async def test_a_stale_socket_is_replaced_and_a_live_one_is_left_alone(socket_dir: Path) -> None:
    os.mkdir(socket_dir, 0o700)
    stale = trio.socket.socket(trio.socket.AF_UNIX)
    await stale.bind(str(socket_dir / "odin.sock"))
    stale.close()  # the file stays: a server that died
    async with (
        running_server() as harness,
        control_for(harness, socket_dir) as control,
        console(control) as c,
    ):
        assert (await c.result("hello"))["protocol"] == PROTOCOL_VERSION
        with capture_logs() as logs:
            async with control_for(harness, socket_dir) as second:
                pass
        refused = [log for log in logs if log["event"] == "control_unavailable"]
        assert refused and "in use" in refused[0]["error"]
        assert stat.S_ISSOCK(os.stat(second.path).st_mode)  # the first server's is untouched
        async with console(control) as c:
            assert (await c.result("hello"))["pid"] == os.getpid()


def left_socket(path: Path) -> Path:
    """A socket file nobody listens on: what a killed process leaves."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()
    return path


@pytest.fixture
def reaped_pid() -> int:
    """The pid of a process that ran and was reaped: not running any more."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.fixture
def running_pid() -> Iterator[int]:
    """The pid of a process that runs for the test."""
    process = subprocess.Popen(["sleep", "60"])
    try:
        yield process.pid
    finally:
        process.kill()
        process.wait()


async def test_at_start_sockets_of_dead_processes_go_and_a_running_ones_stays(
    socket_dir: Path, monkeypatch: pytest.MonkeyPatch, reaped_pid: int, running_pid: int
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(socket_dir))
    directory = socket_dir / "odin"  # the default directory
    os.makedirs(directory, 0o700)
    os.chmod(directory, 0o700)
    dead = left_socket(directory / f"odin-{reaped_pid}.sock")
    # Refused, but its process runs (started before the file): a server not listening yet.
    stuck = left_socket(directory / f"odin-{running_pid}.sock")
    other = left_socket(directory / "odin.sock")  # no pid in the name: nobody's to judge
    with capture_logs() as logs:
        async with running_server() as harness, trio.open_nursery() as nursery:
            control = ControlServer(
                harness.server, ControlSection(), websocket=harness.listening.websocket
            )
            await nursery.start(control.run)
            assert control.path == directory / f"odin-{os.getpid()}.sock"
            assert not dead.exists()
            assert stat.S_ISSOCK(os.stat(stuck).st_mode)
            assert stat.S_ISSOCK(os.stat(other).st_mode)
            nursery.cancel_scope.cancel()
    removed = [log for log in logs if log["event"] == "control_stale_removed"]
    assert [(log["path"], log["pid"]) for log in removed] == [(str(dead), reaped_pid)]


async def test_a_user_who_is_not_allowed_is_refused(socket_dir: Path) -> None:
    me = os.getuid()
    async with running_server() as harness:
        settings: dict[str, Any] = {"allow_root": False}
        with capture_logs() as logs:
            async with control_for(harness, socket_dir, **settings) as control:
                control.uid = me + 4242  # as if the server ran as another user
                async with console(control) as c:
                    refusal = await c.line()
                    assert refusal is not None
                    assert refusal["error"]["code"] == "permission_denied"
                    assert await c.line() is None
        assert any(log["event"] == "control_refused" and log["uid"] == me for log in logs), logs
        async with control_for(
            harness, socket_dir, allowed_uids=(me,), allow_root=False
        ) as control:
            control.uid = me + 4242
            async with console(control) as c:
                assert (await c.result("hello"))["server"] == "odin"


async def test_hello_names_the_server_and_every_command_is_logged_with_the_peer(
    socket_dir: Path,
) -> None:
    async with running_server() as harness, control_for(harness, socket_dir) as control:
        with capture_logs() as logs:
            async with console(control) as c:
                hello = await c.result("hello")
        assert hello["protocol"] == PROTOCOL_VERSION
        assert hello["instance"] == harness.server.context.instance
        assert hello["websocket"] == harness.listening.websocket
        commands = [
            (log["cmd"], log["pid"], log["uid"])
            for log in logs
            if log["event"] == "control_command"
        ]
        assert commands == [("hello", os.getpid(), os.getuid())]


# ---- bad input and limits -----------------------------------------------------------------


async def test_bad_requests_get_an_error_reply_and_the_console_stays(socket_dir: Path) -> None:
    async with (
        running_server() as harness,
        control_for(harness, socket_dir) as control,
        console(control) as c,
    ):
        await c.send_line(b"{not json")
        assert (await c.reply())["error"]["code"] == "bad_json"
        reply = await c.call("reboot")
        assert reply["error"]["code"] == "unknown_command"
        assert "connections" in reply["error"]["message"]
        reply = await c.call("connections", limit=0)
        assert reply["error"]["code"] == "bad_request"
        assert "limit" in reply["error"]["message"]
        reply = await c.call("kick", conn="x-1", code=3000)
        assert "code" in reply["error"]["message"]
        reply = await c.call("inspect", conn="nobody-1")
        assert reply["error"]["code"] == "not_found"
        assert (await c.result("hello"))["server"] == "odin"


async def test_a_line_longer_than_the_limit_is_refused_and_closes(socket_dir: Path) -> None:
    async with (
        running_server() as harness,
        control_for(harness, socket_dir) as control,
        console(control) as c,
    ):
        await c.stream.send_all(b"x" * (MAX_LINE_BYTES + 10))
        reply = await c.line()
        assert reply is not None
        assert reply["error"]["code"] == "line_too_long"
        assert await c.line() is None
        async with console(control) as c:  # the server is fine
            assert (await c.result("hello"))["server"] == "odin"


async def test_consoles_beyond_the_limit_are_refused(socket_dir: Path) -> None:
    async with (
        running_server() as harness,
        control_for(harness, socket_dir, max_clients=2) as control,
    ):
        async with console(control) as first, console(control) as second:
            await first.result("hello")
            await second.result("hello")
            async with console(control) as third:
                refusal = await third.line()
                assert refusal is not None
                assert refusal["error"]["code"] == "too_many_clients"
                counted = harness.server.context.metrics.samples(["odin_control_errors_total"])
                assert counted[("odin_control_errors_total", ("too_many_clients",))] == 1
                assert await third.line() is None
        with trio.fail_after(5):
            while control.clients:
                await trio.sleep(0.01)  # no event tells a console client has gone: polled, bounded
        async with console(control) as again:
            await again.result("hello")


async def test_commands_beyond_the_rate_limit_are_refused(socket_dir: Path) -> None:
    settings: dict[str, Any] = {"command_burst": 3, "commands_per_second": 0.01}
    async with (
        running_server() as harness,
        control_for(harness, socket_dir, **settings) as control,
        console(control) as c,
    ):
        for _ in range(3):
            await c.result("hello")
        reply = await c.call("hello")
        assert reply["error"]["code"] == "rate_limited"
        refused = harness.server.context.metrics.samples(["odin_control_errors_total"])
        assert refused[("odin_control_errors_total", ("rate_limited",))] == 1


# ---- what it reports ----------------------------------------------------------------------


async def test_connections_are_listed_sorted_filtered_and_paged(socket_dir: Path) -> None:
    async with (
        running_server() as harness,
        control_for(harness, socket_dir) as control,
        harness.client() as a,
        harness.client() as b,
        harness.client() as d,
        console(control) as c,
    ):
        await a.subscribe(["BTC.trade"])
        await b.subscribe(["ETH.trade", "SOL.*"])
        await d.subscribe(["ETH.trade"])
        for n in range(3):
            harness.publish("ETH.trade", {"n": n})
        await b.events(3)
        await d.events(3)
        page = await c.result("connections", sort="id", descending=False)
        assert page["total"] == 3
        ids = [item["id"] for item in page["items"]]
        assert ids == [a.hello["connection_id"], b.hello["connection_id"],
                       d.hello["connection_id"]]  # fmt: skip
        assert page["items"][1]["channels"] == ["ETH.trade", "SOL.*"]
        assert page["items"][1]["sent"] == 3
        by_channels = await c.result("connections", sort="channels", limit=1)
        assert [i["id"] for i in by_channels["items"]] == [b.hello["connection_id"]]
        assert by_channels["total"] == 3
        eth = await c.result("connections", filter="ETH", sort="id", descending=False)
        assert [i["id"] for i in eth["items"]] == ids[1:]
        second = await c.result("connections", sort="id", descending=False, offset=1, limit=1)
        assert [i["id"] for i in second["items"]] == [ids[1]]
        detail = await c.result("inspect", conn=ids[1])
        assert detail["connection"]["peer"] == page["items"][1]["peer"]
        assert detail["subscriptions"] == 2


async def test_a_connections_user_is_its_tokens_subject_never_the_token(
    socket_dir: Path,
) -> None:
    import jwt

    secret = "a-control-test-secret-of-32-bytes-!"
    config = make_config(**{"auth.hmac_secret": secret})
    signed = jwt.encode({"sub": "dana"}, secret, "HS256")
    async with (
        running_server(config) as harness,
        control_for(harness, socket_dir) as control,
        harness.client(headers=[(b"Authorization", f"Bearer {signed}".encode())]) as known,
        harness.client() as anonymous,
        console(control) as c,
    ):
        page = await c.result("connections", sort="id", descending=False)
        users = {item["id"]: item["user"] for item in page["items"]}
        assert users == {known.hello["connection_id"]: "dana",
                         anonymous.hello["connection_id"]: ""}  # fmt: skip
        assert signed not in str(page)
        found = await c.result("connections", filter="dana")
        assert [i["id"] for i in found["items"]] == [known.hello["connection_id"]]


async def test_channels_show_subscribers_rate_and_position(socket_dir: Path) -> None:
    async with (
        running_server() as harness,
        control_for(harness, socket_dir) as control,
        harness.client() as a,
        harness.client() as b,
        console(control) as c,
    ):
        await a.subscribe(["BTC.trade"])
        await b.subscribe(["BTC.*"])
        last = 0
        for n in range(5):
            last = harness.publish("BTC.trade", {"n": n})
        harness.publish("ETH.trade", {"n": 0})
        await a.events(5)
        page = await c.result("channels", sort="name", descending=False)
        channels = {item["name"]: item for item in page["items"]}
        assert set(channels) == {"BTC.trade", "ETH.trade"}
        btc = channels["BTC.trade"]
        assert btc["subscribers"] == 2
        assert btc["last_seq"] == last
        assert btc["retained"] == 5
        assert btc["rate"] == pytest.approx(0.5)
        assert channels["ETH.trade"]["subscribers"] == 0


async def test_watch_sends_snapshots_and_connection_events(socket_dir: Path) -> None:
    async with (
        running_server() as harness,
        control_for(harness, socket_dir) as control,
        console(control) as c,
    ):
        started = await c.result("watch", interval=0.2)
        assert started == {"interval": 0.2}
        async with harness.client() as a:
            await a.subscribe(["BTC.trade"])
            harness.publish("BTC.trade", {"n": 1})
            await a.events(1)
            conn = a.hello["connection_id"]
        seen: list[dict[str, Any]] = []
        with trio.fail_after(5):
            while not any(e["kind"] == "conn_close" for e in seen):
                update = await c.update()
                seen.extend(update["events"])
        kinds = [e["kind"] for e in seen if e["conn"] == conn]
        assert kinds == ["conn_open", "conn_close"]
        snapshot = update["snapshot"]
        assert snapshot["instance"] == harness.server.context.instance
        assert snapshot["deliveries"] >= 1
        assert snapshot["nats"]["connected"] is True
        assert snapshot["closed"]["client"] >= 1
        assert (await c.result("unwatch")) == {}


# ---- actions ------------------------------------------------------------------------------


async def test_kick_closes_the_connection_with_the_code(socket_dir: Path) -> None:
    async with (
        running_server() as harness,
        control_for(harness, socket_dir) as control,
        harness.client() as victim,
        harness.client() as bystander,
        console(control) as c,
    ):
        await victim.subscribe(["BTC.trade"])
        await bystander.subscribe(["BTC.trade"])
        conn = victim.hello["connection_id"]
        kicked = await c.result("kick", conn=conn, reason="bye")  # the default code
        assert kicked == {"conn": conn, "code": CloseCode.KICKED}
        _, code, reason = await victim.until_closed()
        assert (code, reason) == (CloseCode.KICKED, "bye")
        harness.publish("BTC.trade", {"n": 1})
        assert len(await bystander.events(1)) == 1
        reply = await c.call("kick", conn=conn)
        assert reply["error"]["code"] == "not_found"
        metrics = harness.server.context.metrics.samples(["odin_connections_closed_total"])
        assert metrics[("odin_connections_closed_total", ("operator",))] == 1


async def test_drain_tells_clients_to_reconnect_and_stops_the_server(socket_dir: Path) -> None:
    config = make_config(**{"shutdown.reconnect_min_ms": 10, "shutdown.reconnect_max_ms": 20})
    async with (
        running_server(config) as harness,
        control_for(harness, socket_dir) as control,
        harness.client() as client,
        console(control) as c,
    ):
        await client.subscribe(["BTC.trade"])
        drained = await c.result("drain")
        assert drained["connections"] == 1
        messages, code, _ = await client.until_closed()
        assert code == 1001
        assert messages[-1]["type"] == "reconnect"
        with trio.fail_after(10):
            await harness.server.stopped.wait()
        assert (await c.call("drain"))["error"]["code"] == "draining"


class FakeReload:
    """The server's reload as the control socket sees it: what it answers, and each call."""

    def __init__(self, answer: tuple[list[str], list[str]] | ConfigError) -> None:
        self.answer = answer
        self.calls = 0

    def __call__(self) -> tuple[list[str], list[str]]:
        self.calls += 1
        if isinstance(self.answer, ConfigError):
            raise self.answer
        return self.answer


async def test_reload_applies_and_says_what_changed_and_what_needs_a_restart(
    socket_dir: Path,
) -> None:
    reload = FakeReload((["log.level", "connection.idle_timeout"], ["server.port"]))
    async with (
        running_server() as harness,
        control_for(harness, socket_dir, reload=reload) as control,
        console(control) as c,
    ):
        await c.result("watch", interval=0.2)
        with capture_logs() as logs:
            reloaded = await c.result("reload")
        assert reloaded == {
            "changed": ["log.level", "connection.idle_timeout"],
            "restart_required": ["server.port"],
        }
        assert reload.calls == 1
        said = [log for log in logs if log["event"] == "control_reload"]
        assert len(said) == 1
        assert said[0]["level"] == "warning"
        assert (said[0]["pid"], said[0]["uid"]) == (os.getpid(), os.getuid())
        assert said[0]["changed"] == ["log.level", "connection.idle_timeout"]
        # Every watching console hears of it in its event log.
        reloads: list[dict[str, Any]] = []
        with trio.fail_after(5):
            while not reloads:
                update = await c.update()
                reloads = [event for event in update["events"] if event["kind"] == "reload"]
        assert reloads[0]["detail"]["changed"] == "log.level, connection.idle_timeout"
        assert reloads[0]["detail"]["restart_required"] == "server.port"
        assert reloads[0]["detail"]["by_pid"] == os.getpid()


async def test_a_bad_configuration_is_refused_with_its_problems(socket_dir: Path) -> None:
    problems = ["server.port: must be from 1 to 65535", "log.level: unknown level 'loud'"]
    reload = FakeReload(ConfigError(problems))
    async with (
        running_server() as harness,
        control_for(harness, socket_dir, reload=reload) as control,
        console(control) as c,
    ):
        with capture_logs() as logs:
            reply = await c.call("reload")
        assert reply["ok"] is False
        assert reply["error"]["code"] == "config_invalid"
        for problem in problems:
            assert problem in reply["error"]["message"]
        refused = [log for log in logs if log["event"] == "control_reload"]
        assert refused and refused[0]["level"] == "warning"
        assert refused[0]["problems"] == problems
        counted = harness.server.context.metrics.samples(["odin_control_errors_total"])
        assert counted[("odin_control_errors_total", ("config_invalid",))] == 1
        assert (await c.result("hello"))["server"] == "odin"  # the console stays


async def test_reload_without_a_reload_to_call_is_unavailable(socket_dir: Path) -> None:
    async with (
        running_server() as harness,
        control_for(harness, socket_dir) as control,
        console(control) as c,
    ):
        reply = await c.call("reload")
        assert reply["error"]["code"] == "unavailable"
