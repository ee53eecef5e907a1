"""Connections own everything they hold: when they end, or the server is cancelled, nothing
is left behind; liveness is judged by any inbound frame or pong; shutdown drains politely."""

from __future__ import annotations

import gc
import weakref

import pytest
import trio
import trio.testing

from odin_fanout.server.app import OdinServer
from tests.helpers import (
    hold_clients,
    make_broker,
    make_config,
    raw_memory_client,
    running_server,
    sample,
)

pytestmark = pytest.mark.trio


def task_names() -> list[str]:
    names: list[str] = []

    def walk(task: trio.lowlevel.Task) -> None:
        names.append(task.name)
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    walk(root)
    return names


def count_tasks() -> int:
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(child) for n in task.child_nurseries for child in n.child_tasks)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return walk(root)


def assert_nothing_left(server: OdinServer) -> None:
    context = server.context
    assert context.registry.connections == {}
    assert context.registry.admitted == 0
    assert context.hub.keys == 0
    assert context.hub.subscriptions == 0
    assert sample(context.metrics.registry, "odin_connections_active") == 0


async def test_nothing_is_left_after_many_clients_come_and_go() -> None:
    refs: list[weakref.ref] = []
    config = make_config(
        **{"connection.rate_limit_burst": 3, "connection.rate_limit_abuse_threshold": 3}
    )
    async with running_server(config) as harness:
        await trio.testing.wait_all_tasks_blocked()
        baseline = count_tasks()

        async def session(index: int) -> None:
            async with harness.client() as client:
                await client.subscribe(["BTC.trade", f"S{index}.*", "*.social"])
                refs.extend(weakref.ref(c) for c in harness.context.registry.connections.values())
                if index % 3 == 0:
                    # Leave without a close frame: drop the TCP connection.
                    await client.stream.aclose()
                elif index % 3 == 1:
                    # Get closed for abusing the rate limit.
                    try:
                        for _ in range(20):
                            await client.send({"type": "heartbeat"})
                    except Exception:  # the server may close first
                        pass
                    await client.until_closed()

        for _ in range(3):
            async with trio.open_nursery() as nursery:
                for index in range(20):
                    nursery.start_soon(session, index)
            harness.publish("BTC.trade", {"n": 1})
        await harness.wait_connections(0)
        assert_nothing_left(harness.server)
        with trio.move_on_after(5):
            while count_tasks() != baseline:  # the connections' nurseries have exited
                await trio.sleep(0.01)
        assert count_tasks() == baseline, task_names()
        gc.collect()
        assert refs and all(ref() is None for ref in refs)
        assert harness.sample("odin_connections_total") == 60


async def test_cancelling_the_server_cleans_up_every_connection() -> None:
    config = make_config()
    broker = make_broker(config)
    server = OdinServer(config, broker)
    async with trio.open_nursery() as outer:
        await trio.testing.wait_all_tasks_blocked()
        baseline = count_tasks()
        async with trio.open_nursery() as server_scope:
            listening = await server_scope.start(lambda task_status: server.run(
                task_status=task_status))  # fmt: skip
            from tests.helpers import Harness

            harness = Harness(server, broker, listening, server_scope)

            closed = await hold_clients(outer, harness.client, 10, ["BTC.trade"])
            server_scope.cancel_scope.cancel()
        assert_nothing_left(server)
    assert len(closed) == 10
    await trio.testing.wait_all_tasks_blocked()
    assert count_tasks() == baseline


async def test_idle_client_that_answers_no_ping_is_closed(autojump_clock) -> None:
    config = make_config(**{"connection.ping_interval": 10, "connection.idle_timeout": 30})
    async with running_server(config, memory=True) as harness:
        stream, _ = await raw_memory_client(harness)
        start = trio.current_time()
        # The client now goes silent: it reads nothing and answers no ping.
        await harness.wait_connections(0, timeout=100)
        assert 30 <= trio.current_time() - start <= 45
        assert harness.sample("odin_connections_closed_total", reason="idle") == 1
        await stream.aclose()


async def test_a_client_that_only_answers_pings_stays_connected(autojump_clock) -> None:
    config = make_config(**{"connection.ping_interval": 10, "connection.idle_timeout": 30})
    async with running_server(config, memory=True) as harness, harness.client() as client:
        await client.subscribe(["BTC.trade"])
        await trio.sleep(300)  # ten idle timeouts, answering only the server's pings
        assert len(harness.context.registry.connections) == 1
        seq = harness.publish("BTC.trade", {"n": 1})
        assert [e["seq"] for e in await client.events(1)] == [seq]


async def test_shutdown_tells_clients_to_reconnect_then_closes_with_1001() -> None:
    config = make_config(**{"shutdown.reconnect_min_ms": 100, "shutdown.reconnect_max_ms": 900})
    async with running_server(config) as harness:
        async with trio.open_nursery() as nursery:
            results = await hold_clients(nursery, harness.client, 5, ["BTC.trade"])
            harness.server.request_shutdown()
            with trio.fail_after(10):
                await harness.server.stopped.wait()
        assert_nothing_left(harness.server)
    assert len(results) == 5
    for messages, code, reason in results:
        assert (code, reason) == (1001, "server shutting down")
        (hint,) = [m for m in messages if m["type"] == "reconnect"]
        assert 100 <= hint["after_ms"] <= 900


async def test_draining_server_refuses_new_upgrades() -> None:
    from tests.helpers import http_exchange, upgrade_request

    config = make_config(**{"shutdown.drain_timeout": 5})
    async with running_server(config) as harness, harness.client() as client:
        harness.server.request_shutdown()
        with trio.fail_after(5):
            while not harness.context.registry.draining:
                await trio.sleep(0.001)  # draining is a flag with no event: polled, bounded
        # The listener is closed by now; the old client is told to go.
        with pytest.raises(OSError):
            await http_exchange(harness.port, upgrade_request())
        _, code, _ = await client.until_closed()
        assert code == 1001


async def test_a_ping_racing_our_close_frame_is_not_an_error() -> None:
    from wsproto.events import CloseConnection

    from tests.helpers import RawClient, capture_logs

    with capture_logs() as logs:
        async with running_server() as harness:
            client = await RawClient.connect(harness.port)
            await client.send_json({"type": "subscribe", "data": {"channels": ["BTC.trade"]}})
            await client.read_messages(lambda ms: any(m["type"] == "subscription_ack" for m in ms))
            harness.server.request_shutdown()
            events = await client.read_events(
                lambda events: any(isinstance(e, CloseConnection) for e in events)
            )
            (close,) = [e for e in events if isinstance(e, CloseConnection)]
            assert close.code == 1001
            # The server has sent its close frame; our ping reaches it before our close reply.
            # (Built by hand: wsproto refuses to ping after receiving a close.)
            mask = b"\x01\x02\x03\x04"
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(b"late"))
            await client.sock.send(b"\x89\x84" + mask + payload)
            await trio.testing.wait_all_tasks_blocked()
            await client.sock.send(client.ws.send(close.response()))
            with trio.fail_after(5):
                await harness.server.stopped.wait()
            client.close()
    assert [entry for entry in logs if entry["event"] == "conn_error"] == []
    assert any(entry["event"] == "conn_close" and entry["code"] == 1001 for entry in logs)


async def test_a_bug_in_one_connection_closes_it_with_1011_and_spares_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from odin_fanout.server import replay

    async def broken(connection: object, action: object) -> None:
        raise RuntimeError("injected bug")

    monkeypatch.setattr(replay, "replay", broken)
    async with running_server() as harness:
        async with harness.client() as victim, harness.client() as bystander:
            await bystander.subscribe(["BTC.trade"])
            await victim.send({"type": "replay", "data": {"since": 0}})
            _, code, reason = await victim.until_closed()
            assert (code, reason) == (1011, "internal error")
            seq = harness.publish("BTC.trade", {"n": 1})
            assert [e["seq"] for e in await bystander.events(1)] == [seq]
        await harness.wait_connections(0)
        assert harness.sample("odin_connections_closed_total", reason="error") == 1


async def test_client_pings_count_as_activity(autojump_clock) -> None:
    """A client that sends only pings (and answers none of ours) is alive."""
    from wsproto.events import Ping

    config = make_config(**{"connection.ping_interval": 10, "connection.idle_timeout": 30})
    async with running_server(config, memory=True) as harness:
        stream, ws = await raw_memory_client(harness)
        for _ in range(12):  # 240 s, eight idle timeouts
            await trio.sleep(20)
            await stream.send_all(ws.send(Ping(payload=b"alive")))
        assert len(harness.context.registry.connections) == 1
        await stream.aclose()
