"""What one load worker is to do: built by ``odin_fanout.stress.profiles``, sent to
``odin_fanout.stress.worker`` as JSON (pure data, no I/O)."""

from __future__ import annotations

import attrs


@attrs.frozen
class Plan:
    """What one worker does; the coordinator builds it (see ``odin_fanout.stress.profiles``)."""

    host: str
    port: int
    path: str
    sessions: list[list[str]]
    """The channels of each of this worker's sessions."""
    first_index: int
    """Index of this worker's first session in the run (for seeds and the log)."""
    duration: float
    ramp_per_s: float
    connect_timeout: float
    heartbeat: float = 15.0
    storm_at: float | None = None
    """Seconds after the start when ``storm_fraction`` of sessions drop at once and come back
    with their positions."""
    storm_fraction: float = 1.0
    slow_fraction: float = 0.0
    """Sessions that stop reading at ``slow_at`` (and expect to be closed as slow)."""
    slow_at: float = 5.0
    churn_per_s: float = 0.0
    """Fraction of sessions that leave and come back (with their positions) each second."""
    reconnect_delay: float = 0.5
    """Longest random wait before coming back (after churn, a close or a ``reconnect``)."""
    seed: int = 0
