"""The per-connection protocol rules, with no I/O: frames in, one action out.

``Session.receive`` is to Odin what ``receive_data`` + ``events`` are to wsproto: it reads no
clock (time is passed in), awaits nothing and touches no socket. It owns the rules a
connection lives by (rate limit, subscription limit, channel names, message shapes, idle
time) and returns what the Trio shell must do: reply, subscribe, unsubscribe, replay or close.
Every refusal is an ``error`` reply with a code; only sustained rate-limit abuse closes.
"""

from __future__ import annotations

import attrs

from odin_fanout.protocol.access import ANONYMOUS, EVERYTHING_PUBLIC, AccessRules, Grant
from odin_fanout.protocol.channels import ChannelError, ChannelRules, covered_by, is_pattern
from odin_fanout.protocol.close_codes import AUTH_REQUIRED_REASON, RATE_LIMIT_REASON, CloseCode
from odin_fanout.protocol.codec import decode_request
from odin_fanout.protocol.errors import ClientError, ErrorCode
from odin_fanout.protocol.messages import (
    Auth,
    Error,
    Heartbeat,
    Pong,
    RecoveryReport,
    Refresh,
    Replay,
    ReplayData,
    RequestId,
    ServerMessage,
    Subscribe,
    SubscriptionAck,
    Unsubscribe,
    UnsubscriptionAck,
)
from odin_fanout.protocol.publication import Position
from odin_fanout.protocol.ratelimit import LeakyCounter, TokenBucket


@attrs.frozen
class SessionLimits:
    max_subscriptions: int = 128
    rate_burst: int = 100
    rate_per_second: float = 10.0
    abuse_threshold: float = 100.0
    """Rejected frames (net of the refill rate) after which the connection is closed."""
    idle_timeout: float = 60.0
    """Seconds without any inbound frame or pong before the connection is closed."""


# ---- what the shell is told to do ---------------------------------------------------------


@attrs.frozen
class RateLimited:
    """Notice: a frame was dropped by the token bucket; ``first`` starts a new streak."""

    first: bool


@attrs.frozen
class BadMessage:
    """Notice: a frame was refused; ``first`` is the first time this code on this connection."""

    code: ErrorCode
    first: bool


Notice = RateLimited | BadMessage


@attrs.frozen
class Reply:
    message: ServerMessage
    notice: Notice | None = None


@attrs.frozen
class SubscribeAction:
    requested: list[str]
    """Validated names and patterns, duplicates removed, in request order."""
    added: list[str]
    """Those the connection did not hold before."""
    recover: dict[str, Position]
    """Concrete channels to recover, each covered by ``requested``."""
    request_id: RequestId | None


@attrs.frozen
class UnsubscribeAction:
    requested: list[str]
    removed: list[str]
    request_id: RequestId | None


@attrs.frozen
class ReplayAction:
    channels: list[str] | None
    """Concrete channels, or None for every channel the subscriptions cover."""
    after: int
    """Replay positions strictly after this one..."""
    until: int | None
    """...up to and including this one (None: up to the latest)."""
    epoch: str | None
    request_id: RequestId | None


@attrs.frozen
class CloseAction:
    code: CloseCode
    reason: str


@attrs.frozen
class TokenAction:
    """A token to check (``auth`` as the first message, or ``refresh``): the shell verifies
    it and hands the result to ``Session.take_grant``."""

    token: str
    refresh: bool
    request_id: RequestId | None


Action = Reply | SubscribeAction | UnsubscribeAction | ReplayAction | CloseAction | TokenAction


@attrs.define
class Session:
    """Protocol state of one connection."""

    limits: SessionLimits
    rules: ChannelRules
    last_activity: float
    access: AccessRules = EVERYTHING_PUBLIC
    grant: Grant = ANONYMOUS
    """Who this connection is (its token's claims) and what it may therefore read."""
    awaiting_auth: bool = False
    """The server needs a token this connection did not bring: its first message must be
    ``auth``; anything else closes it (4011)."""
    _frames: int = attrs.field(init=False, default=0)
    subscriptions: set[str] = attrs.Factory(set)
    _bucket: TokenBucket = attrs.field(init=False)
    _abuse: LeakyCounter = attrs.field(init=False)
    _limited_streak: bool = attrs.field(init=False, default=False)
    _codes_seen: set[ErrorCode] = attrs.field(init=False, factory=set)

    def __attrs_post_init__(self) -> None:
        self._bucket = TokenBucket.full(
            self.limits.rate_burst, self.limits.rate_per_second, self.last_activity
        )
        self._abuse = LeakyCounter(self.limits.rate_per_second, 0.0, self.last_activity)

    def set_limits(self, limits: SessionLimits, now: float) -> None:
        """New limits (a configuration reload); tokens already earned are kept up to the new
        burst."""
        self._bucket.try_take(now, 0.0)  # bring the bucket up to ``now`` at the old rate
        self.limits = limits
        self._bucket.capacity = limits.rate_burst
        self._bucket.rate = limits.rate_per_second
        self._bucket.tokens = min(self._bucket.tokens, limits.rate_burst)
        self._abuse.drain_per_second = limits.rate_per_second

    # ---- liveness ---------------------------------------------------------------------

    def note_activity(self, now: float) -> None:
        """Any inbound frame or pong proves the peer alive."""
        self.last_activity = max(self.last_activity, now)

    def idle_deadline(self) -> float:
        return self.last_activity + self.limits.idle_timeout

    # ---- frames -------------------------------------------------------------------------

    def receive(self, frame: str | bytes, *, now: float, wall_ms: int) -> Action:
        """Apply the rules to one inbound data frame."""
        self.note_activity(now)
        if not self._bucket.try_take(now):
            if self._abuse.add(now) > self.limits.abuse_threshold:
                return CloseAction(CloseCode.POLICY_VIOLATION, RATE_LIMIT_REASON)
            first, self._limited_streak = not self._limited_streak, True
            limit = f"{self.limits.rate_per_second:g}/s, burst {self.limits.rate_burst}"
            return Reply(
                Error(
                    code=ErrorCode.RATE_LIMIT_EXCEEDED,
                    message=f"Too many messages, please slow down (limit: {limit})",
                ),
                notice=RateLimited(first=first),
            )
        self._limited_streak = False
        self._frames += 1
        if isinstance(frame, bytes):
            if self.awaiting_auth:
                return CloseAction(CloseCode.AUTH_REQUIRED, AUTH_REQUIRED_REASON)
            return self._refuse(
                ClientError(ErrorCode.BINARY_NOT_SUPPORTED, "send JSON text frames, not binary")
            )
        try:
            request = decode_request(frame)
            message = request.message
            if isinstance(message, Auth | Refresh):
                return self._token(message, request.id)
            if self.awaiting_auth:
                return CloseAction(CloseCode.AUTH_REQUIRED, AUTH_REQUIRED_REASON)
            if isinstance(message, Subscribe):
                return self._subscribe(message, request.id)
            if isinstance(message, Unsubscribe):
                return self._unsubscribe(message, request.id)
            if isinstance(message, Replay):
                return self._replay(message.data, request.id)
            assert isinstance(message, Heartbeat)
            return Reply(Pong(ts=wall_ms, id=request.id))
        except ClientError as error:
            if self.awaiting_auth:
                return CloseAction(CloseCode.AUTH_REQUIRED, AUTH_REQUIRED_REASON)
            return self._refuse(error)

    def _token(self, message: Auth | Refresh, request_id: RequestId | None) -> Action:
        refresh = isinstance(message, Refresh)
        if not refresh and self._frames > 1:
            raise ClientError(
                ErrorCode.INVALID_MESSAGE,
                "auth is only taken as the first message; send refresh to replace a token",
                request_type=Auth.TYPE,
                request_id=request_id,
            )
        if refresh and not self.grant.authenticated:
            raise ClientError(
                ErrorCode.UNAUTHORIZED,
                "this connection has no token to refresh",
                request_type=Refresh.TYPE,
                request_id=request_id,
            )
        return TokenAction(message.data.token, refresh, request_id)

    def take_grant(self, grant: Grant, *, refresh: bool) -> tuple[ErrorCode, str] | None:
        """Adopt a verified token's grant, or say why not (nothing changes then): a refresh
        must keep the subject and allow every current subscription."""
        if refresh and grant.subject != self.grant.subject:
            return ErrorCode.UNAUTHORIZED, (
                f"the new token is for {grant.subject!r}, this connection for "
                f"{self.grant.subject!r}"
            )
        refused = self.access.check_all(sorted(self.subscriptions), grant) if refresh else []
        if refused:
            kept = "; ".join(refusal.message() for refusal in refused)
            return (
                ErrorCode.FORBIDDEN,
                f"the new token does not allow current subscriptions: {kept}",
            )
        self.grant = grant
        self.awaiting_auth = False
        return None

    def _refuse(self, error: ClientError) -> Reply:
        first = error.code not in self._codes_seen
        self._codes_seen.add(error.code)
        return Reply(
            Error(
                code=error.code,
                message=error.message,
                request=error.request_type,
                id=error.request_id,
            ),
            notice=BadMessage(error.code, first),
        )

    def _checked(self, names: list[str], kind: str, request_id: RequestId | None) -> list[str]:
        unique: dict[str, None] = {}
        for name in names:
            try:
                unique[self.rules.check(name)] = None
            except ChannelError as exc:
                raise ClientError(
                    ErrorCode.INVALID_CHANNEL, str(exc), request_type=kind, request_id=request_id
                ) from None
        return list(unique)

    def _allowed(self, names: list[str], kind: str, request_id: RequestId | None) -> None:
        refusals = self.access.check_all(names, self.grant)
        if refusals:
            raise ClientError(
                ErrorCode.FORBIDDEN,
                "; ".join(refusal.message() for refusal in refusals),
                request_type=kind,
                request_id=request_id,
            )

    def _subscribe(self, message: Subscribe, request_id: RequestId | None) -> SubscribeAction:
        requested = self._checked(message.data.channels, Subscribe.TYPE, request_id)
        self._allowed(requested, Subscribe.TYPE, request_id)
        added = [name for name in requested if name not in self.subscriptions]
        total = len(self.subscriptions) + len(added)
        if total > self.limits.max_subscriptions:
            raise ClientError(
                ErrorCode.SUBSCRIPTION_LIMIT,
                f"this would hold {total} subscriptions; the limit is "
                f"{self.limits.max_subscriptions} per connection",
                request_type=Subscribe.TYPE,
                request_id=request_id,
            )
        recover = dict(message.data.recover or {})
        for channel, position in recover.items():
            problem = None
            if is_pattern(channel):
                problem = f"cannot recover a pattern ({channel!r}); name concrete channels"
            elif position.seq < 0:
                problem = f"{channel!r}: seq must be >= 0"
            elif not covered_by(channel, requested):
                problem = f"{channel!r} is not among the channels of this subscribe"
            else:
                try:
                    self.rules.check(channel, allow_pattern=False)
                except ChannelError as exc:
                    problem = str(exc)
            if problem:
                raise ClientError(
                    ErrorCode.INVALID_POSITION,
                    problem,
                    request_type=Subscribe.TYPE,
                    request_id=request_id,
                )
        self.subscriptions.update(added)
        return SubscribeAction(requested, added, recover, request_id)

    def _unsubscribe(self, message: Unsubscribe, request_id: RequestId | None) -> Action:
        requested = self._checked(message.data.channels, Unsubscribe.TYPE, request_id)
        removed = [name for name in requested if name in self.subscriptions]
        self.subscriptions.difference_update(removed)
        return UnsubscribeAction(requested, removed, request_id)

    def _replay(self, data: ReplayData, request_id: RequestId | None) -> ReplayAction:
        def refuse(code: ErrorCode, message: str) -> ClientError:
            return ClientError(code, message, request_type=Replay.TYPE, request_id=request_id)

        ranged = data.from_seq is not None or data.to is not None
        if (data.since is None) == (not ranged):
            raise refuse(
                ErrorCode.INVALID_MESSAGE, "replay needs either 'since' or 'from' and 'to'"
            )
        if ranged and (data.from_seq is None or data.to is None):
            raise refuse(ErrorCode.INVALID_MESSAGE, "replay needs both 'from' and 'to'")
        names: list[str] | None = None
        if data.channel is not None or data.channels is not None:
            names = [*([data.channel] if data.channel is not None else []), *(data.channels or [])]
            for name in names:
                try:
                    self.rules.check(name, allow_pattern=False)
                except ChannelError as exc:
                    raise refuse(ErrorCode.INVALID_CHANNEL, str(exc)) from None
            names = list(dict.fromkeys(names))
            self._allowed(names, Replay.TYPE, request_id)
        if data.since is not None:
            if data.since < 0:
                raise refuse(ErrorCode.INVALID_POSITION, "'since' must be >= 0")
            return ReplayAction(names, data.since, None, data.epoch, request_id)
        assert data.from_seq is not None
        assert data.to is not None
        if data.from_seq < 1 or data.to < data.from_seq:
            raise refuse(ErrorCode.INVALID_POSITION, "need 1 <= 'from' <= 'to'")
        return ReplayAction(names, data.from_seq - 1, data.to, data.epoch, request_id)

    # ---- replies the shell completes ----------------------------------------------------

    def subscription_ack(
        self,
        action: SubscribeAction,
        positions: dict[str, Position],
        recovery: dict[str, RecoveryReport],
    ) -> SubscriptionAck:
        return SubscriptionAck(
            subscribed=action.requested,
            count=len(self.subscriptions),
            positions=positions or None,
            recovered=all(r.recovered for r in recovery.values()) if action.recover else None,
            recovery=recovery or None,
            id=action.request_id,
        )

    def unsubscription_ack(self, action: UnsubscribeAction) -> UnsubscriptionAck:
        return UnsubscriptionAck(
            unsubscribed=action.requested, count=len(self.subscriptions), id=action.request_id
        )
