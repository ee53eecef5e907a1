"""``odin-stress soak`` (stress/odin_fanout/stress/soak.py): its arithmetic, and a short run against
a real server."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from odin_fanout.stress.soak import mixed_channels, parse_duration, slope_per_hour, summarize
from tests.e2e.process import ROOT


def test_durations_read_as_seconds() -> None:
    assert parse_duration("90") == 90
    assert parse_duration("90s") == 90
    assert parse_duration("20m") == 1200
    assert parse_duration("1.5h") == 5400
    for bad in ("", "0", "2d", "-1m", "h"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_duration(bad)


def test_the_slope_is_per_hour_and_needs_three_points() -> None:
    assert slope_per_hour([(0, 10), (1800, 15), (3600, 20)]) == pytest.approx(10)
    assert slope_per_hour([(0, 5), (60, 5), (120, 5)]) == 0
    assert slope_per_hour([(0, 1), (60, 2)]) is None


def test_the_summary_leaves_the_warmup_out_of_the_slopes() -> None:
    latency = {"p50": 1.0, "p90": 2.0, "p99": 3.0, "max": 4.0}
    samples = [
        # A jump during the warm-up, then flat: no growth.
        {"t": float(t), "rss_bytes": (100 if t >= 60 else 50) * 2**20, "fds": 10,
         "threads": 1, "latency_ms": latency}
        for t in range(10, 610, 10)
    ]  # fmt: skip
    summary = summarize(samples, warmup=60)
    assert summary["rss_mib_per_hour"] == 0
    assert summary["fds_per_hour"] == 0
    assert summary["rss_mib"]["first"] == summary["rss_mib"]["last"] == 100
    assert len(summary["latency_by_tenth"]) == 10
    assert summary["latency_by_tenth"][0]["p99_ms"] == 3.0


def test_the_mix_has_patterns_and_concrete_channels_that_never_overlap() -> None:
    mixes = [mixed_channels(i) for i in range(40)]
    assert ["*.trade"] in mixes
    assert ["BTC.*", "ETH.trade"] in mixes
    for channels in mixes:
        assert len(set(channels)) == len(channels)
        assert not ("*.trade" in channels and len(channels) > 1)


@pytest.mark.slow
def test_a_short_soak_samples_the_server_and_keeps_every_stream(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, "-m", "odin_fanout.stress", "soak", "--duration", "8s", "--interval", "2",
         "--clients", "60", "--rate", "20", "--churn", "0.05", "--quiet", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(out.read_text())
    samples = document["samples"]
    assert len(samples) >= 3  # one every 2 s over 8 s; a busy machine may fit one fewer
    for sample in samples:
        assert sample["rss_bytes"] > 0
        assert sample["fds"] > 60  # a socket per client, and the server's own
        assert sample["threads"] >= 1
        assert "queued_frames" in sample
        assert "queue_le_+Inf" in sample
    summary = document["summary"]
    assert summary["continuity"]["violations"] == 0
    assert summary["continuity"]["events"] > 0
    assert summary["churned"] > 0
    assert summary["continuity"]["recoveries"] == summary["continuity"]["recovered"] > 0
    assert summary["latency_ms"]["p50"] is not None
    assert summary["unexpected_closes"] == 0
    assert document["server"]["exit_code"] == 0
