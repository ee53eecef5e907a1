"""``POST /api/publish``: backends publish over HTTP on the client port (``[publish]``).

Off unless ``publish.enabled``; then the path takes one event, ``{"channel": "BTC.trade",
"data": {...}}``, or a batch, ``{"events": [{"channel", "data"}, ...]}`` (at most
``publish.max_batch``), and hands each to the broker as ``Broker.publish`` would be called by
any publisher. Nothing else about the port changes: every other path is answered as before.

Who may publish: ``Authorization: Bearer`` with one of ``publish.api_keys`` (any channel; keys
are compared in constant time), or a JWT the server's own ``Verifier`` accepts whose
``publish`` claim lists the channel patterns it may publish to (403 outside them; a token
without the claim may publish nowhere). Each credential has a token bucket of events
(``publish.rate_per_second``, ``publish.burst``; 429 with ``Retry-After``).

An ``Idempotency-Key`` header becomes the broker's message id (``Nats-Msg-Id``;
``<key>-<index>`` for a batch's events), so a retried request is stored once within the
stream's duplicate window; without one the request gets a key of its own, so the broker's own
retries (a stream being created, a leader election) store each event once. The answer is
``{"published": n}``, with the events' positions when the broker assigns them at once (the
in-memory broker); errors are
``{"error": {"code", "field", "message"}}`` with a 4xx or 503, counted in
``odin_http_publish_total{result}`` and logged (``publish_refused``, at most one line a second
per result, never the credential).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs
import orjson
import trio

from odin_fanout.broker.base import BrokerError
from odin_fanout.protocol.channels import ChannelError, matches
from odin_fanout.protocol.publication import Publication
from odin_fanout.protocol.ratelimit import TokenBucket
from odin_fanout.server.http import (
    CONTINUE,
    BadRequest,
    RequestHead,
    read_body,
    response,
    waiting_for_continue,
)
from odin_fanout.server.jwks import verify_token
from odin_fanout.server.tokens import TokenRefused, patterns_claim, token_from

if TYPE_CHECKING:
    from odin_fanout.config import PublishSection
    from odin_fanout.server.context import ServerContext

PUBLISH_PATH = "/api/publish"
IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9._:~-]{1,64}\Z")
"""What an ``Idempotency-Key`` may be: 1-64 letters, digits and ``._:~-``."""
MAX_BUCKETS = 10_000
"""Credentials whose rate buckets are kept at once (the least recently used is forgotten)."""
_LINGER_BYTES = 1 << 20
_LINGER_SECONDS = 1.0
_JSON = "application/json"

Send = Callable[[bytes], Awaitable[None]]


@runtime_checkable
class _Positioning(Protocol):
    """A broker that positions a publication at once (the in-memory broker)."""

    def publish_nowait(self, channel: str, payload: bytes) -> Publication: ...


class PublishRefused(Exception):
    """A request refused: its status, ``error.code``, the field at fault, and the result
    it counts as in ``odin_http_publish_total``."""

    def __init__(
        self,
        status: int,
        result: str,
        code: str,
        message: str,
        field: str | None = None,
        *,
        headers: Sequence[tuple[bytes, bytes]] = (),
        extra: dict[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.result = result
        self.code = code
        self.field = field
        self.message = message
        self.headers = list(headers)
        self.extra = extra or {}

    def answer(self) -> bytes:
        error = {"code": self.code, "field": self.field, "message": self.message}
        body = orjson.dumps({"error": error, **self.extra})
        return response(self.status, body, _JSON, self.headers)


@attrs.frozen
class Publisher:
    """Who is publishing: ``identity`` names its rate bucket (never the credential itself);
    ``patterns`` the channels it may publish to (None: any, an API key)."""

    identity: str
    patterns: tuple[str, ...] | None


@attrs.frozen
class Event:
    channel: str
    payload: bytes
    prefix: str = ""
    """``events[i].`` for an event of a batch (naming its fields in errors)."""


def _invalid(message: str, field: str | None, code: str = "invalid") -> PublishRefused:
    return PublishRefused(400, "invalid", code, message, field)


class PublishApi:
    """Serves ``POST /api/publish`` for one server (its rate buckets and log pacing)."""

    def __init__(self, context: ServerContext) -> None:
        self.context = context
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._logged: dict[str, float] = {}
        self._keys_for: PublishSection | None = None
        self._keys: tuple[bytes, ...] = ()
        if context.config.publish.enabled:
            self._api_keys()  # the keys file is read at the start

    @staticmethod
    def handles(head: RequestHead, enabled: bool) -> bool:
        """Whether the request is this API's (only when ``publish.enabled``)."""
        return enabled and head.path == PUBLISH_PATH

    async def serve(
        self, head: RequestHead, stream: trio.abc.Stream, send: Send, peer: str
    ) -> None:
        """Answer one request (the connection is closed after it)."""
        metrics = self.context.metrics
        try:
            answer = await self._handle(head, stream, send)
        except PublishRefused as refused:
            metrics.http_publish[refused.result].inc()
            self._log_refusal(peer, refused)
            await send(refused.answer())
            await _linger(stream)  # the body may not have been read
            return
        metrics.http_publish["ok"].inc()
        await send(answer)

    async def _handle(self, head: RequestHead, stream: trio.abc.Stream, send: Send) -> bytes:
        settings = self.context.config.publish
        if head.method != "POST":
            raise PublishRefused(
                405, "invalid", "method_not_allowed", f"{head.method} is not allowed: use POST",
                headers=[(b"Allow", b"POST")],
            )  # fmt: skip
        media = head.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != _JSON:
            raise PublishRefused(
                415, "invalid", "unsupported_media_type",
                f"Content-Type must be application/json, not {media or 'missing'!r}",
                "Content-Type",
            )  # fmt: skip
        publisher = await self._authenticate(head)
        msg_id = head.headers.get("idempotency-key")
        if msg_id is not None and not IDEMPOTENCY_KEY.match(msg_id):
            raise _invalid("1-64 letters, digits and ._:~- (no spaces)", "Idempotency-Key")
        if waiting_for_continue(head):
            await send(CONTINUE)
        try:
            body = await read_body(stream, head, settings.max_body)
        except BadRequest as exc:
            if exc.status == 413:
                raise PublishRefused(413, "too_large", "too_large", str(exc), "body") from None
            raise _invalid(str(exc), "body", "bad_request") from None
        events = self._events(body, settings.max_batch)
        for event in events:
            self._authorize(publisher, event, f"{event.prefix}channel")
        self._take(publisher, len(events), settings.rate_per_second, settings.burst)
        return await self._publish(events, msg_id)

    # ---- who ---------------------------------------------------------------------------

    def _api_keys(self) -> tuple[bytes, ...]:
        """The configured keys (the file read at the start; a change takes a restart)."""
        settings = self.context.config.publish
        if settings != self._keys_for:
            keys = list(settings.api_keys)
            if settings.api_keys_file:
                lines = Path(settings.api_keys_file).expanduser().read_text().splitlines()
                keys.extend(s for line in lines if (s := line.strip()) and not s.startswith("#"))
            self._keys = tuple(key.encode() for key in keys)
            self._keys_for = settings
        return self._keys

    async def _authenticate(self, head: RequestHead) -> Publisher:
        credential = token_from(head.headers.get("authorization"), (), (), query_ok=False)
        if credential is None:
            raise _unauthorized("missing", "Authorization: Bearer <API key or JWT> is required")
        given = credential.encode()
        matched = None
        for index, key in enumerate(self._api_keys()):  # every key: no early exit to time
            if hmac.compare_digest(given, key) and matched is None:
                matched = index
        if matched is not None:
            return Publisher(f"key:{matched}", None)
        context = self.context
        if not context.verifier.enabled or credential.count(".") != 2:
            raise _unauthorized("invalid", "not a known API key")
        try:
            grant = await verify_token(context.verifier, context.jwks, context.config.auth,
                                       credential)  # fmt: skip
            # The claim publishing needs, from the claims the verifier checked.
            patterns = patterns_claim(grant.claims, "publish")
        except TokenRefused as exc:
            raise _unauthorized(exc.reason, str(exc)) from None
        subject = grant.subject or hashlib.sha256(given).hexdigest()[:16]
        return Publisher(f"sub:{subject}", patterns)

    def _authorize(self, publisher: Publisher, event: Event, field: str) -> None:
        patterns = publisher.patterns
        if patterns is None or any(matches(p, event.channel) for p in patterns):
            return
        raise PublishRefused(
            403, "forbidden", "forbidden",
            f"the token's publish claim does not allow {event.channel!r}", field,
        )  # fmt: skip

    def _take(self, publisher: Publisher, cost: int, rate: float, burst: int) -> None:
        if rate <= 0:
            return
        if cost > burst:
            raise PublishRefused(
                422, "invalid", "too_many_events",
                f"{cost} events are more than publish.burst ({burst}) allows at once", "events",
            )  # fmt: skip
        now = trio.current_time()
        buckets = self._buckets
        bucket = buckets.get(publisher.identity)
        if bucket is None:
            bucket = buckets[publisher.identity] = TokenBucket.full(burst, rate, now)
            while len(buckets) > MAX_BUCKETS:
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(publisher.identity)
            bucket.capacity, bucket.rate = burst, rate  # a reload may have changed them
        if not bucket.try_take(now, cost):
            wait = max(1, math.ceil((cost - bucket.tokens) / rate))
            raise PublishRefused(
                429, "rate_limited", "rate_limited",
                f"over publish.rate_per_second ({rate:g}/s, burst {burst}); retry in {wait} s",
                headers=[(b"Retry-After", str(wait).encode())],
            )  # fmt: skip

    # ---- what --------------------------------------------------------------------------

    def _events(self, body: bytes, max_batch: int) -> list[Event]:
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise _invalid(f"the body is not JSON: {exc}", "body", "invalid_json") from None
        if not isinstance(document, dict):
            raise _invalid("the body must be a JSON object", "body")
        if "events" not in document:
            _no_other_fields(document, ("channel", "data"), "")
            return [self._event(document, "")]
        _no_other_fields(document, ("events",), "")
        items = document["events"]
        if not isinstance(items, list) or not items:
            raise _invalid("events must be a non-empty list of {channel, data}", "events")
        if len(items) > max_batch:
            raise PublishRefused(
                422, "invalid", "too_many_events",
                f"{len(items)} events: at most {max_batch} (publish.max_batch)", "events",
            )  # fmt: skip
        events = []
        for index, item in enumerate(items):
            prefix = f"events[{index}]."
            if not isinstance(item, dict):
                raise _invalid("each event must be an object {channel, data}", f"events[{index}]")
            _no_other_fields(item, ("channel", "data"), prefix)
            events.append(self._event(item, prefix))
        return events

    def _event(self, item: dict[str, Any], prefix: str) -> Event:
        channel = item.get("channel")
        if not isinstance(channel, str):
            raise _invalid("channel is required: a string SYMBOL.event", f"{prefix}channel")
        try:
            self.context.rules.check(channel, allow_pattern=False)
        except ChannelError as exc:
            raise _invalid(str(exc), f"{prefix}channel") from None
        if "data" not in item:
            raise _invalid("data is required: a JSON object", f"{prefix}data")
        data = item["data"]
        if not isinstance(data, dict):
            raise _invalid("data must be a JSON object", f"{prefix}data")
        try:
            payload = orjson.dumps(data)
        except orjson.JSONEncodeError as exc:
            raise _invalid(f"data is not JSON-serialisable: {exc}", f"{prefix}data") from None
        limit = self.context.config.broker.max_payload
        if len(payload) > limit:
            raise PublishRefused(
                413, "too_large", "too_large",
                f"data is {len(payload)} bytes: over broker.max_payload ({limit})",
                f"{prefix}data",
            )  # fmt: skip
        return Event(channel, payload, prefix)

    async def _publish(self, events: list[Event], key: str | None) -> bytes:
        broker = self.context.broker
        # Without the client's key, one of the request's own: a publish the broker must
        # retry (a stream not there yet, a leader election) is then retried and stored
        # once, instead of failing after this request was answered 200.
        key = key or f"odin-{secrets.token_hex(12)}"
        positions: list[dict[str, object]] = []
        batch = bool(events[0].prefix)
        for index, event in enumerate(events):
            msg_id = None if key is None else (f"{key}-{index}" if batch else key)
            try:
                if isinstance(broker, _Positioning):
                    publication = broker.publish_nowait(event.channel, event.payload)
                    positions.append(_position(publication))
                else:
                    await broker.publish(event.channel, event.payload, msg_id)
            except BrokerError as exc:
                raise PublishRefused(
                    503, "broker_error", "broker_error", f"the broker refused: {exc}",
                    headers=[(b"Retry-After", str(self.context.config.server.retry_after)
                              .encode())],
                    extra={"published": index},
                ) from None  # fmt: skip
        answer: dict[str, object] = {"published": len(events)}
        if positions:
            answer["positions"] = positions
        await trio.lowlevel.checkpoint()
        return response(200, orjson.dumps(answer), _JSON)

    # ---- refusals ------------------------------------------------------------------------

    def _log_refusal(self, peer: str, refused: PublishRefused) -> None:
        # One line per result a second at most: a flood of bad requests stays cheap to log
        # (the counter has them all). Never the credential.
        now = trio.current_time()
        if now - self._logged.get(refused.result, -2.0) >= 1.0:
            self._logged[refused.result] = now
            self.context.log.warning(
                "publish_refused",
                peer=peer,
                result=refused.result,
                status=refused.status,
                code=refused.code,
                field=refused.field,
                detail=refused.message[:200],
            )


def _unauthorized(reason: str, detail: str) -> PublishRefused:
    challenge = f'Bearer error="invalid_token", error_description="{reason}"'.encode()
    return PublishRefused(
        401, "unauthorized", "unauthorized", f"{reason}: {detail}", "Authorization",
        headers=[(b"WWW-Authenticate", challenge)],
    )  # fmt: skip


def _no_other_fields(item: dict[str, Any], known: tuple[str, ...], prefix: str) -> None:
    for name in item:
        if name not in known:
            expected = ", ".join(known)
            raise _invalid(f"unknown field {name!r} (expected {expected})", f"{prefix}{name}")


def _position(publication: Publication) -> dict[str, object]:
    return {
        "channel": publication.channel,
        "seq": publication.seq,
        "prev": publication.prev,
        "epoch": publication.epoch,
    }


async def _linger(stream: trio.abc.ReceiveStream) -> None:
    """Read (and drop) what the client still sends, for a moment, before the connection is
    closed: closing with unread bytes resets it, and the reset may destroy the answer before
    the client reads it (a refusal sent before the body was read)."""
    received = 0
    with trio.move_on_after(_LINGER_SECONDS):
        try:
            while received < _LINGER_BYTES:
                data = await stream.receive_some(65536)
                if not data:
                    return
                received += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
