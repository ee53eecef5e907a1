"""The supervisor's control socket (``odin serve --workers N``).

A supervisor serves no clients: its workers do, each with a control socket of its own. Its
socket is where a console learns the host's shape: ``hello`` (role ``supervisor``),
``workers`` (each worker's slot, state, pid, restarts, last exit and socket), and the two
actions that concern every worker at once: ``reload`` (forwarded to the workers, as SIGHUP)
and ``drain`` (the graceful stop of every worker, as SIGTERM). Every other command is answered
``unavailable``, naming the workers' sockets, which answer it.

Same directory rules, permission checks, limits and rate limits as a server's socket: both are
``odin_fanout.server.control_socket.ControlSocket``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

from odin_fanout.config import ControlSection
from odin_fanout.control.protocol import (
    COMMAND_NAMES,
    Command,
    ControlError,
    Drain,
    Draining,
    ErrorCode,
    Hello,
    HostWorkers,
    Reload,
    ServerIdentity,
    Workers,
)
from odin_fanout.logs import Log
from odin_fanout.server.control_socket import AttachedConsole, ControlSocket, Execute


class SupervisorControl(ControlSocket):
    def __init__(
        self,
        config: ControlSection,
        log: Log,
        *,
        state: Callable[[], HostWorkers],
        identity: Callable[[], ServerIdentity],
        reload: Callable[[], tuple[list[str], list[str]]],
        drain: Callable[[], None],
        path: Path | None = None,
    ) -> None:
        super().__init__(config, log, path=path)
        self.state = state
        """The supervisor's current view of its workers."""
        self.identity = identity
        self.reload = reload
        """Reads the configuration again and forwards SIGHUP to the workers: (changed,
        restart_required), or raises ConfigError (nothing changed)."""
        self.drain = drain
        """Starts the graceful stop of every worker."""
        self.draining = False
        self.errors: Counter[str] = Counter()
        """Error replies by code (a supervisor has no metrics of its own)."""

    def session(self, console: AttachedConsole) -> Execute:
        async def execute(command: Command) -> object:
            return self._execute(console, command)

        return execute

    def count_error(self, code: ErrorCode) -> None:
        self.errors[code.value] += 1

    def _execute(self, console: AttachedConsole, command: Command) -> object:
        match command:
            case Hello():
                return self.identity()
            case Workers():
                return self.state()
            case Reload():
                return console.reload(self.reload)
            case Drain():
                return self._drain(console)
        raise ControlError(ErrorCode.UNAVAILABLE, self._not_here(command))

    def _drain(self, console: AttachedConsole) -> Draining:
        if self.draining:
            raise ControlError(ErrorCode.DRAINING, "the workers are already draining")
        self.log.warning("control_drain", pid=console.pid, uid=console.uid)
        self.draining = True
        self.drain()
        # Each worker drains its own clients, within its own drain timeout: the supervisor
        # knows neither their connections nor when they will be gone.
        return Draining(connections=0, timeout=0.0)

    def _not_here(self, command: Command) -> str:
        sockets = [worker.control for worker in self.state().workers if worker.control]
        where = ", ".join(sockets) if sockets else "none is up now"
        return (
            f"{COMMAND_NAMES[type(command)]}: a supervisor serves no clients;"
            f" its workers' control sockets do: {where}"
        )
