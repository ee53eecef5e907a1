"""``/health``, ``/ready`` and ``/metrics``: what operators and load balancers ask the server.

``/health`` keeps the original's JSON shape (status, healthy, checks, warnings, errors,
uptime): 200 when healthy or degraded, 503 when unhealthy (the broker is unreachable).
``/ready`` says whether this instance should get new clients: 503 while the broker is down,
while draining, or at the connection limit.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import orjson

from odin import __version__
from odin.server.http import RequestHead, response

if TYPE_CHECKING:
    from odin.server.context import ServerContext

_CORS = [
    (b"Access-Control-Allow-Origin", b"*"),
    (b"Access-Control-Allow-Methods", b"GET, OPTIONS"),
    (b"Access-Control-Allow-Headers", b"Content-Type"),
]
_JSON = "application/json"
_START = time.monotonic()


def rss_bytes() -> int | None:
    """This process's resident memory, from /proc (None where there is no /proc)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def health(context: ServerContext) -> tuple[int, dict[str, object]]:
    broker = context.broker.status()
    current, limit = len(context.connections), context.max_connections
    percentage = round(100.0 * current / limit, 2)
    warnings: list[str] = []
    errors: list[str] = []
    if not broker.connected:
        errors.append(f"broker disconnected: {broker.detail}")
    if current >= limit:
        warnings.append(f"Server at full capacity ({current}/{limit})")
    elif percentage > 90:
        warnings.append(f"Server near capacity ({percentage}%)")
    if context.draining:
        warnings.append("draining: not accepting new connections")
    rss = rss_bytes()
    healthy = broker.connected
    body: dict[str, object] = {
        "status": "unhealthy" if not healthy else ("degraded" if warnings else "healthy"),
        "healthy": healthy,
        "checks": {
            "broker": {
                "status": "connected" if broker.connected else "disconnected",
                "healthy": broker.connected,
                "detail": broker.detail,
                "location": broker.location,
                "epoch": context.epoch or context.broker.epoch,
            },
            "capacity": {
                "current": current,
                "max": limit,
                "percentage": percentage,
                "healthy": current < limit,
                **{
                    key: value
                    for key, value in context.capacity.describe().items()
                    if key != "max_connections"
                },
            },
            "memory": {"rss_mb": round(rss / 2**20, 1) if rss is not None else None},
            "accepting": {"healthy": not context.draining},
        },
        "warnings": warnings,
        "errors": errors,
        "uptime": round(time.monotonic() - _START, 3),
        "version": __version__,
        "instance": context.instance,
    }
    return (200 if healthy else 503), body


def ready(context: ServerContext) -> tuple[int, dict[str, object]]:
    reasons = []
    if not context.broker.status().connected:
        reasons.append("broker disconnected")
    if context.draining:
        reasons.append("draining")
    if context.admitted >= context.max_connections:
        reasons.append("at connection limit")
    return (503 if reasons else 200), {"ready": not reasons, "reasons": reasons}


def answer(context: ServerContext, head: RequestHead) -> bytes:
    """The complete response to a plain (non-upgrade) HTTP request."""
    handlers = {"/health": health, "/ready": ready}
    if head.path not in (*handlers, "/metrics"):
        return response(404, b"not found\n")
    if head.method == "OPTIONS":
        return response(204, headers=_CORS)
    if head.method not in ("GET", "HEAD"):
        return response(405, b"method not allowed\n", headers=[(b"Allow", b"GET, HEAD, OPTIONS")])
    head_only = head.method == "HEAD"
    if head.path == "/metrics":
        body, content_type = context.metrics.render(head.headers.get("accept"))
        return response(200, body, content_type, head_only=head_only)
    status, document = handlers[head.path](context)
    return response(status, orjson.dumps(document), _JSON, _CORS, head_only=head_only)
