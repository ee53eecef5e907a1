"""Log lines: readable on a terminal, JSON for a pipeline, unless a format is chosen."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from odin_fanout import logs


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    odin_level = logging.getLogger("odin").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("odin").setLevel(odin_level)


def emit(stream: io.StringIO, fmt: str) -> str:
    logs.configure("info", fmt, stream=stream)
    logs.get_logger(service="odin").info("listening", port=3002)
    return stream.getvalue()


def test_auto_is_readable_on_a_terminal() -> None:
    line = emit(Terminal(), "auto")
    assert "listening" in line and "port=3002" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_auto_is_json_anywhere_else() -> None:
    record = json.loads(emit(io.StringIO(), "auto"))
    assert (record["event"], record["port"]) == ("listening", 3002)


def test_a_chosen_format_wins_over_the_terminal() -> None:
    assert json.loads(emit(Terminal(), "json"))["event"] == "listening"


def test_set_level_changes_what_is_written() -> None:
    stream = io.StringIO()
    logs.configure("warning", "json", stream=stream)
    log = logs.get_logger(service="odin")
    log.info("hidden")
    logs.set_level("info")
    log.info("shown")
    assert [json.loads(line)["event"] for line in stream.getvalue().splitlines()] == ["shown"]
