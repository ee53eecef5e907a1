"""Run ``python -m odin_fanout`` as a real subprocess and read its JSON log lines as they come."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


class OdinProcess:
    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self.lines: list[str] = []
        self._buffer = b""
        self._follower: threading.Thread | None = None
        self._changed = threading.Condition()
        self._ended = False
        assert process.stderr is not None
        os.set_blocking(process.stderr.fileno(), False)

    def follow(self) -> None:
        """From now on read stderr in a thread: a process that logs a line per connection must
        never block on a full pipe while the test is busy elsewhere. ``wait_for`` and ``wait``
        then wait for what the thread reads (and may be called from any one thread)."""
        if self._follower is None:
            self._follower = threading.Thread(target=self._follow, daemon=True)
            self._follower.start()

    def finish_following(self, timeout: float) -> None:
        """Let the thread that ``follow`` started read to the end of stderr (once the
        process has exited), waiting at most ``timeout`` seconds."""
        if self._follower is not None:
            self._follower.join(timeout)

    def _follow(self) -> None:
        try:
            while self._read_available(0.2):
                with self._changed:
                    self._changed.notify_all()
        except (OSError, ValueError):  # the pipe was closed under the thread
            pass
        if self._buffer:
            self.lines.append(self._buffer.decode())
            self._buffer = b""
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def _wait_for_more(self, seen: int, timeout: float) -> bool:
        """Wait for lines beyond ``seen`` (False: stderr ended, and none came)."""
        if self._follower is None:
            return self._read_available(timeout)
        with self._changed:
            if len(self.lines) == seen and not self._ended:
                self._changed.wait(timeout)
            return len(self.lines) > seen or not self._ended

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read_available(self, timeout: float) -> bool:
        stderr = self.process.stderr
        assert stderr is not None
        with selectors.DefaultSelector() as selector:
            selector.register(stderr, selectors.EVENT_READ)
            if not selector.select(timeout):
                return True
        chunk = stderr.read(65536)
        if not chunk:
            return False
        self._buffer += chunk
        *complete, self._buffer = self._buffer.split(b"\n")
        self.lines.extend(line.decode() for line in complete)
        return True

    def wait_for(self, event: str, timeout: float = 15, **fields: object) -> dict[str, Any]:
        """The first log record with this ``event`` (and these field values), reading stderr
        until it appears."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for line in self.lines[seen:]:
                record = json.loads(line)
                if record.get("event") == event and all(
                    record.get(key) == value for key, value in fields.items()
                ):
                    return dict(record)
            seen = len(self.lines)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {event!r} log line within {timeout}s: {self.lines}")
            more = self._wait_for_more(seen, min(remaining, 0.2))
            if not more and self.process.poll() is not None:
                raise RuntimeError(f"odin exited ({self.process.returncode}): {self.lines}")

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 15) -> int:
        """Wait for the exit, reading the rest of stderr; return the exit code."""
        deadline = time.monotonic() + timeout
        if self._follower is not None:
            self._follower.join(timeout)
            if self._follower.is_alive():
                raise TimeoutError("odin did not exit")
        while self._follower is None and self._read_available(
            max(0.0, min(0.2, deadline - time.monotonic()))
        ):
            if time.monotonic() > deadline:
                raise TimeoutError("odin did not exit")
        code = self.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        if self._buffer:
            self.lines.append(self._buffer.decode())
            self._buffer = b""
        return code


def odin_command(*args: str, module: str = "odin_fanout") -> list[str]:
    return [sys.executable, "-m", module, *args]


@contextmanager
def odin_process(
    args: Sequence[str], env: dict[str, str] | None = None, *, module: str = "odin_fanout"
) -> Iterator[OdinProcess]:
    """Start odin (or ``module``: ``odin_fanout.publisher``); on exit, stop it (SIGTERM, then
    SIGKILL) and close its pipes. An embedded nats-server keeps its store, and the server its
    control socket, in a directory of this run only."""
    state = tempfile.TemporaryDirectory(prefix="odin-state-")
    # The embedded NATS store and the control socket in a directory of this run only.
    environment = {
        **os.environ,
        "XDG_STATE_HOME": state.name,
        "XDG_RUNTIME_DIR": state.name,
        # One process, as most tests want to signal and read it; --workers N overrides.
        "ODIN_SERVER_WORKERS": "1",
        **(env or {}),
    }
    process = subprocess.Popen(
        odin_command(*args, module=module),
        cwd=ROOT,
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    odin = OdinProcess(process)
    try:
        yield odin
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        odin.finish_following(5)  # to the end of stderr, before it is closed under it
        assert process.stderr is not None
        process.stderr.close()
        state.cleanup()


def port_of(listening: dict[str, Any]) -> int:
    url: str = listening["websocket"][0]
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])
