"""The state of the console's link to one server, as its control client reports it."""

from __future__ import annotations

import enum
from typing import Final

import attrs

from odin_fanout.control.protocol import ServerIdentity

SUPERVISOR: Final = "supervisor"
"""The role a supervisor's hello names (``odin serve --workers N``): its socket answers
``workers``, not ``snapshot`` nor ``watch``."""


class LinkState(enum.StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    MISSING = "missing"
    """No socket at the path: the server is not running, or it moved."""
    DENIED = "denied"
    """EACCES on connect, or the server answered ``permission_denied``."""
    VERSION_MISMATCH = "version_mismatch"
    """The server speaks another protocol version; the client has stopped."""
    LOST = "lost"
    """The connection failed or ended; the client is retrying."""
    NOT_ANSWERING = "not_answering"
    """The socket's process runs but does not answer (connection refused, or no reply in
    time): starting, stuck or stopped; the client is retrying."""
    GONE = "gone"
    """Connection refused and the process that created the socket is not running: a file
    left by a process that died (SIGKILL leaves it). The client is retrying (a socket named
    on the command line is kept); the app lets a socket it found go."""


@attrs.frozen
class LinkStatus:
    state: LinkState
    detail: str = ""
    identity: ServerIdentity | None = None

    @property
    def up(self) -> bool:
        return self.state is LinkState.CONNECTED
