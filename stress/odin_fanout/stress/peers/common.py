"""What every benchmark server shares: arguments, the payload, pacing and the stdout protocol.

The payload is a JSON object of ``--payload-size`` bytes (100 by default)::

    {"seq":17,"ts":1764248000123,"ns":81234567890123,"due":81234567800000,"pad":"xxxx"}

``ts`` is the publish wall-clock time in ms; ``ns`` is ``time.monotonic_ns()`` at publish,
which on Linux is CLOCK_MONOTONIC, one clock for the whole machine, so the load client (another
process) can subtract it from its own ``monotonic_ns()`` to get the delivery latency.
``due`` is the monotonic time the message was scheduled for (see ``Schedule``). ``seq`` counts
from 0 so that clients can check nothing was lost or reordered.

Pacing is the simulator's (odin/odin_fanout/simulator/runner.py): message ``k`` is due at
``start + k / rate``; a publisher that falls behind publishes what is due at once, but it
never skips, so every run publishes exactly ``round(rate * duration)`` messages. With
``--burst B`` every one of the ``B`` messages is due at ``start``: the publisher publishes
them all as fast as it can (the burst mode of stack-findings.md section 3).

Every server raises its soft limit on open files to the hard one (``raise_fd_limit``): it
holds one socket per connection.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import threading
import time
from collections.abc import Callable

CHANNEL = "BENCH.trade"
"""The one channel every subscriber asks for (a valid Odin channel: SYMBOL.event)."""

ACK = '{"type":"subscription_ack","data":{"channels":["BENCH.trade"]}}'
"""The peers' answer to a subscribe, shaped like Odin's so the client treats both alike."""


def parse_args(
    description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.Namespace:
    """The common arguments (plus a server's own, added by ``extra``); raises the fd limit."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    parser.add_argument("--rate", type=float, default=0.0, help="messages per second in total")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of publishing")
    parser.add_argument("--payload-size", type=int, default=100, help="bytes per payload")
    parser.add_argument(
        "--burst", type=int, default=0, help="publish this many messages at once (not --rate)"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=600.0, help="exit after this long whatever happens"
    )
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    raise_fd_limit()
    return args


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one; the new (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def total_messages(rate: float, duration: float) -> int:
    return max(0, round(rate * duration))


def planned(args: argparse.Namespace) -> tuple[float, int]:
    """``(rate, total)`` for this run: rate 0 with ``--burst B`` (all ``B`` due at once)."""
    if args.burst > 0:
        return 0.0, args.burst
    return args.rate, total_messages(args.rate, args.duration)


def make_payload(seq: int, size: int = 100, due_ns: int | None = None) -> bytes:
    """A JSON payload of ``size`` bytes (or a little more if ``size`` is too small)."""
    now_ns = time.monotonic_ns()
    head = b'{"seq":%d,"ts":%d,"ns":%d,"due":%d,"pad":"' % (
        seq,
        time.time_ns() // 1_000_000,
        now_ns,
        now_ns if due_ns is None else due_ns,
    )
    return head + b"x" * max(0, size - len(head) - 2) + b'"}'


class Schedule:
    """The publishing schedule: message ``k`` is due at ``start + k / rate`` (at ``start``
    for every message when ``rate`` is 0: a burst).

    ``start`` is on the caller's event-loop clock; ``start_ns`` is ``monotonic_ns()`` at the
    same moment, so each payload can also carry its due time (``due``) for the client. Latency
    from ``due`` includes the time the publisher itself fell behind (a publisher that shares
    its loop with the broadcast is slowed down by it, which would hide queueing otherwise).
    """

    def __init__(self, start: float, rate: float, total: int) -> None:
        self.start = start
        self.rate = rate
        self.total = total
        self.start_ns = time.monotonic_ns()
        self.worst_late = 0.0
        emit("publishing", start_ns=self.start_ns, total=total, rate=rate)

    def due(self, now: float) -> int:
        """How many messages should have been published by ``now`` (at most ``total``)."""
        if self.rate <= 0:
            return self.total
        return min(self.total, int((now - self.start) * self.rate) + 1)

    def next_time(self, sent: int) -> float:
        return self.start + sent / self.rate if self.rate > 0 else self.start

    def payload(self, index: int, now: float, size: int) -> bytes:
        offset = index / self.rate if self.rate > 0 else 0.0
        late = now - (self.start + offset)
        if late > self.worst_late:
            self.worst_late = late
        return make_payload(index, size, self.start_ns + round(offset * 1e9))

    def finished(self, published: int, now: float) -> None:
        emit(
            "done",
            published=published,
            publish_elapsed_s=round(now - self.start, 4),
            publish_late_max_ms=round(self.worst_late * 1000, 2),
        )


def emit(event: str, **fields: object) -> None:
    """One JSON line on stdout for the driver."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def read_command() -> str:
    """Block for the driver's next command on stdin; "" at end of input."""
    return sys.stdin.readline().strip()


def stdin_commands(loop: asyncio.AbstractEventLoop) -> asyncio.Queue[str]:
    """The driver's commands for an asyncio server, read by a daemon thread (it must not keep
    the process alive)."""
    queue: asyncio.Queue[str] = asyncio.Queue()

    def reader() -> None:
        while True:
            command = read_command()
            loop.call_soon_threadsafe(queue.put_nowait, command)
            if command in ("", "stop"):
                return

    threading.Thread(target=reader, name="stdin", daemon=True).start()
    return queue
