"""A short ``odin-stress chaos`` run (stress/odin_fanout/stress/chaos.py): a real nats-server, the
partition proxy, ``odin serve --workers 2``, the publisher and 40 continuity-checking clients, with
every fault of one cycle overlapping, then SIGTERM. The verdict must hold, and each fault
must show in the run's own event log (and its effect in Odin's log)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from odin_fanout.stress.chaos import FAULTS
from tests.e2e.process import ROOT

pytestmark = [pytest.mark.slow]

DURATION = 45


@pytest.mark.timeout(150)
def test_a_short_chaos_run_keeps_every_invariant_and_every_fault_happens(
    tmp_path: Path,
) -> None:
    result_path = tmp_path / "chaos.json"
    done = subprocess.run(
        [sys.executable, "-m", "odin_fanout.stress", "chaos", "--duration", str(DURATION),
         "--clients", "40", "--rate", "50", "--seed", "3", "--json", str(result_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result_path.exists(), done.stderr[-3000:]
    result = json.loads(result_path.read_text())
    verdict = result["verdict"]
    assert verdict["ok"], (verdict["problems"], done.stdout[-3000:])
    assert done.returncode == 0, done.stdout[-3000:]

    # Every fault was injected, in the run's own event log, and had its effect.
    events = result["events"]
    injected = {e["event"] for e in events}
    assert set(FAULTS) <= injected, injected
    for fault, seen in verdict["faults"].items():
        assert seen["ok"], (fault, seen)
    assert any(e["event"] == "nats_restarted" for e in events)
    assert any(e["event"] == "partition_healed" for e in events)

    # No silent loss, duplicate or reordering for any client that reads; the tail reached.
    reading = result["totals"]["reading"]
    assert reading["events"] > 1_000, reading
    for field in ("lost_silently", "duplicates", "reordered", "bad_recoveries", "bad_frames"):
        assert reading[field] == 0, (field, reading)
    assert reading["reconnects"] > 0, reading  # the storm, the churn, the killed worker
    assert result["totals"]["slow"]["duplicates"] == result["totals"]["slow"]["reordered"] == 0
    # Every fault recovered: each reading client had a fresh event afterwards.
    for recovery in verdict["recovery"]:
        assert recovery["recovered"] == recovery["clients"], recovery
        assert recovery["max_s"] is not None, recovery  # (how long: the run's report)
    # SIGTERM drained Odin, which exited 0.
    assert result["sigterm"]["exit_code"] == 0, result["sigterm"]
