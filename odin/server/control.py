"""The control socket: the operator console's line-delimited JSON over a Unix socket.

One socket per server process (``odin-<pid>.sock`` in a per-user directory, see
``odin.control.paths``). Who may attach is checked twice: the socket is mode 0600 in a 0700
directory (for an explicit ``control.path``, one only its owner may write; a directory that
fails the checks is refused, never followed or chmodded), and the peer's uid (SO_PEERCRED)
must be the server's, root's, or in ``control.allowed_uids``. It never hurts the data plane:
consoles are few (``max_clients``), their lines bounded (``MAX_LINE_BYTES``), their commands
rate-limited, replies are bounded pages, and a console that stops reading only misses updates
(the next one carries every event since the last it got).

Each console is one nursery: the reader in the nursery's own task, a writer draining a small
bounded channel, and, while it watches, an updater. Closing the connection, or the server
stopping, cancels all three.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import trio

from odin.config import ConfigError, ControlSection
from odin.control import paths
from odin.control.protocol import (
    COMMAND_NAMES,
    MAX_LINE_BYTES,
    PROTOCOL_VERSION,
    Command,
    ControlError,
    Drain,
    Draining,
    ErrorCode,
    Hello,
    Inspect,
    Kick,
    Kicked,
    ListChannels,
    ListConnections,
    Page,
    Reload,
    Reloaded,
    SlowConsumers,
    Snapshot,
    SnapshotRequest,
    Stopped,
    Unwatch,
    Update,
    Watch,
    WatchStarted,
    encode_error,
    encode_result,
    encode_update,
    parse_request,
)
from odin.protocol.ratelimit import TokenBucket
from odin.server import control_state
from odin.server.app import OdinServer

_OUTBOX = 32
"""Lines waiting for one console; beyond this, watch updates are skipped."""
_SEND_TIMEOUT = 10.0
"""A console that takes longer than this to accept a line is disconnected."""
_EVENTS_PER_UPDATE = 500
_SNAPSHOT_REUSE = 0.25
"""Seconds a snapshot is shared between consoles instead of computed again."""


class ControlUnavailable(Exception):
    """The socket could not be set up; the server runs on without it."""


def socket_path(config: ControlSection) -> Path:
    if config.path:
        return Path(config.path)
    return paths.default_directory() / paths.socket_name(os.getpid())


_OPEN_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
"""The last component must be a directory itself: a symlink fails (ENOTDIR or ELOOP)."""


def _prepare_directory(directory: Path, uid: int, *, explicit: bool) -> int:
    """An fd on the socket's directory, which is created (the last component only, mode 0700)
    if missing. A directory that fails ``_check_directory`` is refused as it is: Odin never
    follows a symlink there nor chmods a directory it did not create (running as root, a
    planted ``/tmp/odin-0 -> /tmp`` would otherwise make it ``chmod 0700 /tmp``)."""
    try:
        os.mkdir(directory, 0o700)
        created = True
    except FileExistsError:
        created = False
    except FileNotFoundError:
        raise ControlUnavailable(f"{directory.parent} does not exist") from None
    try:
        fd = os.open(directory, _OPEN_DIRECTORY)
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        what = "a symlink" if directory.is_symlink() else "not a directory"
        raise ControlUnavailable(f"{directory} is {what}") from None
    try:
        # fstat the fd, not the path: what is checked is what the socket goes into.
        info = os.fstat(fd)
        if created and info.st_uid == uid:
            # Ours from mkdir (the owner check: not one swapped in since): undo the umask.
            os.fchmod(fd, 0o700)
            info = os.fstat(fd)
        _check_directory(directory, info, uid, explicit=explicit)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_directory(directory: Path, info: os.stat_result, uid: int, *, explicit: bool) -> None:
    mode = stat.S_IMODE(info.st_mode)
    if explicit:
        # An operator's choice, often made for us (systemd's RuntimeDirectory=, 0755 unless
        # RuntimeDirectoryMode= says otherwise): enough that only its owner, we or root, can
        # put or replace files there. The socket's 0600 and SO_PEERCRED keep others out.
        if info.st_uid not in (uid, 0):
            raise ControlUnavailable(f"{directory} belongs to uid {info.st_uid}, not {uid} or root")
        if mode & 0o022:
            raise ControlUnavailable(f"{directory} has mode {mode:#o}: others may write there")
        return
    # The default per-user directory is Odin's own: exactly what Odin would have created.
    if info.st_uid != uid:
        raise ControlUnavailable(f"{directory} belongs to uid {info.st_uid}, not {uid}")
    if mode & 0o777 != 0o700:
        raise ControlUnavailable(f"{directory} has mode {mode:#o}, not 0o700")


def _remove_stale(path: Path, directory: int) -> None:
    """Remove a socket left by a process that died; refuse if one still answers there.

    ``directory`` is the checked directory's fd: the name is looked up and removed there,
    never through a symlink, and only if it is a socket."""
    try:
        info = os.stat(path.name, dir_fd=directory, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise ControlUnavailable(f"{path} is a symlink, not a socket")
    if not stat.S_ISSOCK(info.st_mode):
        raise ControlUnavailable(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ControlUnavailable(f"{path}: {exc.strerror}") from None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path.name, dir_fd=directory)
    else:
        raise ControlUnavailable(f"{path} is in use by another process")
    finally:
        probe.close()


def peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", raw)
    return pid, uid


class ControlServer:
    def __init__(
        self,
        server: OdinServer,
        config: ControlSection,
        *,
        websocket: list[str] | None = None,
        uid: int | None = None,
        reload: Callable[[], tuple[list[str], list[str]]] | None = None,
    ) -> None:
        self.server = server
        self.context = server.context
        self.config = config
        self.path = socket_path(config)
        self.uid = os.getuid() if uid is None else uid
        """The server's user: who may attach, with root and ``config.allowed_uids``."""
        self.websocket = websocket or []
        self.reload = reload
        """Applies the configuration file again, as SIGHUP: returns (changed,
        restart_required) ``section.field`` names, or raises ConfigError. None: this server
        cannot (``reload`` is answered ``unavailable``)."""
        self.clients = 0
        self.log = server.context.log
        self._rates = control_state.Rates(lambda: (server.fanout.received, server.fanout.delivered))
        self._snapshot: tuple[float, Snapshot] | None = None

    def allowed(self, uid: int) -> bool:
        if uid == 0 and self.config.allow_root:
            return True
        return uid == self.uid or uid in self.config.allowed_uids

    async def run(self, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the socket until cancelled; if it cannot be set up, log why and return
        (the console is an aid: the server goes on serving clients without it)."""
        try:
            listener = await self._listen()
        except (ControlUnavailable, OSError) as exc:
            self.log.warning("control_unavailable", path=str(self.path), error=str(exc))
            task_status.started(self.path)
            return
        inode = self.path.stat().st_ino
        self.log.info("control_listening", path=str(self.path))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._sample_rates)
                task_status.started(self.path)
                await trio.serve_listeners(self._handle, [listener], handler_nursery=nursery)
        finally:
            with contextlib.suppress(OSError):
                if self.path.stat().st_ino == inode:  # still ours, not a newer server's
                    self.path.unlink()

    async def _listen(self) -> trio.SocketListener:
        explicit = bool(self.config.path)
        directory = _prepare_directory(self.path.parent, self.uid, explicit=explicit)
        try:
            _remove_stale(self.path, directory)
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                # umask first, chmod after: the socket is never reachable with wider
                # permissions (and the directory, checked above, keeps others from
                # replacing it).
                previous = os.umask(0o177)
                try:
                    await sock.bind(str(self.path))
                finally:
                    os.umask(previous)
                # Relative to the checked directory's fd: the socket just bound, nothing else.
                os.chmod(self.path.name, 0o600, dir_fd=directory)
                sock.listen(self.config.max_clients + 2)
            except BaseException:
                sock.close()
                raise
        finally:
            os.close(directory)
        return trio.SocketListener(sock)

    async def _sample_rates(self) -> None:
        while True:
            await trio.sleep(1.0)
            self._rates.sample()

    async def snapshot(self) -> Snapshot:
        now = trio.current_time()
        if self._snapshot is None or now - self._snapshot[0] > _SNAPSHOT_REUSE:
            self._snapshot = (now, await control_state.snapshot(self.context, self._rates))
        return self._snapshot[1]

    # ---- one console ---------------------------------------------------------------------

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            pid, uid = peer_credentials(stream.socket)
        except OSError:
            await stream.aclose()
            return
        async with stream:
            if not self.allowed(uid):
                self.log.warning("control_refused", pid=pid, uid=uid, why="uid not allowed")
                await self._refuse(stream, ErrorCode.PERMISSION_DENIED, f"uid {uid} may not attach")
                return
            if self.clients >= self.config.max_clients:
                self.log.warning("control_refused", pid=pid, uid=uid, why="too many consoles")
                await self._refuse(
                    stream,
                    ErrorCode.TOO_MANY_CLIENTS,
                    f"{self.clients} consoles attached, the limit is {self.config.max_clients}",
                )
                return
            self.clients += 1
            self.log.info("control_attached", pid=pid, uid=uid)
            try:
                await _Console(self, stream, pid, uid).run()
            finally:
                self.clients -= 1
                self.log.info("control_detached", pid=pid, uid=uid)

    def error(self, request_id: object, code: ErrorCode, message: str) -> bytes:
        """An error reply, counted."""
        self.context.metrics.control_errors.labels(code.value).inc()
        return encode_error(request_id, code, message)

    async def _refuse(self, stream: trio.SocketStream, code: ErrorCode, message: str) -> None:
        with trio.move_on_after(1), contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(self.error(None, code, message))


class _Console:
    """One attached console: its reader, writer and (while watching) updater."""

    def __init__(self, control: ControlServer, stream: trio.SocketStream, pid: int, uid: int):
        self.control = control
        self.stream = stream
        self.pid = pid
        self.uid = uid
        self.outbox, self._inbox = trio.open_memory_channel[bytes](_OUTBOX)
        config = control.config
        self.bucket = TokenBucket.full(
            config.command_burst, config.commands_per_second, trio.current_time()
        )
        self.watching: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._write)
            await self._read()
            # The console left (or sent a line too long): stop its updates, let the writer
            # send what is queued, for a bounded time, and end.
            if self.watching is not None:
                self.watching.cancel()
            self.outbox.close()
            nursery.cancel_scope.deadline = trio.current_time() + 1

    async def _write(self) -> None:
        async with self._inbox:
            async for line in self._inbox:
                with trio.move_on_after(_SEND_TIMEOUT) as scope:
                    await self.stream.send_all(line)
                if scope.cancelled_caught:
                    self.control.log.warning("control_stuck", pid=self.pid, uid=self.uid)
                    assert self._nursery is not None
                    self._nursery.cancel_scope.cancel()
                    return

    async def _read(self) -> None:
        buffer = bytearray()
        while True:
            try:
                data = await self.stream.receive_some(MAX_LINE_BYTES)
            except trio.BrokenResourceError:
                return
            if not data:
                return
            buffer += data
            while (end := buffer.find(b"\n")) >= 0:
                line = bytes(buffer[:end])
                del buffer[: end + 1]
                if line.strip():
                    await self._answer(line)
            if len(buffer) > MAX_LINE_BYTES:
                message = f"a request line may be at most {MAX_LINE_BYTES} bytes"
                await self.outbox.send(self.control.error(None, ErrorCode.LINE_TOO_LONG, message))
                return

    async def _answer(self, line: bytes) -> None:
        if not self.bucket.try_take(trio.current_time()):
            message = f"at most {self.control.config.commands_per_second} commands a second"
            refusal = self.control.error(_id_of(line), ErrorCode.RATE_LIMITED, message)
            await self.outbox.send(refusal)
            return
        try:
            request_id, command = parse_request(line)
        except ControlError as exc:
            self.control.log.info(
                "control_bad_request", pid=self.pid, uid=self.uid, code=exc.code.value
            )
            await self.outbox.send(self.control.error(exc.request_id, exc.code, exc.message))
            return
        self.control.log.info(
            "control_command", cmd=COMMAND_NAMES[type(command)], pid=self.pid, uid=self.uid
        )
        try:
            result = await self._execute(command)
        except ControlError as exc:
            await self.outbox.send(self.control.error(request_id, exc.code, exc.message))
            return
        await self.outbox.send(encode_result(request_id, result))

    async def _execute(self, command: Command) -> object:
        control = self.control
        context = control.context
        match command:
            case Hello():
                return control_state.identity(context, control.websocket, PROTOCOL_VERSION)
            case SnapshotRequest():
                return await control.snapshot()
            case Watch(interval=interval):
                self._watch(interval)
                return WatchStarted(interval)
            case Unwatch():
                if self.watching is not None:
                    self.watching.cancel()
                    self.watching = None
                return Stopped()
            case ListConnections():
                return await control_state.list_connections(context, command)
            case SlowConsumers(limit=limit):
                slow = await control_state.slow_consumers(context, limit)
                return Page(len(slow), 0, slow)
            case ListChannels():
                return control_state.list_channels(context, command)
            case Inspect(conn=conn):
                detail = control_state.inspect(context, conn)
                if detail is None:
                    raise ControlError(ErrorCode.NOT_FOUND, f"no open connection {conn!r}")
                return detail
            case Kick():
                return self._kick(command)
            case Drain():
                return self._drain()
            case Reload():
                return self._reload()
        raise AssertionError(f"unhandled command {command!r}")

    def _kick(self, kick: Kick) -> Kicked:
        context = self.control.context
        connection = context.registry.connections.get(kick.conn)
        if connection is None:
            raise ControlError(ErrorCode.NOT_FOUND, f"no open connection {kick.conn!r}")
        self.control.log.warning(
            "control_kick", conn=kick.conn, code=kick.code, pid=self.pid, uid=self.uid
        )
        context.events.emit("kick", kick.conn, code=kick.code, by_pid=self.pid)
        connection.request_close(kick.code, kick.reason, "operator", discard_queue=True)
        return Kicked(kick.conn, kick.code)

    def _drain(self) -> Draining:
        control = self.control
        context = control.context
        if control.server.stopping:
            raise ControlError(ErrorCode.DRAINING, "the server is already draining")
        control.log.warning("control_drain", pid=self.pid, uid=self.uid)
        context.events.emit("drain", by_pid=self.pid)
        control.server.request_shutdown()
        return Draining(len(context.registry.connections), context.config.shutdown.drain_timeout)

    def _reload(self) -> Reloaded:
        control = self.control
        if control.reload is None:
            raise ControlError(ErrorCode.UNAVAILABLE, "this server cannot reload its configuration")
        try:
            changed, restart_required = control.reload()
        except (ConfigError, OSError) as exc:
            # A file that does not parse or cannot be read: nothing was applied.
            problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
            control.log.warning(
                "control_reload", pid=self.pid, uid=self.uid, outcome="invalid", problems=problems
            )
            raise ControlError(ErrorCode.CONFIG_INVALID, "; ".join(problems)) from None
        control.log.warning(
            "control_reload",
            pid=self.pid,
            uid=self.uid,
            outcome="applied",
            changed=changed,
            restart_required=restart_required,
        )
        # Every console's event log says it, not only the one that asked.
        control.context.events.emit(
            "reload",
            by_pid=self.pid,
            changed=", ".join(changed),
            restart_required=", ".join(restart_required),
        )
        return Reloaded(list(changed), list(restart_required))

    def _watch(self, interval: float) -> None:
        if self.watching is not None:
            self.watching.cancel()
        scope = self.watching = trio.CancelScope()
        assert self._nursery is not None
        self._nursery.start_soon(self._updates, scope, interval)

    async def _updates(self, scope: trio.CancelScope, interval: float) -> None:
        control = self.control
        events = control.context.events
        seen = events.last
        with scope:
            while True:
                await trio.sleep(interval)
                snapshot = await control.snapshot()
                # No checkpoint from here on: no event can slip between reading and marking.
                fresh, dropped = events.since(seen, _EVENTS_PER_UPDATE)
                last = events.last
                try:
                    self.outbox.send_nowait(encode_update(Update(snapshot, fresh, dropped)))
                except trio.WouldBlock:
                    # The console is not reading: skip this one; the next carries the events.
                    control.context.metrics.control_updates_skipped.inc()
                    continue
                seen = last


def _id_of(line: bytes) -> object:
    """The id of a request we will not parse fully (refused before parsing), if it has one."""
    try:
        request_id, _ = parse_request(line)
    except ControlError as exc:
        return exc.request_id
    return request_id
