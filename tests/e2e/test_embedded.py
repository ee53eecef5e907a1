"""The default broker: an embedded nats-server shared by the Odins of one data directory,
whose store outlives them, and ``odin demo``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from odin_fanout.broker.embedded import Layout, read_state
from tests.e2e.embedded_support import kill_leftovers, running, wait_until_gone
from tests.e2e.process import ROOT, odin_command, odin_process, port_of
from tests.helpers import checkpoint_chain, http_get, open_client

pytestmark = [pytest.mark.trio, pytest.mark.slow]

SIMULATE = ["--simulate", "--rate", "50", "--tokens", "BTC"]


@pytest.fixture
def state_home(tmp_path: Path) -> Iterator[Path]:
    """$XDG_STATE_HOME of the test; no nats-server on it may outlive the test."""
    yield tmp_path
    assert kill_leftovers(tmp_path) == []


def layout_in(state_home: Path) -> Layout:
    return Layout(state_home / "odin" / "nats")


async def test_a_second_odin_joins_and_serves_on_when_the_first_stops(state_home: Path) -> None:
    env = {"XDG_STATE_HOME": str(state_home)}
    with odin_process(["serve", "--port", "0"], env=env) as first:
        started = first.wait_for("nats_embedded_started")
        first_port = port_of(first.wait_for("listening"))
        first.wait_for("broker_ready")
        with odin_process(["serve", "--port", "0", *SIMULATE], env=env) as second:
            joined = second.wait_for("nats_embedded_joined")
            assert (joined["url"], joined["nats_pid"]) == (started["url"], started["nats_pid"])
            second_port = port_of(second.wait_for("listening"))
            second.wait_for("broker_ready")
            # One store: what the second publishes, a client of the first receives too.
            async with open_client(first_port) as client:
                await client.subscribe(["BTC.trade"])
                assert len(await client.events(3, timeout=10)) == 3
            messages: list[dict[str, Any]] = []
            statuses: list[int] = []

            async def read(client: Any) -> None:
                while True:
                    messages.append(await client.recv(timeout=10))

            async def poll_ready() -> None:
                while True:
                    statuses.append((await http_get(second_port, "/ready"))[0])
                    await trio.sleep(0.05)

            async with open_client(second_port) as client:
                await client.subscribe(["BTC.trade"])
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read, client)
                    nursery.start_soon(poll_ready)
                    first.signal(signal.SIGTERM)
                    assert await trio.to_thread.run_sync(first.wait) == 0
                    left = [
                        r for r in first.records() if r["event"] == "nats_embedded_left_running"
                    ]
                    assert left and left[0]["owner"] is True
                    takeover = await trio.to_thread.run_sync(
                        second.wait_for, "nats_embedded_takeover"
                    )
                    assert takeover["nats_pid"] == started["nats_pid"]
                    assert takeover["restarted"] is False
                    # Events keep coming on the second after it has taken over.
                    target = len(messages) + 25
                    with trio.fail_after(10):
                        while len(messages) < target:
                            await trio.sleep(0.05)
                    nursery.cancel_scope.cancel()
            events = [m for m in messages if "seq" in m]
            assert checkpoint_chain(events, {}) == []
            assert [m for m in messages if m["type"] == "gap"] == []
            assert statuses and set(statuses) == {200}
            state = read_state(layout_in(state_home).state)
            assert state is not None and state.pid == started["nats_pid"]
            second.signal(signal.SIGTERM)
            assert second.wait() == 0
            assert "nats_embedded_stopped" in [r["event"] for r in second.records()]
    assert wait_until_gone(state.pid, state_home, timeout=1)
    assert not layout_in(state_home).state.exists()


async def test_an_odin_adopts_the_nats_server_of_one_that_was_killed(state_home: Path) -> None:
    env = {"XDG_STATE_HOME": str(state_home)}
    args = ["serve", "--port", "0", *SIMULATE]
    with odin_process(args, env=env) as odin:
        port = port_of(odin.wait_for("listening"))
        nats_pid = odin.wait_for("nats_embedded_started")["nats_pid"]
        odin.wait_for("broker_ready")
        async with open_client(port) as client:
            await client.subscribe(["BTC.trade"])
            seen = await client.events(5)
        odin.process.kill()  # no drain, no chance to stop its nats-server
        odin.process.wait()
    assert running(nats_pid, state_home)
    # Its owner is provably gone (owner.lock with it): the next Odin adopts its nats-server,
    # and the history is there.
    with odin_process(args, env=env) as odin:
        assert odin.wait_for("nats_embedded_adopted")["nats_pid"] == nats_pid
        port = port_of(odin.wait_for("listening"))
        odin.wait_for("broker_ready")
        position = {"epoch": seen[-1]["epoch"], "seq": seen[-1]["seq"]}
        async with open_client(port) as client:
            ack = await client.subscribe(["BTC.trade"], recover={"BTC.trade": position})
            assert ack["recovery"]["BTC.trade"]["recovered"] is True, ack
            missed = ack["recovery"]["BTC.trade"]["count"]
            after = await client.events(missed + 3)
        odin.signal(signal.SIGTERM)
        assert odin.wait() == 0
    assert checkpoint_chain(after, {"BTC.trade": position["seq"]}) == []
    assert wait_until_gone(nats_pid, state_home, timeout=1)


async def test_an_embedded_port_in_use_fails_the_start_in_one_line(state_home: Path) -> None:
    env = {"XDG_STATE_HOME": str(state_home)}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["serve", "--port", "0", "--set", f"nats.embedded_port={port}"]
        with odin_process(args, env=env) as odin:
            assert odin.wait() == 1
    failed = [json.loads(line) for line in odin.lines if '"start_failed"' in line]
    assert len(failed) == 1
    assert failed[0]["error"] == f"address 127.0.0.1:{port} already in use (nats.embedded_port)"
    assert not layout_in(state_home).state.exists()


async def test_demo_prints_where_to_look_and_streams(state_home: Path) -> None:
    process = await trio.lowlevel.open_process(
        odin_command("demo", "--port", "0", "--rate", "50"),
        cwd=ROOT,
        env={**os.environ, "XDG_STATE_HOME": str(state_home)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        output = b""
        with trio.fail_after(20):
            while output.count(b"\n") < 7:
                output += await process.stdout.receive_some(4096)
        banner = output.decode().splitlines()
        assert banner[0].startswith("Odin demo")
        url = banner[1].split()[-1]
        assert url.startswith("ws://127.0.0.1:")
        assert "nats://127.0.0.1:" in banner[4]
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        async with open_client(port) as client:
            await client.subscribe(["*.trade"])
            events = await client.events(5, timeout=15)
        assert {e["type"] for e in events} == {"price:update"}
        process.send_signal(signal.SIGINT)
        with trio.fail_after(15):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        assert process.stdout is not None
        await process.stdout.aclose()
