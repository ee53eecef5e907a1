"""A TCP proxy for the chaos run (``odin_fanout.stress.chaos``), between Odin and NATS, that can
partition the link: ``blackhole`` (the connections stay open, bytes are held back: a silent
partition that only pings can notice) or ``reset`` (every connection is closed at once and new ones
are refused: a noisy partition), then ``pass`` again.

Written here rather than taken from a library: toxiproxy (the usual tool) is a Go service
with its own binary and HTTP API, not on PyPI (``toxiproxy-python`` is only its client), and
no maintained pure-Python proxy offers a partition that can be switched from the same Trio
program that schedules the faults. It is the proxy of ``tests/nats/support.py`` (which the
stress package may not import), with counters for the run's event log. Loopback only.
"""

from __future__ import annotations

import trio

MODES = ("pass", "blackhole", "reset")


class PartitionProxy:
    """Listens on 127.0.0.1 (a free port), forwards to ``127.0.0.1:target``."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.mode = "pass"
        self._changed = trio.Event()
        self._live: set[trio.CancelScope] = set()
        self.accepted = 0
        """Connections accepted (in any mode)."""
        self.refused = 0
        """Connections closed at once because the link was in ``reset`` mode."""
        self.cut = 0
        """Live connections a ``reset`` closed."""

    @property
    def live(self) -> int:
        return len(self._live)

    def set(self, mode: str) -> int:
        """Switch the mode; the number of live connections it affects."""
        assert mode in MODES, mode
        self.mode = mode
        affected = len(self._live)
        if mode == "reset":
            self.cut += affected
            for scope in list(self._live):
                scope.cancel()
        self._changed.set()
        self._changed = trio.Event()
        return affected

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        if self.mode == "reset":
            self.refused += 1
            await trio.aclose_forcefully(client)
            return
        server: trio.SocketStream | None = None
        with trio.CancelScope() as scope:
            self._live.add(scope)
            try:
                with trio.fail_after(5):
                    server = await trio.open_tcp_stream("127.0.0.1", self.target)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, server, nursery.cancel_scope)
                    nursery.start_soon(self._pump, server, client, nursery.cancel_scope)
            except (OSError, trio.TooSlowError):
                pass
            finally:
                self._live.discard(scope)
        with trio.CancelScope(shield=True):
            for stream in (client, server):
                if stream is not None:
                    await trio.aclose_forcefully(stream)

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope
    ) -> None:
        try:
            while True:
                while self.mode == "blackhole":
                    await self._changed.wait()
                data = await source.receive_some(65536)
                if not data:
                    break
                while self.mode == "blackhole":  # hold what was read, deliver nothing
                    await self._changed.wait()
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()
