"""``/health``, ``/ready`` and ``/metrics``: what operators and load balancers ask the server.

``/health`` keeps the original's JSON shape (status, healthy, checks, warnings, errors,
uptime, and ``checks.cpu``/``memory``/``capacity`` with their ``percentage``): 200 when
healthy or degraded, 503 when unhealthy. Unlike the original, losing the broker after it was
reached once is ``degraded``, not unhealthy: connected clients are still served (live from the
broker once it is back, recoveries from the window meanwhile), and a liveness probe that
restarted the server would cut them without bringing the broker back. A broker never reached
since start is unhealthy: this instance has served nothing yet. ``/ready`` turns load
balancers away in both cases.
``/ready`` says whether this instance should get new clients: 503 while the broker is down,
while draining, or at the connection limit.

Under ``odin serve --workers N`` whichever worker accepted the request answers: both
documents say which (``worker``) and describe the host (``workers``: up of expected, and
each worker's state as the supervisor published it); a worker restarting makes the host
``degraded``, not unhealthy (the others serve).
"""

from __future__ import annotations

import hmac
import time
from typing import TYPE_CHECKING, Any

import orjson
import trio

from odin_fanout.capacity import rss_bytes
from odin_fanout.server.http import RequestHead, response
from odin_fanout.version import __version__

if TYPE_CHECKING:
    from odin_fanout.server.context import ServerContext

_JSON = "application/json"
_START = time.monotonic()


class CpuSampler:
    """This process's CPU use over the last sampling interval, in percent of one core (the
    original's ``checks.cpu.percentage``; load scripts read it)."""

    def __init__(self) -> None:
        self._last: tuple[float, float] | None = None
        self.percentage = 0.0

    def sample(self, now: float) -> None:
        """Called about once a second by the server's housekeeping."""
        used = time.process_time()
        if self._last is not None and now > self._last[0]:
            self.percentage = round(100.0 * (used - self._last[1]) / (now - self._last[0]), 2)
        self._last = (now, used)


def health(context: ServerContext) -> tuple[int, dict[str, object]]:
    broker = context.broker.status()
    current, limit = len(context.registry.connections), context.registry.max_connections
    percentage = round(100.0 * current / limit, 2)
    warnings: list[str] = []
    errors: list[str] = []
    # The history's epoch is known once the broker has been reached.
    reached = bool(context.reader.current_epoch())
    if not broker.connected:
        errors.append(f"broker disconnected: {broker.detail}")
        if reached:
            warnings.append("broker disconnected: reconnecting, connected clients still served")
    if current >= limit:
        warnings.append(f"Server at full capacity ({current}/{limit})")
    elif percentage > 90:
        warnings.append(f"Server near capacity ({percentage}%)")
    if context.registry.draining:
        warnings.append("draining: not accepting new connections")
    workers = host_view(context)
    if workers["up"] < workers["expected"]:
        down = ", ".join(
            f"worker {w['slot']} {w['state']}" for w in workers["workers"] if w["state"] != "up"
        )
        warnings.append(f"{workers['up']} of {workers['expected']} workers up ({down})")
    healthy = broker.connected or reached
    broker_status = "connected" if broker.connected else "disconnected"
    checks: dict[str, object] = {
        "broker": {
            "status": broker_status,
            "healthy": broker.connected,
            "detail": broker.detail,
            "location": broker.location,
            "epoch": context.reader.epoch or context.broker.epoch,
        },
        "capacity": {
            "current": current,
            "max": limit,
            "percentage": percentage,
            "healthy": current < limit,
            **{
                key: value
                for key, value in context.registry.capacity.describe().items()
                if key != "max_connections"
            },
        },
        "memory": _memory(rss_bytes(), context.registry.capacity.limits.memory_bytes),
        "cpu": {
            "percentage": context.cpu.percentage,
            "cores": context.registry.capacity.limits.cpu_cores,
        },
        "accepting": {"healthy": not context.registry.draining},
        # The original's goroutine count, for Trio: what a leak of tasks would show first.
        "tasks": {"current": task_count()},
        "workers": {"healthy": workers["up"] >= workers["expected"], **workers},
    }
    if context.config.broker.kind == "nats":  # the original's name for the broker check
        checks["nats"] = {"status": broker_status, "healthy": broker.connected}
    body: dict[str, object] = {
        "status": "unhealthy" if not healthy else ("degraded" if warnings else "healthy"),
        "healthy": healthy,
        "checks": checks,
        "warnings": warnings,
        "errors": errors,
        "uptime": round(time.monotonic() - _START, 3),
        "version": __version__,
        "instance": context.instance,
        "worker": context.worker.slot if context.worker else None,
    }
    return (200 if healthy else 503), body


def task_count() -> int:
    """Trio tasks alive in this process (about two per connection). Walks the task tree:
    O(tasks), only when /health is asked."""
    count = 0
    pending = [trio.lowlevel.current_root_task()]
    while pending:
        task = pending.pop()
        if task is None:
            continue
        count += 1
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return count


def host_view(context: ServerContext) -> dict[str, Any]:
    """The host's workers: this process alone, or what its supervisor published."""
    role = context.worker
    state = role.host() if role is not None else None
    if role is None:
        return {"expected": 1, "up": 1, "workers": [{"slot": 0, "state": "up", "restarts": 0}]}
    if state is None:
        return {"expected": role.count, "up": 0, "workers": []}
    return {
        "expected": state.expected,
        "up": state.up,
        "workers": [
            {"slot": w.slot, "state": w.state, "pid": w.pid, "restarts": w.restarts}
            for w in state.workers
        ],
    }


def _memory(rss: int | None, limit: int | None) -> dict[str, object]:
    """RSS against the memory limit, in the original's fields (``used_mb``, ``limit_mb``,
    ``percentage``) beside Odin's ``rss_mb``."""
    used = round(rss / 2**20, 1) if rss is not None else None
    return {
        "rss_mb": used,
        "used_mb": used,
        "limit_mb": round(limit / 2**20, 1) if limit else None,
        "percentage": round(100.0 * rss / limit, 2) if rss is not None and limit else None,
    }


def ready(context: ServerContext) -> tuple[int, dict[str, object]]:
    reasons = []
    if not context.broker.status().connected:
        reasons.append("broker disconnected")
    if context.registry.draining:
        reasons.append("draining")
    if context.registry.full:
        reasons.append("at connection limit")
    workers = host_view(context)
    return (503 if reasons else 200), {
        "ready": not reasons,
        "reasons": reasons,
        "worker": context.worker.slot if context.worker else None,
        "workers": {"up": workers["up"], "expected": workers["expected"]},
    }


def answer(context: ServerContext, head: RequestHead) -> bytes:
    """The complete response to a plain (non-upgrade) HTTP request on the client port: none
    of these paths are served there when an ops listener (``server.ops_listen``) is."""
    if context.config.server.ops_listen:
        return response(404, b"not found\n")
    return _respond(context, head, _cors(context.config.server.cors_allow_origin))


def answer_ops(context: ServerContext, head: RequestHead) -> bytes:
    """The complete response to a request on the ops listener: never CORS headers (it is not
    meant for browsers)."""
    return _respond(context, head, [])


def _metrics_refused(context: ServerContext, head: RequestHead) -> bytes | None:
    """The 401 for a /metrics request without ``server.metrics_token``, or None to serve it."""
    expected = context.config.server.metrics_token
    if not expected:
        return None
    scheme, _, token = head.headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode(), expected.encode()
    ):
        return None
    return response(401, b"unauthorized\n", headers=[(b"WWW-Authenticate", b"Bearer")])


def _respond(context: ServerContext, head: RequestHead, cors: list[tuple[bytes, bytes]]) -> bytes:
    handlers = {"/health": health, "/ready": ready}
    if head.path not in (*handlers, "/metrics"):
        return response(404, b"not found\n")
    if head.method == "OPTIONS":
        return response(204, headers=[(b"Allow", b"GET, HEAD, OPTIONS"), *cors])
    if head.method not in ("GET", "HEAD"):
        return response(405, b"method not allowed\n", headers=[(b"Allow", b"GET, HEAD, OPTIONS")])
    head_only = head.method == "HEAD"
    if head.path == "/metrics":
        refused = _metrics_refused(context, head)
        if refused is not None:
            return refused
        body, content_type = context.metrics.render(head.headers.get("accept"))
        return response(200, body, content_type, head_only=head_only)
    status, document = handlers[head.path](context)
    return response(status, orjson.dumps(document), _JSON, cors, head_only=head_only)


def _cors(allow_origin: str) -> list[tuple[bytes, bytes]]:
    """CORS headers for a browser dashboard, only when ``server.cors_allow_origin`` names one:
    a wildcard by default would let any web page read the server's state."""
    if not allow_origin:
        return []
    return [
        (b"Access-Control-Allow-Origin", allow_origin.encode()),
        (b"Access-Control-Allow-Methods", b"GET, OPTIONS"),
        (b"Access-Control-Allow-Headers", b"Content-Type"),
        (b"Vary", b"Origin"),
    ]
