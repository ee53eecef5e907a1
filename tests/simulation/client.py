"""A lean virtual client: wsproto over a bounded pipe, reading at its own pace.

Each client follows a ``Profile`` drawn from the scenario's seed before anything runs: what it
subscribes to, how fast it reads (fast: whatever arrives, at once; slow: a few hundred bytes
per virtual tick, with stalls), when it connects, how long each session lasts, how it leaves
(a close frame, or dropping the connection), and when it comes back (subscribing with
``recover`` from the positions its checker kept). Every message goes to its ``ClientChecker``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import attrs
import orjson
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from odin_fanout.protocol.negotiation import SUBPROTOCOL_V1
from tests.simulation.checker import ClientChecker

if TYPE_CHECKING:
    from tests.simulation.pipe import PipeListener

HANDSHAKE_TIMEOUT = 30.0


@attrs.frozen
class SessionPlan:
    wait: float
    """Virtual seconds before connecting (after the previous session ended)."""
    length: float
    """Virtual seconds until the client leaves (if the server has not closed it first)."""
    drop: bool
    """Leave by dropping the connection (no close frame) rather than closing politely."""
    more: tuple[float, tuple[str, ...]] | None
    """(after, keys): subscribe to more channels or patterns during the session."""


@attrs.frozen
class Profile:
    name: str
    slow: bool
    chunk: int
    """Bytes read at once."""
    delay: float
    """Virtual seconds between two reads (0: reads as fast as it can)."""
    stalls: tuple[tuple[float, float], ...]
    """(from, to) virtual times (since the scenario began) when a slow client reads nothing."""
    keys: tuple[str, ...]
    sessions: tuple[SessionPlan, ...]


@attrs.define
class World:
    """What every client shares: the listener, the stop signal, the totals."""

    listener: PipeListener
    stop: trio.Event
    started_at: float
    client_seconds: float = 0.0
    sessions: int = 0
    refused: int = 0


class _Session:
    def __init__(self, stream: trio.abc.Stream, checker: ClientChecker, profile: Profile) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.checker = checker
        self.profile = profile
        self.lock = trio.Lock()
        self.partial: list[str] = []
        self.closed: tuple[int | None, str] | None = None
        self.ours = False
        """The client sent a close frame."""
        self.dropped = False
        """The client dropped the connection."""
        self.next_id = 1

    async def send(self, event: Event) -> None:
        async with self.lock:
            if self.ws.state is not ConnectionState.OPEN:
                return
            data = self.ws.send(event)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.stream.send_all(data)

    async def subscribe(self, keys: list[str], recover: dict[str, tuple[str, int]]) -> int:
        request_id = self.next_id
        self.next_id += 1
        data: dict[str, Any] = {"channels": keys}
        if recover:
            data["recover"] = {ch: {"epoch": e, "seq": s} for ch, (e, s) in recover.items()}
        message = {"type": "subscribe", "id": request_id, "data": data}
        await self.send(TextMessage(data=orjson.dumps(message).decode()))
        return request_id

    async def handshake(self) -> bool:
        await self.stream.send_all(
            self.ws.send(Request(host="odin", target="/ws", subprotocols=[SUBPROTOCOL_V1]))
        )
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            while True:
                data = await self.stream.receive_some(65536)
                if not data:
                    return False
                self.ws.receive_data(bytes(data))
                for event in self.ws.events():
                    if isinstance(event, AcceptConnection):
                        # Anything after the 101 in the same read is already parsed by wsproto
                        # and comes out of the next events() call.
                        return True
                    if isinstance(event, RejectConnection | RejectData):
                        return False
        return False

    async def read(self, world: World) -> None:
        """Read until the connection ends, at the profile's pace."""
        profile = self.profile
        await self._handle_events(world)
        while self.closed is None:
            try:
                data = await self.stream.receive_some(profile.chunk)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.closed = (None, "connection lost")
                return
            self.ws.receive_data(bytes(data))
            await self._handle_events(world)
            if profile.slow:
                await trio.sleep(profile.delay)
                now = trio.current_time() - world.started_at
                for start, end in profile.stalls:
                    if start <= now < end:
                        await trio.sleep(end - now)

    async def _handle_events(self, world: World) -> None:
        for event in self.ws.events():
            if isinstance(event, TextMessage):
                self.partial.append(event.data)
                if event.message_finished:
                    message = orjson.loads("".join(self.partial))
                    self.partial.clear()
                    self.checker.on_message(message, trio.current_time() - world.started_at)
            elif isinstance(event, Ping):
                await self.send(event.response())
            elif isinstance(event, CloseConnection):
                self.closed = (event.code, event.reason or "")
                if self.ws.state is ConnectionState.REMOTE_CLOSING:
                    response = self.ws.send(event.response())
                    async with self.lock:
                        with contextlib.suppress(
                            trio.BrokenResourceError, trio.ClosedResourceError
                        ):
                            await self.stream.send_all(response)
                return


async def run_client(profile: Profile, checker: ClientChecker, world: World) -> None:
    for plan in profile.sessions:
        with trio.move_on_after(plan.wait):
            await world.stop.wait()
        if world.stop.is_set():
            return
        if not await _session(profile, plan, checker, world):
            return


async def _session(
    profile: Profile, plan: SessionPlan, checker: ClientChecker, world: World
) -> bool:
    """One connection; False when the scenario is over for this client."""
    stream = await world.listener.connect()
    session = _Session(stream, checker, profile)
    try:
        if not await session.handshake():
            world.refused += 1
            return False
        world.sessions += 1
        opened = trio.current_time()
        keys = list(profile.keys)
        recover = checker.recover_positions(keys)
        checker.start_session(session.next_id, keys, recover)
        await session.subscribe(keys, recover)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_act, session, plan, checker, nursery)
            await session.read(world)
            nursery.cancel_scope.cancel()
        world.client_seconds += trio.current_time() - opened
        checker.now = trio.current_time() - world.started_at
        if session.closed is not None and not session.dropped:
            code, reason = session.closed
            checker.on_close(code, reason, ours=session.ours, stopping=world.stop.is_set())
        checker.end_session()
        return session.closed is None or session.closed[0] not in (1001,)
    finally:
        await trio.aclose_forcefully(stream)


async def _act(
    session: _Session, plan: SessionPlan, checker: ClientChecker, nursery: trio.Nursery
) -> None:
    """The client's own moves during a session: subscribe to more, then leave."""
    started = trio.current_time()
    if plan.more is not None:
        after, keys = plan.more
        await trio.sleep(after)
        new = [key for key in keys if key not in session.profile.keys]
        if new:
            checker.subscribing(session.next_id, new, {})
            await session.subscribe(new, {})
    await trio.sleep_until(started + plan.length)
    if plan.drop:
        session.dropped = True
        session.closed = (None, "dropped")
        await trio.aclose_forcefully(session.stream)
        nursery.cancel_scope.cancel()
    else:
        session.ours = True
        await session.send(CloseConnection(code=1000, reason="bye"))
