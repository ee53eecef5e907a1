"""``python -m odin_fanout.publisher`` as a real process: configuration sources and their
precedence, credentials masked, bad values refused with 78, and a clean stop on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.e2e.process import ROOT, odin_command, odin_process
from tests.nats.support import NatsServer

pytestmark = pytest.mark.slow

CLEAN_ENV = {
    name: value
    for name, value in os.environ.items()
    if not name.startswith("ODIN_")
    and name not in {"NATS_URL", "PORT", "HOST", "TOKENS", "RATE", "EVENTS", "LOG_LEVEL"}
}


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        odin_command(*args, module="odin_fanout.publisher"),
        cwd=ROOT,
        env={**CLEAN_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_flags_win_over_environment_over_file_and_secrets_are_masked(tmp_path: Path) -> None:
    config = tmp_path / "publisher.toml"
    config.write_text('[http]\nport = 4100\n[simulation]\nrate = 3\nevents = ["social"]\n')
    env = {
        "NATS_URL": "nats://odin:s3cret@nats.internal:4222",
        "PORT": "4200",
        "ODIN_PUBLISHER_HTTP_PORT": "4300",  # the prefixed name wins over the plain one
        "TOKENS": "BTC,ETH",
        "RATE": "5",
    }
    result = run("--config", str(config), "--rate", "7", "--check-config", env=env)
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["http"]["port"] == 4300
    assert effective["simulation"]["rate"] == 7.0  # flag over RATE over the file
    assert effective["simulation"]["tokens"] == ["BTC", "ETH"]  # environment over default
    assert effective["simulation"]["events"] == ["social"]  # file over default
    assert effective["nats"]["url"] == "nats://odin:***@nats.internal:4222"
    assert "s3cret" not in result.stdout


@pytest.mark.parametrize(
    ("args", "env", "field"),
    [
        (["--set", "simulation.rate=-1"], {}, "simulation.rate"),
        ([], {"RATE": "fast"}, "simulation.rate"),
        ([], {"TOKENS": "BTC,bad.one"}, "simulation.tokens"),
        ([], {"NATS_URL": "http://nats:4222"}, "nats.url"),
        ([], {"NATS_URL": ""}, "nats.url"),
        (["--set", "http.nope=1"], {}, "http: unknown setting(s) nope"),
    ],
)
def test_bad_configuration_names_the_field_and_exits_78(
    args: list[str], env: dict[str, str], field: str
) -> None:
    result = run("--check-config", *args, env=env)
    assert result.returncode == 78
    record = json.loads(result.stderr.strip().splitlines()[-1])
    assert record["event"] == "config_invalid"
    assert any(field in problem for problem in record["errors"]), record


def test_the_process_publishes_and_stops_cleanly_on_sigterm(nats_server: NatsServer) -> None:
    args = ["--port", "0", "--nats-url", nats_server.url, "--autostart", "--rate", "50"]
    with odin_process(args, env=CLEAN_ENV, module="odin_fanout.publisher") as publisher:
        listening = publisher.wait_for("listening")
        assert listening["urls"][0].startswith("http://127.0.0.1:")
        publisher.wait_for("publishing_started")
        publisher.wait_for("broker_ready")
        publisher.signal(signal.SIGTERM)
        assert publisher.wait() == 0
        stopped = publisher.wait_for("publishing_stopped")
        assert stopped["reason"] == "request"
        assert publisher.wait_for("exited")["code"] == 0
