"""TLS and credentials for the connections to NATS (``link.py``'s and nats-py's): the client's
TLS context, and what CONNECT carries for a ``.creds`` file (user JWT + NKey seed) or an NKey
seed alone (https://docs.nats.io/reference/reference-protocols/nats-protocol#connect).

Pure but for reading the files (at each connection, so rotated credentials are picked up) and
the ``ssl`` and ``nkeys`` libraries; no trio, no asyncio.
"""

from __future__ import annotations

import base64
import re
import ssl
from pathlib import Path

import attrs
import nkeys

from odin_fanout.config import NatsSection

_BLOCK = re.compile(
    r"-{3,}[^\n]*BEGIN[^\n]*-{3,}\r?\n\s*([\w\-.=]+)\s*\r?\n-{3,}[^\n]*END[^\n]*-{3,}"
)


class CredentialsError(Exception):
    """A credentials file that cannot be used."""


def parse_creds(text: str) -> tuple[str, bytes]:
    """A ``.creds`` file's user JWT and NKey seed (its first two ``-----BEGIN ...-----``
    blocks, in that order, as ``nsc`` writes them)."""
    blocks = _BLOCK.findall(text)
    if len(blocks) < 2:
        raise CredentialsError("expected a user JWT block and an NKey seed block")
    return blocks[0], blocks[1].encode()


def parse_seed(text: str) -> bytes:
    """An NKey seed file: the seed alone (``SU...``), or a ``.creds``-style seed block."""
    blocks = _BLOCK.findall(text)
    seed = blocks[-1] if blocks else text.strip()
    if not seed.startswith("S"):
        raise CredentialsError("expected an NKey seed (SU...)")
    return seed.encode()


def sign_nonce(seed: bytes, nonce: str) -> tuple[str, str]:
    """The signature of the server's nonce (base64url, no padding) and the seed's public key."""
    try:
        pair = nkeys.from_seed(bytearray(seed))
        signature = pair.sign(nonce.encode())
        public = pair.public_key.decode()
    except nkeys.NkeysError as exc:
        raise CredentialsError(f"invalid NKey seed: {exc!r}") from None
    return base64.urlsafe_b64encode(signature).rstrip(b"=").decode(), public


@attrs.frozen
class Security:
    """What every connection to NATS needs beyond the URL's user, password or token."""

    context: ssl.SSLContext | None = None
    """The client TLS context (None: plain, unless the server requires TLS: then a default
    one is made)."""
    always_tls: bool = False
    """TLS whatever the server's INFO says (``nats.tls_ca`` set); ``tls://`` URLs too."""
    server_name: str = ""
    creds: str = ""
    nkey_seed: str = ""

    @classmethod
    def from_settings(cls, settings: NatsSection) -> Security:
        return cls(
            context=tls_context(settings),
            always_tls=bool(settings.tls_ca),
            server_name=settings.tls_server_name,
            creds=settings.creds,
            nkey_seed=settings.nkey_seed,
        )

    def client_context(self) -> ssl.SSLContext:
        return self.context if self.context is not None else ssl.create_default_context()

    def connect_fields(self, nonce: str | None) -> dict[str, str]:
        """CONNECT's ``jwt`` + ``sig`` (creds) or ``nkey`` + ``sig`` (an NKey seed)."""
        if self.creds:
            jwt, seed = parse_creds(_read(self.creds))
            return {"jwt": jwt, "sig": sign_nonce(seed, _nonce(nonce))[0]}
        if self.nkey_seed:
            signature, public = sign_nonce(parse_seed(_read(self.nkey_seed)), _nonce(nonce))
            return {"nkey": public, "sig": signature}
        return {}


def tls_context(settings: NatsSection) -> ssl.SSLContext | None:
    """The client TLS context the settings describe: None when they set nothing of TLS."""
    if not (settings.tls or settings.tls_cert):
        return None
    context = ssl.create_default_context(cafile=_path(settings.tls_ca) or None)
    if settings.tls_cert:
        context.load_cert_chain(_path(settings.tls_cert), _path(settings.tls_key))
    return context


def _nonce(nonce: str | None) -> str:
    if not nonce:
        raise CredentialsError("the server sent no nonce to sign (is it set up for NKeys?)")
    return nonce


def _path(name: str) -> str:
    return str(Path(name).expanduser()) if name else ""


def _read(name: str) -> str:
    try:
        return Path(name).expanduser().read_text()
    except OSError as exc:
        raise CredentialsError(f"{name}: {exc.strerror or exc}") from None
