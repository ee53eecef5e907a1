"""The host's workers as the supervisor last published them: one small JSON file in the
host directory, replaced atomically, read by workers for /health, /ready and /metrics.

A file rather than a message to each worker: a worker that starts (or restarts) reads the
current state at once, and a reader never sees half a write (rename is atomic).
"""

from __future__ import annotations

import os
from pathlib import Path

import cattrs
import orjson

from odin_fanout.control.protocol import HostWorkers, converter

STATE_FILE = "workers.json"
METRICS_DIR = "metrics"


def write_state(directory: Path, state: HostWorkers) -> None:
    path = directory / STATE_FILE
    scratch = path.with_suffix(".tmp")
    scratch.write_bytes(orjson.dumps(converter.unstructure(state)))
    os.replace(scratch, path)


def read_state(directory: Path) -> HostWorkers | None:
    """The last published state; None before the first one (or if the file is unreadable,
    which a worker reports as an unknown host rather than failing a health check)."""
    try:
        document = orjson.loads((directory / STATE_FILE).read_bytes())
        return converter.structure(document, HostWorkers)
    except (OSError, ValueError, TypeError, KeyError, cattrs.BaseValidationError):
        return None
