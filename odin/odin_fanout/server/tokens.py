"""Connection tokens: where a client puts its JWT, and what checking it gives.

PyJWT checks the signature and the registered claims; this module decides which keys and
algorithms are acceptable, so that a token cannot choose them: each key accepts only the
algorithms of its own kind (an HMAC secret HS256/384/512, an RSA key RS256/384/512, an EC key
ES256/384 on its curve, an Ed25519 key EdDSA). ``alg: none`` is never accepted, and an HS
token cannot be checked against a public key used as a shared secret (the classic algorithm
confusion), because a public key is never offered to an HS algorithm.

A token arrives, in this order of preference, in ``Authorization: Bearer``, in the
``Sec-WebSocket-Protocol`` list as ``odin.token.<JWT>`` (browsers cannot set headers; the
server never echoes it), or, when ``auth.query_token`` is on, as ``?token=``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from odin_fanout.config import AuthSection
from odin_fanout.protocol.access import Grant
from odin_fanout.protocol.channels import ChannelError, ChannelRules

TOKEN_SUBPROTOCOL = "odin.token."
"""Prefix of the subprotocol entry that carries a token (``odin.token.<JWT>``)."""

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS = ("RS256", "RS384", "RS512")
_EC_ALGORITHMS = {"secp256r1": ("ES256",), "secp384r1": ("ES384",)}
_ALL_ALGORITHMS = frozenset(
    (*HMAC_ALGORITHMS, *RSA_ALGORITHMS, *(a for v in _EC_ALGORITHMS.values() for a in v), "EdDSA")
)
MAX_TOKEN = 8192
"""Characters; a longer token is refused before it is parsed."""


class TokenRefused(Exception):
    """A token that does not authenticate; ``reason`` is a short code for metrics and logs."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@attrs.frozen
class Key:
    key: Any
    """What PyJWT verifies with: the secret's bytes, or a public key object."""
    algorithms: tuple[str, ...]
    kid: str | None = None


def hmac_algorithms(secret: bytes, field: str) -> tuple[str, ...]:
    """The HS algorithms a secret is long enough for (RFC 7518 §3.2: at least the hash's
    size): 32 bytes for HS256, 48 for HS384, 64 for HS512. PyJWT warns on every shorter use,
    which a client could otherwise cause at will."""
    if len(secret) < 32:
        raise ValueError(f"{field}: at least 32 bytes (HS256 needs 256 bits)")
    return tuple(
        a for a, size in zip(HMAC_ALGORITHMS, (32, 48, 64), strict=True) if len(secret) >= size
    )


def _public_key_algorithms(key: Any) -> tuple[str, ...]:
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        algorithms = _EC_ALGORITHMS.get(key.curve.name)
        if algorithms is None:
            raise ValueError(f"EC curve {key.curve.name} is not supported (P-256, P-384)")
        return algorithms
    if isinstance(key, ed25519.Ed25519PublicKey):
        return ("EdDSA",)
    raise ValueError(f"{type(key).__name__} keys are not supported (RSA, EC, Ed25519)")


def _pem_key(path: str) -> Key:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    data = Path(path).expanduser().read_bytes()
    if b"CERTIFICATE" in data:
        key: Any = x509.load_pem_x509_certificate(data).public_key()
    else:
        key = load_pem_public_key(data)
    return Key(key, _public_key_algorithms(key))


def _jwks_keys(path: str) -> list[Key]:
    return jwks_document_keys(json.loads(Path(path).expanduser().read_text()))


def jwks_document_keys(document: Any, *, skip_unusable: bool = False) -> list[Key]:
    """The keys of a JWKS document (a ``jwks_file``'s, or one fetched from ``jwks_url``).

    A key Odin cannot use (a short ``oct`` secret, an unsupported curve) is a ValueError, or,
    with ``skip_unusable``, left out (a key server may publish keys for other consumers); a
    document with no usable key at all is an error either way (ValueError, PyJWTError)."""
    if not isinstance(document, dict):
        raise ValueError("a JWKS document is a JSON object with a 'keys' list")
    keys = []
    for jwk in jwt.PyJWKSet.from_dict(document).keys:
        try:
            if jwk.key_type == "oct":
                secret = bytes(jwk.key)
                keys.append(Key(secret, hmac_algorithms(secret, "an oct key"), jwk.key_id))
            else:
                keys.append(Key(jwk.key, _public_key_algorithms(jwk.key), jwk.key_id))
        except ValueError:
            if not skip_unusable:
                raise
    if not keys:
        raise ValueError("the JWKS document has no key Odin can use")
    return keys


def load_keys(settings: AuthSection) -> list[Key]:
    """The keys ``settings`` name (a ValueError naming the field when one cannot be used)."""
    keys = []
    secret = settings.hmac_secret
    if settings.hmac_secret_file:
        secret = Path(settings.hmac_secret_file).expanduser().read_text().strip()
    if secret:
        keys.append(Key(secret.encode(), hmac_algorithms(secret.encode(), "auth.hmac_secret")))
    for field, load in (("public_key_file", _pem_key), ("jwks_file", _jwks_keys)):
        path = getattr(settings, field)
        if not path:
            continue
        try:
            loaded = load(path)
        except (ValueError, TypeError, jwt.PyJWTError) as exc:
            raise ValueError(f"auth.{field}: {exc}") from None
        keys.extend(loaded if isinstance(loaded, list) else [loaded])
    return keys


class Verifier:
    """Checks tokens against the configured keys and claims: the static ones (``keys``) and,
    when ``auth.jwks_url`` is set, those ``fetched`` gives at the time (odin_fanout.server.jwks)."""

    def __init__(
        self,
        settings: AuthSection,
        keys: Sequence[Key],
        *,
        fetched: Callable[[], Sequence[Key]] | None = None,
    ) -> None:
        self.settings = settings
        self.keys = list(keys)
        self.fetched = fetched

    @classmethod
    def from_config(
        cls, settings: AuthSection, fetched: Callable[[], Sequence[Key]] | None = None
    ) -> Verifier:
        return cls(settings, load_keys(settings), fetched=fetched)

    @property
    def enabled(self) -> bool:
        return bool(self.keys) or self.fetched is not None

    def verify(self, token: str) -> Grant:
        if len(token) > MAX_TOKEN:
            raise TokenRefused("malformed", f"token longer than {MAX_TOKEN} bytes")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenRefused("malformed", f"not a JWT: {exc}") from None
        algorithm = header.get("alg")
        kid = header.get("kid")
        if not isinstance(algorithm, str):
            raise TokenRefused("malformed", "no alg in the token's header")
        keys = [*self.keys, *self.fetched()] if self.fetched is not None else self.keys
        candidates = [
            key
            for key in keys
            if algorithm in key.algorithms and (kid is None or key.kid in (None, kid))
        ]
        if not candidates:
            # With a JWKS URL the key may not have been fetched yet (or was dropped as stale).
            fetchable = self.fetched is not None and algorithm in _ALL_ALGORITHMS
            if fetchable or any(algorithm in key.algorithms for key in keys):
                raise TokenRefused("unknown_key", f"no key with kid {kid!r}")
            raise TokenRefused("algorithm", f"algorithm {algorithm!r} is not accepted")
        settings = self.settings
        # A token's aud is checked only when Odin is given an audience to expect.
        options = {"verify_aud": bool(settings.audience)}
        last: TokenRefused | None = None
        for key in candidates:
            try:
                claims = jwt.decode(
                    token,
                    key.key,
                    algorithms=[algorithm],
                    audience=settings.audience or None,
                    issuer=settings.issuer or None,
                    leeway=settings.leeway,
                    options=options,  # type: ignore[arg-type]
                )
            except jwt.InvalidSignatureError as exc:
                last = TokenRefused("invalid_signature", str(exc))
                continue
            except jwt.ExpiredSignatureError as exc:
                raise TokenRefused("expired", str(exc)) from None
            except jwt.ImmatureSignatureError as exc:
                raise TokenRefused("not_yet_valid", str(exc)) from None
            except jwt.InvalidAudienceError as exc:
                raise TokenRefused("audience", str(exc)) from None
            except jwt.InvalidIssuerError as exc:
                raise TokenRefused("issuer", str(exc)) from None
            except jwt.MissingRequiredClaimError as exc:
                reason = {"aud": "audience", "iss": "issuer"}.get(exc.claim, "invalid")
                raise TokenRefused(reason, str(exc)) from None
            except jwt.PyJWTError as exc:
                raise TokenRefused("invalid", str(exc)) from None
            return self._grant(claims)
        assert last is not None
        raise last

    def _grant(self, claims: Mapping[str, Any]) -> Grant:
        subject = claims.get("sub", "")
        if not isinstance(subject, str):
            raise TokenRefused("invalid", "sub must be a string")
        allowed = patterns_claim(claims, "channels")
        expires = claims.get("exp")
        try:
            expires_at = float(expires) if isinstance(expires, int | float) else None
        except OverflowError:
            raise TokenRefused("invalid", "exp is out of range") from None
        return Grant(
            subject=subject[:200], channels=allowed, expires_at=expires_at, claims=dict(claims)
        )


_RULES = ChannelRules(frozenset())


def patterns_claim(claims: Mapping[str, Any], name: str) -> tuple[str, ...]:
    """The channel patterns a claim lists (none when absent); TokenRefused ``invalid`` when it
    is not a list of valid patterns."""
    listed = claims.get(name, [])
    if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
        raise TokenRefused("invalid", f"{name} must be a list of channel patterns")
    try:
        return tuple(_RULES.check(pattern) for pattern in listed)
    except ChannelError as exc:
        raise TokenRefused("invalid", f"{name}: {exc}") from None


def token_from(
    authorization: str | None, subprotocols: Sequence[str], query: Sequence[str], *, query_ok: bool
) -> str | None:
    """The token of a request, from the first place that has one (None: no token)."""
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    for offered in subprotocols:
        if offered.startswith(TOKEN_SUBPROTOCOL) and len(offered) > len(TOKEN_SUBPROTOCOL):
            return offered[len(TOKEN_SUBPROTOCOL) :]
    if query_ok and query:
        return query[0]
    return None
