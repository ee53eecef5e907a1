"""``python -m odin_fanout.stress run`` as an operator runs it: against an Odin started here it
passes with every check, against a server that skips an event it fails, and it refuses to load a
remote host unless told."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.asyncio.server import ServerConnection, serve

from tests.e2e.process import ROOT, odin_process, port_of

pytestmark = pytest.mark.slow


def stress(*args: str, timeout: float = 90) -> tuple[int, dict[str, Any], str]:
    """Run the tool; its exit code, its JSON result and its output."""
    out = Path(args[args.index("--json") + 1]) if "--json" in args else None
    result = subprocess.run(
        [sys.executable, "-m", "odin_fanout.stress", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    document = json.loads(out.read_text()) if out is not None and out.exists() else {}
    return result.returncode, document, result.stdout + result.stderr


def test_the_smoke_profile_against_odin_checks_every_stream_and_recovery(
    tmp_path: Path,
) -> None:
    args = ["serve", "--broker", "memory", "--simulate", "--rate", "50", "--port", "0"]
    with odin_process(args) as odin:
        port = port_of(odin.wait_for("listening"))
        code, result, output = stress(
            "run", "--profile", "smoke", "--url", f"ws://127.0.0.1:{port}/ws", "--plain",
            "--server-pid", str(odin.pid), "--json", str(tmp_path / "smoke.json"),
        )  # fmt: skip
    assert code == 0, output
    assert result["connected_pct"] == 100.0
    assert result["events"] > 100
    continuity = result["continuity"]
    assert continuity["violations"] == 0
    # Every client dropped at 4 s and came back recovering its channels, all restored.
    assert result["reconnects"] == 20
    assert continuity["recoveries"] == continuity["recovered"] > 0
    assert result["latency_ms"]["p50"] is not None
    assert result["server"]["rss_max_mib"] is not None
    assert "OK" in output


@contextmanager
def skipping_server() -> Iterator[int]:
    """A WebSocket server that acks a subscription, then sends events of BTC.trade whose
    chain skips a position without a gap notice (a silent loss), and one twice."""

    async def handler(connection: ServerConnection) -> None:
        await connection.recv()
        ack = {"type": "subscription_ack", "subscribed": ["BTC.trade"], "count": 1,
               "positions": {"BTC.trade": {"epoch": "e", "seq": 0}}}  # fmt: skip
        await connection.send(json.dumps(ack))
        chain = [(1, 0), (2, 1), (4, 3), (5, 4), (5, 4)]  # 3 silently lost, 5 sent twice
        for seq, prev in chain:
            event = {"type": "price:update", "channel": "BTC.trade", "seq": seq,
                     "prev": prev, "epoch": "e", "ts": 0, "data": {}}  # fmt: skip
            await connection.send(json.dumps(event))
        await connection.wait_closed()

    ready: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Event]] = []
    failed: list[BaseException] = []

    async def main() -> None:
        stop = asyncio.Event()
        async with serve(handler, "127.0.0.1", 0) as server:
            ready.append((server.sockets[0].getsockname()[1], asyncio.get_running_loop(), stop))
            await stop.wait()

    def thread_main() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # reported to the test below
            failed.append(exc)

    thread = threading.Thread(target=thread_main, daemon=True)
    thread.start()
    started = threading.Event()
    try:
        while not ready:
            if failed or not thread.is_alive():
                raise RuntimeError(f"the test server did not start: {failed}")
            started.wait(0.01)
        yield ready[0][0]
    finally:
        if ready:
            ready[0][1].call_soon_threadsafe(ready[0][2].set)
        thread.join(timeout=10)


def test_a_server_that_loses_or_repeats_an_event_fails_the_run(tmp_path: Path) -> None:
    with skipping_server() as port:
        code, result, output = stress(
            "run", "--profile", "light", "--connections", "3", "--duration", "3",
            "--channels", "BTC.trade", "--subscription-mode", "all", "--plain",
            "--url", f"ws://127.0.0.1:{port}/", "--json", str(tmp_path / "bad.json"),
        )  # fmt: skip
    assert code == 1, output
    assert result["continuity"]["silent_gaps"] == 3
    assert result["continuity"]["duplicates"] == 3
    assert "invariant broken" in output


def test_a_remote_target_needs_allow_remote() -> None:
    code, _, output = stress("run", "--url", "ws://192.0.2.10:3002/ws", timeout=30)
    assert code == 2
    assert "not loopback" in output
    assert websockets  # the peer library used above is the real one
