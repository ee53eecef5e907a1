"""Numbers, durations and a snapshot as the console shows them (plain text, no UI)."""

from __future__ import annotations

from typing import Final

from odin_fanout.control.protocol import Snapshot
from odin_fanout.control.text import clock as clock  # the console shows times as ctl does


def count(value: int) -> str:
    return f"{value:,}"


def rate(value: float) -> str:
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def compact(value: float) -> str:
    """A rate in at most 6 characters, for the header: 12.3, 2,400, 92.2k, 118k, 3.4M."""
    if value < 10_000:
        return rate(value)
    if value < 100_000:
        return f"{value / 1000:.1f}k"
    if value < 1_000_000:
        return f"{value / 1000:.0f}k"
    return f"{value / 1_000_000:.1f}M"


def duration(seconds: float) -> str:
    """Whole units, the two largest: 45s, 3m12s, 2h05m, 3d04h."""
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def age(seconds: float) -> str:
    """A short wait with its tenths (queues), a long one as a duration; none is a dash."""
    if seconds <= 0:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    return duration(seconds)


def nbytes(value: int) -> str:
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def span(first: float, last: float) -> str:
    """From the first to the last of a group: ``10:00:01–10:00:40``; one time if the same."""
    start, end = clock(first), clock(last)
    return start if start == end else f"{start}–{end}"


def reasons(counts: dict[str, int]) -> str:
    """The total, then each reason that counted: ``1,203 (queue_full 1,200, too_slow 3)``."""
    total = sum(counts.values())
    parts = [f"{reason} {count(n)}" for reason, n in sorted(counts.items()) if n]
    return f"{count(total)} ({', '.join(parts)})" if parts else count(total)


def channels(names: list[str], width: int = 32) -> str:
    """As many names as fit in ``width``, then how many more."""
    shown: list[str] = []
    for index, name in enumerate(names):
        more = len(names) - index - 1
        text = ",".join([*shown, name]) + (f" +{more}" if more else "")
        if shown and len(text) > width:
            return f"{','.join(shown)} +{len(names) - index}"
        shown.append(name)
    return ",".join(shown)


FIGURES: Final = (
    "connections",
    "headroom",
    "subscriptions",
    "messages/s",
    "drops",
    "gaps",
    "slow consumers",
    "deepest queue",
    "rate-limited",
    "NATS",
    "NATS reconnects",
    "recovered",
    "not recovered",
    "replays",
    "replayed msgs",
    "draining",
    "uptime",
    "memory",
)
"""The overview's rows, in order."""


def figures(snapshot: Snapshot) -> list[str]:
    """A snapshot as the overview shows it, one text per row of ``FIGURES``."""
    limit = snapshot.max_connections
    if limit:
        free = max(limit - snapshot.connections, 0)
        connections = f"{count(snapshot.connections)} / {count(limit)}"
        headroom = f"{count(free)} ({100 * free / limit:.0f}%)"
    else:
        connections, headroom = count(snapshot.connections), "no limit"
    nats = snapshot.nats
    link = "connected" if nats.connected else "DOWN"
    if nats.detail and nats.detail != "connected":
        link = f"{link} ({nats.detail})"
    memory = nbytes(snapshot.rss_bytes)
    if snapshot.memory_limit_bytes:
        memory = f"{memory} / {nbytes(snapshot.memory_limit_bytes)}"
    recoveries = snapshot.recoveries
    values = [
        connections,
        headroom,
        f"{count(snapshot.subscriptions)} on {count(snapshot.channels)} channels",
        f"in {rate(snapshot.in_per_s)}  out {rate(snapshot.out_per_s)}",
        reasons(snapshot.dropped),
        reasons(snapshot.gaps),
        reasons(snapshot.slow_consumers),
        f"{count(snapshot.deepest_queue)}, oldest {age(snapshot.oldest_queued_age)}",
        count(snapshot.rate_limited),
        f"{link}, lag {count(nats.pending)}",
        f"{count(nats.reconnects)}, ingest dropped {count(nats.ingest_dropped)}",
        f"{count(recoveries.recovered)} ({count(recoveries.messages)} messages)",
        reasons(recoveries.not_recovered),
        reasons(snapshot.replays),
        count(snapshot.replayed_messages),
        "YES" if snapshot.draining else "no",
        duration(snapshot.uptime),
        memory,
    ]
    assert len(values) == len(FIGURES)
    return values
