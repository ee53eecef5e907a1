"""How many connections this process should accept: from the memory it may use.

A server in a container with 768 MiB must not accept the connections a 24 GiB host could
hold: past its memory limit the kernel kills it and every client reconnects at once. So
unless ``server.max_connections`` is set, the limit is derived at start:

    max_connections = (memory - BASE) * (1 - HEADROOM) / PER_CONNECTION

clamped to [MINIMUM, MAXIMUM] and to the file-descriptor limit less a reserve, where
``memory`` is the cgroup's memory limit (v2 ``memory.max``, else v1
``memory.limit_in_bytes``, the smallest along the process's cgroup path) or, without one, the
machine's memory. PER_CONNECTION is measured: 34.5 KiB of RSS per idle subscribed
connection at 19,900 connections (docs/performance.md), doubled for what a busy connection
adds (queued frames, up to ``connection.queue_max_bytes`` for a slow one) and for the kernel's
socket buffers, which a cgroup charges too. BASE is the process at start (about 70 MiB RSS
with the history window empty) with room for the history to fill.

The CPU limit (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``) is read and reported, not used: one
process uses one core at most, and admission by CPU (the original's) refused clients for
load spikes that a bounded queue absorbs.
"""

from __future__ import annotations

import contextlib
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

    def describe(self) -> dict[str, object]:
        """For the start log and /health."""
        limits = self.limits
        return {
            "max_connections": self.max_connections,
            "source": self.source,
            "bound_by": self.bound_by,
            "memory_limit_bytes": limits.memory_bytes,
            "memory_source": limits.memory_source,
            "cpu_limit_cores": limits.cpu_cores,
            "cpu_source": limits.cpu_source,
            "nofile": limits.nofile,
            "per_connection_bytes": PER_CONNECTION,
        }


def plan(configured: int, limits: Limits) -> Capacity:
    """The connection limit: ``configured`` when it is set (non-zero), else derived."""
    if configured:
        return Capacity(configured, "configured", limits, "")
    candidates = [(MAXIMUM, "maximum")]
    if limits.memory_bytes is not None:
        usable = (limits.memory_bytes - BASE) * (1 - HEADROOM)
        candidates.append((int(usable // PER_CONNECTION), "memory"))
    candidates.append((limits.nofile - FD_RESERVE, "file descriptors"))
    value, bound_by = min(candidates)
    if value < MINIMUM:
        value, bound_by = MINIMUM, "minimum"
    return Capacity(value, "derived", limits, bound_by)


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
