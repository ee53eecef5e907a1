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
import math
import random
import socket
from collections.abc import Callable, Sequence
from functools import partial

import attrs
import trio

from odin_fanout.broker.base import Broker
from odin_fanout.config import Config
from odin_fanout.core.admission import (
    ADDRESS_TABLE,
    IP_RATE,
    Admission,
    Limits,
    Ticket,
    TrustedProxies,
    forwarded_for,
    parse_address,
    parse_networks,
)
from odin_fanout.core.proxy_protocol import ProxyHeaderError
from odin_fanout.logs import Log, get_logger
from odin_fanout.metrics import WALK_EVERY, Metrics
from odin_fanout.protocol.access import ANONYMOUS, Grant
from odin_fanout.protocol.close_codes import SHUTDOWN_REASON, CloseCode
from odin_fanout.protocol.negotiation import SUBPROTOCOL_V1, UnsupportedVersion, negotiate
from odin_fanout.protocol.sse import BadCursor, parse_channels, parse_cursor
from odin_fanout.server.connection import Connection
from odin_fanout.server.context import ServerContext
from odin_fanout.server.endpoints import answer, answer_ops
from odin_fanout.server.fanout import Fanout
from odin_fanout.server.handshake import HandshakeRefused, accept
from odin_fanout.server.http import BadRequest, RequestHead, read_request_head, response
from odin_fanout.server.jwks import verify_token
from odin_fanout.server.outbox import Outbox
from odin_fanout.server.page import answer_page
from odin_fanout.server.proxy_header import read_proxy_header
from odin_fanout.server.publish_api import PublishApi
from odin_fanout.server.sse import SseConnection, SseRequest, sse_cors
from odin_fanout.server.tokens import TokenRefused, token_from
from odin_fanout.server.worker_role import WorkerRole
from odin_fanout.server.writer import Writer

# Publications the fan-out takes from the feed per wake-up before yielding to other tasks.
_FEED_BATCH = 256


@attrs.frozen
class Listening:
    """Where the server listens, as reported at start."""

    websocket: list[str]
    http: list[str]
    ops: list[str] = attrs.field(factory=list)
    """The ops listener's URLs (``server.ops_listen``); empty without one."""

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
        self._last_tls_log = -1e9
        admission = config.admission
        self.admission = Admission(
            Limits(
                max_per_ip=admission.max_per_ip,
                max_per_subject=admission.max_per_subject,
                new_per_second=admission.new_per_ip_per_second,
                new_burst=admission.new_per_ip_burst,
                max_addresses=admission.max_addresses,
            ),
            on_evict=self.context.metrics.admission_evictions.inc,
        )
        """Open connections per client address and per token subject (``[admission]``)."""
        self.trusted_proxies = TrustedProxies(parse_networks(admission.trusted_proxies))
        self._admission_logged: dict[str, float] = {}
        self.publish_api = PublishApi(self.context)
        """``POST /api/publish`` (``[publish]``; off unless enabled)."""

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
        ops = config.ops_address
        ops_listeners = (
            await open_ops_listeners(*ops, reuseport=context.worker is not None) if ops else []
        )
        async with trio.open_nursery() as root:
            await root.start(context.interest.run)
            await root.start(self._pump)
            root.start_soon(self._housekeeping)
            root.start_soon(context.flusher.run)
            root.start_soon(context.liveness.run, context.flusher.flush)
            root.start_soon(context.expiries.run)
            root.start_soon(context.jwks.run)
            async with trio.open_nursery() as connections:
                accepting = trio.CancelScope()
                connections.start_soon(self._accept, listeners, connections, accepting)
                if ops_listeners:
                    # Not under ``accepting``: /ready answers 503 all through a drain.
                    connections.start_soon(self._accept_ops, ops_listeners, connections)
                listening = self._describe(listeners, ops_listeners)
                self.log.info("capacity", **context.registry.capacity.describe())
                self.log.lifecycle().info(
                    "listening",
                    websocket=listening.websocket,
                    http=listening.http,
                    ops=listening.ops,
                    tls=context.tls.enabled,
                )
                task_status.started(listening)
                await self._shutdown.wait()
                accepting.cancel()
                await self._drain()
                connections.cancel_scope.cancel()
            root.cancel_scope.cancel()
        self.log.lifecycle().info("stopped")

    def _describe(
        self,
        listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
        ops_listeners: Sequence[trio.SocketListener] = (),
    ) -> Listening:
        ws_path = self.context.config.server.ws_path
        ws, web = ("wss", "https") if self.context.tls.enabled else ("ws", "http")
        websocket, http = [], []
        for listener in listeners:
            if isinstance(listener, trio.SocketListener):
                where = _host_port(listener)
                websocket.append(f"{ws}://{where}{ws_path}")
                http.append(f"{web}://{where}")
            else:
                websocket.append(f"{ws}://memory:0{ws_path}")
                http.append(f"{web}://memory:0")
        ops = [f"http://{_host_port(listener)}" for listener in ops_listeners]
        return Listening(websocket, http, ops)

    async def _accept(
        self,
        listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
        connections: trio.Nursery,
        scope: trio.CancelScope,
    ) -> None:
        with scope:
            await trio.serve_listeners(self._handle, list(listeners), handler_nursery=connections)

    async def _accept_ops(
        self, listeners: Sequence[trio.SocketListener], connections: trio.Nursery
    ) -> None:
        await trio.serve_listeners(self._handle_ops, list(listeners), handler_nursery=connections)

    async def _handle_ops(self, transport: trio.abc.Stream) -> None:
        """One request on the ops listener: /metrics, /health, /ready, plain HTTP, no CORS."""
        config = self.context.config.server
        try:
            with trio.move_on_after(config.handshake_timeout):
                try:
                    head = await read_request_head(transport, config.max_request_head)
                except BadRequest as exc:
                    await transport.send_all(response(exc.status, f"{exc}\n".encode()))
                    return
                if head is not None:
                    await transport.send_all(answer_ops(self.context, head))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client left
        except Exception as exc:  # one request's failure never ends the ops listener
            self.log.error("conn_error", peer=peer_address(transport), exc_info=exc)
        finally:
            await trio.aclose_forcefully(transport)

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
        ticket = self.admission.ticket()
        try:
            # the PROXY protocol header (if any) is read here, on the raw stream, before TLS
            source = await self._source(transport)
            if source is None:
                return
            async with trio.open_nursery() as nursery:
                try:
                    await self._serve(transport, nursery, source, ticket)
                finally:
                    nursery.cancel_scope.cancel()
        except* Exception as group:
            # except*: a failure in one of the connection's tasks arrives grouped with the
            # Cancelled of its siblings; log the failure, let the cancellation go on.
            self.log.error("conn_error", peer=peer_address(transport), exc_info=group)
        finally:
            # What the client took of the per-client limits goes back (once) however it ended:
            # a refusal, a timeout, a failure (a connection gives it back at its close).
            ticket.release(trio.current_time())
            await trio.aclose_forcefully(transport)

    async def _source(self, transport: trio.abc.Stream) -> Source | None:
        """Where the connection comes from: its peer, or, from a trusted proxy with
        ``admission.proxy_protocol`` on, the PROXY header's source (read off the raw stream,
        exactly, so what follows is untouched); None to close it (a bad header, counted)."""
        peer = _socket_peer(transport)
        if peer is None:
            return Source("memory")
        host, port = peer
        settings = self.context.config.admission
        if not (settings.proxy_protocol and self.trusted_proxies.trusts(host)):
            return Source(host, port)
        timeout = self.context.config.server.handshake_timeout
        shown = Source(host, port).shown
        with trio.move_on_after(timeout):
            try:
                header = await read_proxy_header(transport)
            except ProxyHeaderError as exc:
                self._refused("proxy_header", shown, str(exc))
                return None
            if header is None:
                return None  # gone before a byte: a port check
            if header.source is None:  # LOCAL: the proxy's own connection (a health check)
                return Source(host, port)
            return Source(header.source, header.source_port)
        self.context.metrics.rejected["handshake_timeout"].inc()
        self.log.info("handshake_timeout", peer=shown, timeout=timeout)
        return None

    async def _serve(
        self,
        transport: trio.abc.Stream,
        nursery: trio.Nursery,
        source: Source | None = None,
        ticket: Ticket | None = None,
    ) -> None:
        context = self.context
        # the PROXY protocol header (if any) is read above, on the raw stream
        if context.tls.enabled:
            secured = await self._start_tls(transport)
            if secured is None:
                return
            transport = secured
        queue = context.config.connection
        writer = Writer(
            transport, Outbox(queue.queue_max_messages, queue.queue_max_bytes), context.flusher
        )
        writer.attach(nursery)
        # A separate call, so the request head and the handshake's locals are not kept
        # alive for as long as the connection lives.
        upgrade = await self._upgrade(transport, writer, source, ticket)
        if upgrade is None:
            return
        if isinstance(upgrade, SseRequest):
            await self._serve_sse(transport, writer, nursery, upgrade, ticket)
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
                awaiting_auth=upgrade.awaiting_auth,
                admission=ticket,
            )
            if context.registry.draining:
                self._close_for_shutdown(connection)
        except BaseException:
            context.registry.release()
            raise
        # From here the connection gives its place back itself.
        await connection.run(nursery)

    async def _upgrade(
        self,
        transport: trio.abc.Stream,
        writer: Writer,
        source: Source | None = None,
        ticket: Ticket | None = None,
    ) -> Upgrade | SseRequest | None:
        """Read the request head and answer it: a plain HTTP answer, a refusal, or the 101
        of an admitted upgrade (its place taken), or an admitted event stream (``/sse``);
        None for neither."""
        context = self.context
        config = context.config.server
        peer = source.shown if source is not None else peer_address(transport)
        with trio.move_on_after(config.handshake_timeout):
            try:
                head = await read_request_head(transport, config.max_request_head)
            except BadRequest as exc:
                context.metrics.rejected["bad_request"].inc()
                await _answer(writer, response(exc.status, f"{exc}\n".encode()))
                return None
            if head is None:
                return None
            if config.sse_path and head.path == config.sse_path:
                admitted = await self._admit_sse(head, peer, source, ticket)
                if isinstance(admitted, bytes):
                    await _answer(writer, admitted)
                    return None
                return admitted
            if head.path != config.ws_path:
                if PublishApi.handles(head, context.config.publish.enabled):
                    await self.publish_api.serve(head, transport, partial(_answer, writer), peer)
                    return None
                await _answer(writer, answer_page(context, head) or answer(context, head))
                return None
            address = peer
            if source is not None:
                address, peer = self._client(source, head)
            refusal = self._refusal(head, peer)
            if refusal is None and ticket is not None:
                refusal = self._admit_address(ticket, address, peer)
            if refusal is not None:
                await _answer(writer, refusal)
                return None
            grant = await self._authenticate(head, peer)
            if isinstance(grant, bytes):
                await _answer(writer, grant)
                return None
            if grant is not None and ticket is not None and not ticket.admit_subject(grant.subject):
                await _answer(writer, self._refused("per_subject", peer, grant.subject))
                return None
            awaiting_auth = grant is None  # the token is to come in-band, first message
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
            return Upgrade(
                peer,
                head.headers.get("origin"),
                protocol.v1,
                head.trailing,
                grant or ANONYMOUS,
                awaiting_auth,
            )
        context.metrics.rejected["handshake_timeout"].inc()
        self.log.info("handshake_timeout", peer=peer, timeout=config.handshake_timeout)
        return None

    async def _admit_sse(
        self, head: RequestHead, peer: str, source: Source | None, ticket: Ticket | None
    ) -> SseRequest | bytes:
        """Admit ``GET /sse`` as an upgrade is admitted (origin, draining, the connection
        limit, per-client limits, the token), or the answer refusing it."""
        cors = self.context.config.server.cors_allow_origin
        allow = [(b"Allow", b"GET, OPTIONS")]
        if head.method == "OPTIONS":
            return response(204, headers=[*allow, *sse_cors(cors)])
        if head.method != "GET":
            return response(405, b"method not allowed\n", headers=allow)
        address = peer
        if source is not None:
            address, peer = self._client(source, head)
        refusal = self._refusal(head, peer, websocket=False)
        if refusal is None and ticket is not None:
            refusal = self._admit_address(ticket, address, peer)
        if refusal is not None:
            return refusal
        grant = await self._authenticate(head, peer)
        if grant is None:  # no token, and none can follow on a stream
            return self._unauthorized(peer, "missing", "a token is required")
        if isinstance(grant, bytes):
            return grant
        admitted = ticket is None or ticket.admit_subject(grant.subject)
        if grant is not ANONYMOUS and not admitted:
            return self._refused("per_subject", peer, grant.subject)
        channels = parse_channels(head.query_values("channels"))
        if not channels:
            body = b"channels: name at least one channel or pattern (?channels=BTC.trade,ETH.*)\n"
            return response(400, body)
        # EventSource sends Last-Event-ID itself; a page starting a new stream (with a new
        # token) can only pass it in the URL.
        last_event_id = head.headers.get("last-event-id") or "".join(
            head.query_values("last_event_id")[:1]
        )
        try:
            cursor = parse_cursor(last_event_id)
        except BadCursor as exc:
            return response(400, f"Last-Event-ID: {exc}\n".encode())
        self.context.registry.admit()
        return SseRequest(peer, head.headers.get("origin"), grant, channels, cursor)

    async def _serve_sse(
        self,
        transport: trio.abc.Stream,
        writer: Writer,
        nursery: trio.Nursery,
        request: SseRequest,
        ticket: Ticket | None,
    ) -> None:
        try:
            stream = SseConnection(
                self.context,
                transport,
                writer,
                self.fanout,
                request,
                number=next(self._numbers),
                scope=nursery.cancel_scope,
                admission=ticket,
            )
            answer, action = stream.refusal()
        except BaseException:
            self.context.registry.release()
            raise
        if action is None:
            self.context.registry.release()
            await _answer(writer, answer)
            return
        if self.context.registry.draining:
            self._close_for_shutdown(stream)
        await stream.serve(nursery, action)

    async def _authenticate(self, head: RequestHead, peer: str) -> Grant | bytes | None:
        """What the request's token grants (nothing without one), the 401 refusing it, or
        None: a token is required, none came, and the client speaks v1, so it may send it as
        its first message (``auth``)."""
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
                if SUBPROTOCOL_V1 in head.subprotocols or "1" in head.query_values("protocol"):
                    return None
                return self._unauthorized(peer, "missing", "a token is required")
            return ANONYMOUS  # a token nothing can check grants nothing: public channels
        try:
            return await verify_token(verifier, context.jwks, settings, token)
        except TokenRefused as exc:
            return self._unauthorized(peer, exc.reason, str(exc))

    async def _start_tls(
        self, transport: trio.abc.Stream
    ) -> trio.SSLStream[trio.abc.Stream] | None:
        """``transport`` with the TLS handshake done (the context in effect now: a reload
        swaps it for later connections only), or None if the handshake failed or timed out."""
        context = self.context
        tls = context.tls.context
        assert tls is not None
        timeout = context.config.server.handshake_timeout
        stream = trio.SSLStream(transport, tls, server_side=True, https_compatible=True)
        with trio.move_on_after(timeout):
            try:
                await stream.do_handshake()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                context.metrics.rejected["tls"].inc()
                # At most one line a second: a scan or a storm of bad clients stays cheap to
                # log (the counter has them all).
                now = trio.current_time()
                if now - self._last_tls_log >= 1.0:
                    self._last_tls_log = now
                    cause = exc.__cause__ or exc
                    detail = getattr(cause, "reason", None) or str(cause) or type(cause).__name__
                    self.log.warning(
                        "tls_handshake_failed", peer=peer_address(transport), error=detail
                    )
                return None
            return stream
        context.metrics.rejected["handshake_timeout"].inc()
        self.log.info("handshake_timeout", peer=peer_address(transport), timeout=timeout)
        return None

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

    def _client(self, source: Source, head: RequestHead) -> tuple[str, str]:
        """The client's address, and as logged: the source's, or, from a trusted proxy, the
        one its forwarding header names (admission.forwarded_header; odin_fanout.core.admission)."""
        trusted = self.trusted_proxies
        if not trusted.trusts(source.host):
            return source.address, source.shown
        if self.context.config.admission.forwarded_header == "forwarded":
            hops = forwarded_for(head.headers.get("forwarded", ""))
        else:
            hops = head.headers.get("x-forwarded-for", "").split(",")
        client = trusted.client(source.host, [hop for hop in hops if hop.strip()])
        return client, source.shown if client == source.address else client

    def _admit_address(self, ticket: Ticket, address: str, peer: str) -> bytes | None:
        """Take the client address's place (admission.max_per_ip, its new-connection bucket),
        or the 429 refusing it."""
        limits = self.admission.limits
        if not (limits.max_per_ip or self.admission.rate_limited):
            return None
        ticket.address = address
        reason = ticket.admit_address(trio.current_time())
        return None if reason is None else self._refused(reason, peer, ticket.address)

    def _refused(self, reason: str, peer: str, detail: str) -> bytes:
        """Count and log (one line a second per reason at most) a per-client refusal; the
        answer to send (429 with Retry-After; 503 when the address table is full)."""
        self.context.metrics.rejected[reason].inc()
        now = trio.current_time()
        if now - self._admission_logged.get(reason, -2.0) >= 1.0:
            self._admission_logged[reason] = now
            self.log.warning("admission_refused", peer=peer, reason=reason, detail=detail[:200])
        retry_after = self.context.config.server.retry_after
        if reason == IP_RATE:
            retry_after = max(1, math.ceil(1 / self.admission.limits.new_per_second))
        retry = [(b"Retry-After", str(retry_after).encode())]
        if reason == ADDRESS_TABLE:
            return response(503, b"server at capacity\n", headers=retry)
        text = {
            "per_ip": b"too many connections from this address\n",
            "ip_rate": b"too many new connections from this address\n",
            "per_subject": b"too many connections for this user\n",
        }.get(reason, b"refused\n")
        return response(429, text, headers=retry)

    def _refusal(self, head: RequestHead, peer: str, *, websocket: bool = True) -> bytes | None:
        """The response refusing an upgrade (or an event stream), or None to accept it."""
        context = self.context
        config = context.config.server
        metrics = context.metrics
        retry = [(b"Retry-After", str(config.retry_after).encode())]
        if websocket and not head.is_websocket_upgrade:
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
class Source:
    """Where a connection comes from before its request is read: its peer, or the source a
    trusted proxy's PROXY header named."""

    host: str
    port: int | None = None

    @property
    def shown(self) -> str:
        """As logged (``peer``)."""
        if self.port is None:
            return self.host
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def address(self) -> str:
        """The host, normalised (the key of the per-address counts)."""
        parsed = parse_address(self.host)
        return self.host if parsed is None else str(parsed)


@attrs.frozen
class Upgrade:
    """An admitted WebSocket upgrade: what the connection needs of its request."""

    peer: str
    origin: str | None
    v1: bool
    trailing: bytes
    grant: Grant = ANONYMOUS
    awaiting_auth: bool = False


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


async def open_ops_listeners(
    host: str, port: int, *, reuseport: bool = False
) -> list[trio.SocketListener]:
    """The ops listener (``server.ops_listen``): as ``open_listeners``, or, for a worker of
    ``--workers N``, a socket of its own on the supervisor's address with SO_REUSEPORT (any
    worker answers; /metrics has the host's totals whichever does)."""
    if not reuseport:
        try:
            return await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            raise StartError(listen_problem(host, port, exc, "server.ops_listen")) from None
    listeners = []
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(socket.SOMAXCONN)
            except OSError:
                sock.close()
                raise
            listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
    except OSError as exc:
        for listener in listeners:
            listener.socket.close()
        raise StartError(listen_problem(host, port, exc, "server.ops_listen")) from None
    return listeners


def _host_port(listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_problem(host: str, port: int, exc: OSError, setting: str = "") -> str:
    """Why ``host:port`` cannot be listened on, for the operator."""
    problem = _LISTEN_PROBLEMS.get(exc.errno or 0, exc.strerror or str(exc))
    if setting:  # not the client port's: name the setting that chose the address
        problem = problem.split(" (", 1)[0] + f" ({setting})"
    shown = f"[{host}]" if ":" in host else host
    return f"address {shown}:{port} {problem}"


async def _answer(writer: Writer, data: bytes) -> None:
    """Send a complete HTTP response (the socket is closed after it)."""
    writer.offer(data, force=True)
    await writer.wait_flushed()


def _socket_peer(transport: trio.abc.Stream) -> tuple[str, int | None] | None:
    """The socket's peer (host, port); None for a stream that is not a socket."""
    if isinstance(transport, trio.SSLStream):
        transport = transport.transport_stream
    if isinstance(transport, trio.SocketStream):
        try:
            host, port = transport.socket.getpeername()[:2]
        except OSError:
            return "unknown", None
        return str(host), int(port)
    return None


def peer_address(transport: trio.abc.Stream) -> str:
    peer = _socket_peer(transport)
    if peer is None:
        return "memory"
    host, port = peer
    return host if port is None else f"{host}:{port}"
