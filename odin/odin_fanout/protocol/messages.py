"""Wire protocol v1: the messages clients send and the replies Odin sends back.

Names and shapes follow the original server so its clients keep working:
``{"type": "subscribe", "data": {"channels": [...]}}`` in, ``{"type": "subscription_ack",
"subscribed": [...], "count": N}`` out. Additions are optional fields (``id``, ``recover``,
``positions``, ``recovery``) and new reply types that older clients ignore. The event envelope
itself is built in ``codec.encode_event`` (it is the hot path and splices the publisher's
payload verbatim). ``docs/protocol.md`` is the client-facing description of all of these.
"""

from __future__ import annotations

from typing import ClassVar

import attrs

from odin_fanout.protocol.publication import Position

RequestId = str | int


# ---- client -> server -------------------------------------------------------------------


@attrs.frozen
class SubscribeData:
    channels: list[str]
    """Channel names (``BTC.trade``) or patterns (``BTC.*``)."""
    recover: dict[str, Position] | None = None
    """Per concrete channel, the last position the client saw: recover what came after."""


@attrs.frozen
class ChannelsData:
    channels: list[str]


@attrs.frozen
class ReplayData:
    channel: str | None = None
    """One concrete channel; with neither ``channel`` nor ``channels``, every subscribed one."""
    channels: list[str] | None = None
    since: int | None = None
    """Replay every message after this position."""
    from_seq: int | None = None
    """With ``to``: replay positions ``from``..``to`` inclusive (``from`` on the wire)."""
    to: int | None = None
    epoch: str | None = None
    """If given and not the current epoch, nothing is replayed (``epoch_changed``)."""


@attrs.frozen
class Subscribe:
    TYPE: ClassVar[str] = "subscribe"
    data: SubscribeData


@attrs.frozen
class Unsubscribe:
    TYPE: ClassVar[str] = "unsubscribe"
    data: ChannelsData


@attrs.frozen
class Heartbeat:
    TYPE: ClassVar[str] = "heartbeat"


@attrs.frozen
class Replay:
    TYPE: ClassVar[str] = "replay"
    data: ReplayData


@attrs.frozen
class TokenData:
    token: str


@attrs.frozen
class Auth:
    """The connection's token, in-band: only as the first message (browsers and clients that
    cannot put it in the upgrade request)."""

    TYPE: ClassVar[str] = "auth"
    data: TokenData


@attrs.frozen
class Refresh:
    """A new token for the same subject, before the current one expires."""

    TYPE: ClassVar[str] = "refresh"
    data: TokenData


ClientMessage = Subscribe | Unsubscribe | Heartbeat | Replay | Auth | Refresh

CLIENT_MESSAGE_TYPES: dict[str, type[ClientMessage]] = {
    cls.TYPE: cls for cls in (Subscribe, Unsubscribe, Heartbeat, Replay, Auth, Refresh)
}


@attrs.frozen
class Request:
    """A decoded client frame: the message and the optional ``id`` to echo in the reply."""

    message: ClientMessage
    id: RequestId | None = None


# ---- server -> client -------------------------------------------------------------------


@attrs.frozen
class Hello:
    TYPE: ClassVar[str] = "hello"
    version: int
    connection_id: str
    ts: int
    limits: dict[str, int | float]


@attrs.frozen
class Pong:
    TYPE: ClassVar[str] = "pong"
    ts: int
    id: RequestId | None = None


@attrs.frozen
class RecoveryReport:
    recovered: bool
    count: int
    """Messages replayed for this channel (0 when not recovered)."""
    reason: str | None = None
    """Why recovery failed: epoch_changed, history_expired, limit_exceeded, unknown_position,
    broker_unavailable."""


@attrs.frozen
class SubscriptionAck:
    TYPE: ClassVar[str] = "subscription_ack"
    subscribed: list[str]
    count: int
    """Subscriptions the connection holds after this request."""
    positions: dict[str, Position] | None = None
    """Per concrete channel, the position the client is current at once live delivery starts."""
    recovered: bool | None = None
    """Present when the request asked to recover: true only if every channel recovered."""
    recovery: dict[str, RecoveryReport] | None = None
    id: RequestId | None = None


@attrs.frozen
class UnsubscriptionAck:
    TYPE: ClassVar[str] = "unsubscription_ack"
    unsubscribed: list[str]
    count: int
    id: RequestId | None = None


@attrs.frozen
class Error:
    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    request: str | None = None
    """The ``type`` of the client message that failed, when it could be read."""
    id: RequestId | None = None


@attrs.frozen
class Range:
    from_seq: int
    to_seq: int


@attrs.frozen
class ReplayComplete:
    TYPE: ClassVar[str] = "replay_complete"
    channel: str
    sent: int
    id: RequestId | None = None


@attrs.frozen
class ReplayIncomplete:
    TYPE: ClassVar[str] = "replay_incomplete"
    channel: str
    sent: int
    total: int
    """Messages the request asked for: ``sent`` plus the positions in ``missing`` (the
    original's field, which its clients read)."""
    missing: list[Range]
    """Position ranges that could not be served."""
    reason: str
    message: str
    id: RequestId | None = None


@attrs.frozen
class GapNotice:
    TYPE: ClassVar[str] = "gap"
    channel: str
    from_seq: int
    to_seq: int
    reason: str


@attrs.frozen
class AuthOk:
    """A token taken (``auth`` or ``refresh``): who, and until when (Unix ms, or None)."""

    TYPE: ClassVar[str] = "auth_ok"
    sub: str
    expires_at: int | None = None
    id: RequestId | None = None


@attrs.frozen
class TokenExpiring:
    """The connection's token expires soon: send ``refresh`` with a new one before
    ``expires_at`` (Unix ms), or the connection is closed with 4010 then."""

    TYPE: ClassVar[str] = "token_expiring"
    expires_at: int
    in_ms: int


@attrs.frozen
class Reconnect:
    TYPE: ClassVar[str] = "reconnect"
    after_ms: int
    """Wait this long (jittered per client) before reconnecting, then recover."""
    reason: str


ServerMessage = (
    Hello
    | Pong
    | SubscriptionAck
    | UnsubscriptionAck
    | Error
    | ReplayComplete
    | ReplayIncomplete
    | GapNotice
    | Reconnect
    | AuthOk
    | TokenExpiring
)
