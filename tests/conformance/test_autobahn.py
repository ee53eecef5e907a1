"""RFC 6455 conformance of Odin's WebSocket layer, checked by Autobahn|Testsuite.

The fuzzing client (``wstest -m fuzzingclient``) runs cases 1.* to 10.* against the echo
server in ``tests.conformance.echo_server``, which is built from Odin's own connection pieces.
12.* and 13.* (permessage-deflate) are left out: trio-websocket does not negotiate compression,
so they are all UNIMPLEMENTED.

The run passes when no case is FAILED (NON-STRICT and INFORMATIONAL are accepted, as in
wsproto's own CI), every close behaviour is OK or INFORMATIONAL, and the echo server is still
up at the end.

wstest is Python 2.7 only. It is found through ``AUTOBAHN_WSTEST`` or at
``.ci/cache/autobahn/py2env/bin/wstest``, which ``.ci/autobahn-setup.sh`` installs; without
it the test skips.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_WSTEST = REPO_ROOT / ".ci" / "cache" / "autobahn" / "py2env" / "bin" / "wstest"
AGENT = "odin"
CASES = [f"{number}.*" for number in range(1, 11)]
MIN_CASES = 250  # cases 1-10 are 301 in autobahntestsuite 25.10.1
PASSING_CLOSE = {"OK", "INFORMATIONAL"}

LISTEN_TIMEOUT = 30.0
WSTEST_TIMEOUT = 480.0
STOP_TIMEOUT = 10.0


def _find_wstest() -> Path | None:
    configured = os.environ.get("AUTOBAHN_WSTEST")
    candidate = Path(configured) if configured else DEFAULT_WSTEST
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    return None


def _read_listening_port(server: subprocess.Popen[bytes], timeout: float) -> int:
    """Read the server's first stdout line, ``{"event": "listening", "port": N}``."""
    assert server.stdout is not None
    fd = server.stdout.fileno()
    buffer = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while b"\n" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"echo server did not report listening in {timeout} s")
            if not selector.select(remaining):
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError(f"echo server exited before listening (rc {server.wait()})")
            buffer += chunk
    line = buffer.split(b"\n", 1)[0]
    event = json.loads(line)
    assert event.get("event") == "listening", line
    return int(event["port"])


def _stop(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM the process we started, by its PID; SIGKILL it if it does not stop."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            return process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
    return process.wait()


def _write_spec(directory: Path, port: int) -> Path:
    spec = {
        # Stricter than the fuzzingclient default (False): a TCP drop without a clean close
        # handshake fails the case.
        "options": {"failByDrop": True},
        "outdir": str(directory / "reports" / "servers"),
        "servers": [{"agent": AGENT, "url": f"ws://127.0.0.1:{port}/"}],
        "cases": CASES,
        "exclude-cases": [],
        "exclude-agent-cases": {},
    }
    path = directory / "fuzzingclient.json"
    path.write_text(json.dumps(spec, indent=2))
    return path


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return "(no output)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _case_details(report_dir: Path, case_id: str, entry: dict[str, Any]) -> str:
    """One failing case as the Autobahn report explains it."""
    text = (
        f"{case_id}: behavior={entry['behavior']} behaviorClose={entry['behaviorClose']} "
        f"remoteCloseCode={entry['remoteCloseCode']}"
    )
    report_file = report_dir / entry["reportfile"]
    if report_file.exists():
        report = json.loads(report_file.read_text())
        text += (
            f"\n    description: {report.get('description')}"
            f"\n    expectation: {report.get('expectation')}"
            f"\n    result: {report.get('result')}"
            f"\n    resultClose: {report.get('resultClose')}"
        )
    return text


def _case_key(case_id: str) -> tuple[int, ...]:
    return tuple(int(part) for part in case_id.split("."))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_autobahn_fuzzingclient_cases_1_to_10(tmp_path: Path) -> None:
    wstest = _find_wstest()
    if wstest is None:
        where = os.environ.get("AUTOBAHN_WSTEST") or str(DEFAULT_WSTEST.relative_to(REPO_ROOT))
        pytest.skip(
            f"Autobahn|Testsuite (wstest) not found at {where}: run .ci/autobahn-setup.sh (it "
            "needs Python 2.7, e.g. pyenv 2.7.18) or set AUTOBAHN_WSTEST to a wstest executable"
        )

    server_log = tmp_path / "echo-server.log"
    wstest_log = tmp_path / "wstest.log"
    with (
        server_log.open("wb") as server_err,
        subprocess.Popen(
            [sys.executable, "-m", "tests.conformance.echo_server", "--port", "0"],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=server_err,
        ) as server,
    ):
        try:
            port = _read_listening_port(server, LISTEN_TIMEOUT)
            spec = _write_spec(tmp_path, port)
            with wstest_log.open("wb") as wstest_out:
                started = time.monotonic()
                try:
                    result = subprocess.run(
                        [str(wstest), "-m", "fuzzingclient", "-s", str(spec)],
                        cwd=tmp_path,
                        stdin=subprocess.DEVNULL,
                        stdout=wstest_out,
                        stderr=subprocess.STDOUT,
                        timeout=WSTEST_TIMEOUT,
                        check=False,
                    )
                except subprocess.TimeoutExpired:
                    pytest.fail(
                        f"wstest did not finish in {WSTEST_TIMEOUT} s; its output ends:\n"
                        f"{_tail(wstest_log)}"
                    )
                elapsed = time.monotonic() - started
            assert result.returncode == 0, f"wstest rc {result.returncode}:\n{_tail(wstest_log)}"
            assert server.poll() is None, (
                f"the echo server died during the run (rc {server.returncode}):\n"
                f"{_tail(server_log)}"
            )
        finally:
            rc = _stop(server)
    assert rc == 0, f"echo server exited with rc {rc} on SIGTERM:\n{_tail(server_log)}"
    # The server survives any one connection's error by catching it; an unexpected one (not
    # ConnectionClosed or a broken stream) is still a bug in the layer, so none may be logged.
    errors = [line for line in server_log.read_text().splitlines() if '"conn_error"' in line]
    assert not errors, f"{len(errors)} unexpected connection errors:\n" + "\n".join(errors[:5])

    indexes = sorted((tmp_path / "reports").rglob("index.json"))
    assert indexes, f"wstest wrote no index.json; its output ends:\n{_tail(wstest_log)}"
    index = json.loads(indexes[0].read_text())
    results: dict[str, dict[str, Any]] = index.get(AGENT, {})
    behaviors = Counter(entry["behavior"] for entry in results.values())
    closes = Counter(entry["behaviorClose"] for entry in results.values())
    summary = (
        f"Autobahn cases 1-10: {len(results)} run in {elapsed:.1f} s; "
        f"behavior {dict(sorted(behaviors.items()))}; "
        f"behaviorClose {dict(sorted(closes.items()))}"
    )
    print(summary)

    assert len(results) > MIN_CASES, f"too few cases ran: {summary}"
    report_dir = indexes[0].parent
    failed = sorted((c for c, e in results.items() if e["behavior"] == "FAILED"), key=_case_key)
    assert not failed, f"{len(failed)} FAILED cases: {', '.join(failed)}\n{summary}\n" + "\n".join(
        _case_details(report_dir, case_id, results[case_id]) for case_id in failed
    )
    bad_close = sorted(
        (c for c, e in results.items() if e["behaviorClose"] not in PASSING_CLOSE), key=_case_key
    )
    assert not bad_close, (
        f"{len(bad_close)} cases closed badly: {', '.join(bad_close)}\n{summary}\n"
        + "\n".join(_case_details(report_dir, case_id, results[case_id]) for case_id in bad_close)
    )
