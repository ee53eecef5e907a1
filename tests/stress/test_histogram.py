"""Latency percentiles as the stress tool reports them: within 0.1 % of the exact
nearest-rank percentile, the same whether recorded in one process or merged from several."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from odin_fanout.stress.histogram import HIGHEST_US, Latency

latencies = st.lists(st.integers(0, 10_000_000), min_size=1, max_size=400)


def exact_ms(values: list[int], percentile: float) -> float:
    """Nearest rank: the smallest value with at least ``percentile`` % at or below it."""
    ordered = sorted(values)
    rank = max(1, math.ceil(percentile / 100 * len(ordered)))
    return ordered[rank - 1] / 1000


def close(reported: float | None, exact: float) -> bool:
    assert reported is not None
    return abs(reported - exact) <= max(0.001, exact * 0.001)  # 3 significant digits


@settings(deadline=None)
@given(latencies)
def test_percentiles_match_the_exact_ones(values: list[int]) -> None:
    latency = Latency()
    for value in values:
        latency.record_us(value)
    summary = latency.summary_ms()
    assert latency.count == len(values)
    for name, percentile in (("p50", 50), ("p90", 90), ("p99", 99), ("p99.9", 99.9)):
        assert close(summary[name], exact_ms(values, percentile)), name
    assert close(summary["max"], max(values) / 1000)


@settings(max_examples=40, deadline=None)
@given(st.lists(latencies, min_size=1, max_size=5))
def test_merging_encoded_histograms_equals_recording_in_one(parts: list[list[int]]) -> None:
    whole = Latency()
    merged = Latency()
    for part in parts:
        worker = Latency()
        for value in part:
            worker.record_us(value)
            whole.record_us(value)
        merged.merge(worker.encode())
    assert merged.count == whole.count
    assert merged.summary_ms() == whole.summary_ms()


def test_out_of_range_values_are_clamped_and_nothing_recorded_reports_none() -> None:
    latency = Latency()
    assert latency.summary_ms() == {"p50": None, "p90": None, "p99": None, "p99.9": None,
                                    "max": None}  # fmt: skip
    latency.record_us(-5)  # a clock step: counts as 0
    latency.record_us(HIGHEST_US * 10)
    summary = latency.summary_ms()
    assert summary["p50"] == 0.0
    assert close(summary["max"], HIGHEST_US / 1000)
