"""Structured logs: one JSON object per line on stderr, with stable event names.

Every line has ``event``, ``level``, ``timestamp`` (UTC, ISO 8601) and ``service``; connection
events add ``conn`` and ``peer``. ``Log`` is a small bound logger over the standard library's
``logging`` (``log.info("conn_open", peer=...)``, ``log.bind(conn=...)``) and
python-json-logger writes the lines, so libraries that log through ``logging``
(hypercorn, trio-asyncio) come out as JSON too. (structlog would do the binding, but it imports
asyncio, and the server must load no asyncio outside the NATS bridge.)
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson
from pythonjsonlogger.json import JsonFormatter

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# The LogRecord attribute that carries a Log's fields to the formatter.
_FIELDS = "odin_fields"
LIFECYCLE = "odin.lifecycle"


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


class _JsonLines(JsonFormatter):
    def add_fields(
        self, log_record: dict[str, Any], record: logging.LogRecord, _: dict[str, Any]
    ) -> None:
        log_record["event"] = record.getMessage()
        log_record["level"] = record.levelname.lower()
        log_record["timestamp"] = _timestamp(record)
        fields = getattr(record, _FIELDS, None)
        if fields is None:
            log_record["logger"] = record.name  # a library's record
        else:
            log_record.update(fields)
        if record.exc_info:
            log_record["exception"] = self.formatException(record.exc_info)


class _Console(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, _FIELDS, {})
        text = " ".join(f"{key}={value}" for key, value in fields.items() if key != "service")
        line = f"{_timestamp(record)} {record.levelname.lower():7} {record.getMessage():20} {text}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _dumps(value: object, **_: object) -> str:
    return orjson.dumps(value, default=str).decode()


def configure(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Send every log record of the process to ``stream`` (stderr), formatted: ``auto`` is
    readable lines on a terminal and JSON lines (for a log pipeline) anywhere else."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_JsonLines(json_serializer=_dumps) if fmt == "json" else _Console())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    # Odin's own events at the configured level; libraries (some log every frame
    # at debug level) only from warnings up. Lifecycle events (listening, draining, stopped)
    # are always written: scripts wait for them.
    set_level(level)
    logging.getLogger(LIFECYCLE).setLevel(logging.INFO)


def set_level(level: str) -> None:
    """Change the level of Odin's own events (a configuration reload)."""
    logging.getLogger("odin").setLevel(_LEVELS[level])


class Log:
    """A logger with bound context; each call logs one event with its fields."""

    __slots__ = ("_context", "_logger")

    def __init__(self, logger: logging.Logger, context: Mapping[str, object]) -> None:
        self._logger = logger
        self._context = dict(context)

    def bind(self, **context: object) -> Log:
        return Log(self._logger, {**self._context, **context})

    def lifecycle(self) -> Log:
        """The same context on the lifecycle logger, which the log level never silences."""
        return Log(logging.getLogger(LIFECYCLE), self._context)

    def _log(self, level: int, event: str, exc_info: object, fields: dict[str, object]) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(
                level,
                event,
                exc_info=exc_info,  # type: ignore[arg-type]
                extra={_FIELDS: {**self._context, **fields}},
            )

    def debug(self, event: str, **fields: object) -> None:
        self._log(logging.DEBUG, event, None, fields)

    def info(self, event: str, **fields: object) -> None:
        self._log(logging.INFO, event, None, fields)

    def warning(self, event: str, **fields: object) -> None:
        self._log(logging.WARNING, event, None, fields)

    def error(self, event: str, *, exc_info: BaseException | None = None, **fields: object) -> None:
        self._log(logging.ERROR, event, exc_info, fields)

    def exception(self, event: str, **fields: object) -> None:
        """An error with the exception being handled."""
        self._log(logging.ERROR, event, True, fields)


def get_logger(name: str = "odin", **context: object) -> Log:
    return Log(logging.getLogger(name), context)
