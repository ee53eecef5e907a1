"""Brokers: the boundary to the bus that positions, carries and keeps publications."""

from __future__ import annotations

from odin_fanout.broker.base import (
    Broker as Broker,
)
from odin_fanout.broker.base import (
    BrokerError as BrokerError,
)
from odin_fanout.broker.base import (
    BrokerStatus as BrokerStatus,
)
from odin_fanout.broker.base import (
    FeedItem as FeedItem,
)
from odin_fanout.broker.base import (
    HistoryPage as HistoryPage,
)
from odin_fanout.broker.memory import MemoryBroker as MemoryBroker

__all__ = ["Broker", "BrokerError", "BrokerStatus", "FeedItem", "HistoryPage", "MemoryBroker"]
