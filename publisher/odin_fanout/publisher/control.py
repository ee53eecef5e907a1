"""The control API's requests, validated: pure, no I/O.

``POST /control`` bodies are the original's (``action``, ``messagesPerSecond``, ``tokens``,
``duration`` in ms, ``connections``), plus ``events``. The original answered 200 to anything
and ignored what it did not know; here every problem is a ``ControlError`` that names the
field, and unknown fields are refused (a typo must not be silently ignored).
"""

from __future__ import annotations

import math

import attrs
import orjson

from odin_fanout.protocol.channels import EVENT_TYPES, ChannelError, check_symbol

ACTIONS = ("start", "stop", "configure")
_FIELDS = {"action", "messagesPerSecond", "tokens", "duration", "connections", "events"}


class ControlError(Exception):
    """A request the API refuses: the HTTP status, a stable code, the field at fault."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.field = field
        self.message = message

    def body(self) -> dict[str, object]:
        return {
            "success": False,
            "message": self.message,
            "error": {"code": self.code, "field": self.field, "message": self.message},
        }


@attrs.frozen
class Changes:
    """What a start or configure request sets; None: leave as it is."""

    rate: float | None = None
    tokens: tuple[str, ...] | None = None
    events: tuple[str, ...] | None = None
    duration_ms: int | None = None
    connections: int | None = None


@attrs.frozen
class Command:
    action: str
    changes: Changes


@attrs.frozen
class Limits:
    max_rate: float
    max_tokens: int


def parse_control(body: bytes, limits: Limits) -> Command:
    try:
        document = orjson.loads(body) if body.strip() else None
    except orjson.JSONDecodeError as exc:
        raise ControlError(400, "bad_json", f"the body is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ControlError(400, "bad_request", "the body must be a JSON object with an action")
    unknown = sorted(set(document) - _FIELDS)
    if unknown:
        raise ControlError(
            400, "unknown_field", f"unknown field {unknown[0]!r}; expected {sorted(_FIELDS)}",
            unknown[0],
        )  # fmt: skip
    action = document.get("action")
    if action not in ACTIONS:
        raise ControlError(
            400, "invalid_action", "Invalid action. Use start, stop, or configure", "action"
        )
    changes = Changes(
        rate=_rate(document.get("messagesPerSecond"), limits),
        tokens=_tokens(document.get("tokens"), limits),
        events=_events(document.get("events")),
        duration_ms=_count(document.get("duration"), "duration"),
        connections=_count(document.get("connections"), "connections"),
    )
    if action == "stop" and changes != Changes():
        raise ControlError(400, "bad_request", "stop takes no other field", "action")
    return Command(action, changes)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _rate(value: object, limits: Limits) -> float | None:
    if value is None:
        return None
    number = _number(value)
    if number is None or not 0 < number <= limits.max_rate:
        raise ControlError(
            422, "invalid_value",
            f"messagesPerSecond must be a number > 0 and <= {limits.max_rate:g}, got {value!r}",
            "messagesPerSecond",
        )  # fmt: skip
    return number


def _count(value: object, field: str) -> int | None:
    if value is None:
        return None
    number = _number(value)
    if number is None or number < 0 or number != int(number):
        raise ControlError(
            422, "invalid_value", f"{field} must be a whole number >= 0, got {value!r}", field
        )
    return int(number)


def _tokens(value: object, limits: Limits) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [item.strip() for item in value.split(",") if item.strip()]
    if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
        raise ControlError(
            422, "invalid_value", "tokens must be a non-empty list of symbols", "tokens"
        )
    if len(value) > limits.max_tokens:
        raise ControlError(
            422, "invalid_value", f"at most {limits.max_tokens} tokens, got {len(value)}", "tokens"
        )
    for symbol in value:
        try:
            check_symbol(symbol)
        except ChannelError as exc:
            raise ControlError(422, "invalid_value", f"tokens: {exc}", "tokens") from None
    return tuple(dict.fromkeys(value))  # duplicates once, in order


def _events(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [item.strip() for item in value.split(",") if item.strip()]
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(event, str) and event in EVENT_TYPES for event in value)
    ):
        raise ControlError(
            422, "invalid_value", f"events must be a non-empty list of {', '.join(EVENT_TYPES)}",
            "events",
        )  # fmt: skip
    return tuple(dict.fromkeys(value))
