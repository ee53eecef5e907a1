"""Process control for the benchmarks: children that speak the driver protocol (JSON lines
on stdout, commands on stdin), pinned to a CPU with ``taskset``, each stopped by its PID
(SIGTERM, then SIGKILL), and the limit on open files they inherit.

The servers under test (``stress/odin_fanout/stress/peers``, nats-server under ``nats-ws``), their
publishers and the load clients (``stress/odin_fanout/stress/load_client.py``) all run as ``Child``;
``bench_fanout`` and ``bench_workers`` start them."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import resource
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Any, ClassVar


class Child:
    """A child process speaking JSON lines on stdout, taking commands on stdin."""

    running: ClassVar[list[Child]] = []

    def __init__(self, name: str, argv: list[str], logdir: Path) -> None:
        self.name = name
        self.argv = argv
        self.stderr_path = logdir / f"{name}.stderr"
        self._stderr: IO[bytes] = self.stderr_path.open("wb")
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.other_lines: list[str] = []
        self.measure_pid = 0
        """The process whose CPU and memory are measured, when not this one (nats-server)."""
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
        )
        Child.running.append(self)
        self._reader = threading.Thread(target=self._read, name=f"{name}-stdout", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                self.other_lines.append(line.rstrip())
                continue
            if isinstance(event, dict):
                self.events.put(event)

    @property
    def measured_pid(self) -> int:
        return self.measure_pid or self.proc.pid

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        """The next event named ``event`` (earlier ones of other names are dropped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no {event!r} within {timeout:.0f} s")
            try:
                item = self.events.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.proc.poll() is not None and self.events.empty():
                    raise RuntimeError(
                        f"{self.name} exited ({self.proc.returncode}) before {event!r}: "
                        f"{self.stderr_tail(5)}"
                    ) from None
                continue
            if item.get("event") == event:
                return item

    def stop(self, timeout: float = 5.0) -> int | None:
        """Close stdin, SIGTERM, then SIGKILL after ``timeout``; by PID only."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        self._stderr.close()
        if self in Child.running:
            Child.running.remove(self)
        return self.proc.returncode

    @classmethod
    def stop_all(cls) -> None:
        """Stop every child still running (in a ``finally``)."""
        for child in list(cls.running):
            child.stop()

    def stderr_lines(self) -> list[str]:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if line.strip()]

    def stderr_tail(self, count: int) -> list[str]:
        return [line[:300] for line in self.stderr_lines()[-count:]]

    def noteworthy_stderr(self) -> list[str]:
        """stderr lines but JSON log events at level info or debug (Odin logs its
        ``listening`` at info whatever the level set)."""
        return [
            line
            for line in self.stderr_lines()
            if '"level":"info"' not in line and '"level":"debug"' not in line
        ]


def pinned(cpu: int | None, argv: list[str]) -> list[str]:
    """``argv`` under ``taskset -c CPU``, if a CPU is given and taskset is there."""
    taskset = shutil.which("taskset")
    if cpu is None or taskset is None:
        return argv
    return [taskset, "-c", str(cpu), *argv]


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one (children inherit it, and the servers and
    clients raise their own as well)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def expect_all(children: list[Child], event: str, timeout: float) -> list[dict[str, Any]]:
    """``event`` from every child, all within ``timeout``."""
    deadline = time.monotonic() + timeout
    return [child.expect(event, max(0.5, deadline - time.monotonic())) for child in children]
