"""Which protocol a connection speaks: the original's, or Odin's v1 with its additions.

Clients written for the original server count every message that is not an ack or a
``pong`` as an event, so Odin sends them only the message types the original sent (events,
``pong``, the acks, ``error``, ``replay_incomplete``). Odin's additions (``hello``, ``gap``,
``reconnect``, ``replay_complete``) go to clients that ask for v1: by the WebSocket
subprotocol ``odin.v1`` (echoed), or by ``?protocol=1`` for clients that cannot set one.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

SUBPROTOCOL_V1 = "odin.v1"
LEGACY = 0
V1 = 1
SUPPORTED = (LEGACY, V1)

V1_ONLY_TYPES = frozenset(
    {"hello", "gap", "reconnect", "replay_complete", "auth_ok", "token_expiring"}
)
"""Server message types a client of the original never receives."""


class UnsupportedVersion(Exception):
    """The client asked for a protocol version this server does not speak."""


@attrs.frozen
class Negotiated:
    version: int
    subprotocol: str | None
    """The subprotocol to echo in the 101 response, if the client offered ours."""

    @property
    def v1(self) -> bool:
        return self.version >= V1


def negotiate(subprotocols: Sequence[str], query_versions: Sequence[str]) -> Negotiated:
    """Decide from the offered subprotocols and the ``protocol`` query values.

    An offered ``odin.v1`` wins and is echoed; subprotocols we do not know are ignored (the
    client decides whether to go on without one). ``?protocol=`` must name a version we
    speak: a client asking for one we do not is told so rather than silently downgraded.
    """
    if SUBPROTOCOL_V1 in subprotocols:
        return Negotiated(V1, SUBPROTOCOL_V1)
    version = LEGACY
    for value in query_versions:
        try:
            version = int(value)
        except ValueError:
            raise UnsupportedVersion(f"protocol={value!r}: expected 0 or 1") from None
        if version not in SUPPORTED:
            raise UnsupportedVersion(f"protocol={version} is not supported: use 0 or 1")
    return Negotiated(version, None)
