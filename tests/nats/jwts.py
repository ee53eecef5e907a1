"""An operator, its accounts and a user, as ``nsc`` would make them: NATS JWTs signed with
NKeys, for a nats-server in operator (decentralised JWT) mode. Hand-made because ``nsc`` is a
Go tool that is not on the machine; the format is nats-io/jwt v2's: a JSON header
``{"typ":"JWT","alg":"ed25519-nkey"}``, claims whose ``jti`` is the base32 SHA-512/256 of the
claims without it, and the issuer's Ed25519 signature of ``header.claims``, all base64url."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import attrs
import nkeys

UNLIMITED = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
             "wildcards": True, "conn": -1, "leaf": -1}  # fmt: skip
JETSTREAM = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@attrs.frozen
class Identity:
    seed: bytes
    public: str

    @classmethod
    def new(cls, prefix: int) -> Identity:
        seed = nkeys.encode_seed(os.urandom(32), prefix)
        return cls(seed, nkeys.from_seed(seed).public_key.decode())

    def sign_jwt(self, subject: str, name: str, nats: dict[str, Any]) -> str:
        """A JWT about ``subject`` issued (signed) by this identity."""
        claims: dict[str, Any] = {"iat": int(time.time()), "iss": self.public, "name": name,
                                  "sub": subject, "nats": {**nats, "version": 2}}  # fmt: skip
        unsigned = json.dumps(claims, separators=(",", ":"), sort_keys=True).encode()
        digest = hashlib.new("sha512_256", unsigned).digest()
        claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
        header = _b64(b'{"typ":"JWT","alg":"ed25519-nkey"}')
        body = _b64(json.dumps(claims).encode())
        signature = nkeys.from_seed(self.seed).sign(f"{header}.{body}".encode())
        return f"{header}.{body}.{_b64(signature)}"


@attrs.frozen
class Operator:
    """An operator with a system account and one account with JetStream, for a server."""

    operator: Identity
    system: Identity
    account: Identity

    @classmethod
    def new(cls) -> Operator:
        return cls(
            Identity.new(nkeys.PREFIX_BYTE_OPERATOR),
            Identity.new(nkeys.PREFIX_BYTE_ACCOUNT),
            Identity.new(nkeys.PREFIX_BYTE_ACCOUNT),
        )

    def server_config(self) -> str:
        """nats-server configuration trusting this operator, its accounts preloaded."""
        issue = self.operator.sign_jwt
        system, account = self.system.public, self.account.public
        operator_nats = {"type": "operator", "system_account": system}
        operator_jwt = issue(self.operator.public, "odin-test", operator_nats)
        system_jwt = issue(system, "SYS", {"type": "account", "limits": UNLIMITED})
        account_limits = {**UNLIMITED, **JETSTREAM}
        account_jwt = issue(account, "ODIN", {"type": "account", "limits": account_limits})
        return "\n".join([
            f'operator: "{operator_jwt}"',
            f"system_account: {system}",
            "resolver: MEMORY",
            "resolver_preload: {",
            f'  {system}: "{system_jwt}"',
            f'  {account}: "{account_jwt}"',
            "}",
            "",
        ])  # fmt: skip

    def user_creds(self, path: Path, *, issuer: Identity | None = None) -> Path:
        """A ``.creds`` file for a new user of the account (or signed by ``issuer``)."""
        user = Identity.new(nkeys.PREFIX_BYTE_USER)
        user_jwt = (issuer or self.account).sign_jwt(
            user.public, "odin", {"type": "user", "pub": {}, "sub": {}, **UNLIMITED}
        )
        seed = user.seed.decode()
        path.write_text(
            f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        )
        return path
