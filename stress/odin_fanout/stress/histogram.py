"""Latency distributions that several processes record and one merges: HdrHistogram.

Values are microseconds from 0 to 10 minutes, kept to 3 significant digits (0.1 %), so the
percentiles a run reports (p50, p90, p99, p99.9, max) are exact to well under the
millisecond resolution of the timestamps they come from, whatever the count. A histogram
crosses a process boundary as HdrHistogram's compressed encoding.
"""

from __future__ import annotations

import math

from hdrh.histogram import HdrHistogram

HIGHEST_US = 600_000_000
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


class Latency:
    __slots__ = ("_histogram",)

    def __init__(self) -> None:
        self._histogram = HdrHistogram(1, HIGHEST_US, 3)

    def record_us(self, value: int) -> None:
        """Record one latency; negative ones (clock steps) count as 0, huge ones as the cap."""
        self._histogram.record_value(min(max(value, 0), HIGHEST_US))

    @property
    def count(self) -> int:
        return int(self._histogram.get_total_count())

    def encode(self) -> str:
        return bytes(self._histogram.encode()).decode()

    def merge(self, encoded: str) -> None:
        self._histogram.decode_and_add(encoded.encode())

    def add(self, other: Latency) -> None:
        self._histogram.add(other._histogram)

    def summary_ms(self) -> dict[str, float | None]:
        """p50, p90, p99, p99.9 and max in milliseconds (None when nothing was recorded)."""
        histogram = self._histogram
        total = self.count
        if not total:
            return {"p50": None, "p90": None, "p99": None, "p99.9": None, "max": None}
        highest = histogram.get_max_value()
        # Nearest rank: the smallest value with at least p % of the samples at or below it
        # (HdrHistogram's own rounds the rank, which reads low on small samples).
        targets = [(p, max(1, math.ceil(p / 100 * total))) for p in PERCENTILES]
        result: dict[str, float | None] = {}
        cumulative = 0
        for item in histogram.get_recorded_iterator():
            cumulative += item.count_at_value_iterated_to
            while targets and cumulative >= targets[0][1]:
                percentile, _ = targets.pop(0)
                value = histogram.get_highest_equivalent_value(item.value_iterated_to)
                result[f"p{percentile:g}"] = min(value, highest) / 1000
            if not targets:
                break
        result["max"] = highest / 1000
        return result
