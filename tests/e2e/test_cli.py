"""The command line: configuration sources, validation, exit codes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.e2e.process import ROOT, odin_command, odin_process

pytestmark = pytest.mark.slow


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="odin-state-") as state:
        return subprocess.run(
            odin_command(*args),
            cwd=ROOT,
            env={**os.environ, "XDG_STATE_HOME": state, **(env or {})},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )


def test_check_config_prints_the_effective_config_with_precedence(tmp_path: Path) -> None:
    config = tmp_path / "odin.toml"
    config.write_text(
        '[server]\nport = 4001\nhost = "0.0.0.0"\n[connection]\nidle_timeout = "90s"\n'
    )
    result = run(
        "serve", "--config", str(config), "--port", "4003", "--check-config",
        env={"ODIN_SERVER_PORT": "4002", "ODIN_SERVER_HOST": "127.0.0.2"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["server"]["port"] == 4003  # flag over environment over file
    assert effective["server"]["host"] == "127.0.0.2"  # environment over file
    assert effective["connection"]["idle_timeout"] == 90.0  # file over default
    assert effective["connection"]["max_subscriptions"] == 128  # default


@pytest.mark.parametrize(
    ("args", "env", "field"),
    [
        (["--set", "server.port=abc"], {}, "server.port"),
        ([], {"ODIN_SIMULATOR_ENABLED": "maybe"}, "simulator.enabled"),
        (["--set", "connection.slow_consumer_policy=drop"], {},
         "connection.slow_consumer_policy"),
        (["--set", "connection.idle_timeout=1"], {}, "idle_timeout"),
        (["--set", "server.nope=1"], {}, "server: unknown setting(s) nope"),
        (["--set", "port=1"], {}, "port: expected section.field"),
        (["--nats-url", "http://127.0.0.1:4222"], {}, "'http://127.0.0.1:4222': only nats://"),
        ([], {"ODIN_NATS_URL": "nats://127.0.0.1:42x"}, "url: 'nats://127.0.0.1:42x': the port"),
    ],
)  # fmt: skip
def test_bad_config_names_the_field_and_exits_78(
    args: list[str], env: dict[str, str], field: str
) -> None:
    result = run("serve", "--check-config", *args, env=env)
    assert result.returncode == 78
    record = json.loads(result.stderr.strip().splitlines()[-1])
    assert record["event"] == "config_invalid"
    assert any(field in problem for problem in record["errors"]), record


def test_bad_config_file_exits_78(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\nport = 1")
    assert run("serve", "--config", str(broken)).returncode == 78
    assert run("serve", "--config", str(tmp_path / "missing.toml")).returncode == 78


def test_usage_errors_exit_2_and_version_works() -> None:
    assert run("serve", "--no-such-flag").returncode == 2
    assert run().returncode == 2
    version = run("--version")
    assert version.returncode == 0
    assert version.stdout.startswith("odin ")


def test_port_in_use_is_a_clean_failure() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("serve", "--port", str(port))
    assert result.returncode == 1
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert [r["event"] for r in records[-2:]] == ["start_failed", "exited"]
    assert records[-2]["error"] == f"address 127.0.0.1:{port} already in use (server.port)"
    assert "Traceback" not in result.stderr
    assert "nursery" not in result.stderr


def test_help_speaks_to_users_and_lists_signals_and_exit_codes() -> None:
    for command in (["--help"], ["serve", "--help"], ["demo", "--help"]):
        result = run(*command)
        assert result.returncode == 0
        assert "``" not in result.stdout and "trio" not in result.stdout
        assert "SIGHUP" in result.stdout and "78" in result.stdout


def test_start_logs_a_short_line_every_url_and_the_config_only_at_debug() -> None:
    with odin_process(["serve", "--port", "0"], env={"ODIN_TYPO_SETTING": "1"}) as odin:
        listening = odin.wait_for("listening")
        assert listening["websocket"][0].startswith("ws://127.0.0.1:")
        assert listening["websocket"][0].endswith("/ws")
        assert listening["http"][0].startswith("http://127.0.0.1:")
        starting = next(r for r in odin.records() if r["event"] == "starting")
        assert (starting["broker"], starting["embedded_nats"]) == ("nats", True)
        assert not [r for r in odin.records() if r["event"] == "config"]
        warning = odin.wait_for("config_unknown_environment")
        assert "ODIN_TYPO_SETTING" in warning["names"]
    with odin_process(["serve", "--port", "0", "--log-level", "debug"]) as odin:
        odin.wait_for("listening")
        config = next(r for r in odin.records() if r["event"] == "config")
        assert config["server"]["port"] == 0


def test_lifecycle_events_are_logged_at_any_level() -> None:
    with odin_process(["serve", "--port", "0", "--log-level", "error"]) as odin:
        assert odin.wait_for("listening")["websocket"]
        assert not [r for r in odin.records() if r["event"] == "config"]  # info: filtered


def test_serve_on_a_terminal_prints_where_to_connect(tmp_path: Path) -> None:
    import pty
    import select

    leader, follower = pty.openpty()
    process = subprocess.Popen(
        odin_command("serve", "--broker", "memory", "--port", "0"),
        cwd=ROOT,
        env={**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)},
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=subprocess.DEVNULL,
    )
    os.close(follower)
    seen = b""
    try:
        while b"Ctrl-C" not in seen:
            ready, _, _ = select.select([leader], [], [], 15)
            assert ready, f"nothing printed on the terminal: {seen!r}"
            seen += os.read(leader, 4096)
    finally:
        process.terminate()
        process.wait(timeout=15)
        os.close(leader)
    line = seen.decode()
    assert "Odin is serving clients at ws://127.0.0.1:" in line
    assert "/health" in line and "/metrics" in line
