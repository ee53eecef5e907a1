"""The workers of one host share their metrics through files named by worker slot: whichever
worker answers /metrics gives the host's totals, a series per worker carries ``worker``, and
a restarted worker's counters go on from its predecessor's, never back.

Each worker here is a small process of its own (the multiprocess mode changes a process-wide
setting of prometheus-client, which this test process must keep); this process reads the
directory as a worker's /metrics does, without writing to it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from odin_fanout.control.protocol import HostWorkers, WorkerInfo
from odin_fanout.metrics import Metrics, Shared, forget_worker
from tests.e2e.process import ROOT

WORKER = """
import sys, time
from pathlib import Path
from odin_fanout.metrics import Metrics, Shared, share_between_workers

directory = Path(sys.argv[1])
slot, clients, stream = (int(argument) for argument in sys.argv[2:5])
share_between_workers(directory, slot)
metrics = Metrics(Shared(directory, slot, lambda: None))
metrics.watch_queues(lambda: [(0, None)] * clients, time.monotonic)
metrics.connections.inc(clients)
metrics.connections_active.inc(clients)
metrics.deliveries.inc(10 * clients)
metrics.publications.inc(stream)
metrics.closed["client"].inc()
sum(range(200_000))  # some CPU time to count
metrics.sync()
"""


def run_worker(directory: Path, slot: int, clients: int, stream: int) -> None:
    """A worker's life: it counts ``clients`` connections and 10 deliveries each, and
    ``stream`` publications read from the stream, then ends (its files stay, as after a
    SIGKILL)."""
    subprocess.run(
        [sys.executable, "-c", WORKER, str(directory), str(slot), str(clients), str(stream)],
        cwd=ROOT, check=True, timeout=60, capture_output=True,
    )  # fmt: skip


def host(restarts: int = 0) -> HostWorkers:
    return HostWorkers(
        expected=2,
        supervisor_pid=1,
        started_at=0.0,
        workers=[WorkerInfo(0, "up", 100), WorkerInfo(1, "up", 101, restarts=restarts)],
    )


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(directory: Path, restarts: int = 0) -> Samples:
    """/metrics as any worker of the host renders it."""
    body, content_type = Metrics(Shared(directory, 0, lambda: host(restarts))).render(None)
    assert content_type.startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def per_worker(samples: Samples, name: str) -> dict[str, float]:
    return {dict(labels)["worker"]: value for (n, labels), value in samples.items() if n == name}


def test_whichever_worker_answers_gives_the_hosts_totals(tmp_path: Path) -> None:
    run_worker(tmp_path, 0, clients=3, stream=100)
    run_worker(tmp_path, 1, clients=5, stream=98)
    samples = scrape(tmp_path)
    # Counters and gauges of the host: summed over its workers.
    assert samples[("odin_connections_total", ())] == 8
    assert samples[("odin_deliveries_total", ())] == 80
    assert samples[("odin_connections_closed_total", (("reason", "client"),))] == 2
    assert samples[("odin_connections_active", ())] == 8
    # Every worker reads the whole stream: the host read it once, as far as the furthest.
    assert samples[("odin_publications_received_total", ())] == 100
    # A series per worker, labelled with its slot (never the library's pid label).
    assert per_worker(samples, "odin_worker_connections") == {"0": 3, "1": 5}
    cpu = per_worker(samples, "odin_worker_cpu_seconds_total")
    assert cpu.keys() == {"0", "1"} and all(seconds > 0 for seconds in cpu.values())
    assert per_worker(samples, "odin_worker_resident_memory_bytes").keys() == {"0", "1"}
    assert not any("pid" in dict(labels) for _, labels in samples)
    # What the supervisor publishes.
    assert samples[("odin_workers_expected", ())] == 2
    assert samples[("odin_workers_up", ())] == 2
    assert per_worker(samples, "odin_worker_restarts_total") == {"0": 0, "1": 0}


def test_a_restarted_worker_goes_on_from_its_predecessors_counts(tmp_path: Path) -> None:
    run_worker(tmp_path, 0, clients=3, stream=100)
    run_worker(tmp_path, 1, clients=5, stream=100)
    before = scrape(tmp_path)
    files = sorted(path.name for path in tmp_path.glob("*.db"))
    # Worker 1 dies: the supervisor forgets its gauges, its counters stay.
    forget_worker(tmp_path, 1)
    down = scrape(tmp_path)
    assert down[("odin_connections_active", ())] == 3
    assert per_worker(down, "odin_worker_connections") == {"0": 3}
    assert down[("odin_connections_total", ())] == 8
    assert down[("odin_deliveries_total", ())] == 80
    # Its successor in the same slot counts on from there.
    run_worker(tmp_path, 1, clients=2, stream=7)
    after = scrape(tmp_path, restarts=1)
    assert after[("odin_connections_total", ())] == 10
    assert after[("odin_publications_received_total", ())] == 107
    assert after[("odin_deliveries_total", ())] == 100
    assert after[("odin_connections_active", ())] == 5
    assert per_worker(after, "odin_worker_connections") == {"0": 3, "1": 2}
    cpu_before = per_worker(before, "odin_worker_cpu_seconds_total")
    cpu_after = per_worker(after, "odin_worker_cpu_seconds_total")
    assert cpu_after["1"] > cpu_before["1"] and cpu_after["0"] == cpu_before["0"]
    assert per_worker(after, "odin_worker_restarts_total") == {"0": 0, "1": 1}
    # Files named by slot, not pid: the directory does not grow with restarts.
    assert sorted(path.name for path in tmp_path.glob("*.db")) == files
    assert all(name.endswith(("_0.db", "_1.db")) for name in files)
