"""The market simulator's model: token state, the random walk, and event payloads.

Pure and deterministic for a given ``random.Random`` and clock, so tests can pin it. It is
the original publisher's simulator (seed prices, the walk with trend and volatility, the
``price:update`` fields) with its quirks fixed: trends keep changing instead of locking in,
and all eight event families have payloads, and prices and volumes revert to their seeds
instead of drifting without bound. The server's ``--simulate`` mode and the publisher service
share this one implementation.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable, Sequence

import attrs

from odin_fanout.protocol.channels import EVENT_TYPES

# symbol: (price, volume24h, market cap), the original's seeds.
SEEDS: dict[str, tuple[float, float, float]] = {
    "BTC": (43250.00, 125_000_000, 850e9),
    "ETH": (2580.50, 85_000_000, 310e9),
    "ODIN": (0.125, 2_500_000, 125e6),
    "SOL": (98.75, 15_000_000, 42e9),
    "DOGE": (0.078, 8_500_000, 11e9),
}
DEFAULT_TOKENS = tuple(SEEDS)
TRENDS = ("up", "down", "neutral")
_BASE36 = string.digits + string.ascii_lowercase
PRICE_FLOOR = 0.0001
REVERSION = 0.01
"""The share of a price's (or volume's) log-distance to its anchor pulled back each tick."""
BAND = 4.0
"""Hard bounds: a price stays within [anchor / BAND, anchor * BAND], and so does a volume."""


@attrs.define
class Token:
    symbol: str
    price: float
    volume24h: float
    market_cap: float
    volatility: float
    trend: str = "neutral"
    price_change_24h: float = 0.0
    holders: int = 1000
    btc_liquidity: float = 10.0
    favorites: int = 100
    comments: int = 0
    history: list[float] = attrs.Factory(list)
    """Recent prices, newest last, for the analytics deltas (bounded)."""
    anchor: float = attrs.Factory(lambda self: self.price, takes_self=True)
    """The price the walk reverts to: the seed price, or the random start."""
    volume_anchor: float = attrs.Factory(lambda self: self.volume24h, takes_self=True)
    """The 24-hour volume its walk reverts to."""


def _revert(value: float, anchor: float, shock: float) -> float:
    """One mean-reverting tick of ``value`` in log space, clamped to the band around ``anchor``."""
    if anchor <= 0:  # a zero random start has nothing to revert to (and stayed zero before)
        return value
    # A value set from outside at or below zero counts as at the lower bound.
    x = math.log(value / anchor) if value > 0 else -math.log(BAND)
    moved = anchor * math.exp((1 - REVERSION) * x + shock)
    return min(anchor * BAND, max(anchor / BAND, moved))


class Market:
    """Every token's state, and the next event of the evenly interleaved event stream."""

    def __init__(
        self,
        tokens: Sequence[str] = DEFAULT_TOKENS,
        events: Sequence[str] = ("trade",),
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float],
    ) -> None:
        unknown = [event for event in events if event not in EVENT_TYPES]
        if not tokens or not events or unknown:
            raise ValueError(f"need tokens and known events (unknown: {unknown})")
        self._rng = rng or random.Random()
        self._clock = clock
        self.tokens = [self._seed(symbol) for symbol in tokens]
        self.events = list(events)
        self._counter = 0

    def set_tokens(self, symbols: Sequence[str]) -> None:
        """Simulate these tokens from now on; those already simulated keep their state."""
        if not symbols:
            raise ValueError("need at least one token")
        known = {token.symbol: token for token in self.tokens}
        self.tokens = [known.get(symbol) or self._seed(symbol) for symbol in symbols]

    def set_events(self, events: Sequence[str]) -> None:
        unknown = [event for event in events if event not in EVENT_TYPES]
        if not events or unknown:
            raise ValueError(f"need known events (unknown: {unknown})")
        self.events = list(events)

    def _seed(self, symbol: str) -> Token:
        rng = self._rng
        price, volume, cap = SEEDS.get(
            symbol, (max(PRICE_FLOOR, rng.random() * 100), rng.random() * 1e6, rng.random() * 1e9)
        )
        return Token(symbol, price, volume, cap, volatility=rng.random() * 0.1 + 0.02)

    def next_event(self) -> tuple[str, dict[str, object]]:
        """The next (channel, payload): tokens take turns, then event families take turns."""
        index = self._counter
        self._counter += 1
        token = self.tokens[index % len(self.tokens)]
        event = self.events[(index // len(self.tokens)) % len(self.events)]
        return f"{token.symbol}.{event}", self.payload(token, event)

    # ---- the walk ------------------------------------------------------------------------

    def step(self, token: Token) -> float:
        """Move the price one tick; return the change in percent.

        The walk is a discrete Ornstein-Uhlenbeck process in log price: with
        x = ln(price / anchor), each tick x ← (1 − θ)·x + ε, θ = ``REVERSION`` = 0.01 and
        ε = (U − ½)·volatility ± U·0.001 under a trend (U uniform on [0, 1)), the original
        walk's shocks taken as log returns. The pull halves a displacement in ln 2 / θ ≈ 69
        ticks and holds x at a stationary standard deviation of volatility / √(12·(2θ − θ²)),
        ≈ 0.04 at 2 % volatility up to ≈ 0.25 at 12 %; a trend's mean drift of 0.0005 a tick
        shifts the level by at most 0.0005 / θ = 5 %. Taking the shock in log space also drops
        the −σ²/2 drag that pulled the original's arithmetic walk down. The clamp to
        [anchor / 4, anchor · 4] (|x| ≤ ln 4 ≈ 1.39, over 5.6 stationary deviations even at
        12 %) never shapes an ordinary path but stops any unlucky one from running away. The
        24-hour volume takes the same pull toward its seed, with the original's ±5 % shocks.
        """
        rng = self._rng
        old = token.price
        shock = (rng.random() - 0.5) * token.volatility
        if token.trend == "up":
            shock += rng.random() * 0.001
        elif token.trend == "down":
            shock -= rng.random() * 0.001
        # The original chose a trend once and kept it forever; trends here keep turning.
        if rng.random() < (0.05 if token.trend == "neutral" else 0.02):
            roll = rng.random()
            token.trend = "up" if roll < 0.4 else "down" if roll < 0.8 else "neutral"
        # The absolute floor still matters when anchor / 4 is below it (tiny random starts).
        token.price = max(PRICE_FLOOR, _revert(old, token.anchor, shock))
        percent = (token.price - old) / old * 100
        token.price_change_24h = 0.9 * token.price_change_24h + 0.1 * percent
        token.volume24h = _revert(token.volume24h, token.volume_anchor, (rng.random() - 0.5) * 0.1)
        token.market_cap = token.price * 1_000_000
        token.history.append(token.price)
        del token.history[:-1440]
        return percent

    def nonce(self, now_ms: int) -> str:
        return f"{now_ms}_" + "".join(self._rng.choice(_BASE36) for _ in range(9))

    def _delta(self, token: Token, ticks: int) -> float:
        past = token.history[-ticks - 1] if len(token.history) > ticks else token.history[0]
        return round((token.price - past) / past * 100, 2)

    # ---- payloads ------------------------------------------------------------------------

    def payload(self, token: Token, event: str) -> dict[str, object]:
        now_ms = int(self._clock() * 1000)
        rng = self._rng
        body: dict[str, object]
        if event == "trade":
            self.step(token)
            body = {
                "type": "price:update",
                "tokenId": token.symbol,
                "price": round(token.price, 6),
                "volume24h": int(token.volume24h),
                "marketCap": int(token.market_cap),
                "priceChange24h": round(token.price_change_24h, 2),
            }
        elif event == "liquidity":
            token.btc_liquidity = max(0.0, token.btc_liquidity * (0.97 + rng.random() * 0.06))
            body = {
                "type": "liquidity:update",
                "tokenId": token.symbol,
                "btcLiquidity": round(token.btc_liquidity, 8),
                "tokenLiquidity": round(token.btc_liquidity / max(token.price, 1e-9), 4),
                "action": rng.choice(("add", "remove", "rebalance")),
            }
        elif event == "metadata":
            body = {
                "type": "metadata:update",
                "tokenId": token.symbol,
                "verified": rng.random() < 0.7,
                "featured": rng.random() < 0.1,
                "field": rng.choice(("description", "twitter", "website", "image")),
            }
        elif event == "social":
            token.comments += 1
            body = {
                "type": "comment:added",
                "tokenId": token.symbol,
                "commentCount": token.comments,
                "lastCommentTime": now_ms,
            }
        elif event == "favorites":
            token.favorites = max(0, token.favorites + rng.choice((-1, 1, 1)))
            body = {
                "type": "favorites:update",
                "tokenId": token.symbol,
                "favoriteCount": token.favorites,
            }
        elif event == "creation":
            body = {
                "type": "token:created",
                "tokenId": token.symbol,
                "name": f"{token.symbol} token",
                "price": round(token.price, 6),
                "creator": f"user{rng.randrange(1, 10_000)}",
            }
        elif event == "analytics":
            token.holders = max(1, token.holders + rng.randrange(-5, 8))
            body = (
                {
                    "type": "analytics:update",
                    "tokenId": token.symbol,
                    "priceDelta5m": self._delta(token, 5),
                    "priceDelta1h": self._delta(token, 60),
                    "priceDelta1d": self._delta(token, 1440),
                    "holderCount": token.holders,
                    "trending": token.trend == "up",
                }
                if token.history
                else {
                    "type": "analytics:update",
                    "tokenId": token.symbol,
                    "holderCount": token.holders,
                }
            )
        else:  # balances
            body = {
                "type": "balance:update",
                "tokenId": token.symbol,
                "userId": f"user{rng.randrange(1, 10_000)}",
                "balance": round(rng.random() * 1000, 4),
            }
        body["timestamp"] = now_ms
        body["source"] = "simulator"
        body["nonce"] = self.nonce(now_ms)
        return body

    def statistics(self) -> dict[str, object]:
        """The original's ``market:statistics`` payload."""
        now_ms = int(self._clock() * 1000)
        top = sorted(self.tokens, key=lambda t: t.market_cap, reverse=True)[:3]
        return {
            "type": "market:statistics",
            "totalMarketCap": int(sum(t.market_cap for t in self.tokens)),
            "totalVolume24h": int(sum(t.volume24h for t in self.tokens)),
            "activeTokens": len(self.tokens),
            "timestamp": now_ms,
            "topTokens": [
                {
                    "tokenId": t.symbol,
                    "price": round(t.price, 6),
                    "marketCap": int(t.market_cap),
                    "priceChange24h": round(t.price_change_24h, 2),
                }
                for t in top
            ],
            "nonce": self.nonce(now_ms),
        }
