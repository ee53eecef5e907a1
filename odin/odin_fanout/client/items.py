"""What a subscription yields: events, and plain notices of what it will not yield."""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen
class Position:
    """Where a client is in a channel: the history's ``epoch`` and the ``seq`` last seen."""

    epoch: str
    seq: int


@attrs.frozen
class Event:
    """One message of a channel, as the server sent it (docs/protocol.md, Events)."""

    channel: str
    seq: int
    prev: int
    """The position of the previous message of this channel (0: none)."""
    epoch: str
    ts: int
    data: Any
    """The publisher's JSON, decoded."""
    type: str


@attrs.frozen
class Gap:
    """Positions ``from_seq``..``to_seq`` of ``channel`` hold at least one message that will
    not be yielded. ``reason`` is the server's (``conflated``, ``feed_overflow``, ...),
    ``missed`` when the client saw ``prev`` not link to the last ``seq``, or
    ``client_overflow`` when the subscription's own buffer was full and dropped them."""

    channel: str
    from_seq: int
    to_seq: int
    reason: str


@attrs.frozen
class NotRecovered:
    """After a reconnect the channel's missed messages could not be replayed (``reason``:
    ``history_expired``, ``epoch_changed``, ``limit_exceeded``, ...). The channel's latest
    message follows, if it has one: reload state from it."""

    channel: str
    reason: str


Item = Event | Gap | NotRecovered
"""What a subscription yields."""


class SubscriptionError(Exception):
    """The server refused a subscription (``code``: ``INVALID_CHANNEL``, ``FORBIDDEN``,
    ``SUBSCRIPTION_LIMIT``, ...); raised by the subscription's iterator."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class AuthenticationError(SubscriptionError):
    """The server refused the client's token and the client gave up (docs/clients.md,
    Tokens): raised by every subscription's iterator, ``wait_active()``,
    ``client.wait_connected()`` and ``client.subscribe()``.

    ``code``: ``AUTH_REQUIRED`` (close 4011: the server needs a token) or ``TOKEN_INVALID``
    (close 4012, or ``401`` on the upgrade: the token does not verify). ``close_code`` is the
    close code (None for a 401), ``status`` the HTTP status (401, or None for a close code),
    ``message`` the server's reason, and ``refusals`` how many refusals in a row it took."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        close_code: int | None = None,
        status: int | None = None,
        refusals: int = 1,
    ) -> None:
        super().__init__(code, message)
        self.close_code = close_code
        self.status = status
        self.refusals = refusals


@attrs.frozen
class Refusal:
    """The server answered a connection attempt with an HTTP status instead of the upgrade:
    ``status`` (``503`` at capacity or draining, ``429`` over a per-client limit, ``401``
    token refused, ...), the ``Retry-After`` it gave in seconds (None: none), and its body's
    text (``server at capacity``)."""

    status: int
    retry_after: float | None
    reason: str
