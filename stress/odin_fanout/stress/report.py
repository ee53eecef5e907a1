"""What a run shows: a live view while it runs, a final table, a JSON document, and the
verdict (which invariants broke, which thresholds were missed, and the exit code)."""

from __future__ import annotations

import sys
from typing import Any

import attrs

from odin_fanout.stress.profiles import Profile
from odin_fanout.stress.run import Snapshot

EXIT_OK = 0
EXIT_VIOLATION = 1
EXIT_THRESHOLD = 3
CLIENT_LAG_MS = 50.0
"""A worker whose 100 ms timer fires later than this (p99) is itself a bottleneck."""


@attrs.frozen
class Thresholds:
    min_connected_pct: float = 99.0
    """Of the clients asked for, those that connected at least once."""
    max_p99_ms: float | None = None
    min_recovered_pct: float | None = None
    """Of the channels recoveries asked for, those restored in full."""
    max_unexpected_closes: int = 0


def server_figures(snapshot: Snapshot) -> dict[str, float | None]:
    samples = [s for s in snapshot.server if s.cpu_seconds is not None]
    rss = [s.rss_bytes for s in snapshot.server if s.rss_bytes is not None]
    cpu_pct = None
    if len(samples) >= 2 and samples[-1].at > samples[0].at:
        used = (samples[-1].cpu_seconds or 0) - (samples[0].cpu_seconds or 0)
        cpu_pct = round(100 * used / (samples[-1].at - samples[0].at), 1)
    return {
        "cpu_pct": cpu_pct,
        "rss_max_mib": round(max(rss) / 2**20, 1) if rss else None,
        "rss_last_mib": round(rss[-1] / 2**20, 1) if rss else None,
    }


def figures(snapshot: Snapshot, profile: Profile) -> dict[str, Any]:
    """Everything a run measured, as plain data (the ``--json`` document)."""
    tally = snapshot.tally
    counts = snapshot.counts
    connected_once = tally.connects - tally.reconnects
    worker_cpu = sum(snapshot.worker_cpu_s)
    return {
        "clients": profile.connections,
        "duration_s": profile.duration,
        "elapsed_s": round(snapshot.elapsed, 1),
        "connected_at_end": snapshot.connected,
        "connected_pct": round(100 * connected_once / max(profile.connections, 1), 2),
        "connect_failures": tally.connect_failures,
        "reconnects": tally.reconnects,
        "events": counts.events,
        "events_per_s": round(counts.events / max(profile.duration, 1e-9), 1),
        "latency_ms": snapshot.latency.summary_ms(),
        "connect_ms": snapshot.connect_time.summary_ms(),
        "continuity": {**attrs.asdict(counts), "violations": counts.violations},
        "closes": {
            "by_code": snapshot.close_codes,
            "slow_closed": tally.slow_closed,
            "unexpected": tally.unexpected_closes,
            "reconnect_hints": tally.reconnect_hints,
        },
        "bad_frames": tally.bad_frames,
        "server_errors": tally.errors,
        "failures": snapshot.failures,
        "server": server_figures(snapshot),
        "client_cpu_pct": round(100 * worker_cpu / max(snapshot.elapsed, 1e-9), 1),
        "busiest_worker_cpu_pct": round(
            100 * max(snapshot.worker_cpu_s, default=0.0) / max(snapshot.elapsed, 1e-9), 1
        ),
        "client_loop_lag_ms": snapshot.loop_lag.summary_ms(),
        "workers": len(snapshot.worker_cpu_s),
    }


def verdict(result: dict[str, Any], thresholds: Thresholds) -> tuple[int, list[str]]:
    """The exit code and why."""
    problems = []
    continuity = result["continuity"]
    for name in ("silent_gaps", "duplicates", "out_of_order", "bad_recoveries"):
        if continuity[name]:
            problems.append(f"invariant broken: {continuity[name]} {name.replace('_', ' ')}")
    if result["bad_frames"]:
        problems.append(f"invariant broken: {result['bad_frames']} bad frames")
    code = EXIT_VIOLATION if problems else EXIT_OK
    missed = []
    if result["connected_pct"] < thresholds.min_connected_pct:
        missed.append(f"connected {result['connected_pct']} % < {thresholds.min_connected_pct} %")
    p99 = result["latency_ms"]["p99"]
    if thresholds.max_p99_ms is not None and (p99 is None or p99 > thresholds.max_p99_ms):
        missed.append(f"p99 latency {p99} ms > {thresholds.max_p99_ms} ms")
    if thresholds.min_recovered_pct is not None and continuity["recoveries"]:
        pct = 100 * continuity["recovered"] / continuity["recoveries"]
        if pct < thresholds.min_recovered_pct:
            missed.append(f"recovered {pct:.1f} % < {thresholds.min_recovered_pct} %")
    if result["closes"]["unexpected"] > thresholds.max_unexpected_closes:
        missed.append(f"{result['closes']['unexpected']} unexpected closes")
    if missed and code == EXIT_OK:
        code = EXIT_THRESHOLD
    notes = []
    lag = result["client_loop_lag_ms"]["p99"]
    if (lag is not None and lag > CLIENT_LAG_MS) or result["busiest_worker_cpu_pct"] > 85:
        notes.append(
            f"the load client was saturated (loop lag p99 {_ms(lag)} ms, busiest worker "
            f"{result['busiest_worker_cpu_pct']} % CPU): latencies and connect times include "
            "its own delay; use more --workers or fewer clients or events"
        )
    return code, problems + [f"threshold missed: {m}" for m in missed] + notes


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    latency, connect, continuity = result["latency_ms"], result["connect_ms"], result["continuity"]
    server = result["server"]
    return [
        ("clients", f"{result['clients']} ({result['connected_pct']} % connected, "
                    f"{result['connect_failures']} failed, {result['reconnects']} reconnects)"),
        ("events", f"{result['events']:,} ({result['events_per_s']:,.0f}/s)"),
        ("latency ms p50/p90/p99/p99.9/max",
         " / ".join(_ms(latency[k]) for k in ("p50", "p90", "p99", "p99.9", "max"))),
        ("connect ms p50/p99/max", " / ".join(_ms(connect[k]) for k in ("p50", "p99", "max"))),
        ("silent gaps / duplicates / out of order",
         f"{continuity['silent_gaps']} / {continuity['duplicates']} / "
         f"{continuity['out_of_order']}"),
        ("announced gaps", str(continuity["announced_gaps"])),
        ("recoveries: full / not / bad",
         f"{continuity['recovered']} / {continuity['not_recovered']} / "
         f"{continuity['bad_recoveries']}"),
        ("closes by code",
         ", ".join(f"{c}: {n}" for c, n in sorted(result["closes"]["by_code"].items())) or "-"),
        ("slow clients cut off / unexpected closes",
         f"{result['closes']['slow_closed']} / {result['closes']['unexpected']}"),
        ("server CPU % / RSS max MiB",
         f"{server['cpu_pct'] or '-'} / {server['rss_max_mib'] or '-'}"),
        ("load client CPU % (workers) / busiest",
         f"{result['client_cpu_pct']} ({result['workers']}) / "
         f"{result['busiest_worker_cpu_pct']}"),
        ("load client loop lag ms p99/max",
         " / ".join(_ms(result["client_loop_lag_ms"][k]) for k in ("p99", "max"))),
    ]  # fmt: skip


def print_table(result: dict[str, Any], problems: list[str], notes: list[str]) -> None:
    rows = table_rows(result)
    width = max(len(name) for name, _ in rows)
    out = sys.stdout
    for name, value in rows:
        out.write(f"{name:<{width}}  {value}\n")
    for line in notes + problems:
        out.write(f"- {line}\n")
    broken = any(line.startswith(("invariant", "threshold")) for line in problems)
    out.write("" if broken else "OK\n")
    out.flush()


class Progress:
    """The live view: a rich table on a terminal, a plain line every 5 s otherwise."""

    def __init__(self, live: bool) -> None:
        self._live: Any = None
        self._last_line = 0.0
        if live:
            from rich.live import Live

            self._live = Live(auto_refresh=False, transient=True)
            self._live.start()

    def update(self, snapshot: Snapshot, profile: Profile) -> None:
        result = figures(snapshot, profile)
        if self._live is not None:
            from rich.table import Table

            table = Table(title=f"odin-stress  {snapshot.elapsed:.0f} / {profile.duration:g} s")
            table.add_column("measure")
            table.add_column("value")
            for name, value in table_rows(result):
                table.add_row(name, value)
            self._live.update(table, refresh=True)
        elif snapshot.elapsed - self._last_line >= 5:
            self._last_line = snapshot.elapsed
            latency = result["latency_ms"]
            sys.stdout.write(
                f"[{snapshot.elapsed:5.0f} s] connected {snapshot.connected}/{profile.connections}"
                f" events {result['events']:,} p50 {_ms(latency['p50'])} ms"
                f" p99 {_ms(latency['p99'])} ms violations {result['continuity']['violations']}"
                f" client CPU {result['client_cpu_pct']} %\n"
            )
            sys.stdout.flush()

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
