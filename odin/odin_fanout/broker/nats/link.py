"""A NATS connection in Trio that speaks the text protocol: the base of the hot paths.

nats-py runs on asyncio, and through trio-asyncio every message it handles costs several
asyncio callbacks (measured: a publisher at 1,000 events/s spent 85 % of a core in the
trio-asyncio loop). The two paths that carry one NATS message per event, reading the stream
(``delivery.py``) and publishing into it (``publish.py``), therefore use a connection of
their own, written here against the NATS client protocol (INFO, CONNECT, PUB/HPUB, SUB,
MSG/HMSG, PING/PONG; https://docs.nats.io/reference/reference-protocols/nats-protocol).

``Link`` connects (with the URL's user and password or token, or the configured NKey
credentials: ``auth.py``; over TLS when the URL is ``tls://``, a CA is configured or the
server's INFO says ``tls_required``, upgrading in place after INFO), subscribes an inbox for
replies (subscription 1), pings so a silent partition is noticed, and reconnects for ever
with backoff and jitter. What arrives is parsed by ``protocol.Parser`` (sans-IO); a subclass
handles the operations in ``_handle`` (synchronously, the per-message path) and starts its
work in ``_connected``.

Cluster discovery, as the official clients do it: every INFO (the greeting, and the ones a
server sends whenever the cluster changes) may list the cluster's client URLs in
``connect_urls``; they join the configured seeds (``nats.url``), with the credentials of the
server that announced them. A URL that leaves ``connect_urls`` leaves the pool (the seeds
stay). After a connection is lost the link tries every known server, shuffled, the ones that
failed last at the back, with the same backoff and jitter as before (growing with each full
pass over the pool). An INFO with ``ldm: true`` says the server is in lame-duck mode (about
to shut down): the link drops that connection at once and reconnects elsewhere without
waiting (what was in flight is handled as on any reconnect: the publisher sends it again
with the same message ids, the delivery resumes from the next stream position).
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import secrets
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs
import orjson
import trio

from odin_fanout.broker.nats.auth import CredentialsError, Security
from odin_fanout.broker.nats.protocol import (
    ERR,
    HMSG,
    INFO,
    PING,
    PONG,
    Op,
    Parser,
    ProtocolError,
    decode_info,
    status,
)
from odin_fanout.config import NatsAddress
from odin_fanout.logs import Log

READ_SIZE = 256 * 1024
YIELD_EVERY = 256
"""Operations parsed between checkpoints (a read can hold a couple of thousand)."""


class ConnectionLost(Exception):
    """The connection failed or went silent."""


LOST = (
    OSError,
    trio.TooSlowError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    ConnectionLost,
)

NO_RESPONDERS = b'{"error":{"code":503,"description":"no responders"}}'


class LameDuck(ConnectionLost):
    """The server announced lame-duck mode: it is about to go away."""


# ---- discovery (pure) -------------------------------------------------------------------

ServerKey = tuple[str, int]


def server_key(address: NatsAddress) -> ServerKey:
    return (address.host.lower(), address.port)


def parse_info(line: bytes) -> dict[str, Any]:
    """The JSON of an ``INFO {...}`` line (an empty dict if it is not one)."""
    return decode_info(line[5:]) if line.startswith(b"INFO ") else {}


def connect_urls(info: Mapping[str, Any]) -> list[str] | None:
    """The cluster's client URLs an INFO announces (``host:port``); None when it announces
    none (a server with ``no_advertise``, or an INFO about something else)."""
    urls = info.get("connect_urls")
    if not isinstance(urls, list) or not urls:
        return None
    return [url for url in urls if isinstance(url, str) and url]


def is_lame_duck(info: Mapping[str, Any]) -> bool:
    return info.get("ldm") is True


def discovered_addresses(urls: Iterable[str], announcer: NatsAddress) -> list[NatsAddress]:
    """``host:port`` (or ``nats://host:port``, ``[v6]:port``) URLs an INFO announced, with
    the credentials of the server that announced them: a cluster shares its accounts, and
    Odin's credentials are the configured ones; under TLS, one announced by IP address is
    checked for the announcer's name (as the NATS clients do). Malformed ones are skipped."""
    addresses: list[NatsAddress] = []
    for url in urls:
        parsed = urlsplit(url if "://" in url else f"nats://{url}")
        try:
            port = parsed.port or 4222
        except ValueError:
            continue
        if parsed.scheme != "nats" or not parsed.hostname:
            continue
        host = parsed.hostname
        shown = f"[{host}]" if ":" in host else host
        addresses.append(
            NatsAddress(f"{announcer.scheme}://{shown}:{port}", host, port,
                        announcer.user, announcer.password, announcer.token, announcer.tls,
                        tls_name=announcer.tls_name or announcer.host if _is_ip(host) else "")
        )  # fmt: skip
    return addresses


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def merge_servers(
    seeds: Sequence[NatsAddress], discovered: Iterable[NatsAddress]
) -> list[NatsAddress]:
    """The configured seeds (with their own credentials), then the discovered servers that
    are not seeds, each once."""
    pool = list(seeds)
    seen = {server_key(address) for address in pool}
    for address in discovered:
        key = server_key(address)
        if key not in seen:
            seen.add(key)
            pool.append(address)
    return pool


def connect_order(
    servers: Sequence[NatsAddress],
    failed_at: Mapping[ServerKey, float],
    rng: random.Random | None = None,
) -> list[NatsAddress]:
    """The order to try ``servers`` in: shuffled (so instances spread over the cluster),
    then those that never failed first and the others by when they last failed, the most
    recent last."""
    order = list(servers)
    (rng or random).shuffle(order)
    order.sort(key=lambda address: failed_at.get(server_key(address), float("-inf")))
    return order


@attrs.define
class LinkSettings:
    servers: list[NatsAddress]
    ping_interval: float
    max_outstanding_pings: int
    connect_timeout: float
    reconnect_wait_min: float
    reconnect_wait_max: float
    request_timeout: float = 5.0
    security: Security = attrs.Factory(Security)


class Link:
    """One NATS connection, kept up for ever. ``name`` is its client name and its log tag."""

    def __init__(self, settings: LinkSettings, log: Log, name: str) -> None:
        self._link_settings = settings
        self._name = name
        self._log = log.bind(connection=name)
        self.connected = False
        self._stream: trio.abc.Stream | None = None
        self._send_lock = trio.StrictFIFOLock()
        self._token = secrets.token_hex(8)
        self._inbox = f"_INBOX.odin{self._token}"
        """Replies arrive under this prefix (subscription 1)."""
        self._replies: dict[str, trio.MemorySendChannel[bytes]] = {}
        self._request_number = 0
        self._outstanding_pings = 0
        self._seeds = list(settings.servers)
        self._discovered: list[NatsAddress] = []
        """The servers the cluster announced (``connect_urls``), from the latest INFO."""
        self._failed_at: dict[ServerKey, float] = {}
        self.server: NatsAddress | None = None
        """The server of the current connection (None while there is none)."""
        self._lame_duck = False

    @property
    def servers(self) -> list[NatsAddress]:
        """Every known server: the configured seeds and those the cluster announced."""
        return merge_servers(self._seeds, self._discovered)

    # ---- for subclasses ------------------------------------------------------------------

    def _handle(self, ops: list[Op], index: int) -> tuple[int, Awaitable[None] | None]:
        """Handle ``ops`` (at most ``YIELD_EVERY``) from ``index``, synchronously. Returns
        where it stopped and, when it stopped for one, an awaitable to finish before going on
        (it is called again from there). By default: replies, and what ``_control`` does."""
        count = len(ops)
        while index < count:
            op = ops[index]
            index += 1
            if op[0] <= HMSG:
                if op[2] == b"1":
                    self._reply_op(op)
                continue
            follow_up = self._control(op)
            if follow_up is not None:
                return index, follow_up
        return index, None

    async def _connected(self, nursery: trio.Nursery) -> None:
        """Called on each new connection, before it counts as connected."""

    def _disconnected(self) -> None:
        """Called when a connection ends."""

    def _servers_lost(self, lost: list[NatsAddress]) -> None:
        """Called when an INFO no longer announces servers it announced before on this
        connection: they left the cluster (stopped, crashed, or cut off)."""

    # ---- connection ----------------------------------------------------------------------

    async def run(self) -> None:
        settings = self._link_settings
        order = connect_order(self.servers, self._failed_at)
        passes = 0
        """Full passes over the pool that failed since the last connection."""
        first_in_pass = True
        while True:
            if not order:
                order = connect_order(self.servers, self._failed_at)
            server = order.pop(0)
            failures: list[BaseException] = []
            was_connected = False
            self._lame_duck = False
            try:
                with trio.fail_after(settings.connect_timeout):
                    stream = await trio.open_tcp_stream(server.host, server.port)
                self.server = server
                try:
                    await self._serve(stream, server)
                finally:
                    was_connected, self.connected = self.connected, False
                    self._stream = None
                    self.server = None
                    self._disconnected()
                    await trio.aclose_forcefully(stream)
            except* LOST as group:  # grouped: it may come from any task of the connection
                failures.extend(group.exceptions)
            self._failed_at[server_key(server)] = trio.current_time()
            lame_duck = self._lame_duck
            if lame_duck:
                self._log.warning(f"nats_{self._name}_lame_duck", server=server.display)
            elif failures and (was_connected or first_in_pass):  # not every failed retry
                self._log.warning(
                    f"nats_{self._name}_lost", server=server.display, error=repr(failures[0])
                )
            first_in_pass = False
            if was_connected:
                # Every known server again, this one (just lost) last.
                order = connect_order(self.servers, self._failed_at)
                passes = 0
                first_in_pass = True
            elif not order:
                passes += 1
                first_in_pass = True
            if lame_duck and order:
                await trio.lowlevel.checkpoint()  # it is going away: go elsewhere at once
                continue
            wait = min(
                settings.reconnect_wait_max,
                settings.reconnect_wait_min * 2 ** min(passes + 1, 16),
            )
            await trio.sleep(wait * random.uniform(0.5, 1.0))

    async def _serve(self, socket_stream: trio.SocketStream, server: NatsAddress) -> None:
        stream: trio.abc.Stream = socket_stream
        self._stream = stream
        parser = Parser()
        security = self._link_settings.security
        with trio.fail_after(self._link_settings.connect_timeout):
            op = await self._next_op(stream, parser)
            if op[0] != INFO:
                raise ConnectionLost(f"unexpected greeting {op[:2]!r}")
            info = decode_info(op[5])
            if self._info(op[5], greeting=True):
                raise LameDuck("the server is in lame-duck mode")
            if server.tls or security.always_tls or info.get("tls_required") is True:
                stream = await _start_tls(socket_stream, server, security)
                self._stream = stream
            connect: dict[str, object] = {
                "verbose": False, "pedantic": False, "headers": True, "no_responders": True,
                "name": f"odin-{self._name}", "lang": "python", "version": "odin",
                "protocol": 1,
            }  # fmt: skip
            if server.user:
                connect.update(user=server.user, **{"pass": server.password})
            elif server.token:
                connect["auth_token"] = server.token
            nonce = info.get("nonce")
            try:
                connect.update(security.connect_fields(nonce if isinstance(nonce, str) else None))
            except CredentialsError as exc:
                raise ConnectionLost(f"credentials: {exc}") from None
            await self._send(
                b"CONNECT " + orjson.dumps(connect) + b"\r\nSUB " + self._inbox.encode()
                + b".* 1\r\nPING\r\n"
            )  # fmt: skip
            while (op := await self._next_op(stream, parser))[0] != PONG:
                if op[0] == ERR:
                    raise ConnectionLost(_error(op))
                if op[0] == INFO and self._info(op[5]):
                    raise LameDuck("the server is in lame-duck mode")
        self._outstanding_pings = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_loop, stream, parser)
            nursery.start_soon(self._ping_loop)
            await self._connected(nursery)
            self.connected = True
            if self._failed_at:
                self._log.info(f"nats_{self._name}_connected", server=server.display)

    async def _next_op(self, stream: trio.abc.Stream, parser: Parser) -> Op:
        """The next operation (while connecting: one at a time)."""
        while True:
            try:
                ops = parser.operations(1)
            except ProtocolError as exc:
                raise ConnectionLost(str(exc)) from None
            if ops:
                return ops[0]
            data = await stream.receive_some(READ_SIZE)
            if not data:
                raise ConnectionLost("closed by the server")
            parser.feed(data)

    async def _send(self, data: bytes) -> None:
        stream = self._stream
        if stream is None:
            raise ConnectionLost("not connected")
        async with self._send_lock:
            await stream.send_all(data)

    async def _ping_loop(self) -> None:
        """A connection that answers no ping for a while is gone, even if the socket says
        nothing (a silent partition)."""
        settings = self._link_settings
        while True:
            await trio.sleep(settings.ping_interval)
            if self._outstanding_pings >= settings.max_outstanding_pings:
                raise ConnectionLost("no PONG from the server")
            self._outstanding_pings += 1
            await self._send(b"PING\r\n")

    async def _read_loop(self, stream: trio.abc.Stream, parser: Parser) -> None:
        operations = parser.operations
        handle = self._handle
        while True:
            try:
                ops = operations(YIELD_EVERY)
            except ProtocolError as exc:
                raise ConnectionLost(str(exc)) from None
            index, count = 0, len(ops)
            while index < count:
                index, follow_up = handle(ops, index)
                if follow_up is not None:
                    await follow_up
            if count == YIELD_EVERY:
                # A full batch: let the rest of the process run (receiving below is a
                # checkpoint too).
                await trio.lowlevel.checkpoint()
                continue
            more = await stream.receive_some(READ_SIZE)
            if not more:
                raise ConnectionLost("closed by the server")
            parser.feed(more)

    def _control(self, op: Op) -> Awaitable[None] | None:
        """An operation that is not a message: PING, PONG, -ERR, +OK, INFO."""
        kind = op[0]
        if kind == PING:
            return self._send(b"PONG\r\n")
        if kind == PONG:
            self._outstanding_pings = 0
        elif kind == ERR:
            raise ConnectionLost(_error(op))
        elif kind == INFO and self._info(op[5]):
            return self._leave()
        return None  # +OK needs nothing.

    def _info(self, payload: bytes, *, greeting: bool = False) -> bool:
        """An INFO (its JSON): learn the cluster's servers. True: the server is in lame-duck
        mode."""
        info = decode_info(payload)
        urls = connect_urls(info)
        announcer = self.server
        if urls is not None and announcer is not None:
            previous = self._discovered
            self._discovered = discovered_addresses(urls, announcer)
            now = {server_key(address) for address in self._discovered}
            lost = [address for address in previous if server_key(address) not in now]
            if lost and not greeting:
                self._log.info(f"nats_{self._name}_servers_left", servers=[a.display for a in lost])
                self._servers_lost(lost)
        if is_lame_duck(info):
            self._lame_duck = True
            return True
        return False

    async def _leave(self) -> None:
        raise LameDuck("the server is in lame-duck mode")

    # ---- requests ------------------------------------------------------------------------

    async def request(self, subject: str, body: bytes, within: float | None = None) -> bytes:
        """A request-reply on this connection (JetStream API calls), answered within
        ``within`` seconds (by default the link's ``request_timeout``)."""
        self._request_number += 1
        token = f"{self._inbox}.r{self._request_number}"
        send, receive = trio.open_memory_channel[bytes](1)
        self._replies[token] = send
        try:
            await self._send(f"PUB {subject} {token} {len(body)}\r\n".encode() + body + b"\r\n")
            with trio.fail_after(within or self._link_settings.request_timeout):
                return await receive.receive()
        except trio.TooSlowError:
            raise ConnectionLost(f"no answer to {subject}") from None
        finally:
            del self._replies[token]

    def _reply_op(self, op: Op) -> None:
        """A message on the inbox (subscription 1): a reply. A status instead of one (HMSG
        ``503``: nobody answers the subject) becomes the JSON error ``NO_RESPONDERS``."""
        if op[0] == HMSG and status(op[4])[0] == 503:
            self._reply(op[1], NO_RESPONDERS)
        else:
            self._reply(op[1], op[5])

    def _reply(self, subject: bytes, payload: bytes) -> None:
        channel = self._replies.get(subject.decode())
        if channel is not None:
            with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
                channel.send_nowait(payload)


async def _start_tls(
    stream: trio.SocketStream, server: NatsAddress, security: Security
) -> trio.SSLStream[trio.SocketStream]:
    """Upgrade the connection in place (NATS does it after INFO, before CONNECT)."""
    tls = trio.SSLStream(
        stream,
        security.client_context(),
        server_hostname=security.server_name or server.tls_name or server.host,
    )
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        reason = exc.__cause__ if exc.__cause__ is not None else exc
        raise ConnectionLost(f"TLS handshake with {server.display} failed: {reason}") from None
    return tls


def _error(op: Op) -> str:
    """What a -ERR says, as the server wrote it."""
    return "-ERR " + op[5].decode(errors="replace")
