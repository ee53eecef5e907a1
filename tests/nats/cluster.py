"""A three-node NATS cluster with JetStream for tests: three nats-server processes on
loopback (client and route ports fixed at the first start, so a node restarts where it was,
on its own store), the JetStream API asked with nats-py (in a thread, on its own asyncio
loop), and every wait bounded."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nats
import nats.errors
import trio

from tests.nats.support import NatsServer

CLUSTER_NAME = "odin-test"


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (held open together, so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class NatsCluster:
    """Three nats-servers, JetStream on, routed to each other. ``nodes[i].port`` is node i's
    client port; its server name (what STREAM.INFO's ``cluster.leader`` says) is
    ``names[i]``."""

    def __init__(self, directory: Path, size: int = 3) -> None:
        self.directory = directory
        ports = free_ports(size)
        routes = ",".join(f"nats://127.0.0.1:{port}" for port in ports)
        self.names = [f"n{index}" for index in range(size)]
        self.nodes: list[NatsServer] = []
        try:
            for index, name in enumerate(self.names):
                cluster = f"nats://127.0.0.1:{ports[index]}"
                args = ("-n", name, "--cluster_name", CLUSTER_NAME, "--cluster", cluster,
                        "--routes", routes)  # fmt: skip
                self.nodes.append(NatsServer(directory / name, extra_args=args))
        except BaseException:
            self.stop()
            raise

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def url(self, first: int | None = None) -> str:
        """Every node's URL, comma-separated (``nats.url``), node ``first`` first."""
        order = list(range(len(self.nodes)))
        if first is not None:
            order.remove(first)
            order.insert(0, first)
        return ",".join(self.nodes[index].url for index in order)

    def node(self, name: str) -> int:
        return self.names.index(name)

    def kill(self, index: int) -> None:
        """SIGKILL node ``index``, as a crash would."""
        self.nodes[index].kill()

    def start(self, index: int) -> None:
        """Start node ``index`` again, on the same ports and store."""
        self.nodes[index].start()

    def stop(self) -> None:
        """Stop every node (each by its own process), whatever state it is in."""
        for node in self.nodes:
            node.stop()

    # ---- the JetStream API (blocking: call it through trio.to_thread) --------------------

    def api(self, subject: str, payload: dict[str, Any] | None = None,
            timeout: float = 1.0) -> dict[str, Any] | None:  # fmt: skip
        """A JetStream API request to the first node that answers; None if none did."""
        body = json.dumps(payload).encode() if payload is not None else b""
        for node in self.nodes:
            if node.process is None:
                continue
            reply = asyncio.run(_request(node.url, subject, body, timeout))
            if reply is not None:
                return reply
        return None

    async def wait_ready(self, timeout: float = 20) -> None:
        """Until every node answers the JetStream API without an error: the meta leader is
        elected and every node knows it."""
        with trio.fail_after(timeout):
            while True:
                replies = [
                    await trio.to_thread.run_sync(_request_sync, node.url, "$JS.API.INFO")
                    for node in self.nodes
                ]
                if all(reply is not None and "error" not in reply for reply in replies):
                    return
                await trio.sleep(0.1)  # other processes' state: polled, bounded

    async def stream_info(self, stream: str) -> dict[str, Any] | None:
        reply = await trio.to_thread.run_sync(self.api, f"$JS.API.STREAM.INFO.{stream}")
        if reply is None or "error" in reply:
            return None
        return reply

    async def leader(self, stream: str, timeout: float = 20) -> int:
        """The index of the node leading ``stream``, once it has a leader and every replica
        is current."""
        with trio.fail_after(timeout):
            while True:
                info = await self.stream_info(stream)
                cluster = (info or {}).get("cluster", {})
                replicas = cluster.get("replicas") or []
                if cluster.get("leader") and all(peer.get("current") for peer in replicas):
                    return self.node(cluster["leader"])
                await trio.sleep(0.1)  # other processes' state: polled, bounded


def _request_sync(url: str, subject: str) -> dict[str, Any] | None:
    return asyncio.run(_request(url, subject, b"", 1.0))


async def _request(url: str, subject: str, body: bytes, timeout: float) -> dict[str, Any] | None:
    try:
        nc = await nats.connect(
            url, connect_timeout=timeout, allow_reconnect=False, max_reconnect_attempts=0
        )
    except (nats.errors.Error, OSError, TimeoutError):
        return None
    try:
        reply = await nc.request(subject, body, timeout=timeout)
        answer: dict[str, Any] = json.loads(reply.data)
        return answer
    except (nats.errors.Error, OSError, TimeoutError, ValueError):
        return None
    finally:
        await nc.close()


@contextmanager
def nats_cluster(directory: Path) -> Iterator[NatsCluster]:
    """A running cluster, stopped (every node by its pid) when the block ends."""
    cluster = NatsCluster(directory)
    try:
        yield cluster
    finally:
        cluster.stop()
