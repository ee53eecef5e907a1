"""``odin ctl`` for real: a subprocess against a real ``odin serve --broker memory``, its output
parsed as a script would, its exit codes as documented (0, 1 refused, 2 usage, 3 unreachable)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.e2e.process import ROOT, OdinProcess, odin_command, odin_process

pytestmark = pytest.mark.slow


class Served:
    def __init__(self, odin: OdinProcess, socket: Path) -> None:
        self.odin = odin
        self.socket = socket
        self.url: str = odin.wait_for("listening")["websocket"][0]


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    args = ["serve", "--port", "0", "--broker", "memory", "--simulate", "--rate", "50"]
    with odin_process(args) as odin:
        socket = Path(odin.wait_for("control_listening")["path"])
        served = Served(odin, socket)
        odin.follow()
        yield served


def ctl(
    *args: str, user: int | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        odin_command("ctl", *args), cwd=ROOT, capture_output=True, text=True, timeout=30,
        user=user, check=False,
    )  # fmt: skip


def ctl_json(*args: str) -> Any:
    done = ctl(*args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@contextmanager
def subscribed(url: str, channels: list[str]) -> Iterator[ClientConnection]:
    with connect(url, max_queue=None) as client:
        client.send(json.dumps({"type": "subscribe", "data": {"channels": channels}}))
        while json.loads(client.recv(timeout=10))["type"] != "subscription_ack":
            pass
        yield client


def closed_by(client: ClientConnection) -> tuple[int, str]:
    """Read until the server closes; its close code and reason."""
    try:
        while True:
            client.recv(timeout=10)
    except ConnectionClosed as closed:
        received = closed.rcvd
    assert received is not None
    return received.code, received.reason


def test_status_as_json_for_one_socket_and_for_the_directory(served: Served) -> None:
    status = ctl_json("status", "--socket", str(served.socket))
    assert status["hello"]["server"] == "odin"
    assert status["hello"]["pid"] == served.odin.pid
    assert status["snapshot"]["max_connections"] > 0
    found = ctl_json("status", "--dir", str(served.socket.parent))
    assert [entry["socket"] for entry in found] == [str(served.socket)]
    assert found[0]["result"]["hello"]["pid"] == served.odin.pid
    table = ctl("status", "--dir", str(served.socket.parent))
    assert table.returncode == 0 and str(served.odin.pid) in table.stdout


def test_connections_list_a_connected_client_then_kick_closes_it(served: Served) -> None:
    socket = str(served.socket)
    with subscribed(served.url, ["BTC.trade"]) as client:
        page = ctl_json("connections", "--socket", socket, "--filter", "BTC.trade")
        (item,) = [item for item in page["items"] if item["channels"] == ["BTC.trade"]]
        detail = ctl_json("inspect", item["id"], "--socket", socket)
        assert detail["connection"]["id"] == item["id"]
        kicked = ctl("kick", item["id"], "--socket", socket, "--code", "4005", "--reason", "bye")
        assert kicked.returncode == 0, kicked.stderr
        assert closed_by(client) == (4005, "bye")


def test_a_missing_connection_is_refused_with_exit_1(served: Served) -> None:
    done = ctl("inspect", "nobody-1", "--socket", str(served.socket))
    assert done.returncode == 1
    assert "not_found" in done.stderr and done.stdout == ""


def test_tap_count_prints_that_many_json_lines(served: Served) -> None:
    with subscribed(served.url, ["*.*"]):
        done = ctl(
            "tap", "--channel", "*.*", "--count", "3", "--json", "--socket", str(served.socket)
        )
        assert done.returncode == 0, done.stderr
        lines = [json.loads(line) for line in done.stdout.splitlines()]
        assert len(lines) == 3
        assert all(line["stream"] == "tap" and line["seq"] > 0 for line in lines)
        assert all(json.loads(line["text"])["seq"] == line["seq"] for line in lines)


@pytest.mark.parametrize(
    "args",
    [
        ["tap"],  # neither --conn nor --channel
        ["tap", "--conn", "a-1", "--channel", "BTC.*"],
        ["kick", "a-1"],  # changes a server: needs --socket or --all
        ["drain"],
        ["connections", "--limit", "0"],
        ["connections", "--sort", "size"],
        ["reboot"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    done = ctl(*args, "--dir", "/nonexistent")
    assert done.returncode == 2, (done.stdout, done.stderr)


def test_no_server_found_exits_3(tmp_path: Path) -> None:
    done = ctl("status", "--dir", str(tmp_path))
    assert done.returncode == 3
    assert "no server" in done.stderr


def test_another_user_is_refused_with_exit_3(served: Served) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to run odin ctl as another user")
    nobody = 65534
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import odin_fanout.ctl"], cwd=ROOT, user=nobody,
            capture_output=True, check=False,
        )  # fmt: skip
    except PermissionError:
        probe = None
    if probe is None or probe.returncode != 0:
        pytest.skip("this interpreter cannot be run by another user here")
    done = ctl("status", "--socket", str(served.socket), user=nobody)
    assert done.returncode == 3
    assert "permission denied" in done.stderr


def until(check: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    """``check()``'s first true value, asked again until ``timeout`` (the server's ring and
    figures change on their own; it offers no event to wait on from outside)."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.1)
    return value


def test_history_gives_the_servers_figures_as_json_and_as_a_table(served: Served) -> None:
    socket = str(served.socket)
    arguments = ("history", "--socket", socket, "--seconds", "60", "--step", "1")
    # The server keeps a sample a second from its start; the simulator publishes 50 a second.

    def with_events() -> Any:
        found = ctl_json(*arguments)
        return found if sum(found["in_per_s"]) > 0 else None

    history = until(with_events, "a second with events in the server's history")
    assert history["step"] == 1 and history["capacity"] == 3600
    points = len(history["time"])
    assert 1 <= points <= 60
    for series in ("in_per_s", "out_per_s", "connections", "dropped", "gaps", "recovered"):
        assert len(history[series]) == points
    table = ctl(*arguments)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["time", "in/s", "out/s"]
    assert re.fullmatch(r"\d+ rows of 1 s \(the server keeps 3600 s\)", lines[-1]), lines[-1]
    assert len(lines) == int(lines[-1].split()[0]) + 2  # the header, the rows, the summary
    usage = ctl("history", "--socket", socket, "--seconds", "7200")
    assert usage.returncode == 2 and "seconds must be from 1 to 3600" in usage.stderr


def test_events_page_back_through_the_servers_ring(served: Served) -> None:
    socket = str(served.socket)
    with subscribed(served.url, ["BTC.trade"]):
        pass  # a connection opened and closed

    def closed_last() -> Any:
        page = ctl_json("events", "--socket", socket, "--limit", "2")
        kinds = [event["kind"] for event in page["events"]]
        return page if kinds == ["conn_open", "conn_close"] else None

    opened, closed = until(closed_last, "the connection's open and close events")["events"]
    assert opened["conn"] == closed["conn"] and opened["seq"] < closed["seq"]
    older = ctl_json("events", "--socket", socket, "--limit", "5", "--before", str(opened["seq"]))
    assert older["events"] and all(event["seq"] < opened["seq"] for event in older["events"])
    table = ctl("events", "--socket", socket, "--limit", "2")
    assert table.returncode == 0, table.stderr
    assert "conn_close" in table.stdout and opened["conn"] in table.stdout


@pytest.fixture(scope="module")
def host() -> Iterator[tuple[Path, str]]:
    """``odin serve --workers 2`` (embedded NATS, the simulator in worker 0): the directory of
    its control sockets and its WebSocket URL."""
    args = ["serve", "--workers", "2", "--port", "0", "--simulate", "--rate", "50"]
    with odin_process(args) as odin:
        odin.follow()
        url = odin.wait_for("workers_ready")["websocket"][0]
        yield Path(odin.wait_for("control_listening")["path"]).parent, url


def test_a_channel_tap_follows_every_worker_of_a_host(host: tuple[Path, str]) -> None:
    directory, url = host
    with contextlib.ExitStack() as clients:

        def on_both_workers() -> Any:
            """One more client; the clients of each worker, once both have some."""
            clients.enter_context(subscribed(url, ["BTC.*"]))
            listed = ctl_json("connections", "--dir", str(directory))
            totals = {entry["socket"]: entry["result"]["total"] for entry in listed}
            return totals if len(totals) == 2 and all(totals.values()) else None

        workers = until(on_both_workers, "clients on both workers (the kernel spreads them)")
        done = ctl("tap", "--channel", "BTC.*", "--count", "60", "--json", "--dir", str(directory))
        assert done.returncode == 0, done.stderr
        lines = [json.loads(line) for line in done.stdout.splitlines()]
        assert len(lines) == 60
        assert {line["socket"] for line in lines} == set(workers)
        assert all(line["channel"].startswith("BTC.") and line["seq"] > 0 for line in lines)
        # A connection is on one worker: tapped there, named or not.
        conn = lines[0]["conn"]
        one = ctl("tap", "--conn", conn, "--count", "1", "--json", "--dir", str(directory))
        assert one.returncode == 0, one.stderr
        assert [json.loads(line)["socket"] for line in one.stdout.splitlines()] == [
            lines[0]["socket"]
        ]
