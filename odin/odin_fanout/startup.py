"""What the project's commands (``odin``, ``odin-publisher``) do before they run: load the
configuration, report a bad one as one JSON line on stderr (exit 78, EX_CONFIG), print the
effective one for ``--check-config`` (exit 0), and send the logs where the configuration says.

Here rather than in ``odin_fanout.cli`` so that the publisher, which must not import the server's
command line (see the import-linter contracts in pyproject.toml), shares it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Protocol, TypeVar

import orjson

from odin_fanout import logs
from odin_fanout.config import ConfigError, LogSection, as_dict

EX_CONFIG = 78


class Configured(Protocol):
    """A configuration with a ``[log]`` section (``odin_fanout.config.Config``,
    ``PublisherConfig``)."""

    @property
    def log(self) -> LogSection: ...


ConfigT = TypeVar("ConfigT", bound=Configured)


def start(
    load: Callable[[], tuple[ConfigT, list[str]]], *, check_config: bool
) -> tuple[ConfigT, list[str]] | int:
    """The configuration ``load`` gives and the unknown environment variables it saw, with
    logging configured; or the exit code when the command stops here: EX_CONFIG (the problems
    written to stderr) when ``load`` raises ConfigError, 0 once ``check_config`` printed it."""
    try:
        config, unknown_env = load()
    except ConfigError as exc:
        line = {"event": "config_invalid", "level": "error", "errors": exc.problems}
        sys.stderr.write(orjson.dumps(line).decode() + "\n")
        return EX_CONFIG
    if check_config:
        sys.stdout.write(orjson.dumps(as_dict(config), option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    logs.configure(config.log.level, config.log.format)
    return config, unknown_env
