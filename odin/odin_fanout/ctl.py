"""``odin ctl``: the control sockets' commands for scripts and a shell, one command a run.

A blocking client (stdlib sockets, line-delimited JSON, every wait bounded by ``--timeout``),
speaking the protocol of ``odin_fanout.control.protocol`` through its types and converter. It
imports nothing of the server, nor of the console.

Targets: ``--socket PATH`` (one server, repeatable), or every ``odin-<pid>.sock`` in ``--dir``
(a socket left by a process that died, which refuses connections, is passed over). Commands
that change something (``kick``, ``drain``, ``reload``) need ``--socket`` or ``--all``: with
``--all``, ``drain`` and ``reload`` go to each host's supervisor (which passes them to its
workers) and to the servers that run alone; ``kick`` to the server whose connection it is.

Output: a table by default; ``--json``, the protocol's result as one JSON document (with
``--socket`` naming one server, the result itself; otherwise a list of ``{"socket", "result"}``
or ``{"socket", "error"}``), and for ``tap`` one JSON line per frame with the socket it came
from: a channel is tapped on every server found (a host's workers each serve their own
clients), a connection on the server that has it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import selectors
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, TextIO

import orjson

from odin_fanout.control.paths import default_directory, find_sockets
from odin_fanout.control.protocol import (
    CHANNEL_SORTS,
    CONNECTION_SORTS,
    HISTORY_SECONDS,
    KICKED,
    MAX_PAGE,
    PROTOCOL_VERSION,
    TAP_MAX_RATE,
    Command,
    Drain,
    EventPage,
    Hello,
    History,
    HostWorkers,
    Inspect,
    Kick,
    ListChannels,
    ListConnections,
    ListEvents,
    RateHistory,
    Reload,
    Reply,
    ServerIdentity,
    SlowConsumers,
    Snapshot,
    SnapshotRequest,
    Tap,
    TapLine,
    Update,
    Workers,
    converter,
    decode_line,
    encode_request,
)
from odin_fanout.control.text import clock, tap_text

EX_OK: Final = 0
EX_REFUSED: Final = 1
"""The server answered with an error: not_found, draining, config_invalid, unavailable..."""
EX_USAGE: Final = 2
EX_UNREACHABLE: Final = 3
"""No server to talk to: none found, not answering, permission denied, another protocol."""

MAX_LINE: Final = 16 * 1024 * 1024
"""The longest line read from a server (as the console's limit)."""

EPILOG = f"""\
targets:
  --socket PATH   one server's control socket (repeatable); otherwise every
                  odin-<pid>.sock in --dir (default {default_directory()})
  kick, drain and reload change things: they need --socket or --all.

exit codes:
  {EX_OK}  done
  {EX_REFUSED}  the server refused (not_found, draining, config_invalid, unavailable...)
  {EX_USAGE}  usage error
  {EX_UNREACHABLE}  no server reachable: none found, no answer within --timeout,
     permission denied (run as the server's user or root), another protocol version
"""


class Unreachable(Exception):
    """This socket could not be talked to (exit 3)."""


class Refused(Exception):
    """The server answered an error (exit 1)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class Link:
    """One control socket, blocking, every read and write bounded by ``timeout``."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._buffer = bytearray()
        self._ids = iter(range(1, 1 << 62))
        try:
            self._sock.connect(str(path))
        except OSError as exc:
            self._sock.close()
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise Unreachable(f"{path}: permission denied") from None
            raise Unreachable(f"{path}: {exc.strerror or exc}") from exc
        try:
            self.identity: ServerIdentity = self.call_as(Hello(), ServerIdentity)
        except BaseException:
            self.close()
            raise
        if self.identity.protocol != PROTOCOL_VERSION:
            self.close()
            raise Unreachable(
                f"{path}: the server speaks protocol {self.identity.protocol}, "
                f"this odin ctl {PROTOCOL_VERSION}"
            )

    def close(self) -> None:
        self._sock.close()

    def send(self, command: Command) -> int:
        request_id = next(self._ids)
        try:
            self._sock.sendall(encode_request(request_id, command))
        except OSError as exc:
            why = exc.strerror or str(exc)
            # Refused at attach: the server's reason is in what it sent before closing.
            with contextlib.suppress(Unreachable):
                line = self.line()
                if isinstance(line, Reply) and not line.ok:
                    why = f"{line.error_code}: {line.error_message}"
            raise Unreachable(f"{self.path}: {why}") from None
        return request_id

    def fileno(self) -> int:
        return self._sock.fileno()

    def receive(self) -> None:
        """Read what the socket holds (once a selector says it is readable)."""
        try:
            data = self._sock.recv(1 << 16)
        except OSError as exc:
            raise Unreachable(f"{self.path}: {exc.strerror or exc}") from None
        if not data:
            raise Unreachable(f"{self.path}: the server closed the connection")
        self._buffer += data
        if len(self._buffer) > MAX_LINE and self._buffer.find(b"\n") < 0:
            raise Unreachable(f"{self.path}: a line longer than {MAX_LINE} bytes")

    def buffered(self) -> Reply | Update | TapLine | None:
        """The next line already read, if a whole one is."""
        if self._buffer.find(b"\n") < 0:
            return None
        return self.line()

    def line(self, deadline: float | None = None) -> Reply | Update | TapLine | None:
        """The next line; None at ``deadline`` (a monotonic time) if one is given."""
        while (end := self._buffer.find(b"\n")) < 0:
            if len(self._buffer) > MAX_LINE:
                raise Unreachable(f"{self.path}: a line longer than {MAX_LINE} bytes")
            wait = self.timeout
            if deadline is not None:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    return None
            self._sock.settimeout(wait)
            try:
                data = self._sock.recv(1 << 16)
            except TimeoutError:
                if deadline is not None:
                    return None
                raise Unreachable(f"{self.path}: no answer within {self.timeout:g} s") from None
            except OSError as exc:
                raise Unreachable(f"{self.path}: {exc.strerror or exc}") from None
            if not data:
                raise Unreachable(f"{self.path}: the server closed the connection")
            self._buffer += data
        raw = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        try:
            return decode_line(raw)
        except Exception as exc:  # orjson's and cattrs' errors alike: not a line we can use
            raise Unreachable(f"{self.path}: unreadable line: {exc}") from None

    def call(self, command: Command) -> Any:
        """The plain JSON result of ``command``; Refused with the server's error."""
        request_id = self.send(command)
        while True:
            reply = self.line()
            if not isinstance(reply, Reply):
                continue  # a watch update or a tap line: not asked for here
            if reply.request_id is None and not reply.ok:
                # Refused at attach (permission_denied, too_many_clients), then closed.
                raise Unreachable(f"{self.path}: {reply.error_code}: {reply.error_message}")
            if reply.request_id != request_id:
                continue
            if not reply.ok:
                raise Refused(reply.error_code, reply.error_message)
            return reply.result

    def call_as(self, command: Command, kind: type[Any]) -> Any:
        return converter.structure(self.call(command), kind)


# ---- the command line --------------------------------------------------------------------------


def _positive(kind: Callable[[str], float]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
        return value

    return parse


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``ctl`` to ``odin``'s subcommands."""
    formatter = argparse.RawDescriptionHelpFormatter
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--socket", type=Path, action="append", default=[], metavar="PATH",
        help="a server's control socket (repeatable); default: every socket in --dir",
    )  # fmt: skip
    common.add_argument(
        "--dir", type=Path, default=None, metavar="DIR",
        help=f"where servers put their sockets (default: {default_directory()})",
    )  # fmt: skip
    common.add_argument("--json", action="store_true", help="print the result as JSON")
    common.add_argument(
        "--timeout", type=_positive(float), default=5.0, metavar="SECONDS",
        help="longest wait for a server's answer (default: 5)",
    )  # fmt: skip
    ctl = commands.add_parser(
        "ctl",
        help="ask running servers through their control sockets (for scripts)",
        description="Ask running Odin servers through their control sockets: a table, or "
        "the control protocol's result with --json (docs/operations/control.md).",
        epilog=EPILOG,
        formatter_class=formatter,
    )
    sub = ctl.add_subparsers(dest="ctl_command", required=True, metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(  # type: ignore[no-any-return]
            name, help=text, description=text, parents=[common], epilog=EPILOG,
            formatter_class=formatter,
        )  # fmt: skip

    command("status", "each server: connections, rates, NATS (a supervisor: its workers)")
    listing = command("connections", "the open connections, sorted and filtered by the server")
    listing.add_argument("--sort", choices=CONNECTION_SORTS, default="age")
    listing.add_argument("--ascending", action="store_true", help="smallest first")
    listing.add_argument("--filter", default="", help="text in the id, peer, user or a channel")
    listing.add_argument("--limit", type=int, default=50, help=f"at most 1 to {MAX_PAGE}")
    channels = command("channels", "the channels: subscribers, rate, last position")
    channels.add_argument("--sort", choices=CHANNEL_SORTS, default="subscribers")
    channels.add_argument("--ascending", action="store_true", help="smallest first")
    channels.add_argument("--filter", default="", help="text in the name")
    channels.add_argument("--limit", type=int, default=50, help=f"at most 1 to {MAX_PAGE}")
    slow = command("slow", "the connections with the most frames queued")
    slow.add_argument("--limit", type=int, default=10, help=f"at most 1 to {MAX_PAGE}")
    inspect = command("inspect", "one connection in full")
    inspect.add_argument("id", help="the connection's id")
    history = command("history", "the per-second figures the server keeps (its last hour)")
    history.add_argument(
        "--seconds", type=int, default=300, help=f"how far back, 1 to {HISTORY_SECONDS}"
    )
    history.add_argument(
        "--step", type=int, default=0, metavar="N",
        help="seconds merged into a row (default: about 30 rows)",
    )  # fmt: skip
    events = command("events", "the server's recent events (its event ring), oldest first")
    events.add_argument("--limit", type=int, default=50, help=f"at most 1 to {MAX_PAGE}")
    events.add_argument(
        "--before", type=int, default=0, metavar="POS",
        help="events older than this position (default: the newest)",
    )  # fmt: skip
    kick = command("kick", "close a connection (needs --socket or --all)")
    kick.add_argument("id", help="the connection's id")
    kick.add_argument("--code", type=int, default=KICKED, help="1000, 1001, 1008, 1011, 4000-4999")
    kick.add_argument("--reason", default="closed by operator", help="at most 120 bytes")
    for name, text in (
        ("drain", "drain: clients are told to reconnect, then the server exits"),
        ("reload", "read the configuration again, as SIGHUP"),
    ):
        command(name, f"{text} (needs --socket or --all)")
    for changing in (kick, sub.choices["drain"], sub.choices["reload"]):
        changing.add_argument(
            "--all", action="store_true", help="every server found in --dir (a host's supervisor)"
        )
    tap = command("tap", "follow the frames a connection or a channel receives, live")
    target = tap.add_mutually_exclusive_group(required=True)
    target.add_argument("--conn", metavar="ID", help="a connection's id")
    target.add_argument("--channel", metavar="NAME", help="a channel name or pattern (BTC.*)")
    tap.add_argument(
        "--rate", type=int, default=50, help=f"frames a second at most, 1 to {TAP_MAX_RATE}"
    )
    tap.add_argument("--count", type=_positive(int), metavar="N", help="stop after N frames")
    tap.add_argument("--seconds", type=_positive(float), metavar="S", help="stop after S seconds")
    return ctl  # type: ignore[no-any-return]


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Carry out ``odin ctl``'s parsed arguments; the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        command = _command(args)
    except ValueError as exc:  # the protocol types' validators: a bad value of an option
        print(f"odin ctl {args.ctl_command}: {exc}", file=err)
        return EX_USAGE
    changing = args.ctl_command in ("kick", "drain", "reload")
    if changing and not args.socket and not args.all:
        print(
            f"odin ctl {args.ctl_command}: changes servers: name --socket PATH or --all", file=err
        )
        return EX_USAGE
    if args.ctl_command == "tap":
        return _tap(args, command, out, err)
    return _Run(args, out, err).many(command)


def _command(args: argparse.Namespace) -> Command | None:
    name = args.ctl_command
    order = {"descending": not getattr(args, "ascending", False)}
    match name:
        case "connections":
            return ListConnections(0, args.limit, args.sort, filter=args.filter, **order)
        case "channels":
            return ListChannels(0, args.limit, args.sort, filter=args.filter, **order)
        case "slow":
            return SlowConsumers(args.limit)
        case "inspect":
            return Inspect(args.id)
        case "history":
            step = args.step or math.ceil(args.seconds / 30)
            return History(args.seconds, step)
        case "events":
            return ListEvents(args.before, args.limit)
        case "kick":
            return Kick(args.id, args.code, args.reason)
        case "drain":
            return Drain()
        case "reload":
            return Reload()
        case "tap":
            return Tap(args.conn or "", args.channel or "", args.rate)
    return None  # status: hello and a snapshot (or a supervisor's workers)


def _targets(args: argparse.Namespace) -> tuple[list[Path], bool]:
    """The sockets to ask, and whether they were named (``--socket``) rather than found."""
    if args.socket:
        return list(args.socket), True
    directory = args.dir if args.dir is not None else default_directory()
    return find_sockets(directory), False


@contextlib.contextmanager
def _links(
    paths: list[Path], named: bool, timeout: float, failed: Callable[[Path, str], None]
) -> Iterator[list[Link]]:
    """Links to ``paths``; a socket found but refusing connections (left by a process that
    died) is passed over, any other failure reported to ``failed``."""
    links: list[Link] = []
    try:
        for path in paths:
            try:
                links.append(Link(path, timeout))
            except Unreachable as exc:
                cause = exc.__cause__
                stale = isinstance(cause, OSError) and cause.errno in (
                    errno.ECONNREFUSED,
                    errno.ENOENT,
                )
                if named or not stale:
                    failed(path, str(exc))
        yield links
    finally:
        for link in links:
            link.close()


class _Run:
    """One command over its targets: results, errors and the exit code."""

    def __init__(self, args: argparse.Namespace, out: TextIO, err: TextIO) -> None:
        self.args = args
        self.out = out
        self.err = err
        self.code = EX_OK
        self.results: list[dict[str, Any]] = []

    def fail(self, path: Path, message: str, code: int = EX_UNREACHABLE, kind: str = "") -> None:
        print(f"odin ctl: {message}", file=self.err)
        self.code = max(self.code, code)
        error = {"code": kind or "unreachable", "message": message}
        self.results.append({"socket": str(path), "error": error})

    def many(self, command: Command | None) -> int:
        args = self.args
        paths, named = _targets(args)
        with _links(paths, named, args.timeout, self.fail) as links:
            if not links and not self.results:
                where = args.dir if args.dir is not None else default_directory()
                print(f"odin ctl: no server found in {where}", file=self.err)
                return EX_UNREACHABLE
            links = self._choose(links, command)
            answered: list[tuple[Link, Any]] = []
            refusals: list[tuple[Link, Refused]] = []
            for link in links:
                try:
                    result = self._ask(link, command)
                except Unreachable as exc:
                    self.fail(link.path, str(exc))
                    continue
                except Refused as exc:
                    refusals.append((link, exc))
                    continue
                answered.append((link, result))
                self.results.append({"socket": str(link.path), "result": result})
            self._refusals(command, answered, refusals)
            if not answered:
                return self.code  # the errors are on stderr
            if args.json:
                document: Any = self.results
                if named and len(paths) == 1:
                    only = self.results[0] if self.results else {}
                    document = only.get("result", only)
                self.out.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
            else:
                self._show(command, answered)
        return self.code

    def _choose(self, links: list[Link], command: Command | None) -> list[Link]:
        """Where a command goes: drain and reload to a host's supervisor and to servers
        alone (a worker's are its supervisor's to give); a connection's command, to the
        server whose id prefix it has when one has it; the rest to every server."""
        if isinstance(command, Drain | Reload) and not self.args.socket:
            return [link for link in links if link.identity.supervisor_pid is None]
        conn = command.conn if isinstance(command, Inspect | Kick) else ""
        if conn:
            owner = [link for link in links if conn.startswith(f"{link.identity.instance}-")]
            if owner:
                return owner
        if command is not None and not isinstance(command, Drain | Reload):
            # A supervisor serves no clients: it has nothing to list.
            return [link for link in links if link.identity.role != "supervisor"] or links
        return links

    def _ask(self, link: Link, command: Command | None) -> Any:
        if command is not None:
            return link.call(command)
        hello = converter.unstructure(link.identity)
        if link.identity.role == "supervisor":
            return {"hello": hello, "workers": link.call(Workers())}
        return {"hello": hello, "snapshot": link.call(SnapshotRequest())}

    def _refusals(
        self, command: Command | None, answered: list[Any], refusals: list[tuple[Link, Refused]]
    ) -> None:
        # A connection is on one server: the others' not_found is no error when one had it.
        if isinstance(command, Inspect | Kick) and answered:
            refusals = [(link, exc) for link, exc in refusals if exc.code != "not_found"]
        elif isinstance(command, Inspect | Kick) and refusals:
            refusals = refusals[:1] if all(e.code == "not_found" for _, e in refusals) else refusals
        for link, exc in refusals:
            self.fail(link.path, f"{link.path}: {exc}", EX_REFUSED, exc.code)

    # ---- tables ----------------------------------------------------------------------------

    def _show(self, command: Command | None, answered: list[tuple[Link, Any]]) -> None:
        several = len(answered) > 1
        for link, result in answered:
            if several and command is not None:
                ident = link.identity
                print(f"# {link.path} (pid {ident.pid}, instance {ident.instance})", file=self.out)
            match command:
                case None:
                    continue
                case ListConnections() | SlowConsumers():
                    self._connections(result)
                case ListChannels():
                    self._channels(result)
                case Inspect():
                    self._inspect(result)
                case History():
                    self._history(converter.structure(result, RateHistory))
                case ListEvents():
                    self._events(converter.structure(result, EventPage))
                case _:
                    print(_plain(result), file=self.out)
        if command is None:
            self._status(answered)

    def _status(self, answered: list[tuple[Link, Any]]) -> None:
        rows = []
        for link, result in answered:
            ident = link.identity
            if "workers" in result:
                host = converter.structure(result["workers"], HostWorkers)
                rows.append([
                    str(ident.pid), "supervisor", ident.version, "-",
                    f"{host.up}/{host.expected} workers up", "-", "-", "-", "-", str(link.path),
                ])  # fmt: skip
                continue
            snap = converter.structure(result["snapshot"], Snapshot)
            role = "worker" if ident.worker is not None else "server"
            if ident.worker is not None:
                role = f"worker {ident.worker}"
            rows.append([
                str(ident.pid), role, ident.version, ident.instance,
                f"{snap.connections}/{snap.max_connections}", f"{snap.in_per_s:.0f}",
                f"{snap.out_per_s:.0f}", "up" if snap.nats.connected else "DOWN",
                "yes" if snap.draining else "no", str(link.path),
            ])  # fmt: skip
        headers = ["pid", "role", "version", "instance", "connections", "in/s", "out/s",
                   "nats", "draining", "socket"]  # fmt: skip
        _table(self.out, headers, rows)

    def _connections(self, page: Any) -> None:
        rows = [
            [c["id"], c["peer"], c["user"] or "-", ",".join(c["channels"]) or "-",
             str(c["queued"]), f"{c['queued_age']:.1f}", str(c["sent"]), str(c["dropped"]),
             f"{c['age']:.0f}"]
            for c in page["items"]
        ]  # fmt: skip
        headers = ["id", "peer", "user", "channels", "queued", "q.age", "sent", "dropped", "age"]
        _table(self.out, headers, rows)
        print(f"{len(rows)} of {page['total']}", file=self.out)

    def _channels(self, page: Any) -> None:
        rows = [
            [c["name"], str(c["subscribers"]), f"{c['rate']:.1f}", str(c["last_seq"]),
             str(c["retained"])]
            for c in page["items"]
        ]  # fmt: skip
        _table(self.out, ["channel", "subscribers", "rate/s", "last_seq", "retained"], rows)
        print(f"{len(rows)} of {page['total']}", file=self.out)

    def _inspect(self, detail: Any) -> None:
        connection = dict(detail["connection"])
        for key, value in [*connection.items(), *list(detail.items())[1:]]:
            shown = ", ".join(value) if isinstance(value, list) else value
            print(f"{key:>14}  {shown}", file=self.out)

    def _history(self, history: RateHistory) -> None:
        rows = [
            [clock(history.time[i]), f"{history.in_per_s[i]:.0f}",
             f"{history.out_per_s[i]:.0f}", str(history.connections[i]),
             str(history.dropped[i]), str(history.gaps[i]), str(history.recovered[i]),
             str(history.not_recovered[i])]
            for i in range(len(history.time))
        ]  # fmt: skip
        headers = ["time", "in/s", "out/s", "connections", "dropped", "gaps", "recovered",
                   "not_recovered"]  # fmt: skip
        _table(self.out, headers, rows)
        span = history.interval * history.step
        print(f"{len(rows)} rows of {span:g} s (the server keeps {history.capacity} s)",
              file=self.out)  # fmt: skip

    def _events(self, page: EventPage) -> None:
        if not page.events:
            print("no events", file=self.out)
            return
        rows = [
            [str(event.seq), clock(event.time, millis=True), event.kind, event.conn or "-",
             " ".join(f"{key}={value}" for key, value in event.detail.items())]
            for event in page.events
        ]  # fmt: skip
        _table(self.out, ["pos", "time", "kind", "conn", "detail"], rows)
        older = f"older: --before {page.events[0].seq}" if page.more else "no older events"
        print(f"{len(rows)} events; {older}", file=self.out)


def _plain(result: Any) -> str:
    """A small result (kick, drain, reload) as ``key: value`` words."""
    if not isinstance(result, dict):
        return str(result)
    parts = []
    for key, value in result.items():
        shown = ", ".join(map(str, value)) or "-" if isinstance(value, list) else value
        parts.append(f"{key}: {shown}")
    return "  ".join(parts)


def _table(out: TextIO, headers: list[str], rows: list[list[str]]) -> None:
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]
    for row in [headers, *rows]:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(),
            file=out,
        )


# ---- tap -------------------------------------------------------------------------------------


def _tap(args: argparse.Namespace, command: Command | None, out: TextIO, err: TextIO) -> int:
    assert isinstance(command, Tap)
    paths, named = _targets(args)
    problems: list[str] = []
    with _links(paths, named, args.timeout, lambda _, m: problems.append(m)) as links:
        for problem in problems:
            print(f"odin ctl: {problem}", file=err)
        servers = [link for link in links if link.identity.role != "supervisor"]
        if command.conn:
            owner = [s for s in servers if command.conn.startswith(f"{s.identity.instance}-")]
            servers = owner or servers
        if not servers:
            print("odin ctl: no server found to tap", file=err)
            return EX_UNREACHABLE
        if command.conn and len(servers) > 1:
            found = ", ".join(str(link.path) for link in servers)
            print(f"odin ctl tap: several servers ({found}): name one with --socket", file=err)
            return EX_USAGE
        # A channel is served by every server of the host (each worker has its own clients):
        # it is tapped on each, and their lines merged as they come.
        taps: dict[Link, int] = {}
        try:
            for link in servers:
                started = link.call(command)
                taps[link] = started["tap"]
                if not args.json:
                    what = f"connection {command.conn}" if command.conn else command.channel
                    print(f"# tapping {what} on {link.path} (tap {started['tap']})", file=out)
            _follow(taps, args, out)
        except Unreachable as exc:
            print(f"odin ctl: {exc}", file=err)
            return EX_UNREACHABLE
        except Refused as exc:  # refused when asked: the last server asked
            print(f"odin ctl: {link.path}: {exc}", file=err)
            return EX_REFUSED
        except KeyboardInterrupt:
            return EX_OK
    return EX_OK


def _follow(taps: dict[Link, int], args: argparse.Namespace, out: TextIO) -> None:
    """Print the taps' lines, as they come from any server, until ``--count`` frames in
    all, ``--seconds``, or the end of every tap."""
    deadline = None if args.seconds is None else time.monotonic() + args.seconds
    frames = 0
    with selectors.DefaultSelector() as selector:
        for link in taps:
            selector.register(link, selectors.EVENT_READ, link)
        while taps and (args.count is None or frames < args.count):
            for link, line in _ready_lines(taps):
                if not isinstance(line, TapLine) or line.tap != taps.get(link):
                    continue
                if args.json:
                    document = {"stream": "tap", "socket": str(link.path)}
                    document.update(converter.unstructure(line))
                    out.write(orjson.dumps(document).decode() + "\n")
                else:
                    out.write(tap_text(line, conn=True) + "\n")
                out.flush()
                if line.closed is not None:  # a tapped connection's end: that tap is over
                    del taps[link]
                    selector.unregister(link)
                    continue
                frames += 1
                if args.count is not None and frames >= args.count:
                    return
            # Without --seconds a tap may be quiet for long: no timeout then, only the end.
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                return
            for key, _ in selector.select(wait):
                key.data.receive()


def _ready_lines(taps: dict[Link, int]) -> Iterator[tuple[Link, Reply | Update | TapLine]]:
    """Every whole line already read, link by link."""
    for link in list(taps):
        while link in taps and (line := link.buffered()) is not None:
            yield link, line


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """``python -m odin_fanout.ctl``: the same as ``odin ctl``, without loading the server."""
    parser = argparse.ArgumentParser(prog="odin")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["ctl", *(argv if argv is not None else sys.argv[1:])]), out, err)


if __name__ == "__main__":
    sys.exit(main())
