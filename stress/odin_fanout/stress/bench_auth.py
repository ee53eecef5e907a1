"""What tokens and TLS cost a connection: the time to check one token per algorithm, and the
rate at which an ``odin serve`` process accepts connections (upgrade to ``hello``) plain,
with a token, over TLS, and both.

Usage: ``.venv/bin/python -m odin_fanout.stress.bench_auth [--tokens 2000] [--connections 1000]
[--concurrency 50]``

Part 1 checks ``--tokens`` tokens per algorithm with Odin's ``Verifier`` (PyJWT underneath)
in this process: µs per token. Part 2 starts ``odin serve --broker memory --workers 1`` per
configuration (a trustme CA for TLS, HS256 or RS256 tokens in the ``Authorization`` header),
opens ``--connections`` connections, ``--concurrency`` at a time, each reading its ``hello``
and closing, and reports connections per second and the server's CPU per connection
(``/proc/PID/stat``). The server is stopped by its PID after each configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jwt
import trio
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from trio_websocket import open_websocket_url

from odin_fanout.config import AuthSection
from odin_fanout.server.tokens import Verifier, load_keys
from odin_fanout.stress.bench_workers import Service
from odin_fanout.stress.procstat import proc_cpu_seconds as _cpu_seconds

SECRET = "a-benchmark-secret-of-at-least-32-bytes"


def _pem(public: Any) -> bytes:
    return bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _keys() -> dict[str, tuple[Any, AuthSection, Path | None]]:
    """Per algorithm: the signing key, Odin's settings to check it, a PEM file to delete."""
    made: dict[str, tuple[Any, AuthSection, Path | None]] = {
        "HS256": (SECRET, AuthSection(hmac_secret=SECRET), None)
    }
    for name, private in (
        ("RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("ES256", ec.generate_private_key(ec.SECP256R1())),
        ("EdDSA", ed25519.Ed25519PrivateKey.generate()),
    ):
        handle, path = tempfile.mkstemp(suffix=".pem")
        os.write(handle, _pem(private.public_key()))
        os.close(handle)
        made[name] = (private, AuthSection(public_key_file=path), Path(path))
    return made


def verify_costs(count: int) -> list[tuple[str, float]]:
    rows = []
    for algorithm, (key, settings, path) in _keys().items():
        verifier = Verifier(settings, load_keys(settings))
        tokens = [
            jwt.encode(
                {"sub": f"u{n}", "channels": ["BTC.*"], "exp": int(time.time()) + 600},
                key,
                algorithm,
            )
            for n in range(count)
        ]
        started = time.process_time()
        for token in tokens:
            verifier.verify(token)
        rows.append((algorithm, 1e6 * (time.process_time() - started) / count))
        if path is not None:
            path.unlink()
    return rows


async def _connect_all(
    url: str, count: int, concurrency: int, headers: list[tuple[bytes, bytes]],
    context: ssl.SSLContext | None,
) -> float:  # fmt: skip
    """Seconds to open ``count`` connections (each until its hello), ``concurrency`` at once."""
    limiter = trio.CapacityLimiter(concurrency)

    async def one() -> None:
        async with (
            limiter,
            open_websocket_url(
                url, extra_headers=headers, subprotocols=["odin.v1"], ssl_context=context
            ) as ws,
        ):
            await ws.get_message()

    started = time.perf_counter()
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(one)
    return time.perf_counter() - started


def accept_rates(args: argparse.Namespace, directory: Path) -> list[dict[str, Any]]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    chain, key_file = directory / "cert.pem", directory / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
    cert.private_key_pem.write_to_path(str(key_file))
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = directory / "rsa.pem"
    public.write_bytes(_pem(rsa_key.public_key()))
    exp = int(time.time()) + 3600
    tokens = {
        "HS256": jwt.encode({"sub": "bench", "exp": exp}, SECRET, "HS256"),
        "RS256": jwt.encode({"sub": "bench", "exp": exp}, rsa_key, "RS256"),
    }
    tls_settings = ["--set", f"server.tls_cert={chain}", "--set", f"server.tls_key={key_file}"]
    configurations: list[tuple[str, list[str], str | None, bool]] = [
        ("plain", [], None, False),
        ("HS256 token", ["--set", f"auth.hmac_secret={SECRET}"], "HS256", False),
        ("RS256 token", ["--set", f"auth.public_key_file={public}"], "RS256", False),
        ("TLS", tls_settings, None, True),
        ("TLS + RS256 token", [*tls_settings, "--set", f"auth.public_key_file={public}"],
         "RS256", True),
    ]  # fmt: skip
    rows = []
    for name, settings, algorithm, tls in configurations:
        command = [sys.executable, "-m", "odin_fanout", "serve", "--port", "0", "--workers", "1",
                   "--broker", "memory", "--log-format", "json", *settings]  # fmt: skip
        odin = Service("odin", command, directory)
        try:
            url = json.loads(odin.wait_line(r'"event": ?"listening"', 30).string)["websocket"][0]
            headers = (
                [(b"Authorization", f"Bearer {tokens[algorithm]}".encode())] if algorithm else []
            )
            before = _cpu_seconds(odin.pid)
            seconds = trio.run(
                _connect_all,
                url,
                args.connections,
                args.concurrency,
                headers,
                client_tls if tls else None,
            )
            cpu = _cpu_seconds(odin.pid) - before
        finally:
            odin.stop(15)
        rows.append({"name": name, "rate": args.connections / seconds,
                     "cpu_ms": 1000 * cpu / args.connections})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    print(f"{platform.node()}: {os.cpu_count()} CPUs, {platform.machine()}, "
          f"{platform.platform()}, Python {platform.python_version()}\n")  # fmt: skip
    print("| algorithm | µs to check one token (Odin's Verifier, PyJWT) |")
    print("|---|---:|")
    for algorithm, micros in verify_costs(args.tokens):
        print(f"| {algorithm} | {micros:.1f} |")
    with tempfile.TemporaryDirectory(prefix="bench-auth-") as directory:
        rows = accept_rates(args, Path(directory))
    print(f"\n{args.connections} connections, {args.concurrency} at a time, each until its hello")
    print("\n| connection | connections/s | server CPU ms per connection |")
    print("|---|---:|---:|")
    for row in rows:
        print(f"| {row['name']} | {row['rate']:,.0f} | {row['cpu_ms']:.2f} |")


if __name__ == "__main__":
    main()
