"""The market simulator's model (``odin_fanout.simulator.model``).

What the server's ``--simulate`` mode and the publisher service rely on: the original's seed
prices, an evenly interleaved event stream (tokens take turns, event families take turns),
the random walk (price floor, smoothed ``priceChange24h``, trends that keep turning), the
payloads of all eight event families and ``market:statistics``, changing tokens and events
while running, and reproducibility for a given ``random.Random`` and clock.
"""

from __future__ import annotations

import itertools
import math
import random
import re
import statistics

import orjson
import pytest

from odin_fanout.protocol.channels import EVENT_TYPES, ChannelRules
from odin_fanout.simulator.model import DEFAULT_TOKENS, SEEDS, TRENDS, Market

NOW = 1_700_000_000.5
"""A fixed wall-clock time, exactly representable, so the millisecond timestamp is exact."""
NOW_MS = 1_700_000_000_500
ORIGINAL_TOKENS: tuple[str, ...] = ("BTC", "ETH", "ODIN", "SOL", "DOGE")
TRADE_FIELDS = {
    "type",
    "tokenId",
    "price",
    "volume24h",
    "marketCap",
    "priceChange24h",
    "timestamp",
    "source",
    "nonce",
}


def fixed_clock() -> float:
    return NOW


def market(
    tokens: tuple[str, ...] = DEFAULT_TOKENS,
    events: tuple[str, ...] = ("trade",),
    seed: int = 42,
) -> Market:
    return Market(tokens, events, rng=random.Random(seed), clock=fixed_clock)


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---- seeds -------------------------------------------------------------------------------


def test_the_original_five_tokens_are_the_default_and_start_at_their_seeds() -> None:
    assert DEFAULT_TOKENS == ORIGINAL_TOKENS
    assert set(SEEDS) == set(ORIGINAL_TOKENS)
    tokens = market().tokens
    assert [t.symbol for t in tokens] == list(ORIGINAL_TOKENS)
    for token in tokens:
        assert (token.price, token.volume24h, token.market_cap) == SEEDS[token.symbol]
        assert token.trend == "neutral"
        assert token.price_change_24h == 0.0


def test_seed_values_are_the_originals() -> None:
    assert SEEDS == {
        "BTC": (43250.00, 125e6, 850e9),
        "ETH": (2580.50, 85e6, 310e9),
        "ODIN": (0.125, 2.5e6, 125e6),
        "SOL": (98.75, 15e6, 42e9),
        "DOGE": (0.078, 8.5e6, 11e9),
    }


def test_seeded_tokens_do_not_depend_on_the_random_seed() -> None:
    for seed in range(5):
        btc = market(("BTC",), seed=seed).tokens[0]
        assert (btc.price, btc.volume24h, btc.market_cap) == SEEDS["BTC"]


def test_an_unknown_symbol_gets_a_random_start() -> None:
    starts = set()
    for seed in range(10):
        token = market(("NEWCOIN",), seed=seed).tokens[0]
        assert 0 < token.price < 100
        assert 0 <= token.volume24h < 1e6
        assert 0 <= token.market_cap < 1e9
        starts.add((token.price, token.volume24h, token.market_cap))
    assert len(starts) == 10, "different seeds must give different random starts"
    one, other = market(("AAA", "BBB")).tokens
    assert one.price != other.price


def test_volatility_is_between_two_and_twelve_percent() -> None:
    symbols = (*ORIGINAL_TOKENS, *(f"T{i}" for i in range(300)))
    volatilities = [t.volatility for t in market(symbols).tokens]
    assert all(0.02 <= v < 0.12 for v in volatilities)
    # Spread over the range, not one constant.
    assert min(volatilities) < 0.03
    assert max(volatilities) > 0.11


# ---- interleaving ------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [("BTC",), ("BTC", "ETH", "ODIN"), DEFAULT_TOKENS])
def test_tokens_take_turns_without_lock_step_bursts(tokens: tuple[str, ...]) -> None:
    m = market(tokens, ("trade", "social", "favorites"))
    symbols = [m.next_event()[0].split(".")[0] for _ in range(len(tokens) * 3 * 4 + 2)]
    n = len(tokens)
    for i in range(len(symbols) - n + 1):
        window = symbols[i : i + n]
        assert sorted(window) == sorted(tokens), f"window at {i}: {window}"


def test_event_families_take_turns_across_rounds() -> None:
    events = ("trade", "liquidity", "social")
    m = market(DEFAULT_TOKENS, events)
    n = len(DEFAULT_TOKENS)
    rounds = 3 * len(events)
    channels = [m.next_event()[0] for _ in range(n * rounds)]
    for r in range(rounds):
        in_round = {channel.split(".")[1] for channel in channels[r * n : (r + 1) * n]}
        assert in_round == {events[r % len(events)]}, f"round {r}: {in_round}"
    # Every token gets every family, equally often.
    for symbol in DEFAULT_TOKENS:
        mine = [c.split(".")[1] for c in channels if c.startswith(f"{symbol}.")]
        assert mine == list(events) * 3


def test_channels_are_symbol_dot_event_and_match_the_payload() -> None:
    m = market(DEFAULT_TOKENS, EVENT_TYPES)
    rules = ChannelRules()
    seen_events = set()
    for _ in range(len(DEFAULT_TOKENS) * len(EVENT_TYPES)):
        channel, payload = m.next_event()
        assert rules.check(channel, allow_pattern=False) == channel
        assert re.fullmatch(r"[A-Z]+\.[a-z]+", channel)
        symbol, event = channel.split(".")
        assert payload["tokenId"] == symbol
        seen_events.add(event)
    assert seen_events == set(EVENT_TYPES)


# ---- the walk ----------------------------------------------------------------------------


def test_price_never_goes_below_the_floor() -> None:
    # The absolute floor binds where anchor / 4 is below it: the tiniest random starts.
    m = market(("DOGE",))
    token = m.tokens[0]
    token.price = token.anchor = 0.0001
    token.volatility = 0.12
    token.trend = "down"
    prices = []
    for _ in range(2000):
        m.step(token)
        prices.append(token.price)
    assert min(prices) == 0.0001, "the walk should have hit the floor and stayed on it"
    assert all(p >= 0.0001 for p in prices)


def test_a_price_pushed_out_of_its_band_is_clamped_and_pulled_back() -> None:
    m = market(("DOGE", "BTC"))
    for token, start in zip(m.tokens, (0.0001, 1e9), strict=True):
        anchor = token.anchor
        token.price = start
        token.volatility = 0.12
        token.trend = "down" if start < anchor else "up"
        prices = []
        for _ in range(2000):
            m.step(token)
            prices.append(token.price)
        assert prices[0] == (anchor / 4 if start < anchor else anchor * 4)
        assert all(anchor / 4 <= p <= anchor * 4 for p in prices)
        assert anchor / 2 < statistics.median(prices[1000:]) < anchor * 2


class Rigged(random.Random):
    """The unluckiest generator: every draw is the same extreme."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize(("value", "bound"), [(0.0, 0.25), (1 - 2**-53, 4.0)])
def test_even_a_rigged_generator_cannot_push_a_price_out_of_its_band(
    value: float, bound: float
) -> None:
    # Every shock at the extreme (±6 % a tick at 12 % volatility) would take the old walk to
    # the floor or to infinity; the pull settles at ±6 in log price, so the clamp holds it.
    m = Market(DEFAULT_TOKENS, rng=Rigged(value), clock=fixed_clock)
    for token in m.tokens:
        token.volatility = 0.12
        for _ in range(5000):
            m.step(token)
            assert token.anchor / 4 <= token.price <= token.anchor * 4
            assert token.volume_anchor / 4 <= token.volume24h <= token.volume_anchor * 4
        assert token.price == token.anchor * bound
        assert token.volume24h == token.volume_anchor * bound


def test_tokens_anchor_to_their_seed_or_their_random_start() -> None:
    m = market(("BTC", "NEW"))
    btc, new = m.tokens
    assert (btc.anchor, btc.volume_anchor) == SEEDS["BTC"][:2]
    assert (new.anchor, new.volume_anchor) == (new.price, new.volume24h)
    for _ in range(50):
        m.next_event()
    assert (btc.anchor, btc.volume_anchor) == SEEDS["BTC"][:2]
    assert new.anchor != new.price
    m.set_tokens(["BTC"])
    m.set_tokens(["BTC", "NEW"])
    assert m.tokens[1].anchor == m.tokens[1].price != new.anchor


def test_price_change_24h_is_smoothed_step_percentages() -> None:
    m = market(("BTC", "NEW"))
    for token in m.tokens:
        for _ in range(300):
            old_price, old_change = token.price, token.price_change_24h
            percent = m.step(token)
            assert percent == pytest.approx((token.price - old_price) / old_price * 100)
            assert token.price_change_24h == pytest.approx(0.9 * old_change + 0.1 * percent)


def test_the_walk_moves_prices_and_records_bounded_history() -> None:
    m = market(("BTC",))
    token = m.tokens[0]
    for _ in range(2000):
        m.step(token)
    assert token.price != SEEDS["BTC"][0]
    assert token.history[-1] == token.price
    assert len(token.history) == 1440


@pytest.mark.parametrize("seed", range(5))
def test_trends_keep_changing_after_leaving_neutral(seed: int) -> None:
    # The original locked a token's trend forever once it left neutral.
    m = market(("BTC",), seed=seed)
    token = m.tokens[0]
    trends = []
    for _ in range(5000):
        m.step(token)
        trends.append(token.trend)
    assert set(trends) <= set(TRENDS)
    first = next(i for i, trend in enumerate(trends) if trend in ("up", "down"))
    assert any(trend != trends[first] for trend in trends[first:]), (
        f"trend stuck at {trends[first]!r} from step {first}"
    )
    assert set(trends) == set(TRENDS)


# ---- staying near the seed over hours ---------------------------------------------------

EVENTS_PER_SECOND = 20
LONG_RUN_HOURS = 4
LONG_RUN_TOKENS: tuple[str, ...] = (*DEFAULT_TOKENS, "NEW")  # the five seeds and a random start
MEAN_LOG_TOLERANCE = 0.1
"""How far the time-average of ln(price / anchor) may stray: about ±10 %.

The most volatile token (12 %) has a stationary spread of about 0.25 in log price and
decorrelates over about 100 ticks, so the mean of 48,000 ticks has a standard deviation of
about 0.25 · √(2 / 480) ≈ 0.016 (trends add a little); the worst of the 18 runs here is
0.032, so 0.1 leaves room, while the old unbounded walk averaged up to 11 units of log away.
"""


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_prices_stay_near_their_anchor_for_hours_and_keep_moving(seed: int) -> None:
    # Four hours of trades at 20 events/s shared by six tokens: 48,000 ticks each. Only the
    # walk is stepped (a trade event is this step plus its payload), which keeps it fast.
    m = market(LONG_RUN_TOKENS, seed=seed)
    starts = {t.symbol: (t.price, t.volume24h) for t in m.tokens}
    ticks = LONG_RUN_HOURS * 3600 * EVENTS_PER_SECOND // len(m.tokens)
    logs: dict[str, list[float]] = {t.symbol: [] for t in m.tokens}
    volumes: dict[str, list[float]] = {t.symbol: [] for t in m.tokens}
    for _ in range(ticks):
        for token in m.tokens:
            m.step(token)
            anchor, volume = starts[token.symbol]
            assert anchor / 4 <= token.price <= anchor * 4, (token.symbol, token.price)
            logs[token.symbol].append(math.log(token.price / anchor))
            volumes[token.symbol].append(math.log(token.volume24h / volume))
    for token in m.tokens:
        xs = logs[token.symbol]
        assert abs(statistics.fmean(xs)) <= MEAN_LOG_TOLERANCE, token.symbol
        assert abs(statistics.median(xs)) <= MEAN_LOG_TOLERANCE, token.symbol
        # Still moving: each tick's log return is about as wide as the volatility's own shock
        # (uniform over ±volatility/2, standard deviation volatility/√12)...
        returns = [b - a for a, b in itertools.pairwise(xs)]
        assert statistics.pstdev(returns) >= 0.9 * token.volatility / math.sqrt(12), token.symbol
        # ...and the price keeps crossing its anchor, spending time on both sides of it.
        above = sum(x > 0 for x in xs) / len(xs)
        assert 0.3 <= above <= 0.7, (token.symbol, above)
        crossings = sum((a > 0) != (b > 0) for a, b in itertools.pairwise(xs))
        assert crossings >= 100, (token.symbol, crossings)
        # The 24-hour volume is pulled back to its seed the same way instead of decaying to 0.
        vs = volumes[token.symbol]
        assert all(-math.log(4) <= v <= math.log(4) for v in vs), token.symbol
        assert abs(statistics.fmean(vs)) <= MEAN_LOG_TOLERANCE, token.symbol


# ---- payloads ----------------------------------------------------------------------------


@pytest.mark.parametrize("event", EVENT_TYPES)
def test_every_event_type_has_a_serialisable_payload(event: str) -> None:
    m = market(("BTC", "NEW"), (event,))
    for _ in range(6):  # some after the token's state has moved
        channel, payload = m.next_event()
        assert channel.endswith(f".{event}")
        assert orjson.loads(orjson.dumps(payload)) == payload
        assert isinstance(payload["type"], str)
        assert payload["type"]
        assert payload["tokenId"] == channel.split(".")[0]
        assert is_int(payload["timestamp"])
        assert payload["timestamp"] == NOW_MS
        assert payload["source"] == "simulator"
        assert isinstance(payload["nonce"], str)
        assert re.fullmatch(rf"{NOW_MS}_[0-9a-z]{{9}}", payload["nonce"])


def test_the_eight_event_types_have_distinct_payload_types() -> None:
    m = market(("BTC",), EVENT_TYPES)
    types = [m.next_event()[1]["type"] for _ in EVENT_TYPES]
    assert len(set(types)) == len(EVENT_TYPES)
    assert types[EVENT_TYPES.index("trade")] == "price:update"


def test_the_timestamp_follows_the_injected_clock() -> None:
    now = [1_000.0]
    m = Market(("BTC",), EVENT_TYPES, rng=random.Random(1), clock=lambda: now[0])
    for i in range(len(EVENT_TYPES)):
        now[0] = 1_000.0 + i * 0.25
        payload = m.next_event()[1]
        assert payload["timestamp"] == 1_000_000 + i * 250
        assert str(payload["nonce"]).startswith(f"{1_000_000 + i * 250}_")


def test_nonces_are_unique() -> None:
    m = market(DEFAULT_TOKENS, EVENT_TYPES)
    nonces = [m.next_event()[1]["nonce"] for _ in range(2000)]
    assert len(set(nonces)) == len(nonces)


def test_trade_payload_has_exactly_the_original_price_update_fields() -> None:
    m = market(("BTC", "ODIN", "DOGE"))
    for _ in range(30):
        channel, payload = m.next_event()
        token = next(t for t in m.tokens if t.symbol == channel.split(".")[0])
        assert set(payload) == TRADE_FIELDS
        assert payload["type"] == "price:update"
        assert payload["tokenId"] == token.symbol
        assert payload["price"] == round(token.price, 6)
        assert is_int(payload["volume24h"])
        assert payload["volume24h"] == int(token.volume24h)
        assert is_int(payload["marketCap"])
        assert payload["marketCap"] == int(token.market_cap)
        assert payload["priceChange24h"] == round(token.price_change_24h, 2)


def test_a_trade_moves_the_price() -> None:
    m = market(("BTC",))
    prices = {m.next_event()[1]["price"] for _ in range(20)}
    assert SEEDS["BTC"][0] not in prices
    assert len(prices) > 1


def test_stateful_event_counters_stay_consistent() -> None:
    m = market(("BTC", "ETH"), ("social", "favorites", "liquidity", "analytics"))
    comments: dict[str, list[object]] = {"BTC": [], "ETH": []}
    for _ in range(400):
        channel, payload = m.next_event()
        symbol, event = channel.split(".")
        if event == "social":
            comments[symbol].append(payload["commentCount"])
            assert payload["lastCommentTime"] == NOW_MS
        elif event == "favorites":
            assert is_int(payload["favoriteCount"])
            assert int(str(payload["favoriteCount"])) >= 0
        elif event == "liquidity":
            assert float(str(payload["btcLiquidity"])) >= 0
            assert payload["action"] in ("add", "remove", "rebalance")
        else:
            assert is_int(payload["holderCount"])
            assert int(str(payload["holderCount"])) >= 1
    for counts in comments.values():
        assert counts == list(range(1, len(counts) + 1)), "each comment adds one"


def test_analytics_reports_price_deltas_once_the_token_has_traded() -> None:
    m = market(("BTC",), ("analytics",))
    token = m.tokens[0]
    before = m.payload(token, "analytics")
    assert "priceDelta5m" not in before
    for _ in range(100):
        m.step(token)
    after = m.payload(token, "analytics")
    five_ago = token.history[-6]
    hour_ago = token.history[-61]
    assert after["priceDelta5m"] == round((token.price - five_ago) / five_ago * 100, 2)
    assert after["priceDelta1h"] == round((token.price - hour_ago) / hour_ago * 100, 2)
    first = token.history[0]
    assert after["priceDelta1d"] == round((token.price - first) / first * 100, 2)
    assert after["trending"] == (token.trend == "up")


# ---- statistics --------------------------------------------------------------------------


STATISTICS_FIELDS = {
    "type",
    "totalMarketCap",
    "totalVolume24h",
    "activeTokens",
    "timestamp",
    "topTokens",
    "nonce",
}


def test_statistics_at_the_seeds() -> None:
    stats = market().statistics()
    assert set(stats) == STATISTICS_FIELDS
    assert stats["type"] == "market:statistics"
    assert stats["totalMarketCap"] == int(sum(cap for _, _, cap in SEEDS.values()))
    assert stats["totalVolume24h"] == int(sum(volume for _, volume, _ in SEEDS.values()))
    assert stats["activeTokens"] == 5
    assert stats["timestamp"] == NOW_MS
    assert re.fullmatch(rf"{NOW_MS}_[0-9a-z]{{9}}", str(stats["nonce"]))
    assert stats["topTokens"] == [
        {"tokenId": symbol, "price": SEEDS[symbol][0], "marketCap": int(SEEDS[symbol][2]),
         "priceChange24h": 0.0}
        for symbol in ("BTC", "ETH", "SOL")
    ]  # fmt: skip


def test_statistics_follow_the_market() -> None:
    m = market((*DEFAULT_TOKENS, "NEW"), ("trade",))
    for _ in range(137):
        m.next_event()
    stats = m.statistics()
    assert orjson.loads(orjson.dumps(stats)) == stats
    assert stats["activeTokens"] == 6
    assert stats["totalMarketCap"] == int(sum(t.market_cap for t in m.tokens))
    assert stats["totalVolume24h"] == int(sum(t.volume24h for t in m.tokens))
    top = stats["topTokens"]
    assert isinstance(top, list)
    assert len(top) == 3
    by_cap = sorted(m.tokens, key=lambda t: t.market_cap, reverse=True)
    assert [entry["tokenId"] for entry in top] == [t.symbol for t in by_cap[:3]]
    for entry, token in zip(top, by_cap, strict=False):
        assert set(entry) == {"tokenId", "price", "marketCap", "priceChange24h"}
        assert entry["price"] == round(token.price, 6)
        assert entry["marketCap"] == int(token.market_cap)
        assert entry["priceChange24h"] == round(token.price_change_24h, 2)


def test_statistics_with_fewer_than_three_tokens() -> None:
    top = market(("ODIN", "DOGE")).statistics()["topTokens"]
    assert isinstance(top, list)
    assert [entry["tokenId"] for entry in top] == ["DOGE", "ODIN"]


# ---- changing tokens and events ----------------------------------------------------------


def test_set_tokens_keeps_the_state_of_tokens_that_stay() -> None:
    m = market(("BTC", "ETH", "SOL"))
    for _ in range(30):
        m.next_event()
    btc, eth, _ = m.tokens
    btc_price, eth_price = btc.price, eth.price
    assert btc_price != SEEDS["BTC"][0]
    m.set_tokens(["ETH", "NEW", "BTC", "DOGE"])
    assert [t.symbol for t in m.tokens] == ["ETH", "NEW", "BTC", "DOGE"]
    assert m.tokens[0] is eth
    assert m.tokens[2] is btc
    assert (btc.price, eth.price) == (btc_price, eth_price)
    assert m.tokens[3].price == SEEDS["DOGE"][0]
    assert 0 < m.tokens[1].price < 100
    symbols = [m.next_event()[0].split(".")[0] for _ in range(4 * 5)]
    assert "SOL" not in symbols
    for i in range(len(symbols) - 3):
        assert sorted(symbols[i : i + 4]) == ["BTC", "DOGE", "ETH", "NEW"]


def test_a_dropped_token_starts_again_from_its_seed() -> None:
    m = market(("BTC", "ETH"))
    for _ in range(10):
        m.next_event()
    m.set_tokens(["ETH"])
    m.set_tokens(["ETH", "BTC"])
    assert m.tokens[1].price == SEEDS["BTC"][0]


def test_set_tokens_rejects_an_empty_list() -> None:
    m = market(("BTC", "ETH"))
    with pytest.raises(ValueError, match="token"):
        m.set_tokens([])
    assert [t.symbol for t in m.tokens] == ["BTC", "ETH"]


def test_set_events_switches_the_families() -> None:
    m = market(("BTC", "ETH"), ("trade",))
    m.set_events(["social", "balances"])
    assert m.events == ["social", "balances"]
    events = {m.next_event()[0].split(".")[1] for _ in range(8)}
    assert events == {"social", "balances"}


@pytest.mark.parametrize("events", [[], ["nope"], ["trade", "nope"], ["Trade"]])
def test_set_events_rejects_unknown_or_empty_events(events: list[str]) -> None:
    m = market(("BTC",), ("trade", "social"))
    with pytest.raises(ValueError, match="known events"):
        m.set_events(events)
    assert m.events == ["trade", "social"]
    assert m.next_event()[0] == "BTC.trade"


@pytest.mark.parametrize(
    ("tokens", "events"),
    [(("BTC",), ("nope",)), (("BTC",), ("trade", "nope")), (("BTC",), ()), ((), ("trade",))],
)
def test_the_constructor_rejects_unknown_events_and_empty_lists(
    tokens: tuple[str, ...], events: tuple[str, ...]
) -> None:
    with pytest.raises(ValueError, match="need tokens and known events"):
        Market(tokens, events, rng=random.Random(0), clock=fixed_clock)


# ---- determinism -------------------------------------------------------------------------


def test_same_seed_and_clock_give_the_same_stream() -> None:
    one = market(DEFAULT_TOKENS, EVENT_TYPES, seed=42)
    random.seed(1)  # the module-level generator must play no part
    two = market(DEFAULT_TOKENS, EVENT_TYPES, seed=42)
    first, second = [], []
    for _ in range(1000):  # interleaved, so shared hidden state would show
        first.append(one.next_event())
        random.random()
        second.append(two.next_event())
    assert first == second
    assert one.statistics() == two.statistics()


def test_a_different_seed_gives_a_different_stream() -> None:
    one = market(DEFAULT_TOKENS, EVENT_TYPES, seed=42)
    two = market(DEFAULT_TOKENS, EVENT_TYPES, seed=43)
    assert [one.next_event() for _ in range(50)] != [two.next_event() for _ in range(50)]
