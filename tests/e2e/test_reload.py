"""SIGHUP reloads the configuration of a running server: what can change live changes for
open connections too, the rest is reported as needing a restart, and a bad file changes
nothing."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.e2e.process import OdinProcess, odin_process, port_of
from tests.helpers import open_client

pytestmark = [pytest.mark.trio, pytest.mark.slow]


async def wait_for(odin: OdinProcess, event: str) -> dict[str, Any]:
    return await trio.to_thread.run_sync(odin.wait_for, event)


async def test_sighup_applies_live_settings_to_open_connections_and_refuses_a_bad_file(
    tmp_path: Path,
) -> None:
    config = tmp_path / "odin.toml"
    config.write_text("[connection]\nmax_subscriptions = 1\n")
    args = ["serve", "--broker", "memory", "--port", "0", "--config", str(config)]
    with odin_process(args) as odin:
        port = port_of(await wait_for(odin, "listening"))
        async with open_client(port) as client:
            refused = await client.subscribe(["BTC.trade", "ETH.trade"])
            assert refused["code"] == "SUBSCRIPTION_LIMIT"
            config.write_text(
                "[connection]\nmax_subscriptions = 10\n"
                "[history]\nmax_messages = 5\n[log]\nlevel = 'debug'\n"
            )
            odin.signal(signal.SIGHUP)
            reloaded = await wait_for(odin, "config_reloaded")
            assert reloaded["changed"] == ["connection.max_subscriptions", "log.level"]
            assert reloaded["restart_required"] == ["history.max_messages"]
            # The open connection lives by the new limit.
            assert (await client.subscribe(["BTC.trade", "ETH.trade"]))["count"] == 2

            config.write_text("[connection]\nmax_subscriptions = 0\n")
            odin.signal(signal.SIGHUP)
            failed = await wait_for(odin, "config_reload_failed")
            assert any("max_subscriptions" in error for error in failed["errors"])
            # Still serving, on the configuration it had.
            assert (await client.subscribe(["SOL.trade"]))["count"] == 3
        odin.signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(odin.wait) == 0


async def test_sighup_changes_the_simulators_rate_without_a_restart(tmp_path: Path) -> None:
    config = tmp_path / "odin.toml"
    config.write_text("[simulator]\nrate = 5.0\n")
    args = ["serve", "--broker", "memory", "--port", "0", "--simulate", "--config", str(config)]
    with odin_process(args) as odin:
        assert (await wait_for(odin, "simulator_started"))["rate"] == 5.0
        config.write_text("[simulator]\nrate = 40.0\n")
        odin.signal(signal.SIGHUP)
        assert (await wait_for(odin, "config_reloaded"))["changed"] == ["simulator.rate"]
        started = await trio.to_thread.run_sync(
            lambda: odin.wait_for("simulator_started", rate=40.0)
        )
        assert started["tokens"] == ["BTC", "ETH", "ODIN", "SOL", "DOGE"]
