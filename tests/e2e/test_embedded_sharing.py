"""The protocol by which the Odins of one data directory share its nats-server, in process:
each user of ``run_embedded_nats`` in its own task, real nats-server processes, and the lock
files and state file checked directly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from odin_fanout.broker.embedded import (
    EmbeddedNatsError,
    Layout,
    Locks,
    ServerState,
    _config_text,
    answers,
    find_binary,
    port_of,
    read_state,
    run_embedded_nats,
    write_state,
)
from odin_fanout.logs import get_logger
from tests.e2e.embedded_support import (
    in_process_table,
    kill_leftovers,
    running,
    stopped,
    wait_until_gone,
)
from tests.helpers import capture_logs

pytestmark = [pytest.mark.trio, pytest.mark.slow]


@pytest.fixture
def layout(tmp_path: Path) -> Iterator[Layout]:
    """A data directory of the test's own; no nats-server on it may outlive the test."""
    yield Layout(tmp_path / "nats")
    assert kill_leftovers(tmp_path) == []


class User:
    """One user of the embedded nats-server (an Odin), in its own task."""

    def __init__(self) -> None:
        self.url = ""
        self.leave = trio.Event()
        self.left = trio.Event()

    async def run(self, layout: Layout, port: int, *, task_status: Any) -> None:
        try:
            async with run_embedded_nats(
                port=port, data_dir=str(layout.directory), binary="", log=get_logger()
            ) as url:
                self.url = url
                task_status.started()
                await self.leave.wait()
        finally:
            self.left.set()

    async def stop(self) -> None:
        self.leave.set()
        with trio.fail_after(15):
            await self.left.wait()


@asynccontextmanager
async def users() -> AsyncIterator[Any]:
    """Start users with ``await start(layout)``; all stopped at the end."""
    async with trio.open_nursery() as nursery:
        started: list[User] = []

        async def start(layout: Layout, port: int = 0) -> User:
            user = User()
            await nursery.start(user.run, layout, port)
            started.append(user)
            return user

        yield start
        for user in started:
            user.leave.set()


async def logged(logs: list[dict[str, Any]], event: str, timeout: float = 10) -> dict[str, Any]:
    with trio.fail_after(timeout):
        while True:
            for record in logs:
                if record["event"] == event:
                    return record
            await trio.sleep(0.02)  # log records come with no event: polled, bounded


def events(logs: list[dict[str, Any]]) -> list[str]:
    return [record["event"] for record in logs if record["event"].startswith("nats_embedded")]


def start_leftover(layout: Layout, port: int = 0) -> tuple[subprocess.Popen[bytes], str]:
    """A nats-server as an Odin that was killed leaves it: running, in the state file, with
    no owner."""
    layout.directory.mkdir(parents=True, exist_ok=True)
    layout.config.write_text(_config_text(port, layout))
    process = subprocess.Popen(
        [find_binary(""), "-c", str(layout.config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ports = layout.directory / f"nats-server_{process.pid}.ports"
    deadline = time.monotonic() + 10
    while not (ports.exists() and ports.read_text().strip()):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    url = str(json.loads(ports.read_text())["nats"][0])
    write_state(layout.state, ServerState(process.pid, url, str(layout.config)))
    return process, url


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# The lock files and the state file on their own.


async def test_locks_owner_is_exclusive_and_users_are_shared(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    first, second = Locks(layout), Locks(layout)
    try:
        await first.use()
        await second.use()
        assert first.try_own() is True
        assert second.try_own() is False
        # Someone else uses it: not alone, and (Linux) the shared lock went with the attempt.
        assert first.try_alone() is False
        assert first.user is False
        second.leave()
        assert first.try_alone() is True
        # An exclusive user keeps a newcomer out until it lets go.
        assert second.try_alone() is False
        first.leave()
        first.disown()
        assert second.try_own() is True
    finally:
        first.close()
        second.close()
    # Closing drops every lock; the files stay (a new file would be a new, unheld lock).
    third = Locks(layout)
    try:
        assert third.try_own() and third.try_alone()
    finally:
        third.close()
    assert layout.owner_lock.exists() and layout.users_lock.exists()


async def test_the_lock_files_are_never_followed_through_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    (tmp_path / "owner.lock").symlink_to(target)
    with pytest.raises(OSError):
        Locks(Layout(tmp_path))


async def test_the_state_file_round_trips_and_rejects_what_it_cannot_trust(tmp_path: Path) -> None:
    path = tmp_path / "embedded.json"
    assert read_state(path) is None
    state = ServerState(pid=1234, url="nats://127.0.0.1:4222", config="/x/odin-nats.conf")
    write_state(path, state)
    assert read_state(path) == state
    assert os.listdir(tmp_path) == ["embedded.json"]  # no temporary left
    for text in ['{"pid": 0, "url": "nats://127.0.0.1:4222", "config": "c"}',
                 '{"pid": -1, "url": "nats://127.0.0.1:4222", "config": "c"}',
                 '{"pid": 1234, "url": "nats://127.0.0.1", "config": "c"}',
                 '{"pid": "x", "url": "nats://127.0.0.1:4222", "config": "c"}',
                 '[1, 2]', '{"pid": 12', ""]:  # fmt: skip
        path.write_text(text)
        assert read_state(path) is None, text


# Owners and joiners, with real nats-server processes.


async def test_a_second_user_joins_and_takes_over_when_the_first_leaves(layout: Layout) -> None:
    with capture_logs() as logs:
        async with users() as start:
            first = await start(layout)
            state = read_state(layout.state)
            assert state is not None and state.url == first.url
            second = await start(layout)
            assert second.url == first.url
            assert events(logs) == ["nats_embedded_started", "nats_embedded_joined"]
            await first.stop()
            takeover = await logged(logs, "nats_embedded_takeover")
            assert (takeover["nats_pid"], takeover["restarted"]) == (state.pid, False)
            assert running(state.pid, layout.directory.parent)
            assert await answers(second.url)
            # A third one joins the new owner.
            third = await start(layout)
            assert third.url == first.url
            await second.stop()
            await third.stop()
    assert "nats_embedded_stopped" in events(logs)
    assert not running(state.pid, layout.directory.parent)
    # Started by the first user in this process, stopped by the second: reaped, not a zombie.
    assert not in_process_table(state.pid)
    assert not layout.state.exists()


async def test_a_joiner_waits_while_the_owner_starts_it(layout: Layout) -> None:
    layout.directory.mkdir(parents=True)
    owner = Locks(layout)  # an Odin that owns it and is starting it
    try:
        await owner.use()
        assert owner.try_own()
        async with users() as start, trio.open_nursery() as nursery:
            joined: list[User] = []

            async def join() -> None:
                joined.append(await start(layout))

            nursery.start_soon(join)
            leftover, url = await trio.to_thread.run_sync(start_leftover, layout)
            with trio.fail_after(10):
                while not joined:
                    await trio.sleep(0.02)
            assert joined[0].url == url
            await joined[0].stop()
        assert leftover.poll() is None  # the owner's to stop
        leftover.terminate()
        leftover.wait()
    finally:
        owner.close()


@pytest.mark.parametrize("attempt", range(3))
async def test_two_users_leaving_at_once_leave_nothing_running(
    layout: Layout, attempt: int
) -> None:
    async with users() as start:
        first = await start(layout)
        second = await start(layout)
        state = read_state(layout.state)
        assert state is not None
        first.leave.set()
        second.leave.set()
        with trio.fail_after(15):
            await first.left.wait()
            await second.left.wait()
    assert not running(state.pid, layout.directory.parent)
    assert not layout.state.exists()


async def test_an_owner_starts_its_nats_server_again_if_it_dies(layout: Layout) -> None:
    with capture_logs() as logs:
        async with users() as start:
            user = await start(layout)
            state = read_state(layout.state)
            assert state is not None
            os.kill(state.pid, signal.SIGKILL)
            restarted = await logged(logs, "nats_embedded_restarted")
            assert restarted["url"] == user.url  # the same port: the broker's URL holds
            assert restarted["nats_pid"] != state.pid
            assert await answers(user.url)
            await user.stop()
    assert not running(restarted["nats_pid"], layout.directory.parent)


async def test_a_joiner_restarts_the_nats_server_its_gone_owner_left_dead(
    layout: Layout,
) -> None:
    leftover, url = start_leftover(layout)
    owner = Locks(layout)  # an Odin that owns it, as far as the locks say
    try:
        await owner.use()
        assert owner.try_own()
        with capture_logs() as logs:
            async with users() as start:
                joiner = await start(layout)
                assert joiner.url == url
                assert events(logs) == ["nats_embedded_joined"]
                # The owner dies, and its nats-server with it.
                leftover.kill()
                leftover.wait()
                owner.close()
                takeover = await logged(logs, "nats_embedded_takeover")
                assert (takeover["url"], takeover["restarted"]) == (url, True)
                assert await answers(url)
                await joiner.stop()
    finally:
        owner.close()
    assert not running(takeover["nats_pid"], layout.directory.parent)


async def test_a_leftover_that_answers_is_adopted_and_stopped_by_its_adopter(
    layout: Layout,
) -> None:
    leftover, url = start_leftover(layout)
    with capture_logs() as logs:
        async with users() as start:
            user = await start(layout)
            assert user.url == url
            assert events(logs) == ["nats_embedded_adopted"]
            await user.stop()
    assert leftover.wait(timeout=5) == 0  # stopped with SIGTERM: exits cleanly
    assert not layout.state.exists()


async def test_a_leftover_that_does_not_answer_is_replaced_on_its_port(layout: Layout) -> None:
    leftover, url = start_leftover(layout)
    leftover.send_signal(signal.SIGSTOP)  # alive, listening, and silent
    with trio.fail_after(5):
        while not stopped(leftover.pid):
            await trio.sleep(0.01)
    try:
        with capture_logs() as logs:
            async with users() as start:
                user = await start(layout)
                assert events(logs) == ["nats_embedded_leftover", "nats_embedded_started"]
                assert logs[0]["reason"] == "not answering"
                # Stopped (SIGTERM, then continued); Odins that used it keep their URL.
                assert leftover.wait(timeout=5) == 0
                assert user.url == url
                await user.stop()
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()


async def test_a_leftover_the_state_file_does_not_name_is_stopped(layout: Layout) -> None:
    """Its owner was killed before it wrote the state file: nats-server does not lock its
    store, so a second one must not start beside it."""
    leftover, _ = start_leftover(layout)
    layout.state.unlink()
    with capture_logs() as logs:
        async with users() as start:
            user = await start(layout)
            assert events(logs) == ["nats_embedded_leftover", "nats_embedded_started"]
            assert (logs[0]["nats_pid"], logs[0]["reason"]) == (
                leftover.pid,
                "not in the state file",
            )
            assert leftover.wait(timeout=5) == 0
            assert await answers(user.url)
            await user.stop()


async def test_a_dead_leftover_is_started_again_on_its_port(layout: Layout) -> None:
    leftover, url = start_leftover(layout)
    leftover.kill()
    leftover.wait()
    with capture_logs() as logs:
        async with users() as start:
            user = await start(layout)
            assert events(logs) == ["nats_embedded_started"]
            assert user.url == url
            await user.stop()


async def test_a_leftover_on_another_port_is_moved_to_the_configured_one(
    layout: Layout,
) -> None:
    leftover, _ = start_leftover(layout)
    port = free_port()
    with capture_logs() as logs:
        async with users() as start:
            user = await start(layout, port)
            assert port_of(user.url) == port
            assert events(logs) == ["nats_embedded_leftover", "nats_embedded_started"]
            assert leftover.wait(timeout=5) == 0
            await user.stop()


async def test_a_leftover_on_another_port_that_others_use_is_kept(layout: Layout) -> None:
    leftover, url = start_leftover(layout)
    other = Locks(layout)  # an Odin still connected to it (about to take it over)
    try:
        await other.use()
        with capture_logs() as logs:
            async with users() as start:
                user = await start(layout, free_port())
                assert user.url == url
                assert events(logs) == ["nats_embedded_adopted", "nats_embedded_port_differs"]
                await user.stop()
        assert leftover.poll() is None  # left running for the other one
    finally:
        other.close()
        leftover.terminate()
        leftover.wait()


async def test_a_configured_port_in_use_names_the_address(layout: Layout) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(EmbeddedNatsError) as failure:
            async with run_embedded_nats(
                port=port, data_dir=str(layout.directory), binary="", log=get_logger()
            ):
                pass
    assert str(failure.value) == f"address 127.0.0.1:{port} already in use (nats.embedded_port)"
    # Nothing left behind, and the next one starts (and owns) it.
    assert not layout.state.exists()
    locks = Locks(layout)
    try:
        assert locks.try_own()
    finally:
        locks.close()


async def test_a_nats_server_left_for_others_survives_its_first_owner(layout: Layout) -> None:
    """Its log is a file, not a pipe to the owner: nothing breaks when the owner is gone."""
    async with users() as start:
        first = await start(layout)
        second = await start(layout)
        state = read_state(layout.state)
        assert state is not None
        await first.stop()
        os.kill(state.pid, signal.SIGUSR1)  # nats-server: reopen the log, and write to it
        with trio.fail_after(5):
            while b"File log re-opened" not in layout.log_file.read_bytes():
                await trio.sleep(0.05)
        assert await answers(second.url)
        await second.stop()
    assert wait_until_gone(state.pid, layout.directory.parent, timeout=1)
