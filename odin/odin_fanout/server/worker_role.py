"""What a server process knows of its host when it runs as one of ``odin serve --workers N``:
its slot, how many workers there should be, its supervisor, and the host directory where the
supervisor publishes the workers' state and the workers keep their shared metrics."""

from __future__ import annotations

from pathlib import Path

import attrs

from odin_fanout.control.host_state import METRICS_DIR, read_state
from odin_fanout.control.protocol import HostWorkers


@attrs.frozen
class WorkerRole:
    slot: int
    """0 to count - 1; a restarted worker takes the slot of the one it replaces."""
    count: int
    supervisor_pid: int
    directory: Path

    @property
    def metrics_directory(self) -> Path:
        return self.directory / METRICS_DIR

    def host(self) -> HostWorkers | None:
        """The workers as the supervisor last published them (None before it has)."""
        return read_state(self.directory)
