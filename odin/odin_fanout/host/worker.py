"""A worker's side of ``odin serve --workers N``: the sockets it inherits or binds, the
shared metrics, its ready report, and its watch on the supervisor."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import orjson
import trio

from odin_fanout.host.spec import WorkerSpec
from odin_fanout.metrics import Metrics, Shared, share_between_workers
from odin_fanout.server.app import Listening, StartError, listen_problem
from odin_fanout.server.worker_role import WorkerRole


class WorkerLink:
    """What the worker of ``spec`` has of its supervisor."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.role = WorkerRole(spec.slot, spec.count, spec.supervisor_pid, Path(spec.directory))
        self._status = socket.socket(fileno=spec.status_fd)

    def shared_metrics(self) -> Metrics:
        """This worker's metrics, kept in the host directory with every other worker's.
        Call once, before anything else makes a Metrics."""
        share_between_workers(self.role.metrics_directory, self.spec.slot)
        return Metrics(Shared(self.role.metrics_directory, self.spec.slot, self.role.host))

    def listeners(self) -> list[trio.SocketListener]:
        """The listening sockets: the supervisor's, inherited, or this worker's own on the
        supervisor's addresses with SO_REUSEPORT."""
        if self.spec.listen_fds:
            return [
                trio.SocketListener(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)))
                for fd in self.spec.listen_fds
            ]
        return [_reuseport_listener(host, port) for host, port in self.spec.reuseport]

    def report_ready(self, listening: Listening, control: Path | None, history: str) -> None:
        """Tell the supervisor this worker serves (one line on the status socket)."""
        line = {
            "websocket": listening.websocket,
            "http": listening.http,
            "ops": listening.ops,
            "control": str(control) if control else "",
            "history": history,
            "pid": os.getpid(),
        }
        with contextlib.suppress(OSError):
            self._status.sendall(orjson.dumps(line) + b"\n")

    async def wait_orphaned(self) -> None:
        """Return when the supervisor is gone (its end of the status socket closed)."""
        status = trio.socket.from_stdlib_socket(self._status)
        while True:
            try:
                if not await status.recv(64):
                    return
            except OSError:
                return


def _reuseport_listener(host: str, port: int) -> trio.SocketListener:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise StartError(listen_problem(host, port, exc)) from None
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))
