"""TLS on the client listener (``server.tls_cert``, ``server.tls_key``): real clients that
verify the certificate, refusals, and a reload that swaps the certificate for new connections
while open ones keep theirs."""

from __future__ import annotations

import json
import ssl
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme
from websockets.sync.client import connect
from websockets.typing import Subprotocol

from odin_fanout.config import Config, ConfigError, load_config
from odin_fanout.server.reload import apply, plan_reload
from odin_fanout.server.tls import server_context
from tests.helpers import Harness, capture_logs, make_config, open_client, running_server

pytestmark = pytest.mark.trio


def write_cert(ca: trustme.CA, directory: Path, name: str) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost signed by ``ca``: (cert, key) files."""
    issued = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    for blob in issued.cert_chain_pems:
        with cert.open("ab") as out:
            out.write(blob.bytes())
    issued.private_key_pem.write_to_path(str(key))
    return cert, key


def client_context(*cas: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    for ca in cas:
        ca.configure_trust(context)
    return context


def der(path: Path) -> bytes:
    """The (first) certificate of a PEM file, as a peer presents it."""
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def peer_der(stream: trio.abc.Stream) -> bytes:
    """The certificate the server presented on ``stream``."""
    assert isinstance(stream, trio.SSLStream)
    presented = stream.getpeercert(binary_form=True)
    assert isinstance(presented, bytes)
    return presented


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def files(ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path]:
    return write_cert(ca, tmp_path, "server")


def tls_config(cert: Path, key: Path, **overrides: object) -> Config:
    return make_config(**{"server.tls_cert": str(cert), "server.tls_key": str(key), **overrides})


def tls_stream(port: int, context: ssl.SSLContext) -> Callable[[], Awaitable[trio.abc.Stream]]:
    async def open_stream() -> trio.abc.Stream:
        return await trio.open_ssl_over_tcp_stream(
            "127.0.0.1", port, ssl_context=context, https_compatible=True
        )

    return open_stream


async def handshake(port: int, context: ssl.SSLContext) -> None:
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)
    try:
        await stream.do_handshake()
    finally:
        await trio.aclose_forcefully(stream)


def rejected(harness: Harness, reason: str) -> float:
    value = harness.context.metrics.registry.get_sample_value(
        "odin_connections_rejected_total", {"reason": reason}
    )
    return float(value or 0.0)


async def test_a_verifying_client_connects_with_wss(
    ca: trustme.CA, files: tuple[Path, Path]
) -> None:
    async with running_server(tls_config(*files)) as harness:
        assert harness.listening.websocket[0].startswith("wss://127.0.0.1:")
        assert harness.listening.http[0].startswith("https://127.0.0.1:")
        async with open_client(tls_stream(harness.port, client_context(ca))) as client:
            assert client.hello["type"] == "hello"
            await client.send({"type": "subscribe", "data": {"channels": ["BTC.trade"]}})
            reply = await client.recv()
            assert reply["type"] != "error", reply


async def test_the_websockets_library_verifies_the_certificate(
    ca: trustme.CA, files: tuple[Path, Path]
) -> None:
    async with running_server(tls_config(*files)) as harness:
        url = harness.listening.websocket[0]

        def exchange() -> str:
            with connect(
                url,
                ssl=client_context(ca),
                subprotocols=[Subprotocol("odin.v1")],
                open_timeout=5,
            ) as ws:
                message = ws.recv(timeout=5)
                assert isinstance(message, str)
                return message

        with trio.fail_after(10):
            hello = json.loads(await trio.to_thread.run_sync(exchange))
        assert hello["type"] == "hello"


async def test_a_client_that_does_not_trust_the_ca_fails(files: tuple[Path, Path]) -> None:
    async with running_server(tls_config(*files)) as harness:
        stranger = client_context(trustme.CA())
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError) as caught:
            await handshake(harness.port, stranger)
        assert isinstance(caught.value.__cause__, ssl.SSLCertVerificationError)
        await trio.testing.wait_all_tasks_blocked()
        assert rejected(harness, "tls") == 1


async def test_a_tls_1_1_client_is_refused_and_counted(
    ca: trustme.CA, files: tuple[Path, Path]
) -> None:
    old = client_context(ca)
    with warnings.catch_warnings():  # asking for TLS 1.1 is deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with capture_logs() as logs:
        async with running_server(tls_config(*files)) as harness:
            for _ in range(3):
                with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
                    await handshake(harness.port, old)
                await trio.testing.wait_all_tasks_blocked()
            assert rejected(harness, "tls") == 3
    # At most one line a second, whatever the number of failures.
    assert [entry["event"] for entry in logs].count("tls_handshake_failed") == 1


async def test_plain_ws_on_the_tls_port_gets_no_upgrade(files: tuple[Path, Path]) -> None:
    async with running_server(tls_config(*files)) as harness:
        stream = await trio.open_tcp_stream("127.0.0.1", harness.port)
        with trio.fail_after(5):
            await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
            data = await stream.receive_some(4096)
            while data.startswith(b"\x15") and (more := await stream.receive_some(4096)):
                data += more
        assert not data.startswith(b"HTTP/")  # a TLS alert, or nothing: never an answer
        await stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert rejected(harness, "tls") == 1


async def test_a_reload_swaps_the_certificate_for_new_connections_only(
    ca: trustme.CA, files: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, key = files
    second_ca = trustme.CA()
    new_cert, new_key = write_cert(second_ca, tmp_path, "renewed")
    trusting = client_context(ca, second_ca)
    config = tls_config(cert, key)
    first = der(cert)
    async with (
        running_server(config) as harness,
        open_client(tls_stream(harness.port, trusting)) as before,
    ):
        assert peer_der(before.stream) == der(cert)
        # A renewal: new contents under the same file names.
        cert.write_bytes(new_cert.read_bytes())
        key.write_bytes(new_key.read_bytes())
        outcome = plan_reload(harness.context.config, tls_config(cert, key))
        assert outcome.changed == [] and outcome.restart_required == []
        apply(harness.context, outcome)
        async with open_client(tls_stream(harness.port, trusting)) as after:
            assert peer_der(after.stream) == der(new_cert)
        # The connection opened before still works, on its old certificate.
        await before.send({"type": "subscribe", "data": {"channels": ["BTC.trade"]}})
        assert (await before.recv())["type"] != "error"
        assert peer_der(before.stream) == first


async def test_a_reload_to_other_files_is_live(
    ca: trustme.CA, files: tuple[Path, Path], tmp_path: Path
) -> None:
    new_cert, new_key = write_cert(ca, tmp_path, "other")
    async with running_server(tls_config(*files)) as harness:
        outcome = plan_reload(harness.context.config, tls_config(new_cert, new_key))
        assert outcome.changed == ["server.tls_cert", "server.tls_key"]
        apply(harness.context, outcome)
        async with open_client(tls_stream(harness.port, client_context(ca))) as client:
            assert peer_der(client.stream) == der(new_cert)


async def test_a_bad_certificate_on_reload_keeps_the_running_one(
    ca: trustme.CA, files: tuple[Path, Path]
) -> None:
    cert, key = files
    original = cert.read_bytes()
    async with running_server(tls_config(cert, key)) as harness:
        cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot a certificate\n")
        outcome = plan_reload(harness.context.config, tls_config(cert, key))
        with pytest.raises(ConfigError) as caught:
            apply(harness.context, outcome)
        assert caught.value.problems[0].startswith("server.tls_cert: ")
        cert.write_bytes(original)  # the file is fixed; the server never stopped serving
        async with open_client(tls_stream(harness.port, client_context(ca))) as client:
            assert peer_der(client.stream) == der(cert)


async def test_turning_tls_on_or_off_needs_a_restart(files: tuple[Path, Path]) -> None:
    plain = make_config()
    secured = tls_config(*files)
    assert plan_reload(plain, secured).restart_required == ["server.tls_cert", "server.tls_key"]
    assert plan_reload(secured, plain).restart_required == ["server.tls_cert", "server.tls_key"]


async def test_cert_and_key_go_together(files: tuple[Path, Path]) -> None:
    cert, key = files
    with pytest.raises(ConfigError) as caught:
        load_config(environ={}, overrides={"server.tls_cert": str(cert)})
    assert caught.value.problems == ["server.tls_key: tls_cert is set, its private key must be too"]
    with pytest.raises(ConfigError) as caught:
        load_config(environ={}, overrides={"server.tls_key": str(key), "server.tls_cert": "/nope"})
    assert caught.value.problems == ["server.tls_cert: no such file: /nope"]


async def test_a_key_that_does_not_match_is_a_config_error(
    ca: trustme.CA, files: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, _ = files
    _, other_key = write_cert(ca, tmp_path, "other")
    config, _ = load_config(
        environ={}, overrides={"server.tls_cert": str(cert), "server.tls_key": str(other_key)}
    )
    with pytest.raises(ConfigError) as caught:
        server_context(config.server)
    assert caught.value.problems[0].startswith("server.tls_cert: cannot use ")


async def test_modern_defaults(files: tuple[Path, Path]) -> None:
    config = tls_config(*files)
    context = server_context(config.server)
    assert context is not None
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert server_context(make_config().server) is None
