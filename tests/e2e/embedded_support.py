"""Helpers for the embedded nats-server tests: find (and, after a test, stop) the nats-server
processes that run on a test's own data directory."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def nats_servers_under(directory: Path) -> list[int]:
    """The pids of live nats-server processes whose command line names a path in
    ``directory`` (a zombie has no command line)."""
    needle = str(directory).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"nats-server" in command and needle in command:
            pids.append(int(entry.name))
    return pids


def in_process_table(pid: int) -> bool:
    """Whether ``pid`` is still an entry of the process table: running, or a zombie that no
    one has reaped."""
    return Path(f"/proc/{pid}").exists()


def running(pid: int, directory: Path) -> bool:
    return pid in nats_servers_under(directory)


def wait_until_gone(pid: int, directory: Path, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while running(pid, directory):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)  # another process: polled, bounded
    return True


def kill_leftovers(directory: Path) -> list[int]:
    """SIGKILL what a failed test left running on its own directory; the pids killed."""
    pids = nats_servers_under(directory)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids


def stopped(pid: int) -> bool:
    """Whether the process is stopped (SIGSTOP has taken effect: it is not immediate)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
