"""The publisher's configuration: typed sections, loaded like the server's.

Flags win over the environment, which wins over a TOML file, which wins over the defaults.
Every field has an environment name ``ODIN_PUBLISHER_<SECTION>_<FIELD>``; the original's
plain names are honoured too (``NATS_URL``, ``PORT``, ``HOST``, ``TOKENS``, ``RATE``,
``EVENTS``, ``LOG_LEVEL``), the prefixed name winning when both are set.
"""

from __future__ import annotations

from pathlib import Path

import attrs
from attrs import validators as v

from odin_fanout.config import (
    LogSection,
    NatsSection,
    events_validator,
    load_settings,
    positive,
    symbols_validator,
)

PREFIX = "ODIN_PUBLISHER"
ALIASES = {
    "NATS_URL": "nats.url",
    "PORT": "http.port",
    "HOST": "http.host",
    "TOKENS": "simulation.tokens",
    "RATE": "simulation.rate",
    "EVENTS": "simulation.events",
    "LOG_LEVEL": "log.level",
}


@attrs.frozen
class HttpSection:
    host: str = "127.0.0.1"
    """Address of the control API; 0.0.0.0 for every interface (containers)."""
    port: int = attrs.field(default=3003, validator=[v.ge(0), v.le(65535)])
    """Port of the control API (0: any free port, printed in the ``listening`` log)."""
    cors_origins: tuple[str, ...] = ()
    """Browser origins allowed to call the API (the original allowed any); empty: none."""


@attrs.frozen
class SimulationSection:
    rate: float = attrs.field(default=10.0, validator=positive)
    """Events per second across all tokens, evenly paced (``messagesPerSecond``)."""
    tokens: tuple[str, ...] = attrs.field(
        default=("BTC", "ETH", "ODIN", "SOL", "DOGE"), validator=symbols_validator
    )
    """Symbols to publish; the original's five have seed prices, others start at random."""
    events: tuple[str, ...] = attrs.field(default=("trade",), validator=events_validator)
    """Event families, taking turns: trade, liquidity, metadata, social, favorites, creation,
    analytics, balances."""
    autostart: bool = False
    """Start publishing at once (the original waited for ``POST /control`` start)."""
    statistics_interval: float = attrs.field(default=30.0, validator=positive)
    """Seconds between market statistics on ``odin.market.statistics`` while publishing."""
    max_rate: float = attrs.field(default=100_000.0, validator=positive)
    """The highest ``messagesPerSecond`` the API accepts."""
    max_tokens: int = attrs.field(default=1000, validator=v.ge(1))
    """The most tokens the API accepts."""
    seed: int | None = None
    """Random seed, for a reproducible stream."""


@attrs.frozen
class PublisherConfig:
    http: HttpSection = HttpSection()
    nats: NatsSection = attrs.field(factory=lambda: NatsSection(url="nats://127.0.0.1:4222"))
    simulation: SimulationSection = SimulationSection()
    log: LogSection = attrs.field(factory=LogSection)

    def __attrs_post_init__(self) -> None:
        if not self.nats.url:
            raise ValueError("nats.url: the publisher needs a NATS server URL")


def load(
    *,
    file: Path | None = None,
    environ: dict[str, str] | None = None,
    overrides: dict[str, object] | None = None,
) -> tuple[PublisherConfig, list[str]]:
    return load_settings(
        PublisherConfig,
        prefix=PREFIX,
        file=file,
        environ=environ,
        overrides=overrides,
        aliases=ALIASES,
    )
