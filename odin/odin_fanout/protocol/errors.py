"""Error codes sent to clients, and the exception that carries one out of the codec.

Errors follow the h11/wsproto split: ``ClientError`` means the peer sent something we refuse
(it becomes an ``error`` reply, the connection stays open); a bug of ours is any other
exception and is never turned into a reply.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """The ``code`` of an ``error`` reply. Stable: clients switch on these."""

    INVALID_JSON = "INVALID_JSON"
    """The frame is not a JSON document."""
    INVALID_MESSAGE = "INVALID_MESSAGE"
    """JSON, but not an object with the fields its ``type`` needs."""
    UNKNOWN_TYPE = "UNKNOWN_TYPE"
    """``type`` is not one of subscribe, unsubscribe, heartbeat, replay, auth, refresh."""
    BINARY_NOT_SUPPORTED = "BINARY_NOT_SUPPORTED"
    """The protocol is JSON text frames only."""
    INVALID_CHANNEL = "INVALID_CHANNEL"
    """A channel name or pattern breaks the naming rules."""
    SUBSCRIPTION_LIMIT = "SUBSCRIPTION_LIMIT"
    """The subscribe would exceed the per-connection subscription limit."""
    INVALID_POSITION = "INVALID_POSITION"
    """A recovery or replay position that cannot be used (for example on a pattern)."""
    RATE_LIMIT_EXCEEDED = "RATE_LIMIT_EXCEEDED"
    """The connection sent faster than its token bucket allows; the frame was dropped."""
    UNAUTHORIZED = "UNAUTHORIZED"
    """A ``refresh`` (or a late ``auth``) whose token does not verify, or that the connection
    cannot take (another subject); the connection keeps the token it had."""
    FORBIDDEN = "FORBIDDEN"
    """A channel or pattern this connection may not read (``auth.namespaces``: denied, or a
    token that does not allow it); nothing of the request was done."""


class ClientError(Exception):
    """A client message the protocol refuses, with the code to reply with."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        request_type: str | None = None,
        request_id: str | int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_type = request_type
        """The ``type`` of the refused message, when it could be read."""
        self.request_id = request_id
        """The client's ``id`` to echo, when it could be read."""
