"""A real browser: headless Chromium opens ``new WebSocket(url, ["odin.v1", "odin.token." +
jwt])`` from a page served on 127.0.0.1, the way a web client must send its token (browsers
cannot set headers), reads the restricted channel, and reports what it saw back to the page's
server. Chromium is the Debian package (CI installs it); without it the test is skipped
unless ODIN_REQUIRE_BROWSER is set."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import jwt
import pytest

from tests.e2e.process import odin_process

pytestmark = pytest.mark.slow

SECRET = "a-browser-test-secret-of-32-bytes-or-more"
PAGE = """<!doctype html><meta charset="utf-8"><title>odin</title><script>
const seen = [];
const report = (what) => fetch("/result?data=" + encodeURIComponent(JSON.stringify(what)));
const ws = new WebSocket(%(url)s, ["odin.v1", "odin.token." + %(token)s]);
ws.onopen = () => {
  seen.push("protocol " + ws.protocol);
  ws.send(JSON.stringify({type: "subscribe", data: {channels: ["BTC.trade"]}}));
};
ws.onmessage = (e) => {
  const m = JSON.parse(e.data);
  seen.push(m.type + (m.channel ? " " + m.channel : ""));
  if (seen.filter((s) => s.endsWith("BTC.trade")).length >= 2) { report(seen); ws.close(); }
};
ws.onclose = (e) => { if (seen.length < 3) report(seen.concat(["closed " + e.code])); };
</script>"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("ODIN_REQUIRE_BROWSER"):
            pytest.fail("chromium is required (ODIN_REQUIRE_BROWSER) but not installed")
        pytest.skip("chromium is not installed")
    return found


@contextmanager
def page_server(page: str) -> Iterator[tuple[str, threading.Event, list[Any]]]:
    """The test page at http://127.0.0.1:PORT/, and what the page reports to /result."""
    reported = threading.Event()
    results: list[Any] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlparse(self.path)
            if url.path == "/result":
                results.append(json.loads(parse_qs(url.query)["data"][0]))
                reported.set()
                body = b"ok"
            else:
                body = page.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", reported, results
    finally:
        server.shutdown()
        server.server_close()


def test_a_browser_sends_its_token_in_the_subprotocol_list_and_reads_its_channel() -> None:
    browser = chromium()
    granted = jwt.encode(
        {"sub": "carol", "channels": ["BTC.*"], "exp": int(time.time()) + 600}, SECRET, "HS256"
    )
    args = ["serve", "--port", "0", "--broker", "memory", "--simulate", "--rate", "50",
            "--tokens", "BTC,ETH", "--set", f"auth.hmac_secret={SECRET}",
            "--set", "auth.namespaces=BTC.*=token"]  # fmt: skip
    with odin_process(args) as odin:
        url = odin.wait_for("listening")["websocket"][0]
        page = PAGE % {"url": json.dumps(url), "token": json.dumps(granted)}
        with (
            page_server(page) as (address, reported, results),
            tempfile.TemporaryDirectory(prefix="odin-chromium-") as profile,
        ):
            process = subprocess.Popen(
                [browser, "--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", f"--user-data-dir={profile}", address],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                assert reported.wait(timeout=60), "the page never reported"
            finally:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    (seen,) = results
    assert seen[0] == "protocol odin.v1"  # the token is never echoed back
    assert seen[1:3] == ["hello", "subscription_ack"]
    assert [s for s in seen if s.endswith("BTC.trade")][:2] == ["price:update BTC.trade"] * 2
