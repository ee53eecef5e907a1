"""The documents stay true to the code: every setting, metric, log event, error code and
close code the server has is described where operators and client developers look."""

from __future__ import annotations

import re
from pathlib import Path

import attrs
import pytest
import yaml

from odin_fanout.broker.memory import MemoryBroker
from odin_fanout.config import SECTIONS, env_name
from odin_fanout.control.protocol import KICK_CODES, KICKED
from odin_fanout.control.protocol import ErrorCode as ControlErrorCode
from odin_fanout.metrics import Metrics
from odin_fanout.protocol.close_codes import CloseCode
from odin_fanout.protocol.errors import ErrorCode

ROOT = Path(__file__).resolve().parents[1]
OPERATIONS = (ROOT / "docs" / "operations.md").read_text()
METRICS_DOC = (ROOT / "docs" / "operations" / "metrics.md").read_text()
LOGS_DOC = (ROOT / "docs" / "operations" / "logs.md").read_text()
PROTOCOL = (ROOT / "docs" / "protocol.md").read_text()
CONTROL_DOC = (ROOT / "docs" / "operations" / "control.md").read_text()


def close_code_table() -> dict[int, list[str]]:
    """docs/protocol.md's close-code table: each code's meanings (a code may have several
    rows, one per reason)."""
    section = PROTOCOL.split("\n## Close codes\n", 1)[1].split("\n## ", 1)[0]
    table: dict[int, list[str]] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].isdigit():
            table.setdefault(int(cells[0]), []).append(cells[2])
    return table


def test_every_setting_is_documented_with_its_environment_name() -> None:
    missing = [
        env_name(section, field.name)
        for section, cls in SECTIONS.items()
        for field in attrs.fields(cls)  # type: ignore[arg-type]
        if f"`{env_name(section, field.name)}`" not in OPERATIONS
    ]
    assert missing == []


def test_every_metric_is_documented() -> None:
    metrics = Metrics()
    metrics.watch_broker(MemoryBroker().stats)
    metrics.watch_queues(lambda: [(3, 1.0)], lambda: 2.0)
    names = set()
    for metric in metrics.registry.collect():
        suffix = {"counter": "_total"}.get(metric.type, "")
        names.add(f"`{metric.name}{suffix}`")
    assert "`odin_connection_queue_depth`" in names
    missing = sorted(name for name in names if name not in METRICS_DOC)
    assert missing == []


def test_every_log_event_is_documented() -> None:
    pattern = re.compile(r"\.(?:debug|info|warning|error|exception)\(\s*\"([a-z_]+)\"")
    events = {
        match
        for path in (ROOT / "odin").rglob("*.py")
        for match in pattern.findall(path.read_text())
    }
    assert {"conn_open", "conn_close", "listening", "recover"} <= events
    missing = sorted(event for event in events if f"| `{event}` |" not in LOGS_DOC)
    assert missing == []


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_is_in_the_protocol_doc(code: ErrorCode) -> None:
    assert f"`{code.value}`" in PROTOCOL


@pytest.mark.parametrize("code", list(CloseCode))
def test_every_close_code_is_in_the_protocol_doc(code: CloseCode) -> None:
    meanings = close_code_table().get(int(code), [])
    assert meanings, f"{int(code)} has no row in the close-code table"
    assert all(meanings), f"{int(code)}: a row without its meaning"


def test_every_code_the_console_offers_is_in_the_close_code_table() -> None:
    from odin_fanout.console.screens.confirm import OFFERED_CODES

    # The kick dialog offers what the control protocol accepts by name, the default first.
    assert list(OFFERED_CODES) == [KICKED, *KICK_CODES]
    assert int(CloseCode.KICKED) == KICKED
    table = close_code_table()
    missing = [code for code in OFFERED_CODES if not all(table.get(code, [""]))]
    assert missing == []
    assert any("operator" in meaning for meaning in table[CloseCode.KICKED])


@pytest.mark.parametrize("code", list(ControlErrorCode))
def test_every_control_error_code_is_in_the_control_doc(code: ControlErrorCode) -> None:
    assert f"`{code.value}`" in CONTROL_DOC


def test_readme_starts_with_the_two_setup_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```\n(.+?)\n```", readme, re.DOTALL)
    assert commands[0].endswith("odin serve --simulate")
    assert "tox" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "test-command" in ci


PUBLISHER_DOC = (ROOT / "docs" / "publisher.md").read_text()


def test_every_publisher_setting_is_documented_with_its_environment_name() -> None:
    from odin_fanout.config import sections_of
    from odin_fanout.publisher.config import ALIASES, PREFIX, PublisherConfig

    names = [
        env_name(section, field.name, PREFIX)
        for section, cls in sections_of(PublisherConfig).items()
        for field in attrs.fields(cls)  # type: ignore[arg-type]
    ]
    missing = [name for name in [*names, *ALIASES] if f"`{name}`" not in PUBLISHER_DOC]
    assert missing == []


def test_every_publisher_metric_and_log_event_is_documented() -> None:
    from odin_fanout.broker.base import BrokerStats, BrokerStatus
    from odin_fanout.logs import get_logger
    from odin_fanout.publisher.config import PublisherConfig
    from odin_fanout.publisher.metrics import build_registry
    from odin_fanout.publisher.service import PublisherService

    class Idle:
        def status(self) -> BrokerStatus:
            return BrokerStatus(False, "test")

        def stats(self) -> BrokerStats:
            return BrokerStats()

        async def publish(self, channel: str, payload: bytes, msg_id: str | None = None) -> None:
            raise AssertionError("not publishing")

        def publish_plain(self, subject: str, payload: bytes) -> None:
            raise AssertionError("not publishing")

    service = PublisherService(PublisherConfig().simulation, Idle(), get_logger())
    registry = build_registry(service)
    names = {m.name for m in registry.collect() if m.name.startswith("odin_publisher")}
    assert names
    assert sorted(name for name in names if f"`{name}" not in METRICS_DOC) == []
    pattern = re.compile(r"\.(?:debug|info|warning|error|exception)\(\s*\"([a-z_]+)\"")
    events = {
        match
        for path in (ROOT / "publisher").rglob("*.py")
        for match in pattern.findall(path.read_text())
    }
    assert {"publishing_started", "publishing_stopped"} <= events
    assert sorted(event for event in events if f"| `{event}` |" not in LOGS_DOC) == []


def test_every_alert_has_a_runbook_section() -> None:
    alerts_doc = (ROOT / "docs" / "operations" / "alerts.md").read_text()
    rules = yaml.safe_load((ROOT / "monitoring" / "prometheus" / "rules" / "odin.yml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]
    assert len(alerts) >= 10
    for rule in alerts:
        name = rule["alert"]
        assert f"\n## {name}\n" in alerts_doc, name
        assert rule["annotations"]["runbook"] == f"docs/operations/alerts.md#{name.lower()}"
