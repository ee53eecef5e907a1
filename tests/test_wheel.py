"""The package as it would be published: the wheel built from this checkout holds one import
name, ``odin_fanout``, and everything the server serves; installed in a fresh virtual
environment beside PyPI's ``console`` and ``odin`` (the names the console and the server once
had), it breaks neither, and every entry point it installs runs from there."""

from __future__ import annotations

import email.parser
import json
import os
import signal
import subprocess
import sys
import urllib.request
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from odin_fanout.version import __version__
from tests.e2e.process import OdinProcess, port_of

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "odin" / "odin_fanout" / "web" / "static"
CLIENT = ROOT / "clients" / "js" / "src" / "odin-client.js"
SCRIPTS = {"odin", "odin-publisher", "odin-console", "odin-stress"}
# Published projects whose import names Odin's parts used to have.
NEIGHBOURS = ("console", "odin")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        check=True, cwd=out, capture_output=True, timeout=300,
    )  # fmt: skip
    (built,) = out.glob("odin_fanout-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh environment with PyPI's ``console`` and ``odin``, then the wheel with its stress
    extra (so that every entry point has what it needs): its ``bin`` directory."""
    home = tmp_path_factory.mktemp("venv")
    venv.create(home, with_pip=True)
    pip = [str(home / "bin" / "python"), "-m", "pip", "install", "-q"]
    for command in ([*pip, *NEIGHBOURS], [*pip, f"{wheel}[stress]"]):
        done = subprocess.run(
            command, cwd=home, env=outside_env(home), capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr
    return home / "bin"


def outside_env(home: Path) -> dict[str, str]:
    """The environment of a process run from the installed package only: nothing of this
    checkout on its path, no coverage of the test run, state in a directory of its own."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("PYTHON", "COVERAGE", "VIRTUAL_ENV", "ODIN_"))
    }
    return {**environment, "XDG_RUNTIME_DIR": str(home), "XDG_STATE_HOME": str(home)}


def run(bin_dir: Path, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bin_dir / command[0]), *command[1:]],
        cwd=bin_dir.parent, env=outside_env(bin_dir.parent),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_the_wheel_holds_one_import_name_and_every_part(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = email.parser.Parser().parsestr(
            archive.read(f"odin_fanout-{__version__}.dist-info/METADATA").decode()
        )
        entry_points = archive.read(f"odin_fanout-{__version__}.dist-info/entry_points.txt")
    assert {name.split("/")[0] for name in names} == {
        "odin_fanout",
        f"odin_fanout-{__version__}.dist-info",
    }
    # A namespace: its parts come from four folders, and no part owns its top.
    assert "odin_fanout/__init__.py" not in names
    for part in ("cli.py", "console/cli.py", "publisher/cli.py", "stress/entry.py"):
        assert f"odin_fanout/{part}" in names
    assert not [name for name in names if name.startswith("odin_fanout/tests")]
    assert (metadata["Name"], metadata["Version"]) == ("odin-fanout", __version__)
    scripts = {line.split(" = ")[0] for line in entry_points.decode().splitlines() if " = " in line}
    assert scripts == SCRIPTS


def test_the_wheel_carries_the_files_the_server_and_the_console_read(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        for name in ("index.html", "page.js", "page.css"):
            assert archive.read(f"odin_fanout/web/static/{name}") == (STATIC / name).read_bytes()
        if CLIENT.exists():  # the link's target, as a file
            assert archive.read("odin_fanout/web/static/odin-client.js") == CLIENT.read_bytes()
        stylesheet = ROOT / "console" / "odin_fanout" / "console" / "console.tcss"
        assert archive.read("odin_fanout/console/console.tcss") == stylesheet.read_bytes()


def test_beside_pypi_console_and_odin_both_still_import_their_own(installed: Path) -> None:
    code = (
        "import json, console, odin, odin_fanout.cli, odin_fanout.console.app; "
        "print(json.dumps([console.__file__, hasattr(console, 'fg'), "
        "odin.__file__, hasattr(odin, 'StringField')]))"
    )
    done = run(installed, "python", "-c", code)
    assert done.returncode == 0, done.stderr
    console_file, console_theirs, odin_file, odin_theirs = json.loads(done.stdout)
    site = installed.parent / "lib"
    assert Path(console_file).is_relative_to(site) and console_theirs
    assert Path(odin_file).is_relative_to(site) and odin_theirs


def test_every_entry_point_runs_from_the_installed_wheel(installed: Path) -> None:
    version = run(installed, "odin", "--version")
    assert (version.returncode, version.stdout.strip()) == (0, f"odin {__version__}")
    for script in ("odin-publisher", "odin-console"):
        done = run(installed, script, "--help")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"usage: {script}")
    profiles = run(installed, "odin-stress", "profiles")
    assert profiles.returncode == 0, profiles.stderr
    assert "smoke" in profiles.stdout
    nobody = run(installed, "odin", "ctl", "status")
    assert nobody.returncode == 3, nobody.stderr  # no server is running: unreachable


@pytest.fixture
def installed_server(installed: Path) -> Iterator[OdinProcess]:
    process = subprocess.Popen(
        [str(installed / "odin"), "serve", "--broker", "memory", "--simulate", "--port", "0"],
        cwd=installed.parent, env={**outside_env(installed.parent), "ODIN_SERVER_WORKERS": "1"},
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    server = OdinProcess(process)
    try:
        yield server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stderr is not None
        process.stderr.close()


def test_the_installed_server_serves_its_page_and_answers_odin_ctl(
    installed: Path, installed_server: OdinProcess
) -> None:
    port = port_of(installed_server.wait_for("listening", timeout=30))
    for path in ("/", "/odin-client.js", "/health"):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            assert response.status == 200, path
            assert response.read()
    status = run(installed, "odin", "ctl", "status", "--json")
    assert status.returncode == 0, status.stderr
    (found,) = json.loads(status.stdout)  # every server in the default control directory
    hello = found["result"]["hello"]
    assert (hello["server"], hello["pid"]) == ("odin", installed_server.pid)
    installed_server.signal(signal.SIGTERM)
    assert installed_server.wait(timeout=30) == 0
