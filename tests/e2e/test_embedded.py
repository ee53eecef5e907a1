"""The default broker: an embedded nats-server started and stopped by Odin, whose store
outlives it, and ``odin demo``."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import trio

from tests.e2e.process import ROOT, odin_command, odin_process, port_of
from tests.helpers import checkpoint_chain, open_client

pytestmark = [pytest.mark.trio, pytest.mark.slow]


async def test_positions_survive_an_odin_that_was_killed(tmp_path: Path) -> None:
    env = {"XDG_STATE_HOME": str(tmp_path)}
    args = ["serve", "--port", "0", "--simulate", "--rate", "50", "--tokens", "BTC"]
    with odin_process(args, env=env) as odin:
        port = port_of(odin.wait_for("listening"))
        nats_pid = odin.wait_for("nats_embedded_started")["nats_pid"]
        odin.wait_for("broker_ready")
        async with open_client(port) as client:
            await client.subscribe(["BTC.trade"])
            seen = await client.events(5)
        odin.process.kill()  # no drain, no chance to stop its nats-server
        odin.process.wait()
    # Same store: the next Odin stops the orphan, restarts NATS, and the history is there.
    with odin_process(args, env=env) as odin:
        assert odin.wait_for("nats_embedded_orphan")["pid"] == nats_pid
        port = port_of(odin.wait_for("listening"))
        odin.wait_for("broker_ready")
        position = {"epoch": seen[-1]["epoch"], "seq": seen[-1]["seq"]}
        async with open_client(port) as client:
            ack = await client.subscribe(["BTC.trade"], recover={"BTC.trade": position})
            assert ack["recovery"]["BTC.trade"]["recovered"] is True, ack
            missed = ack["recovery"]["BTC.trade"]["count"]
            after = await client.events(missed + 3)
    assert checkpoint_chain(after, {"BTC.trade": position["seq"]}) == []
    with pytest.raises(ProcessLookupError):
        os.kill(nats_pid, 0)


async def test_demo_prints_where_to_look_and_streams(tmp_path: Path) -> None:
    process = await trio.lowlevel.open_process(
        odin_command("demo", "--port", "0", "--rate", "50"),
        cwd=ROOT,
        env={**os.environ, "XDG_STATE_HOME": str(tmp_path)},
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
