"""The asyncio client of one server's control socket.

Requests are matched to their replies by id, each under a bounded wait; ``watch`` updates are
handed to a callback as they arrive. On connect it sends ``hello`` (and stops for good on
another protocol version), fills the charts with the server's last hour (``history``; an older
server without it answers ``unknown_command``, and the charts start empty), takes a first
snapshot and starts the watch. A supervisor's socket
(``odin serve --workers N``) serves no snapshot nor watch: the client asks it for its
``workers`` instead, at once and then every interval, and hands them to a third callback. When
the connection fails or ends it reconnects by itself, 0.5 s after, doubling to 5 s, and it
reports every change of its link state to another callback. A refused connection is told
apart by the socket's process (the pid in its name): not running, the server is gone; running,
it is not answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Final, TypeVar

from odin_fanout.console.link import SUPERVISOR, LinkState, LinkStatus
from odin_fanout.control.paths import owner_running, socket_owner
from odin_fanout.control.protocol import (
    COMMAND_NAMES,
    HISTORY_SECONDS,
    PROTOCOL_VERSION,
    Command,
    ErrorCode,
    Hello,
    History,
    HostWorkers,
    RateHistory,
    Reply,
    ServerIdentity,
    Snapshot,
    SnapshotRequest,
    Stopped,
    Tap,
    TapLine,
    TapStarted,
    Untap,
    Update,
    Watch,
    WatchStarted,
    Workers,
    decode_line,
    encode_request,
)

T = TypeVar("T")

MAX_LINE: Final = 16 * 1024 * 1024
"""Longest line read from a server (a page of connections with many channels is large); a
longer one is a protocol error and ends the connection."""
REQUEST_TIMEOUT: Final = 5.0
BACKOFF_FIRST: Final = 0.5
BACKOFF_MAX: Final = 5.0


class NotConnected(Exception):
    """The request could not be sent, or its connection ended before the reply."""


class RequestFailed(Exception):
    """The server answered with an error, or no usable reply came in time."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ProtocolError(Exception):
    """A line from the server that the client cannot read."""


class ControlClient:
    def __init__(
        self,
        path: Path,
        *,
        on_link: Callable[[LinkStatus], None],
        on_update: Callable[[Update], None],
        on_workers: Callable[[HostWorkers], None] | None = None,
        on_history: Callable[[RateHistory], None] | None = None,
        interval: float = 1.0,
        request_timeout: float = REQUEST_TIMEOUT,
        backoff: tuple[float, float] = (BACKOFF_FIRST, BACKOFF_MAX),
        max_line: int = MAX_LINE,
        owner_running: Callable[[Path], bool | None] = owner_running,
    ) -> None:
        self.path = path
        self.owner_running = owner_running
        """Whether the process that created a socket runs (None: not known)."""
        self.max_line = max_line
        self.interval = interval
        self.request_timeout = request_timeout
        self._on_link = on_link
        self._on_update = on_update
        self._on_workers = on_workers or (lambda _: None)
        self._on_history = on_history or (lambda _: None)
        self._backoff = backoff
        self._delay = backoff[0]
        self._status = LinkStatus(LinkState.CONNECTING)
        self._writer: asyncio.StreamWriter | None = None
        self._write_lock = asyncio.Lock()
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._ids = itertools.count(1)
        self._refusal: Reply | None = None
        self._on_tap: Callable[[TapLine], None] | None = None

    @property
    def status(self) -> LinkStatus:
        return self._status

    async def request(self, command: Command, kind: type[T]) -> T:
        """Send ``command`` and return its result as ``kind``. Raises NotConnected when the
        link is down and RequestFailed on an error reply or a timeout."""
        if not self._status.up:
            raise NotConnected(f"not connected to {self.path}")
        return await self._call_as(command, kind)

    async def tap(self, command: Tap, on_line: Callable[[TapLine], None]) -> TapStarted:
        """Start a tap (one per console: it replaces the last); its lines go to ``on_line``
        until ``untap``. The server's reply comes before the tap's first line."""
        self._on_tap = on_line
        try:
            return await self.request(command, TapStarted)
        except BaseException:
            self._on_tap = None
            raise

    async def untap(self) -> None:
        """Stop the tap; a link that is down has none to stop."""
        self._on_tap = None
        with contextlib.suppress(NotConnected, RequestFailed):
            await self.request(Untap(), Stopped)

    async def run(self) -> None:
        """Connect and stay connected until cancelled, or until the server turns out to speak
        another protocol version."""
        self._on_link(self._status)
        while True:
            status = await self._attempt()
            self._set(status)
            if status.state is LinkState.VERSION_MISMATCH:
                return
            await asyncio.sleep(self._delay)
            self._delay = min(self._delay * 2, self._backoff[1])

    # ---- one connection ----------------------------------------------------------------------

    async def _attempt(self) -> LinkStatus:
        try:
            async with asyncio.timeout(self.request_timeout):
                reader, writer = await asyncio.open_unix_connection(self.path, limit=self.max_line)
        except FileNotFoundError:
            return LinkStatus(LinkState.MISSING, "no such socket")
        except PermissionError as exc:
            return LinkStatus(LinkState.DENIED, exc.strerror or str(exc))
        except ConnectionRefusedError:
            return self._nobody_listens()
        except TimeoutError:
            return LinkStatus(LinkState.NOT_ANSWERING, "connect timed out")
        except OSError as exc:
            return LinkStatus(LinkState.LOST, exc.strerror or str(exc))
        return await self._session(reader, writer)

    async def _session(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> LinkStatus:
        """Run one connection to its end; returns the state to report after it."""
        self._writer = writer
        self._refusal = None
        reading = asyncio.create_task(self._read(reader))
        polling: asyncio.Task[None] | None = None
        try:
            try:
                identity = await self._call_as(Hello(), ServerIdentity)
                if identity.protocol != PROTOCOL_VERSION:
                    detail = (
                        f"the server speaks protocol {identity.protocol}, "
                        f"this console {PROTOCOL_VERSION}"
                    )
                    return LinkStatus(LinkState.VERSION_MISMATCH, detail, identity)
                # Up from here: the identity names this server's events and figures.
                self._set(LinkStatus(LinkState.CONNECTED, identity=identity))
                if identity.role == SUPERVISOR:
                    self._on_workers(await self._call_as(Workers(), HostWorkers))
                    polling = asyncio.create_task(self._poll_workers())
                else:
                    await self._history()
                    snapshot = await self._call_as(SnapshotRequest(), Snapshot)
                    self._on_update(Update(snapshot, []))
                    await self._call_as(Watch(self.interval), WatchStarted)
            except RequestFailed as exc:
                return self._refused(exc.code, exc.message)
            except NotConnected:
                pass  # the reading task knows why
            else:
                self._delay = self._backoff[0]
            reason = await reading
        except ProtocolError as exc:
            return LinkStatus(LinkState.LOST, f"protocol error: {exc}")
        finally:
            self._writer = None
            writer.close()  # before anything awaits: a second cancellation cannot skip it
            tasks = [reading] if polling is None else [reading, polling]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._fail_pending("connection closed")
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return self._ended(reason)

    async def _history(self) -> None:
        """Hand on the server's last hour, a point per update interval (whole seconds: the
        server samples every second). Without it (an older server: ``unknown_command``; or
        refused for now) the charts start empty, as before ``history`` existed."""
        step = min(max(1, round(self.interval)), HISTORY_SECONDS)
        try:
            history = await self._call_as(History(HISTORY_SECONDS, step), RateHistory)
        except RequestFailed:
            return
        self._on_history(history)

    async def _poll_workers(self) -> None:
        """A supervisor sends no updates: ask for its workers every interval instead."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                workers = await self._call_as(Workers(), HostWorkers)
            except RequestFailed:
                continue  # late, or refused for now (rate_limited): ask again next time
            except NotConnected:
                return  # the reading task says why
            self._on_workers(workers)

    async def _read(self, reader: asyncio.StreamReader) -> str:
        """Dispatch lines until the stream ends; returns why it ended."""
        reason = "connection closed"
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    return reason
                except asyncio.LimitOverrunError:
                    reason = "line too long"
                    raise ProtocolError(f"a line longer than {self.max_line} bytes") from None
                except OSError as exc:
                    return exc.strerror or str(exc)
                self._dispatch(line)
        finally:
            self._fail_pending(reason)

    def _dispatch(self, line: bytes) -> None:
        try:
            message = decode_line(line)
        except Exception as exc:  # orjson's and cattrs' errors alike: the line is unusable
            raise ProtocolError(f"unreadable line: {exc}") from None
        if isinstance(message, Update):
            self._on_update(message)
            return
        if isinstance(message, TapLine):
            if self._on_tap is not None:
                self._on_tap(message)
            return
        request_id = message.request_id
        future = self._pending.get(request_id) if isinstance(request_id, int) else None
        if future is not None and not future.done():
            future.set_result(message)
        elif not message.ok:
            # An error for none of our requests: the server refusing us before it closes.
            self._refusal = message

    # ---- requests ----------------------------------------------------------------------------

    async def _call_as(self, command: Command, kind: type[T]) -> T:
        reply = await self._call(command)
        if not reply.ok:
            raise RequestFailed(reply.error_code, reply.error_message)
        try:
            return reply.result_as(kind)
        except Exception as exc:  # cattrs' validation errors: a result of another shape
            name = COMMAND_NAMES[type(command)]
            raise RequestFailed("bad_reply", f"{name}: {exc}") from None

    async def _call(self, command: Command) -> Reply:
        writer = self._writer
        if writer is None:
            raise NotConnected(f"not connected to {self.path}")
        request_id = next(self._ids)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            async with asyncio.timeout(self.request_timeout):
                async with self._write_lock:
                    writer.write(encode_request(request_id, command))
                    await writer.drain()
                return await future
        except TimeoutError:
            name = COMMAND_NAMES[type(command)]
            raise RequestFailed(
                "timeout", f"no reply to {name} in {self.request_timeout:g} s"
            ) from None
        except OSError as exc:
            raise NotConnected(exc.strerror or str(exc)) from None
        finally:
            self._pending.pop(request_id, None)

    def _fail_pending(self, reason: str) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(NotConnected(reason))

    def _ended(self, reason: str) -> LinkStatus:
        refusal = self._refusal
        if refusal is not None:
            return self._refused(refusal.error_code, refusal.error_message)
        return LinkStatus(LinkState.LOST, reason)

    def _nobody_listens(self) -> LinkStatus:
        """The file is there but nobody listens: a server that died without removing it, or
        one that has not listened yet (or no longer does), as its process runs or not."""
        running = self.owner_running(self.path)
        pid = socket_owner(self.path)
        owner = f"pid {pid}" if pid is not None else "its process"
        if running is None:
            return LinkStatus(LinkState.LOST, "connection refused")
        if running:
            return LinkStatus(LinkState.NOT_ANSWERING, f"connection refused; {owner} is running")
        return LinkStatus(LinkState.GONE, f"socket left by {owner}, not running")

    def _refused(self, code: str, message: str) -> LinkStatus:
        if code == ErrorCode.PERMISSION_DENIED:
            return LinkStatus(LinkState.DENIED, message)
        if code == "timeout":  # no reply to hello in time: there, but not answering
            return LinkStatus(LinkState.NOT_ANSWERING, f"{code}: {message}")
        return LinkStatus(LinkState.LOST, f"{code}: {message}")

    def _set(self, status: LinkStatus) -> None:
        if status != self._status:
            self._status = status
            self._on_link(status)
