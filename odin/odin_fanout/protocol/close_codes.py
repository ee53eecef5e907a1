"""WebSocket close codes Odin sends, and whether a client should reconnect after each.

Every code here is a reconnect code except where noted: the server never closes a client for
good, it only asks it to come back later, slower, or reading faster.
"""

from __future__ import annotations

import enum


class CloseCode(enum.IntEnum):
    """Close codes and their meaning for clients."""

    NORMAL = 1000
    """The client asked to close."""
    GOING_AWAY = 1001
    """Server shutdown or drain; a ``reconnect`` message with ``after_ms`` came first."""
    PROTOCOL_ERROR = 1002
    """The client broke the WebSocket framing rules (an unmasked frame, a bad opcode, ...)."""
    INVALID_DATA = 1007
    """A text message that is not valid UTF-8."""
    POLICY_VIOLATION = 1008
    """Slow consumer (reason ``slow consumer``) or sustained rate-limit abuse."""
    MESSAGE_TOO_BIG = 1009
    """An inbound message exceeded the size limit."""
    INTERNAL_ERROR = 1011
    """A server bug ended this connection; reconnect with positions."""
    IDLE_TIMEOUT = 4000
    """Nothing arrived (no frame, no pong) within the idle timeout."""
    KICKED = 4001
    """Closed by an operator (``odin-console``'s kick, or ``kick`` on the control socket);
    the reason is the operator's. The client may reconnect."""
    AUTH_REQUIRED = 4011
    """The server needs a token and the connection's first message was not ``auth`` (or
    none came within the handshake timeout)."""
    TOKEN_INVALID = 4012
    """The ``auth`` message's token does not verify; the reason follows ``token invalid:``."""
    TOKEN_EXPIRED = 4010
    """The connection's token expired (its ``exp``, plus ``auth.leeway``): reconnect with a
    new one."""


SLOW_CONSUMER_REASON = "slow consumer"
RATE_LIMIT_REASON = "rate limit abuse"
SHUTDOWN_REASON = "server shutting down"
IDLE_REASON = "idle timeout"
AUTH_REQUIRED_REASON = "authentication required"
