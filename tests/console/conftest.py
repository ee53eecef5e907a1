"""Fixtures of the console tests: a short socket directory, fake servers stopped afterwards,
and bounded waiting."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.console.demo import FakeData, FakeServer, demo_data

WAIT = 5.0


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """Under /tmp: pytest's tmp_path can be too long for a Unix socket's 107 bytes."""
    directory = Path(tempfile.mkdtemp(prefix="oc-", dir="/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def owner_unknown(_: Path) -> bool | None:
    """The fake servers' pids are invented: whether one runs on this machine says nothing of
    the fake, so most tests leave it unknown (a refused link is then just lost). Tests of gone
    and not answering use the real check, with sockets named after real pids."""
    return None


def left_socket(path: Path) -> Path:
    """A socket file nobody listens on: what a killed process leaves."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()
    return path


def dead_pid() -> int:
    """The pid of a process that ran and was reaped: not running any more."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


ServerFactory = Callable[..., Awaitable[FakeServer]]


@pytest_asyncio.fixture
async def fake_server(socket_dir: Path) -> AsyncIterator[ServerFactory]:
    """Start fake servers (``odin-<pid>.sock`` in ``socket_dir``); all stop at the end."""
    started: list[FakeServer] = []

    async def start(
        data: FakeData | None = None, *, pid: int = 101, start: bool = True, **options: object
    ) -> FakeServer:
        data = data if data is not None else demo_data("a3f9", pid)
        server = FakeServer(socket_dir / f"odin-{pid}.sock", data, **options)  # type: ignore[arg-type]
        started.append(server)
        if start:
            await server.start()
        return server

    yield start
    for server in started:
        await server.stop()


async def eventually(predicate: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    """Wait until ``predicate()`` holds, polling; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.01)  # state with no event to wait on: polled, bounded
