"""The monitoring is checked against the real thing: promtool checks the configuration, the
rules and their unit tests; a real Prometheus scrapes a running Odin server (with clients and
events) and the publisher, and every PromQL expression of the dashboards and alert rules must
return data; every LogQL query of the dashboards must parse with Grafana's own LogQL grammar;
and every log line the server and the publisher wrote is one JSON object as documented."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from tests.e2e.process import ROOT, OdinProcess, odin_process, port_of
from tests.helpers import open_client

pytestmark = pytest.mark.slow

MONITORING = ROOT / "monitoring"
RULES = MONITORING / "prometheus" / "rules" / "odin.yml"
DASHBOARDS = sorted((MONITORING / "grafana" / "dashboards").glob("*.json"))
LOGS_DOC = (ROOT / "docs" / "operations" / "logs.md").read_text()
REQUIRED = os.environ.get("ODIN_REQUIRE_MONITORING_TOOLS") == "1"
"""CI sets it: there a missing promtool, prometheus or LogQL parser fails instead of skipping."""


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        message = f"{name} is not installed (Debian's prometheus package; .ci/run installs it)"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    return found


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args], input=stdin, capture_output=True, text=True, timeout=60,
        check=False, cwd=ROOT,
    )  # fmt: skip


# ---- promtool ------------------------------------------------------------------------------


def test_the_prometheus_configuration_and_rules_are_valid() -> None:
    for args in (
        ("check", "config", "monitoring/prometheus/prometheus.yml"),
        ("check", "rules", "monitoring/prometheus/rules/odin.yml"),
    ):
        result = promtool(*args)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_alert_rules_pass_their_unit_tests() -> None:
    result = promtool("test", "rules", "monitoring/prometheus/tests/odin_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


# ---- a real Prometheus against a running Odin and publisher ---------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_json(url: str, timeout: float = 5) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def wait_for(check: Any, timeout: float, what: str) -> Any:
    """Poll ``check()`` until it returns something true (bounded; Prometheus offers no event
    to wait on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
        except (OSError, ValueError, KeyError):
            result = None
        if result:
            return result
        time.sleep(0.2)  # other processes (Prometheus, Grafana): polled, bounded
    raise TimeoutError(f"timed out waiting for {what}")


@pytest.fixture(scope="module", params=[1, 2], ids=["one process", "2 workers"])
def stack(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """Odin (embedded NATS, simulated events), the publisher on the same NATS, clients on
    Odin, and Prometheus scraping them every second with the project's rules. Once as one
    process, once as ``--workers 2``: the dashboards and alerts must work unchanged for
    both (each scrape answered by whichever worker takes it)."""
    workers: int = request.param
    workdir = Path(tempfile.mkdtemp(prefix="odin-monitoring-"))
    prometheus_binary = tool("prometheus")
    args = ["serve", "--port", "0", "--simulate", "--rate", "50", "--workers", str(workers)]
    with odin_process(args) as odin:
        odin.follow()
        odin_port = port_of(odin.wait_for("listening"))
        nats_url = odin.wait_for("nats_embedded_started")["url"]
        for slot in range(workers) if workers > 1 else [None]:
            odin.wait_for("broker_ready", worker=slot)
        publisher_args = ["--port", "0", "--nats-url", nats_url, "--autostart", "--rate", "20",
                          "--set", "simulation.statistics_interval=1s"]  # fmt: skip
        with odin_process(publisher_args, module="odin_fanout.publisher") as publisher:
            publisher_url = publisher.wait_for("listening")["urls"][0]
            publisher_port = int(publisher_url.rsplit(":", 1)[1])
            prometheus_port = free_port()
            config = workdir / "prometheus.yml"
            jobs = {"odin": odin_port, "odin-publisher": publisher_port, "nats": free_port()}
            config.write_text(yaml.safe_dump({
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [
                    {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                    for job, port in jobs.items()
                ],
            }))  # fmt: skip
            with (workdir / "prometheus.log").open("w") as log:
                prometheus = subprocess.Popen(
                    [prometheus_binary, f"--config.file={config}",
                     f"--storage.tsdb.path={workdir / 'data'}",
                     f"--web.listen-address=127.0.0.1:{prometheus_port}"],
                    stdout=subprocess.DEVNULL, stderr=log,
                )  # fmt: skip
            try:
                base = f"http://127.0.0.1:{prometheus_port}"
                trio.run(drive_clients, odin_port)
                wait_for(lambda: urllib.request.urlopen(f"{base}/-/ready", timeout=2).status == 200,
                         30, "Prometheus to be ready")  # fmt: skip
                # A few scrapes and rule evaluations, so rates and recording rules have data.
                wait_for(lambda: query(base, "count(instance:odin_deliveries:rate1m)"), 60,
                         "the recording rules to have data")  # fmt: skip
                yield {"prometheus": base, "odin": odin, "publisher": publisher}
            finally:
                prometheus.terminate()
                try:
                    prometheus.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    prometheus.kill()
                    prometheus.wait()
                shutil.rmtree(workdir, ignore_errors=True)


async def drive_clients(port: int) -> None:
    """Clients that subscribe, receive, leave, and come back recovering (some outcomes of
    every kind, so the series of the dashboards have values)."""
    async with open_client(port) as client:
        ack = await client.subscribe(["BTC.trade", "ETH.*"])
        events = await client.events(5)
    position = {"epoch": events[-1]["epoch"], "seq": events[-1]["seq"]}
    stale = {"epoch": "gone", "seq": 1}
    async with open_client(port) as client:
        await client.subscribe(["BTC.trade", "SOL.trade"],
                               recover={"BTC.trade": position, "SOL.trade": stale})  # fmt: skip
        await client.events(3)
    assert ack["type"] == "subscription_ack"


def query(base: str, expr: str) -> list[Any]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    document = http_json(url)
    assert document["status"] == "success", document
    result: list[Any] = document["data"]["result"]
    return result


_COMPARISON = re.compile(r"\s(>|<|==|!=|>=|<=)\s+[^<>=!]+$")


def measured(expr: str) -> str:
    """An alert's expression without its final comparison (a threshold, or another series
    such as ``odin_workers_expected``): what it measures."""
    return _COMPARISON.sub("", expr.strip())


def promql_expressions() -> list[tuple[str, str]]:
    """(where, expression) for every PromQL expression of the dashboards and rules."""
    found: list[tuple[str, str]] = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                if target.get("datasource", {}).get("type") == "prometheus":
                    expr = target["expr"].replace("$instance", ".*")
                    found.append((f"{path.name}: {panel['title']}", expr))
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            name = rule.get("record") or rule.get("alert")
            found.append((f"rules: {name}", measured(rule["expr"])))
    return found


def test_every_dashboard_and_rule_expression_returns_data(stack: dict[str, Any]) -> None:
    # Rates need two scrapes of every target, and the recording rules an evaluation after
    # them: ask again until every expression has data, for a bounded time.
    expressions = promql_expressions()
    deadline = time.monotonic() + 60
    while True:
        empty = [f"{where}: {expr}" for where, expr in expressions
                 if not query(stack["prometheus"], expr)]  # fmt: skip
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert empty == []


def test_every_target_is_scraped_and_odin_metrics_pass_promtool(
    stack: dict[str, Any],
) -> None:
    targets = http_json(f"{stack['prometheus']}/api/v1/targets")["data"]["activeTargets"]
    health = {target["labels"]["job"]: target["health"] for target in targets}
    assert health == {"odin": "up", "odin-publisher": "up", "nats": "down"}
    for job in ("odin", "odin-publisher"):
        url = next(t["scrapeUrl"] for t in targets if t["labels"]["job"] == job)
        with urllib.request.urlopen(url, timeout=5) as response:
            exposition = response.read().decode()
        result = promtool("check", "metrics", stdin=exposition)
        assert result.returncode == 0, f"{job}: {result.stdout}{result.stderr}"


# ---- dashboards ---------------------------------------------------------------------------


def provisioned_datasources() -> dict[str, str]:
    path = MONITORING / "grafana" / "provisioning" / "datasources" / "datasources.yml"
    sources = yaml.safe_load(path.read_text())["datasources"]
    return {source["uid"]: source["type"] for source in sources}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.name)
def test_dashboards_are_well_formed_for_grafana(path: Path) -> None:
    """What Grafana would silently mangle: panels off the 24-column grid or on top of each
    other, duplicate ids, data sources that are not provisioned, undefined variables."""
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"] and dashboard["title"]
    sources = provisioned_datasources()
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert all(isinstance(grid[key], int) for key in ("x", "y", "w", "h")), panel["title"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}  # fmt: skip
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        for target in panel.get("targets", []):
            source = target.get("datasource") or panel.get("datasource")
            assert sources.get(source["uid"]) == source["type"], panel["title"]
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__interval", "__range"}
            assert used <= variables, f"{panel['title']}: {used - variables} undefined"


# ---- LogQL ----------------------------------------------------------------------------------


def test_every_logql_query_of_the_dashboards_parses() -> None:
    parser = ROOT / "tests" / "monitoring" / "logql_check.mjs"
    default = ROOT / ".ci" / "cache" / "logql" / "node_modules"
    modules = os.environ.get("ODIN_LOGQL_MODULES", str(default))
    if not (Path(modules) / "@grafana" / "lezer-logql").exists() or shutil.which("node") is None:
        message = "@grafana/lezer-logql is not installed (.ci/run installs it with npm)"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    queries = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                if target.get("datasource", {}).get("type") == "loki":
                    queries.append(target["expr"])
    assert queries
    result = subprocess.run(
        ["node", str(parser)], input=json.dumps(queries), capture_output=True, text=True,
        timeout=60, check=False, env={**os.environ, "NODE_PATH": modules},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


# ---- log lines ------------------------------------------------------------------------------


def documented_events() -> set[str]:
    return set(re.findall(r"^\| `([a-z_]+)`", LOGS_DOC, re.MULTILINE))


def test_every_log_line_is_one_json_object_as_documented(stack: dict[str, Any]) -> None:
    process: OdinProcess
    events = documented_events()
    assert {"listening", "conn_open", "publishing_started"} <= events
    for name in ("odin", "publisher"):
        process = stack[name]
        process.wait_for("listening", timeout=1)  # reads what is waiting
        assert process.lines, name
        for line in process.lines:
            record = json.loads(line)
            assert isinstance(record, dict), line
            assert {"event", "level", "timestamp", "service"} <= set(record), line
            assert record["level"] in {"debug", "info", "warning", "error"}, line
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", record["timestamp"])
            assert record["event"] in events or "logger" in record, line
