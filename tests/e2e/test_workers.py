"""``odin serve --workers 2`` as clients and operators meet it: two worker processes take
connections on one port (one shared listening socket, or SO_REUSEPORT), a worker killed under
load is started again while its clients recover exactly what they missed and the other
worker's clients notice nothing, signals reach every worker, /health, /ready and /metrics
describe the host whichever worker answers, and workers whose supervisor is killed drain and
exit by themselves.

Which worker serves a client is read from public interfaces only: each worker's control
socket says its ``instance``, the prefix of its connection ids, and a client's ``hello`` says
its connection id."""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import attrs
import h11
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionClosed

from odin_fanout.control.protocol import (
    Command,
    Hello,
    HostWorkers,
    Reply,
    ServerIdentity,
    Workers,
    decode_line,
    encode_request,
)
from tests.e2e.embedded_support import running
from tests.e2e.process import OdinProcess, odin_process, port_of
from tests.helpers import (
    Client,
    Message,
    RawClient,
    checkpoint_chain,
    hold_clients,
    http_get,
    open_client,
)
from tests.nats.support import NatsServer, RawPublisher, odin_url_args

pytestmark = [pytest.mark.trio, pytest.mark.slow]

WORKERS = ["--workers", "2"]
CHANNEL = "BTC.trade"
T = TypeVar("T")


# ---- reading the host through its public interfaces ----------------------------------------


def started(odin: OdinProcess) -> tuple[int, str]:
    """Once both workers serve and read the broker: the port, and the supervisor's control
    socket."""
    odin.follow()  # a line per connection: the pipe must never fill
    ready = odin.wait_for("workers_ready", timeout=30)
    for slot in (0, 1):
        odin.wait_for("broker_ready", worker=slot)
    supervisor = odin.wait_for("control_listening", worker=None)["path"]
    return port_of(ready), supervisor


async def logged(odin: OdinProcess, event: str, timeout: float = 15, **fields: Any) -> Any:
    """The first log record of ``event`` (with these fields), waited for in a thread so that
    the test's clients go on reading meanwhile."""
    return await trio.to_thread.run_sync(partial(odin.wait_for, event, timeout, **fields))


async def ask(path: str, command: Command) -> Reply:
    """One command on a control socket, as odin-console sends it."""
    with trio.fail_after(5):
        async with await trio.open_unix_socket(path) as stream:
            await stream.send_all(encode_request(1, command))
            buffer = b""
            while b"\n" not in buffer:
                chunk = await stream.receive_some(1 << 16)
                assert chunk, f"{path} closed the connection"
                buffer += chunk
    reply = decode_line(buffer.partition(b"\n")[0])
    assert isinstance(reply, Reply) and reply.ok, reply
    return reply


async def host_workers(supervisor: str) -> HostWorkers:
    return (await ask(supervisor, Workers())).result_as(HostWorkers)


async def instances(supervisor: str) -> dict[str, int]:
    """Each worker's connection-id prefix, and its slot."""
    found: dict[str, int] = {}
    for worker in (await host_workers(supervisor)).workers:
        assert worker.state == "up", worker
        identity = (await ask(worker.control, Hello())).result_as(ServerIdentity)
        assert (identity.worker, identity.pid, identity.role) == (worker.slot, worker.pid, "server")
        found[identity.instance] = worker.slot
    assert len(found) == 2
    return found


def slot_of(connection_id: str, workers: dict[str, int]) -> int:
    return workers[connection_id.rsplit("-", 1)[0]]


class Scrape:
    """One /metrics exposition, by sample name and labels."""

    def __init__(self, text: str) -> None:
        self.samples = {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def get(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def __call__(self, name: str, **labels: str) -> float:
        value = self.get(name, **labels)
        assert value is not None, f"no {name}{labels} in /metrics"
        return value


async def scrape(port: int) -> Scrape:
    status, _, body = await http_get(port, "/metrics")
    assert status == 200
    return Scrape(body.decode())


async def get_json(port: int, path: str) -> tuple[int, dict[str, Any]]:
    status, _, body = await http_get(port, path)
    document: dict[str, Any] = json.loads(body)
    return status, document


async def eventually(
    check: Callable[[], Awaitable[T]], what: str, timeout: float = 15, interval: float = 0.05
) -> T:
    """Ask ``check`` until its answer is true (state that offers no event to wait on),
    bounded; the last answer in the failure."""
    last: Any = None
    try:
        with trio.fail_after(timeout):
            while not (last := await check()):
                await trio.sleep(interval)
    except trio.TooSlowError:
        raise AssertionError(f"not within {timeout} s: {what} (last: {last!r})") from None
    return last


async def clients_on_both(
    stack: AsyncExitStack, port: int, workers: dict[str, int], *, each: int = 1,
    total: int = 0, limit: int = 200,
) -> dict[int, list[Client]]:  # fmt: skip
    """Open clients (held by ``stack``) until each worker has ``each`` and there are
    ``total``; at most ``limit``."""
    by_slot: dict[int, list[Client]] = {0: [], 1: []}
    for _ in range(limit):
        counts = [len(clients) for clients in by_slot.values()]
        if min(counts) >= each and sum(counts) >= total:
            return by_slot
        client = await stack.enter_async_context(open_client(port))
        by_slot[slot_of(client.hello["connection_id"], workers)].append(client)
    raise AssertionError(f"{limit} connections did not reach both workers: {by_slot}")


def gone(pid: int) -> bool:
    """Exited (a zombie that nobody reaps counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


# ---- one host for the checks that change nothing ---------------------------------------------


@attrs.frozen
class Host:
    port: int
    supervisor: str
    nats_port: int


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    """Two workers on a shared socket and the embedded NATS, no simulator: clients see only
    what a test publishes."""
    args = ["serve", *WORKERS, "--port", "0", "--set", "server.worker_sockets=shared"]
    with odin_process(args) as odin:
        port, supervisor = started(odin)
        nats = odin.wait_for("nats_embedded_started")["url"]
        assert odin.wait_for("workers_ready")["sockets"] == "shared"
        yield Host(port, supervisor, int(nats.rsplit(":", 1)[1]))


async def both_take_connections(port: int, supervisor: str) -> None:
    """Clients reach both workers on the one port, and each worker's connection gauge and
    the host's total count them."""
    async with AsyncExitStack() as stack:
        by_slot = await clients_on_both(stack, port, await instances(supervisor))
        counts = {str(slot): float(len(clients)) for slot, clients in by_slot.items()}

        async def counted() -> bool:
            metrics = await scrape(port)
            per_worker = {s: metrics.get("odin_worker_connections", worker=s) for s in counts}
            total = metrics.get("odin_connections_active")
            return per_worker == counts and total == sum(counts.values())

        await eventually(counted, f"/metrics to count {counts} connections")


async def test_the_workers_share_one_listening_socket_and_both_take_connections(
    host: Host,
) -> None:
    await both_take_connections(host.port, host.supervisor)


async def test_by_default_each_worker_listens_with_reuseport_and_both_take_connections() -> None:
    args = ["serve", *WORKERS, "--port", "0"]
    with odin_process(args) as odin:
        port, supervisor = started(odin)
        assert odin.wait_for("workers_ready")["sockets"] == "reuseport"
        await both_take_connections(port, supervisor)


async def test_metrics_total_for_the_host_what_the_clients_received(host: Host) -> None:
    publications = 200
    async with AsyncExitStack() as stack:
        by_slot = await clients_on_both(
            stack, host.port, await instances(host.supervisor), each=5, total=20
        )
        clients = [*by_slot[0], *by_slot[1]]
        for client in clients:
            await client.subscribe([CHANNEL])

        async def subscribed() -> Scrape | None:
            metrics = await scrape(host.port)
            active = metrics("odin_connections_active"), metrics("odin_subscriptions_active")
            return metrics if active == (len(clients), len(clients)) else None

        before = await eventually(subscribed, f"{len(clients)} subscribed connections")
        assert before is not None
        publisher = await RawPublisher.connect(host.nats_port)
        for n in range(publications):
            await publisher.publish(f"odin.token.{CHANNEL}", {"n": n})
        await publisher.flush()
        await publisher.aclose()
        received: list[list[Message]] = []

        async def receive(client: Client) -> None:
            received.append(await client.events(publications, timeout=20))

        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(receive, client)
        for events in received:
            assert [event["data"]["n"] for event in events] == list(range(publications))
        delivered = sum(len(events) for events in received)

        async def totals() -> bool:
            metrics = await scrape(host.port)
            published = "odin_publications_received_total"
            return (
                metrics("odin_deliveries_total") - before("odin_deliveries_total") == delivered
                # Both workers read every publication; the host counts each once.
                and metrics(published) - before(published) == publications
                and metrics("odin_connections_active") == len(clients)
                and sum(metrics("odin_worker_connections", worker=s) for s in "01") == len(clients)
            )

        await eventually(totals, f"/metrics to count {delivered} deliveries")
    assert by_slot[0] and by_slot[1]


async def test_health_and_ready_describe_the_host_whichever_worker_answers(host: Host) -> None:
    state = await host_workers(host.supervisor)
    workers = [
        {"slot": worker.slot, "state": "up", "pid": worker.pid, "restarts": 0}
        for worker in state.workers
    ]
    answered: dict[str, set[int]] = {"/health": set(), "/ready": set()}
    for _ in range(100):
        status, health = await get_json(host.port, "/health")
        assert (status, health["status"], health["healthy"]) == (200, "healthy", True), health
        expected = {"healthy": True, "expected": 2, "up": 2, "workers": workers}
        assert health["checks"]["workers"] == expected
        answered["/health"].add(health["worker"])
        status, ready = await get_json(host.port, "/ready")
        assert (status, ready["ready"], ready["reasons"]) == (200, True, [])
        assert ready["workers"] == {"up": 2, "expected": 2}
        answered["/ready"].add(ready["worker"])
        if all(slots == {0, 1} for slots in answered.values()):
            break
    assert answered == {"/health": {0, 1}, "/ready": {0, 1}}
    metrics = await scrape(host.port)
    assert (metrics("odin_workers_expected"), metrics("odin_workers_up")) == (2, 2)
    assert [metrics("odin_worker_restarts_total", worker=s) for s in "01"] == [0, 0]
    assert [metrics("odin_broker_connected", worker=s) for s in "01"] == [1, 1]


# ---- a worker killed under load --------------------------------------------------------------


@attrs.define
class Follower:
    """A v1 client that follows one channel and, when its connection drops, connects again
    and recovers from the last position it saw (as a client library does).

    It connects, says its connection id, and subscribes only once told to (``go``), or goes
    away (``leave``): which worker takes a connection is the kernel's choice, and a test
    keeps the ones it needs. (With a shared socket, the worker that was busy last tends to
    win the next connection: subscribing each before the next connects would pile them on
    one worker.)"""

    port: int
    rejoin: Callable[[], Awaitable[None]] | None = None
    """Waited for between a connection's loss and the next (so that it misses some)."""
    go: trio.Event = attrs.Factory(trio.Event)
    leave: trio.CancelScope = attrs.Factory(trio.CancelScope)
    events: list[Message] = attrs.Factory(list)
    sessions: list[tuple[str, Message]] = attrs.Factory(list)
    """(connection id, subscription ack) of each connection."""
    drops: list[int | None] = attrs.Factory(list)
    """The close code of each connection that ended under it."""
    others: list[Message] = attrs.Factory(list)
    """Whatever was neither an event nor an ack (a gap notice would be here)."""
    position: dict[str, Any] | None = None

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        with self.leave:
            await self._follow(task_status)

    async def _follow(self, task_status: trio.TaskStatus[str]) -> None:
        while True:
            recover = {CHANNEL: self.position} if self.position else None
            async with open_client(self.port) as client:
                connection = client.hello["connection_id"]
                if not self.go.is_set():
                    task_status.started(connection)
                    await self.go.wait()
                ack = await client.subscribe([CHANNEL], recover=recover)
                assert ack["type"] == "subscription_ack", ack
                self.sessions.append((connection, ack))
                try:
                    while True:
                        message = await client.recv(timeout=60)
                        if "seq" in message:
                            self.events.append(message)
                            self.position = {"epoch": message["epoch"], "seq": message["seq"]}
                        else:
                            self.others.append(message)
                except ConnectionClosed as closed:
                    self.drops.append(closed.reason.code if closed.reason else None)
            if self.rejoin is not None:
                await self.rejoin()

    @property
    def numbers(self) -> list[int]:
        return [event["data"]["n"] for event in self.events]


@attrs.define
class Publisher:
    """A steady stream on one channel, numbered from 0, until told to stop."""

    port: int
    count: int = 0
    stopping: trio.Event = attrs.Factory(trio.Event)
    done: trio.Event = attrs.Factory(trio.Event)

    async def run(self) -> None:
        publisher = await RawPublisher.connect(self.port)
        try:
            while not self.stopping.is_set():
                await publisher.publish(f"odin.token.{CHANNEL}", {"n": self.count})
                self.count += 1
                if self.count % 10 == 0:
                    await publisher.flush()
                await trio.sleep(0.01)  # the pace of the stream, about 100 a second
            await publisher.flush()
        finally:
            await publisher.aclose()
        self.done.set()

    async def stop(self) -> int:
        self.stopping.set()
        with trio.fail_after(10):
            await self.done.wait()
        return self.count


async def http_answer(port: int, path: str) -> tuple[int, dict[str, Any]] | None:
    """An answer, or None when the connection was reset (the killed worker had taken it)."""
    try:
        return await get_json(port, path)
    except (OSError, trio.BrokenResourceError, h11.RemoteProtocolError, json.JSONDecodeError):
        return None


async def test_a_worker_killed_under_load_restarts_and_only_its_clients_reconnect(
    nats_server: NatsServer,
) -> None:
    with odin_process([*odin_url_args(nats_server.url), *WORKERS]) as odin:
        port, supervisor = started(odin)
        workers = await instances(supervisor)
        before = await host_workers(supervisor)
        victim = before.workers[1]
        assert victim.pid is not None
        followers: dict[int, list[Follower]] = {0: [], 1: []}
        publisher = Publisher(nats_server.port)

        async def rejoin() -> None:
            # Come back only once 20 more have been published: there is something to miss.
            mark = publisher.count

            async def missed() -> bool:
                return publisher.count >= mark + 20

            await eventually(missed, "20 more publications", interval=0.01)

        async with trio.open_nursery() as nursery:
            spare: list[Follower] = []
            for _ in range(300):
                if min(len(on) for on in followers.values()) >= 3:
                    break
                follower = Follower(port, rejoin)
                on = followers[slot_of(await nursery.start(follower.run), workers)]
                (on if len(on) < 3 else spare).append(follower)
            everyone = [*followers[0], *followers[1]]
            assert min(len(on) for on in followers.values()) >= 3
            for follower in spare:
                follower.leave.cancel()
            for follower in everyone:
                follower.go.set()

            async def subscribed() -> bool:
                return all(follower.sessions for follower in everyone)

            await eventually(subscribed, "every client to subscribe")
            connections_before = (await scrape(port))("odin_connections_total")
            nursery.start_soon(publisher.run)

            async def flowing() -> bool:
                return all(len(follower.events) >= 20 for follower in everyone)

            await eventually(flowing, "every client to receive 20 events")
            os.kill(victim.pid, signal.SIGKILL)

            # While it is down: the supervisor says it restarts, /health that the host is
            # degraded (the other worker answers).
            states: list[str] = []
            degraded: list[tuple[int, dict[str, Any]]] = []

            async def back_up() -> bool:
                worker = (await host_workers(supervisor)).workers[1]
                states.append(worker.state)
                answer = await http_answer(port, "/health")
                if answer is not None and answer[1]["checks"]["workers"]["up"] == 1:
                    degraded.append(answer)
                return worker.state == "up" and worker.pid != victim.pid

            await eventually(back_up, "worker 1 to be up again", timeout=20, interval=0.02)
            exited = await logged(odin, "worker_exited", worker=1)
            after = await host_workers(supervisor)
            restarted = after.workers[1]
            await logged(odin, "worker_started", worker=1, pid=restarted.pid)

            # The killed worker's clients are back, recovering; the stream goes on to the end.
            async def reconnected() -> bool:
                return all(len(follower.sessions) == 2 for follower in followers[1])

            await eventually(reconnected, "the killed worker's clients to reconnect")
            connections_after = (await scrape(port))("odin_connections_total")
            total = await publisher.stop()

            async def caught_up() -> bool:
                return all(f.numbers[-1:] == [total - 1] for f in everyone)

            await eventually(caught_up, f"every client to receive all {total} events")
            # The restarted worker takes connections again.
            workers_now = await instances(supervisor)
            async with AsyncExitStack() as stack:
                await clients_on_both(stack, port, workers_now)
            metrics = await scrape(port)
            nursery.cancel_scope.cancel()

        # Killed again soon after: it is started again after twice the backoff.
        assert restarted.pid is not None
        os.kill(restarted.pid, signal.SIGKILL)
        second = await logged(odin, "worker_exited", worker=1, restarts=2)

        async def up_again() -> bool:
            worker = (await host_workers(supervisor)).workers[1]
            return worker.state == "up" and worker.pid not in (victim.pid, restarted.pid)

        await eventually(up_again, "worker 1 to be up after a second restart")
        twice = await scrape(port)

    assert exited["exit"] == "signal SIGKILL"
    assert (exited["restarts"], exited["restart_in"]) == (1, 0.5)
    assert (restarted.state, restarted.restarts, restarted.last_exit) == (
        "up", 1, "signal SIGKILL"
    )  # fmt: skip
    assert restarted.pid != victim.pid
    assert (after.workers[0].pid, after.workers[0].restarts) == (before.workers[0].pid, 0)
    assert "restarting" in states
    assert degraded, "no /health answer while worker 1 was down"
    status, health = degraded[0]
    assert (status, health["status"], health["healthy"]) == (200, "degraded", True)
    assert health["checks"]["workers"]["healthy"] is False
    assert any(warning.startswith("1 of 2 workers up") for warning in health["warnings"])

    for follower in everyone:
        # Every client has every publication once, in order, whatever happened to it.
        assert follower.numbers == list(range(total))
        assert checkpoint_chain(follower.events, {}) == []
        assert follower.others == []
    for follower in followers[0]:
        assert (follower.drops, len(follower.sessions)) == ([], 1)
    for follower in followers[1]:
        assert follower.drops == [1006]  # the connection was lost, not closed
        (lost, _), (again, ack) = follower.sessions
        assert again != lost
        assert ack["recovered"] is True
        report = ack["recovery"][CHANNEL]
        assert report["recovered"] is True and report["count"] >= 20

    assert metrics("odin_worker_restarts_total", worker="1") == 1
    assert metrics("odin_worker_restarts_total", worker="0") == 0
    # The dead worker's counts are kept: the total went on from where it was, by the
    # reconnections alone.
    assert connections_after == connections_before + len(followers[1])
    assert (second["exit"], second["restart_in"]) == ("signal SIGKILL", 1.0)
    assert twice("odin_worker_restarts_total", worker="1") == 2
    assert twice("odin_connections_total") >= metrics("odin_connections_total")


# ---- signals -------------------------------------------------------------------------------


async def test_sigterm_drains_every_worker_and_the_embedded_nats_then_exits_0(
    tmp_path: Path,
) -> None:
    args = [
        "serve", *WORKERS, "--port", "0", "--simulate", "--rate", "50", "--tokens", "BTC",
        "--set", "shutdown.reconnect_min_ms=200", "--set", "shutdown.reconnect_max_ms=2000",
    ]  # fmt: skip
    with odin_process(args, env={"XDG_STATE_HOME": str(tmp_path)}) as odin:
        port, supervisor = started(odin)
        nats_pid = odin.wait_for("nats_embedded_started")["nats_pid"]
        workers = await instances(supervisor)
        closed: list[tuple[int, list[Message], int | None, str]] = []

        async def until_closed(slot: int, client: Client) -> None:
            closed.append((slot, *await client.until_closed(timeout=15)))

        async with AsyncExitStack() as stack:
            by_slot = await clients_on_both(stack, port, workers, each=2)
            for client in (*by_slot[0], *by_slot[1]):
                await client.subscribe([CHANNEL])
                await client.events(1, timeout=10)
            async with trio.open_nursery() as nursery:
                for slot, clients in by_slot.items():
                    for client in clients:
                        nursery.start_soon(until_closed, slot, client)
                odin.signal(signal.SIGTERM)
        code = await trio.to_thread.run_sync(odin.wait)
    assert code == 0
    assert len(closed) == len(by_slot[0]) + len(by_slot[1])
    assert {slot for slot, *_ in closed} == {0, 1}
    for _, messages, close_code, reason in closed:
        assert (close_code, reason) == (1001, "server shutting down")
        hints = [m for m in messages if m["type"] == "reconnect"]
        assert len(hints) == 1 and 200 <= hints[0]["after_ms"] <= 2000
    records = odin.records()
    for slot in (0, 1):
        mine = [r["event"] for r in records if r.get("worker") == slot]
        assert mine.index("draining") < mine.index("stopped") < mine.index("exited")
        codes = [r["code"] for r in records if r["event"] == "exited" and r.get("worker") == slot]
        assert codes == [0]
    stopped = [r for r in records if r["event"] == "nats_embedded_stopped"]
    assert [r["nats_pid"] for r in stopped] == [nats_pid]
    assert not running(nats_pid, tmp_path)
    assert (records[-1]["event"], records[-1]["code"], "worker" in records[-1]) == (
        "exited", 0, False
    )  # fmt: skip


async def test_a_second_signal_cuts_every_workers_drain_short_and_exits_130(
    nats_server: NatsServer,
) -> None:
    # An outside NATS: were the test to fail and its supervisor be killed, no embedded
    # nats-server would outlive it.
    args = [*odin_url_args(nats_server.url), *WORKERS, "--set", "shutdown.drain_timeout=60"]
    with odin_process(args) as odin:
        port, _ = started(odin)
        # On each worker, a client that never reads nor answers: its drain would wait for it.
        clients: list[RawClient] = []
        stuck: dict[int, RawClient] = {}
        try:
            for _ in range(100):
                if len(stuck) == 2:
                    break
                client = await RawClient.connect(port)
                clients.append(client)
                # Its worker, from the worker's log of the connection from its address.
                host, local_port = client.sock.getsockname()[:2]
                slot = (await logged(odin, "conn_open", peer=f"{host}:{local_port}"))["worker"]
                stuck.setdefault(slot, client)
            assert stuck.keys() == {0, 1}
            odin.signal(signal.SIGTERM)
            for slot in (0, 1):
                draining = await logged(odin, "draining", worker=slot)
                assert draining["timeout"] == 60
            began = trio.current_time()
            odin.signal(signal.SIGINT)
            code = await trio.to_thread.run_sync(odin.wait)
            assert trio.current_time() - began < 15
        finally:
            for client in clients:
                client.close()
    assert code == 130
    records = odin.records()
    for slot in (0, 1):
        assert any(
            r["event"] == "exited" and r.get("worker") == slot and r["code"] == 130 for r in records
        )
    assert (records[-1]["event"], records[-1]["code"]) == ("exited", 130)


async def test_sighup_is_checked_then_reloads_every_worker(tmp_path: Path) -> None:
    config = tmp_path / "odin.toml"
    config.write_text("[connection]\nmax_subscriptions = 10\n")
    with odin_process(["serve", *WORKERS, "--port", "0", "--config", str(config)]) as odin:
        port, supervisor = started(odin)
        # A file that does not load is refused by the supervisor; no worker hears of it.
        config.write_text("[log]\nlevel = 'loud'\n")
        odin.signal(signal.SIGHUP)
        failed = await logged(odin, "config_reload_failed", worker=None)
        assert any("log.level" in error for error in failed["errors"])

        config.write_text("[connection]\nmax_subscriptions = 3\n[log]\nlevel = 'debug'\n")
        odin.signal(signal.SIGHUP)
        reloads = [await logged(odin, "config_reloaded", worker=slot) for slot in (0, 1)]
        supervisor_reload = await logged(odin, "config_reloaded", worker=None)
        # Each worker applies it: new clients of either are told the new limit.
        async with AsyncExitStack() as stack:
            by_slot = await clients_on_both(stack, port, await instances(supervisor))
            limits = {
                slot: {client.hello["limits"]["max_subscriptions"] for client in clients}
                for slot, clients in by_slot.items()
            }
    for reloaded in (*reloads, supervisor_reload):
        assert reloaded["changed"] == ["connection.max_subscriptions", "log.level"]
        assert reloaded["restart_required"] == []
    assert limits == {0: {3}, 1: {3}}
    records = odin.records()
    assert not [r for r in records if r["event"] == "config_reload_failed" and "worker" in r]
    for slot in (0, 1):
        mine = [r for r in records if r["event"] == "config_reloaded" and r.get("worker") == slot]
        assert len(mine) == 1


# ---- start errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("sockets", ["shared", "reuseport"])
async def test_an_address_in_use_is_one_start_error_before_any_worker(sockets: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["serve", *WORKERS, "--host", "127.0.0.1", "--port", str(port),
                "--broker", "nats", "--nats-url", "nats://127.0.0.1:1",
                "--set", f"server.worker_sockets={sockets}"]  # fmt: skip
        with odin_process(args) as odin:
            assert odin.wait() == 1
    records = odin.records()
    failed = [r for r in records if r["event"] == "start_failed"]
    assert len(failed) == 1 and f"address 127.0.0.1:{port}" in failed[0]["error"]
    assert not [r for r in records if r["event"] == "worker_started"]
    assert records[-1]["event"] == "exited" and records[-1]["code"] == 1


async def test_the_memory_broker_runs_one_process_whatever_the_workers() -> None:
    args = ["serve", *WORKERS, "--broker", "memory", "--port", "0"]
    with odin_process(args) as odin:
        starting = odin.wait_for("starting")
        port = port_of(odin.wait_for("listening"))
        async with open_client(port) as client:
            assert (await client.subscribe([CHANNEL]))["count"] == 1
        odin.signal(signal.SIGTERM)
        assert odin.wait() == 0
    assert (starting["role"], starting["workers"]) == ("server", 1)
    assert not [r for r in odin.records() if r["event"] == "worker_started" or "worker" in r]


async def test_a_negative_worker_count_is_a_configuration_error() -> None:
    with odin_process(["serve", "--workers", "-1", "--port", "0"]) as odin:
        assert odin.wait() == 78
    (record,) = odin.records()
    assert record["event"] == "config_invalid"
    # The section and the field, as every configuration error names them.
    assert record["errors"] == ["server: 'workers' must be >= 0: -1"]


# ---- the supervisor killed -------------------------------------------------------------------


async def test_workers_drain_and_exit_when_their_supervisor_is_killed(tmp_path: Path) -> None:
    args = ["serve", *WORKERS, "--port", "0", "--simulate", "--rate", "50", "--tokens", "BTC"]
    with odin_process(args, env={"XDG_STATE_HOME": str(tmp_path)}) as odin:
        port, _ = started(odin)
        nats_pid = odin.wait_for("nats_embedded_started")["nats_pid"]
        pids = odin.wait_for("workers_ready")["pids"]
        try:
            async with trio.open_nursery() as nursery:
                results = await hold_clients(
                    nursery, lambda: open_client(port), 4, [CHANNEL], events=1
                )
                odin.signal(signal.SIGKILL)
                noticed = [await logged(odin, "supervisor_gone", worker=slot) for slot in (0, 1)]

            async def workers_gone() -> bool:
                return all(gone(pid) for pid in pids)

            await eventually(workers_gone, f"workers {pids} to exit")
            for slot in (0, 1):
                assert (await logged(odin, "exited", worker=slot))["code"] == 0
        finally:
            # The embedded nats-server outlives a supervisor killed outright: stop that one
            # (and the workers, had they failed to exit).
            for pid in pids:
                if not gone(pid):
                    os.kill(pid, signal.SIGKILL)
            if running(nats_pid, tmp_path):
                os.kill(nats_pid, signal.SIGKILL)
    assert all(record["supervisor"] == odin.pid for record in noticed)
    assert all(record["action"] == "drain" for record in noticed)
    assert [(code, reason) for _, code, reason in results] == [(1001, "server shutting down")] * 4
