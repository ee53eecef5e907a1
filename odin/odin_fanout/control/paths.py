"""Where control sockets live: one per server process, all in one directory per user.

``odin serve`` creates ``<dir>/odin-<pid>.sock`` (mode 0600) in a directory of mode 0700;
``odin-console`` with no arguments attaches to every socket it finds there, so several server
processes on one host are one command away. The directory is ``$XDG_RUNTIME_DIR/odin`` when the
session has a runtime directory (systemd's ``RuntimeDirectory=`` sets it for a service), else
``/tmp/odin-<uid>``.

The pid in the name says whose a socket is. A killed process cannot remove its socket; when
nobody listens on one, whether that pid still runs tells a server gone (the file is left
over) from one not answering (``owner_running``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

SUFFIX = ".sock"
_NAMED_BY_PID = re.compile(r"odin-(\d+)\.sock")
_START_SLACK = 2.0
"""Seconds of doubt when comparing a process's start with a socket's creation: the boot time
that start is counted from is known to the second."""


def default_directory(environ: dict[str, str] | None = None, uid: int | None = None) -> Path:
    environ = dict(os.environ) if environ is None else environ
    runtime = environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "odin"
    return Path("/tmp") / f"odin-{os.getuid() if uid is None else uid}"


def socket_name(pid: int) -> str:
    return f"odin-{pid}{SUFFIX}"


def find_sockets(directory: Path) -> list[Path]:
    """The control sockets in ``directory``, oldest process first (by file age)."""
    try:
        found = [path for path in directory.iterdir() if path.name.endswith(SUFFIX)]
    except OSError:
        return []

    def created(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:
            return 0.0

    return sorted(found, key=created)


def socket_owner(path: Path) -> int | None:
    """The pid of the process that created the socket, from its name (``odin-<pid>.sock``);
    None for a name without one (an explicit ``control.path``)."""
    match = _NAMED_BY_PID.fullmatch(path.name)
    pid = int(match.group(1)) if match else 0
    return pid if pid > 0 else None  # kill(0) would ask about our own process group


def process_running(pid: int, *, since: float | None = None) -> bool:
    """Whether process ``pid`` runs; with ``since`` (a Unix time), whether one that started
    before then runs: a pid reused by a process started later is not the one asked about.
    When in doubt (another user's process, no ``/proc``), it runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's: it exists
    if since is None:
        return True
    started = _start_time(pid)
    return started is None or started <= since + _START_SLACK


def owner_running(path: Path) -> bool | None:
    """Whether the process that created the socket at ``path`` still runs: None when the name
    does not say who that is, or the file is gone."""
    pid = socket_owner(path)
    if pid is None:
        return None
    try:
        created = path.stat().st_mtime
    except OSError:
        return None
    return process_running(pid, since=created)


def _start_time(pid: int) -> float | None:
    """When ``pid`` started (Unix time), from ``/proc``; None where that cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        # The command name (field 2) may hold spaces and parentheses: count after its end.
        ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None
