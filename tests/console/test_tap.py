"""``t`` on a connection: the console taps it, shows its frames with their positions, and stops
the tap when the screen closes."""

from __future__ import annotations

import pytest
from textual.widgets import RichLog

from odin_fanout.console.screens.tap import TapScreen, tap_text
from odin_fanout.control.protocol import Tap, TapClosed, TapLine, Untap
from tests.console.conftest import ServerFactory
from tests.console.test_app import SIZE, console, first_connection, wait_until


@pytest.mark.asyncio
async def test_t_taps_the_selected_connection_and_esc_stops_it(
    fake_server: ServerFactory,
) -> None:
    server = await fake_server()
    app = console(server.path, refresh_every=60)
    async with app.run_test(size=SIZE) as pilot:
        chosen = await first_connection(pilot, app)
        await pilot.press("t")
        await wait_until(pilot, lambda: isinstance(app.screen, TapScreen), "the tap")
        assert server.commands(Tap) == [Tap(conn=chosen, rate=20)]
        log = app.screen.query_one(RichLog)
        await wait_until(pilot, lambda: len(log.lines) >= 2, "the tapped frames")
        shown = "\n".join(line.text for line in log.lines)
        assert "subscription_ack" in shown and "BTC.trade#41" in shown
        await pilot.press("escape")
        await wait_until(pilot, lambda: not isinstance(app.screen, TapScreen), "closed")
        await wait_until(pilot, lambda: server.commands(Untap), "the untap")


def test_a_tap_line_names_its_position_skips_and_close() -> None:
    line = TapLine(1, 0.0, "a-1", '{"seq":4}', 9, channel="BTC.trade", seq=4, skipped=3)
    assert tap_text(line).endswith(' BTC.trade#4 (skipped 3) {"seq":4}')
    end = TapLine(1, 0.0, "a-1", closed=TapClosed(1000, "bye", "client"))
    assert tap_text(end).endswith("closed 1000 'bye' (client)")
