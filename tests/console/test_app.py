"""The console app driven by Textual's Pilot against fake control servers (``tests.console.demo``,
the real protocol with invented data): what it shows, what it sends, and what it says when a
link breaks."""

from __future__ import annotations

import io
import itertools
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
from rich.console import Console
from textual.pilot import Pilot
from textual.widget import Widget
from textual.widgets import DataTable, Input, Select, Sparkline, Static, TabbedContent, TabPane

from odin_fanout.console import format
from odin_fanout.console.app import TABS, ConsoleApp
from odin_fanout.console.link import LinkState
from odin_fanout.console.screens.confirm import (
    OFFERED_CODES,
    ConfirmScreen,
    KickScreen,
    ReloadScreen,
)
from odin_fanout.console.screens.detail import DetailScreen
from odin_fanout.console.screens.help import HelpScreen
from odin_fanout.console.widgets.header import StatusLine
from odin_fanout.console.widgets.tables import PAGE_SIZE
from odin_fanout.control.protocol import (
    KICKED,
    Drain,
    Inspect,
    Kick,
    ListChannels,
    ListConnections,
    Reload,
    Reloaded,
    ServerEvent,
    Watch,
)
from tests.console.conftest import ServerFactory, owner_unknown
from tests.console.demo import BASE_TIME, FakeServer, channels_page, connections_page, demo_data

SIZE = (140, 45)
GRAFANA = "https://grafana.example/d/odin"


def console(*sockets: Path, **options: object) -> ConsoleApp:
    options.setdefault("flush_every", 0.05)
    options.setdefault("grafana_url", GRAFANA)
    options.setdefault("owner_running", owner_unknown)
    app = ConsoleApp(sockets=list(sockets), **options)  # type: ignore[arg-type]
    app.animation_level = "none"  # a tab's underline glides for 0.3 s: the tests need not wait
    return app


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


def lines(widget: Widget) -> list[str]:
    """What a widget shows on the screen, line by line, cut to its size as a terminal cuts."""
    return [widget.render_line(y).text for y in range(widget.size.height)]


def header(app: ConsoleApp) -> str:
    return "\n".join(lines(app.query_one(StatusLine)))


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
        sent = [column.key.value for column in grid.ordered_columns].index("sent")
        x = sum(column.get_render_width(grid) for column in grid.ordered_columns[:sent]) + 2
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

        await pilot.press("K")
        await wait_until(pilot, lambda: isinstance(app.screen, KickScreen), "the question")
        assert chosen in rendered(app.screen.query_one(".question", Static))
        await pilot.press("n")
        await wait_until(pilot, lambda: not isinstance(app.screen, KickScreen), "cancelled")
        await pilot.press("K")
        await wait_until(pilot, lambda: isinstance(app.screen, KickScreen), "asked again")
        await pilot.press("escape")
        await wait_until(pilot, lambda: not isinstance(app.screen, KickScreen), "cancelled")
        assert server.commands(Kick) == []

        await pilot.press("K")
        await wait_until(pilot, lambda: isinstance(app.screen, KickScreen), "asked again")
        await pilot.press("y")
        await wait_until(pilot, lambda: server.commands(Kick), "the kick")
        assert server.commands(Kick) == [Kick(chosen, KICKED, "closed by operator")]
        await wait_until(
            pilot, lambda: f"kicked {chosen} (close code {KICKED})" in app.outcomes, "said"
        )
        await wait_until(pilot, lambda: chosen not in row_keys(app, "connections"), "gone")

        # An error from the server is said too.
        gone = row_keys(app, "connections")[0]
        server.data.connections = [c for c in server.data.connections if c.id != gone]
        table(app, "connections").move_cursor(row=0)
        await pilot.press("K")
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
        await pilot.press("K")
        await wait_until(pilot, lambda: isinstance(app.screen, KickScreen), "the question")
        code = app.screen.query_one("#code", Input)
        assert code.value == str(KICKED)
        offered = rendered(app.screen.query_one("#codes", Static))
        for number, meaning in OFFERED_CODES.items():
            assert f"{number} {meaning}" in offered
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
        # (Up once hello is answered; the watch follows the snapshot.)
        await wait_until(pilot, lambda: len(server.commands(Watch)) == 2, "watching again")
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
        for words in (
            "Kick",
            "Drain",
            "Reload config",
            "Reload every server",
            "Pause",
            "Resume",
            "Next server",
            "Sort",
            "Reverse",
            "Filter",
            "Quit",
        ):
            assert words in keys
        assert GRAFANA in "".join(str(s.content) for s in app.screen.query(Static))
        await pilot.press("escape")
        await wait_until(pilot, lambda: not isinstance(app.screen, HelpScreen), "closed")


def test_fake_server_paths_fit_a_unix_socket(socket_dir: Path) -> None:
    assert len(str(socket_dir / "odin-99999.sock").encode()) < 107
    assert FakeServer(socket_dir / "x.sock", demo_data()).watchers == 0


# ---- moving between views ----------------------------------------------------------------


def pane_of(widget: Widget | None) -> str | None:
    while widget is not None and not isinstance(widget, TabPane):
        widget = widget.parent if isinstance(widget.parent, Widget) else None
    return widget.id if widget is not None else None


@pytest.mark.asyncio
async def test_every_view_key_works_from_every_view(fake_server: ServerFactory) -> None:
    server = await fake_server()
    app = console(server.path, refresh_every=60)
    async with app.run_test(size=SIZE) as pilot:
        await attached(pilot, app)
        tabs = app.query_one(TabbedContent)

        # Every ordered pair of views, each once: a de Bruijn sequence over the four keys.
        path = "11213142232433441"
        pairs = set(itertools.pairwise(path))
        assert pairs == {(a, b) for a in "1234" for b in "1234"}

        def showing(tab: str) -> Callable[[], bool]:
            return lambda: tabs.active == tab and pane_of(app.focused) == tab

        came_from = "the start"
        for key in path:
            tab = TABS[int(key) - 1]
            await pilot.press(key)
            await wait_until(
                pilot, showing(tab), f"{key} from {came_from} shows {tab}, with the focus there"
            )
            await pilot.pause()  # and stays: nothing switches back
            assert (tabs.active, pane_of(app.focused)) == (tab, tab), f"{key} from {came_from}"
            came_from = tab


# ---- the header at 80 x 24 -----------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_header_fits_80_columns_by_24_rows(
    fake_server: ServerFactory, socket_dir: Path
) -> None:
    await fake_server(demo_data("a3f9", 101), pid=101)
    await fake_server(demo_data("c81e", 202, connections=30), pid=202)
    app = console(directory=socket_dir, scan_every=0.1)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: len(app.model.live()) == 2, "both servers up")
        total = app.model.total()
        assert total is not None
        facts = [
            "2/2 servers up",
            "270 connections",
            f"in {format.compact(total.in_per_s)}/s",
            f"out {format.compact(total.out_per_s)}/s",
        ]
        await wait_until(pilot, lambda: all(fact in header(app) for fact in facts), "the facts")
        shown = lines(app.query_one(StatusLine))
        assert len(shown) == 1  # one line, nothing wrapped away
        assert shown[0].startswith(" Odin console · ")
        assert len(shown[0].rstrip()) <= 80
        assert app.query_one(StatusLine).region.right <= 80
        # The selected server's bar: its two lines whole, inside the screen.
        bar = app.query_one("#server-info", Static)
        view = app.selected_view()
        assert view is not None and view.identity is not None
        expected = [
            f"instance {view.identity.instance}  pid {view.identity.pid}  odin 0.1.0",
            f"ws://0.0.0.0:3002/ws  {view.path.name}",
        ]
        await wait_until(pilot, lambda: lines(bar)[-2:] == expected, "the server bar")
        assert bar.region.right <= 80

        await pilot.press("p")  # paused: the title makes room, the facts stay
        await wait_until(pilot, lambda: "PAUSED" in header(app), "paused")
        assert all(fact in header(app) for fact in facts)


# ---- pause ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_pause_freezes_the_views_and_resume_shows_what_arrived(
    fake_server: ServerFactory,
) -> None:
    server = await fake_server(auto=True)
    app = console(server.path, interval=0.2, refresh_every=0.05)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await attached(pilot, app)
        view = app.model.servers[str(server.path)]
        await pilot.press("4")
        events = table(app, "events")
        await wait_until(pilot, lambda: events.row_count == 14, "the first events")

        await pilot.press("p")
        await wait_until(pilot, lambda: "PAUSED" in header(app), "PAUSED in the header")
        assert app.paused
        server.data.events = [
            ServerEvent(30, BASE_TIME, "kick", "a3f9-9"),
            ServerEvent(31, 1.0, "drain"),
        ]
        await wait_until(pilot, lambda: len(app.model.events) == 16, "received while paused")
        await pilot.pause()
        assert events.row_count == 14  # received, not shown

        # The tables: shown when asked, not refreshed while paused.
        await pilot.press("2")
        await wait_until(pilot, lambda: table(app, "connections").row_count > 0, "asked for")
        asked = len(server.commands(ListConnections))
        first = row_keys(app, "connections")[0]
        server.data.connections = [c for c in server.data.connections if c.id != first]
        updates = len(view.rate_in)
        # Three more updates: many refresh periods (0.05 s) pass, and the model goes on.
        await wait_until(pilot, lambda: len(view.rate_in) >= updates + 3, "three updates")
        assert len(server.commands(ListConnections)) == asked
        assert row_keys(app, "connections")[0] == first

        await pilot.press("p")
        await wait_until(
            pilot, lambda: "resumed: 2 events arrived while paused" in app.outcomes, "said"
        )
        assert "PAUSED" not in header(app)
        await wait_until(pilot, lambda: first not in row_keys(app, "connections"), "refreshed")
        await pilot.press("4")
        await wait_until(pilot, lambda: events.row_count == 16, "what arrived meanwhile")
        assert [str(events.get_row_at(row)[2]) for row in (14, 15)] == ["kick", "drain"]


# ---- grouping ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_repeated_slow_consumer_events_are_one_counted_line(
    fake_server: ServerFactory,
) -> None:
    server = await fake_server()
    app = console(server.path)
    async with app.run_test(size=SIZE) as pilot:
        await attached(pilot, app)
        await pilot.press("4")
        events = table(app, "events")
        await wait_until(pilot, lambda: events.row_count == 14, "the first events")

        def slow(conn: str, second: int, dropped: int) -> ServerEvent:
            detail: dict[str, str | int | float | bool | None] = {
                "action": "conflated",
                "dropped": dropped,
            }
            return ServerEvent(100 + second, BASE_TIME + second, "slow_consumer", conn, detail)

        # Two clients, interleaved, as a flood looks.
        server.data.events = [slow("a3f9-5" if n % 2 else "a3f9-6", n, n) for n in range(40)]
        server.data.events.append(ServerEvent(200, BASE_TIME + 40, "conn_close", "a3f9-6"))
        await server.push()
        await wait_until(pilot, lambda: events.row_count == 17, "two groups and the close")

        def row(conn: str) -> list[str]:
            index = next(
                i
                for i in range(events.row_count)
                if str(events.get_row_at(i)[3]) == conn
                and str(events.get_row_at(i)[2]) == "slow_consumer"
            )
            return [str(cell) for cell in events.get_row_at(index)]

        assert row("a3f9-5")[4] == "×20, last: action=conflated dropped=39"
        assert row("a3f9-6")[4] == "×20, last: action=conflated dropped=38"
        start, end = format.clock(BASE_TIME + 1), format.clock(BASE_TIME + 39)
        assert row("a3f9-5")[0] == f"{start}–{end}"
        assert str(events.get_row_at(16)[2]) == "conn_close"  # other events: a line each

        # More of the same: the line counts on, in place.
        server.data.events = [slow("a3f9-5", 41, 5)]
        await server.push()
        await wait_until(pilot, lambda: row("a3f9-5")[4].startswith("×21,"), "counted on")
        assert events.row_count == 17
        assert row("a3f9-5")[4] == "×21, last: action=conflated dropped=5"


# ---- reload --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_reload_asks_first_then_says_what_changed_or_why_not(
    fake_server: ServerFactory,
) -> None:
    server = await fake_server()
    server.data.reload = Reloaded(["log.level", "connection.idle_timeout"], ["server.port"])
    app = console(server.path)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await attached(pilot, app)
        await pilot.press("R")
        await wait_until(pilot, lambda: isinstance(app.screen, ReloadScreen), "the question")
        assert "Reload the configuration of a3f9" in rendered(
            app.screen.query_one(".question", Static)
        )
        assert not app.screen.query("#all")  # one server: nothing more to offer
        await pilot.press("a")  # not offered: ignored
        await pilot.press("n")
        await wait_until(pilot, lambda: not isinstance(app.screen, ReloadScreen), "cancelled")
        assert server.commands(Reload) == []

        await pilot.press("R", "y")
        await wait_until(pilot, lambda: server.commands(Reload) == [Reload()], "the reload")
        said = (
            "a3f9 reloaded: changed log.level, connection.idle_timeout;"
            " needs a restart: server.port"
        )
        await wait_until(pilot, lambda: said in app.outcomes, "what changed")
        await server.push()  # the server's reload event, in the log
        await pilot.press("4")
        events = table(app, "events")
        await wait_until(
            pilot,
            lambda: any(str(events.get_row_at(r)[2]) == "reload" for r in range(events.row_count)),
            "the reload event",
        )

        # A bad configuration: the problems, in a notification and in the log.
        server.data.reload = ["server.port: must be from 1 to 65535", "log.level: unknown"]
        await pilot.press("R", "y")
        await wait_until(pilot, lambda: len(server.commands(Reload)) == 2, "the second reload")
        await wait_until(pilot, lambda: "failed" in app.outcomes[-1], "the error")
        assert app.outcomes[-1] == (
            "reload a3f9 failed: config_invalid: server.port: must be from 1 to 65535;"
            " log.level: unknown"
        )
        await wait_until(
            pilot,
            lambda: str(events.get_row_at(events.row_count - 1)[2]) == "reload_failed",
            "logged",
        )
        assert "server.port: must be from 1 to 65535" in str(
            events.get_row_at(events.row_count - 1)[4]
        )

        server.data.reload = None
        await pilot.press("R", "y")
        await wait_until(pilot, lambda: "unavailable" in app.outcomes[-1], "unavailable")


@pytest.mark.asyncio
async def test_reload_all_reloads_every_server(
    fake_server: ServerFactory, socket_dir: Path
) -> None:
    first = await fake_server(demo_data("a3f9", 101), pid=101)
    second = await fake_server(demo_data("c81e", 202, connections=30), pid=202)
    second.data.reload = Reloaded([], ["nats.url"])
    app = console(directory=socket_dir, scan_every=0.1)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await attached(pilot, app, 2)
        await pilot.press("R")
        await wait_until(pilot, lambda: isinstance(app.screen, ReloadScreen), "the question")
        assert "or of all 2 servers" in rendered(app.screen.query_one(".question", Static))
        await pilot.press("a")
        await wait_until(
            pilot,
            lambda: first.commands(Reload) == [Reload()] and second.commands(Reload) == [Reload()],
            "both reloaded",
        )
        await wait_until(pilot, lambda: len(app.outcomes) >= 2, "both said")
        assert "a3f9 reloaded: changed nothing" in app.outcomes
        assert "c81e reloaded: changed nothing; needs a restart: nats.url" in app.outcomes


@pytest.mark.asyncio
async def test_reload_with_no_server_says_so(socket_dir: Path) -> None:
    app = console(directory=socket_dir)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("R")
        await pilot.pause()
        assert not isinstance(app.screen, ReloadScreen)
