"""What a module imports at run time, checked in a fresh interpreter: import-linter sees only
the source, not what libraries pull in or what a function imports late."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def loaded_after(statement: str) -> set[str]:
    code = f"import sys, json\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    # Unmeasured: under `coverage run` (tox -e check) a child would load coverage.py, and
    # with it modules (socket) that are not the code's.
    env = {name: value for name, value in os.environ.items() if not name.startswith("COVERAGE_")}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
        env=env,
    )  # fmt: skip
    return set(json.loads(result.stdout))


def test_the_server_loads_no_asyncio_nats_or_ui() -> None:
    loaded = loaded_after("import odin.cli, odin.server.app, odin.broker")
    assert {"asyncio", "nats", "trio_asyncio", "textual"} & loaded == set()


@pytest.mark.parametrize("package", ["odin.protocol", "odin.core"])
def test_the_pure_core_loads_no_io_framework(package: str) -> None:
    loaded = loaded_after(
        f"import pkgutil, importlib, {package}\n"
        f"for m in pkgutil.walk_packages({package}.__path__, '{package}.'):\n"
        "    importlib.import_module(m.name)"
    )
    assert {"trio", "asyncio", "trio_websocket", "socket", "h11"} & loaded == set()


def test_the_client_loads_no_server_broker_or_asyncio() -> None:
    loaded = loaded_after("import odin.client")
    forbidden = {"asyncio", "trio_asyncio", "nats", "odin.server", "odin.broker", "odin.host"}
    assert forbidden & loaded == set()
