"""What a module imports at run time, checked in a fresh interpreter: import-linter sees only
the source, not what libraries pull in or what a function imports late."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

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
    loaded = loaded_after("import odin_fanout.cli, odin_fanout.server.app, odin_fanout.broker")
    assert {"asyncio", "nats", "trio_asyncio", "textual"} & loaded == set()


@pytest.mark.parametrize("package", ["odin_fanout.protocol", "odin_fanout.core"])
def test_the_pure_core_loads_no_io_framework(package: str) -> None:
    loaded = loaded_after(
        f"import pkgutil, importlib, {package}\n"
        f"for m in pkgutil.walk_packages({package}.__path__, '{package}.'):\n"
        "    importlib.import_module(m.name)"
    )
    assert {"trio", "asyncio", "trio_websocket", "socket", "h11"} & loaded == set()


def test_the_client_loads_no_server_broker_or_asyncio() -> None:
    loaded = loaded_after("import odin_fanout.client")
    forbidden = {
        "asyncio",
        "trio_asyncio",
        "nats",
        "odin_fanout.server",
        "odin_fanout.broker",
        "odin_fanout.host",
    }
    assert forbidden & loaded == set()


def test_the_contracts_name_every_module_of_the_server() -> None:
    """The server's modules sit directly in the odin_fanout namespace beside the three tools:
    the contracts that keep textual and the server out of them list the server's modules one by
    one, and a module added to odin/odin_fanout without joining those lists would escape."""
    root = Path(__file__).resolve().parents[1]
    server = {
        f"odin_fanout.{path.stem}"
        for path in (root / "odin" / "odin_fanout").iterdir()
        if (path.suffix == ".py" and path.stem != "__main__")
        or (path.is_dir() and (path / "__init__.py").exists())
    }
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["importlinter"]
    contracts = {contract["name"]: contract for contract in config["contracts"]}
    ui = contracts["The server needs no terminal UI"]
    assert set(ui["source_modules"]) == server
    pure = contracts["The stress tool's checks are pure"]
    assert server <= set(pure["forbidden_modules"])
