"""The view-model of a host run by ``odin serve --workers N``, without Textual or sockets: the
workers' sockets and their supervisor's form one group, a worker the supervisor reports as
restarting has a row without a socket, and a worker replaced in its slot is found out."""

from __future__ import annotations

from pathlib import Path

from odin_fanout.console.link import LinkState, LinkStatus
from odin_fanout.console.model import ConsoleModel
from odin_fanout.control.protocol import HostWorkers, ServerIdentity, Update, WorkerInfo
from tests.console.demo import sample_snapshot

SUPERVISOR = 4200


def identity(pid: int, *, slot: int | None = None, role: str = "server") -> ServerIdentity:
    return ServerIdentity(
        1,
        "odin",
        "0.1.0",
        f"i{pid}",
        pid,
        0.0,
        role=role,
        worker=slot,
        workers=2 if slot is not None or role == "supervisor" else 1,
        supervisor_pid=SUPERVISOR if slot is not None else None,
    )


def up(model: ConsoleModel, pid: int, *, connections: int = 0, **options: object) -> str:
    """A socket of ``pid`` attached, its link up; a server's with a snapshot."""
    key = f"/run/odin/odin-{pid}.sock"
    model.attach(key, Path(key))
    model.set_link(key, LinkStatus(LinkState.CONNECTED, identity=identity(pid, **options)))  # type: ignore[arg-type]
    if options.get("role") != "supervisor":
        model.apply_update(key, Update(sample_snapshot(f"i{pid}", connections=connections), []))
    return key


def report(*workers: WorkerInfo) -> HostWorkers:
    return HostWorkers(expected=2, supervisor_pid=SUPERVISOR, started_at=0.0, workers=list(workers))


def test_a_supervisor_and_its_workers_are_one_host_beside_the_servers_alone() -> None:
    model = ConsoleModel()
    first = up(model, 4301, slot=0, connections=100)
    alone = up(model, 77, connections=5)
    supervisor = up(model, SUPERVISOR, role="supervisor")
    second = up(model, 4302, slot=1, connections=20)
    model.apply_workers(
        supervisor, report(WorkerInfo(0, "up", 4301), WorkerInfo(1, "up", 4302, restarts=1))
    )

    [host] = model.hosts()
    assert (host.pid, host.label, host.expected, host.up) == (SUPERVISOR, "host 4200", 2, 2)
    assert host.supervisor is model.servers[supervisor]
    assert [(row.slot, row.state, row.pid) for row in host.rows] == [
        (0, "up", 4301),
        (1, "up", 4302),
    ]
    assert [row.view.key if row.view else None for row in host.rows] == [first, second]
    assert host.rows[1].restarts == 1
    total = host.total()
    assert total is not None and total.connections == 120
    assert [view.key for view in model.alone()] == [alone]
    # The supervisor serves no clients: not a server counted up or down, not in the totals.
    assert [view.key for view in model.processes()] == [first, alone, second]
    everything = model.total()
    assert everything is not None and everything.connections == 125
    assert model.servers[supervisor].label == "supervisor 4200"
    assert model.replaced() == []


def test_a_restarting_worker_is_a_row_with_its_restarts_and_last_exit() -> None:
    model = ConsoleModel()
    up(model, 4301, slot=0, connections=100)
    supervisor = up(model, SUPERVISOR, role="supervisor")
    model.apply_workers(
        supervisor,
        report(
            WorkerInfo(0, "up", 4301),
            WorkerInfo(1, "restarting", None, restarts=3, last_exit="signal SIGKILL"),
        ),
    )
    [host] = model.hosts()
    restarting = host.rows[1]
    assert (restarting.slot, restarting.state, restarting.pid) == (1, "restarting", None)
    assert (restarting.restarts, restarting.last_exit) == (3, "signal SIGKILL")
    assert restarting.view is None and restarting.snapshot is None
    assert (host.up, host.expected) == (1, 2)


def test_without_their_supervisor_the_workers_still_group_by_its_pid() -> None:
    model = ConsoleModel()
    up(model, 4302, slot=1, connections=20)
    lost = up(model, 4301, slot=0, connections=100)
    model.set_link(lost, LinkStatus(LinkState.LOST, "connection refused"))
    [host] = model.hosts()
    assert host.supervisor is None
    assert [(row.slot, row.state) for row in host.rows] == [(0, "down"), (1, "up")]
    assert host.rows[0].snapshot is None  # a link down counts in no total
    assert (host.up, host.expected) == (1, 2)
    total = host.total()
    assert total is not None and total.connections == 20


def test_a_worker_replaced_in_its_slot_is_found_out_once_its_link_is_down() -> None:
    model = ConsoleModel()
    old = up(model, 4302, slot=1)
    supervisor = up(model, SUPERVISOR, role="supervisor")
    model.apply_workers(supervisor, report(WorkerInfo(1, "up", 4302)))
    assert model.replaced() == []

    # It died; its slot runs pid 4303 now, whose socket the console has not found yet.
    model.set_link(old, LinkStatus(LinkState.LOST, "connection refused"))
    model.apply_workers(supervisor, report(WorkerInfo(1, "up", 4303, restarts=1)))
    assert [view.key for view in model.replaced()] == [old]
    [host] = model.hosts()
    # Listed by the supervisor without its socket, and the old socket as a row of its own.
    assert [(row.pid, row.state, row.view is not None) for row in host.rows] == [
        (4303, "up", False),
        (4302, "down", True),
    ]

    new = up(model, 4303, slot=1, connections=7)
    model.detach(old)
    [host] = model.hosts()
    assert [(row.pid, row.view.key if row.view else None) for row in host.rows] == [(4303, new)]


def test_a_worker_up_before_its_supervisor_lists_it_has_a_row() -> None:
    model = ConsoleModel()
    supervisor = up(model, SUPERVISOR, role="supervisor")
    model.apply_workers(supervisor, report(WorkerInfo(0, "starting", 4301)))
    first = up(model, 4301, slot=0, connections=3)
    second = up(model, 4302, slot=1, connections=4)
    [host] = model.hosts()
    # The supervisor's word for the state; the socket's figures.
    assert [(row.slot, row.state, row.pid) for row in host.rows] == [
        (0, "starting", 4301),
        (1, "up", 4302),
    ]
    assert [row.view.key if row.view else None for row in host.rows] == [first, second]
    assert host.rows[0].snapshot is not None
    assert model.replaced() == []  # up: never let go


def test_a_supervisor_whose_link_is_down_reports_nothing() -> None:
    model = ConsoleModel()
    up(model, 4301, slot=0)
    supervisor = up(model, SUPERVISOR, role="supervisor")
    model.apply_workers(supervisor, report(WorkerInfo(0, "stopped", None)))
    model.set_link(supervisor, LinkStatus(LinkState.LOST, "connection closed"))
    [host] = model.hosts()
    assert [(row.slot, row.state) for row in host.rows] == [(0, "up")]
    assert model.replaced() == []
