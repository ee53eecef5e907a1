"""How a run is split over worker processes and how clients pick their channels."""

from __future__ import annotations

import random
from collections import Counter

import attrs
import pytest

from odin_fanout.stress.profiles import PROFILES, assign_channels, default_workers, split


def test_every_client_is_in_exactly_one_worker_and_the_ramp_is_shared() -> None:
    profile = attrs.evolve(PROFILES["medium"], connections=1001, ramp_per_s=300)
    plans = split(profile, workers=3, host="127.0.0.1", port=3002, path="/ws", seed=7)
    assert sum(len(plan.sessions) for plan in plans) == 1001
    assert [len(plan.sessions) for plan in plans] == [334, 334, 333]
    assert sum(plan.ramp_per_s for plan in plans) == pytest.approx(300)
    assert {plan.duration for plan in plans} == {profile.duration}
    assert len({plan.seed for plan in plans}) == 3


def test_subscription_modes() -> None:
    rng = random.Random(1)
    profile = PROFILES["light"]
    everything = attrs.evolve(profile, subscription_mode="all")
    assert assign_channels(everything, 0, rng) == list(profile.channels)
    single = attrs.evolve(profile, subscription_mode="single")
    picks = Counter(assign_channels(single, i, rng)[0] for i in range(50))
    assert set(picks.values()) == {10}  # round robin over the five
    chosen = [assign_channels(profile, i, rng) for i in range(200)]
    assert all(len(set(c)) == profile.channels_per_client for c in chosen)


def test_worker_count_follows_the_load_and_the_machine() -> None:
    assert default_workers(100, cpus=8) == 1
    assert default_workers(2500, cpus=8) == 3
    assert default_workers(20_000, cpus=2) == 2


def test_the_original_profile_sizes_are_kept() -> None:
    sizes = {name: (p.connections, p.duration) for name, p in PROFILES.items()}
    assert sizes["light"] == (100, 30.0)
    assert sizes["medium"] == (500, 60.0)
    assert sizes["heavy"] == (2000, 120.0)
    assert {"sustained", "capacity", "reconnect-storm", "slow-consumer", "churn"} <= set(sizes)
