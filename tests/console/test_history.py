"""The console's past beyond the attach: its charts filled from the server's last hour
(``history``), the event log paged back through the server's ring (``events``, on ``[``), and
an older server without either, which still works as before."""

from __future__ import annotations

import attrs
import pytest
from textual.widgets import Sparkline, Static

from odin_fanout.console.app import ConsoleApp
from odin_fanout.control.protocol import History, ListEvents, ServerEvent
from tests.console.conftest import ServerFactory
from tests.console.demo import BASE_TIME, FakeData, demo_data, sample_events, sample_history
from tests.console.test_app import SIZE, attached, console, table, wait_until


def with_ring(older: int, data: FakeData | None = None) -> FakeData:
    """Demo data whose server kept ``older`` events before the ones its first update
    carries (the demo's 14, numbered after them)."""
    data = data if data is not None else demo_data("a3f9", 101)
    earlier = [
        ServerEvent(seq, BASE_TIME - 7200 + seq, "conn_open", f"a3f9-{seq}", {"peer": "10.0.0.1"})
        for seq in range(1, older + 1)
    ]
    data.events = [attrs.evolve(e, seq=older + e.seq) for e in sample_events("a3f9")]
    data.ring = earlier + data.events
    return data


def status(app: ConsoleApp) -> str:
    return str(app.query_one("#events-view .table-status", Static).content)


@pytest.mark.asyncio
async def test_attaching_fills_the_charts_with_the_servers_last_hour(
    fake_server: ServerFactory,
) -> None:
    data = demo_data("a3f9", 101)
    data.history = sample_history(3600)
    server = await fake_server(data)
    app = console(server.path)
    async with app.run_test(size=SIZE) as pilot:
        await attached(pilot, app)
        view = app.model.servers[str(server.path)]
        # The hour, then the snapshot and the first update: the oldest two make room.
        await wait_until(pilot, lambda: len(app.model.events) == 14, "the first update")
        assert server.commands(History) == [History(3600, 1)]
        assert len(view.rate_in) == 3600
        assert list(view.rate_in)[:-2] == data.history.in_per_s[2:]
        assert list(view.rate_out)[:-2] == data.history.out_per_s[2:]
        await wait_until(
            pilot,
            lambda: {len(spark.data or []) for spark in app.query(Sparkline)} == {3600},
            "every sparkline with the hour",
        )
        assert "last hour" in str(app.query_one("#rates").border_title)


@pytest.mark.asyncio
async def test_an_older_server_without_history_or_events_still_works(
    fake_server: ServerFactory,
) -> None:
    server = await fake_server()  # the fake answers both unknown_command, as an older server
    app = console(server.path)
    async with app.run_test(size=SIZE) as pilot:
        await attached(pilot, app)
        await wait_until(pilot, lambda: len(app.model.events) == 14, "the first update")
        view = app.model.servers[str(server.path)]
        assert server.commands(History) == [History(3600, 1)]
        assert len(view.rate_in) == 2  # the snapshot and the update: empty before, as ever
        await pilot.press("4", "left_square_bracket")
        await wait_until(pilot, lambda: "older server" in status(app), "said")
        assert app.outcomes[-1] == "a3f9: an older server, no events to page back"
        assert table(app, "events").row_count == 14
        assert view.up
        await pilot.press("left_square_bracket")  # not asked again
        await wait_until(pilot, lambda: len(app.outcomes) == 2, "said again")
        assert len(server.commands(ListEvents)) == 1


@pytest.mark.asyncio
async def test_paging_back_loads_older_events_up_to_the_start_of_the_ring(
    fake_server: ServerFactory,
) -> None:
    server = await fake_server(with_ring(250))
    app = console(server.path)
    async with app.run_test(size=SIZE) as pilot:
        await attached(pilot, app)
        await pilot.press("4")
        events = table(app, "events")
        await wait_until(pilot, lambda: events.row_count == 14, "the events since the attach")
        assert "[ older events" in status(app)

        await pilot.press("left_square_bracket")
        await wait_until(pilot, lambda: events.row_count == 214, "a page of older events")
        assert server.commands(ListEvents) == [ListEvents(251, 200)]
        assert str(events.get_row_at(0)[3]) == "a3f9-51"
        assert str(events.get_row_at(214 - 1)[3]) == "a3f9-198"  # the newest still at the bottom
        assert events.cursor_row == 199  # on the newest of the page: up goes on back
        assert app.outcomes[-1] == "200 older events"

        await pilot.press("left_square_bracket")
        await wait_until(pilot, lambda: events.row_count == 264, "the rest")
        assert server.commands(ListEvents)[-1] == ListEvents(51, 200)
        assert str(events.get_row_at(0)[3]) == "a3f9-1"
        said = "50 older events; no older events: the server keeps the last 2,000"
        assert app.outcomes[-1] == said
        assert said in status(app)

        await pilot.press("left_square_bracket")  # at the start: the server is not asked
        await wait_until(pilot, lambda: len(app.outcomes) == 3, "said")
        assert app.outcomes[-1] == "no older events: the server keeps the last 2,000"
        assert len(server.commands(ListEvents)) == 2
        assert events.row_count == 264


@pytest.mark.asyncio
async def test_a_first_page_back_from_the_newest_is_not_shown_twice(
    fake_server: ServerFactory,
) -> None:
    data = demo_data("a3f9", 101)
    data.events = []  # nothing since the attach: the page is taken from the newest
    data.ring = [
        ServerEvent(seq, BASE_TIME + seq, "conn_open", f"a3f9-{seq}") for seq in range(1, 31)
    ]
    server = await fake_server(data)
    app = console(server.path)
    async with app.run_test(size=SIZE) as pilot:
        await attached(pilot, app)
        await wait_until(pilot, lambda: server.watchers, "watching")
        await pilot.press("4", "left_square_bracket")
        events = table(app, "events")
        await wait_until(pilot, lambda: events.row_count == 30, "the ring")
        assert server.commands(ListEvents) == [ListEvents(0, 200)]
        # An update that carries the newest of them again (it came after the watch began).
        data.events = [data.ring[-1], ServerEvent(31, BASE_TIME + 31, "kick", "a3f9-31")]
        await server.push()
        await wait_until(pilot, lambda: events.row_count == 31, "only the new one")
        assert [str(events.get_row_at(row)[3]) for row in (29, 30)] == ["a3f9-30", "a3f9-31"]
