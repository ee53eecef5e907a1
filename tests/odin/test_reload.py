"""A configuration reload applies the live fields to the running server and its open
connections, and reports the rest as needing a restart."""

from __future__ import annotations

import pytest

from odin_fanout.config import Config, load_config
from odin_fanout.server.reload import LIVE, apply, differences, plan_reload
from tests.helpers import make_config, running_server

pytestmark = pytest.mark.trio


def config_with(**overrides: object) -> Config:
    config, _ = load_config(environ={}, overrides=overrides)
    return config


async def test_the_plan_keeps_restart_fields_at_their_old_values() -> None:
    old = config_with()
    new = config_with(
        **{"connection.queue_max_messages": 64, "nats.stream": "OTHER", "server.port": 4000}
    )
    plan = plan_reload(old, new)
    assert plan.changed == ["connection.queue_max_messages"]
    assert plan.restart_required == ["server.port", "nats.stream"]
    assert plan.config.connection.queue_max_messages == 64
    assert (plan.config.server.port, plan.config.nats.stream) == (3002, "ODIN_TOKENS")
    assert differences(plan.config, new) == plan.restart_required


async def test_every_live_field_exists() -> None:
    config = config_with()
    for name in LIVE:
        section, field = name.split(".")
        assert hasattr(getattr(config, section), field), name


async def test_apply_reaches_open_connections_and_the_connection_limit() -> None:
    config = make_config(**{"server.max_connections": 50})
    async with running_server(config) as harness, harness.client() as client:
        await client.subscribe(["BTC.trade"])
        (connection,) = harness.context.registry.connections.values()
        new = make_config(
            **{
                "server.max_connections": 7,
                "connection.queue_max_messages": 32,
                "connection.queue_max_bytes": 8192,
                "connection.max_subscriptions": 1,
            }
        )
        apply(harness.context, plan_reload(harness.context.config, new))
        outbox = connection.writer.outbox
        assert (outbox.max_messages, outbox.max_bytes) == (32, 8192)
        assert harness.context.registry.max_connections == 7
        refused = await client.subscribe(["ETH.trade"])
        assert refused["code"] == "SUBSCRIPTION_LIMIT"
