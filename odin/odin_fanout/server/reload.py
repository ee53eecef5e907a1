"""Configuration reload (SIGHUP, or the console's reload): apply what can change live.

A reload never half-applies: the new configuration is loaded and validated whole by the
caller (a bad file is refused before anything here runs), then only the fields listed in
``LIVE`` take effect, at once, for open connections as well as new ones. Every other
difference is reported as needing a restart and left as it was, so the running server's
configuration always reads as what it is actually doing.
"""

from __future__ import annotations

import attrs
import trio

from odin_fanout import logs
from odin_fanout.capacity import plan
from odin_fanout.config import Config
from odin_fanout.server.context import ServerContext, session_limits

LIVE = frozenset(
    {
        "log.level",
        "server.allowed_origins",
        "server.require_origin",
        "server.cors_allow_origin",
        "server.max_connections",
        "server.retry_after",
        "server.handshake_timeout",
        "server.close_timeout",
        "server.tls_cert",
        "server.tls_key",
        "server.metrics_token",
        "connection.max_subscriptions",
        "connection.idle_timeout",
        "connection.queue_max_messages",
        "connection.queue_max_bytes",
        "connection.slow_consumer_policy",
        "connection.rate_limit_burst",
        "connection.rate_limit_per_second",
        "connection.rate_limit_abuse_threshold",
        "history.recovery_max_messages",
        "history.replay_max_messages",
        "history.read_timeout",
        "shutdown.drain_timeout",
        "shutdown.reconnect_min_ms",
        "shutdown.reconnect_max_ms",
        "simulator.rate",
        "simulator.tokens",
        "simulator.events",
    }
)
"""``section.field`` names a reload applies without a restart (the simulator's, by the
command line that runs it)."""


@attrs.frozen
class Reload:
    changed: list[str]
    """Fields now in effect with their new values."""
    restart_required: list[str]
    """Fields that differ in the new configuration but keep their old values until a restart."""
    config: Config
    """The configuration in effect after the reload."""


def differences(old: Config, new: Config) -> list[str]:
    """The ``section.field`` names whose values differ."""
    names = []
    for section in attrs.fields(Config):
        before, after = getattr(old, section.name), getattr(new, section.name)
        for field in attrs.fields(type(before)):
            if getattr(before, field.name) != getattr(after, field.name):
                names.append(f"{section.name}.{field.name}")
    return names


def plan_reload(old: Config, new: Config) -> Reload:
    """What a reload from ``old`` to ``new`` changes, and the configuration it leaves."""
    changed, restart = [], []
    sections: dict[str, dict[str, object]] = {}
    # A new certificate is live; TLS turned on or off changes the listener's scheme: a restart.
    tls_switch = bool(old.server.tls_cert) != bool(new.server.tls_cert)
    for name in differences(old, new):
        if name not in LIVE or (tls_switch and name in ("server.tls_cert", "server.tls_key")):
            restart.append(name)
            continue
        changed.append(name)
        section, field = name.split(".", 1)
        sections.setdefault(section, {})[field] = getattr(getattr(new, section), field)
    effective = attrs.evolve(
        old,
        **{
            section: attrs.evolve(getattr(old, section), **fields)
            for section, fields in sections.items()
        },
    )
    return Reload(changed, restart, effective)


def apply(context: ServerContext, reload: Reload) -> None:
    """Put ``reload.config`` in effect for the server and its open connections.

    The TLS certificate is read again first, even under unchanged file names (a renewal
    replaces the files): a file that cannot be used raises ConfigError before anything else
    changes, and the running certificate stays."""
    config = reload.config
    context.tls.reload(config.server)
    context.config = config
    context.reader.reconfigure(config)
    logs.set_level(config.log.level)
    context.limits = session_limits(config)
    now = trio.current_time()
    for connection in context.registry.connections.values():
        connection.session.set_limits(context.limits, now)
        connection.seam.hold_limit = config.connection.queue_max_messages
        connection.writer.set_limits(
            config.connection.queue_max_messages, config.connection.queue_max_bytes
        )
    if "server.max_connections" in reload.changed:
        registry = context.registry
        old = registry.capacity
        registry.set_capacity(
            plan(
                config.server.max_connections,
                old.limits,
                history_bytes=old.history_bytes,
                workers=old.workers,
                slot=context.worker.slot if context.worker else 0,
            )
        )
