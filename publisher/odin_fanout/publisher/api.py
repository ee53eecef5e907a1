"""The control API (Starlette, served by hypercorn under Trio), compatible with the original.

| route | answer |
|---|---|
| ``POST /control`` | start / stop / configure; 200, or 4xx with ``{"success": false, "message",
  "error": {"code", "field", "message"}}``: 400 bad JSON or unknown field or action, 422 a bad
  value, 409 starting twice or stopping when stopped, 413 a body over 64 KiB |
| ``GET /stats`` | the original's shape, plus ``rate``, ``retries``, ``dropped``, ``retrying``,
  ``inFlight``, ``skipped`` |
| ``GET /health`` | 200 ``{"status": "healthy" or "degraded", "nats", "publishing", "uptime"}``
  (liveness: the process answers; NATS down is "degraded", not an error) |
| ``GET /ready`` | 200 when connected to NATS with the stream known, else 503 |
| ``GET /metrics`` | Prometheus |
"""

from __future__ import annotations

import time

import orjson
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from odin_fanout.publisher import metrics
from odin_fanout.publisher.control import ControlError, Limits, parse_control
from odin_fanout.publisher.service import PublisherService

MAX_BODY = 64 * 1024


def _json(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status, media_type="application/json")


def build_app(
    service: PublisherService,
    registry: CollectorRegistry,
    *,
    limits: Limits,
    cors_origins: tuple[str, ...] = (),
) -> Starlette:
    def configuration() -> dict[str, object]:
        targets = service.targets
        return {
            "connections": targets.connections,
            "messagesPerSecond": targets.rate,
            "tokens": list(targets.tokens),
            "events": list(targets.events),
            "duration": targets.duration_ms,
        }

    def stats() -> dict[str, object]:
        summary = service.summary()
        started = service.started_at
        return {
            "messagesPublished": summary["published"],
            "startTime": int(started * 1000) if started is not None else None,
            "errors": summary["failed"],
            "retries": summary["retries"],
            "dropped": summary["dropped"],
            "retrying": summary["retrying"],
            "inFlight": summary["in_flight"],
            "skipped": summary["skipped"],
            "rate": summary["rate"],
        }

    async def control(request: Request) -> Response:
        try:
            command = parse_control(await _read_body(request), limits)
            if command.action == "start":
                service.start(command.changes)
                targets = service.targets
                message = (
                    f"Started publishing with {targets.rate:g} msg/sec "
                    f"for {len(targets.tokens)} tokens"
                )
                return _json(
                    {
                        "success": True,
                        "message": message,
                        "stats": stats(),
                        "activeTokens": list(targets.tokens),
                    }
                )
            if command.action == "stop":
                service.stop()
                return _json({"success": True, "message": "Publishing stopped", "stats": stats()})
            service.configure(command.changes)
            return _json(
                {
                    "success": True,
                    "message": "Configuration updated",
                    "configuration": configuration(),
                }
            )
        except ControlError as error:
            return _json(error.body(), error.status)

    async def get_stats(_: Request) -> Response:
        return _json(
            {
                "success": True,
                "stats": stats(),
                "isPublishing": service.publishing,
                "activeTokens": list(service.targets.tokens),
                "configuration": configuration(),
            }
        )

    async def health(_: Request) -> Response:
        status = service.broker.status()
        return _json(
            {
                "status": "healthy" if status.connected else "degraded",
                "nats": "connected" if status.connected else "disconnected",
                "natsDetail": status.detail,
                "publishing": service.publishing,
                "uptime": int((time.monotonic() - service.began) * 1000),
            }
        )

    async def ready(_: Request) -> Response:
        status = service.broker.status()
        return _json(
            {"ready": status.connected, "nats": status.detail}, 200 if status.connected else 503
        )

    async def get_metrics(request: Request) -> Response:
        body, content_type = metrics.render(registry, request.headers.get("accept"))
        return Response(body, headers={"Content-Type": content_type})

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        error = ControlError(exc.status_code, "http_error", exc.detail or "error")
        return _json(error.body(), exc.status_code)

    middleware = []
    if cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Content-Type"],
            )
        )
    return Starlette(
        routes=[
            Route("/control", control, methods=["POST"]),
            Route("/stats", get_stats, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/ready", ready, methods=["GET"]),
            Route("/metrics", get_metrics, methods=["GET"]),
        ],
        middleware=middleware,
        exception_handlers={HTTPException: http_error},
    )


async def _read_body(request: Request) -> bytes:
    """The request body, refused with 413 past ``MAX_BODY`` (before reading it all)."""
    too_large = ControlError(413, "too_large", f"the body is larger than {MAX_BODY} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise too_large
    return bytes(body)
