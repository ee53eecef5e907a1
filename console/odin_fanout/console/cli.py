"""``odin-console`` / ``python -m console``: the operator's console for Odin servers.

    odin-console [--socket PATH ...] [--dir DIR] [--grafana-url URL] [--interval SECONDS]

With no ``--socket`` it attaches to every control socket in the directory (``odin-<pid>.sock``)
and keeps looking there, so that server processes started later appear. Exit codes: 0 after
quitting, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from odin_fanout.control.paths import default_directory

EX_USAGE: Final = 2
DEFAULT_GRAFANA: Final = "http://localhost:3000/d/odin-overview"
GRAFANA_ENV: Final = "ODIN_GRAFANA_URL"
MIN_INTERVAL: Final = 0.2
MAX_INTERVAL: Final = 60.0


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not MIN_INTERVAL <= value <= MAX_INTERVAL:
        raise argparse.ArgumentTypeError(
            f"must be from {MIN_INTERVAL:g} to {MAX_INTERVAL:g} seconds, got {text}"
        )
    return value


def _url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"not an http(s) URL: {text!r}")
    return text


def _socket(text: str) -> Path:
    if not text:
        raise argparse.ArgumentTypeError("empty socket path")
    # Unix socket paths are limited (108 bytes with the final NUL on Linux).
    if len(os.fsencode(text)) > 107:
        raise argparse.ArgumentTypeError(f"socket path longer than 107 bytes: {text}")
    return Path(text)


def build_parser(environ: dict[str, str] | None = None) -> argparse.ArgumentParser:
    environ = dict(os.environ) if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="odin-console",
        description="The operator's console: live state of every Odin server on this host, "
        "through their control sockets.",
    )
    parser.add_argument(
        "--socket",
        type=_socket,
        action="append",
        default=[],
        metavar="PATH",
        help="a server's control socket (repeatable); default: every socket in --dir",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=default_directory(environ),
        metavar="DIR",
        help="where servers put their sockets (default: %(default)s)",
    )
    parser.add_argument(
        "--grafana-url",
        type=_url,
        default=environ.get(GRAFANA_ENV) or DEFAULT_GRAFANA,
        metavar="URL",
        help=f"the dashboard for deeper history (default: ${GRAFANA_ENV} or %(default)s)",
    )
    parser.add_argument(
        "--interval",
        type=_interval,
        default=1.0,
        metavar="SECONDS",
        help="seconds between updates from each server, 0.2 to 60 (default: %(default)s)",
    )
    return parser


def parse(
    argv: Sequence[str] | None = None, environ: dict[str, str] | None = None
) -> argparse.Namespace:
    """The options; a bad one (``$ODIN_GRAFANA_URL`` included: argparse checks a default
    given as text like an option) exits with code 2 and says why."""
    return build_parser(environ).parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    from odin_fanout.console.app import ConsoleApp  # Textual loads only once the arguments are good

    app = ConsoleApp(
        sockets=args.socket,
        directory=args.dir,
        grafana_url=args.grafana_url,
        interval=args.interval,
    )
    app.run()
    return 0
