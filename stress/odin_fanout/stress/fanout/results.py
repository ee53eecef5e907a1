"""What the load clients report, made into figures: one run's results merged (several client
processes), latency percentiles, what makes a run's figures doubtful, and the reference
server's figures as ratios to each peer's over all runs."""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

# A load client this busy (% of its core during publishing) may itself limit the results.
CLIENT_BUSY_PCT = 80.0
# CPU used by anything else on the machine (% of one core) past which a run is flagged.
OTHER_BUSY_PCT = 15.0


SUMMED = (
    "connections",
    "connected",
    "connect_errors",
    "delivered",
    "bytes",
    "bad_frames",
    "bad_payloads",
    "other_frames",
    "seq_errors",
    "unmeasured_frames",
    "pings",
    "lost",
    "closed_by_server",
    "cpu_s",
    "cpu_pct",
    "cpu_total_s",
    "ws_frames",
)


def percentile_ms(ordered: list[int], q: float) -> float | None:
    """As load_client's: the sample at rank ``int(q * n)``, in ms."""
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6, 3)


def latency_summary(samples: list[int]) -> dict[str, float | None]:
    ordered = sorted(samples)
    return {
        "p50": percentile_ms(ordered, 0.50),
        "p90": percentile_ms(ordered, 0.90),
        "p99": percentile_ms(ordered, 0.99),
        "max": round(ordered[-1] / 1e6, 3) if ordered else None,
    }


def merge_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several load-client processes: counts (and their CPU, which is all on
    the one client CPU) summed, extremes kept, latency samples pooled."""
    merged = dict(results[0])
    for key in SUMMED:
        if key in merged:
            merged[key] = round(sum(result.get(key, 0) for result in results), 3)
    merged["per_conn_min"] = min(result["per_conn_min"] for result in results)
    merged["per_conn_max"] = max(result["per_conn_max"] for result in results)
    merged["go_ns"] = min(result["go_ns"] for result in results)
    merged["last_delivery_ns"] = max(result["last_delivery_ns"] for result in results)
    firsts = [result["first_delivery_ns"] for result in results if result["first_delivery_ns"]]
    merged["first_delivery_ns"] = min(firsts, default=0)
    merged["window_s"] = max(result["window_s"] for result in results)
    merged["connect_s"] = max(result["connect_s"] for result in results)
    errors: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    for result in results:
        errors.update(result["errors"])
        codes.update(result["close_codes"])
    merged["errors"] = dict(errors)
    merged["close_codes"] = dict(codes)
    if "latency_ns" in merged:
        samples = [ns for result in results for ns in result.pop("latency_ns", [])]
        sched = [ns for result in results for ns in result.pop("latency_sched_ns", [])]
        merged.pop("latency_ns", None)
        merged.pop("latency_sched_ns", None)
        merged["latency_samples"] = len(samples)
        merged["latency_ms"] = latency_summary(samples)
        merged["latency_sched_ms"] = latency_summary(sched)
    merged["processes"] = [
        {
            key: result.get(key)
            for key in ("connected", "connect_s", "delivered", "cpu_s", "cpu_pct", "window_s")
        }
        for result in results
    ]
    return merged


def delivery_anomalies(record: dict[str, Any]) -> list[str]:
    """What the load client and the publisher saw go wrong (shared with bench_workers)."""
    checks = record["checks"]
    found = []
    if record["connected"] < record["connections"]:
        found.append(f"only {record['connected']}/{record['connections']} connected")
    for key in ("bad_frames", "bad_payloads", "seq_errors", "lost", "closed_by_server"):
        if checks[key]:
            found.append(f"{key}={checks[key]}")
    if checks["errors"]:
        found.append(f"client errors: {checks['errors']}")
    ratio = record["delivered_ratio"]
    if ratio is not None and ratio < 0.999:
        window = "the burst window" if record["mode"] == "burst" else "the drain"
        found.append(f"delivered {ratio:.1%} of offered by the end of {window}")
    if not record["publisher"].get("published"):
        found.append("publisher had not finished when the window closed")
    elif record["mode"] == "rate" and record["publisher"].get("publish_late_max_ms", 0) > 100:
        late = record["publisher"]["publish_late_max_ms"]
        found.append(f"publisher fell {late:.0f} ms behind its schedule")
    return found


def anomalies(record: dict[str, Any]) -> list[str]:
    found = delivery_anomalies(record)
    if record["client_cpu_pct_publishing"] >= CLIENT_BUSY_PCT:
        found.append(
            f"load client at {record['client_cpu_pct_publishing']}% CPU: it may be the limit"
        )
    if record["server_stderr_lines"]:
        found.append(f"server wrote {record['server_stderr_lines']} stderr lines")
    if record["other_cpu_pct_publishing"] >= OTHER_BUSY_PCT:
        found.append(
            f"other processes used {record['other_cpu_pct_publishing']}% of a core meanwhile"
        )
    return found


# ---- ratios to the peers -----------------------------------------------------------------

# (title, how to read a figure from a run) for each kind of run.
RATE_FIGURES: list[tuple[str, Any]] = [
    ("delivered/s", lambda run: run["delivered_per_s"]),
    ("µs/deliv", lambda run: run["server_cpu_us_per_delivery"]),
    ("p50", lambda run: (run["latency_ms"] or {}).get("p50")),
    ("p99", lambda run: (run["latency_ms"] or {}).get("p99")),
    ("sched p99", lambda run: (run["latency_sched_ms"] or {}).get("p99")),
]
BURST_FIGURES: list[tuple[str, Any]] = [
    ("delivered/s", lambda run: run["delivered_per_s"]),
    ("µs/deliv", lambda run: run["server_cpu_us_per_delivery"]),
]
IDLE_FIGURES: list[tuple[str, Any]] = [
    ("KiB/conn", lambda run: run["kib_per_conn"]),
    ("connect s", lambda run: run["connect_s"]),
    ("accept CPU s", lambda run: run["server_cpu_s_connect"]),
    ("idle CPU %", lambda run: run.get("idle_cpu_pct")),
]


def _median(values: list[Any]) -> float | None:
    numbers = [float(value) for value in values if value is not None]
    return statistics.median(numbers) if numbers else None


def ratios(
    runs: list[dict[str, Any]], reference: str, key: str, figures: list[tuple[str, Any]]
) -> list[dict[str, Any]]:
    """For each value of ``key`` (rate, burst, or none) and each peer: the reference server's
    median figure ÷ the peer's median figure, over the repeats."""
    rows = []
    groups = sorted({run.get(key) or 0 for run in runs})
    for group in groups:
        in_group = [run for run in runs if (run.get(key) or 0) == group]
        by_server: dict[str, list[dict[str, Any]]] = {}
        for run in in_group:
            by_server.setdefault(run["server"], []).append(run)
        if reference not in by_server:
            continue
        ours = {
            title: _median([get(run) for run in by_server[reference]]) for title, get in figures
        }
        for peer, peer_runs in by_server.items():
            if peer == reference:
                continue
            row: dict[str, Any] = {key: group, "peer": peer, "repeats": len(peer_runs)}
            for title, get in figures:
                theirs = _median([get(run) for run in peer_runs])
                mine = ours[title]
                row[title] = round(mine / theirs, 2) if mine is not None and theirs else None
                row[f"{title} ({reference})"] = mine
                row[f"{title} (peer)"] = theirs
            rows.append(row)
    return rows


def all_ratios(document: dict[str, Any], reference: str) -> dict[str, list[dict[str, Any]]]:
    runs = document["runs"]
    return {
        "rate": ratios([r for r in runs if r["mode"] == "rate"], reference, "rate", RATE_FIGURES),
        "burst": ratios(
            [r for r in runs if r["mode"] == "burst"], reference, "burst", BURST_FIGURES
        ),
        "idle": ratios(document["idle"], reference, "", IDLE_FIGURES),
    }
