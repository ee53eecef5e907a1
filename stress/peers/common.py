"""What every benchmark server shares: arguments, the payload, pacing and the stdout protocol.

The payload is a JSON object of ``--payload-size`` bytes (100 by default)::

    {"seq":17,"ts":1764248000123,"ns":81234567890123,"due":81234567800000,"pad":"xxxx"}

``ts`` is the publish wall-clock time in ms; ``ns`` is ``time.monotonic_ns()`` at publish,
which on Linux is CLOCK_MONOTONIC, one clock for the whole machine, so the load client (another
process) can subtract it from its own ``monotonic_ns()`` to get the delivery latency.
``due`` is the monotonic time the message was scheduled for (see ``Schedule``). ``seq`` counts
from 0 so that clients can check nothing was lost or reordered.

Pacing is the simulator's (odin/simulator/runner.py): message ``k`` is due at
``start + k / rate``; a publisher that falls behind publishes what is due at once, but it
never skips, so every run publishes exactly ``round(rate * duration)`` messages.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

CHANNEL = "BENCH.trade"
"""The one channel every subscriber asks for (a valid Odin channel: SYMBOL.event)."""

ACK = '{"type":"subscription_ack","data":{"channels":["BENCH.trade"]}}'
"""The peers' answer to a subscribe, shaped like Odin's so the client treats both alike."""


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    parser.add_argument("--rate", type=float, default=0.0, help="messages per second in total")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of publishing")
    parser.add_argument("--payload-size", type=int, default=100, help="bytes per payload")
    parser.add_argument(
        "--max-seconds", type=float, default=600.0, help="exit after this long whatever happens"
    )
    return parser.parse_args()


def total_messages(rate: float, duration: float) -> int:
    return max(0, round(rate * duration))


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
    """The publishing schedule: message ``k`` is due at ``start + k / rate``.

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
        return min(self.total, int((now - self.start) * self.rate) + 1)

    def next_time(self, sent: int) -> float:
        return self.start + sent / self.rate

    def payload(self, index: int, now: float, size: int) -> bytes:
        late = now - (self.start + index / self.rate)
        if late > self.worst_late:
            self.worst_late = late
        return make_payload(index, size, self.start_ns + round(index * 1e9 / self.rate))

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
