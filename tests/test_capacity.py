"""The default connection limit comes from the memory the process may use: cgroup v2 or v1
files (here fake trees), else the machine's memory; the result shows in /health, the metric
and the start log."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from odin_fanout.capacity import (
    BASE,
    FD_RESERVE,
    MAXIMUM,
    MIB,
    MINIMUM,
    PER_CONNECTION,
    Limits,
    plan,
    read_limits,
    share,
    usable_cpus,
)
from odin_fanout.config import HistorySection
from tests.helpers import capture_logs, http_get, make_config, running_server

GIB = 1024 * MIB
HISTORY = HistorySection().max_bytes
"""The default history.max_bytes, 64 MiB."""


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


MEMINFO = {"proc/meminfo": "MemTotal:       16384000 kB\nMemFree:  1 kB\n"}


def test_cgroup_v2_memory_and_cpu_limits(tmp_path: Path) -> None:
    root = tree(tmp_path, {
        **MEMINFO,
        "proc/self/cgroup": "0::/\n",
        "sys/fs/cgroup/cgroup.controllers": "cpu memory pids",
        "sys/fs/cgroup/memory.max": str(768 * MIB),
        "sys/fs/cgroup/cpu.max": "150000 100000",
    })  # fmt: skip
    limits = read_limits(root)
    assert (limits.memory_bytes, limits.memory_source) == (768 * MIB, "cgroup v2")
    assert (limits.cpu_cores, limits.cpu_source) == (1.5, "cgroup v2")


def test_cgroup_v2_takes_the_smallest_limit_along_the_path(tmp_path: Path) -> None:
    root = tree(tmp_path, {
        **MEMINFO,
        "proc/self/cgroup": "0::/system.slice/odin.service\n",
        "sys/fs/cgroup/cgroup.controllers": "memory",
        "sys/fs/cgroup/memory.max": "max",
        "sys/fs/cgroup/system.slice/memory.max": str(1 * GIB),
        "sys/fs/cgroup/system.slice/odin.service/memory.max": "max",
        "sys/fs/cgroup/system.slice/odin.service/cpu.max": "max 100000",
    })  # fmt: skip
    limits = read_limits(root)
    assert (limits.memory_bytes, limits.memory_source) == (1 * GIB, "cgroup v2")
    assert (limits.cpu_cores, limits.cpu_source) == (None, "none")


def test_no_cgroup_limit_falls_back_to_the_machine(tmp_path: Path) -> None:
    root = tree(tmp_path, {
        **MEMINFO,
        "proc/self/cgroup": "0::/\n",
        "sys/fs/cgroup/cgroup.controllers": "memory",
        "sys/fs/cgroup/memory.max": "max",
    })  # fmt: skip
    limits = read_limits(root)
    assert (limits.memory_bytes, limits.memory_source) == (16384000 * 1024, "machine")


def test_cgroup_v1_limits_and_its_unlimited_value(tmp_path: Path) -> None:
    root = tree(tmp_path, {
        **MEMINFO,
        "proc/self/cgroup": "4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n",
        "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712",
        "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes": str(512 * MIB),
        "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000",
        "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
    })  # fmt: skip
    limits = read_limits(root)
    assert (limits.memory_bytes, limits.memory_source) == (512 * MIB, "cgroup v1")
    assert (limits.cpu_cores, limits.cpu_source) == (0.5, "cgroup v1")
    unlimited = tree(tmp_path / "u", {
        **MEMINFO,
        "proc/self/cgroup": "4:memory:/\n",
        "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712",
        "sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1",
        "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000",
    })  # fmt: skip
    limits = read_limits(unlimited)
    assert limits.memory_source == "machine"
    assert limits.cpu_source == "none"


def limits(memory: int | None, nofile: int = 1_000_000) -> Limits:
    return Limits(memory, "cgroup v2", None, "none", nofile)


@pytest.mark.parametrize(
    ("memory", "nofile", "expected", "bound_by"),
    [
        # (768 MiB - (128 MiB + 64 MiB)) * 0.8 / 64 KiB: the original's compose gave ws-go 768 MiB
        (768 * MIB, 1_000_000, 7372, "memory"),
        (512 * MIB, 1_000_000, 4096, "memory"),
        (24 * GIB, 1_000_000, MAXIMUM, "maximum"),
        (24 * GIB, 20_000, 20_000 - FD_RESERVE, "file descriptors"),
        (100 * MIB, 1_000_000, MINIMUM, "minimum"),
    ],
)
def test_the_derived_limit(memory: int, nofile: int, expected: int, bound_by: str) -> None:
    capacity = plan(0, limits(memory, nofile), history_bytes=HISTORY)
    assert (capacity.max_connections, capacity.bound_by, capacity.source) == (
        expected, bound_by, "derived"
    )  # fmt: skip
    if bound_by == "memory":
        assert expected == int((memory - (BASE + HISTORY)) * 0.8 // PER_CONNECTION)


def test_a_configured_limit_wins() -> None:
    capacity = plan(2000, limits(256 * MIB), history_bytes=HISTORY)
    assert (capacity.max_connections, capacity.source, capacity.bound_by) == (
        2000, "configured", ""
    )  # fmt: skip


@pytest.mark.parametrize("workers", [1, 2, 3, 7, 16])
@pytest.mark.parametrize("total", [0, 1, 5, 100, 1001, 100_000])
def test_the_shares_of_the_workers_add_up_to_the_host_total(total: int, workers: int) -> None:
    shares = [share(total, workers, slot) for slot in range(workers)]
    assert sum(shares) == total
    assert max(shares) - min(shares) <= 1
    assert shares == sorted(shares, reverse=True)  # the first ones take one more


def test_a_configured_limit_is_the_hosts_and_each_worker_takes_its_share() -> None:
    capacities = [
        plan(1001, limits(256 * MIB), history_bytes=HISTORY, workers=2, slot=slot)
        for slot in (0, 1)
    ]
    assert [c.max_connections for c in capacities] == [501, 500]
    for capacity in capacities:
        assert (capacity.source, capacity.host_max_connections, capacity.workers) == (
            "configured", 1001, 2
        )  # fmt: skip
        described = capacity.describe()
        assert (described["host_max_connections"], described["workers"]) == (1001, 2)


def test_a_derived_limit_counts_the_base_once_per_worker() -> None:
    memory = 768 * MIB
    host = int((memory - 2 * (BASE + HISTORY)) * 0.8 // PER_CONNECTION)  # 4915
    capacities = [
        plan(0, limits(memory), history_bytes=HISTORY, workers=2, slot=slot) for slot in (0, 1)
    ]
    assert [c.max_connections for c in capacities] == [share(host, 2, 0), share(host, 2, 1)]
    assert all(c.host_max_connections == host for c in capacities)
    assert all((c.source, c.bound_by) == ("derived", "memory") for c in capacities)
    # Fewer than one worker alone could hold: each worker's base takes its memory.
    assert host < plan(0, limits(memory), history_bytes=HISTORY).max_connections


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_the_history_window_bound_is_subtracted_once_per_worker(workers: int) -> None:
    memory = 4 * GIB
    window = 256 * MIB
    without = plan(0, limits(memory), history_bytes=0, workers=workers)
    with_window = plan(0, limits(memory), history_bytes=window, workers=workers)
    expected = int((memory - (BASE + window) * workers) * 0.8 // PER_CONNECTION)
    assert with_window.host_max_connections == expected
    # Each worker's window costs the connections its bytes would have held.
    lost = without.host_max_connections - with_window.host_max_connections
    assert abs(lost - int(workers * window * 0.8 // PER_CONNECTION)) <= 1
    assert with_window.describe()["history_max_bytes"] == window
    # A configured limit is not derived: the window does not change it, but is reported.
    configured = plan(5000, limits(memory), history_bytes=window, workers=workers)
    assert configured.host_max_connections == 5000
    assert configured.describe()["history_max_bytes"] == window


def test_the_descriptor_limit_bounds_each_worker_by_itself() -> None:
    # The soft limit on open files is per process: each worker may hold that many.
    nofile = 2000
    capacities = [
        plan(0, limits(24 * GIB, nofile), history_bytes=HISTORY, workers=2, slot=s) for s in (0, 1)
    ]
    assert [c.max_connections for c in capacities] == [nofile - FD_RESERVE] * 2
    assert all(c.bound_by == "file descriptors" for c in capacities)
    assert capacities[0].host_max_connections == 2 * (nofile - FD_RESERVE)
    # The maximum is the host's, shared.
    capacities = [
        plan(0, limits(24 * GIB), history_bytes=HISTORY, workers=3, slot=s) for s in range(3)
    ]
    assert sum(c.max_connections for c in capacities) == MAXIMUM
    assert all(c.bound_by == "maximum" for c in capacities)


def test_each_worker_keeps_the_minimum_however_little_memory() -> None:
    capacities = [
        plan(0, limits(200 * MIB), history_bytes=HISTORY, workers=4, slot=s) for s in range(4)
    ]
    assert [c.max_connections for c in capacities] == [MINIMUM] * 4
    assert capacities[0].host_max_connections == 4 * MINIMUM
    assert capacities[0].bound_by == "minimum"


def test_usable_cores_are_the_affinity_capped_by_the_quota() -> None:
    cores = usable_cpus()
    assert 1 <= cores <= len(os.sched_getaffinity(0))
    quota = read_limits().cpu_cores
    if quota is not None:
        assert cores <= max(1, math.ceil(quota))


@pytest.mark.trio
async def test_the_limit_shows_in_health_metrics_and_the_start_log() -> None:
    with capture_logs() as logs:
        async with running_server(make_config()) as harness:
            capacity = harness.server.context.registry.capacity
            assert capacity.source == "derived"
            status, _, body = await http_get(harness.port, "/health")
            check = json.loads(body)["checks"]["capacity"]
            assert check["max"] == capacity.max_connections
            assert check["source"] == "derived"
            assert check["memory_source"] in {"cgroup v2", "cgroup v1", "machine"}
            assert check["history_max_bytes"] == harness.server.context.config.history.max_bytes
            _, _, metrics = await http_get(harness.port, "/metrics")
            assert f"odin_connections_max {float(capacity.max_connections)}" in metrics.decode()
            await trio.lowlevel.checkpoint()
    started = [log for log in logs if log["event"] == "capacity"]
    assert started and started[0]["max_connections"] == capacity.max_connections
    assert status == 200
