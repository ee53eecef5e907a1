"""The live page at ``/``: a ticker of the simulated market built on Odin's JavaScript client.

Static files in the package (``odin/odin_fanout/web/static``), served on the client port (it is for
browsers, so also when an ops listener takes /health and /metrics away from it) when
``server.page`` says so: ``auto`` while the simulator runs, ``on`` always, ``off`` never.
``index.html`` carries the WebSocket path in ``<meta name="odin-ws-path">``, so the page
connects to this server at ``ws(s)://<its host><ws_path>``.

Each file is read once, at first use; answers are ``GET`` and ``HEAD`` only, revalidated by
``ETag`` (``Cache-Control: no-cache``: a new server version is picked up at once), and carry
a Content-Security-Policy that allows this origin's scripts and styles and WebSocket
connections only: no inline script, nothing from elsewhere.
"""

from __future__ import annotations

import hashlib
import html
from http import HTTPStatus
from importlib import resources
from typing import TYPE_CHECKING

import attrs
import h11

if TYPE_CHECKING:
    from odin_fanout.config import Config
    from odin_fanout.server.context import ServerContext
    from odin_fanout.server.http import RequestHead

CSP = (
    "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'; object-src 'none'"
)
"""The page's Content-Security-Policy: no inline script or style, nothing from elsewhere."""

_FILES = {
    "/": "index.html",
    "/index.html": "index.html",
    "/page.js": "page.js",
    "/page.css": "page.css",
    "/odin-client.js": "odin-client.js",
}
_TYPES = {
    "html": "text/html; charset=utf-8",
    "js": "text/javascript; charset=utf-8",
    "css": "text/css; charset=utf-8",
}
_WS_PATH = b"{{ws_path}}"
_ALLOW = b"GET, HEAD"


@attrs.frozen
class _Asset:
    body: bytes
    content_type: str
    etag: bytes


_assets: dict[tuple[str, str], _Asset] = {}
"""Files read so far, by name and the WebSocket path filled into them."""


def page_enabled(config: Config) -> bool:
    """Whether the live page is served (``server.page``; ``auto``: while the simulator runs)."""
    setting = config.server.page
    return setting == "on" or (setting == "auto" and config.simulator.enabled)


def answer_page(context: ServerContext, head: RequestHead) -> bytes | None:
    """The complete response for one of the page's paths while the page is served; None
    otherwise (the caller answers as it would without the page)."""
    name = _FILES.get(head.path)
    if name is None or not page_enabled(context.config):
        return None
    if head.method not in ("GET", "HEAD"):
        return _response(405, b"method not allowed\n", headers=[(b"Allow", _ALLOW)])
    asset = _asset(name, context.config.server.ws_path)
    if asset is None:
        return _response(404, b"not found: the JavaScript client is not installed\n")
    headers = [(b"ETag", asset.etag)]
    if _matches(head.headers.get("if-none-match", ""), asset.etag):
        return _response(304, b"", asset.content_type, headers, length=False)
    return _response(200, asset.body, asset.content_type, headers, head_only=head.method == "HEAD")


def _asset(name: str, ws_path: str) -> _Asset | None:
    key = (name, ws_path if name == "index.html" else "")
    asset = _assets.get(key)
    if asset is not None:
        return asset
    try:
        body = resources.files("odin_fanout.web").joinpath("static", name).read_bytes()
    except FileNotFoundError:  # the client is a link to clients/js, absent from a checkout
        return None  # without it; not remembered, so it is served once it is there
    if name == "index.html":
        body = body.replace(_WS_PATH, html.escape(ws_path, quote=True).encode())
    etag = b'"' + hashlib.sha256(body).hexdigest()[:20].encode() + b'"'
    asset = _assets[key] = _Asset(body, _TYPES[name.rsplit(".", 1)[1]], etag)
    return asset


def _matches(if_none_match: str, etag: bytes) -> bool:
    """Whether an ``If-None-Match`` header names this ETag (weakly compared, or ``*``)."""
    tag = etag.decode()
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == tag:
            return True
    return False


def _response(
    status: int,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    head_only: bool = False,
    length: bool = True,
) -> bytes:
    """A complete HTTP/1.1 response with the page's headers, serialised by h11 (as
    ``odin_fanout.server.http.response``, which sends ``no-store`` where the page wants
    revalidation)."""
    writer = h11.Connection(h11.SERVER)
    method = b"HEAD" if head_only or status == 304 else b"GET"
    writer.receive_data(method + b" / HTTP/1.1\r\nHost: odin\r\n\r\n")
    writer.next_event()
    all_headers = [
        (b"Connection", b"close"),
        (b"Cache-Control", b"no-cache"),
        (b"Content-Type", content_type.encode()),
        *([(b"Content-Length", str(len(body)).encode())] if length else []),
        (b"X-Content-Type-Options", b"nosniff"),
        (b"Content-Security-Policy", CSP.encode()),
        (b"Referrer-Policy", b"no-referrer"),
        *(headers or []),
    ]
    reason = HTTPStatus(status).phrase.encode()
    data = writer.send(h11.Response(status_code=status, headers=all_headers, reason=reason)) or b""
    if body and not head_only:
        data += writer.send(h11.Data(data=body)) or b""
    data += writer.send(h11.EndOfMessage()) or b""
    return data
