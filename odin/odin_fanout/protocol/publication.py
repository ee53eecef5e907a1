"""Positioned publications: the unit the broker hands to the server and the server to clients.

Positions come from the broker's history, never from a connection or a process: ``seq`` is
the message's position in the history stream (shared by all channels, strictly increasing),
``prev`` is the position of the previous message *of the same channel* (0 when the channel
had none), and ``epoch`` names the history. A client that tracks the last ``seq`` it saw on a
channel knows it missed something exactly when a message arrives whose ``prev`` differs.
"""

from __future__ import annotations

import attrs


@attrs.frozen(slots=True)
class Position:
    """Where a client is in one channel's history."""

    epoch: str
    """The history this position belongs to; a position is meaningless in another epoch."""
    seq: int
    """The last position the client has seen on the channel (0: nothing yet)."""


@attrs.define(slots=True)
class Publication:
    """One message of a channel, with its place in the broker's history.

    Treated as immutable, but not declared frozen: one is built for every message the broker
    delivers, and a frozen attrs class takes three times as long to construct.
    """

    channel: str
    """``SYMBOL.event``."""
    seq: int
    """Position in the history stream; strictly increasing, shared by all channels."""
    prev: int
    """Position of the previous message on this channel, 0 if there was none."""
    epoch: str
    """Name of the history the positions belong to."""
    ts: float
    """When the history stored the message (Unix seconds; clients see milliseconds)."""
    payload: bytes
    """The publisher's JSON body, exactly as published."""


@attrs.frozen(slots=True)
class Gap:
    """Positions of a channel that the server knows it did not deliver.

    ``from_seq``..``to_seq`` (inclusive) hold at least one message the receiver will not get
    from this stream; the next message's ``prev`` may be ``to_seq``.
    """

    channel: str
    from_seq: int
    to_seq: int
    reason: str
