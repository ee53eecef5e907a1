"""The live page in a real browser: headless Chromium, driven through the Chrome DevTools
protocol, loads ``/`` from ``odin serve --simulate``, sees every simulated channel in the
ticker with its position, presses "Drop connection" and sees the client reconnect and
recover. It saves a screenshot: to docs/images/live-page.png with ODIN_UPDATE_SCREENSHOT=1
(the README shows it), else to a temporary directory. Chromium is the Debian package;
without it the test is skipped unless ODIN_REQUIRE_BROWSER is set."""

from __future__ import annotations

import base64
import itertools
import json
import os
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from tests.e2e.process import ROOT, odin_process
from tests.e2e.test_browser import chromium

pytestmark = pytest.mark.slow

SCREENSHOT = ROOT / "docs" / "images" / "live-page.png"
CLIENT = ROOT / "clients" / "js" / "src" / "odin-client.js"
TOKENS = ("BTC", "ETH", "ODIN", "SOL", "DOGE")

# What the page shows, read in the page: its rows with their positions, its status, its log
# (null until the page is there: the blank page may still be loaded).
READ_PAGE = """(() => document.getElementById("status") && ({
  state: document.getElementById("status").dataset.state,
  status: document.getElementById("status-text").textContent,
  rows: [...document.querySelectorAll("#rows tr")].map((row) => ({
    channel: row.dataset.channel,
    position: row.querySelector(".position").textContent,
    count: Number(row.querySelector(".count").textContent),
    price: row.querySelector(".price").textContent,
  })),
  log: [...document.querySelectorAll("#log li")].map((item) => item.className),
}))()"""


class DevTools:
    """One page of a browser, over the Chrome DevTools protocol."""

    def __init__(self, socket: ClientConnection) -> None:
        self.socket = socket
        self._ids = itertools.count(1)

    def call(self, method: str, timeout: float = 15, **params: Any) -> dict[str, Any]:
        number = next(self._ids)
        self.socket.send(json.dumps({"id": number, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.socket.recv(timeout=max(0.01, deadline - time.monotonic())))
            if message.get("id") == number:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_until(self, what: str, check: Any, timeout: float = 30) -> dict[str, Any]:
        """Read the page until ``check(view)`` holds; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        view: dict[str, Any] = {}
        while time.monotonic() < deadline:
            view = self.evaluate(READ_PAGE) or {}
            if view and check(view):
                return view
            time.sleep(0.2)
        raise AssertionError(f"the page never showed {what}: {view}")


@contextmanager
def browser_page(browser: str) -> Iterator[DevTools]:
    """Headless Chromium with one blank page, driven over DevTools."""
    # ignore_cleanup_errors: Chromium may still be writing its profile as it exits.
    # Chromium may still be writing its profile as it exits: clean up what can be.
    profiles = tempfile.TemporaryDirectory(prefix="odin-chromium-", ignore_cleanup_errors=True)
    with profiles as profile:
        process = subprocess.Popen(
            [browser, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run", "--hide-scrollbars",
             "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
             f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            active = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + 30
            while not active.exists() or len(active.read_text().splitlines()) < 2:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise AssertionError("chromium did not open its DevTools port")
                time.sleep(0.1)
            port = int(active.read_text().splitlines()[0])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as got:
                targets = json.load(got)
            page = next(target for target in targets if target["type"] == "page")
            with ws_connect(page["webSocketDebuggerUrl"], max_size=None) as socket:
                yield DevTools(socket)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def positioned(view: dict[str, Any]) -> bool:
    """Every simulated channel has a row with a position (epoch:seq) and a price."""
    shown = {row["channel"]: row for row in view["rows"]}
    return (
        view["state"] == "connected"
        and all(f"{token}.trade" in shown for token in TOKENS)
        and all(":" in row["position"] and row["price"] != "—" for row in shown.values())
    )


def test_the_live_page_shows_positions_and_recovers_after_a_drop() -> None:
    browser = chromium()
    if not CLIENT.exists():
        pytest.skip("clients/js/src/odin-client.js is not there yet")
    args = ["serve", "--port", "0", "--broker", "memory", "--simulate", "--rate", "25"]
    with odin_process(args) as odin, browser_page(browser) as page:
        odin.follow()
        address = odin.wait_for("listening")["http"][0] + "/"
        page.call("Emulation.setDeviceMetricsOverride", width=1100, height=900,
                  deviceScaleFactor=1, mobile=False)  # fmt: skip
        page.call("Page.navigate", url=address)
        before = page.wait_until("a row with a position for every channel", positioned)
        assert page.evaluate('document.getElementById("drop").disabled') is False
        page.evaluate('document.getElementById("drop").click()')
        after = page.wait_until(
            "a recovery after the drop",
            lambda view: "recovered" in view["log"] and positioned(view),
        )
        assert "dropped" in after["log"]
        assert "gap" not in after["log"]  # recovered from its positions: nothing missed
        assert "reset" not in after["log"]
        counts = {row["channel"]: row["count"] for row in before["rows"]}
        assert all(row["count"] >= counts[row["channel"]] for row in after["rows"])
        page.wait_until("more events after the recovery", lambda view: all(
            row["count"] > counts[row["channel"]] + 2 for row in view["rows"]
        ))  # fmt: skip
        height = page.evaluate("document.documentElement.scrollHeight")
        page.call("Emulation.setDeviceMetricsOverride", width=1100, height=int(height),
                  deviceScaleFactor=1, mobile=False)  # fmt: skip
        # Rows flash as their events come; with reduced motion (the page honours it) they
        # do not, so the picture shows the table as it reads between events.
        page.call(
            "Emulation.setEmulatedMedia",
            features=[{"name": "prefers-reduced-motion", "value": "reduce"}],
        )
        time.sleep(1.0)  # a flash under way ends: no event tells it, a screenshot is no test
        shot = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
    assert shot.startswith(b"\x89PNG")
    if os.environ.get("ODIN_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        SCREENSHOT.write_bytes(shot)
    else:
        Path(tempfile.mkdtemp(prefix="odin-live-page-"), "live-page.png").write_bytes(shot)
