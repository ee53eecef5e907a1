"""Brokers: the boundary to the bus that positions, carries and keeps publications."""

from __future__ import annotations

from odin.broker.base import (
    Broker as Broker,
)
from odin.broker.base import (
    BrokerError as BrokerError,
)
from odin.broker.base import (
    BrokerStatus as BrokerStatus,
)
from odin.broker.base import (
    FeedItem as FeedItem,
)
from odin.broker.base import (
    HistoryPage as HistoryPage,
)
from odin.broker.memory import MemoryBroker as MemoryBroker

__all__ = ["Broker", "BrokerError", "BrokerStatus", "FeedItem", "HistoryPage", "MemoryBroker"]
