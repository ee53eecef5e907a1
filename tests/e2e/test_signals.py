"""SIGTERM drains a real server process: clients are told when to come back, closed with
1001, and the process exits 0; a second signal cuts the drain short."""

from __future__ import annotations

import signal

import pytest
import trio

from tests.e2e.process import odin_process, port_of
from tests.helpers import RawClient, hold_clients, open_client

pytestmark = [pytest.mark.trio, pytest.mark.slow]


async def test_sigterm_sends_reconnect_hints_closes_1001_and_exits_0() -> None:
    args = [
        "serve", "--port", "0", "--simulate", "--rate", "50",
        "--set", "shutdown.reconnect_min_ms=200", "--set", "shutdown.reconnect_max_ms=2000",
    ]  # fmt: skip
    with odin_process(args) as odin:
        port = port_of(odin.wait_for("listening"))
        async with trio.open_nursery() as nursery:
            results = await hold_clients(
                nursery, lambda: open_client(port), 3, ["*.trade"], events=3
            )
            odin.signal(signal.SIGTERM)
        assert odin.wait(timeout=15) == 0
    after = set()
    for messages, code, reason in results:
        assert (code, reason) == (1001, "server shutting down")
        hints = [m for m in messages if m["type"] == "reconnect"]
        assert len(hints) == 1
        assert 200 <= hints[0]["after_ms"] <= 2000
        after.add(hints[0]["after_ms"])
        # Events delivered before the hint are whole and in order.
        seqs = [m["seq"] for m in messages if "seq" in m]
        assert seqs == sorted(seqs)
    events = [record["event"] for record in odin.records()]
    assert events.index("signal") < events.index("draining") < events.index("stopped")
    assert events.count("conn_close") == 3


async def test_a_second_signal_stops_a_stuck_drain_at_once() -> None:
    args = ["serve", "--port", "0", "--set", "shutdown.drain_timeout=60"]
    with odin_process(args) as odin:
        port = port_of(odin.wait_for("listening"))
        # A client that never reads or answers: the drain would wait for it.
        stuck = await RawClient.connect(port)
        await stuck.send_json({"type": "subscribe", "data": {"channels": ["BTC.trade"]}})
        odin.signal(signal.SIGTERM)
        odin.wait_for("draining")
        odin.signal(signal.SIGINT)
        assert odin.wait(timeout=10) == 130
        stuck.close()


async def test_every_log_line_is_one_json_object() -> None:
    with odin_process(["serve", "--port", "0", "--simulate"]) as odin:
        odin.wait_for("listening")
        odin.signal(signal.SIGTERM)
        assert odin.wait() == 0
    records = odin.records()  # raises if any line is not JSON
    assert all({"event", "level", "timestamp"} <= record.keys() for record in records)
    assert [r["event"] for r in records[-1:]] == ["exited"]
    assert records[-1]["code"] == 0
