"""The server: listeners, the broker feed, the fan-out, connections, and a graceful stop.

Nursery layout (hypercorn's, with one nursery per connection added)::

    root
    ├── feed pump (broker feed -> fan-out, then one flush per batch)
    ├── housekeeping (gauges, history expiry, CPU sample)
    ├── flusher (frames queued outside the pump)
    ├── wheel (pings and idle closes)
    └── connections
        ├── accept loop (trio.serve_listeners)
        └── one nursery per connection: its reader, and its writer's task only while the
            socket pushes back (see connection.py)

``run`` reports the bound URLs through ``task_status`` once it is listening and the feed is
open, so a caller that starts it with ``nursery.start`` can publish at once and lose nothing.
``request_shutdown`` starts the drain: stop accepting, tell every client to reconnect after a
jittered delay, close them with 1001, and cut off whoever is left at the deadline.
"""

from __future__ import annotations

import errno
import itertools
import random
from collections.abc import Callable, Sequence

import attrs
import trio

from odin.broker.base import Broker
from odin.config import Config
from odin.logs import Log, get_logger
from odin.metrics import WALK_EVERY, Metrics
from odin.protocol.access import ANONYMOUS, Grant
from odin.protocol.close_codes import SHUTDOWN_REASON, CloseCode
from odin.protocol.negotiation import UnsupportedVersion, negotiate
from odin.server.connection import Connection
from odin.server.context import ServerContext
from odin.server.endpoints import answer
from odin.server.fanout import Fanout
from odin.server.handshake import HandshakeRefused, accept
from odin.server.http import BadRequest, RequestHead, read_request_head, response
from odin.server.outbox import Outbox
from odin.server.tokens import TokenRefused, token_from
from odin.server.worker_role import WorkerRole
from odin.server.writer import Writer

# Publications the fan-out takes from the feed per wake-up before yielding to other tasks.
_FEED_BATCH = 256


@attrs.frozen
class Listening:
    """Where the server listens, as reported at start."""

    websocket: list[str]
    http: list[str]

    @property
    def port(self) -> int:
        return int(self.websocket[0].rsplit(":", 1)[1].split("/", 1)[0])


class OdinServer:
    def __init__(
        self,
        config: Config,
        broker: Broker,
        *,
        metrics: Metrics | None = None,
        log: Log | None = None,
        worker: WorkerRole | None = None,
    ) -> None:
        self.context = ServerContext(
            config=config,
            broker=broker,
            metrics=metrics or Metrics(),
            log=log or get_logger(service="odin"),
            worker=worker,
        )
        self.fanout = Fanout(self.context)
        self._numbers = itertools.count(1)
        self._shutdown = trio.Event()
        self.stopped = trio.Event()
        """Set when ``run`` has returned (drained and closed, or cancelled)."""
        self._last_capacity_log = -1e9
        self._auth_logged: dict[str, float] = {}

    @property
    def log(self) -> Log:
        return self.context.log

    def request_shutdown(self) -> None:
        self._shutdown.set()

    @property
    def stopping(self) -> bool:
        return self._shutdown.is_set()

    async def run(
        self,
        *,
        listeners: Sequence[trio.abc.Listener[trio.abc.Stream]] | None = None,
        task_status: trio.TaskStatus[Listening] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            await self._run(listeners, task_status)
        finally:
            self.stopped.set()

    async def _run(
        self,
        listeners: Sequence[trio.abc.Listener[trio.abc.Stream]] | None,
        task_status: trio.TaskStatus[Listening],
    ) -> None:
        context = self.context
        config = context.config.server
        context.reader.epoch = context.broker.epoch
        if listeners is None:
            listeners = await open_listeners(config.host, config.port)
        async with trio.open_nursery() as root:
            await root.start(context.interest.run)
            await root.start(self._pump)
            root.start_soon(self._housekeeping)
            root.start_soon(context.flusher.run)
            root.start_soon(context.liveness.run, context.flusher.flush)
            root.start_soon(context.expiries.run)
            async with trio.open_nursery() as connections:
                accepting = trio.CancelScope()
                connections.start_soon(self._accept, listeners, connections, accepting)
                listening = self._describe(listeners)
                self.log.info("capacity", **context.registry.capacity.describe())
                self.log.lifecycle().info(
                    "listening", websocket=listening.websocket, http=listening.http
                )
                task_status.started(listening)
                await self._shutdown.wait()
                accepting.cancel()
                await self._drain()
                connections.cancel_scope.cancel()
            root.cancel_scope.cancel()
        self.log.lifecycle().info("stopped")

    def _describe(self, listeners: Sequence[trio.abc.Listener[trio.abc.Stream]]) -> Listening:
        ws_path = self.context.config.server.ws_path
        websocket, http = [], []
        for listener in listeners:
            if isinstance(listener, trio.SocketListener):
                host, port = listener.socket.getsockname()[:2]
                host = f"[{host}]" if ":" in host else host
                websocket.append(f"ws://{host}:{port}{ws_path}")
                http.append(f"http://{host}:{port}")
            else:
                websocket.append(f"ws://memory:0{ws_path}")
                http.append("http://memory:0")
        return Listening(websocket, http)

    async def _accept(
        self,
        listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
        connections: trio.Nursery,
        scope: trio.CancelScope,
    ) -> None:
        with scope:
            await trio.serve_listeners(self._handle, list(listeners), handler_nursery=connections)

    async def _pump(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        handle = self.fanout.handle
        flush = self.context.flusher.flush
        async with self.context.broker.open_feed() as feed:
            task_status.started()
            async for first in feed:
                now = trio.current_time()
                # Then what is already waiting, without a checkpoint per message: one per
                # message would cost more than the fan-out of a message without subscribers,
                # and would let a busy broker bridge starve this task.
                batch = [first]
                for _ in range(_FEED_BATCH):
                    try:
                        batch.append(feed.receive_nowait())
                    except trio.WouldBlock:
                        break
                if len(batch) == 1:
                    # Alone (a steady, moderate rate): nothing to join it with, so each
                    # connection writes it at once, without queueing it first.
                    handle(first, now, alone=True)
                else:
                    for item in batch:
                        handle(item, now)
                # One write per connection for everything this batch gave it.
                flush()

    async def _housekeeping(self) -> None:
        context = self.context
        metrics = context.metrics
        for tick in itertools.count():
            context.cpu.sample(trio.current_time())
            metrics.sync(walk=tick % WALK_EVERY == 0)
            metrics.subscriptions.set(context.hub.subscriptions)
            metrics.channels.set(context.reader.window.channel_count())
            context.reader.window.expire_all(trio.current_time())
            await trio.sleep(1.0)

    async def _drain(self) -> None:
        context = self.context
        shutdown = context.config.shutdown
        context.registry.draining = True
        self.log.lifecycle().info(
            "draining",
            connections=len(context.registry.connections),
            timeout=shutdown.drain_timeout,
        )
        for connection in list(context.registry.connections.values()):
            self._close_for_shutdown(connection)
        with trio.move_on_after(shutdown.drain_timeout) as scope:
            await self.wait_connections(lambda count: count == 0)
        if scope.cancelled_caught:
            self.log.warning("drain_timeout", remaining=len(context.registry.connections))

    async def wait_connections(self, condition: Callable[[int], bool]) -> None:
        """Wait until ``condition(number of open connections)`` holds."""
        await self.context.registry.wait(condition)

    def _close_for_shutdown(self, connection: Connection) -> None:
        shutdown = self.context.config.shutdown
        connection.request_close(
            CloseCode.GOING_AWAY,
            SHUTDOWN_REASON,
            "shutdown",
            reconnect_after_ms=random.randint(shutdown.reconnect_min_ms, shutdown.reconnect_max_ms),
            timeout=shutdown.drain_timeout,
        )

    # ---- one TCP connection --------------------------------------------------------------

    async def _handle(self, transport: trio.abc.Stream) -> None:
        # Whatever goes wrong with one client stays with that client: an exception escaping
        # here would end serve_listeners and with it the whole server.
        try:
            async with trio.open_nursery() as nursery:
                try:
                    await self._serve(transport, nursery)
                finally:
                    nursery.cancel_scope.cancel()
        except* Exception as group:
            # except*: a failure in one of the connection's tasks arrives grouped with the
            # Cancelled of its siblings; log the failure, let the cancellation go on.
            self.log.error("conn_error", peer=peer_address(transport), exc_info=group)
        finally:
            await trio.aclose_forcefully(transport)

    async def _serve(self, transport: trio.abc.Stream, nursery: trio.Nursery) -> None:
        context = self.context
        queue = context.config.connection
        writer = Writer(
            transport, Outbox(queue.queue_max_messages, queue.queue_max_bytes), context.flusher
        )
        writer.attach(nursery)
        # A separate call, so the request head and the handshake's locals are not kept
        # alive for as long as the connection lives.
        upgrade = await self._upgrade(transport, writer)
        if upgrade is None:
            return
        try:
            connection = Connection(
                context,
                transport,
                writer,
                number=next(self._numbers),
                peer=upgrade.peer,
                origin=upgrade.origin,
                v1=upgrade.v1,
                trailing=upgrade.trailing,
                scope=nursery.cancel_scope,
                grant=upgrade.grant,
            )
            if context.registry.draining:
                self._close_for_shutdown(connection)
        except BaseException:
            context.registry.release()
            raise
        # From here the connection gives its place back itself.
        await connection.run(nursery)

    async def _upgrade(self, transport: trio.abc.Stream, writer: Writer) -> Upgrade | None:
        """Read the request head and answer it: a plain HTTP answer, a refusal, or the 101
        of an admitted upgrade (its place taken); None unless it was upgraded."""
        context = self.context
        config = context.config.server
        peer = peer_address(transport)
        with trio.move_on_after(config.handshake_timeout):
            try:
                head = await read_request_head(transport, config.max_request_head)
            except BadRequest as exc:
                context.metrics.rejected["bad_request"].inc()
                await _answer(writer, response(exc.status, f"{exc}\n".encode()))
                return None
            if head is None:
                return None
            if head.path != config.ws_path:
                await _answer(writer, answer(context, head))
                return None
            refusal = self._refusal(head, peer)
            if refusal is not None:
                await _answer(writer, refusal)
                return None
            grant = self._authenticate(head, peer)
            if isinstance(grant, bytes):
                await _answer(writer, grant)
                return None
            try:
                protocol = negotiate(head.subprotocols, head.query_values("protocol"))
                writer.offer(accept(head, protocol.subprotocol), force=True)
            except UnsupportedVersion as exc:
                context.metrics.rejected["bad_request"].inc()
                await _answer(writer, response(400, f"{exc}\n".encode()))
                return None
            except HandshakeRefused as exc:
                context.metrics.rejected["bad_request"].inc()
                await _answer(writer, exc.answer)
                return None
            context.registry.admit()
            return Upgrade(peer, head.headers.get("origin"), protocol.v1, head.trailing, grant)
        context.metrics.rejected["handshake_timeout"].inc()
        self.log.info("handshake_timeout", peer=peer, timeout=config.handshake_timeout)
        return None

    def _authenticate(self, head: RequestHead, peer: str) -> Grant | bytes:
        """What the request's token grants (nothing without one), or the 401 refusing it."""
        context = self.context
        settings = context.config.auth
        verifier = context.verifier
        token = token_from(
            head.headers.get("authorization"),
            head.subprotocols,
            head.query_values("token"),
            query_ok=settings.query_token,
        )
        if token is None or not verifier.enabled:
            if settings.required:
                return self._unauthorized(peer, "missing", "a token is required")
            return ANONYMOUS  # a token nothing can check grants nothing: public channels
        try:
            return verifier.verify(token)
        except TokenRefused as exc:
            return self._unauthorized(peer, exc.reason, str(exc))

    def _unauthorized(self, peer: str, reason: str, detail: str) -> bytes:
        metrics = self.context.metrics
        metrics.rejected["unauthorized"].inc()
        metrics.auth_refused[reason].inc()
        # One line per reason a second at most: under a flood of bad tokens the log stays
        # readable and cheap (the counter has them all). Never the token itself.
        now = trio.current_time()
        if now - self._auth_logged.get(reason, -2.0) >= 1.0:
            self._auth_logged[reason] = now
            self.log.warning("auth_refused", peer=peer, reason=reason, detail=detail[:200])
        challenge = f'Bearer error="invalid_token", error_description="{reason}"'.encode()
        return response(
            401, f"unauthorized: {reason}\n".encode(), headers=[(b"WWW-Authenticate", challenge)]
        )

    def _refusal(self, head: RequestHead, peer: str) -> bytes | None:
        """The response refusing an upgrade, or None to accept it."""
        context = self.context
        config = context.config.server
        metrics = context.metrics
        retry = [(b"Retry-After", str(config.retry_after).encode())]
        if not head.is_websocket_upgrade:
            return response(
                426, b"this endpoint speaks WebSocket\n", headers=[(b"Upgrade", b"websocket")]
            )
        origin = head.headers.get("origin")
        # Browsers always send Origin; other clients need not (docs/protocol.md), unless
        # server.require_origin says every client must be a browser on the list.
        if (origin is None and config.require_origin) or (
            origin is not None and config.allowed_origins and origin not in config.allowed_origins
        ):
            metrics.rejected["origin"].inc()
            self.log.warning("origin_rejected", peer=peer, origin=origin)
            return response(403, b"origin not allowed\n")
        if context.registry.draining:
            metrics.rejected["draining"].inc()
            return response(503, b"server is shutting down\n", headers=retry)
        if context.registry.full:
            metrics.rejected["at_capacity"].inc()
            now = trio.current_time()
            if now - self._last_capacity_log >= 1.0:  # at most one line a second under a storm
                self._last_capacity_log = now
                self.log.warning("at_capacity", peer=peer, limit=context.registry.max_connections)
            return response(503, b"server at capacity\n", headers=retry)
        return None


@attrs.frozen
class Upgrade:
    """An admitted WebSocket upgrade: what the connection needs of its request."""

    peer: str
    origin: str | None
    v1: bool
    trailing: bytes
    grant: Grant = ANONYMOUS


class StartError(Exception):
    """The server cannot start; the message says what, for the operator."""


_LISTEN_PROBLEMS = {
    errno.EADDRINUSE: "already in use (server.port)",
    errno.EACCES: "not permitted to this user (ports below 1024 need privileges; server.port)",
    errno.EADDRNOTAVAIL: "not an address of this host (server.host)",
}


async def open_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """Listening sockets on every address of ``host``; StartError says what is wrong."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise StartError(listen_problem(host, port, exc)) from None


def listen_problem(host: str, port: int, exc: OSError) -> str:
    """Why ``host:port`` cannot be listened on, for the operator."""
    problem = _LISTEN_PROBLEMS.get(exc.errno or 0, exc.strerror or str(exc))
    shown = f"[{host}]" if ":" in host else host
    return f"address {shown}:{port} {problem}"


async def _answer(writer: Writer, data: bytes) -> None:
    """Send a complete HTTP response (the socket is closed after it)."""
    writer.offer(data, force=True)
    await writer.wait_flushed()


def peer_address(transport: trio.abc.Stream) -> str:
    if isinstance(transport, trio.SocketStream):
        try:
            host, port = transport.socket.getpeername()[:2]
        except OSError:
            return "unknown"
        return f"{host}:{port}"
    return "memory"
