"""The live page at ``/`` (``server.page``): served while the simulator runs (``auto``) or when
``on``, never when ``off``; GET and HEAD, revalidated by ETag, with a strict CSP; the
JavaScript client served from its link into clients/js (the static files in the wheel:
tests/test_wheel.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from odin_fanout.config import load_config
from odin_fanout.server.page import CSP
from tests.helpers import http_exchange, http_get, make_config, running_server

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "odin" / "odin_fanout" / "web" / "static"
CLIENT = ROOT / "clients" / "js" / "src" / "odin-client.js"
TYPES = {
    "/": "text/html; charset=utf-8",
    "/index.html": "text/html; charset=utf-8",
    "/page.js": "text/javascript; charset=utf-8",
    "/page.css": "text/css; charset=utf-8",
}
SIMULATING = {"simulator.enabled": True, "simulator.rate": 1000.0}


async def request(
    port: int, path: str, method: str = "GET", headers: tuple[tuple[str, str], ...] = ()
) -> tuple[int, dict[str, str], bytes]:
    """One request; the answer read to the end of the connection (a HEAD's too, which
    ``http_exchange`` would read as a truncated GET)."""
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers)
    data = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{lines}\r\n".encode()
    if method != "HEAD":
        return await http_exchange(port, data)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = b""
    with trio.fail_after(5):
        await stream.send_all(data)
        while chunk := await stream.receive_some(65536):
            received += chunk
    await stream.aclose()
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    answer = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        answer[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), answer, body


@pytest.mark.trio
async def test_the_page_is_served_while_the_simulator_runs() -> None:
    async with running_server(make_config(**SIMULATING)) as harness:
        for path, content_type in TYPES.items():
            status, headers, body = await http_get(harness.port, path)
            assert status == 200, path
            assert headers["content-type"] == content_type, path
            assert headers["cache-control"] == "no-cache", path
            assert headers["x-content-type-options"] == "nosniff", path
            assert headers["content-security-policy"] == CSP, path
            assert headers["etag"].startswith('"'), path
            assert int(headers["content-length"]) == len(body) > 0, path
        status, _, page = await http_get(harness.port, "/")
        assert b'<meta name="odin-ws-path" content="/ws">' in page
        assert b'<script type="module" src="./page.js">' in page
        assert b"<script>" not in page  # nothing inline: the CSP would refuse it
        status, _, _ = await http_get(harness.port, "/health")  # the rest as before
        assert status == 200
        status, _, _ = await http_get(harness.port, "/nothing-here")
        assert status == 404


@pytest.mark.trio
async def test_the_csp_allows_this_origin_and_websockets_only() -> None:
    directives = dict(part.strip().split(" ", 1) for part in CSP.split(";"))
    assert directives["default-src"] == "'self'"
    assert directives["connect-src"] == "'self' ws: wss:"
    assert "script-src" not in directives  # 'self' by default-src: no 'unsafe-inline'
    assert "unsafe" not in CSP


@pytest.mark.trio
@pytest.mark.parametrize(
    ("overrides", "served"),
    [
        ({}, False),  # auto, no simulator
        ({"server.page": "off", **SIMULATING}, False),
        ({"server.page": "on"}, True),
        ({"server.page": "auto", **SIMULATING}, True),
    ],
)
async def test_server_page_decides(overrides: dict[str, object], served: bool) -> None:
    async with running_server(make_config(**overrides)) as harness:
        for path in TYPES:
            status, _, body = await http_get(harness.port, path)
            assert status == (200 if served else 404), (path, body)


@pytest.mark.trio
async def test_head_answers_the_headers_without_the_body() -> None:
    async with running_server(make_config(**SIMULATING)) as harness:
        _, full, body = await http_get(harness.port, "/page.js")
        status, headers, nothing = await request(harness.port, "/page.js", "HEAD")
        assert status == 200
        assert nothing == b""
        assert headers["content-length"] == str(len(body)) == full["content-length"]
        assert headers["etag"] == full["etag"]


@pytest.mark.trio
async def test_an_etag_revalidates_with_304() -> None:
    async with running_server(make_config(**SIMULATING)) as harness:
        _, headers, _ = await http_get(harness.port, "/")
        etag = headers["etag"]
        for offered in (etag, f"W/{etag}", f'"other", {etag}', "*"):
            status, answer, body = await request(
                harness.port, "/", headers=(("If-None-Match", offered),)
            )
            assert (status, body) == (304, b""), offered
            assert answer["etag"] == etag
            assert answer["cache-control"] == "no-cache"
        status, _, body = await request(harness.port, "/", headers=(("If-None-Match", '"other"'),))
        assert status == 200
        assert body
        _, css, _ = await http_get(harness.port, "/page.css")
        assert css["etag"] != etag


@pytest.mark.trio
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
async def test_other_methods_get_405_with_allow(method: str) -> None:
    async with running_server(make_config(**SIMULATING)) as harness:
        status, headers, _ = await request(
            harness.port, "/", method, headers=(("Content-Length", "0"),)
        )
        assert status == 405
        assert headers["allow"] == "GET, HEAD"


@pytest.mark.trio
async def test_the_ws_path_is_filled_in_and_escaped() -> None:
    config = make_config(**SIMULATING, **{"server.ws_path": '/live/"socket"'})
    async with running_server(config) as harness:
        _, _, page = await http_get(harness.port, "/")
        assert b'<meta name="odin-ws-path" content="/live/&quot;socket&quot;">' in page


@pytest.mark.trio
async def test_the_page_stays_on_the_client_port_with_an_ops_listener() -> None:
    config = make_config(**SIMULATING, **{"server.ops_listen": "127.0.0.1:0"})
    async with running_server(config) as harness:
        status, _, _ = await http_get(harness.port, "/")
        assert status == 200
        status, _, _ = await http_get(harness.port, "/health")
        assert status == 404  # on the ops listener instead
        ops = int(harness.listening.ops[0].rsplit(":", 1)[1])
        status, _, _ = await http_get(ops, "/")
        assert status == 404


@pytest.mark.trio
async def test_the_javascript_client_is_served_from_its_link() -> None:
    link = STATIC / "odin-client.js"
    assert link.is_symlink()
    # Relative, so that the link holds in any checkout: one copy of the client.
    assert not link.readlink().is_absolute()
    assert link.resolve() == CLIENT.resolve()
    if not CLIENT.exists():
        pytest.skip("clients/js/src/odin-client.js is not there yet")
    async with running_server(make_config(**SIMULATING)) as harness:
        status, headers, body = await http_get(harness.port, "/odin-client.js")
    assert status == 200
    assert headers["content-type"] == "text/javascript; charset=utf-8"
    assert body == CLIENT.read_bytes()
    assert b"export function connect" in body


def test_the_page_imports_only_what_the_server_serves() -> None:
    script = (STATIC / "page.js").read_text()
    imports = [line for line in script.splitlines() if line.startswith("import ")]
    assert imports == ['import { connect } from "./odin-client.js";']
    for name in ("index.html", "page.js", "page.css"):
        text = (STATIC / name).read_text()
        assert "http://" not in text
        assert "https://" not in text  # no CDN, no external resources


@pytest.mark.parametrize("page", [True, False])
def test_the_banners_say_where_the_page_is(page: bool, capsys: pytest.CaptureFixture[str]) -> None:
    from odin_fanout.cli import print_banner, print_where_to_connect
    from odin_fanout.host.supervisor import Ready
    from odin_fanout.server.app import Listening

    listening = Listening(["ws://127.0.0.1:3002/ws"], ["http://127.0.0.1:3002"])
    ready = Ready(listening, "", "nats://127.0.0.1:4222")
    print_banner(ready, 1, page=page)
    print_where_to_connect(ready, 1, page=page)
    printed = capsys.readouterr().out
    assert ("  Page       http://127.0.0.1:3002/\n" in printed) is page
    assert ("Live page at http://127.0.0.1:3002/." in printed) is page
    banner = printed.splitlines()
    assert banner[4].startswith("  History")  # where tests/e2e/test_embedded reads it


def test_odin_demo_and_simulate_serve_the_page() -> None:
    from odin_fanout.cli import build_parser, config_overrides
    from odin_fanout.server.page import page_enabled

    for argv in (["demo"], ["serve", "--simulate"]):
        config, _ = load_config(
            environ={}, overrides=config_overrides(build_parser().parse_args(argv))
        )
        assert page_enabled(config), argv
    config, _ = load_config(environ={}, overrides={})
    assert not page_enabled(config)
