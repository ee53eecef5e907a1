"""Where control sockets live: one per server process, all in one directory per user.

``odin serve`` creates ``<dir>/odin-<pid>.sock`` (mode 0600) in a directory of mode 0700;
``odin-console`` with no arguments attaches to every socket it finds there, so several server
processes on one host are one command away. The directory is ``$XDG_RUNTIME_DIR/odin`` when the
session has a runtime directory (systemd's ``RuntimeDirectory=`` sets it for a service), else
``/tmp/odin-<uid>``.
"""

from __future__ import annotations

import os
from pathlib import Path

SUFFIX = ".sock"


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
