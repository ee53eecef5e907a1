"""The control socket's directory: created 0700 when missing, accepted when it is right, and
refused, as it is, when it is a symlink, someone else's or open to others. Odin never follows a
symlink there nor chmods a directory it did not create, and runs on without its console.

These tests run as root: another owner is made with os.chown (uid 65534, "nobody")."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from odin_fanout.config import ControlSection
from odin_fanout.control import paths
from odin_fanout.server.control import ControlServer
from tests.helpers import Harness, capture_logs, running_server
from tests.odin.test_control import console

pytestmark = pytest.mark.trio

NOBODY = 65534


@pytest.fixture
def base() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="odin-dir-", dir="/tmp") as directory:
        yield Path(directory)


@pytest.fixture
def runtime(base: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The default directory, $XDG_RUNTIME_DIR/odin, under ``base`` (not yet created)."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    directory = paths.default_directory()
    assert directory == base / "odin"
    return directory


@asynccontextmanager
async def started(
    harness: Harness, config: ControlSection
) -> AsyncIterator[tuple[ControlServer, list[dict[str, Any]]]]:
    """The control server, started (listening or given up), and what it logged starting."""
    control = ControlServer(harness.server, config, websocket=harness.listening.websocket)
    async with trio.open_nursery() as nursery:
        with capture_logs() as logs, trio.fail_after(5):
            await nursery.start(control.run)
        yield control, logs
        nursery.cancel_scope.cancel()


def refusal(logs: list[dict[str, Any]]) -> str:
    """The one control_unavailable line's error; no control_listening."""
    events = [log["event"] for log in logs]
    assert "control_listening" not in events, logs
    refused = [log for log in logs if log["event"] == "control_unavailable"]
    assert len(refused) == 1, logs
    assert refused[0]["level"] == "warning"
    error: str = refused[0]["error"]
    return error


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def lexists(path: Path) -> bool:
    """Whether anything, a dangling symlink included, is at ``path``."""
    return os.path.lexists(path)


async def still_serving(harness: Harness) -> None:
    async with harness.client() as client:
        await client.subscribe(["BTC.trade"])
        harness.publish("BTC.trade", {"n": 1})
        assert len(await client.events(1)) == 1


async def attaches(control: ControlServer) -> None:
    async with console(control) as c:
        assert (await c.result("hello"))["pid"] == os.getpid()


# ---- the default directory: exactly 0700 and ours --------------------------------------------


async def test_a_missing_directory_is_created_private(runtime: Path) -> None:
    async with running_server() as harness, started(harness, ControlSection()) as (control, logs):
        assert control.path.parent == runtime
        assert any(log["event"] == "control_listening" for log in logs), logs
        info = os.lstat(runtime)
        assert stat.S_ISDIR(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o700
        assert info.st_uid == os.getuid()
        assert mode_of(control.path) == 0o600
        assert stat.S_ISSOCK(os.lstat(control.path).st_mode)
        await attaches(control)


async def test_a_missing_directory_is_private_whatever_the_umask(runtime: Path) -> None:
    previous = os.umask(0o277)  # mkdir alone would make it 0500: Odin created it, so it may fix it
    try:
        async with running_server() as harness, started(harness, ControlSection()) as (control, _):
            assert mode_of(runtime) == 0o700
            await attaches(control)
    finally:
        os.umask(previous)


async def test_an_existing_private_directory_is_used(runtime: Path) -> None:
    os.mkdir(runtime, 0o700)
    async with running_server() as harness, started(harness, ControlSection()) as (control, logs):
        assert any(log["event"] == "control_listening" for log in logs), logs
        assert mode_of(runtime) == 0o700
        await attaches(control)


async def test_a_planted_symlink_is_refused_and_its_target_left_alone(
    base: Path, runtime: Path
) -> None:
    # Like `ln -s /tmp /tmp/odin-0`: a directory Odin must not chmod 0700 nor put a socket in.
    target = base / "shared"
    target.mkdir()
    os.chmod(target, 0o1777)
    os.symlink(target, runtime)
    async with running_server() as harness, started(harness, ControlSection()) as (control, logs):
        error = refusal(logs)
        assert str(runtime) in error
        assert "symlink" in error
        assert mode_of(target) == 0o1777
        assert os.listdir(target) == []
        assert stat.S_ISLNK(os.lstat(runtime).st_mode)
        assert not lexists(control.path)
        await still_serving(harness)


async def test_a_directory_of_another_user_is_refused(runtime: Path) -> None:
    os.mkdir(runtime, 0o700)
    os.chown(runtime, NOBODY, NOBODY)
    async with running_server() as harness, started(harness, ControlSection()) as (control, logs):
        error = refusal(logs)
        assert str(runtime) in error
        assert f"uid {NOBODY}" in error
        info = os.lstat(runtime)
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (NOBODY, 0o700)
        assert os.listdir(runtime) == []
        assert not lexists(control.path)
        await still_serving(harness)


@pytest.mark.parametrize("mode", [0o755, 0o777, 0o710])
async def test_a_directory_others_may_enter_is_refused_and_not_chmodded(
    runtime: Path, mode: int
) -> None:
    os.mkdir(runtime)
    os.chmod(runtime, mode)
    async with running_server() as harness, started(harness, ControlSection()) as (_, logs):
        error = refusal(logs)
        assert str(runtime) in error
        assert f"mode {mode:#o}" in error
        assert mode_of(runtime) == mode
        assert os.listdir(runtime) == []
        await still_serving(harness)


async def test_a_missing_parent_is_not_created(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = base / "gone"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    async with running_server() as harness, started(harness, ControlSection()) as (_, logs):
        error = refusal(logs)
        assert f"{runtime} does not exist" in error
        assert not lexists(runtime)
        await still_serving(harness)


# ---- an explicit control.path: its directory must be writable by its owner only ----------------


def explicit(directory: Path) -> ControlSection:
    return ControlSection(path=str(directory / "odin.sock"))


async def test_an_explicit_path_in_a_missing_directory_creates_it_private(base: Path) -> None:
    directory = base / "run"
    async with running_server() as harness, started(harness, explicit(directory)) as (control, _):
        assert mode_of(directory) == 0o700
        assert mode_of(control.path) == 0o600
        await attaches(control)


async def test_an_explicit_path_in_a_readable_directory_is_used_and_not_chmodded(
    base: Path,
) -> None:
    # systemd's RuntimeDirectory= without RuntimeDirectoryMode=: /run/odin, mode 0755.
    directory = base / "run"
    directory.mkdir()
    os.chmod(directory, 0o755)
    async with running_server() as harness, started(harness, explicit(directory)) as (control, _):
        assert mode_of(directory) == 0o755
        assert mode_of(control.path) == 0o600
        await attaches(control)


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o1777])
async def test_an_explicit_path_in_a_directory_others_may_write_is_refused(
    base: Path, mode: int
) -> None:
    directory = base / "run"
    directory.mkdir()
    os.chmod(directory, mode)
    async with running_server() as harness, started(harness, explicit(directory)) as (_, logs):
        error = refusal(logs)
        assert f"{directory} has mode {mode:#o}" in error
        assert mode_of(directory) == mode
        assert os.listdir(directory) == []
        await still_serving(harness)


async def test_an_explicit_path_in_a_directory_of_another_user_is_refused(base: Path) -> None:
    directory = base / "run"
    directory.mkdir()
    os.chmod(directory, 0o755)
    os.chown(directory, NOBODY, NOBODY)
    async with running_server() as harness, started(harness, explicit(directory)) as (_, logs):
        assert f"{directory} belongs to uid {NOBODY}" in refusal(logs)
        assert os.listdir(directory) == []
        await still_serving(harness)


async def test_an_explicit_path_through_a_symlinked_directory_is_refused(base: Path) -> None:
    target = base / "elsewhere"
    target.mkdir()
    os.chmod(target, 0o755)
    link = base / "run"
    os.symlink(target, link)
    async with running_server() as harness, started(harness, explicit(link)) as (_, logs):
        error = refusal(logs)
        assert str(link) in error
        assert "symlink" in error
        assert mode_of(target) == 0o755
        assert os.listdir(target) == []
        await still_serving(harness)


# ---- what is at the socket's own path -------------------------------------------------------


async def test_a_symlink_at_the_socket_path_is_refused_and_not_followed(base: Path) -> None:
    directory = base / "run"
    directory.mkdir(mode=0o700)
    victim = base / "victim"
    victim.write_text("keep me")
    os.symlink(victim, directory / "odin.sock")
    async with running_server() as harness, started(harness, explicit(directory)) as (_, logs):
        error = refusal(logs)
        assert f"{directory / 'odin.sock'} is a symlink" in error
        assert victim.read_text() == "keep me"
        assert stat.S_ISLNK(os.lstat(directory / "odin.sock").st_mode)
        await still_serving(harness)


async def test_a_file_at_the_socket_path_is_refused_and_kept(base: Path) -> None:
    directory = base / "run"
    directory.mkdir(mode=0o700)
    (directory / "odin.sock").write_text("not a socket")
    async with running_server() as harness, started(harness, explicit(directory)) as (_, logs):
        assert "is not a socket" in refusal(logs)
        assert (directory / "odin.sock").read_text() == "not a socket"
        await still_serving(harness)
