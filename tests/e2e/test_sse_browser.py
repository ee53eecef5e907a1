"""Server-Sent Events in a real browser: headless Chromium's own ``EventSource``, on a page of
another origin (so through CORS), reads ``/sse`` from an Odin on a real nats-server. That
Odin is stopped while events are published (through a second Odin's HTTP publish API) and
started again on the same port; the browser reconnects by itself with ``Last-Event-ID`` and
must end with every event of its channels exactly once, each linked to the one before."""

from __future__ import annotations

import json
import signal
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.process import odin_process
from tests.e2e.test_browser import chromium, page_server
from tests.e2e.test_page_browser import browser_page
from tests.nats.support import NatsServer

pytestmark = pytest.mark.slow

KEY = "sse-browser-test-key-0123"
PAGE = """<!doctype html><meta charset="utf-8"><title>sse</title><script>
window.seen = []; window.errors = 0; window.hints = [];
const source = new EventSource(%(url)s);
source.onmessage = (e) => {
  const m = JSON.parse(e.data);
  window.seen.push({channel: m.channel, seq: m.seq, prev: m.prev, id: e.lastEventId});
};
source.addEventListener("reconnect", (e) => window.hints.push(JSON.parse(e.data).after_ms));
source.onerror = () => { window.errors += 1; };
</script>"""
READ = "JSON.stringify({seen: window.seen || [], errors: window.errors, hints: window.hints})"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def publish(port: int, channel: str, n: int) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/publish",
        data=json.dumps({"channel": channel, "data": {"n": n}}).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200


def test_eventsource_resumes_exactly_through_a_server_restart(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    browser = chromium()
    nats = ["--broker", "nats", "--nats-url", nats_server.url]
    port = free_port()
    reader = ["serve", "--port", str(port), *nats, "--set", "server.cors_allow_origin=*",
              "--set", "shutdown.reconnect_min_ms=200",
              "--set", "shutdown.reconnect_max_ms=400"]  # fmt: skip
    publisher = ["serve", "--port", "0", *nats,
                 "--set", "publish.enabled=true", "--set", f"publish.api_keys={KEY}"]  # fmt: skip
    url = json.dumps(f"http://127.0.0.1:{port}/sse?channels=BTC.*")
    published: list[str] = []

    def send(channel: str) -> None:
        publish(publisher_port, channel, len(published))
        published.append(channel)

    with (
        odin_process(publisher) as other,
        page_server(PAGE % {"url": url}) as (page_url, _, _),
        browser_page(browser) as page,
    ):
        other.follow()
        publisher_port = int(other.wait_for("listening", timeout=30)["http"][0].rsplit(":", 1)[1])
        other.wait_for("broker_ready", timeout=30)

        def view() -> dict[str, Any]:
            return json.loads(page.evaluate(READ))  # type: ignore[no-any-return]

        def wait_seen(count: int, what: str) -> dict[str, Any]:
            return _wait(page, lambda: view(), lambda v: len(v["seen"]) >= count, what)

        with odin_process(reader) as odin:
            odin.follow()
            odin.wait_for("broker_ready", timeout=30)
            page.call("Page.navigate", url=page_url)
            odin.wait_for("subscribe", timeout=30)
            for channel in ("BTC.trade", "BTC.social", "BTC.trade"):
                send(channel)
            wait_seen(3, "the first three events")
            odin.signal(signal.SIGTERM)
            assert odin.process.wait(timeout=30) == 0
        # Published while the browser's server is down: it must get the BTC ones after.
        for channel in ("BTC.trade", "ETH.trade", "BTC.metadata", "BTC.trade"):
            send(channel)
        with odin_process(reader) as odin:
            odin.follow()
            odin.wait_for("broker_ready", timeout=30)
            odin.wait_for("recover", timeout=60)
            send("BTC.social")
            wanted = [channel for channel in published if channel.startswith("BTC.")]
            final = wait_seen(len(wanted), "every BTC event after the restart")
    seen = final["seen"]
    assert [event["channel"] for event in seen] == wanted
    assert len({event["seq"] for event in seen}) == len(seen)  # no duplicates
    last: dict[str, int] = {}
    for event in seen:  # each linked to the one before on its channel: nothing missed
        assert event["prev"] == last.get(event["channel"], 0), (event, seen)
        last[event["channel"]] = event["seq"]
    # The cursor never runs ahead of what arrived (a resume may claim less, never more),
    # and the live event after the recovery carries its own position.
    cursors = [int(event["id"].rsplit(":", 1)[1]) for event in seen]
    assert all(cursor <= event["seq"] for cursor, event in zip(cursors, seen, strict=True))
    assert cursors == sorted(cursors)
    assert cursors[-1] == seen[-1]["seq"]
    assert final["hints"], "the drain's reconnect event reached the page"
    assert final["errors"] >= 1  # the browser saw the stream end, and came back by itself


def _wait(page: Any, read: Any, check: Any, what: str, timeout: float = 60) -> dict[str, Any]:
    import time

    deadline = time.monotonic() + timeout
    current: dict[str, Any] = {}
    while time.monotonic() < deadline:
        current = read()
        if check(current):
            return current
        time.sleep(0.1)
    raise AssertionError(f"the page never showed {what}: {current}")
