"""A Python client for Odin (docs/clients.md): subscriptions as async iterators, kept across
reconnects with recovery from the positions it tracked.

    async with odin_fanout.client.connect("ws://127.0.0.1:3002/ws") as client:
        async for item in client.subscribe("BTC.*"):
            ...

Built on trio-websocket; it imports nothing of the server.
"""

from __future__ import annotations

from odin_fanout.client.client import Client, Subscription, Token, TokenProvider, connect
from odin_fanout.client.items import (
    AuthenticationError,
    Event,
    Gap,
    Item,
    NotRecovered,
    Position,
    Refusal,
    SubscriptionError,
)

__all__ = [
    "AuthenticationError",
    "Client",
    "Event",
    "Gap",
    "Item",
    "NotRecovered",
    "Position",
    "Refusal",
    "Subscription",
    "SubscriptionError",
    "Token",
    "TokenProvider",
    "connect",
]
