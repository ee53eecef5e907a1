"""What a supervisor hands a worker it starts (``odin serve --worker SPEC``) comes through the
command line whole, a worker refuses anything else, and exits are described for the logs."""

from __future__ import annotations

import signal

import pytest

from odin_fanout.capacity import usable_cpus
from odin_fanout.host.spec import WorkerSpec
from odin_fanout.host.supervisor import describe_exit, worker_count
from tests.helpers import make_config


def test_a_worker_spec_survives_the_command_line_whole() -> None:
    spec = WorkerSpec(
        slot=1,
        count=4,
        supervisor_pid=4242,
        directory="/run/odin/host-4242",
        status_fd=7,
        listen_fds=[5, 6],
        reuseport=[("127.0.0.1", 8080), ("::1", 8080)],
        config_file="/etc/odin/odin.toml",
        overrides={
            "server.port": 8080,
            "nats.url": "nats://127.0.0.1:4222",
            "simulator.enabled": False,
            "simulator.tokens": "BTC,ETH",
            "connection.idle_timeout": 30.5,
        },
    )
    encoded = spec.encode()
    assert isinstance(encoded, str) and "\n" not in encoded  # one argv word
    assert WorkerSpec.decode(encoded) == spec
    # The defaults too: a lone worker on the supervisor's one socket, without a file.
    plain = WorkerSpec(slot=0, count=1, supervisor_pid=1, directory="/d", status_fd=3)
    assert WorkerSpec.decode(plain.encode()) == plain


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[1, 2]",
        '{"slot": 0}',
        '{"slot": "first", "count": 2, "supervisor_pid": 1, "directory": "/d", "status_fd": 3}',
        '{"slot": 0, "count": 2, "supervisor_pid": 1, "directory": "/d", "status_fd": null}',
    ],
)
def test_anything_but_a_spec_is_refused_with_one_clear_error(text: str) -> None:
    with pytest.raises(ValueError, match=r"^not a worker specification: "):
        WorkerSpec.decode(text)


@pytest.mark.parametrize(
    ("code", "described"),
    [
        (None, "running"),
        (0, "exit 0"),
        (1, "exit 1"),
        (78, "exit 78"),
        (-signal.SIGKILL, "signal SIGKILL"),
        (-signal.SIGTERM, "signal SIGTERM"),
        (-signal.SIGSEGV, "signal SIGSEGV"),
        (-200, "signal 200"),  # not a signal Python knows
    ],
)
def test_how_a_worker_ended_reads_as_the_logs_say(code: int | None, described: str) -> None:
    assert describe_exit(code) == described


def test_how_many_workers_a_configuration_asks_for() -> None:
    assert worker_count(make_config(**{"server.workers": 3})) == 3
    assert worker_count(make_config(**{"server.workers": 0})) == usable_cpus()
    # The memory broker lives in one process: its clients and its publishers must share it.
    assert worker_count(make_config(**{"server.workers": 3, "broker.kind": "memory"})) == 1
