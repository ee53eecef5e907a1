"""``odin serve`` with TLS and an ops listener, as a real process: SIGHUP renews the certificate
without dropping the open connection (and a bad file is refused), and under ``--workers 2``
every worker wraps its own connections and answers on the one ops address."""

from __future__ import annotations

import signal
import ssl
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from tests.e2e.process import OdinProcess, odin_process, port_of
from tests.helpers import http_exchange, open_client
from tests.odin.test_tls import (
    client_context,
    der,
    handshake,
    peer_der,
    tls_stream,
    write_cert,
)

pytestmark = [pytest.mark.trio, pytest.mark.slow]

TOKEN = "e2e-metrics-token"


async def wait_for(odin: OdinProcess, event: str, **fields: Any) -> dict[str, Any]:
    return await trio.to_thread.run_sync(lambda: odin.wait_for(event, timeout=30, **fields))


async def scrape(ops_url: str, token: str | None) -> tuple[int, bytes]:
    port = int(ops_url.rsplit(":", 1)[1])
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    request = f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\r\n".encode()
    status, _, body = await http_exchange(port, request)
    return status, body


def write_config(path: Path, cert: Path, key: Path) -> None:
    path.write_text(
        f"[server]\ntls_cert = '{cert}'\ntls_key = '{key}'\nops_listen = '127.0.0.1:0'\n"
    )


async def test_sighup_renews_the_certificate_and_keeps_open_connections(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert, key = write_cert(ca, tmp_path, "server")
    first = der(cert)
    renewed_cert, renewed_key = write_cert(ca, tmp_path, "renewed")
    config = tmp_path / "odin.toml"
    write_config(config, cert, key)
    args = ["serve", "--broker", "memory", "--port", "0", "--config", str(config)]
    trusting = client_context(ca)
    with odin_process(args, {"ODIN_SERVER_METRICS_TOKEN": TOKEN}) as odin:
        listening = await wait_for(odin, "listening")
        assert listening["websocket"][0].startswith("wss://127.0.0.1:")
        assert listening["tls"] is True
        port, ops = port_of(listening), listening["ops"][0]
        assert (await scrape(ops, None))[0] == 401
        status, body = await scrape(ops, TOKEN)
        assert status == 200 and b"odin_connections" in body
        async with open_client(tls_stream(port, trusting)) as before:
            assert peer_der(before.stream) == first
            cert.write_bytes(renewed_cert.read_bytes())
            key.write_bytes(renewed_key.read_bytes())
            odin.signal(signal.SIGHUP)
            reloaded = await wait_for(odin, "config_reloaded")
            assert reloaded["restart_required"] == []
            async with open_client(tls_stream(port, trusting)) as after:
                assert peer_der(after.stream) == der(renewed_cert)

            cert.write_text("not a certificate\n")
            odin.signal(signal.SIGHUP)
            failed = await wait_for(odin, "config_reload_failed")
            assert any(error.startswith("server.tls_cert: ") for error in failed["errors"])
            async with open_client(tls_stream(port, trusting)) as kept:
                assert peer_der(kept.stream) == der(renewed_cert)
            # The connection from before both reloads is still served.
            assert (await before.subscribe(["BTC.trade"]))["count"] == 1
            assert peer_der(before.stream) == first
        odin.signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(odin.wait) == 0


async def test_workers_wrap_their_own_connections_and_share_the_ops_address(
    tmp_path: Path,
) -> None:
    ca = trustme.CA()
    cert, key = write_cert(ca, tmp_path, "server")
    config = tmp_path / "odin.toml"
    write_config(config, cert, key)
    args = ["serve", "--workers", "2", "--port", "0", "--config", str(config)]
    with odin_process(args) as odin:
        odin.follow()
        ready = await wait_for(odin, "workers_ready")
        assert ready["websocket"][0].startswith("wss://")
        ops = {(await wait_for(odin, "listening", worker=slot))["ops"][0] for slot in (0, 1)}
        assert len(ops) == 1  # one address, whichever worker answers
        for slot in (0, 1):
            await wait_for(odin, "broker_ready", worker=slot)
        (ops_url,) = ops
        assert not ops_url.endswith(":0")
        port = port_of(ready)
        trusting = client_context(ca)
        async with (
            open_client(tls_stream(port, trusting)) as one,
            open_client(tls_stream(port, trusting)) as two,
        ):
            assert one.hello["type"] == two.hello["type"] == "hello"
            status, body = await scrape(ops_url, None)
            assert status == 200
            # The host's totals, whichever worker answered.
            opened = [
                line
                for line in body.decode().splitlines()
                if line.startswith("odin_connections_total")
            ]
            assert opened and sum(float(line.rsplit(" ", 1)[1]) for line in opened) >= 2
        with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):
            await handshake(port, ssl.create_default_context())  # the CA is not trusted
