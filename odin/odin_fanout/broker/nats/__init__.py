"""The NATS JetStream broker: the only package that imports asyncio, nats-py or trio-asyncio."""

from __future__ import annotations

from odin_fanout.broker.nats.bridge import NatsBroker as NatsBroker
from odin_fanout.broker.nats.bridge import open_nats_broker as open_nats_broker

__all__ = ["NatsBroker", "open_nats_broker"]
