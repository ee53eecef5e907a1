"""What every control socket shares: where it goes, who may attach, and the line loop of each
attached console. A server process's socket (``odin_fanout.server.control``) and a supervisor's
(``odin_fanout.host.control``) both build on ``ControlSocket`` and say only what they answer.

One socket per process (``odin-<pid>.sock`` in a per-user directory, see
``odin_fanout.control.paths``). Who may attach is checked twice: the socket is mode 0600 in a 0700
directory (for an explicit ``control.path``, one only its owner may write; a directory that
fails the checks is refused, never followed or chmodded), and the peer's uid (SO_PEERCRED)
must be the process's, root's, or in ``control.allowed_uids``. It never hurts the data plane:
consoles are few (``max_clients``), their lines bounded (``MAX_LINE_BYTES``), their commands
rate-limited, and a console that stops reading only misses what may be skipped.

A socket file outlives a killed process. At start a process replaces such a file at its own
path (nobody answers there), and in the default directory removes those of processes that
are not running any more (``remove_dead_sockets``); never one whose process runs.

Each console is one nursery: the reader in the nursery's own task, a writer draining a small
bounded channel, and the tasks its commands started (a server's watch updates). Closing the
connection, or the socket stopping, cancels them all.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from odin_fanout.config import ConfigError, ControlSection
from odin_fanout.control import paths
from odin_fanout.control.protocol import (
    COMMAND_NAMES,
    MAX_LINE_BYTES,
    Command,
    ControlError,
    ErrorCode,
    Reloaded,
    encode_error,
    encode_result,
    parse_request,
)
from odin_fanout.logs import Log
from odin_fanout.protocol.ratelimit import TokenBucket

_OUTBOX = 32
"""Lines waiting for one console; beyond this, what may be skipped (watch updates) is."""
_SEND_TIMEOUT = 10.0
"""A console that takes longer than this to accept a line is disconnected."""

Execute = Callable[[Command], Awaitable[object]]
"""Answers one command of one console: its result, or raises ControlError."""


class ControlUnavailable(Exception):
    """The socket could not be set up; the process runs on without it."""


def socket_path(config: ControlSection) -> Path:
    if config.path:
        return Path(config.path)
    return paths.default_directory() / paths.socket_name(os.getpid())


_OPEN_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
"""The last component must be a directory itself: a symlink fails (ENOTDIR or ELOOP)."""


def prepare_directory(directory: Path, uid: int, *, explicit: bool) -> int:
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
    _refuse_if_answered(path)
    with contextlib.suppress(FileNotFoundError):
        if os.stat(path.name, dir_fd=directory, follow_symlinks=False).st_ino != info.st_ino:
            raise ControlUnavailable(f"{path} was replaced while being checked")
        os.unlink(path.name, dir_fd=directory)


def _refuse_if_answered(path: Path) -> None:
    """Raise unless connecting to ``path`` is refused (nobody listens) or finds nothing."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Non-blocking: a live server whose backlog is full must not stall this one's start.
    probe.setblocking(False)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            raise ControlUnavailable(f"{path} is in use by another process") from None
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ControlUnavailable(f"{path}: {exc.strerror}") from None
    else:
        raise ControlUnavailable(f"{path} is in use by another process")
    finally:
        probe.close()


def remove_dead_sockets(directory: Path, uid: int) -> list[tuple[Path, int]]:
    """Remove the sockets of the default directory left by processes that died (SIGKILL
    leaves them), so that no console keeps finding them; returns each one removed with its
    pid. Only ``odin-<pid>.sock`` names are considered, of a pid not ours and not running
    (``paths.process_running``), and only if nobody answers there: a socket whose process
    runs stays, answering or not. Meant for the default directory only, where every name
    carries its process's pid (beside an explicit ``control.path``, ``odin-1.sock`` is a
    worker's slot)."""
    try:
        fd = prepare_directory(directory, uid, explicit=False)
    except (ControlUnavailable, OSError):
        return []  # listen says why
    removed: list[tuple[Path, int]] = []
    try:
        for name in os.listdir(fd):
            pid = paths.socket_owner(Path(name))
            if pid is None or pid == os.getpid():
                continue  # ours is replaced (or refused) by listen
            try:
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISSOCK(info.st_mode) or paths.process_running(pid, since=info.st_mtime):
                continue
            try:
                _remove_stale(directory / name, fd)
            except (ControlUnavailable, OSError):
                continue  # someone answers there after all: left alone
            removed.append((directory / name, pid))
    finally:
        os.close(fd)
    return removed


async def listen(path: Path, uid: int, *, explicit: bool, backlog: int) -> trio.SocketListener:
    """Bind and listen on ``path`` (mode 0600) in a directory that passes the checks."""
    directory = prepare_directory(path.parent, uid, explicit=explicit)
    try:
        _remove_stale(path, directory)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # umask first, chmod after: the socket is never reachable with wider permissions
            # (and the directory, checked above, keeps others from replacing it).
            previous = os.umask(0o177)
            try:
                await sock.bind(str(path))
            finally:
                os.umask(previous)
            # Relative to the checked directory's fd: the socket just bound, nothing else.
            os.chmod(path.name, 0o600, dir_fd=directory)
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
    finally:
        os.close(directory)
    return trio.SocketListener(sock)


def peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", raw)
    return pid, uid


class ControlSocket:
    """A control socket: set up, who may attach, and a console's line loop. A subclass says
    what each console's commands do (``session``) and may count errors (``count_error``)."""

    def __init__(
        self, config: ControlSection, log: Log, *, path: Path | None = None, uid: int | None = None
    ) -> None:
        self.config = config
        self.log = log
        self.path = path if path is not None else socket_path(config)
        self.uid = os.getuid() if uid is None else uid
        """The process's user: who may attach, with root and ``config.allowed_uids``."""
        self.clients = 0

    # ---- what a subclass says ----------------------------------------------------------------

    def session(self, console: AttachedConsole) -> Execute:
        """How the commands of a console that just attached are answered."""
        raise NotImplementedError

    def count_error(self, code: ErrorCode) -> None:
        """Every error reply goes through here (a server counts them in its metrics)."""

    # ---- the socket --------------------------------------------------------------------------

    def allowed(self, uid: int) -> bool:
        if uid == 0 and self.config.allow_root:
            return True
        return uid == self.uid or uid in self.config.allowed_uids

    async def run(self, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the socket until cancelled; if it cannot be set up, log why and return (the
        console is an aid: the process goes on without it)."""
        if not self.config.path:
            for stale, pid in remove_dead_sockets(self.path.parent, self.uid):
                self.log.info("control_stale_removed", path=str(stale), pid=pid)
        try:
            listener = await listen(
                self.path,
                self.uid,
                explicit=bool(self.config.path),
                backlog=self.config.max_clients + 2,
            )
        except (ControlUnavailable, OSError) as exc:
            self.log.warning("control_unavailable", path=str(self.path), error=str(exc))
            task_status.started(self.path)
            return
        inode = self.path.stat().st_ino
        self.log.info("control_listening", path=str(self.path))
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(self.path)
                await trio.serve_listeners(self._handle, [listener], handler_nursery=nursery)
        finally:
            with contextlib.suppress(OSError):
                if self.path.stat().st_ino == inode:  # still ours, not a newer process's
                    self.path.unlink()

    def error(self, request_id: object, code: ErrorCode, message: str) -> bytes:
        """An error reply, counted."""
        self.count_error(code)
        return encode_error(request_id, code, message)

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
                await AttachedConsole(self, stream, pid, uid).run()
            finally:
                self.clients -= 1
                self.log.info("control_detached", pid=pid, uid=uid)

    async def _refuse(self, stream: trio.SocketStream, code: ErrorCode, message: str) -> None:
        with trio.move_on_after(1), contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(self.error(None, code, message))


class AttachedConsole:
    """One attached console: its reader and writer, and the tasks its commands start."""

    def __init__(self, control: ControlSocket, stream: trio.SocketStream, pid: int, uid: int):
        self.control = control
        self.stream = stream
        self.pid = pid
        self.uid = uid
        self.log = control.log
        self._outbox, self._inbox = trio.open_memory_channel[bytes](_OUTBOX)
        config = control.config
        self._bucket = TokenBucket.full(
            config.command_burst, config.commands_per_second, trio.current_time()
        )
        self._tasks: trio.Nursery | None = None
        self._execute = control.session(self)

    def start_soon(self, task: Callable[..., Awaitable[Any]], *args: object) -> None:
        """Run ``task`` beside the reader, until the console leaves."""
        assert self._tasks is not None, "a console starts tasks only while attached"
        self._tasks.start_soon(task, *args)

    def offer(self, line: bytes) -> bool:
        """Queue a line that may be skipped (a watch update); False if the console is not
        reading (its queue is full)."""
        try:
            self._outbox.send_nowait(line)
        except trio.WouldBlock:
            return False
        return True

    async def send(self, line: bytes) -> None:
        """Queue a line that may not be skipped (a tap's), waiting for room: the writer
        disconnects a console that takes no line for ``_SEND_TIMEOUT``."""
        await self._outbox.send(line)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write, nursery.cancel_scope)
            async with trio.open_nursery() as tasks:
                self._tasks = tasks
                await self._read()
                # The console left (or sent a line too long): stop what its commands started.
                tasks.cancel_scope.cancel()
            # Let the writer send what is queued, for a bounded time, and end.
            self._outbox.close()
            nursery.cancel_scope.deadline = trio.current_time() + 1

    async def _write(self, console: trio.CancelScope) -> None:
        async with self._inbox:
            async for line in self._inbox:
                with trio.move_on_after(_SEND_TIMEOUT) as scope:
                    await self.stream.send_all(line)
                if scope.cancelled_caught:
                    self.log.warning("control_stuck", pid=self.pid, uid=self.uid)
                    console.cancel()
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
                await self._outbox.send(self.control.error(None, ErrorCode.LINE_TOO_LONG, message))
                return

    async def _answer(self, line: bytes) -> None:
        control = self.control
        if not self._bucket.try_take(trio.current_time()):
            message = f"at most {control.config.commands_per_second} commands a second"
            await self._outbox.send(control.error(_id_of(line), ErrorCode.RATE_LIMITED, message))
            return
        try:
            request_id, command = parse_request(line)
        except ControlError as exc:
            self.log.info("control_bad_request", pid=self.pid, uid=self.uid, code=exc.code.value)
            await self._outbox.send(control.error(exc.request_id, exc.code, exc.message))
            return
        self.log.info(
            "control_command", cmd=COMMAND_NAMES[type(command)], pid=self.pid, uid=self.uid
        )
        try:
            result = await self._execute(command)
        except ControlError as exc:
            await self._outbox.send(control.error(request_id, exc.code, exc.message))
            return
        await self._outbox.send(encode_result(request_id, result))

    def reload(self, reload: Callable[[], tuple[list[str], list[str]]]) -> Reloaded:
        """Call ``reload`` for this console, as SIGHUP does, and log what came of it: a
        configuration that does not parse or cannot be read is ``config_invalid``."""
        try:
            changed, restart_required = reload()
        except (ConfigError, OSError) as exc:
            # Nothing was applied.
            problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
            self.log.warning(
                "control_reload", pid=self.pid, uid=self.uid, outcome="invalid", problems=problems
            )
            raise ControlError(ErrorCode.CONFIG_INVALID, "; ".join(problems)) from None
        self.log.warning(
            "control_reload",
            pid=self.pid,
            uid=self.uid,
            outcome="applied",
            changed=changed,
            restart_required=restart_required,
        )
        return Reloaded(list(changed), list(restart_required))


def _id_of(line: bytes) -> object:
    """The id of a request we will not parse fully (refused before parsing), if it has one."""
    try:
        request_id, _ = parse_request(line)
    except ControlError as exc:
        return exc.request_id
    return request_id
