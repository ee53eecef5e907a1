"""What the benchmarks read from /proc: a process's CPU time, memory and open files, each
CPU's times, and the machine's load. Shared by ``bench_fanout``, ``bench_ingest`` and
``bench_workers``; Linux only."""

from __future__ import annotations

import os
import time
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` (all its threads), or None once it has gone."""
    try:
        return proc_cpu_seconds(pid)
    except (OSError, IndexError):
        return None


def proc_memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` from /proc/PID/status, in KiB."""
    memory = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            memory[name] = int(value.split()[0])
    return memory


def count_fds(pid: int) -> int | None:
    """Files ``pid`` holds open, or None if /proc does not say."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def core_times() -> dict[str, list[int]]:
    """Per-CPU jiffies from /proc/stat: user nice system idle iowait irq softirq steal."""
    cores = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *values = line.split()
            cores[name] = [int(value) for value in values[:8]]
    return cores


def cpu_busy_s(cpu: int) -> float:
    """Seconds CPU ``cpu`` has been busy (everything on it: user, nice, system, irq, softirq,
    steal), or 0.0 if /proc/stat does not list it."""
    values = core_times().get(f"cpu{cpu}")
    if values is None:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def core_usage(
    before: dict[str, list[int]], after: dict[str, list[int]], cpus: list[int]
) -> dict[str, dict[str, float]]:
    """Busy, softirq and steal time of each of ``cpus`` between two ``core_times``, in %."""
    usage = {}
    for cpu in cpus:
        name = f"cpu{cpu}"
        if name not in before or name not in after:
            continue
        delta = [b - a for a, b in zip(before[name], after[name], strict=True)]
        total = sum(delta) or 1
        usage[name] = {
            "busy_pct": round(100 * (total - delta[3] - delta[4]) / total, 1),
            "softirq_pct": round(100 * delta[6] / total, 1),
            "steal_pct": round(100 * delta[7] / total, 1),
        }
    return usage


def foreign_cpu_pct(
    before: dict[str, list[int]], after: dict[str, list[int]], ours_s: float, wall: float
) -> float:
    """CPU used on the whole machine by anything but our processes and softirq, in % of a core.

    Busy time (user, nice, system, irq, steal excluded) of every CPU, minus the CPU time of the
    processes we measure and minus softirq time (loopback TCP work, which is partly ours).
    """
    busy = 0
    for name, values in after.items():
        delta = [b - a for a, b in zip(before.get(name, values), values, strict=True)]
        busy += delta[0] + delta[1] + delta[2] + delta[5]
    return round(max(0.0, 100 * (busy / CLOCK_TICKS - ours_s) / wall), 1)


def wait_quiet(limit_pct: float, max_wait: float) -> dict[str, float]:
    """Wait (at most ``max_wait`` s) until the machine's CPU use over 1 s is below the limit."""
    started = time.monotonic()
    while True:
        before = core_times()
        time.sleep(1.0)
        load = foreign_cpu_pct(before, core_times(), 0.0, 1.0)
        waited = time.monotonic() - started
        if load < limit_pct or waited >= max_wait:
            return {"waited_s": round(waited, 1), "machine_cpu_pct_before": load}


class Sample:
    """CPU and wall clock of some processes (name: PID) at one instant, and every CPU's times."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.wall = time.monotonic()
        self.cpu = {name: proc_cpu_seconds(pid) for name, pid in pids.items()}
        self.cores = core_times()

    def cpu_pct(self, later: Sample, name: str) -> float:
        return round(100 * (later.cpu[name] - self.cpu[name]) / (later.wall - self.wall), 1)
