"""The client: one WebSocket connection at a time, kept open, and the subscriptions on it.

One task owns the connection. It connects (with a fresh token each time), subscribes again
with ``recover`` for every channel it has a position of, reads, and routes each event to the
subscriptions whose patterns cover its channel. When the connection is lost it waits (the
server's ``after_ms``, the ``Retry-After`` of a 503 or 429 refusing the upgrade, or a jittered
exponential backoff) and does it again. Consumers never block it: each subscription buffers up
to its bound and drops its oldest items beyond that, telling the consumer with a ``Gap``.

It gives up only when the server refuses its token (401 on the upgrade, close 4011 or 4012):
at once with a fixed token, after ``max_auth_refusals`` refusals in a row with a token
provider. Every subscription then raises ``AuthenticationError``.
"""

from __future__ import annotations

import email.utils
import random
import ssl
import time
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import orjson
import trio
import trio_websocket
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError, WebSocketConnection
from wsproto.utilities import LocalProtocolError

from odin_fanout.client.items import (
    AuthenticationError,
    Event,
    Gap,
    Item,
    NotRecovered,
    Position,
    Refusal,
    SubscriptionError,
)

SUBPROTOCOL = "odin.v1"

TokenProvider = Callable[[], Awaitable[str | None]]
Token = str | TokenProvider | None

# What ends one connection and starts the wait before the next (never the client).
_LOST = (ConnectionClosed, HandshakeError, OSError, trio.BrokenResourceError, LocalProtocolError)

Message = dict[str, Any]

# The close codes of a token the server refused (docs/protocol.md, Close codes): the client
# gives up on them (a fixed token) or asks its provider again; 4010 (expired) just reconnects.
AUTH_REQUIRED = 4011
TOKEN_INVALID = 4012
TOKEN_EXPIRED = 4010
_AUTH_CLOSES = {AUTH_REQUIRED: "AUTH_REQUIRED", TOKEN_INVALID: "TOKEN_INVALID"}
# The statuses whose Retry-After the client waits before its next attempt.
_RETRY_AFTER_STATUSES = (429, 503)


def retry_after_seconds(headers: Iterable[tuple[bytes, bytes]], now: float) -> float | None:
    """A ``Retry-After`` header's delay in seconds (delta-seconds or an HTTP date; never
    negative), or None when there is none that can be read. ``now``: Unix seconds."""
    for name, value in headers:
        if name.lower() != b"retry-after":
            continue
        text = value.decode("latin-1").strip()
        if text.isdigit():
            return float(text)
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - now)
    return None


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def matches(pattern: str, channel: str) -> bool:
    """Whether ``pattern`` (``BTC.*``, ``*.trade``, ``*.*`` or a channel) covers ``channel``."""
    wanted = pattern.split(".")
    parts = channel.split(".")
    return len(wanted) == len(parts) and all(
        w in ("*", p) for w, p in zip(wanted, parts, strict=True)
    )


@attrs.frozen
class _Target:
    """Where a ``ws://`` or ``wss://`` URL points."""

    host: str
    port: int
    resource: str
    secure: bool

    @classmethod
    def parse(cls, url: str) -> _Target:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"{url!r}: need a ws:// or wss:// URL with a host")
        secure = parts.scheme == "wss"
        port = parts.port or (443 if secure else 80)
        resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.hostname, port, resource, secure)

    @property
    def host_header(self) -> str:
        return self.host if self.port in (80, 443) else f"{self.host}:{self.port}"

    async def open_stream(self) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
        if self.secure:
            return await trio.open_ssl_over_tcp_stream(
                self.host, self.port, ssl_context=ssl.create_default_context()
            )
        return await trio.open_tcp_stream(self.host, self.port)


class Subscription:
    """An async iterator of ``Event``, ``Gap`` and ``NotRecovered`` items for its patterns.

    It lasts across reconnects; ``aclose()`` (or leaving ``async with``) unsubscribes."""

    def __init__(self, client: Client, number: int, patterns: tuple[str, ...], bound: int):
        self.patterns = patterns
        self._client = client
        self.number = number
        self._bound = bound
        self._items: deque[Item] = deque()
        self._overflow: dict[str, list[int]] = {}
        """Per channel, the positions (first, last) dropped for the bound, not yet told."""
        self._wakeup = trio.Event()
        self._error: SubscriptionError | None = None
        self._active = trio.Event()
        self.acknowledged = False
        """The server acknowledged it at least once (it is part of every resubscribe)."""
        self.closed = False

    @property
    def active(self) -> bool:
        """The server acknowledged it on the current connection: its events flow."""
        return self._active.is_set() and self._error is None

    @active.setter
    def active(self, value: bool) -> None:
        if value:
            self._active.set()
        elif self._active.is_set():
            self._active = trio.Event()

    async def wait_active(self) -> None:
        """Return once the server has acknowledged the subscription on the current
        connection (raises ``SubscriptionError`` if it refused it)."""
        await self._active.wait()
        if self._error is not None:
            raise self._error

    def covers(self, channel: str) -> bool:
        return any(matches(pattern, channel) for pattern in self.patterns)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Item:
        while True:
            if self._overflow:
                channel = next(iter(self._overflow))
                first, last = self._overflow.pop(channel)
                return Gap(channel, first, last, "client_overflow")
            if self._items:
                return self._items.popleft()
            if self._error is not None:
                raise self._error
            if self.closed:
                raise StopAsyncIteration
            self._wakeup = trio.Event()
            await self._wakeup.wait()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Unsubscribe (patterns another subscription holds stay subscribed) and end."""
        self._client._unsubscribe(self)
        self._end()
        await trio.lowlevel.checkpoint()

    # ---- the connection task's side ------------------------------------------------------

    def _offer(self, item: Item) -> None:
        if self.closed:
            return
        self._items.append(item)
        while len(self._items) > self._bound:
            # The oldest event or gap goes; a NotRecovered notice is never dropped.
            index = next(
                (i for i, kept in enumerate(self._items) if not isinstance(kept, NotRecovered)),
                None,
            )
            if index is None:
                break
            dropped = self._items[index]
            del self._items[index]
            if isinstance(dropped, Event):
                self._note_dropped(dropped.channel, dropped.seq, dropped.seq)
            elif isinstance(dropped, Gap):
                self._note_dropped(dropped.channel, dropped.from_seq, dropped.to_seq)
        self._wakeup.set()

    def _note_dropped(self, channel: str, first: int, last: int) -> None:
        span = self._overflow.get(channel)
        if span is None:
            self._overflow[channel] = [first, last]
        else:
            span[0], span[1] = min(span[0], first), max(span[1], last)

    def _fail(self, error: SubscriptionError) -> None:
        self._error = error
        self.closed = True
        self._active.set()  # wakes wait_active(), which raises
        self._wakeup.set()

    def _end(self) -> None:
        self.closed = True
        self._wakeup.set()


class Client:
    """Subscriptions on an Odin server, kept across reconnects. Made by ``connect()``."""

    def __init__(
        self,
        url: str,
        *,
        token: Token = None,
        min_backoff: float = 0.5,
        max_backoff: float = 30.0,
        buffer_size: int = 10_000,
        connect_timeout: float = 10.0,
        close_timeout: float = 2.0,
        max_retry_after: float = 60.0,
        max_auth_refusals: int = 3,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < min_backoff <= max_backoff:
            raise ValueError("need 0 < min_backoff <= max_backoff")
        if buffer_size < 1:
            raise ValueError("buffer_size must be at least 1")
        if max_retry_after < 0:
            raise ValueError("max_retry_after must not be negative")
        if max_auth_refusals < 1:
            raise ValueError("max_auth_refusals must be at least 1")
        self.url = url
        self._target = _Target.parse(url)
        self._token = token
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.buffer_size = buffer_size
        self.connect_timeout = connect_timeout
        self.close_timeout = close_timeout
        self.max_retry_after = max_retry_after
        self.max_auth_refusals = max_auth_refusals
        self._rng = rng or random.Random()
        self.positions: dict[str, Position] = {}
        """Per concrete channel, the last position seen (from events, gaps and acks)."""
        self.connection_id: str | None = None
        """The current connection's id (from the server's ``hello``); None while offline."""
        self.connections = 0
        """How many connections have been established so far."""
        self.last_close: tuple[int | None, str] | None = None
        """The close code and reason of the last connection lost (None: not closed by the
        server with a close frame)."""
        self.attempts = 0
        """How many connection attempts have started so far (successful or not)."""
        self.refusals = 0
        """How many attempts the server answered with an HTTP status instead of the upgrade."""
        self.last_refusal: Refusal | None = None
        """The last such answer: its status, ``Retry-After`` and reason."""
        self.last_wait: float | None = None
        """The seconds waited (or being waited) before the latest (or next) attempt."""
        self.auth_refusals = 0
        """The server's refusals of the token in a row (401, close 4011 or 4012); a token the
        server takes with the upgrade, or a connection that ends any other way, starts the
        count again."""
        self.error: AuthenticationError | None = None
        """Why the client gave up (None: it has not); it stays closed then."""
        self._attempted = trio.Event()
        self._refused = trio.Event()
        self._close_code: int | None = None
        self._retry_after: float | None = None
        self._subscriptions: dict[int, Subscription] = {}
        self._numbers = 0
        self._ws: WebSocketConnection | None = None
        self._outbox: deque[Message] = deque()
        self._outbox_ready = trio.Event()
        self._requests: dict[str, list[Subscription]] = {}
        """Subscribe requests in flight on this connection, by id: the subscriptions each
        covers."""
        self._reconnect_after: float | None = None
        self._connected = trio.Event()
        self._closing = False
        self.token_expires_at: float | None = None
        """When the token the server last accepted in-band (``refresh``) expires (Unix
        seconds; None: none accepted, or it has no expiry)."""
        self.tokens_taken = 0
        """Tokens the server accepted in-band (``auth_ok`` answering a ``refresh``)."""
        self._token_taken = trio.Event()

    # ---- the consumer's side -----------------------------------------------------------

    def subscribe(self, *patterns: str, buffer_size: int | None = None) -> Subscription:
        """Subscribe to channels or patterns; iterate the result for their items."""
        if not patterns:
            raise ValueError("subscribe needs at least one channel or pattern")
        if self.error is not None:
            raise self.error
        if self._closing:
            raise RuntimeError("the client is closed")
        self._numbers += 1
        subscription = Subscription(
            self, self._numbers, tuple(patterns), buffer_size or self.buffer_size
        )
        self._subscriptions[subscription.number] = subscription
        if self._ws is not None:
            self._request_subscribe([subscription], recover=False)
        return subscription

    @property
    def closing(self) -> bool:
        """The client is closing (its ``async with`` block is ending)."""
        return self._closing

    async def wait_connected(self) -> None:
        """Return once a connection is established (at once if one is); raise the client's
        ``AuthenticationError`` if it gave up."""
        await self._connected.wait()
        if self.error is not None:
            raise self.error

    @property
    def connected(self) -> bool:
        return self._connected.is_set() and self.error is None

    async def wait_attempts(self, count: int) -> None:
        """Return once ``count`` connection attempts have started (raise the client's
        ``AuthenticationError`` if it gave up before)."""
        while self.attempts < count:
            if self.error is not None:
                raise self.error
            await self._attempted.wait()

    async def wait_refusals(self, count: int) -> None:
        """Return once the server has refused ``count`` upgrades (``last_refusal`` says how,
        ``last_wait`` how long the client waits before its next attempt); raise the client's
        ``AuthenticationError`` if it gave up before."""
        while self.refusals < count:
            if self.error is not None:
                raise self.error
            await self._refused.wait()

    async def wait_tokens_taken(self, count: int) -> None:
        """Return once the server has accepted ``count`` tokens in-band (``auth_ok`` answering
        a ``refresh``); ``token_expires_at`` says until when the last holds."""
        while self.tokens_taken < count:
            await self._token_taken.wait()

    # ---- requests ------------------------------------------------------------------------

    def _send(self, message: Message) -> None:
        self._outbox.append(message)
        self._outbox_ready.set()

    def _request_subscribe(self, subscriptions: list[Subscription], *, recover: bool) -> None:
        self._numbers += 1
        request_id = f"s{self._numbers}"
        patterns = list(dict.fromkeys(p for s in subscriptions for p in s.patterns))
        data: Message = {"channels": patterns}
        if recover:
            positions = {
                channel: {"epoch": position.epoch, "seq": position.seq}
                for channel, position in self.positions.items()
                if any(matches(pattern, channel) for pattern in patterns)
            }
            if positions:
                data["recover"] = positions
        self._requests[request_id] = subscriptions
        self._send({"type": "subscribe", "id": request_id, "data": data})

    def _unsubscribe(self, subscription: Subscription) -> None:
        if self._subscriptions.pop(subscription.number, None) is None:
            return
        held = {p for s in self._subscriptions.values() for p in s.patterns}
        gone = [p for p in subscription.patterns if p not in held]
        if gone and self._ws is not None and subscription.active:
            self._send({"type": "unsubscribe", "data": {"channels": gone}})

    @property
    def _token_is_fixed(self) -> bool:
        return self._token is None or isinstance(self._token, str)

    async def _token_now(self) -> str | None:
        if self._token is None or isinstance(self._token, str):
            return self._token
        return await self._token()

    # ---- the connection task -----------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while True:
            self._reconnect_after = None
            self._retry_after = None
            self._close_code = None
            refusal: ConnectionRejected | None = None
            established = False
            self.attempts += 1
            attempted, self._attempted = self._attempted, trio.Event()
            attempted.set()
            try:
                established = await self._connect_once()
            except* ConnectionRejected as group:
                refusal = next(e for e in _leaves(group) if isinstance(e, ConnectionRejected))
            except* _LOST:
                pass
            except* trio.TooSlowError:
                pass  # the connection attempt timed out
            finally:
                self._connection_ended()
            if self.closing:
                return
            if refusal is not None:
                self._note_refusal(refusal)
            refused = self._auth_refused(refusal)
            if refused is not None:
                self.auth_refusals += 1
                if self._token_is_fixed or self.auth_refusals >= self.max_auth_refusals:
                    refused.refusals = self.auth_refusals
                    self._give_up(refused)
                    return
                established = False  # back off: the provider needs to come up with another
            elif established:
                self.auth_refusals = 0
            failures = 0 if established else failures + 1
            self.last_wait = self._delay(failures)
            await trio.sleep(self.last_wait)

    def _delay(self, failures: int) -> float:
        if self._reconnect_after is not None:
            return self._reconnect_after
        if self._retry_after is not None:
            # At least what the server asked (up to the cap), and up to a tenth more so that
            # the clients it refused at once do not all come back at once.
            return min(self._retry_after, self.max_retry_after) * self._rng.uniform(1.0, 1.1)
        ceiling = min(self.max_backoff, self.min_backoff * 2 ** min(failures, 32))
        return self._rng.uniform(max(self.min_backoff, ceiling / 2), ceiling)

    def _note_refusal(self, refusal: ConnectionRejected) -> None:
        retry_after = retry_after_seconds(refusal.headers, time.time())
        reason = (refusal.body or b"").decode("utf-8", "replace").strip()
        self.last_refusal = Refusal(refusal.status_code, retry_after, reason)
        if refusal.status_code in _RETRY_AFTER_STATUSES:
            self._retry_after = retry_after
        self.refusals += 1
        refused, self._refused = self._refused, trio.Event()
        refused.set()

    def _auth_refused(self, refusal: ConnectionRejected | None) -> AuthenticationError | None:
        """The attempt's end as a refusal of the token (401, close 4011 or 4012), or None."""
        if refusal is not None and refusal.status_code == 401:
            assert self.last_refusal is not None
            return AuthenticationError(
                "TOKEN_INVALID", self.last_refusal.reason or "unauthorized", status=401
            )
        code, close = self._close_code, self.last_close
        if code is not None and code in _AUTH_CLOSES and close is not None:
            return AuthenticationError(_AUTH_CLOSES[code], close[1], close_code=code)
        return None

    def _give_up(self, error: AuthenticationError) -> None:
        self.error = error
        self._closing = True
        for subscription in self._subscriptions.values():
            subscription._fail(error)
        self._subscriptions.clear()
        # Wake wait_connected(), wait_attempts() and wait_refusals(), which raise.
        for event in (self._connected, self._attempted, self._refused):
            event.set()

    async def _connect_once(self) -> bool:
        """One connection, until it is lost: whether it got as far as the server's hello.

        The client opens (and always closes) the TCP stream itself: trio-websocket leaves a
        client's socket open when the server closes first."""
        token = await self._token_now()
        headers = [(b"Authorization", b"Bearer " + token.encode())] if token else []
        async with trio.open_nursery() as nursery:
            with trio.fail_after(self.connect_timeout):
                stream = await self._target.open_stream()
            ws: WebSocketConnection | None = None
            try:
                with trio.fail_after(self.connect_timeout):
                    ws = await trio_websocket.wrap_client_stream(
                        nursery,
                        stream,
                        self._target.host_header,
                        self._target.resource,
                        subprotocols=[SUBPROTOCOL],
                        extra_headers=headers,
                    )
                    hello = orjson.loads(await ws.get_message())
                self.connection_id = str(hello.get("connection_id", "")) or None
                self.connections += 1
                if token:
                    self.auth_refusals = 0  # the server took the token with the upgrade
                self._start_connection(ws)
                async with trio.open_nursery() as session:
                    session.start_soon(self._send_loop, ws)
                    await self._receive_loop(ws, session)
            except* ConnectionClosed:
                if ws is not None:
                    self._note_close(ws)
            finally:
                with trio.CancelScope(shield=True):
                    if ws is not None and ws.closed is None:
                        with trio.move_on_after(self.close_timeout):
                            await ws.aclose()
                    await trio.aclose_forcefully(stream)
                nursery.cancel_scope.cancel()
            return self.connection_id is not None

    def _note_close(self, ws: WebSocketConnection) -> None:
        reason = ws.closed
        self.last_close = (reason.code, reason.reason or "") if reason else None
        self._close_code = reason.code if reason else None

    def _start_connection(self, ws: WebSocketConnection) -> None:
        self._ws = ws
        self._outbox.clear()
        self._requests.clear()
        for subscription in self._subscriptions.values():
            subscription.active = False
        # Those the server acknowledged before resubscribe together, recovering what they
        # missed; those it never did go alone, so one refused cannot take the others down.
        known = [s for s in self._subscriptions.values() if s.acknowledged]
        if known:
            self._request_subscribe(known, recover=True)
        for subscription in self._subscriptions.values():
            if not subscription.acknowledged:
                self._request_subscribe([subscription], recover=True)
        self._connected.set()

    def _connection_ended(self) -> None:
        self._ws = None
        self.connection_id = None
        if self._connected.is_set() and self.error is None:
            self._connected = trio.Event()
        for subscription in self._subscriptions.values():
            subscription.active = False

    async def _send_loop(self, ws: WebSocketConnection) -> None:
        while True:
            while self._outbox:
                await ws.send_message(orjson.dumps(self._outbox.popleft()).decode())
            self._outbox_ready = trio.Event()
            await self._outbox_ready.wait()

    async def _receive_loop(self, ws: WebSocketConnection, nursery: trio.Nursery) -> None:
        while True:
            message = await ws.get_message()
            try:
                decoded = orjson.loads(message)
            except orjson.JSONDecodeError:
                continue
            if isinstance(decoded, dict):
                self._handle(decoded, nursery)

    async def _refresh(self) -> None:
        token = await self._token_now()
        if token:
            self._send({"type": "refresh", "data": {"token": token}})

    def _handle(self, message: Message, nursery: trio.Nursery) -> None:
        if "seq" in message and "channel" in message:
            self._on_event(message)
            return
        kind = message.get("type")
        if kind == "subscription_ack":
            self._on_ack(message)
        elif kind == "gap":
            self._on_gap(message)
        elif kind == "error":
            self._on_error(message)
        elif kind == "reconnect":
            self._reconnect_after = max(0, int(message.get("after_ms", 0))) / 1000
        elif kind == "token_expiring":
            nursery.start_soon(self._refresh)
        elif kind == "auth_ok":
            expires = message.get("expires_at")
            self.token_expires_at = expires / 1000 if isinstance(expires, int) else None
            self.tokens_taken += 1
            taken, self._token_taken = self._token_taken, trio.Event()
            taken.set()

    def _routes(self, channel: str) -> Iterable[Subscription]:
        return [s for s in self._subscriptions.values() if s.active and s.covers(channel)]

    def _on_event(self, message: Message) -> None:
        event = Event(
            channel=str(message["channel"]),
            seq=int(message["seq"]),
            prev=int(message.get("prev", 0)),
            epoch=str(message.get("epoch", "")),
            ts=int(message.get("ts", 0)),
            data=message.get("data"),
            type=str(message.get("type", "")),
        )
        last = self.positions.get(event.channel)
        items: list[Item] = []
        if last is not None and last.epoch == event.epoch:
            if event.seq <= last.seq:
                return  # a duplicate (possible only around a replay)
            if event.prev > last.seq:
                items.append(Gap(event.channel, last.seq + 1, event.prev, "missed"))
        self.positions[event.channel] = Position(event.epoch, event.seq)
        items.append(event)
        for subscription in self._routes(event.channel):
            for item in items:
                subscription._offer(item)

    def _on_gap(self, message: Message) -> None:
        gap = Gap(
            str(message["channel"]),
            int(message["from"]),
            int(message["to"]),
            str(message.get("reason", "")),
        )
        last = self.positions.get(gap.channel)
        if last is not None and gap.to_seq > last.seq:
            self.positions[gap.channel] = Position(last.epoch, gap.to_seq)
        for subscription in self._routes(gap.channel):
            subscription._offer(gap)

    def _on_ack(self, message: Message) -> None:
        subscriptions = self._requests.pop(str(message.get("id")), None)
        if subscriptions is None:
            return
        for subscription in subscriptions:
            if not subscription.closed:
                subscription.active = subscription.acknowledged = True
        recovery = message.get("recovery") or {}
        for channel, report in recovery.items():
            if isinstance(report, dict) and not report.get("recovered", True):
                # The latest message follows the ack: it is the new starting point.
                self.positions.pop(channel, None)
                notice = NotRecovered(channel, str(report.get("reason", "")))
                for subscription in self._routes(channel):
                    subscription._offer(notice)
        for channel, position in (message.get("positions") or {}).items():
            if channel in self.positions or channel in recovery:
                continue
            self.positions[channel] = Position(str(position["epoch"]), int(position["seq"]))

    def _on_error(self, message: Message) -> None:
        subscriptions = self._requests.pop(str(message.get("id")), None)
        if subscriptions is None:
            return
        error = SubscriptionError(str(message.get("code", "")), str(message.get("message", "")))
        for subscription in subscriptions:
            self._subscriptions.pop(subscription.number, None)
            subscription._fail(error)

    async def _close(self) -> None:
        self._closing = True
        for subscription in self._subscriptions.values():
            subscription._end()
        ws = self._ws
        if ws is not None:
            with trio.move_on_after(self.close_timeout):
                await ws.aclose()


@asynccontextmanager
async def connect(
    url: str,
    *,
    token: Token = None,
    min_backoff: float = 0.5,
    max_backoff: float = 30.0,
    buffer_size: int = 10_000,
    connect_timeout: float = 10.0,
    close_timeout: float = 2.0,
    max_retry_after: float = 60.0,
    max_auth_refusals: int = 3,
    rng: random.Random | None = None,
) -> AsyncIterator[Client]:
    """A client of the Odin server at ``url`` (``ws://host:3002/ws``), kept connected until
    the block ends.

    ``token``: a JWT, or an async callable returning one (called for every connection and
    for every ``token_expiring``). ``min_backoff``/``max_backoff``: the bounds (seconds) of
    the jittered exponential wait between failed connection attempts. ``buffer_size``: how
    many items each subscription holds for its consumer before it drops the oldest.
    ``max_retry_after``: the most seconds of a 503's or 429's ``Retry-After`` the client
    waits. ``max_auth_refusals``: with a token provider, how many refusals of its tokens in a
    row (401, close 4011 or 4012) before the client gives up (with a fixed token: the first).

    An exception raised in the block comes out of it as itself (not in an exception group).
    """
    client = Client(
        url,
        token=token,
        min_backoff=min_backoff,
        max_backoff=max_backoff,
        buffer_size=buffer_size,
        connect_timeout=connect_timeout,
        close_timeout=close_timeout,
        max_retry_after=max_retry_after,
        max_auth_refusals=max_auth_refusals,
        rng=rng,
    )
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._run)
            try:
                yield client
            finally:
                with trio.CancelScope(shield=True):
                    await client._close()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # trio-websocket can answer a ping that races its own close frame with a pong wsproto
        # refuses (trio-websocket issue 184): harmless once the client is closing.
        rest = [e for e in _leaves(group) if not isinstance(e, LocalProtocolError)]
        if not rest:
            return
        if len(rest) == 1 and isinstance(rest[0], Exception):
            raise rest[0] from None  # the block's own exception, as the block raised it
        raise
