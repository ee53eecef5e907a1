"""The console's commands for Textual's command palette (``:``, or ctrl+p): its views and
actions by name, so that ``:`` then a few letters runs one.

Each command is an action of the app or of a view, the same one its key runs: the palette
shows that key beside it, read from the bindings.
"""

from __future__ import annotations

from functools import partial
from typing import Final

import attrs
from textual.actions import parse
from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.css.query import NoMatches
from textual.dom import DOMNode
from textual.widgets import TabbedContent

from odin_fanout.console.screens.help import key_text


@attrs.frozen
class Command:
    title: str
    help: str
    action: str
    """An action string, run on the app or on ``target``."""
    target: str | None = None
    """The selector of the view whose action it is; None: the app's."""
    tab: str | None = None
    """Offered only while this tab is shown: an action on a row not in sight is a surprise."""


CONNECTIONS: Final = "#connections-view"
CHANNELS: Final = "#channels-view"

COMMANDS: Final[tuple[Command, ...]] = (
    Command("Overview", "figures and rates of every server", "show_tab('overview')"),
    Command("Connections", "the selected server's connections", "show_tab('connections')"),
    Command("Channels", "the selected server's channels", "show_tab('channels')"),
    Command("Events", "the event log", "show_tab('events')"),
    Command("Next server", "select the next server", "next_server"),
    Command("Pause", "freeze the views", "pause"),
    Command("Resume", "show what arrived while paused", "resume"),
    Command("Drain", "drain the selected server (asks first)", "drain"),
    Command("Reload configuration", "of the selected server or all (asks first)", "reload"),
    Command(
        "Kick the selected connection", "close it (asks first)", "kick", CONNECTIONS, "connections"
    ),
    Command("Inspect the selected connection", "in full", "inspect", CONNECTIONS, "connections"),
    Command("Tap the selected connection", "its frames, live", "tap", CONNECTIONS, "connections"),
    Command(
        "Tap the selected channel", "its frames on every worker, live", "tap", CHANNELS, "channels"
    ),
    Command("Help", "every key", "help"),
    Command("Quit", "leave the console", "quit"),
)


def bound_keys(node: type[DOMNode], action: str) -> str:
    """The keys bound to ``action`` by a class of nodes (or its bases), as the help shows
    them."""
    keys = [
        key_text(binding)
        for cls in node.__mro__
        for binding in getattr(cls, "BINDINGS", ())
        if isinstance(binding, Binding) and binding.action == action
    ]
    return ", ".join(dict.fromkeys(keys))


class ConsoleCommands(Provider):
    def _available(self) -> list[tuple[Command, DOMNode, str]]:
        """The commands that apply now, each with the node it runs on and its help text."""
        try:
            # Only over the console's own screen: its views are what the commands act on.
            active = self.screen.query_one(TabbedContent).active
        except NoMatches:
            return []
        found: list[tuple[Command, DOMNode, str]] = []
        for command in COMMANDS:
            if command.tab is not None and command.tab != active:
                continue
            node: DOMNode = self.app
            if command.target is not None:
                try:
                    node = self.screen.query_one(command.target)
                except NoMatches:
                    continue
            _, name, parameters = parse(command.action)
            if not node.check_action(name, parameters):
                continue  # pause while paused, resume while not
            keys = bound_keys(type(node), command.action)
            found.append((command, node, f"{command.help}  ({keys})" if keys else command.help))
        return found

    async def _run(self, command: Command, node: DOMNode) -> None:
        await self.app.run_action(command.action, node)

    async def discover(self) -> Hits:
        for command, node, text in self._available():
            yield DiscoveryHit(command.title, partial(self._run, command, node), help=text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for command, node, text in self._available():
            score = matcher.match(command.title)
            if command.title.lower().startswith(query.strip().lower()):
                # A name begun is the one meant: "con" is Connections, not "Reload configuration".
                score *= 2
            if score > 0:
                yield Hit(
                    score,
                    matcher.highlight(command.title),
                    partial(self._run, command, node),
                    help=text,
                )
