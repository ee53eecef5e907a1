"""The keys operators of k9s and htop expect: ``j``/``k``/``g``/``G`` in the tables, ``/`` to the
filter, ``:`` to the command palette, ``?`` or ``h`` to the help; and none of them while a
filter is being typed in."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
from textual.binding import Binding
from textual.command import Command as PaletteOption
from textual.command import CommandList, CommandPalette
from textual.dom import DOMNode
from textual.widget import Widget
from textual.widgets import DataTable, Input, Static, TabbedContent

import odin_fanout.console as console_package
from odin_fanout.console.app import ConsoleApp
from odin_fanout.console.commands import CHANNELS, COMMANDS, CONNECTIONS, bound_keys
from odin_fanout.console.screens.confirm import KickScreen
from odin_fanout.console.screens.help import HelpScreen, help_sections
from odin_fanout.console.widgets.channels import ChannelsView
from odin_fanout.console.widgets.connections import ConnectionsView
from odin_fanout.control.protocol import Kick, ListConnections
from tests.console.conftest import ServerFactory
from tests.console.demo import connections_page
from tests.console.test_app import (
    SIZE,
    attached,
    console,
    first_connection,
    focused,
    rendered,
    row_keys,
    table,
    wait_until,
)


@pytest.mark.asyncio
async def test_j_k_g_and_G_move_the_cursor_as_the_arrows_do(fake_server: ServerFactory) -> None:
    server = await fake_server()
    app = console(server.path, refresh_every=60)
    async with app.run_test(size=SIZE) as pilot:
        await first_connection(pilot, app)
        grid = table(app, "connections")
        assert focused(app) is grid
        assert grid.cursor_row == 0
        await pilot.press("j", "j")
        assert grid.cursor_row == 2
        await pilot.press("k")
        assert grid.cursor_row == 1
        await pilot.press("G")
        assert grid.cursor_row == grid.row_count - 1
        await pilot.press("g")
        assert grid.cursor_row == 0
        await pilot.press("down")
        assert grid.cursor_row == 1
        # k moves; it no longer kicks (K does).
        assert not isinstance(app.screen, KickScreen)
        assert server.commands(Kick) == []

        # The event log the same way (it follows the newest, at the bottom).
        await pilot.press("4")
        events = table(app, "events")
        await wait_until(pilot, lambda: events.row_count == 14, "the events")
        await wait_until(pilot, lambda: focused(app) is events, "the focus in the log")
        assert events.cursor_row == 13
        await pilot.press("k", "k")
        assert events.cursor_row == 11
        await pilot.press("g", "j")
        assert events.cursor_row == 1
        await pilot.press("G")
        assert events.cursor_row == 13


@pytest.mark.asyncio
async def test_slash_goes_to_the_filter_where_every_key_is_text(
    fake_server: ServerFactory,
) -> None:
    server = await fake_server()
    app = console(server.path, refresh_every=60)
    async with app.run_test(size=SIZE) as pilot:
        await first_connection(pilot, app)
        grid = table(app, "connections")
        await pilot.press("j")
        assert grid.cursor_row == 1
        await pilot.press("slash")
        field = app.query_one("#connections-view").query_one(Input)
        assert focused(app) is field
        await pilot.press(*"BTC.liquidity")
        query = ListConnections(0, 200, "queue", True, "BTC.liquidity")
        expected = [c.id for c in connections_page(server.data.connections, query).items]
        assert 0 < len(expected) < 100
        await wait_until(pilot, lambda: row_keys(app, "connections") == expected, "filtered")

        # The table's, the view's and the app's keys all type into the filter.
        before = grid.cursor_row
        await pilot.press("j", "k", "g", "G", "K", "colon", "question_mark", "h", "p", "1")
        assert field.value == "BTC.liquidityjkgGK:?hp1"
        assert focused(app) is field
        assert grid.cursor_row == before
        assert not isinstance(app.screen, CommandPalette | HelpScreen | KickScreen)
        assert not app.paused
        assert app.query_one(TabbedContent).active == "connections"

        # Back to the filter as it was, and to the table (enter), where j moves again.
        await pilot.press(*["backspace"] * 10, "enter")
        assert isinstance(focused(app), DataTable)
        view = app.query_one(ConnectionsView)
        await wait_until(pilot, lambda: view.filter_text == "BTC.liquidity", "the filter")
        await wait_until(pilot, lambda: row_keys(app, "connections") == expected, "the rows")
        before = grid.cursor_row
        await pilot.press("j")
        assert grid.cursor_row == before + 1

        # The event log has a filter too.
        await pilot.press("4", "slash")
        assert focused(app) is app.query_one("#events-view").query_one(Input)
        await pilot.press(*"jk")
        assert app.query_one("#events-view").query_one(Input).value == "jk"


@pytest.mark.asyncio
async def test_colon_opens_the_palette_where_a_few_letters_run_a_command(
    fake_server: ServerFactory,
) -> None:
    server = await fake_server()
    app = console(server.path, refresh_every=60)
    async with app.run_test(size=SIZE) as pilot:
        await attached(pilot, app)
        tabs = app.query_one(TabbedContent)
        await pilot.press("colon")
        await wait_until(pilot, lambda: isinstance(app.screen, CommandPalette), "the palette")
        await pilot.press(*"connections")

        def first_is(title: str) -> bool:
            """Whether the palette's first option, the one enter runs, is ``title``."""
            options = app.screen.query(CommandList)
            if not options or not options.first().option_count:
                return False
            option = options.first().get_option_at_index(0)
            return isinstance(option, PaletteOption) and option.hit.text == title

        await wait_until(pilot, lambda: first_is("Connections"), "the command found")
        await pilot.press("enter")
        await wait_until(pilot, lambda: tabs.active == "connections", "the connections shown")
        assert not isinstance(app.screen, CommandPalette)
        await wait_until(pilot, lambda: table(app, "connections").row_count > 0, "rows")

        # A connection's commands are offered where the connections are: kick asks first.
        await pilot.press("colon", *"kick")
        await wait_until(pilot, lambda: first_is("Kick the selected connection"), "kick")
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, KickScreen), "the question")
        await pilot.press("n")
        await wait_until(pilot, lambda: not isinstance(app.screen, KickScreen), "cancelled")
        assert server.commands(Kick) == []

        # Pause, then only resume is offered.
        await pilot.press("colon", *"pause")
        await wait_until(pilot, lambda: first_is("Pause"), "pause")
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.paused, "paused")
        await pilot.press("colon", *"resume")
        await wait_until(pilot, lambda: first_is("Resume"), "resume")
        await pilot.press("enter")
        await wait_until(pilot, lambda: not app.paused, "resumed")

        # A name begun comes first: "con" is Connections, not "Reload configuration".
        await pilot.press("3", "colon", *"con")
        await wait_until(pilot, lambda: first_is("Connections"), "connections first")
        await pilot.press("enter")
        await wait_until(pilot, lambda: tabs.active == "connections", "the connections again")


@pytest.mark.asyncio
async def test_question_mark_or_h_lists_every_key(fake_server: ServerFactory) -> None:
    server = await fake_server()
    app = console(server.path)
    async with app.run_test(size=SIZE) as pilot:
        for key in ("question_mark", "h"):
            await pilot.press(key)
            await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen), "help")
            shown = rendered(app.screen.query_one("#help-keys", Static)).splitlines()
            for keys, words in (
                ("j", "Next row"),
                ("k", "Previous row"),
                ("g", "First row"),
                ("G", "Last row"),
                ("/", "Filter"),
                (":", "Commands"),
                ("p", "Pause"),
                ("p", "Resume"),
                ("K", "Kick"),
                ("?, h", "Help"),
            ):
                assert any(
                    line.strip().startswith(f"{keys} ") and words in line for line in shown
                ), (keys, words)
            commands = str(app.screen.query_one("#help-commands", Static).content)
            assert all(command.title in commands for command in COMMANDS)
            await pilot.press(key)  # the same key closes it
            await wait_until(pilot, lambda: not isinstance(app.screen, HelpScreen), "closed")


def test_the_help_holds_every_binding_of_the_console() -> None:
    """A view or a dialog added with keys of its own and left out of the help fails here."""
    for module in pkgutil.walk_packages(console_package.__path__, "odin_fanout.console."):
        if not module.name.endswith("__main__"):  # that one runs the console
            importlib.import_module(module.name)
    listed = {
        (binding.key, binding.action)
        for _, bindings in help_sections(ConsoleApp.BINDINGS)
        for binding in Binding.make_bindings(bindings)
    }
    classes: list[type[DOMNode]] = [ConsoleApp, *_subclasses(Widget)]
    owned = [cls for cls in classes if cls.__module__.startswith("odin_fanout.console.")]
    assert {"ConnectionsView", "CursorTable", "HelpScreen"} <= {cls.__name__ for cls in owned}
    for cls in owned:
        for binding in Binding.make_bindings(cls.__dict__.get("BINDINGS", [])):
            if binding.description:
                assert (binding.key, binding.action) in listed, (cls.__name__, binding)


def _subclasses(cls: type[Widget]) -> list[type[Widget]]:
    direct = cls.__subclasses__()
    return direct + [sub for each in direct for sub in _subclasses(each)]


def test_each_command_is_an_action_with_a_key() -> None:
    for command in COMMANDS:
        views: dict[str | None, type[DOMNode]] = {
            CONNECTIONS: ConnectionsView,
            CHANNELS: ChannelsView,
            None: ConsoleApp,
        }
        cls = views[command.target]
        name = command.action.split("(")[0]
        assert callable(getattr(cls, f"action_{name}", None)), command
        assert bound_keys(cls, command.action), command
