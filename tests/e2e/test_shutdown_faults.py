"""SIGTERM stops a server cleanly whatever NATS is doing: down, coming back, or cut off by a
silent partition. Every shutdown path ends with exit 0 and JSON lines only: no traceback."""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest
import trio

from tests.e2e.process import OdinProcess, odin_process, port_of
from tests.helpers import hold_clients, open_client
from tests.nats.support import NatsServer, Proxy, odin_url_args

pytestmark = [pytest.mark.trio, pytest.mark.slow]


async def wait_for(odin: OdinProcess, event: str, **fields: object) -> dict[str, object]:
    return await trio.to_thread.run_sync(lambda: odin.wait_for(event, 20, **fields))


def args_for(url: str) -> list[str]:
    return [*odin_url_args(url), "--simulate", "--rate", "50", "--set", "log.level=info"]


async def serve_then_stop(url: str, fault: Callable[[OdinProcess], object]) -> OdinProcess:
    """Odin on ``url`` with clients and the simulator; apply ``fault``; SIGTERM; wait for the
    exit. Returns the finished process for its log."""
    with odin_process(args_for(url)) as odin:
        await wait_for(odin, "broker_ready")
        port = port_of(await wait_for(odin, "listening"))
        async with trio.open_nursery() as nursery:
            closed = await hold_clients(
                nursery, lambda: open_client(port), 2, ["*.trade"], events=2
            )
            result = fault(odin)
            if result is not None:
                await result  # type: ignore[misc]
            odin.signal(signal.SIGTERM)
            assert await trio.to_thread.run_sync(odin.wait) == 0
        assert all(code == 1001 for _, code, _ in closed)
    assert_clean_log(odin)
    return odin


def assert_clean_log(odin: OdinProcess) -> None:
    text = "\n".join(odin.lines)
    assert "Traceback" not in text and "CancelledError" not in text
    records = odin.records()  # raises if any line is not one JSON object
    assert records[-1]["event"] == "exited" and records[-1]["code"] == 0
    assert not [r for r in records if r["level"] == "error"], [
        r for r in records if r["level"] == "error"
    ]


async def test_sigterm_while_nats_is_down(nats_server: NatsServer) -> None:
    async def fault(odin: OdinProcess) -> None:
        nats_server.kill()
        await wait_for(odin, "nats_disconnected")

    await serve_then_stop(nats_server.url, fault)


async def test_sigterm_while_reconnecting_to_a_restarted_nats(nats_server: NatsServer) -> None:
    async def fault(odin: OdinProcess) -> None:
        nats_server.kill()
        await wait_for(odin, "nats_disconnected")
        nats_server.start()  # SIGTERM goes out while the links are coming back

    await serve_then_stop(nats_server.url, fault)


async def test_sigterm_during_a_silent_partition(nats_server: NatsServer) -> None:
    proxy = Proxy(nats_server.port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)

        async def fault(odin: OdinProcess) -> None:
            proxy.set("blackhole")
            await wait_for(odin, "nats_disconnected")

        await serve_then_stop(f"nats://127.0.0.1:{proxy.port}", fault)
        nursery.cancel_scope.cancel()


async def test_sigterm_when_nats_and_the_proxy_stop_together(nats_server: NatsServer) -> None:
    proxy = Proxy(nats_server.port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)

        def fault(odin: OdinProcess) -> None:
            proxy.set("reset")
            nats_server.kill()

        await serve_then_stop(f"nats://127.0.0.1:{proxy.port}", fault)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("moment", ["signal", "draining", "stopped"])
async def test_sigterm_with_nats_and_the_proxy_stopped_during_the_drain(
    nats_server: NatsServer, moment: str
) -> None:
    """NATS and the proxy go at the moment the server logs ``moment``: the broker's links are
    then closing with the peer vanishing under them (once a CancelledError traceback)."""
    proxy = Proxy(nats_server.port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        with odin_process(args_for(f"nats://127.0.0.1:{proxy.port}")) as odin:
            await wait_for(odin, "broker_ready")
            odin.signal(signal.SIGTERM)
            await wait_for(odin, moment)
            proxy.set("reset")
            nats_server.kill()
            code = await trio.to_thread.run_sync(odin.wait)
            assert code == 0, "\n".join(odin.lines[-40:])
        assert_clean_log(odin)
        nursery.cancel_scope.cancel()
