"""Channel names, wildcard patterns and the match keys the subscription index uses.

A channel is ``SYMBOL.event`` (``BTC.trade``), the two last tokens of the NATS subject
``odin.token.SYMBOL.event``. A pattern replaces either or both segments with ``*``
(``BTC.*``, ``*.trade``, ``*.*``). Because names have exactly two segments, a channel
matches at most four keys, so matching is four dictionary lookups, never a scan.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import attrs

WILDCARD = "*"

#: The eight event families of the original publisher.
EVENT_TYPES: tuple[str, ...] = (
    "trade",
    "liquidity",
    "metadata",
    "social",
    "favorites",
    "creation",
    "analytics",
    "balances",
)

# Symbols are upper case as the original publisher emits them; a lower-case symbol is a
# client bug we would rather name than silently never match.
_SYMBOL = re.compile(r"[A-Z0-9][A-Z0-9_-]{0,31}\Z")
_EVENT = re.compile(r"[a-z][a-z0-9_]{0,31}\Z")


class ChannelError(ValueError):
    """A channel name or pattern that the rules refuse; the message says why."""


@attrs.frozen
class ChannelRules:
    """Which channel names clients may subscribe to."""

    event_types: frozenset[str] = frozenset(EVENT_TYPES)
    """Event segments a channel may use; empty means any well-formed event name."""

    def check(self, name: str, *, allow_pattern: bool = True) -> str:
        """Return ``name`` if it is a valid channel (or pattern), else raise ChannelError."""
        symbol, dot, event = name.partition(".")
        if not dot or "." in event:
            raise ChannelError(f"{name!r} is not SYMBOL.event (for example BTC.trade)")
        if not allow_pattern and WILDCARD in (symbol, event):
            raise ChannelError(f"{name!r} is a pattern; a concrete channel is needed here")
        if symbol != WILDCARD and not _SYMBOL.match(symbol):
            raise ChannelError(
                f"{name!r}: the symbol must be 1-32 upper-case letters, digits, '_' or '-'"
            )
        if event != WILDCARD:
            if not _EVENT.match(event):
                raise ChannelError(f"{name!r}: the event must be lower case, like 'trade'")
            if self.event_types and event not in self.event_types:
                known = ", ".join(sorted(self.event_types))
                raise ChannelError(f"{name!r}: unknown event {event!r} (known: {known})")
        return name


def check_symbol(symbol: str) -> str:
    """Return ``symbol`` if it can name a token (``BTC``), else raise ChannelError."""
    if not isinstance(symbol, str) or not _SYMBOL.match(symbol):
        raise ChannelError(
            f"{symbol!r} is not a symbol: 1-32 upper-case letters, digits, '_' or '-'"
        )
    return symbol


def is_pattern(name: str) -> bool:
    """True for ``BTC.*``, ``*.trade`` and ``*.*``."""
    return WILDCARD in name.split(".")


def match_keys(channel: str) -> tuple[str, str, str, str]:
    """The subscription keys that receive a message published on ``channel``."""
    symbol, _, event = channel.partition(".")
    return (channel, f"{symbol}.*", f"*.{event}", "*.*")


def matches(pattern: str, channel: str) -> bool:
    """True if a subscription to ``pattern`` receives messages of ``channel``."""
    return pattern in match_keys(channel)


def covered_by(channel: str, subscriptions: Iterable[str]) -> bool:
    """True if any of ``subscriptions`` (names or patterns) receives ``channel``."""
    keys = match_keys(channel)
    return any(key in keys for key in subscriptions)


def channel_from_subject(subject: str, prefix: str = "odin.token.") -> str | None:
    """Map ``odin.token.BTC.trade`` to ``BTC.trade``; None for any other subject shape."""
    if not subject.startswith(prefix):
        return None
    rest = subject[len(prefix) :]
    symbol, dot, event = rest.partition(".")
    if not dot or not symbol or not event or "." in event:
        return None
    return rest


def subject_for(channel: str, prefix: str = "odin.token.") -> str:
    """Map ``BTC.trade`` to ``odin.token.BTC.trade``."""
    return prefix + channel


# ---- interest: what a process asks its broker for ------------------------------------------
#
# A process consumes only what its clients subscribe to (every instance used to read every
# subject: at 20 hosts x 8 processes the bus sent 160 copies of each event, mostly to nobody).
# The subscription keys become *filters*: the same keys minus those another key already covers
# (``BTC.trade`` under ``BTC.*``). ``None`` means everything: a ``*.*`` subscription, or more
# than ``max_filters`` keys (a broker matches a long list slower than it sends a firehose).

Filters = frozenset[str] | None
"""Channel names and patterns to consume; None: every channel."""

EVERYTHING = f"{WILDCARD}.{WILDCARD}"


def filters_for(keys: Iterable[str], max_filters: int) -> Filters:
    """The filters that deliver every channel some key receives, and no other: keys covered by
    a pattern among them are left out; ``*.*`` or more than ``max_filters`` is everything."""
    wanted = set(keys)
    if EVERYTHING in wanted:
        return None
    kept = frozenset(key for key in wanted if not _covered_by_other(key, wanted))
    if len(kept) > max_filters:
        return None
    return kept


def _covered_by_other(key: str, keys: set[str]) -> bool:
    symbol, _, event = key.partition(".")
    if WILDCARD in (symbol, event):
        return False  # two patterns of the same shape never cover each other; *.* went before
    return f"{symbol}.{WILDCARD}" in keys or f"{WILDCARD}.{event}" in keys


def covers(filters: Filters, channel: str) -> bool:
    """True if a broker consuming ``filters`` delivers ``channel``."""
    if filters is None:
        return True
    return any(key in filters for key in match_keys(channel))


def covers_all(filters: Filters, keys: Iterable[str]) -> bool:
    """True if every channel each key receives is delivered under ``filters``."""
    if filters is None:
        return True
    for key in keys:
        symbol, _, event = key.partition(".")
        if key in filters or f"{symbol}.{WILDCARD}" in filters:
            continue
        if symbol != WILDCARD and f"{WILDCARD}.{event}" in filters:
            continue
        return False
    return True
