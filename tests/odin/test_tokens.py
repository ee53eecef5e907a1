"""Connection tokens: which JWTs authenticate, why the others are refused, where they come from."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, OKPAlgorithm, RSAAlgorithm

from odin_fanout.config import AuthSection, load_config
from odin_fanout.metrics import AUTH_REFUSALS
from odin_fanout.protocol.access import Grant
from odin_fanout.server.tokens import (
    HMAC_ALGORITHMS,
    RSA_ALGORITHMS,
    Key,
    TokenRefused,
    Verifier,
    load_keys,
    token_from,
)

# 64 bytes: PyJWT warns about an HS512 secret shorter than its 512-bit hash.
SECRET = "correct horse battery staple " * 2 + "xxxxxx"
OTHER_SECRET = "another secret that is also long enough!" + "y" * 24
ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "EdDSA")
# What a token alone can be refused for: the metric's reasons but those about a connection
# (no token, a forbidden channel, an expiry or missing auth on an open connection).
REASONS = set(AUTH_REFUSALS) - {"missing", "forbidden", "token_expired", "auth_timeout"}


# ---- keys -----------------------------------------------------------------------------------


def private_key(kind: str, which: int = 0) -> Any:
    """A private key of ``kind`` (generated once per test run); ``which`` picks another one."""
    return _generate(kind, which)


@functools.cache
def _generate(kind: str, which: int) -> Any:
    del which  # only part of the cache key
    if kind == "RSA":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "P-256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "P-384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "P-521":
        return ec.generate_private_key(ec.SECP521R1())
    assert kind == "Ed25519"
    return ed25519.Ed25519PrivateKey.generate()


def kind_of(algorithm: str) -> str:
    if algorithm.startswith("RS"):
        return "RSA"
    return {"ES256": "P-256", "ES384": "P-384", "EdDSA": "Ed25519"}.get(algorithm, "")


def pem(public_key: Any) -> bytes:
    data: bytes = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


def sign(
    claims: dict[str, Any], algorithm: str, *, which: int = 0, headers: dict[str, Any] | None = None
) -> str:
    if algorithm.startswith("HS"):
        secret = (SECRET, OTHER_SECRET)[which]
        return jwt.encode(claims, secret, algorithm=algorithm, headers=headers)
    return jwt.encode(
        claims, private_key(kind_of(algorithm), which), algorithm=algorithm, headers=headers
    )


def auth(tmp_path: Path, algorithm: str, **fields: Any) -> AuthSection:
    """Settings that verify ``algorithm`` tokens with the first key of its kind."""
    if algorithm.startswith("HS"):
        return AuthSection(hmac_secret=SECRET, **fields)
    path = tmp_path / "public.pem"
    path.write_bytes(pem(private_key(kind_of(algorithm)).public_key()))
    return AuthSection(public_key_file=str(path), **fields)


def verifier(settings: AuthSection) -> Verifier:
    return Verifier.from_config(settings)


def refusal(verifier: Verifier, token: str) -> str:
    with pytest.raises(TokenRefused) as caught:
        verifier.verify(token)
    return caught.value.reason


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_by_hand(
    claims: dict[str, Any], secret: bytes, header: dict[str, Any] | None = None
) -> str:
    """An HS256 token signed without PyJWT (which refuses a PEM key as an HMAC secret)."""
    head = b64(json.dumps(header or {"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    signature = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(signature)}"


def test_kind_of_names_the_key_each_algorithm_needs() -> None:
    assert [kind_of(a) for a in ("RS256", "ES256", "ES384", "EdDSA", "HS256")] == [
        "RSA",
        "P-256",
        "P-384",
        "Ed25519",
        "",
    ]


# ---- valid tokens ---------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_valid_token_gives_its_subject_channels_and_expiry(
    tmp_path: Path, algorithm: str
) -> None:
    exp = int(time.time()) + 600
    token = sign({"sub": "alice", "channels": ["PRIV.*", "BTC.trade"], "exp": exp}, algorithm)
    grant = verifier(auth(tmp_path, algorithm)).verify(token)
    assert grant == Grant(subject="alice", channels=("PRIV.*", "BTC.trade"), expires_at=float(exp))
    assert grant.authenticated


def test_a_token_without_expiry_or_channels_gives_an_empty_grant_for_its_subject(
    tmp_path: Path,
) -> None:
    grant = verifier(auth(tmp_path, "HS256")).verify(sign({"sub": "bob"}, "HS256"))
    assert grant == Grant(subject="bob", channels=(), expires_at=None)


def test_settings_from_the_configuration_verify_tokens() -> None:
    config, _ = load_config(
        environ={}, overrides={"auth.hmac_secret": SECRET, "auth.audience": "odin"}
    )
    check = verifier(config.auth)
    assert check.enabled
    grant = check.verify(sign({"sub": "carol", "aud": "odin"}, "HS512"))
    assert grant.subject == "carol"


def test_a_verifier_without_keys_is_disabled_and_accepts_nothing() -> None:
    check = verifier(AuthSection())
    assert not check.enabled
    assert refusal(check, sign({"sub": "alice"}, "HS256")) == "algorithm"


# ---- time claims ----------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_an_expired_token_is_refused_as_expired(tmp_path: Path, algorithm: str) -> None:
    check = verifier(auth(tmp_path, algorithm, leeway=5.0))
    token = sign({"sub": "alice", "exp": int(time.time()) - 120}, algorithm)
    assert refusal(check, token) == "expired"


def test_a_token_expired_within_the_leeway_is_accepted(tmp_path: Path) -> None:
    check = verifier(auth(tmp_path, "HS256", leeway=60.0))
    exp = int(time.time()) - 10
    assert check.verify(sign({"sub": "alice", "exp": exp}, "HS256")).expires_at == float(exp)


def test_a_token_expired_beyond_the_leeway_is_refused(tmp_path: Path) -> None:
    check = verifier(auth(tmp_path, "HS256", leeway=60.0))
    token = sign({"sub": "alice", "exp": int(time.time()) - 600}, "HS256")
    assert refusal(check, token) == "expired"


@pytest.mark.parametrize("algorithm", ["HS256", "RS256", "ES256", "EdDSA"])
def test_a_token_not_yet_valid_is_refused(tmp_path: Path, algorithm: str) -> None:
    check = verifier(auth(tmp_path, algorithm))
    token = sign({"sub": "alice", "nbf": int(time.time()) + 600}, algorithm)
    assert refusal(check, token) == "not_yet_valid"


def test_a_token_valid_from_within_the_leeway_is_accepted(tmp_path: Path) -> None:
    check = verifier(auth(tmp_path, "HS256", leeway=60.0))
    assert check.verify(sign({"sub": "alice", "nbf": int(time.time()) + 10}, "HS256"))


# ---- signatures and algorithms --------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_token_signed_with_another_key_is_refused(tmp_path: Path, algorithm: str) -> None:
    check = verifier(auth(tmp_path, algorithm))
    token = sign({"sub": "mallory"}, algorithm, which=1)
    assert refusal(check, token) == "invalid_signature"


def test_a_token_with_a_tampered_payload_is_refused(tmp_path: Path) -> None:
    check = verifier(auth(tmp_path, "RS256"))
    head, _, signature = sign({"sub": "alice", "channels": []}, "RS256").split(".")
    forged = b64(json.dumps({"sub": "alice", "channels": ["*.*"]}).encode())
    assert refusal(check, f"{head}.{forged}.{signature}") == "invalid_signature"


@pytest.mark.parametrize("algorithm", ["HS256", "RS256", "ES256", "EdDSA"])
def test_an_unsigned_alg_none_token_is_refused(tmp_path: Path, algorithm: str) -> None:
    check = verifier(auth(tmp_path, algorithm))
    # PyJWT's "none" algorithm takes no key ("" stands for None).
    token = jwt.encode({"sub": "mallory", "channels": ["*.*"]}, "", algorithm="none")
    assert jwt.get_unverified_header(token)["alg"] == "none"
    assert refusal(check, token) == "algorithm"


def test_an_hs256_token_signed_with_the_rsa_public_key_is_refused(tmp_path: Path) -> None:
    settings = auth(tmp_path, "RS256")
    public_pem = Path(settings.public_key_file).read_bytes()
    token = hs256_by_hand({"sub": "mallory", "channels": ["*.*"]}, public_pem)
    assert refusal(verifier(settings), token) == "algorithm"


def test_an_hs256_token_signed_with_a_jwks_public_key_is_refused(tmp_path: Path) -> None:
    public = private_key("RSA").public_key()
    path = tmp_path / "jwks.json"
    jwk = {**RSAAlgorithm.to_jwk(public, as_dict=True), "kid": "rsa-1"}
    path.write_text(json.dumps({"keys": [jwk]}))
    check = verifier(AuthSection(jwks_file=str(path)))
    header = {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}
    assert refusal(check, hs256_by_hand({"sub": "mallory"}, pem(public), header)) == "algorithm"


@pytest.mark.parametrize(
    ("configured", "signed"),
    [("RS256", "ES256"), ("ES256", "ES384"), ("ES384", "ES256"), ("EdDSA", "RS256")],
)
def test_a_key_accepts_only_algorithms_of_its_own_kind(
    tmp_path: Path, configured: str, signed: str
) -> None:
    check = verifier(auth(tmp_path, configured))
    assert refusal(check, sign({"sub": "alice"}, signed)) == "algorithm"


def test_an_rsa_key_accepts_every_rs_algorithm(tmp_path: Path) -> None:
    (key,) = load_keys(auth(tmp_path, "RS256"))
    assert key.algorithms == RSA_ALGORITHMS


# ---- audience and issuer --------------------------------------------------------------------


def test_a_token_for_another_audience_is_refused(tmp_path: Path) -> None:
    check = verifier(auth(tmp_path, "HS256", audience="odin"))
    assert refusal(check, sign({"sub": "alice", "aud": "elsewhere"}, "HS256")) == "audience"
    assert check.verify(sign({"sub": "alice", "aud": "odin"}, "HS256")).subject == "alice"
    assert check.verify(sign({"sub": "alice", "aud": ["x", "odin"]}, "HS256")).subject == "alice"


def test_a_token_from_another_issuer_is_refused(tmp_path: Path) -> None:
    check = verifier(auth(tmp_path, "ES256", issuer="https://auth.example"))
    token = sign({"sub": "alice", "iss": "https://evil.example"}, "ES256")
    assert refusal(check, token) == "issuer"
    good = sign({"sub": "alice", "iss": "https://auth.example"}, "ES256")
    assert check.verify(good).subject == "alice"


def test_a_tokens_audience_is_ignored_when_none_is_configured(tmp_path: Path) -> None:
    check = verifier(auth(tmp_path, "HS256"))
    assert check.verify(sign({"sub": "alice", "aud": "anything"}, "HS256")).subject == "alice"


def test_a_token_without_the_configured_audience_or_issuer_is_refused(tmp_path: Path) -> None:
    check = verifier(auth(tmp_path, "HS256", audience="odin", issuer="me"))
    assert refusal(check, sign({"sub": "alice", "iss": "me"}, "HS256")) in {"audience", "invalid"}
    assert refusal(check, sign({"sub": "alice", "aud": "odin"}, "HS256")) in {"issuer", "invalid"}


# ---- JWKS -----------------------------------------------------------------------------------


@pytest.fixture
def jwks_verifier(tmp_path: Path) -> Verifier:
    keys = [
        {**RSAAlgorithm.to_jwk(private_key("RSA").public_key(), as_dict=True), "kid": "rsa-1"},
        {**RSAAlgorithm.to_jwk(private_key("RSA", 1).public_key(), as_dict=True), "kid": "rsa-2"},
        {**ECAlgorithm.to_jwk(private_key("P-256").public_key(), as_dict=True), "kid": "ec-1"},
        {**ECAlgorithm.to_jwk(private_key("P-384").public_key(), as_dict=True), "kid": "ec-2"},
        {**OKPAlgorithm.to_jwk(private_key("Ed25519").public_key(), as_dict=True), "kid": "ed-1"},
        {**HMACAlgorithm.to_jwk(SECRET.encode(), as_dict=True), "kid": "hs-1"},
    ]
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": keys}))
    return verifier(AuthSection(jwks_file=str(path)))


def test_jwks_keys_are_loaded_with_their_kids_and_algorithms(jwks_verifier: Verifier) -> None:
    by_kid = {key.kid: key.algorithms for key in jwks_verifier.keys}
    assert by_kid == {
        "rsa-1": RSA_ALGORITHMS,
        "rsa-2": RSA_ALGORITHMS,
        "ec-1": ("ES256",),
        "ec-2": ("ES384",),
        "ed-1": ("EdDSA",),
        "hs-1": HMAC_ALGORITHMS,
    }


@pytest.mark.parametrize(
    ("algorithm", "which", "kid"),
    [
        ("RS256", 0, "rsa-1"),
        ("RS512", 1, "rsa-2"),
        ("ES256", 0, "ec-1"),
        ("ES384", 0, "ec-2"),
        ("EdDSA", 0, "ed-1"),
        ("HS256", 0, "hs-1"),
    ],
)
def test_a_jwks_token_is_verified_with_the_key_its_kid_names(
    jwks_verifier: Verifier, algorithm: str, which: int, kid: str
) -> None:
    token = sign({"sub": kid}, algorithm, which=which, headers={"kid": kid})
    assert jwks_verifier.verify(token).subject == kid


def test_a_jwks_token_signed_by_another_key_than_its_kid_names_is_refused(
    jwks_verifier: Verifier,
) -> None:
    token = sign({"sub": "mallory"}, "RS256", which=1, headers={"kid": "rsa-1"})
    assert refusal(jwks_verifier, token) == "invalid_signature"


def test_a_jwks_token_with_an_unknown_kid_is_refused(jwks_verifier: Verifier) -> None:
    token = sign({"sub": "alice"}, "RS256", headers={"kid": "rsa-9"})
    assert refusal(jwks_verifier, token) == "unknown_key"


def test_a_jwks_token_without_a_kid_is_tried_against_each_key_of_its_kind(
    jwks_verifier: Verifier,
) -> None:
    assert jwks_verifier.verify(sign({"sub": "alice"}, "RS256", which=1)).subject == "alice"


# ---- malformed and invalid tokens -----------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b.c",
        "x" * 10240,
        "é" * 9000,
        b64(b"[1]") + "." + b64(b"{}") + ".sig",
        b64(b'{"typ": "JWT"}') + "." + b64(b"{}") + ".sig",
        b64(b'{"alg": 256}') + "." + b64(b"{}") + ".sig",
        b64(b"[" * 5000) + "." + b64(b"{}") + ".sig",
    ],
    ids=[
        "empty",
        "one-segment",
        "garbage-segments",
        "10KB",
        "long-unicode",
        "header-not-object",
        "no-alg",
        "alg-not-string",
        "deeply-nested-header",
    ],
)
def test_a_malformed_token_is_refused_as_malformed(tmp_path: Path, token: str) -> None:
    assert refusal(verifier(auth(tmp_path, "HS256")), token) == "malformed"


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": "alice", "channels": "BTC.trade"},
        {"sub": "alice", "channels": {"BTC.trade": True}},
        {"sub": "alice", "channels": ["btc.trade"]},
        {"sub": "alice", "channels": ["BTC"]},
        {"sub": "alice", "channels": [1]},
        {"sub": 42},
    ],
    ids=["string", "object", "lower-case", "no-event", "not-a-string", "sub-not-a-string"],
)
def test_a_signed_token_with_unusable_claims_is_refused_as_invalid(
    tmp_path: Path, claims: dict[str, Any]
) -> None:
    check = verifier(auth(tmp_path, "HS256"))
    assert refusal(check, sign(claims, "HS256")) == "invalid"


def test_a_signed_token_whose_payload_is_not_an_object_is_refused(tmp_path: Path) -> None:
    check = verifier(auth(tmp_path, "HS256"))
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(b"[1, 2]")
    mac = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    assert refusal(check, f"{head}.{body}.{b64(mac)}") in REASONS


def test_a_signed_token_with_an_absurd_expiry_is_refused_not_crashed(tmp_path: Path) -> None:
    check = verifier(auth(tmp_path, "HS256"))
    token = sign({"sub": "alice", "exp": 10**400}, "HS256")
    with pytest.raises(TokenRefused) as caught:
        check.verify(token)
    assert caught.value.reason in REASONS


def test_a_secret_is_offered_only_to_the_hs_algorithms_it_is_long_enough_for() -> None:
    """RFC 7518: a secret at least the hash's size. A 32-byte secret checks HS256 tokens; an
    HS512 token against it is refused (no key for it), without PyJWT's short-key warning."""

    def hs512(secret: str) -> str:
        head = b64(json.dumps({"alg": "HS512", "typ": "JWT"}).encode())
        body = b64(json.dumps({"sub": "alice"}).encode())
        mac = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha512).digest()
        return f"{head}.{body}.{b64(mac)}"

    short = verifier(AuthSection(hmac_secret="s" * 32))
    with pytest.raises(TokenRefused) as caught:
        short.verify(hs512("s" * 32))
    assert caught.value.reason == "algorithm"
    assert verifier(AuthSection(hmac_secret="s" * 64)).verify(hs512("s" * 64)).subject == "alice"


# ---- loading keys ---------------------------------------------------------------------------


def test_a_short_hmac_secret_is_refused_when_keys_are_loaded() -> None:
    with pytest.raises(ValueError, match=r"auth\.hmac_secret"):
        load_keys(AuthSection(hmac_secret="x" * 31))
    assert load_keys(AuthSection(hmac_secret="x" * 32)) == [Key(b"x" * 32, ("HS256",))]
    assert load_keys(AuthSection(hmac_secret="x" * 64)) == [Key(b"x" * 64, HMAC_ALGORITHMS)]


def test_a_short_hmac_secret_file_is_refused_when_keys_are_loaded(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("short\n")
    with pytest.raises(ValueError, match=r"auth\.hmac_secret"):
        load_keys(AuthSection(hmac_secret_file=str(path)))


def test_an_hmac_secret_file_is_read_with_its_whitespace_trimmed(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(f"  {SECRET}\n")
    check = verifier(AuthSection(hmac_secret_file=str(path)))
    assert check.verify(sign({"sub": "alice"}, "HS256")).subject == "alice"


def test_an_unsupported_ec_curve_is_refused_naming_the_public_key_file(tmp_path: Path) -> None:
    path = tmp_path / "p521.pem"
    path.write_bytes(pem(private_key("P-521").public_key()))
    with pytest.raises(ValueError, match=r"auth\.public_key_file") as caught:
        load_keys(AuthSection(public_key_file=str(path)))
    assert "secp521r1" in str(caught.value)


def test_a_file_that_is_not_a_public_key_is_refused_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "junk.pem"
    path.write_text("not a key\n")
    with pytest.raises(ValueError, match=r"auth\.public_key_file"):
        load_keys(AuthSection(public_key_file=str(path)))


# ---- where the token comes from -------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_a_bearer_authorization_header_is_preferred_over_everything_else(scheme: str) -> None:
    found = token_from(
        f"{scheme} header.token.here",
        ["odin.v1", "odin.token.proto.token.here"],
        ["query.token.here"],
        query_ok=True,
    )
    assert found == "header.token.here"


def test_a_token_subprotocol_entry_is_used_without_a_bearer_header() -> None:
    found = token_from(None, ["odin.v1", "odin.token.proto.token.here"], [], query_ok=False)
    assert found == "proto.token.here"


def test_a_non_bearer_authorization_header_is_ignored() -> None:
    found = token_from("Basic dXNlcjpwYXNz", ["odin.v1", "odin.token.a.b.c"], [], query_ok=False)
    assert found == "a.b.c"
    assert token_from("Basic dXNlcjpwYXNz", ["odin.v1"], [], query_ok=False) is None


def test_an_empty_bearer_header_falls_back_to_the_subprotocol() -> None:
    assert token_from("Bearer   ", ["odin.v1", "odin.token.a.b.c"], [], query_ok=False) == "a.b.c"


def test_an_empty_token_subprotocol_entry_is_not_a_token() -> None:
    assert token_from(None, ["odin.v1", "odin.token."], [], query_ok=False) is None


def test_a_query_token_is_used_only_when_allowed() -> None:
    assert token_from(None, ["odin.v1"], ["q.t.x"], query_ok=True) == "q.t.x"
    assert token_from(None, ["odin.v1"], ["q.t.x"], query_ok=False) is None


def test_the_subprotocol_is_preferred_over_the_query() -> None:
    assert token_from(None, ["odin.v1", "odin.token.p.t.x"], ["q.t.x"], query_ok=True) == "p.t.x"


def test_a_request_without_a_token_gives_none() -> None:
    assert token_from(None, [], [], query_ok=True) is None
    assert token_from("", ["odin.v1"], [], query_ok=True) is None


# ---- fuzz -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def every_kind_verifier(tmp_path_factory: pytest.TempPathFactory) -> Verifier:
    directory = tmp_path_factory.mktemp("keys")
    public = directory / "public.pem"
    public.write_bytes(pem(private_key("RSA").public_key()))
    keys = [
        {**ECAlgorithm.to_jwk(private_key("P-256").public_key(), as_dict=True), "kid": "ec-1"},
        {**OKPAlgorithm.to_jwk(private_key("Ed25519").public_key(), as_dict=True), "kid": "ed-1"},
    ]
    jwks = directory / "jwks.json"
    jwks.write_text(json.dumps({"keys": keys}))
    return verifier(
        AuthSection(
            hmac_secret=SECRET,
            public_key_file=str(public),
            jwks_file=str(jwks),
            audience="odin",
            issuer="me",
        )
    )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)
headers_st = st.fixed_dictionaries(
    {"alg": st.sampled_from([*ALGORITHMS, "none", "HS1", ""]) | json_values},
    optional={"kid": st.sampled_from(["ec-1", "ed-1", "nope"]) | json_values, "typ": json_values},
)
segments_st = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=")
structured_st = st.builds(
    lambda header, payload, signature: ".".join(
        [b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()), signature]
    ),
    headers_st,
    json_values,
    segments_st,
)
tokens_st = (
    st.text(max_size=300)
    | st.lists(segments_st, min_size=1, max_size=5).map(".".join)
    | structured_st
)


@settings(max_examples=500)
@given(token=tokens_st)
def test_verify_refuses_arbitrary_text_with_token_refused_only(
    every_kind_verifier: Verifier, token: str
) -> None:
    with pytest.raises(TokenRefused) as caught:
        every_kind_verifier.verify(token)
    assert caught.value.reason in REASONS
