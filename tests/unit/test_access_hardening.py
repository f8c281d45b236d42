"""Hostile-tester findings on access control, each pinned by a test that failed before its fix.

* odd NumericDates (``exp = 1e308``, huge integers, negatives, NaN, booleans, strings) in a correctly
  signed token escaped as ``OverflowError`` (INTERNAL): now only ``AuthenticationError`` ever comes out
  of the verifier, whatever the claims hold (hypothesis throws arbitrary JSON at every claim);
* token lifetimes were not capped (a 100-year token verified): ``access.max_token_lifetime_s`` (default
  one day) refuses them with reason ``lifetime``, and ``nitrovault token issue --ttl`` refuses to mint them;
* a scope refusal was audited with ``subject: null`` although the token was valid: the record now names
  the subject, token id and tier.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import typer
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt.api_jws import PyJWS

from enclave_app.config import EnclaveConfig
from enclave_app.protections import CallRecord, Protections
from enclave_app.server import InferenceService
from nitrovault.access.tokens import (
    DEFAULT_MAX_LIFETIME_S,
    MAX_LIFETIME_S,
    MAX_TIMESTAMP,
    Principal,
    TokenVerifier,
)
from nitrovault.cli.token_cmd import parse_ttl
from nitrovault.clock import utc_now
from nitrovault.errors import AuthenticationError, ConfigError, PermissionDeniedError
from nitrovault.kms.trust import amazon_trust_services_pem
from nitrovault.local.nsm import make_local_nsm
from nitrovault.owner.issuer import TokenIssuer, public_jwk

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
T0 = int(NOW.timestamp())
ISS, AUD, MODEL = "https://issuer.test", "nitrovault", "mlp"
KEY = ed25519.Ed25519PrivateKey.generate()
JWKS = {"keys": [public_jwk(KEY, "ed")]}
TIME_CLAIMS = ("exp", "nbf", "iat")


def verifier(**kwargs: Any) -> TokenVerifier:
    return TokenVerifier(ISS, AUD, JWKS, leeway_s=30, clock=lambda: NOW, **kwargs)


def good_claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"iss": ISS, "aud": AUD, "sub": "alice", "iat": T0 - 10, "nbf": T0 - 10,
                            "exp": T0 + 3600, "scope": f"infer:{MODEL}", "jti": "t-1", "tier": "gold"}
    base.update(overrides)
    return base


def sign_raw(claims: Any) -> str:
    """A correctly signed token over exactly ``json.dumps(claims)`` (NaN/Infinity included): PyJWS, not
    ``jwt.encode``, so no library check stands between the hostile claims and our verifier."""
    payload = json.dumps(claims, allow_nan=True).encode()
    return PyJWS().encode(payload, KEY, algorithm="EdDSA", headers={"kid": "ed"})


def reason(v: TokenVerifier, token: str, method: str = "Info") -> str:
    with pytest.raises(AuthenticationError) as info:
        v.verify(token, method=method, model=MODEL)
    assert str(info.value) == "invalid token"  # generic: nothing of the token in the message
    return info.value.reason


# -- 1. odd NumericDates --------------------------------------------------------------------------------

ODD_TIMES: list[Any] = [
    1e308, -1e308, 10**400, -(10**400), 2**63, 2**1024, MAX_TIMESTAMP + 1, -1, -0.5,
    float("nan"), float("inf"), float("-inf"), True, False, "1700000000", [T0], {"t": T0},
]


@pytest.mark.parametrize("name", TIME_CLAIMS)
@pytest.mark.parametrize("value", ODD_TIMES, ids=lambda v: repr(v)[:20])
def test_odd_numeric_dates_are_bad_claims_not_internal_errors(name: str, value: Any) -> None:
    assert reason(verifier(), sign_raw(good_claims(**{name: value}))) == f"bad-{name}"


def test_exp_1e308_is_the_reported_case() -> None:
    # was: OverflowError (datetime.fromtimestamp) -> INTERNAL; now UNAUTHENTICATED "bad-exp"
    assert reason(verifier(), sign_raw(good_claims(exp=1e308))) == "bad-exp"


JSON = st.recursive(
    st.none() | st.booleans() | st.text(max_size=20)
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
#: values that are often nearly right, so the fuzzer reaches the later checks too
NEAR = st.sampled_from([ISS, AUD, "alice", "", [AUD], T0, T0 - 10, T0 + 60, T0 + 10**9, float(T0), 0])
CLAIM = st.sampled_from(["iss", "aud", "sub", "exp", "nbf", "iat", "scope", "tier", "jti"])


@settings(max_examples=400, deadline=None)
@given(overrides=st.dictionaries(CLAIM, JSON | NEAR, max_size=6),
       dropped=st.sets(CLAIM, max_size=3),
       method=st.sampled_from(["Info", "Attest"]))
def test_any_claim_values_only_ever_raise_authentication_error(
        overrides: dict[str, Any], dropped: set[str], method: str) -> None:
    claims = {k: v for k, v in good_claims(**overrides).items() if k not in dropped}
    v = verifier(cache_size=0)
    try:
        principal = v.verify(sign_raw(claims), method=method, model=MODEL)
    except AuthenticationError as err:  # anything else (OverflowError, TypeError, ...) fails the test
        assert str(err) == "invalid token"
        return
    # accepted: then it really is a sane, live, capped token
    assert isinstance(principal, Principal) and isinstance(principal.subject, str) and principal.subject
    assert NOW - timedelta(seconds=30) <= principal.expires_at
    assert principal.expires_at <= NOW + timedelta(seconds=DEFAULT_MAX_LIFETIME_S + 30)


@settings(max_examples=200, deadline=None)
@given(payload=JSON)
def test_any_payload_document_only_ever_raises_authentication_error(payload: Any) -> None:
    with pytest.raises(AuthenticationError):
        verifier().verify(sign_raw(payload), method="Info", model=MODEL)


# -- 2. lifetime cap --------------------------------------------------------------------------------------


def test_a_hundred_year_token_is_refused() -> None:
    century = 100 * 365 * 86_400
    assert reason(verifier(), sign_raw(good_claims(exp=T0 + century))) == "lifetime"


def test_lifetime_is_exp_minus_iat_at_most_the_cap() -> None:
    v = verifier(max_lifetime_s=3600)
    v.verify(sign_raw(good_claims(iat=T0 - 100, nbf=None, exp=T0 - 100 + 3600)), method="Info", model=MODEL)
    # issued long ago for long: expires in 10 minutes, but its lifetime is over the cap
    assert reason(v, sign_raw(good_claims(iat=T0 - 7200, nbf=None, exp=T0 + 600))) == "lifetime"
    assert reason(v, sign_raw(good_claims(iat=T0 - 100, exp=T0 - 100 + 3601))) == "lifetime"


def test_iat_cannot_be_dropped_or_moved_to_dodge_the_cap() -> None:
    """A far ``exp`` cannot hide behind a missing ``iat`` or one claimed just before it: ``iat`` is
    required and at most the leeway ahead of our clock (and ``exp`` is capped against our clock too)."""
    v = verifier(max_lifetime_s=3600)
    far = T0 + 10 * 86_400
    assert reason(v, sign_raw(good_claims(iat=None, nbf=None, exp=far))) == "missing-iat"  # null: absent
    no_iat = {k: val for k, val in good_claims(exp=far).items() if k != "iat"}
    assert reason(v, sign_raw(no_iat)) == "missing-iat"
    assert reason(v, sign_raw(good_claims(iat=far - 60, nbf=None, exp=far))) == "bad-iat"
    # the issuer's clock may run ahead of ours by the leeway: a full-length token from it still passes
    v.verify(sign_raw(good_claims(iat=T0 + 20, nbf=T0 + 20, exp=T0 + 20 + 3600)), method="Info", model=MODEL)
    assert reason(v, sign_raw(good_claims(iat=T0 + 20, nbf=None, exp=T0 + 20 + 3601))) == "lifetime"


def test_the_cap_applies_to_cached_tokens() -> None:
    v = TokenVerifier(ISS, AUD, JWKS, clock=lambda: NOW, max_lifetime_s=3600)
    token = sign_raw(good_claims(iat=T0, nbf=T0, exp=T0 + 3600))
    v.verify(token, method="Info", model=MODEL)
    v.verify(token, method="Info", model=MODEL)  # a cache hit re-runs the claim checks, cap included
    assert reason(v, sign_raw(good_claims(iat=T0, nbf=T0, exp=T0 + 3601))) == "lifetime"


@pytest.mark.parametrize("bad", [0, -1, MAX_LIFETIME_S + 1, float("nan"), True])
def test_verifier_cap_must_be_sane(bad: Any) -> None:
    with pytest.raises(ConfigError):
        verifier(max_lifetime_s=bad)


def _config(**access: Any) -> dict[str, Any]:
    return {
        "model_id": MODEL, "model_version": "1", "handler": "generic:mlp-classifier",
        "kms_key_arn": "arn:aws:kms:us-east-1:111122223333:key/00000000-0000-0000-0000-000000000000",
        "region": "us-east-1", "encryption_context": {"model": MODEL, "version": "1"},
        "sealed_digest": "ab" * 32, "kms_ca_bundle": amazon_trust_services_pem(),
        "access": {"issuer": ISS, "audience": AUD, "jwks": JWKS, **access},
    }


def test_config_cap_defaults_to_a_day_and_reaches_the_verifier() -> None:
    config = EnclaveConfig.from_mapping(_config())
    assert config.access.max_token_lifetime_s == DEFAULT_MAX_LIFETIME_S == 86_400
    assert json.loads(config.to_json())["access"]["max_token_lifetime_s"] == 86_400
    short = EnclaveConfig.from_mapping(_config(max_token_lifetime_s=600))
    assert short.access.verifier(clock=lambda: NOW).max_lifetime_s == 600
    v = short.access.verifier(clock=lambda: NOW)
    assert reason(v, sign_raw(good_claims(exp=T0 + 3600))) == "lifetime"


@pytest.mark.parametrize("bad", [0, -5, MAX_LIFETIME_S + 1, "86400", 1.5, True, None])
def test_config_cap_is_validated(bad: Any) -> None:
    with pytest.raises(ConfigError, match="max_token_lifetime_s"):
        EnclaveConfig.from_mapping(_config(max_token_lifetime_s=bad))
    without_issuer = {**_config(), "access": {"max_token_lifetime_s": bad}}
    with pytest.raises(ConfigError, match="max_token_lifetime_s"):
        EnclaveConfig.from_mapping(without_issuer)


def test_cli_ttl_is_capped_as_a_usage_error() -> None:
    assert parse_ttl("1d") == timedelta(days=1)
    assert parse_ttl("86400") == timedelta(seconds=DEFAULT_MAX_LIFETIME_S)
    for text in ("86401", "2d", "36500d", "99999999999999999999d"):  # the last used to overflow timedelta
        with pytest.raises(typer.BadParameter, match="max_token_lifetime_s"):
            parse_ttl(text)
    assert parse_ttl("2d", max_seconds=3 * 86_400) == timedelta(days=2)


# -- 3. scope refusals are attributed -------------------------------------------------------------------

ISSUER = TokenIssuer(KEY, "ed", ISS, AUD, clock=utc_now)


def _records(lines: Sequence[bytes]) -> list[dict[str, Any]]:
    entries = [json.loads(line) for line in lines]
    return [e["body"] for e in entries if e.get("kind") == "record"]


class _Aborted(Exception):
    pass


class FakeContext:
    """The two ``ServicerContext`` methods ``_protected`` uses on a refusal."""

    def __init__(self, token: str) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    async def abort(self, code: grpc.StatusCode, details: str, trailing: Any = ()) -> None:
        self.aborted = (code, details)
        raise _Aborted


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Any:
    lines: list[bytes] = []
    config = EnclaveConfig.from_mapping(_config())
    nsm = make_local_nsm(Path(tmp_path_factory.mktemp("pki")), {0: bytes([0xA0]) * 48})
    svc = InferenceService(config, nsm, audit_sink=lines.append)
    yield svc, lines
    svc.close()


def test_server_audits_a_scope_refusal_with_the_subject(service: Any) -> None:
    svc, lines = service
    token = ISSUER.issue("bob", [f"embed:{MODEL}"], 600, tier="gold")  # valid, but no infer scope

    async def never(call: CallRecord) -> Any:
        raise AssertionError("the model must not run for a refused call")

    context = FakeContext(token)
    before = len(_records(lines))
    with pytest.raises(_Aborted):
        asyncio.run(svc._protected(context, "Infer", 1, never))
    assert context.aborted == (grpc.StatusCode.PERMISSION_DENIED, "permission denied")
    records = _records(lines)[before:]
    assert len(records) == 1
    record = records[0]
    assert (record["decision"], record["reason"], record["code"]) == ("denied", "scope", "PERMISSION_DENIED")
    assert (record["subject"], record["tier"]) == ("bob", "gold")
    assert isinstance(record["token_id"], str) and len(record["token_id"]) == 32
    assert record["quota"] is None  # refused before the quota was charged
    assert token not in b"".join(lines).decode()


def test_server_audits_an_invalid_token_without_a_subject(service: Any) -> None:
    svc, lines = service
    expired = TokenIssuer(KEY, "ed", ISS, AUD, clock=lambda: utc_now() - timedelta(hours=2))
    context = FakeContext(expired.issue("carol", ["infer:*"], 60))

    async def never(call: CallRecord) -> Any:
        raise AssertionError("unreachable")

    before = len(_records(lines))
    with pytest.raises(_Aborted):
        asyncio.run(svc._protected(context, "Infer", 1, never))
    record = _records(lines)[before:][0]
    assert (record["reason"], record["subject"], record["token_id"]) == ("expired", None, None)


def test_protections_identify_then_authorize(tmp_path: Path) -> None:
    lines: list[bytes] = []
    config = EnclaveConfig.from_mapping(_config())
    guard = Protections(config, ed25519.Ed25519PrivateKey.generate(), pcr0=bytes(48), sink=lines.append,
                        clock=lambda: NOW)
    metadata = [("authorization", f"Bearer {sign_raw(good_claims(scope='info'))}")]
    call = CallRecord(method="Embed", model=MODEL)
    call.principal = guard.identify(metadata)
    with pytest.raises(PermissionDeniedError) as info:
        guard.authorize(call.principal, "Embed")
    decision, why = guard.decision_of(info.value)
    guard.record(call, decision=decision, reason=why, code="PERMISSION_DENIED", latency_us=1)
    records = [(r["subject"], r["token_id"], r["tier"], r["reason"]) for r in _records(lines)]
    assert records == [("alice", "t-1", "gold", "scope")]
    # the one-call form still checks both steps
    with pytest.raises(PermissionDeniedError):
        guard.authenticate(metadata, "Embed")
    assert guard.authenticate(metadata, "Info").subject == "alice"
    closed = EnclaveConfig.from_mapping({**_config(), "access": {}})
    with pytest.raises(AuthenticationError, match="invalid token"):
        Protections(closed, ed25519.Ed25519PrivateKey.generate(), pcr0=bytes(48),
                    sink=lines.append).identify(metadata)
