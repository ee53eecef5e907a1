"""The liveness wheel: every connection is visited once per ping interval, the idle ones are
closed and the others pinged, and connections opened together are spread over the interval."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from odin_fanout.server.liveness import PING_FRAME, Wheel


class Fake:
    """A watched connection that records what the wheel did to it."""

    def __init__(self, name: str, deadline: float = float("inf")) -> None:
        self.name = name
        self.deadline = deadline
        self.pings: list[float] = []
        self.closed_at: list[float] = []

    def idle_deadline(self) -> float:
        return self.deadline

    def ping(self) -> None:
        self.pings.append(trio.current_time() if _in_trio() else -1.0)

    def close_idle(self, now: float) -> None:
        self.closed_at.append(now)

    def __repr__(self) -> str:
        return f"Fake({self.name})"


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


def full_turn(wheel: Wheel, now: float) -> None:
    for slot in range(len(wheel.slots)):
        wheel.turn(slot, now)


def test_the_ping_frame_is_an_empty_unmasked_final_ping() -> None:
    assert bytes([0x80 | 0x9, 0]) == PING_FRAME


@pytest.mark.parametrize(
    ("interval", "slots"), [(0.5, 1), (1.0, 1), (2.5, 3), (10.0, 10), (30.0, 30)]
)
def test_one_slot_a_second_and_a_full_turn_takes_the_interval(interval: float, slots: int) -> None:
    wheel = Wheel(interval)
    assert len(wheel.slots) == slots
    assert wheel.tick * len(wheel.slots) == pytest.approx(interval)


def test_a_full_turn_visits_every_connection_once() -> None:
    wheel = Wheel(5.0)
    fakes = [Fake(str(n)) for n in range(23)]
    for fake in fakes:
        wheel.add(fake)
    assert len(wheel) == 23
    full_turn(wheel, now=100.0)
    assert [len(fake.pings) for fake in fakes] == [1] * 23
    full_turn(wheel, now=105.0)
    assert [len(fake.pings) for fake in fakes] == [2] * 23
    assert all(fake.closed_at == [] for fake in fakes)


def test_one_slot_visits_only_its_own_connections() -> None:
    wheel = Wheel(4.0)
    fakes = [Fake(str(n)) for n in range(8)]
    for fake in fakes:
        wheel.add(fake)
    wheel.turn(1, now=0.0)
    assert [len(fake.pings) for fake in fakes] == [0, 1, 0, 0, 0, 1, 0, 0]


def test_connections_are_spread_round_robin() -> None:
    wheel = Wheel(3.0)
    fakes = [Fake(str(n)) for n in range(7)]
    for fake in fakes:
        wheel.add(fake)
    assert [len(slot) for slot in wheel.slots] == [3, 2, 2]
    for n, fake in enumerate(fakes):
        assert fake in wheel.slots[n % 3]


def test_the_idle_are_closed_and_the_others_pinged() -> None:
    wheel = Wheel(2.0)
    idle = Fake("idle", deadline=99.0)
    due = Fake("due", deadline=100.0)
    alive = Fake("alive", deadline=100.5)
    for fake in (idle, due, alive):
        wheel.add(fake)
    full_turn(wheel, now=100.0)
    assert (idle.closed_at, idle.pings) == ([100.0], [])
    assert (due.closed_at, due.pings) == ([100.0], [])
    assert (alive.closed_at, len(alive.pings)) == ([], 1)


def test_a_connection_that_becomes_active_again_is_pinged_not_closed() -> None:
    wheel = Wheel(1.0)
    fake = Fake("a", deadline=10.0)
    wheel.add(fake)
    wheel.turn(0, now=5.0)
    fake.deadline = 40.0  # a frame arrived
    wheel.turn(0, now=35.0)
    assert (fake.closed_at, len(fake.pings)) == ([], 2)


def test_discard_removes_a_connection() -> None:
    wheel = Wheel(2.0)
    kept, gone = Fake("kept"), Fake("gone")
    wheel.add(kept)
    wheel.add(gone)
    wheel.discard(gone)
    assert len(wheel) == 1
    full_turn(wheel, now=0.0)
    assert (len(kept.pings), gone.pings) == (1, [])
    wheel.discard(gone)  # twice, or never added: nothing happens
    wheel.discard(Fake("stranger"))
    assert len(wheel) == 1
    wheel.discard(kept)
    assert len(wheel) == 0
    assert all(not slot for slot in wheel.slots)


def test_a_connection_may_leave_the_wheel_while_its_slot_is_visited() -> None:
    wheel = Wheel(1.0)

    class Leaving(Fake):
        def close_idle(self, now: float) -> None:
            super().close_idle(now)
            wheel.discard(self)

    leaving = [Leaving(str(n), deadline=0.0) for n in range(5)]
    staying = [Fake(f"s{n}") for n in range(5)]
    for fake in [*leaving, *staying]:
        wheel.add(fake)
    wheel.turn(0, now=1.0)
    assert all(fake.closed_at == [1.0] for fake in leaving)
    assert all(len(fake.pings) == 1 for fake in staying)
    assert len(wheel) == 5


@pytest.mark.trio
async def test_run_pings_each_connection_once_per_interval_spread_over_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wheel = Wheel(3.0)
    fakes = [Fake(str(n)) for n in range(6)]
    for fake in fakes:
        wheel.add(fake)
    turns: list[float] = []
    two_turns_done = trio.Event()

    def after_turn() -> None:
        turns.append(trio.current_time())
        if all(len(fake.pings) >= 2 for fake in fakes):
            two_turns_done.set()

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wheel.run, after_turn)
        with trio.fail_after(10):
            await two_turns_done.wait()
        nursery.cancel_scope.cancel()
    # One slot a second, the pings of each turn flushed right after it.
    assert [t - start for t in turns] == pytest.approx([1, 2, 3, 4, 5, 6])
    for n, fake in enumerate(fakes):
        slot = n % 3
        assert [t - start for t in fake.pings] == pytest.approx([slot + 1, slot + 4])
