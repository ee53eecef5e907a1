"""The console app driven by Textual's Pilot against fake control servers (``console.demo``,
the real protocol with invented data): what it shows, what it sends, and what it says when a
link breaks."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
from rich.console import Console
from textual.pilot import Pilot
from textual.widget import Widget
from textual.widgets import DataTable, Input, Select, Sparkline, Static

from console.app import ConsoleApp
from console.demo import FakeServer, channels_page, connections_page, demo_data
from console.link import LinkState
from console.screens.confirm import ConfirmScreen, KickScreen
from console.screens.detail import DetailScreen
from console.screens.help import HelpScreen
from console.widgets.tables import PAGE_SIZE
from odin.control.protocol import (
    Drain,
    Inspect,
    Kick,
    ListChannels,
    ListConnections,
    ServerEvent,
    Watch,
)
from tests.console.conftest import ServerFactory

SIZE = (140, 45)
GRAFANA = "https://grafana.example/d/odin"


def console(*sockets: Path, **options: object) -> ConsoleApp:
    options.setdefault("flush_every", 0.05)
    options.setdefault("grafana_url", GRAFANA)
    return ConsoleApp(sockets=list(sockets), **options)  # type: ignore[arg-type]


async def wait_until(
    pilot: Pilot[None], predicate: Callable[[], object], what: str, timeout: float = 5
) -> None:
    """Let the app run until ``predicate()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await pilot.pause(0.02)


def rendered(widget: Static) -> str:
    """The text a Static shows (a Rich table included), as a terminal would."""
    out = Console(file=io.StringIO(), width=widget.size.width or SIZE[0], record=True)
    out.print(widget.content)
    return out.export_text()


def figures(app: ConsoleApp) -> str:
    return rendered(app.query_one("#figures", Static))


def banner(app: ConsoleApp) -> str:
    widget = app.query_one("#banner", Static)
    return str(widget.content) if widget.display else ""


def focused(app: ConsoleApp) -> Widget | None:
    return app.focused


def table(app: ConsoleApp, view: str) -> DataTable[object]:
    return app.query_one(f"#{view}-view").query_one(DataTable)


def row_keys(app: ConsoleApp, view: str) -> list[str]:
    return [str(row.key.value) for row in table(app, view).ordered_rows]


async def attached(pilot: Pilot[None], app: ConsoleApp, count: int = 1) -> None:
    await wait_until(
        pilot,
        lambda: len(app.model.live()) == count and "/ 10,000" in figures(app),
        f"{count} server(s) up and shown",
    )


async def first_connection(pilot: Pilot[None], app: ConsoleApp) -> str:
    """Attach, open the connections table, and return the id of its first row."""
    await attached(pilot, app)
    await pilot.press("2")
    await wait_until(pilot, lambda: table(app, "connections").row_count > 0, "rows")
    return row_keys(app, "connections")[0]


@pytest.mark.asyncio
async def test_the_overview_shows_the_figures_served(fake_server: ServerFactory) -> None:
    server = await fake_server(history=30)
    app = console(server.path)
    async with app.run_test(size=SIZE) as pilot:
        await attached(pilot, app)
        view = app.model.servers[str(server.path)]
        await wait_until(pilot, lambda: len(view.rate_in) == 31, "the snapshot and 30 updates")
        await pilot.pause(0.1)
        text = figures(app)
        for shown in (
            "240 / 10,000",
            "9,760 (98%)",
            "1,203 (conflated 1,180, slow_consumer 23)",
            "415 (conflated 412, missed 3)",
            "59 (closed 2, conflated 57)",
            "connected, lag 3",
            "1, ingest dropped 0",
            "318 (9,412 messages)",
            "5 (epoch_changed 1, history_expired 4)",
            "43 (complete 41, incomplete 2)",
            "12,877",
        ):
            assert shown in text, shown
        assert "all (1)" in text
        assert "a3f9" in text
        sparklines = list(app.query(Sparkline))
        assert {len(spark.data or []) for spark in sparklines} == {31}
        info = str(app.query_one("#server-info", Static).content)
        assert "instance a3f9" in info
        assert "pid 101" in info
        assert app.query_one("#server", Select).value == str(server.path)
        assert GRAFANA in app.sub_title
        assert GRAFANA in str(app.query_one("#grafana", Static).content)
        assert banner(app) == ""


@pytest.mark.asyncio
async def test_the_views_follow_a_new_update(fake_server: ServerFactory) -> None:
    server = await fake_server()
    app = console(server.path)
    async with app.run_test(size=SIZE) as pilot:
        await attached(pilot, app)
        assert "draining          no" in figures(app)
        server.data.snapshot = attrs.evolve(
            server.data.snapshot,
            connections=9_990,
            draining=True,
            in_per_s=5_000.0,
            dropped={"conflated": 7},
        )
        await server.push()
        await wait_until(pilot, lambda: "9,990 / 10,000" in figures(app), "the new count")
        text = figures(app)
        assert "10 (0%)" in text
        assert "YES" in text
        assert "7 (conflated 7)" in text
        assert "in 5,000/s" in str(app.query_one(".rate-in", Static).content)


@pytest.mark.asyncio
async def test_sorting_asks_the_server_for_its_order(fake_server: ServerFactory) -> None:
    server = await fake_server()
    app = console(server.path, refresh_every=60)
    async with app.run_test(size=SIZE) as pilot:
        await attached(pilot, app)

        def asked() -> ListConnections | None:
            sent = server.commands(ListConnections)
            return sent[-1] if sent else None

        def shows(query: ListConnections) -> bool:
            expected = connections_page(server.data.connections, query)
            return row_keys(app, "connections") == [c.id for c in expected.items]

        await pilot.press("2")
        await wait_until(pilot, lambda: asked() is not None, "a first page")
        assert asked() == ListConnections(0, PAGE_SIZE, "queue", True, "")
        await wait_until(pilot, lambda: shows(ListConnections(0, PAGE_SIZE, "queue", True)), "rows")
        await pilot.press("o")
        await wait_until(
            pilot, lambda: asked() == ListConnections(0, PAGE_SIZE, "queue_age", True), "o"
        )
        await pilot.press("r")
        query = ListConnections(0, PAGE_SIZE, "queue_age", False)
        await wait_until(pilot, lambda: asked() == query, "r")
        await wait_until(pilot, lambda: shows(query), "the ascending page")

        # A click on a header sorts by its column; a second click reverses.
        grid = table(app, "connections")
        x = sum(column.get_render_width(grid) for column in grid.ordered_columns[:5]) + 2
        await pilot.click(grid, offset=(x, 0))
        await wait_until(
            pilot, lambda: asked() == ListConnections(0, PAGE_SIZE, "sent", True), "sent"
        )
        await pilot.click(grid, offset=(x, 0))
        query = ListConnections(0, PAGE_SIZE, "sent", False)
        await wait_until(pilot, lambda: asked() == query, "sent reversed")
        await wait_until(pilot, lambda: shows(query), "the page by sent")

        # The channels table the same way.
        await pilot.press("3")
        await wait_until(pilot, lambda: server.commands(ListChannels), "channels")
        assert server.commands(ListChannels)[-1] == ListChannels(0, PAGE_SIZE, "subscribers", True)
        await pilot.press("o")
        query_channels = ListChannels(0, PAGE_SIZE, "rate", True)
        await wait_until(pilot, lambda: server.commands(ListChannels)[-1] == query_channels, "o")
        expected = [c.name for c in channels_page(server.data.channels, query_channels).items]
        await wait_until(pilot, lambda: row_keys(app, "channels") == expected, "by rate")


@pytest.mark.asyncio
async def test_the_filter_goes_to_the_server_and_the_table_shows_its_answer(
    fake_server: ServerFactory,
) -> None:
    server = await fake_server()
    app = console(server.path, refresh_every=60)
    async with app.run_test(size=SIZE) as pilot:
        await attached(pilot, app)
        await pilot.press("2")
        await wait_until(pilot, lambda: table(app, "connections").row_count == PAGE_SIZE, "a page")
        await pilot.press("slash")
        assert isinstance(focused(app), Input)
        await pilot.press(*"BTC.liquidity")
        query = ListConnections(0, PAGE_SIZE, "queue", True, "BTC.liquidity")
        await wait_until(pilot, lambda: server.commands(ListConnections)[-1] == query, "filter")
        expected = [c.id for c in connections_page(server.data.connections, query).items]
        assert 0 < len(expected) < 100
        await wait_until(pilot, lambda: row_keys(app, "connections") == expected, "filtered rows")
        status = str(app.query_one("#connections-view .table-status", Static).content)
        assert f"of {len(expected)} connections" in status
        assert "'BTC.liquidity'" in status

        # Whatever the server answers is what shows.
        server.data.connections = [attrs.evolve(server.data.connections[0], id="a3f9-9999")]
        await pilot.press("enter")  # back to the table
        assert isinstance(focused(app), DataTable)
        await pilot.press("r")
        await wait_until(pilot, lambda: row_keys(app, "connections") == ["a3f9-9999"], "its answer")

        await pilot.press("3", "slash", *"ETH", "enter")
        channels = ListChannels(0, PAGE_SIZE, "subscribers", True, "ETH")
        await wait_until(pilot, lambda: server.commands(ListChannels)[-1] == channels, "filter")
        await wait_until(pilot, lambda: len(row_keys(app, "channels")) == 3, "three channels")
        assert all(name.startswith("ETH.") for name in row_keys(app, "channels"))


@pytest.mark.asyncio
async def test_kick_asks_first_then_kicks_the_selected_connection(
    fake_server: ServerFactory,
) -> None:
    server = await fake_server()
    app = console(server.path, refresh_every=60)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await attached(pilot, app)
        await pilot.press("2")
        await wait_until(pilot, lambda: table(app, "connections").row_count > 3, "rows")
        await pilot.press("down", "down")
        chosen = row_keys(app, "connections")[2]

        await pilot.press("k")
        await wait_until(pilot, lambda: isinstance(app.screen, KickScreen), "the question")
        assert chosen in rendered(app.screen.query_one(".question", Static))
        await pilot.press("n")
        await wait_until(pilot, lambda: not isinstance(app.screen, KickScreen), "cancelled")
        await pilot.press("k")
        await wait_until(pilot, lambda: isinstance(app.screen, KickScreen), "asked again")
        await pilot.press("escape")
        await wait_until(pilot, lambda: not isinstance(app.screen, KickScreen), "cancelled")
        assert server.commands(Kick) == []

        await pilot.press("k")
        await wait_until(pilot, lambda: isinstance(app.screen, KickScreen), "asked again")
        await pilot.press("y")
        await wait_until(pilot, lambda: server.commands(Kick), "the kick")
        assert server.commands(Kick) == [Kick(chosen, 4001, "closed by operator")]
        await wait_until(
            pilot, lambda: f"kicked {chosen} (close code 4001)" in app.outcomes, "said"
        )
        await wait_until(pilot, lambda: chosen not in row_keys(app, "connections"), "gone")

        # An error from the server is said too.
        gone = row_keys(app, "connections")[0]
        server.data.connections = [c for c in server.data.connections if c.id != gone]
        table(app, "connections").move_cursor(row=0)
        await pilot.press("k")
        await wait_until(pilot, lambda: isinstance(app.screen, KickScreen), "asked")
        await pilot.press("y")
        await wait_until(pilot, lambda: len(server.commands(Kick)) == 2, "the second kick")
        await wait_until(pilot, lambda: any("not_found" in text for text in app.outcomes), "error")
        assert app.outcomes[-1].startswith(f"kick {gone} failed")


@pytest.mark.asyncio
async def test_enter_on_a_connection_inspects_it(fake_server: ServerFactory) -> None:
    server = await fake_server()
    app = console(server.path, refresh_every=60)
    async with app.run_test(size=SIZE) as pilot:
        chosen = await first_connection(pilot, app)
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, DetailScreen), "the detail")
        assert server.commands(Inspect) == [Inspect(chosen)]
        shown = rendered(app.screen.query_one("#detail", Static))
        assert chosen in shown
        assert "https://app.example" in shown
        await pilot.press("escape")
        await wait_until(pilot, lambda: not isinstance(app.screen, DetailScreen), "closed")


@pytest.mark.asyncio
async def test_kick_takes_another_code_and_refuses_a_bad_one(fake_server: ServerFactory) -> None:
    server = await fake_server()
    app = console(server.path, refresh_every=60)
    async with app.run_test(size=SIZE) as pilot:
        chosen = await first_connection(pilot, app)
        await pilot.press("k")
        await wait_until(pilot, lambda: isinstance(app.screen, KickScreen), "the question")
        code = app.screen.query_one("#code", Input)
        code.value = "3999"
        await pilot.click("#yes")
        problem = app.screen.query_one("#problem", Static)
        await wait_until(pilot, lambda: "4000-4999" in str(problem.content), "the problem")
        assert isinstance(app.screen, KickScreen)
        assert server.commands(Kick) == []
        code.value = "4002"
        await pilot.press("y")  # (a second click this soon would hit the button's debounce)
        await wait_until(pilot, lambda: server.commands(Kick), "the kick")
        assert server.commands(Kick)[0].code == 4002
        assert server.commands(Kick)[0].conn == chosen


@pytest.mark.asyncio
async def test_drain_asks_first_then_drains_the_selected_server(
    fake_server: ServerFactory,
) -> None:
    server = await fake_server()
    app = console(server.path)
    async with app.run_test(size=SIZE) as pilot:
        await attached(pilot, app)
        await pilot.press("d")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the question")
        assert "Drain a3f9" in rendered(app.screen.query_one(".question", Static))
        await pilot.press("escape")
        await wait_until(pilot, lambda: not isinstance(app.screen, ConfirmScreen), "cancelled")
        await pilot.press("d")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "asked again")
        await pilot.click("#no")
        await wait_until(pilot, lambda: not isinstance(app.screen, ConfirmScreen), "cancelled")
        assert server.commands(Drain) == []

        await pilot.press("d", "y")
        await wait_until(pilot, lambda: server.commands(Drain) == [Drain()], "the drain")
        await wait_until(pilot, lambda: any("is draining" in t for t in app.outcomes), "said")
        assert "240 connections told to reconnect" in app.outcomes[-1]
        await server.push()
        await wait_until(pilot, lambda: "YES" in figures(app), "the flag")

        await pilot.press("d", "y")  # again: the server says no, and so does the console
        await wait_until(pilot, lambda: "failed" in app.outcomes[-1], "the error")
        assert "draining" in app.outcomes[-1]


@pytest.mark.asyncio
async def test_the_event_log_shows_events_and_filters_them(fake_server: ServerFactory) -> None:
    server = await fake_server()
    app = console(server.path)
    async with app.run_test(size=SIZE) as pilot:
        await attached(pilot, app)
        await pilot.press("4")
        await wait_until(pilot, lambda: table(app, "events").row_count == 14, "the first events")
        events = table(app, "events")
        assert [str(cell) for cell in events.get_row_at(4)][2:] == [
            "conn_close",
            "a3f9-135",
            "code=1000 why=client",
        ]
        server.data.events = [ServerEvent(20, 1.0, "drain"), ServerEvent(21, 2.0, "kick", "a3f9-9")]
        await server.push()
        await wait_until(pilot, lambda: events.row_count == 16, "two more")
        assert str(events.get_row_at(15)[2]) == "kick"  # the newest at the bottom
        assert events.cursor_row == 15

        await pilot.press("slash", *"KICK")
        await wait_until(pilot, lambda: events.row_count == 2, "the kicks")
        assert {str(events.get_row_at(row)[2]) for row in range(2)} == {"kick"}
        await pilot.press(*["backspace"] * 4, *"code=1008")
        await wait_until(pilot, lambda: events.row_count == 1, "by detail")
        assert str(events.get_row_at(0)[3]) == "a3f9-149"
        # New events that pass the filter join; the others wait in the model.
        server.data.events = [
            ServerEvent(22, 3.0, "conn_close", "a3f9-7", {"code": 1008}),
            ServerEvent(23, 3.0, "conn_open", "a3f9-8"),
        ]
        await server.push()
        await wait_until(pilot, lambda: events.row_count == 2, "the matching one")
        await pilot.press(*["backspace"] * 9)
        await wait_until(pilot, lambda: events.row_count == 18, "all again")


@pytest.mark.asyncio
async def test_a_stopped_server_shows_the_reconnect_banner_until_it_is_back(
    fake_server: ServerFactory,
) -> None:
    server = await fake_server()
    app = console(server.path)
    async with app.run_test(size=SIZE) as pilot:
        await attached(pilot, app)
        await server.stop()
        await wait_until(pilot, lambda: f"reconnecting to {server.path}" in banner(app), "banner")
        assert "(down)" in figures(app)
        await server.start()
        await wait_until(pilot, lambda: banner(app) == "", "the banner gone")
        assert len(server.commands(Watch)) == 2
        await wait_until(pilot, lambda: "(down)" not in figures(app), "up again")


@pytest.mark.asyncio
async def test_a_missing_socket_is_said(socket_dir: Path) -> None:
    path = socket_dir / "odin-999.sock"
    app = console(path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: f"socket missing: {path}" in banner(app), "the banner")


@pytest.mark.asyncio
async def test_a_permission_denied_reply_is_said(fake_server: ServerFactory) -> None:
    server = await fake_server(deny=True)
    app = console(server.path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: "permission denied" in banner(app), "the banner")
        assert str(server.path) in banner(app)
        assert "run the console as the server's user or root" in banner(app)


@pytest.mark.asyncio
async def test_another_protocol_version_is_reported(fake_server: ServerFactory) -> None:
    server = await fake_server(demo_data(protocol=7))
    app = console(server.path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: "protocol version mismatch" in banner(app), "the banner")
        assert "the server speaks protocol 7, this console 1" in banner(app)
        key = str(server.path)
        assert app.model.servers[key].status.state is LinkState.VERSION_MISMATCH


@pytest.mark.asyncio
async def test_servers_found_in_the_directory_and_the_one_the_tables_act_on(
    fake_server: ServerFactory, socket_dir: Path
) -> None:
    first = await fake_server(demo_data("a3f9", 101), pid=101)
    second = await fake_server(demo_data("c81e", 202, connections=30), pid=202)
    app = console(directory=socket_dir, scan_every=0.1, refresh_every=60)
    async with app.run_test(size=SIZE) as pilot:
        await attached(pilot, app, 2)
        assert "all (2)" in figures(app)
        assert "270 / 20,000" in figures(app)
        await pilot.press("2")
        await wait_until(pilot, lambda: first.commands(ListConnections), "the first's page")
        selected = app.selected
        other = second if selected == str(first.path) else first
        await pilot.press("s")
        await wait_until(pilot, lambda: other.commands(ListConnections), "the other's page")
        prefix = other.data.identity.instance
        await wait_until(
            pilot,
            lambda: (
                row_keys(app, "connections") and row_keys(app, "connections")[0].startswith(prefix)
            ),
            "its rows",
        )
        assert f"instance {prefix}" in str(app.query_one("#server-info", Static).content)
        assert app.query_one("#server", Select).value == str(other.path)

        # A server started later appears; one gone (socket and all) is let go.
        third = await fake_server(demo_data("d00d", 303), pid=303)
        await wait_until(pilot, lambda: len(app.model.live()) == 3, "the third")
        await second.stop()
        second.path.unlink()
        await wait_until(pilot, lambda: str(second.path) not in app.model.servers, "let go")
        assert any("its socket is gone" in text for text in app.outcomes)
        assert str(third.path) in app.clients


@pytest.mark.asyncio
async def test_an_empty_directory_says_it_waits(socket_dir: Path) -> None:
    app = console(directory=socket_dir)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: "no Odin server found" in banner(app), "the banner")
        await pilot.press("d")  # nothing to drain: a warning, no question
        assert not isinstance(app.screen, ConfirmScreen)


@pytest.mark.asyncio
async def test_help_lists_the_keys_and_the_grafana_link(fake_server: ServerFactory) -> None:
    server = await fake_server()
    app = console(server.path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("question_mark")
        await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen), "help")
        keys = rendered(app.screen.query_one("#help-keys", Static))
        for words in ("Kick", "Drain", "Next server", "Sort", "Reverse", "Filter", "Quit"):
            assert words in keys
        assert GRAFANA in "".join(str(s.content) for s in app.screen.query(Static))
        await pilot.press("escape")
        await wait_until(pilot, lambda: not isinstance(app.screen, HelpScreen), "closed")


def test_fake_server_paths_fit_a_unix_socket(socket_dir: Path) -> None:
    assert len(str(socket_dir / "odin-99999.sock").encode()) < 107
    assert FakeServer(socket_dir / "x.sock", demo_data()).watchers == 0
