"""The JavaScript client (clients/js): its own test suite, ``node --test``, against real
``odin serve`` processes it starts, in Node and in headless Chromium. Skipped when node or
clients/js/node_modules (``npm ci --prefix clients/js``) is missing, unless ODIN_REQUIRE_JS
is set (CI sets it, and ODIN_REQUIRE_BROWSER for the browser tests)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "js"
TIMEOUT = 600


def node() -> str:
    found = shutil.which("node")
    problem = None
    if found is None:
        problem = "node is not installed"
    elif not (CLIENT / "node_modules").is_dir():
        problem = "clients/js/node_modules is missing (npm ci --prefix clients/js)"
    if problem is not None:
        if os.environ.get("ODIN_REQUIRE_JS"):
            pytest.fail(f"the JavaScript client's tests are required (ODIN_REQUIRE_JS): {problem}")
        pytest.skip(problem)
    assert found is not None
    return found


@pytest.mark.timeout(TIMEOUT + 60)
def test_the_javascript_client_passes_its_node_and_browser_tests() -> None:
    # The test files by name: Node 22+ takes a directory argument as a glob that matches only
    # the directory itself (and test/odin-server.js is a helper, not a test).
    files = sorted(str(path.relative_to(CLIENT)) for path in (CLIENT / "test").glob("*.test.js"))
    assert files, "clients/js/test has no *.test.js"
    command = [node(), "--test", *files]
    # The servers the tests start run on this interpreter (the one with odin installed).
    environment = {**os.environ, "ODIN_PYTHON": os.environ.get("ODIN_PYTHON", sys.executable)}
    try:
        result = subprocess.run(
            command,
            cwd=CLIENT,
            env=environment,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"").decode() if isinstance(expired.stdout, bytes) else ""
        pytest.fail(f"node --test did not finish within {TIMEOUT} s:\n{output}")
    if result.returncode != 0:
        pytest.fail(
            f"node --test exited {result.returncode}:\n{result.stdout}\n{result.stderr}",
            pytrace=False,
        )
    summary = [line for line in result.stdout.splitlines() if line.startswith("# ")]
    assert any(line.startswith("# pass ") for line in summary), result.stdout
    assert "# fail 0" in summary, result.stdout
