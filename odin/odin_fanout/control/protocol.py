"""The control protocol between a server and its operator console: line-delimited JSON.

Sans-IO and runtime-free (no trio, no asyncio): the server's Trio shell and the console's
asyncio client both use these types and this converter, and nothing else of each other.

A request is one line, ``{"id": 7, "cmd": "connections", "limit": 20}``; its reply carries
the same id, ``{"id": 7, "ok": true, "result": {...}}`` or
``{"id": 7, "ok": false, "error": {"code": "bad_request", "message": "..."}}``. After
``watch``, the server also sends ``{"stream": "update", ...}`` lines, about once a second,
until ``unwatch`` or the end of the connection. ``hello`` answers the protocol version; a
client that sees a different major version should stop.

``tap`` follows the frames one connection or one channel receives: its reply is followed by
``{"stream": "tap", ...}`` lines, one per frame (at most ``rate`` a second, the rest counted as
``skipped``), until ``untap``, another ``tap``, or the tapped connection closing (a last line
with ``closed``).

``history`` answers the server's last hour of per-second figures (the console's charts on
attach) and ``events`` pages back through its ring of recent events.

Commands added later (``reload``, ``tap``, ``history``, ``events``) are answered
``unknown_command`` by older servers, so a client needs no new protocol version to try them.
"""

from __future__ import annotations

import enum
from typing import Any, Final, Generic, TypeAlias, TypeVar

import attrs
import cattrs
import orjson
from cattrs.preconf.orjson import make_converter

T = TypeVar("T")

PROTOCOL_VERSION: Final = 1
MAX_LINE_BYTES: Final = 64 * 1024
"""Longest request line the server reads; a longer one is answered ``line_too_long`` and the
connection is closed (the rest of the line cannot be told from the next request)."""
MAX_PAGE: Final = 500


class ErrorCode(enum.StrEnum):
    BAD_JSON = "bad_json"
    BAD_REQUEST = "bad_request"
    UNKNOWN_COMMAND = "unknown_command"
    LINE_TOO_LONG = "line_too_long"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_CLIENTS = "too_many_clients"
    PERMISSION_DENIED = "permission_denied"
    NOT_FOUND = "not_found"
    DRAINING = "draining"
    CONFIG_INVALID = "config_invalid"
    """``reload``: the configuration has errors (each named in the message); nothing changed."""
    UNAVAILABLE = "unavailable"
    """The server cannot do this here (``reload`` in a server started without that ability)."""


class ControlError(Exception):
    def __init__(self, code: ErrorCode, message: str, request_id: object = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


# ---- requests --------------------------------------------------------------------------------

CONNECTION_SORTS: Final = ("id", "age", "queue", "queue_age", "sent", "dropped", "channels")
CHANNEL_SORTS: Final = ("name", "subscribers", "rate", "last_seq", "retained")
KICKED: Final = 4001
"""``kick``'s default close code, "closed by an operator": ``CloseCode.KICKED`` of
``odin_fanout.protocol.close_codes``, which this module may not import (the control protocol depends
on nothing of the server's); tests/test_docs.py keeps the two equal."""
KICK_CODES: Final = (1000, 1001, 1008, 1011)
"""Besides these, any code from 4000 to 4999 (the application's range)."""


def _page_limit(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 1 <= value <= MAX_PAGE:
        raise ValueError(f"{attribute.name} must be from 1 to {MAX_PAGE}")


def _not_negative(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must not be negative")


def _one_of(choices: tuple[str, ...]) -> Any:
    def check(_: object, attribute: attrs.Attribute[str], value: str) -> None:
        if value not in choices:
            raise ValueError(f"{attribute.name} must be one of {', '.join(choices)}")

    return check


def _close_code(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value not in KICK_CODES and not 4000 <= value <= 4999:
        raise ValueError(f"{attribute.name} must be 1000, 1001, 1008, 1011 or 4000-4999")


def _short(limit: int) -> Any:
    def check(_: object, attribute: attrs.Attribute[str], value: str) -> None:
        if len(value.encode()) > limit:
            raise ValueError(f"{attribute.name} must be at most {limit} bytes")

    return check


TAP_MAX_RATE: Final = 1000
TAP_TEXT_BYTES: Final = 4096
"""A tapped frame's text is cut to this many bytes (``truncated`` says so)."""
TAP_BUFFER: Final = 256
"""Tapped frames waiting for one console; beyond, the newest are counted as ``skipped``."""


def _tap_rate(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 1 <= value <= TAP_MAX_RATE:
        raise ValueError(f"{attribute.name} must be from 1 to {TAP_MAX_RATE}")


def _interval(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not 0.2 <= value <= 60:
        raise ValueError(f"{attribute.name} must be from 0.2 to 60 seconds")


@attrs.frozen
class Hello:
    """The server's identity and the protocol version."""


@attrs.frozen
class SnapshotRequest:
    """The server's state now: counts, rates, NATS, capacity."""


@attrs.frozen
class Watch:
    """Send an update (a snapshot and the events since the last one) every ``interval``."""

    interval: float = attrs.field(default=1.0, validator=_interval)


@attrs.frozen
class Unwatch:
    pass


@attrs.frozen
class ListConnections:
    offset: int = attrs.field(default=0, validator=_not_negative)
    limit: int = attrs.field(default=50, validator=_page_limit)
    sort: str = attrs.field(default="age", validator=_one_of(CONNECTION_SORTS))
    descending: bool = True
    filter: str = attrs.field(default="", validator=_short(200))
    """Keeps connections whose id, peer, user or a channel contains this text."""


@attrs.frozen
class SlowConsumers:
    """The connections with the most frames queued (ties: the oldest queued frame)."""

    limit: int = attrs.field(default=10, validator=_page_limit)


@attrs.frozen
class ListChannels:
    offset: int = attrs.field(default=0, validator=_not_negative)
    limit: int = attrs.field(default=50, validator=_page_limit)
    sort: str = attrs.field(default="subscribers", validator=_one_of(CHANNEL_SORTS))
    descending: bool = True
    filter: str = attrs.field(default="", validator=_short(200))


@attrs.frozen
class Inspect:
    conn: str = attrs.field(validator=_short(64))


@attrs.frozen
class Kick:
    conn: str = attrs.field(validator=_short(64))
    code: int = attrs.field(default=KICKED, validator=_close_code)
    reason: str = attrs.field(default="closed by operator", validator=_short(120))
    """Sent in the close frame (at most 123 bytes fit)."""


@attrs.frozen
class Drain:
    """Start the graceful drain, as SIGTERM does: clients are told to reconnect elsewhere."""


@attrs.frozen
class Reload:
    """Read the configuration again and apply what can change while running, as SIGHUP
    does. Answered ``Reloaded``, or ``config_invalid`` (nothing applied)."""


@attrs.frozen
class Workers:
    """A supervisor's workers (``odin serve --workers N``): answered ``HostWorkers``. A
    worker's own socket answers it too, with what its supervisor last published."""


@attrs.frozen
class Tap:
    """Follow what one connection (``conn``) or one channel (``channel``, a name or a pattern)
    receives, live: answered ``TapStarted``, then a ``TapLine`` per frame, at most ``rate`` a
    second. One tap per console: a new one replaces it."""

    conn: str = attrs.field(default="", validator=_short(64))
    channel: str = attrs.field(default="", validator=_short(200))
    rate: int = attrs.field(default=50, validator=_tap_rate)
    """Frames per second sent to the console; beyond, counted as ``skipped``."""

    def __attrs_post_init__(self) -> None:
        if bool(self.conn) == bool(self.channel):
            raise ValueError("conn or channel: give exactly one of them")


@attrs.frozen
class Untap:
    pass


HISTORY_SECONDS: Final = 3600
"""Per-second samples a server keeps: its last hour."""


def _history_range(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 1 <= value <= HISTORY_SECONDS:
        raise ValueError(f"{attribute.name} must be from 1 to {HISTORY_SECONDS}")


@attrs.frozen
class History:
    """The server's per-second figures over its last ``seconds``, oldest first: answered
    ``RateHistory``. With ``step`` > 1, each ``step`` samples are merged into one point."""

    seconds: int = attrs.field(default=HISTORY_SECONDS, validator=_history_range)
    step: int = attrs.field(default=1, validator=_history_range)


@attrs.frozen
class ListEvents:
    """A page of the server's recent events older than position ``before`` (0: from the
    newest), oldest first: answered ``EventPage``."""

    before: int = attrs.field(default=0, validator=_not_negative)
    limit: int = attrs.field(default=100, validator=_page_limit)


Command: TypeAlias = (
    Hello
    | SnapshotRequest
    | Watch
    | Unwatch
    | ListConnections
    | SlowConsumers
    | ListChannels
    | Inspect
    | Kick
    | Drain
    | Reload
    | Workers
    | Tap
    | Untap
    | History
    | ListEvents
)

COMMANDS: Final[dict[str, type[Command]]] = {
    "hello": Hello,
    "snapshot": SnapshotRequest,
    "watch": Watch,
    "unwatch": Unwatch,
    "connections": ListConnections,
    "slow": SlowConsumers,
    "channels": ListChannels,
    "inspect": Inspect,
    "kick": Kick,
    "drain": Drain,
    "reload": Reload,
    "workers": Workers,
    "tap": Tap,
    "untap": Untap,
    "history": History,
    "events": ListEvents,
}
COMMAND_NAMES: Final = {kind: name for name, kind in COMMANDS.items()}


# ---- results ---------------------------------------------------------------------------------


@attrs.frozen
class ServerIdentity:
    protocol: int
    server: str
    version: str
    instance: str
    """The prefix of this process's connection ids."""
    pid: int
    started_at: float
    """Unix time."""
    websocket: list[str] = attrs.Factory(list)
    """Where clients connect."""
    role: str = "server"
    """``server`` (one process serving clients, alone or as a worker) or ``supervisor``
    (``odin serve --workers N``: it serves no clients; ``workers`` lists those that do)."""
    worker: int | None = None
    """This worker's slot (0 to workers - 1) under a supervisor; None when alone."""
    workers: int = 1
    """Workers the host is meant to run."""
    supervisor_pid: int | None = None
    """The supervisor a worker belongs to: the console groups a host's sockets by it."""


@attrs.frozen
class NatsState:
    connected: bool
    detail: str
    epoch: str
    pending: int = 0
    """Messages in the stream not yet read (ingest lag)."""
    reconnects: int = 0
    ingest_dropped: int = 0


@attrs.frozen
class Recoveries:
    recovered: int = 0
    not_recovered: dict[str, int] = attrs.Factory(dict)
    """By reason."""
    messages: int = 0


@attrs.frozen
class Snapshot:
    """The server's state at ``time``. Counters are totals since start; a client derives
    rates from two snapshots, or reads ``in_per_s`` and ``out_per_s``."""

    time: float
    uptime: float
    instance: str
    connections: int
    max_connections: int
    subscriptions: int
    channels: int
    draining: bool
    publications: int
    deliveries: int
    in_per_s: float
    out_per_s: float
    dropped: dict[str, int]
    gaps: dict[str, int]
    slow_consumers: dict[str, int]
    rate_limited: int
    client_errors: int
    recoveries: Recoveries
    replays: dict[str, int]
    replayed_messages: int
    rejected: dict[str, int]
    closed: dict[str, int]
    nats: NatsState
    rss_bytes: int
    memory_limit_bytes: int
    cpu_seconds: float
    deepest_queue: int
    oldest_queued_age: float


@attrs.frozen
class ConnectionInfo:
    id: str
    peer: str
    channels: list[str]
    queued: int
    """Frames waiting in its outbound queue."""
    queued_age: float
    """Seconds the oldest of them has waited (0: none)."""
    sent: int
    """Events delivered."""
    dropped: int
    age: float
    """Seconds since it connected."""
    rate_limited: int = 0
    closing: bool = False
    user: str = ""
    """The ``sub`` of its token (empty: none). Never the token."""


@attrs.frozen
class ConnectionDetail:
    connection: ConnectionInfo
    origin: str | None
    queued_bytes: int
    recovering: list[str]
    subscriptions: int


@attrs.frozen
class ChannelInfo:
    name: str
    subscribers: int
    """Connections that receive it (wildcard subscribers included)."""
    rate: float
    """Publications per second over the last 10 seconds."""
    last_seq: int
    retained: int
    """Messages held in the server's history window."""


@attrs.frozen
class Page(Generic[T]):
    total: int
    offset: int
    items: list[T]


@attrs.frozen
class Kicked:
    conn: str
    code: int


@attrs.frozen
class Draining:
    connections: int
    timeout: float


@attrs.frozen
class Reloaded:
    """What a ``reload`` did, as ``section.field`` names."""

    changed: list[str]
    """Settings that changed and now apply."""
    restart_required: list[str]
    """Settings that changed in the file but apply only after a restart (not applied)."""


WORKER_STATES: Final = ("starting", "up", "restarting", "stopping", "stopped")


@attrs.frozen
class WorkerInfo:
    slot: int
    state: str
    """One of WORKER_STATES: restarting is a worker that died and waits out its backoff."""
    pid: int | None = None
    restarts: int = 0
    """Times this slot's worker died and was started again."""
    since: float = 0.0
    """Unix time of the last change of state."""
    last_exit: str = ""
    """How the last worker of this slot ended (``exit 1``, ``signal SIGKILL``)."""
    control: str = ""
    """Its control socket's path, once it is up."""


@attrs.frozen
class HostWorkers:
    """A host's workers, as the supervisor sees them."""

    expected: int
    supervisor_pid: int
    started_at: float
    workers: list[WorkerInfo] = attrs.Factory(list)

    @property
    def up(self) -> int:
        return sum(1 for worker in self.workers if worker.state == "up")


@attrs.frozen
class WatchStarted:
    interval: float


@attrs.frozen
class Stopped:
    pass


@attrs.frozen
class TapStarted:
    tap: int
    """This tap's number: its lines carry it (a replaced tap's last lines can be told apart)."""
    conn: str
    channel: str
    rate: int
    buffer: int
    """Frames held for the console at most (TAP_BUFFER); beyond, the newest are skipped."""


@attrs.frozen
class TapClosed:
    """How a tapped connection ended: its close code and reason, and why (the metric label:
    client, operator, slow_consumer, idle, ...)."""

    code: int
    reason: str
    why: str


@attrs.frozen
class TapLine:
    """One tapped frame, or (``closed`` set) the end of a connection's tap."""

    tap: int
    time: float
    """Unix time it was queued to the connection."""
    conn: str
    text: str = ""
    """The frame's text, cut to TAP_TEXT_BYTES; for a binary or control frame, what it is."""
    bytes: int = 0
    """The payload's whole size."""
    truncated: bool = False
    binary: bool = False
    channel: str = ""
    """The channel of an event or gap notice ("" for replies)."""
    seq: int = 0
    skipped: int = 0
    """Frames not shown since the previous line: beyond the rate, or the buffer was full."""
    closed: TapClosed | None = None


@attrs.frozen
class ServerEvent:
    """Something that happened to a connection, for the console's event log."""

    seq: int
    time: float
    kind: str
    """conn_open, conn_close, slow_consumer, recover, rate_limited, kick, drain, reload."""
    conn: str = ""
    detail: dict[str, str | int | float | bool | None] = attrs.Factory(dict)


@attrs.frozen
class EventPage:
    """Events of the server's ring, oldest first, each older than the page's ``before``."""

    events: list[ServerEvent]
    first: int
    """Position of the oldest event the server still keeps (0: none)."""
    last: int
    """Position of the newest."""
    capacity: int
    """Events the server keeps at most: older ones are gone."""
    more: bool
    """Whether the server keeps events older than this page."""


@attrs.frozen
class RateHistory:
    """The server's figures, a point per ``step`` samples taken every ``interval`` seconds,
    oldest first, each list as long as ``time``. Rates are the mean over a point's samples,
    ``connections`` its last, and the counts (``dropped``, ``gaps``, ``recovered``,
    ``not_recovered``) what happened during it."""

    interval: float
    step: int
    capacity: int
    """Samples the server keeps at most (its last hour)."""
    time: list[float]
    """Unix time of each point's last sample."""
    in_per_s: list[float]
    out_per_s: list[float]
    connections: list[int]
    dropped: list[int]
    gaps: list[int]
    recovered: list[int]
    not_recovered: list[int]


@attrs.frozen
class Update:
    snapshot: Snapshot
    events: list[ServerEvent]
    events_dropped: int = 0
    """Events that happened since the last update but were not kept (too many at once)."""


# ---- the converter and the line codec --------------------------------------------------------


def _make_converter() -> cattrs.Converter:
    converter = make_converter(forbid_extra_keys=True)

    # Strict primitives, as the client protocol's: "5" is not a number and 1 is not true.
    def strict(kind: type, accepts: tuple[type, ...]) -> None:
        def structure(value: object, _: object) -> object:
            if not isinstance(value, accepts) or (kind is not bool and isinstance(value, bool)):
                raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
            return kind(value)

        converter.register_structure_hook(kind, structure)

    strict(str, (str,))
    strict(int, (int,))
    strict(bool, (bool,))
    strict(float, (int, float))
    return converter


converter: Final[cattrs.Converter] = _make_converter()


def _describe(exc: BaseException, kind: type | None) -> str:
    if isinstance(exc, ValueError | TypeError):
        return str(exc)  # our validators' and strict hooks' own words
    if isinstance(exc, KeyError):
        return "required field missing"
    return cattrs.v.format_exception(exc, kind)


def _format_error(exc: BaseException) -> str:
    if isinstance(exc, cattrs.BaseValidationError):
        return "; ".join(cattrs.transform_error(exc, format_exception=_describe))
    return str(exc)


def parse_request(line: bytes) -> tuple[object, Command]:
    """One request line -> (its id, the command). Raises ControlError with the id when one
    could be read, so that the error reply can carry it."""
    try:
        document = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ControlError(ErrorCode.BAD_JSON, f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ControlError(ErrorCode.BAD_REQUEST, "a request is a JSON object")
    request_id = document.pop("id", None)
    if request_id is not None and not isinstance(request_id, int | str):
        raise ControlError(ErrorCode.BAD_REQUEST, "id must be a number or a string")
    name = document.pop("cmd", None)
    if not isinstance(name, str):
        raise ControlError(ErrorCode.BAD_REQUEST, "cmd (a string) is missing", request_id)
    kind = COMMANDS.get(name)
    if kind is None:
        known = ", ".join(COMMANDS)
        raise ControlError(
            ErrorCode.UNKNOWN_COMMAND, f"unknown cmd {name!r}; known: {known}", request_id
        )
    try:
        command = converter.structure(document, kind)
    except (cattrs.BaseValidationError, ValueError, TypeError) as exc:
        raise ControlError(
            ErrorCode.BAD_REQUEST, f"{name}: {_format_error(exc)}", request_id
        ) from None
    return request_id, command


def encode_request(request_id: object, command: Command) -> bytes:
    body = converter.unstructure(command)
    return orjson.dumps({"id": request_id, "cmd": COMMAND_NAMES[type(command)], **body}) + b"\n"


def encode_result(request_id: object, result: object) -> bytes:
    return (
        orjson.dumps({"id": request_id, "ok": True, "result": converter.unstructure(result)})
        + b"\n"
    )


def encode_error(request_id: object, code: ErrorCode, message: str) -> bytes:
    error = {"code": code.value, "message": message}
    return orjson.dumps({"id": request_id, "ok": False, "error": error}) + b"\n"


def encode_update(update: Update) -> bytes:
    return orjson.dumps({"stream": "update", **converter.unstructure(update)}) + b"\n"


def encode_tap(line: TapLine) -> bytes:
    return orjson.dumps({"stream": "tap", **converter.unstructure(line)}) + b"\n"


@attrs.frozen
class Reply:
    """A decoded reply line: a result (still plain JSON, structure it with ``result_as``) or
    an error."""

    request_id: object
    ok: bool
    result: Any = None
    error_code: str = ""
    error_message: str = ""

    def result_as(self, kind: type[T]) -> T:
        return converter.structure(self.result, kind)


def decode_line(line: bytes) -> Reply | Update | TapLine:
    """A line from the server: a reply to a request, a watch update, or a tapped frame."""
    document = orjson.loads(line)
    if not isinstance(document, dict):
        raise ValueError("a server line is a JSON object")
    if document.get("stream") == "update":
        del document["stream"]
        return converter.structure(document, Update)
    if document.get("stream") == "tap":
        del document["stream"]
        return converter.structure(document, TapLine)
    if document.get("ok") is True:
        return Reply(document.get("id"), True, document.get("result"))
    error = document.get("error") or {}
    return Reply(
        document.get("id"), False, None, str(error.get("code", "")), str(error.get("message", ""))
    )
