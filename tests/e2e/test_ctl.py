"""``odin ctl`` for real: a subprocess against a real ``odin serve --broker memory``, its output
parsed as a script would, its exit codes as documented (0, 1 refused, 2 usage, 3 unreachable)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
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
