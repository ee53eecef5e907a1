"""How many connections this process should accept: from the memory it may use.

A server in a container with 768 MiB must not accept the connections a 24 GiB host could
hold: past its memory limit the kernel kills it and every client reconnects at once. So
unless ``server.max_connections`` is set, the limit is derived at start:

    max_connections = (memory - (BASE + history.max_bytes)) * (1 - HEADROOM) / PER_CONNECTION

clamped to [MINIMUM, MAXIMUM] and to the file-descriptor limit less a reserve, where
``memory`` is the cgroup's memory limit (v2 ``memory.max``, else v1
``memory.limit_in_bytes``, the smallest along the process's cgroup path) or, without one, the
machine's memory. PER_CONNECTION is measured: 34.5 KiB of RSS per idle subscribed
connection at 19,900 connections (docs/performance.md), doubled for what a busy connection
adds (queued frames, up to ``connection.queue_max_bytes`` for a slow one) and for the kernel's
socket buffers, which a cgroup charges too. BASE is the process at start (about 70 MiB RSS
with the history window empty) with room for what else grows (the subscription index, the
broker's buffers, the allocator's slack); ``history.max_bytes`` is the bound of the history
window, which every process keeps whole, so it counts in full.

With ``--workers N`` the memory is the host's: the limit above, with BASE and the history
window counted once per worker, is the host's total, and each worker takes its share (the
first ``total % N`` one more); the file-descriptor limit is per process and bounds each
worker's share by itself.

The CPU limit (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``) is not used for admission (admission
by CPU, the original's, refused clients for load spikes that a bounded queue absorbs); with the
CPU affinity it decides how many workers ``server.workers = 0`` starts (``usable_cpus``).
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
from pathlib import Path

import attrs

KIB = 1024
MIB = 1024 * KIB
PER_CONNECTION = 64 * KIB
BASE = 128 * MIB
HEADROOM = 0.2
MINIMUM = 100
MAXIMUM = 100_000
FD_RESERVE = 64
"""Descriptors kept for NATS, the listener, logs, the control socket and consoles."""
_UNLIMITED_V1 = 1 << 60
"""cgroup v1 reports 'no limit' as a huge number (PAGE_COUNTER_MAX pages)."""


@attrs.frozen
class Limits:
    """What the process may use, and where each figure came from."""

    memory_bytes: int | None
    memory_source: str
    """``cgroup v2``, ``cgroup v1``, ``machine``, or ``unknown``."""
    cpu_cores: float | None
    cpu_source: str
    """``cgroup v2``, ``cgroup v1``, or ``none`` (no quota: every core of the machine)."""
    nofile: int
    """The soft limit on open files: one per connection, at least."""


@attrs.frozen
class Capacity:
    max_connections: int
    source: str
    """``configured`` (server.max_connections) or ``derived`` (from the limits)."""
    limits: Limits
    bound_by: str
    """What set a derived limit: ``memory``, ``file descriptors``, ``minimum`` or
    ``maximum``; empty when configured."""
    host_max_connections: int = 0
    """The host's total over every worker (this process's limit when it runs alone)."""
    workers: int = 1
    history_bytes: int = 0
    """The history window's bound (``history.max_bytes``) a derived limit left room for in
    each process."""

    def describe(self) -> dict[str, object]:
        """For the start log and /health."""
        limits = self.limits
        return {
            "max_connections": self.max_connections,
            "host_max_connections": self.host_max_connections or self.max_connections,
            "workers": self.workers,
            "source": self.source,
            "bound_by": self.bound_by,
            "memory_limit_bytes": limits.memory_bytes,
            "memory_source": limits.memory_source,
            "cpu_limit_cores": limits.cpu_cores,
            "cpu_source": limits.cpu_source,
            "nofile": limits.nofile,
            "per_connection_bytes": PER_CONNECTION,
            "history_max_bytes": self.history_bytes,
        }


def plan(
    configured: int, limits: Limits, *, history_bytes: int, workers: int = 1, slot: int = 0
) -> Capacity:
    """The connection limit of worker ``slot`` of ``workers`` (of the process when it runs
    alone): its share of ``configured`` (the host's total) when that is set (non-zero), else
    derived from the limits, leaving each process ``history_bytes`` for its history window
    (``history.max_bytes``)."""
    if configured:
        value = share(configured, workers, slot)
        return Capacity(value, "configured", limits, "", configured, workers, history_bytes)
    value, bound_by = _derived(limits, history_bytes, workers, slot)
    total = sum(_derived(limits, history_bytes, workers, other)[0] for other in range(workers))
    return Capacity(value, "derived", limits, bound_by, total, workers, history_bytes)


def _derived(limits: Limits, history_bytes: int, workers: int, slot: int) -> tuple[int, str]:
    candidates = [(share(MAXIMUM, workers, slot), "maximum")]
    if limits.memory_bytes is not None:
        usable = (limits.memory_bytes - (BASE + history_bytes) * workers) * (1 - HEADROOM)
        candidates.append((share(int(usable // PER_CONNECTION), workers, slot), "memory"))
    candidates.append((limits.nofile - FD_RESERVE, "file descriptors"))
    value, bound_by = min(candidates)
    if value < MINIMUM:
        value, bound_by = MINIMUM, "minimum"
    return value, bound_by


def share(total: int, workers: int, slot: int) -> int:
    """Worker ``slot``'s part of ``total``: the parts differ by at most one and add up."""
    return max(0, total) // workers + (1 if slot < max(0, total) % workers else 0)


def usable_cpus() -> int:
    """The cores this process may use: its CPU affinity, capped by its cgroup's quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = read_limits().cpu_cores
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


# ---- reading the limits ----------------------------------------------------------------------


def read_limits(root: Path = Path("/")) -> Limits:
    """The limits of this process, read under ``root`` (tests pass a fake tree)."""
    memory, memory_source = _cgroup_memory(root)
    if memory is None:
        memory = _machine_memory(root)
        memory_source = "machine" if memory is not None else "unknown"
    cpu, cpu_source = _cgroup_cpu(root)
    return Limits(memory, memory_source, cpu, cpu_source, _nofile())


def _nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return hard if hard != resource.RLIM_INFINITY else MAXIMUM + FD_RESERVE
    return int(soft)


def _read(path: Path) -> str | None:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return path.read_text().strip()
    return None


def _own_cgroups(root: Path) -> dict[str, str]:
    """This process's cgroup path per controller ("" is the v2 unified hierarchy)."""
    found: dict[str, str] = {}
    text = _read(root / "proc/self/cgroup") or ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for controller in controllers.split(",") if controllers else [""]:
            found[controller] = path
    return found


def _along(base: Path, cgroup_path: str) -> list[Path]:
    """The directories from the process's cgroup up to the hierarchy's root: a limit set on
    a parent (a systemd slice, a pod) binds too. Inside a container the path is usually "/"."""
    directories = [base]
    current = base
    for part in (p for p in cgroup_path.split("/") if p):
        current = current / part
        directories.append(current)
    return [directory for directory in directories if directory.is_dir()]


def _cgroup_memory(root: Path) -> tuple[int | None, str]:
    groups = _own_cgroups(root)
    unified = root / "sys/fs/cgroup"
    if (unified / "cgroup.controllers").exists():
        limits = [
            int(text)
            for directory in _along(unified, groups.get("", "/"))
            if (text := _read(directory / "memory.max")) and text.isdigit()
        ]
        return (min(limits), "cgroup v2") if limits else (None, "")
    v1 = unified / "memory"
    limits = [
        int(text)
        for directory in _along(v1, groups.get("memory", "/"))
        if (text := _read(directory / "memory.limit_in_bytes"))
        and text.isdigit()
        and int(text) < _UNLIMITED_V1
    ]
    return (min(limits), "cgroup v1") if limits else (None, "")


def _cgroup_cpu(root: Path) -> tuple[float | None, str]:
    groups = _own_cgroups(root)
    unified = root / "sys/fs/cgroup"
    cores: list[float] = []
    if (unified / "cgroup.controllers").exists():
        for directory in _along(unified, groups.get("", "/")):
            quota, _, period = (_read(directory / "cpu.max") or "max").partition(" ")
            if quota.isdigit() and period.isdigit() and int(period):
                cores.append(int(quota) / int(period))
        return (min(cores), "cgroup v2") if cores else (None, "none")
    for name in ("cpu,cpuacct", "cpu"):
        v1 = unified / name
        if not v1.is_dir():
            continue
        for directory in _along(v1, groups.get("cpu", "/")):
            quota = _read(directory / "cpu.cfs_quota_us") or "-1"
            period = _read(directory / "cpu.cfs_period_us") or "0"
            if quota.isdigit() and period.isdigit() and int(period):
                cores.append(int(quota) / int(period))
        break
    return (min(cores), "cgroup v1") if cores else (None, "none")


def _machine_memory(root: Path) -> int | None:
    for line in (_read(root / "proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            with contextlib.suppress(ValueError, IndexError):
                return int(line.split()[1]) * KIB
    return None


def rss_bytes() -> int | None:
    """This process's resident memory, from /proc (None where there is no /proc)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
