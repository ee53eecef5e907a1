"""``t`` on a connection, or on a channel (on every worker of the host): the console taps it,
shows its frames with their positions, and stops the tap when the screen closes."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import RichLog, Static

from odin_fanout.console.screens.tap import TapScreen
from odin_fanout.control.protocol import Tap, TapClosed, TapLine, Untap
from odin_fanout.control.text import tap_text
from tests.console.conftest import ServerFactory
from tests.console.demo import supervisor_data
from tests.console.test_app import SIZE, console, first_connection, row_keys, table, wait_until
from tests.console.test_hosts_app import SUPERVISOR, hosts, up, worker


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


@pytest.mark.asyncio
async def test_t_on_a_channel_taps_it_on_every_worker_of_the_host(
    fake_server: ServerFactory, socket_dir: Path
) -> None:
    """A channel is served by each worker of a host, to its own clients: ``t`` on the channels
    table taps it on all of them, and their frames show in one log, each with its connection."""
    workers = [up(socket_dir, 0, 4301), up(socket_dir, 1, 4302)]
    await fake_server(supervisor_data(SUPERVISOR, workers), pid=SUPERVISOR)
    first = await worker(fake_server, 0, 4301, connections=240)
    second = await worker(fake_server, 1, 4302, connections=55)
    app = console(directory=socket_dir, scan_every=0.1)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: "2 of 2 workers up" in hosts(app), "both workers up")
        worker_socket = str(socket_dir / "odin-4301.sock")
        for _ in range(3):
            if app.selected == worker_socket:
                break
            await pilot.press("s")
        assert app.selected == worker_socket
        await pilot.press("3")
        await wait_until(pilot, lambda: table(app, "channels").row_count > 0, "the channels")
        channel = row_keys(app, "channels")[0]
        await pilot.press("t")
        await wait_until(pilot, lambda: isinstance(app.screen, TapScreen), "the tap")
        tapped = Tap(channel=channel, rate=20)
        await wait_until(
            pilot, lambda: first.commands(Tap) and second.commands(Tap), "a tap on each worker"
        )
        assert first.commands(Tap) == second.commands(Tap) == [tapped]
        log = app.screen.query_one(RichLog)
        title = str(app.screen.query_one("#tap-title", Static).content)
        assert f"tap {channel}" in title and "on 2 servers" in title

        def shown() -> str:
            return "\n".join(line.text for line in log.lines)

        await wait_until(pilot, lambda: " w4301-" in shown() and " w4302-" in shown(), "both")
        assert f"{channel}#41" in shown()
        await pilot.press("escape")
        await wait_until(pilot, lambda: not isinstance(app.screen, TapScreen), "closed")
        await wait_until(
            pilot, lambda: first.commands(Untap) and second.commands(Untap), "an untap on each"
        )
