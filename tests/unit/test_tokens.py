"""Bearer-token verification: each check has a token that fails only that check."""

from __future__ import annotations

import base64
import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from nitrovault.access.tokens import (
    MAX_TOKEN_BYTES,
    TokenVerifier,
    required_scopes,
)
from nitrovault.errors import AccessError, AuthenticationError, ConfigError, PermissionDeniedError
from nitrovault.owner.issuer import TokenIssuer, generate_issuer_keys, load_issuer, public_jwk

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
ISS, AUD, MODEL = "https://issuer.test", "nitrovault", "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {
        "ed": ed25519.Ed25519PrivateKey.generate(),
        "ec": ec.generate_private_key(ec.SECP256R1()),
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }


@pytest.fixture(scope="module")
def jwks(keys: dict[str, Any]) -> dict[str, Any]:
    return {"keys": [public_jwk(k, name) for name, k in keys.items()]}


@pytest.fixture
def verifier(jwks: dict[str, Any]) -> TokenVerifier:
    return TokenVerifier(ISS, AUD, jwks, leeway_s=30, clock=lambda: NOW)


ALG = {"ed": "EdDSA", "ec": "ES256", "rsa": "RS256"}


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(NOW.timestamp())
    base: dict[str, Any] = {"iss": ISS, "aud": AUD, "sub": "alice", "iat": now - 10, "nbf": now - 10,
                            "exp": now + 3600, "scope": f"infer:{MODEL} info", "jti": "t-1"}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(keys: dict[str, Any], body: dict[str, Any], *, kid: str = "ed", key: str | None = None,
         alg: str | None = None) -> str:
    name = key or kid
    return jwt.encode(body, keys[name], algorithm=alg or ALG[name], headers={"kid": kid})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def reason_of(verifier: TokenVerifier, token: str, method: str = "Infer") -> tuple[type[AccessError], str]:
    with pytest.raises(AccessError) as info:
        verifier.verify(token, method=method, model=MODEL)
    return type(info.value), info.value.reason


@pytest.mark.parametrize("kid", ["ed", "ec", "rsa"])
def test_valid_token_each_algorithm(verifier: TokenVerifier, keys: dict[str, Any], kid: str) -> None:
    principal = verifier.verify(sign(keys, claims(tier="gold"), kid=kid), method="Infer", model=MODEL)
    assert principal.subject == "alice"
    assert principal.scopes == frozenset({f"infer:{MODEL}", "info"})
    assert principal.tier == "gold"
    assert principal.token_id == "t-1"
    assert principal.expires_at == NOW + timedelta(hours=1)


def test_expired_and_leeway(verifier: TokenVerifier, keys: dict[str, Any]) -> None:
    now = int(NOW.timestamp())
    assert reason_of(verifier, sign(keys, claims(exp=now - 31, iat=now - 100, nbf=now - 100))) == (
        AuthenticationError, "expired")
    # within the 30 s leeway: still accepted
    token = sign(keys, claims(exp=now - 29, iat=now - 100, nbf=now - 100))
    verifier.verify(token, method="Infer", model=MODEL)


def test_not_yet_valid(verifier: TokenVerifier, keys: dict[str, Any]) -> None:
    now = int(NOW.timestamp())
    assert reason_of(verifier, sign(keys, claims(nbf=now + 31, iat=now - 1))) == (
        AuthenticationError, "not-yet-valid")
    verifier.verify(sign(keys, claims(nbf=now + 29, iat=now - 1)), method="Infer", model=MODEL)


def test_iat_in_the_future_or_after_exp(verifier: TokenVerifier, keys: dict[str, Any]) -> None:
    now = int(NOW.timestamp())
    assert reason_of(verifier, sign(keys, claims(iat=now + 120, nbf=None)))[1] == "bad-iat"
    assert reason_of(verifier, sign(keys, claims(iat=now + 20, exp=now + 10, nbf=None)))[1] == "bad-iat"


def test_lifetime_capped_at_a_day_by_default(verifier: TokenVerifier, keys: dict[str, Any]) -> None:
    now = int(NOW.timestamp())
    verifier.verify(sign(keys, claims(iat=now - 10, exp=now - 10 + 86_400)), method="Infer", model=MODEL)
    assert reason_of(verifier, sign(keys, claims(iat=now - 10, exp=now - 10 + 86_401))) == (
        AuthenticationError, "lifetime")


@pytest.mark.parametrize("missing", ["exp", "iat"])
def test_required_time_claims(verifier: TokenVerifier, keys: dict[str, Any], missing: str) -> None:
    assert reason_of(verifier, sign(keys, claims(**{missing: None})))[1] == f"missing-{missing}"


def test_wrong_audience(verifier: TokenVerifier, keys: dict[str, Any]) -> None:
    assert reason_of(verifier, sign(keys, claims(aud="other"))) == (AuthenticationError, "wrong-audience")
    assert reason_of(verifier, sign(keys, claims(aud=None)))[1] == "wrong-audience"
    verifier.verify(sign(keys, claims(aud=["x", AUD])), method="Infer", model=MODEL)


def test_wrong_issuer(verifier: TokenVerifier, keys: dict[str, Any]) -> None:
    token = sign(keys, claims(iss="https://evil.test"))
    assert reason_of(verifier, token) == (AuthenticationError, "wrong-issuer")


def test_unknown_kid(verifier: TokenVerifier, keys: dict[str, Any]) -> None:
    token = jwt.encode(claims(), keys["ed"], algorithm="EdDSA", headers={"kid": "retired"})
    assert reason_of(verifier, token) == (AuthenticationError, "unknown-kid")
    no_kid = jwt.encode(claims(), keys["ed"], algorithm="EdDSA")
    assert reason_of(verifier, no_kid)[1] == "unknown-kid"


def test_forged_signature(verifier: TokenVerifier, keys: dict[str, Any]) -> None:
    forger = ed25519.Ed25519PrivateKey.generate()
    token = jwt.encode(claims(), forger, algorithm="EdDSA", headers={"kid": "ed"})
    assert reason_of(verifier, token) == (AuthenticationError, "bad-signature")


def test_tampered_payload(verifier: TokenVerifier, keys: dict[str, Any]) -> None:
    header, _, signature = sign(keys, claims()).split(".")
    payload = b64(json.dumps(claims(sub="mallory")).encode())
    assert reason_of(verifier, f"{header}.{payload}.{signature}")[1] == "bad-signature"


def test_alg_none_and_hmac_never_verify(verifier: TokenVerifier, keys: dict[str, Any]) -> None:
    body = b64(json.dumps(claims()).encode())
    none_token = f"{b64(json.dumps({'alg': 'none', 'kid': 'ed'}).encode())}.{body}."
    assert reason_of(verifier, none_token)[1] == "wrong-alg"
    hs = jwt.encode(claims(), "secret-from-the-jwks-x-value-xxxxxxxx", algorithm="HS256",
                    headers={"kid": "ed"})
    assert reason_of(verifier, hs)[1] == "wrong-alg"


def test_alg_must_match_the_key(verifier: TokenVerifier, keys: dict[str, Any]) -> None:
    # an RSA-signed token presented under the EC key's kid
    assert reason_of(verifier, sign(keys, claims(), kid="ec", key="rsa"))[1] == "wrong-alg"


def test_size_cap(verifier: TokenVerifier, keys: dict[str, Any]) -> None:
    big = sign(keys, claims(pad="x" * MAX_TOKEN_BYTES))
    assert reason_of(verifier, big)[1] == "too-large"


@pytest.mark.parametrize("token", ["", "abc", "a.b", "a.b.c.d", "é.é.é", "!!!.???.###"])
def test_malformed(verifier: TokenVerifier, token: str) -> None:
    assert reason_of(verifier, token) in {(AuthenticationError, "malformed"),
                                          (AuthenticationError, "unknown-kid")}


def test_subject_required(verifier: TokenVerifier, keys: dict[str, Any]) -> None:
    assert reason_of(verifier, sign(keys, claims(sub=None)))[1] == "bad-subject"
    assert reason_of(verifier, sign(keys, claims(sub="")))[1] == "bad-subject"


def test_messages_are_generic(verifier: TokenVerifier, keys: dict[str, Any]) -> None:
    with pytest.raises(AuthenticationError) as auth:
        verifier.verify(sign(keys, claims(aud="other")), method="Infer", model=MODEL)
    assert str(auth.value) == "invalid token"
    assert "audience" not in auth.value.diagnostics()
    with pytest.raises(PermissionDeniedError) as perm:
        verifier.verify(sign(keys, claims()), method="Embed", model=MODEL)
    assert str(perm.value) == "permission denied"
    assert perm.value.reason == "scope"


def test_scopes_per_method_and_model(verifier: TokenVerifier, keys: dict[str, Any]) -> None:
    token = sign(keys, claims(scope=f"infer:{MODEL}"))
    verifier.verify(token, method="Infer", model=MODEL)
    verifier.verify(token, method="/nitrovault.v1.Inference/Infer", model=MODEL)
    assert reason_of(verifier, token, "Embed") == (PermissionDeniedError, "scope")
    with pytest.raises(PermissionDeniedError):
        verifier.verify(token, method="Infer", model="other-model")
    wildcard = sign(keys, claims(scope="embed:*"))
    verifier.verify(wildcard, method="Embed", model="any-model")
    assert reason_of(verifier, wildcard, "Infer")[1] == "scope"


def test_authorize_is_check_5_alone(verifier: TokenVerifier, keys: dict[str, Any]) -> None:
    principal = verifier.authenticate(sign(keys, claims(scope="embed:*")))  # checks 1-4: who
    verifier.authorize(principal, method="Embed", model=MODEL)
    with pytest.raises(PermissionDeniedError) as info:
        verifier.authorize(principal, method="Infer", model=MODEL)
    assert info.value.reason == "scope"


def test_info_and_attest_allowed_for_any_valid_token(verifier: TokenVerifier, keys: dict[str, Any]) -> None:
    token = sign(keys, claims(scope=None))
    assert verifier.verify(token, method="Info", model=MODEL).scopes == frozenset()
    verifier.verify(token, method="Attest", model=MODEL)
    assert reason_of(verifier, token, "Infer")[1] == "scope"


def test_unknown_method_denied(verifier: TokenVerifier, keys: dict[str, Any]) -> None:
    assert reason_of(verifier, sign(keys, claims(scope="infer:* embed:*")), "Admin") == (
        PermissionDeniedError, "unknown-method")
    assert required_scopes("info", MODEL) is None


def test_jwks_rejects_bad_keys(keys: dict[str, Any]) -> None:
    good = public_jwk(keys["ed"], "ed")
    with pytest.raises(ConfigError, match="duplicate"):
        TokenVerifier(ISS, AUD, {"keys": [good, good]})
    with pytest.raises(ConfigError, match="does not fit"):
        TokenVerifier(ISS, AUD, {"keys": [{**good, "alg": "RS256"}]})
    with pytest.raises(ConfigError, match="private"):
        TokenVerifier(ISS, AUD, {"keys": [{**good, "d": "AAAA"}]})
    with pytest.raises(ConfigError, match="unsupported"):
        TokenVerifier(ISS, AUD, {"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]})
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 -- must be refused
    with pytest.raises(ConfigError, match="2048"):
        TokenVerifier(ISS, AUD, {"keys": [public_jwk(small, "small")]})
    with pytest.raises(ConfigError):
        TokenVerifier(ISS, AUD, {"keys": []})


@pytest.mark.parametrize("name", ["ed", "ec", "rsa"])
def test_issuer_roundtrip(keys: dict[str, Any], name: str) -> None:
    issuer = TokenIssuer(keys[name], name, ISS, AUD, clock=lambda: NOW)
    token = issuer.issue("bob", ["embed:*"], timedelta(minutes=5), tier="free")
    verifier = TokenVerifier(ISS, AUD, issuer.jwks, clock=lambda: NOW + timedelta(minutes=4))
    principal = verifier.verify(token, method="Embed", model=MODEL)
    assert (principal.subject, principal.tier) == ("bob", "free")
    late = TokenVerifier(ISS, AUD, issuer.jwks, clock=lambda: NOW + timedelta(minutes=6))
    with pytest.raises(AuthenticationError):
        late.verify(token, method="Embed", model=MODEL)


def test_issuer_rejects_bad_input(keys: dict[str, Any]) -> None:
    issuer = TokenIssuer(keys["ed"], "ed", ISS, AUD)
    with pytest.raises(ConfigError):
        issuer.issue("bob", ["has space"], 60)
    with pytest.raises(ConfigError):
        issuer.issue("", [], 60)
    with pytest.raises(ConfigError):
        issuer.issue("bob", [], 0)


def test_generate_issuer_keys_and_rotation(tmp_path: Path) -> None:
    key_path, jwks_path = generate_issuer_keys(tmp_path / "iss")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    first = json.loads(jwks_path.read_text())
    assert len(first["keys"]) == 1 and "d" not in first["keys"][0]
    old_token = load_issuer(tmp_path / "iss").issue("alice", ["info"], 3600)
    assert generate_issuer_keys(tmp_path / "iss") == (key_path, jwks_path)  # idempotent
    assert json.loads(jwks_path.read_text()) == first
    generate_issuer_keys(tmp_path / "iss", rotate=True)
    rotated = json.loads(jwks_path.read_text())
    assert len(rotated["keys"]) == 2 and rotated["keys"][1] == first["keys"][0]
    meta = json.loads((tmp_path / "iss" / "issuer.json").read_text())
    verifier = TokenVerifier(meta["issuer"], meta["audience"], rotated)
    new_token = load_issuer(tmp_path / "iss").issue("alice", ["info"], 3600)
    assert jwt.get_unverified_header(new_token)["kid"] != jwt.get_unverified_header(old_token)["kid"]
    for token in (old_token, new_token):
        assert verifier.verify(token, method="Info", model=MODEL).subject == "alice"


def test_cache_rechecks_claims_every_call(keys: dict[str, Any], jwks: dict[str, Any]) -> None:
    now = {"t": NOW}
    verifier = TokenVerifier(ISS, AUD, jwks, clock=lambda: now["t"], cache_size=2)
    token = sign(keys, claims(exp=int(NOW.timestamp()) + 60))
    verifier.verify(token, method="Infer", model=MODEL)  # verified and cached
    verifier.verify(token, method="Infer", model=MODEL)  # served from the cache
    assert reason_of(verifier, token, "Embed")[1] == "scope"  # scopes still checked on a hit
    now["t"] = NOW + timedelta(seconds=91)
    assert reason_of(verifier, token) == (AuthenticationError, "expired")  # and times


def test_cache_never_serves_other_bytes(verifier: TokenVerifier, keys: dict[str, Any]) -> None:
    token = sign(keys, claims())
    verifier.verify(token, method="Infer", model=MODEL)
    header, payload, signature = token.split(".")
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    assert reason_of(verifier, f"{header}.{payload}.{flipped}")[1] in {"bad-signature", "malformed"}


def test_cache_is_bounded(keys: dict[str, Any], jwks: dict[str, Any]) -> None:
    verifier = TokenVerifier(ISS, AUD, jwks, clock=lambda: NOW, cache_size=3)
    for i in range(10):
        verifier.verify(sign(keys, claims(jti=f"t-{i}")), method="Info", model=MODEL)
    assert len(verifier._cache) == 3
    uncached = TokenVerifier(ISS, AUD, jwks, clock=lambda: NOW, cache_size=0)
    uncached.verify(sign(keys, claims()), method="Info", model=MODEL)
    assert len(uncached._cache) == 0
