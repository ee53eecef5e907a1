"""docker-compose.yml and docker-compose.prod.yml, checked without a Docker engine.

The official Compose v2 binary validates both files (and must refuse a broken copy, so the
check can fail); then the files are read as YAML and held against the application itself:
its port, its endpoints, its settings' environment names, the monitoring files they mount
and the scrape targets Prometheus is given.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from odin_fanout.cli import build_parser
from odin_fanout.config import Config
from odin_fanout.host.supervisor import STOP_GRACE
from odin_fanout.publisher.config import PublisherConfig
from odin_fanout.version import __version__
from tests.deploy.tools import (
    COMPOSE,
    COMPOSE_PROD,
    ENV_EXAMPLE,
    ROOT,
    compose_binary,
    output,
    publisher_paths,
    publisher_settings,
    run,
    seconds,
    server_paths,
    server_settings,
)

Service = dict[str, Any]

BASE: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
PROD: dict[str, Any] = yaml.safe_load(COMPOSE_PROD.read_text())
SERVICES: dict[str, Service] = BASE["services"]
PROMETHEUS = ROOT / "monitoring" / "prometheus" / "prometheus.yml"

# The names the monitoring configuration refers to (Prometheus targets, Grafana's data
# sources, Alloy's filter), and the proxy in front of the odin replicas.
EXPECTED_SERVICES = {
    "odin", "proxy", "publisher", "nats", "nats-exporter", "prometheus", "grafana", "loki",
    "alloy",
}  # fmt: skip


def environment(service: Service) -> dict[str, str]:
    raw = service.get("environment", {})
    if isinstance(raw, list):
        pairs = (item.split("=", 1) for item in raw)
        return {key: value for key, value in pairs}
    return {key: "" if value is None else str(value) for key, value in raw.items()}


def container_ports(service: Service) -> set[int]:
    """The ports the service listens on inside the compose network."""
    ports = {int(port) for port in service.get("expose", [])}
    for spec in service.get("ports", []):
        target = spec["target"] if isinstance(spec, dict) else str(spec).rsplit(":", 1)[-1]
        ports.add(int(str(target).split("/")[0]))
    return ports


def healthcheck_text(service: Service) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else str(test)


# ---- the Compose binary ------------------------------------------------------------------


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_PROD]], ids=["base", "base+prod"])
def test_compose_accepts_the_files(files: list[Path]) -> None:
    binary = compose_binary()
    arguments = [argument for path in files for argument in ("-f", str(path))]
    result = run(binary, *arguments, "--env-file", str(ENV_EXAMPLE), "config", "-q")
    assert result.returncode == 0, output(result)


def test_compose_refuses_a_broken_copy(tmp_path: Path) -> None:
    binary = compose_binary()
    text = COMPOSE.read_text()
    assert "    healthcheck:\n" in text
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace("    healthcheck:\n", "    healtcheck:\n", 1))
    result = run(
        binary, "-f", str(broken), "--project-directory", str(ROOT),
        "--env-file", str(ENV_EXAMPLE), "config", "-q",
    )  # fmt: skip
    assert result.returncode != 0
    assert "healtcheck" in output(result)


def test_compose_refuses_to_start_grafana_without_a_password(tmp_path: Path) -> None:
    binary = compose_binary()
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = run(binary, "-f", str(COMPOSE), "--env-file", str(empty), "config", "-q")
    assert result.returncode != 0
    assert "GRAFANA_ADMIN_PASSWORD" in output(result)


# ---- the files against the application -------------------------------------------------------


def test_the_services_are_the_ones_the_monitoring_names() -> None:
    assert set(SERVICES) == EXPECTED_SERVICES


def test_every_image_is_pinned_to_an_exact_version() -> None:
    exact = re.compile(r"v?\d+\.\d+\.\d+(-[a-z0-9.]+)?")
    for name, service in SERVICES.items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{name}: {image} has no tag"
        assert exact.fullmatch(tag), f"{name}: {image} is not pinned to an exact version"
        if "build" in service:
            # The images built here are tagged with the package's version.
            assert tag == __version__, f"{name}: {image}, but the package is {__version__}"


def test_odin_port_and_health_check_match_the_server() -> None:
    odin = SERVICES["odin"]
    port = Config().server.port
    env = environment(odin)
    assert int(env["ODIN_SERVER_PORT"]) == port
    assert env["ODIN_SERVER_HOST"] == "0.0.0.0"
    assert port in container_ports(odin)
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/[a-z]+)", healthcheck_text(odin))
    assert url is not None, healthcheck_text(odin)
    assert int(url.group(1)) == port
    assert url.group(2) in {"/health", "/ready"} & server_paths()
    # The replicas share the proxy's host port; a host port of their own would stop --scale.
    assert "ports" not in odin
    assert env["ODIN_NATS_URL"].startswith("nats://nats:")
    # Odin derives its connection limit from its memory limit: setting it here would not.
    assert "ODIN_SERVER_MAX_CONNECTIONS" not in env


def test_the_publisher_port_and_health_check_match_the_publisher() -> None:
    publisher = SERVICES["publisher"]
    port = PublisherConfig().http.port
    env = environment(publisher)
    assert int(env["ODIN_PUBLISHER_HTTP_PORT"]) == port
    assert port in container_ports(publisher)
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/[a-z]+)", healthcheck_text(publisher))
    assert url is not None
    assert int(url.group(1)) == port
    assert url.group(2) in publisher_paths()
    # The control API has no authentication: never published beyond the host.
    assert all(str(spec).startswith("127.0.0.1:") for spec in publisher["ports"])


def test_every_odin_environment_variable_names_a_real_setting() -> None:
    server, publisher = server_settings(), publisher_settings()
    for name, service in SERVICES.items():
        for key in environment(service):
            if name == "publisher":
                assert key in publisher, f"publisher: {key} is not a publisher setting"
            elif key.startswith("ODIN_"):
                assert name == "odin", f"{name}: {key} is set outside odin"
                assert key in server, f"odin: {key} is not a server setting"


def test_every_mounted_host_path_exists_in_the_repository() -> None:
    declared = set(BASE.get("volumes", {}))
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":", 1)[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
            elif source.startswith("/"):
                # Alloy reads the containers' logs through the Docker API, read-only.
                assert name == "alloy", f"{name}: host path {source}"
                assert volume == "/var/run/docker.sock:/var/run/docker.sock:ro"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
        build = service.get("build")
        if build is not None:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file()


def test_prometheus_scrapes_the_ports_the_services_listen_on() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    # The alert rules and dashboards select on these job names.
    assert {"odin", "odin-publisher", "nats"} <= set(jobs)
    for job in jobs.values():
        targets = [
            tuple(target.rsplit(":", 1))
            for static in job.get("static_configs", [])
            for target in static["targets"]
        ]
        targets += [
            (name, str(dns["port"]))
            for dns in job.get("dns_sd_configs", [])
            for name in dns["names"]
        ]
        assert targets, job["job_name"]
        for host, port in targets:
            assert host in SERVICES, f"{job['job_name']}: no service {host}"
            assert int(port) in container_ports(SERVICES[host]), f"{job['job_name']}: {host}:{port}"
    # Every replica: Docker's DNS answers the service name with one address per replica.
    assert jobs["odin"]["dns_sd_configs"][0]["port"] == Config().server.port


def test_grafana_and_alloy_point_at_the_compose_services() -> None:
    monitoring = ROOT / "monitoring"
    datasources = yaml.safe_load(
        (monitoring / "grafana" / "provisioning" / "datasources" / "datasources.yml").read_text()
    )
    urls = [source["url"] for source in datasources["datasources"]]
    urls += re.findall(r'url\s*=\s*"([^"]+)"', (monitoring / "alloy" / "config.alloy").read_text())
    assert len(urls) == 3
    for url in urls:
        match = re.match(r"http://([a-z-]+):(\d+)", url)
        assert match is not None, url
        host, port = match.group(1), int(match.group(2))
        assert port in container_ports(SERVICES[host]), url
    keep = re.search(r'regex\s*=\s*"([^"]+)"', (monitoring / "alloy" / "config.alloy").read_text())
    assert keep is not None
    assert set(keep.group(1).split("|")) == {"odin", "publisher"}


def test_odin_has_a_file_limit_a_memory_limit_and_time_to_drain() -> None:
    odin = SERVICES["odin"]
    nofile = odin["ulimits"]["nofile"]
    assert nofile["soft"] == nofile["hard"] >= 100_000
    limits = odin["deploy"]["resources"]["limits"]
    assert re.fullmatch(r"\d+[MG]", limits["memory"]), limits
    # docker stop sends SIGTERM, then SIGKILL after the grace period: the workers' drain
    # must fit, and so must the supervisor's kill of a worker that outlives it.
    grace = seconds(odin["stop_grace_period"])
    assert grace > Config().shutdown.drain_timeout + STOP_GRACE


def test_odin_runs_a_worker_per_cpu_of_its_quota_in_one_container() -> None:
    odin = SERVICES["odin"]
    command = odin["command"]
    assert isinstance(command, list), command
    # The image's entry point is odin: the command is its arguments, as the CLI parses them.
    args = build_parser().parse_args(command)
    assert args.command == "serve"
    # 0: as many workers as the container's CPU quota (rounded up) allows.
    assert args.workers == 0
    assert "ODIN_SERVER_WORKERS" not in environment(odin)
    cpus = float(odin["deploy"]["resources"]["limits"]["cpus"])
    assert math.ceil(cpus) >= 2, "one worker is what a single process gives: no supervisor"
    # docker stop's SIGTERM must reach the supervisor alone (an init that signals only its
    # child): a worker given SIGTERM by Docker and again by its supervisor would cut its
    # drain short.
    assert odin["init"] is True
    assert "command" not in PROD["services"]["odin"]


def test_every_service_has_a_health_check_and_waits_for_what_it_needs() -> None:
    for name, service in SERVICES.items():
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), name
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on without conditions"
        for dependency, condition in depends.items():
            assert dependency in SERVICES
            assert condition["condition"] in {"service_healthy", "service_started"}
    for name in ("odin", "publisher", "nats-exporter"):
        assert SERVICES[name]["depends_on"]["nats"]["condition"] == "service_healthy"


def test_no_secret_is_written_in_the_compose_files() -> None:
    secret = re.compile(r"PASSWORD|SECRET|_TOKEN$|_KEY$|CREDENTIAL")
    interpolation = re.compile(r"\$\{[A-Z_][A-Z0-9_]*(:?[-?][^}]*)?\}")
    for name, service in SERVICES.items():
        for key, value in environment(service).items():
            if secret.search(key):
                assert interpolation.fullmatch(value), f"{name}: {key} has a literal value"
                assert ":-" not in value, f"{name}: {key} has a default value"
    for path in (COMPOSE, COMPOSE_PROD):
        assert "GF_SECURITY_ADMIN_PASSWORD=" not in path.read_text()
    # The real values live in .env: never committed, never sent to an image build.
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    patterns = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    # Everything is left out of the build context but what is named back in.
    assert patterns[0] == "*"
    assert not [pattern for pattern in patterns if pattern.startswith("!.env")]


def test_env_example_defines_every_variable_the_files_use() -> None:
    defined = {
        line.split("=", 1)[0]
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line and not line.startswith("#")
    }
    used = set(
        re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", COMPOSE.read_text() + COMPOSE_PROD.read_text())
    )
    assert used == defined


def test_the_production_override_pins_restarts_logs_and_resources() -> None:
    prod: dict[str, Service] = PROD["services"]
    assert set(prod) == set(SERVICES)
    for name, service in prod.items():
        assert service["restart"] in {"always", "unless-stopped"}, name
        logging = service["logging"]
        assert logging["driver"] == "json-file", name
        assert {"max-size", "max-file"} <= set(logging["options"]), name
        resources = service["deploy"]["resources"]
        assert resources["limits"]["memory"] == resources["reservations"]["memory"], name
        assert resources["limits"]["cpus"] == resources["reservations"]["cpus"], name
        # The override restates the base file's limits rather than silently changing them.
        base = SERVICES[name]["deploy"]["resources"]["limits"]
        assert resources["limits"] == base, name
