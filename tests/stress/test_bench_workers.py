"""The pure parts of the workers benchmark: reading /metrics, the spread, the run plan."""

from __future__ import annotations

import pytest

from odin_fanout.stress.bench_workers import (
    configurations,
    default_json_path,
    metric_by_worker,
    metric_total,
    parse_metrics,
    shares,
    spread_summary,
    worker_deltas,
)

METRICS = """\
# HELP odin_worker_connections Open WebSocket connections of each worker.
# TYPE odin_worker_connections gauge
odin_worker_connections{worker="1"} 480.0
odin_worker_connections{worker="0"} 520.0
odin_worker_cpu_seconds_total{worker="0"} 1.5
odin_worker_cpu_seconds_total{worker="1"} 2.25
odin_connections_rejected_total{reason="at_capacity"} 2.0
odin_connections_rejected_total{reason="origin"} 1.0
odin_deliveries_total 1.5e+06
odin_odd{path="a\\"b",worker="x"} 3.0
odin_not_a_number NaNish
"""


def test_parse_metrics_reads_names_labels_and_values() -> None:
    samples = parse_metrics(METRICS)
    assert ("odin_deliveries_total", {}, 1.5e6) in samples
    assert ("odin_worker_connections", {"worker": "1"}, 480.0) in samples
    assert ("odin_odd", {"path": 'a\\"b', "worker": "x"}, 3.0) in samples
    assert all(name != "odin_not_a_number" for name, _, _ in samples)


def test_totals_sum_every_series_and_workers_are_by_slot() -> None:
    samples = parse_metrics(METRICS)
    assert metric_total(samples, "odin_connections_rejected_total") == 3.0
    assert metric_total(samples, "odin_missing") == 0.0
    by_worker = metric_by_worker(samples, "odin_worker_connections")
    assert by_worker == {0: 520.0, 1: 480.0}
    assert list(by_worker) == [0, 1]
    assert metric_by_worker(samples, "odin_odd") == {}  # a worker label that is no slot


def test_worker_deltas() -> None:
    before = parse_metrics('odin_worker_cpu_seconds_total{worker="0"} 1.0\n')
    after = parse_metrics(METRICS)
    assert worker_deltas((before, after), "odin_worker_cpu_seconds_total") == [0.5, 2.25]


def test_spread_summary() -> None:
    even = spread_summary([500, 500])
    assert even["max_over_min"] == 1.0
    assert even["max_share"] == 0.5
    skewed = spread_summary([700.0, 200.0, 100.0])
    assert skewed["per_worker"] == [700, 200, 100]
    assert (skewed["min"], skewed["max"], skewed["total"]) == (100, 700, 1000)
    assert skewed["max_over_min"] == 7.0
    assert skewed["max_over_mean"] == pytest.approx(2.1)
    assert skewed["max_share"] == 0.7


def test_spread_summary_with_an_idle_worker_or_none() -> None:
    idle = spread_summary([1000, 0])
    assert idle["min"] == 0
    assert idle["max_over_min"] is None
    assert idle["max_over_mean"] == 2.0
    assert spread_summary([0, 0])["max_share"] is None
    assert spread_summary([])["per_worker"] == []


def test_shares() -> None:
    assert shares([3.0, 1.0]) == [0.75, 0.25]
    assert shares([0.0, 0.0]) == [None, None]


def test_configurations_run_one_worker_once() -> None:
    assert configurations([1, 2, 3], ["shared", "reuseport"]) == [
        (1, "single"),
        (2, "shared"),
        (2, "reuseport"),
        (3, "shared"),
        (3, "reuseport"),
    ]
    assert configurations([2, 1, 2], ["reuseport"]) == [(2, "reuseport"), (1, "single")]


def test_default_json_path_names_the_load() -> None:
    assert default_json_path(1000, [50.0], []).name.endswith("-n1000-rate50.json")
    assert default_json_path(10000, [20.0], [50]).name.endswith("-n10000-burst50.json")
    assert default_json_path(1000, [5.0, 12.5], []).name.endswith("-rate5-12.5.json")
    assert default_json_path(1000, [50.0], []).parent.name == "results"
