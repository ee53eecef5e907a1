"""Named load profiles, the original's and the ones it lacked, and how a run is split over
worker processes.

The original's names and sizes are kept (``light`` 100 connections for 30 s, ``medium``
500 / 60 s, ``heavy`` 2000 / 120 s, ``sustained``, ``capacity``); its ``sustained`` ran for
30 minutes, here 10, and every profile can be resized with flags.
"""

from __future__ import annotations

import math
import random

import attrs

from odin_fanout.stress.plan import Plan

DEFAULT_CHANNELS = ("BTC.trade", "ETH.trade", "SOL.trade", "ODIN.trade", "DOGE.trade")
SUBSCRIPTION_MODES = ("all", "single", "random")


@attrs.frozen
class Profile:
    connections: int
    duration: float
    """Seconds from the first connection to the end of the run."""
    ramp_per_s: float = 500.0
    channels: tuple[str, ...] = DEFAULT_CHANNELS
    channels_per_client: int = 3
    subscription_mode: str = "random"
    """all: every channel; single: one each, round robin; random: ``channels_per_client``."""
    connect_timeout: float = 10.0
    heartbeat: float = 15.0
    storm_at: float | None = None
    storm_fraction: float = 1.0
    slow_fraction: float = 0.0
    slow_at: float = 5.0
    churn_per_s: float = 0.0
    reconnect_delay: float = 0.5
    publish_rate: float | None = None
    """Events per second to ask of the publisher (``--publisher-url``), if any."""
    description: str = ""


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        20, 8, ramp_per_s=100, storm_at=4, reconnect_delay=0.05,
        description="20 clients for 8 s, all dropping and recovering at 4 s (CI)",
    ),
    "light": Profile(100, 30, ramp_per_s=100, description="the original's light: 100 for 30 s"),
    "medium": Profile(500, 60, ramp_per_s=100, description="the original's medium: 500 for 60 s"),
    "heavy": Profile(
        2000, 120, ramp_per_s=200, subscription_mode="single",
        description="the original's heavy: 2000 for 120 s, one channel each",
    ),
    "sustained": Profile(
        2000, 600, ramp_per_s=100, subscription_mode="single",
        description="2000 clients ramped at 100/s and held for 10 minutes",
    ),
    "capacity": Profile(
        5000, 120, ramp_per_s=500, channels_per_client=1, subscription_mode="single",
        description="as many connections as asked, one channel each: what the server holds",
    ),
    "reconnect-storm": Profile(
        2000, 60, ramp_per_s=500, storm_at=20, reconnect_delay=0.05,
        description="2000 clients drop at once at 20 s and come back with their positions",
    ),
    "slow-consumer": Profile(
        200, 60, ramp_per_s=100, slow_fraction=0.1, slow_at=10, subscription_mode="all",
        description="10 % of clients stop reading at 10 s (cut off once their queue fills); "
        "the others must not suffer",
    ),
    "churn": Profile(
        500, 60, ramp_per_s=100, churn_per_s=0.05, reconnect_delay=1.0,
        description="5 % of clients leave and come back (recovering) every second",
    ),
}  # fmt: skip


def assign_channels(profile: Profile, index: int, rng: random.Random) -> list[str]:
    channels = list(profile.channels)
    if profile.subscription_mode == "all":
        return channels
    if profile.subscription_mode == "single":
        return [channels[index % len(channels)]]
    return rng.sample(channels, min(profile.channels_per_client, len(channels)))


def default_workers(connections: int, cpus: int) -> int:
    """One worker per 1000 clients, at most one per CPU (and at least one)."""
    return max(1, min(cpus, math.ceil(connections / 1000)))


def split(
    profile: Profile, *, workers: int, host: str, port: int, path: str, seed: int
) -> list[Plan]:
    """The run's plan for each worker: sessions dealt out in turn, the ramp shared."""
    rng = random.Random(seed)
    sessions = [assign_channels(profile, i, rng) for i in range(profile.connections)]
    plans = []
    for worker in range(workers):
        mine = sessions[worker::workers]
        if not mine:
            continue
        plans.append(
            Plan(
                host=host,
                port=port,
                path=path,
                sessions=mine,
                first_index=worker,
                duration=profile.duration,
                ramp_per_s=profile.ramp_per_s / workers,
                connect_timeout=profile.connect_timeout,
                heartbeat=profile.heartbeat,
                storm_at=profile.storm_at,
                storm_fraction=profile.storm_fraction,
                slow_fraction=profile.slow_fraction,
                slow_at=profile.slow_at,
                churn_per_s=profile.churn_per_s,
                reconnect_delay=profile.reconnect_delay,
                seed=seed + worker,
            )
        )
    return plans
