"""docs/clients.md's examples work as printed: each block marked ``<!-- run: python ... -->``
or ``<!-- run: sh ... -->`` right before its fence is run as a user would run it (a copy in
a file of its own, the interpreter or the shell, the URL pointed at a real ``odin serve``),
and its output must match what the marker's ``expect="REGEX"`` says (then it is stopped).
With ``exits`` it must also end by itself, with status 0. With ``kick`` its connections are
closed by the operator (the control socket's ``kick``) once it has printed what it was
expected to: it must come back, recover, and go on without a gap. A ``sh`` block runs only
when the commands it needs (``curl``, ``websocat``) are installed.

The server: the in-memory broker with the simulator publishing BTC and ETH trades,
``POST /api/publish`` on with an API key (``$ODIN_PUBLISH_KEY`` in the shell blocks), and
an HMAC key so that a token it cannot verify is refused.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.e2e.process import OdinProcess, odin_process, port_of

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "clients.md"
DOC_ADDRESS = "127.0.0.1:3002"
"""Where the examples point; replaced by the test server's address."""
PUBLISH_KEY = "docs-example-publish-key-0123456789"
SECRET = "a-docs-test-secret-of-at-least-32-bytes"
TIMEOUT = 30.0

MARKED = re.compile(
    r"^<!-- run: (?P<kind>python|sh)(?P<options>[^\n]*?)-->\n```(?P<fence>\w*)\n(?P<code>.*?)^```",
    re.MULTILINE | re.DOTALL,
)
OPTION = re.compile(r'(\w+)(?:="([^"]*)")?')
EVENT_LINE = re.compile(r"^(?P<channel>[A-Z0-9_-]+\.[a-z]+) (?P<seq>\d+) (?P<prev>\d+) ", re.M)
GAP_WORDS = ("missed", "not recovered")


@attrs.frozen
class Example:
    kind: str
    code: str
    line: int
    expect: str
    kick: bool
    exits: bool

    @property
    def name(self) -> str:
        return f"{self.kind}-line-{self.line}"


def examples() -> list[Example]:
    text = DOC.read_text()
    found = []
    for match in MARKED.finditer(text):
        options = {key: value for key, value in OPTION.findall(match["options"])}
        fence = match["fence"]
        assert fence == ("python" if match["kind"] == "python" else "sh"), fence
        assert "expect" in options, f"line {text.count(chr(10), 0, match.start()) + 1}: expect="
        found.append(
            Example(
                kind=match["kind"],
                code=match["code"],
                line=text.count("\n", 0, match.start()) + 2,
                expect=options["expect"],
                kick="kick" in options,
                exits="exits" in options,
            )
        )
    return found


EXAMPLES = examples()


def test_the_page_has_examples_to_run() -> None:
    kinds = [(e.kind, e.kick) for e in EXAMPLES]
    assert kinds.count(("python", True)) >= 2  # the client, and the raw WebSocket one
    assert ("sh", False) in kinds  # curl


@attrs.define
class Server:
    odin: OdinProcess
    port: int
    control: str


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with tempfile.TemporaryDirectory(prefix="odin-docs-") as state:
        control = str(Path(state) / "odin.sock")
        settings = [
            "publish.enabled=true",
            f"publish.api_keys={PUBLISH_KEY}",
            f"auth.hmac_secret={SECRET}",
            f"control.path={control}",
        ]
        args = ["serve", "--port", "0", "--broker", "memory", "--simulate", "--rate", "40",
                "--tokens", "BTC,ETH"]  # fmt: skip
        args += [arg for setting in settings for arg in ("--set", setting)]
        with odin_process(args) as odin:
            odin.follow()  # a line per connection: the pipe must never fill
            port = port_of(odin.wait_for("listening"))
            odin.wait_for("control_listening")
            yield Server(odin, port, control)


def ask(path: str, request: dict[str, Any]) -> dict[str, Any]:
    """One command on the server's control socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(5)
        conn.connect(path)
        conn.sendall(json.dumps({"id": 1, **request}).encode() + b"\n")
        buffer = b""
        while b"\n" not in buffer:
            chunk = conn.recv(65536)
            assert chunk, "the control socket closed"
            buffer += chunk
    reply: dict[str, Any] = json.loads(buffer.partition(b"\n")[0])
    assert reply.get("ok"), reply
    return reply


def connection_ids(server: Server) -> set[str]:
    result = ask(server.control, {"cmd": "connections", "limit": 500})["result"]
    return {item["id"] for item in result["items"]}


class Output:
    """A running example's output (stdout and stderr), read as it comes."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        self.process = process
        self.text = ""
        os.set_blocking(process.stdout.fileno(), False)

    def read(self, timeout: float) -> bool:
        """Read what is there within ``timeout``; False once the output has ended."""
        stdout = self.process.stdout
        assert stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                return True
        chunk = stdout.read(65536)
        if not chunk:
            return False
        self.text += chunk.decode(errors="replace")
        return True

    def wait_for(self, pattern: str, start: int = 0, timeout: float = TIMEOUT) -> re.Match[str]:
        """The first match of ``pattern`` in the output from ``start``, reading until it comes."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.text[start:], re.MULTILINE | re.DOTALL)
            if match is not None:
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no {pattern!r} within {timeout}s; the output:\n{self.text[-3000:]}")
            if not self.read(min(remaining, 0.2)):
                match = re.search(pattern, self.text[start:], re.MULTILINE | re.DOTALL)
                if match is None:
                    pytest.fail(f"ended without {pattern!r}; the output:\n{self.text[-3000:]}")
                return match

    def finish(self, timeout: float = TIMEOUT) -> int:
        """Read to the end and wait for the exit."""
        deadline = time.monotonic() + timeout
        while self.read(max(0.0, min(0.2, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                pytest.fail(f"did not exit within {timeout}s; the output:\n{self.text[-3000:]}")
        return self.process.wait(timeout=max(0.1, deadline - time.monotonic()))


def needed_commands(code: str) -> list[str]:
    """The programs a shell block runs that may not be installed."""
    return [name for name in ("curl", "websocat") if re.search(rf"\b{name}\b", code)]


def command(example: Example, directory: Path) -> list[str]:
    if example.kind == "python":
        path = directory / "example.py"
        path.write_text(example.code)
        return [sys.executable, "-u", str(path)]
    missing = [name for name in needed_commands(example.code) if shutil.which(name) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed")
    path = directory / "example.sh"
    path.write_text("set -eu\n" + example.code)
    return ["sh", str(path)]


def kick_everyone(server: Server) -> set[str]:
    """Close every open connection as an operator does; their ids."""
    ids = connection_ids(server)
    assert ids, "the example has no connection to kick"
    for conn in ids:
        ask(server.control, {"cmd": "kick", "conn": conn})
    return ids


def wait_for_new_connection(server: Server, old: set[str]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not connection_ids(server) - old:
        if time.monotonic() > deadline:
            pytest.fail("the example did not connect again")
        time.sleep(0.05)  # another process's connections: polled, bounded


def linked(output: str) -> list[str]:
    """Events printed as ``CHANNEL SEQ PREV ...``: per channel, each ``prev`` is the ``seq``
    printed before (the problems found)."""
    last: dict[str, int] = {}
    problems = []
    for match in EVENT_LINE.finditer(output):
        channel, seq, prev = match["channel"], int(match["seq"]), int(match["prev"])
        if channel in last and prev != last[channel]:
            problems.append(f"{channel} {seq}: prev {prev}, but {last[channel]} came before")
        last[channel] = seq
    return problems


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.name)
def test_the_example_runs(example: Example, server: Server, tmp_path: Path) -> None:
    code = example.code.replace(DOC_ADDRESS, f"127.0.0.1:{server.port}")
    example = attrs.evolve(example, code=code)
    environment = {**os.environ, "ODIN_PUBLISH_KEY": PUBLISH_KEY, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command(example, tmp_path),
        cwd=tmp_path,
        env=environment,
        stdin=subprocess.PIPE,  # open until the end: `cat` in a pipeline waits on it
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output = Output(process)
    try:
        first = output.wait_for(example.expect)
        if example.kick:
            kicked = kick_everyone(server)
            seen = first.end()
            wait_for_new_connection(server, kicked)
            # What it printed since must show live events again (the pattern, twice over).
            output.wait_for(f"(?:{example.expect}).*(?:{example.expect})", start=seen)
            assert not [w for w in GAP_WORDS if w in output.text], output.text[-3000:]
            assert linked(output.text) == []
        if example.exits:
            assert output.finish() == 0, output.text[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        assert process.stdin is not None
        process.stdin.close()
        assert process.stdout is not None
        process.stdout.close()
