"""The token bucket and the leaky abuse counter, on time passed in."""

from __future__ import annotations

import pytest

from odin_fanout.protocol.ratelimit import LeakyCounter, TokenBucket


def take_all(bucket: TokenBucket, now: float) -> int:
    """Take tokens at ``now`` until refused; return how many were granted."""
    granted = 0
    while bucket.try_take(now):
        granted += 1
        assert granted < 10_000, "bucket never ran dry"
    return granted


def test_bucket_starts_full():
    bucket = TokenBucket.full(capacity=5, rate=1.0, now=100.0)
    assert bucket.tokens == 5
    assert take_all(bucket, 100.0) == 5


def test_bucket_refuses_when_empty_and_refusal_costs_nothing():
    bucket = TokenBucket.full(capacity=2, rate=1.0, now=0.0)
    assert bucket.try_take(0.0)
    assert bucket.try_take(0.0)
    assert not bucket.try_take(0.0)
    assert not bucket.try_take(0.0)
    # Refused takes did not drive the bucket into debt: half a second later half a token is
    # there, one second later exactly one.
    assert not bucket.try_take(0.5)
    assert bucket.try_take(1.0)
    assert not bucket.try_take(1.0)


def test_bucket_refills_with_elapsed_time():
    bucket = TokenBucket.full(capacity=10, rate=4.0, now=0.0)
    assert take_all(bucket, 0.0) == 10
    assert take_all(bucket, 0.5) == 2
    assert take_all(bucket, 1.5) == 4


def test_bucket_refill_is_capped_at_capacity():
    bucket = TokenBucket.full(capacity=3, rate=10.0, now=0.0)
    assert take_all(bucket, 0.0) == 3
    assert take_all(bucket, 1_000.0) == 3


def test_bucket_cost():
    bucket = TokenBucket.full(capacity=5, rate=1.0, now=0.0)
    assert bucket.try_take(0.0, cost=4)
    assert not bucket.try_take(0.0, cost=2)
    assert bucket.try_take(0.0, cost=1)
    assert bucket.tokens == pytest.approx(0.0)


def test_counter_accumulates_and_drains():
    counter = LeakyCounter(drain_per_second=2.0, level=0.0, updated=0.0)
    assert counter.add(0.0) == 1
    assert counter.add(0.0) == 2
    assert counter.add(0.0) == 3
    # One second drains two.
    assert counter.add(1.0) == pytest.approx(2.0)
    # Draining stops at zero: a long quiet period does not bank credit.
    assert counter.add(100.0) == 1
    assert counter.add(100.0, amount=5) == 6


def test_counter_ignores_time_going_backwards():
    counter = LeakyCounter(drain_per_second=1.0, level=0.0, updated=10.0)
    assert counter.add(10.0) == 1
    assert counter.add(5.0) == 2
    assert counter.level == 2


def test_counter_stays_low_for_an_occasional_burster():
    counter = LeakyCounter(drain_per_second=1.0)
    levels = [counter.add(float(t)) for t in range(0, 1000, 3)]
    assert max(levels) == 1
