"""deploy/systemd: the units systemd-analyze verifies, and what they must say.

Two layouts of the server: ``odin.service``, a supervisor with a worker per core on one port,
and the template ``odin@.service``, one single process per port.

``systemd-analyze verify`` refuses a unit whose ExecStart binary is missing, and the units
name /opt/odin/venv/bin/..., where nothing is installed on a test machine. So they are
verified as copies whose ExecStart points into the venv running the tests, which has the
same layout (odin, odin-publisher and nats-server in its bin/): only that prefix differs.
verify exits 0 even when it ignores an unknown or malformed setting, so its output must be
empty as well, and a copy with a misspelt key must be reported.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from odin_fanout.cli import build_parser
from odin_fanout.config import Config
from odin_fanout.host.supervisor import STOP_GRACE
from tests.deploy.tools import (
    DEPLOY,
    SYSTEMD,
    VENV_BIN,
    executable,
    output,
    publisher_settings,
    run,
    seconds,
    server_settings,
)

INSTALLED = "/opt/odin/venv/bin/"
UNITS = ("odin@.service", "odin.service", "odin-publisher.service", "odin-nats.service")
DROP_INS = ("odin@.service.d", "odin.service.d")
HARDENING = {
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "NoNewPrivileges": "yes",
}

Unit = dict[str, list[tuple[str, str]]]


def parse(path: Path) -> Unit:
    """Sections of (key, value) pairs in order: keys such as Environment= repeat."""
    unit: Unit = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            unit.setdefault(section, [])
            continue
        key, _, value = line.partition("=")
        unit[section].append((key.strip(), value.strip()))
    return unit


def values(unit: Unit, key: str, section: str = "Service") -> list[str]:
    return [value for name, value in unit.get(section, []) if name == key]


def value(unit: Unit, key: str, section: str = "Service") -> str:
    found = values(unit, key, section)
    assert len(found) == 1, f"{key}: {found}"
    return found[0]


def environment(unit: Unit) -> dict[str, str]:
    return dict(entry.split("=", 1) for entry in values(unit, "Environment"))


ODIN = parse(SYSTEMD / "odin@.service")
HOST = parse(SYSTEMD / "odin.service")
PUBLISHER = parse(SYSTEMD / "odin-publisher.service")
NATS = parse(SYSTEMD / "odin-nats.service")


# ---- systemd-analyze verify ------------------------------------------------------------------


def systemd_analyze() -> str:
    return executable("systemd-analyze", "Debian's systemd package")


def verifiable_copy(directory: Path) -> list[Path]:
    """The units with ExecStart in this venv, the drop-ins beside them, an instance name."""
    for name in UNITS:
        text = (SYSTEMD / name).read_text()
        assert INSTALLED in text
        (directory / name).write_text(text.replace(INSTALLED, f"{VENV_BIN}/"))
    for binary in ("odin", "odin-publisher", "nats-server"):
        if not (VENV_BIN / binary).exists():
            pytest.skip(f"{VENV_BIN / binary} is missing: the ExecStart copies need it")
    for drop_in in DROP_INS:
        shutil.copytree(SYSTEMD / drop_in, directory / drop_in)
    (directory / "odin@3002.service").symlink_to("odin@.service")
    return [directory / name for name in ("odin@3002.service", *UNITS[1:])]


def verify(units: list[Path]) -> str:
    result = run(systemd_analyze(), "verify", "--man=no", *map(str, units), cwd=units[0].parent)
    # Lines about these units only: the host's own units are not under test.
    ours = [
        line
        for line in output(result).splitlines()
        if str(units[0].parent) in line or any(unit.name in line for unit in units)
    ]
    assert result.returncode == 0 or ours, output(result)
    return "\n".join(ours)


def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    assert verify(verifiable_copy(tmp_path)) == ""


def test_systemd_analyze_reports_a_misspelt_key(tmp_path: Path) -> None:
    units = verifiable_copy(tmp_path)
    template = tmp_path / "odin@.service"
    template.write_text(template.read_text().replace("ProtectHome=", "ProtectHmoe=", 1))
    assert "ProtectHmoe" in verify(units)


# ---- what the units say ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "unit"), [("odin@", ODIN), ("odin", HOST), ("odin-publisher", PUBLISHER)]
)
def test_the_services_are_hardened(name: str, unit: Unit) -> None:
    for key, expected in HARDENING.items():
        assert value(unit, key) == expected, f"{name}: {key}"
    assert value(unit, "User") == "odin" or value(unit, "DynamicUser") == "yes"
    assert value(unit, "KillSignal") == "SIGTERM"
    assert value(unit, "Restart") == "on-failure"
    # 78 is an invalid configuration: restarting cannot fix it.
    assert value(unit, "RestartPreventExitStatus") == "78"
    assert value(unit, "CapabilityBoundingSet") == ""


def serve_arguments(unit: Unit) -> list[str]:
    """ExecStart's arguments to odin, checked against the command line's own parser."""
    program, *arguments = value(unit, "ExecStart").split()
    assert program == f"{INSTALLED}odin"
    build_parser().parse_args(arguments)
    return arguments


def test_odin_runs_one_process_per_port() -> None:
    env = environment(ODIN)
    assert env["ODIN_SERVER_PORT"] == "%i"
    # A single process, whatever the environment files say: a flag is stronger than
    # ODIN_SERVER_WORKERS, and the default (0) would start a worker per core per instance.
    assert serve_arguments(ODIN) == ["serve", "--workers", "1"]
    assert "-/etc/odin/odin.env" in values(ODIN, "EnvironmentFile")
    assert value(ODIN, "LimitNOFILE") == "200000"
    # The drain (shutdown.drain_timeout) must end before systemd's SIGKILL.
    assert seconds(value(ODIN, "TimeoutStopSec")) > Config().shutdown.drain_timeout
    assert value(ODIN, "DefaultInstance", "Install") == str(Config().server.port)


def test_odin_service_runs_a_worker_per_core_under_its_supervisor() -> None:
    assert serve_arguments(HOST) == ["serve", "--workers", "0"]
    assert "-/etc/odin/odin.env" in values(HOST, "EnvironmentFile")
    assert "ODIN_SERVER_PORT" not in environment(HOST)
    assert value(HOST, "LimitNOFILE") == "200000"
    # SIGTERM to the supervisor alone: it forwards it to the workers. A second SIGTERM from
    # systemd to each worker would cut its drain short.
    assert value(HOST, "KillSignal") == "SIGTERM"
    assert value(HOST, "KillMode") == "mixed"
    # The supervisor kills a worker still draining drain_timeout + STOP_GRACE after the
    # stop; systemd's SIGKILL must come after that.
    stop = seconds(value(HOST, "TimeoutStopSec"))
    assert stop > Config().shutdown.drain_timeout + STOP_GRACE
    assert value(HOST, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert value(HOST, "WantedBy", "Install") == "multi-user.target"


def test_both_layouts_signal_the_main_process_only() -> None:
    for unit in (ODIN, HOST):
        assert value(unit, "KillMode") == "mixed"


def test_every_instance_has_its_control_socket_in_one_runtime_directory() -> None:
    directory = value(ODIN, "RuntimeDirectory")
    assert directory == "odin"
    # Stopping one instance must not remove the other instances' sockets.
    assert value(ODIN, "RuntimeDirectoryPreserve") == "yes"
    # Odin closes a control directory others may enter: the mode it wants from the start.
    assert value(ODIN, "RuntimeDirectoryMode") == "0700"
    assert environment(ODIN)["ODIN_CONTROL_PATH"] == f"/run/{directory}/odin-%i.sock"
    # odin.service shares the directory and the user: its supervisor's socket there, and
    # the workers' beside it (odin-0.sock, odin-1.sock...).
    for key in ("RuntimeDirectory", "RuntimeDirectoryPreserve", "RuntimeDirectoryMode", "User"):
        assert value(HOST, key) == value(ODIN, key), key
    assert environment(HOST)["ODIN_CONTROL_PATH"] == f"/run/{directory}/odin.sock"


def test_the_units_set_only_real_settings() -> None:
    assert set(environment(ODIN)) <= server_settings()
    assert set(environment(HOST)) <= server_settings()
    assert set(environment(PUBLISHER)) <= publisher_settings()
    assert value(PUBLISHER, "ExecStart") == f"{INSTALLED}odin-publisher"


def test_nats_keeps_its_store_where_its_unit_keeps_state() -> None:
    config = (SYSTEMD / "nats.conf").read_text()
    store = re.search(r"store_dir:\s*(\S+)", config)
    assert store is not None
    assert store.group(1) == f"/var/lib/{value(NATS, 'StateDirectory')}"
    assert value(NATS, "ExecStart") == f"{INSTALLED}nats-server --config /etc/odin/nats.conf"
    for key, expected in HARDENING.items():
        assert value(NATS, key) == expected, key
    # Odin and the publisher start after NATS when it runs on the same host.
    for unit in (ODIN, HOST, PUBLISHER):
        assert "odin-nats.service" in value(unit, "After", "Unit").split()


@pytest.mark.parametrize("directory", DROP_INS)
def test_the_memory_drop_in_sets_a_limit(directory: str) -> None:
    # odin@: each instance's; odin: the host's, shared by its workers.
    drop_in = parse(DEPLOY / "systemd" / directory / "memory.conf")
    assert re.fullmatch(r"\d+[KMG]", value(drop_in, "MemoryMax"))
