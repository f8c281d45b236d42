"""Bearer tokens: verify signed JWTs inside the enclave (issuing is :mod:`nitrovault.owner.issuer`).

Invariants (enforced by :class:`TokenVerifier`, in this order):

1. the token is at most :data:`MAX_TOKEN_BYTES` (8 KiB) of ASCII, three dot-separated parts;
2. its header names a ``kid`` that is in the baked JWKS (unknown kid: failure, no key fetching ever) and
   an ``alg`` equal to the one algorithm that key allows: ES256 (EC P-256), EdDSA (OKP Ed25519) or RS256
   (RSA >= 2048 bits). ``none`` and HS* never verify: there is no code path that accepts them;
3. the JWS signature verifies under that key (PyJWT's ``PyJWS``: the cryptography is a library's);
4. the claims: ``iss`` equals the configured issuer; ``aud`` (string or list) contains the audience;
   ``exp``, ``nbf`` and ``iat`` are NumericDates (RFC 7519 §2): JSON numbers, not booleans, finite, in
   ``[0, MAX_TIMESTAMP]`` (year 9999), else ``bad-exp`` / ``bad-nbf`` / ``bad-iat``; ``exp`` (required) is
   after now - leeway; ``nbf`` (optional) is before now + leeway; ``iat`` (required) is before
   now + leeway and not after ``exp``; the lifetime is capped (``lifetime``): ``exp - iat`` is at most
   ``max_lifetime_s`` and ``exp`` at most ``max_lifetime_s`` + leeway from now, so a long-lived token
   cannot pass by claiming an ``iat`` just before its ``exp``; ``sub`` is a non-empty string; ``scope``
   (optional) is a space-separated string; ``tier`` and ``jti`` are optional strings;
5. the scopes allow ``method`` on ``model`` (grammar below; :meth:`TokenVerifier.authorize`).

Failures of 1-4 raise :class:`~nitrovault.errors.AuthenticationError` (UNAUTHENTICATED), of 5
:class:`~nitrovault.errors.PermissionDeniedError` (PERMISSION_DENIED). ``str(err)`` is always the generic
"invalid token" / "permission denied"; ``err.reason`` names the failed check for the audit log only. No
other exception escapes for any token or claim value (``tests/unit/test_access_hardening.py`` fuzzes it).
Checks 1-4 (:meth:`TokenVerifier.authenticate`) and 5 (:meth:`TokenVerifier.authorize`) can run as two
steps, so that a caller who is refused for scope is still known (and audited) by name.

Verified-signature cache: clients send the same bearer token on every call, and an asymmetric signature
check costs 50-150 µs. The verifier keeps the claims of the last ``cache_size`` tokens whose signature
verified, keyed by the exact token string (so a hit means these exact bytes verified before under a baked
key); steps 4-5 (times, issuer, audience, scopes) still run on every call against the current clock.

Why claims are checked here and not by ``jwt.decode``: time is a parameter (``clock``) and PyJWT reads the
system clock; and the audit log needs the precise reason, which we get by checking each claim ourselves.

Scope grammar (``scope`` claim, RFC 8693 style, space-separated)::

    scope       = scope-token *( SP scope-token )
    scope-token = "info" / "attest" / action ":" model
    action      = "infer" / "embed" / "generate"
    model       = "*" / model-id          ; model-id: the enclave config's model_id, exactly

``Info`` and ``Attest`` are allowed for every valid token ("info"/"attest" scopes are accepted and
ignored); ``Infer`` needs ``infer:<model>`` or ``infer:*``; ``Embed`` needs ``embed:<model>`` or
``embed:*``; ``Generate`` needs ``generate:<model>`` or ``generate:*``. Unknown scope tokens are ignored
(forward compatible), an unknown method is denied.

Example::

    verifier = TokenVerifier("https://issuer.example", "nitrovault", jwks, max_lifetime_s=3600)
    principal = verifier.verify(token, method="Embed", model="all-minilm-l6-v2")
    # or in two steps, knowing who was refused:
    principal = verifier.authenticate(token)
    verifier.authorize(principal, method="Embed", model="all-minilm-l6-v2")
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from nitrovault.clock import Clock, utc_now
from nitrovault.errors import AuthenticationError, ConfigError, PermissionDeniedError

__all__ = [
    "ALGORITHMS",
    "DEFAULT_MAX_LIFETIME_S",
    "MAX_LIFETIME_S",
    "MAX_TIMESTAMP",
    "MAX_TOKEN_BYTES",
    "Principal",
    "TokenVerifier",
    "required_scopes",
]

MAX_TOKEN_BYTES = 8 * 1024
#: The only algorithms that ever verify, keyed by what the JWKS entry is.
ALGORITHMS = frozenset({"ES256", "EdDSA", "RS256"})
MIN_RSA_BITS = 2048
#: method (last segment of the gRPC path, any case) -> scope action; ``None``: any valid token may call it.
METHOD_ACTIONS: Mapping[str, str | None] = MappingProxyType(
    {"infer": "infer", "embed": "embed", "generate": "generate", "info": None, "attest": None}
)
_MAX_SUBJECT = 256
#: Longest token lifetime (``exp - iat``, and ``exp - now``) accepted unless configured otherwise: one day.
DEFAULT_MAX_LIFETIME_S = 86_400
#: The largest ``max_lifetime_s`` that may be configured (366 days): a cap above it caps nothing.
MAX_LIFETIME_S = 366 * 86_400
#: Largest NumericDate accepted, 9999-12-31T23:59:59Z: the last second ``datetime`` can represent.
MAX_TIMESTAMP = 253_402_300_799


@dataclass(frozen=True)
class Principal:
    """Who a verified token speaks for."""

    subject: str  #: ``sub``
    scopes: frozenset[str]  #: the ``scope`` claim, split
    tier: str | None  #: ``tier`` claim: quota tier; ``None`` means the config's default tier
    token_id: str | None  #: ``jti``, for the audit log
    expires_at: datetime  #: ``exp``, aware UTC


# -- JWKS -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Key:
    kid: str
    alg: str
    key: Any  # a cryptography public key object


def _alg_for(jwk: Mapping[str, Any]) -> str:
    """The one algorithm a JWK may be used with, from its ``kty``/``crv`` (and ``alg`` when present)."""
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if kty == "EC" and crv == "P-256":
        alg = "ES256"
    elif kty == "OKP" and crv == "Ed25519":
        alg = "EdDSA"
    elif kty == "RSA":
        alg = "RS256"
    else:
        raise ConfigError(f"JWKS key {jwk.get('kid')!r}: unsupported key type {kty}/{crv}")
    declared = jwk.get("alg")
    if declared is not None and declared != alg:
        raise ConfigError(f"JWKS key {jwk.get('kid')!r}: alg {declared!r} does not fit a {kty} key ({alg})")
    if jwk.get("use") not in (None, "sig"):
        raise ConfigError(f"JWKS key {jwk.get('kid')!r}: use must be 'sig'")
    if any(name in jwk for name in ("d", "p", "q", "dp", "dq", "qi", "k")):
        raise ConfigError(f"JWKS key {jwk.get('kid')!r} holds private material: bake only public keys")
    return alg


def _load_jwks(jwks: Mapping[str, Any]) -> dict[str, _Key]:
    entries = jwks.get("keys")
    if not isinstance(entries, list) or not entries:
        raise ConfigError("JWKS must be an object with a non-empty 'keys' list")
    keys: dict[str, _Key] = {}
    for entry in entries:
        if not isinstance(entry, Mapping):
            raise ConfigError("JWKS keys must be objects")
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid:
            raise ConfigError("every JWKS key needs a non-empty string 'kid'")
        if kid in keys:
            raise ConfigError(f"duplicate kid {kid!r} in JWKS")
        alg = _alg_for(entry)
        try:
            key = jwt.PyJWK(dict(entry), algorithm=alg).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as exc:
            raise ConfigError(f"JWKS key {kid!r} cannot be loaded: {type(exc).__name__}") from None
        if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
            raise ConfigError(f"JWKS key {kid!r}: RSA keys must have at least {MIN_RSA_BITS} bits")
        if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
            raise ConfigError(f"JWKS key {kid!r} is not a public key")
        keys[kid] = _Key(kid, alg, key)
    return keys


def required_scopes(method: str, model: str) -> frozenset[str] | None:
    """Scopes any one of which allows ``method`` on ``model``; ``None``: every valid token may call it.

    Raises :class:`PermissionDeniedError` (reason ``unknown-method``) for a method outside the grammar.
    """
    name = method.rsplit("/", 1)[-1].lower()
    if name not in METHOD_ACTIONS:
        raise PermissionDeniedError("unknown-method")
    action = METHOD_ACTIONS[name]
    if action is None:
        return None
    return frozenset({f"{action}:{model}", f"{action}:*"})


# -- verification ------------------------------------------------------------------------------------------


def _number(claims: Mapping[str, Any], name: str, *, required: bool) -> float | None:
    """A NumericDate claim as a float, or ``bad-<name>``: the range is checked on the JSON value itself,
    before any conversion, because ``float()`` of a huge integer and ``datetime`` of a huge float raise
    ``OverflowError`` (which would escape as INTERNAL)."""
    value = claims.get(name)
    if value is None:
        if required:
            raise AuthenticationError(f"missing-{name}")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthenticationError(f"bad-{name}")
    if not 0 <= value <= MAX_TIMESTAMP:  # False for NaN too; int comparisons never overflow
        raise AuthenticationError(f"bad-{name}")
    return float(value)


class TokenVerifier:
    """Checks bearer tokens against the issuer, audience and JWKS baked into the measured config."""

    def __init__(self, issuer: str, audience: str, jwks: Mapping[str, Any], *, leeway_s: float = 30,
                 max_lifetime_s: float = DEFAULT_MAX_LIFETIME_S, clock: Clock = utc_now,
                 cache_size: int = 1024) -> None:
        if not issuer or not audience:
            raise ConfigError("issuer and audience must not be empty")
        if not 0 <= leeway_s <= 300:
            raise ConfigError("leeway_s must be between 0 and 300 seconds")
        if isinstance(max_lifetime_s, bool) or not 0 < max_lifetime_s <= MAX_LIFETIME_S:
            raise ConfigError(f"max_lifetime_s must be more than 0 and at most {MAX_LIFETIME_S} seconds")
        self._issuer = issuer
        self._audience = audience
        self._keys = _load_jwks(jwks)
        self._leeway = float(leeway_s)
        self._max_lifetime = float(max_lifetime_s)
        self._clock = clock
        self._jws = jwt.PyJWS(algorithms=sorted(ALGORITHMS))
        self._cache_size = max(0, cache_size)
        self._cache: OrderedDict[str, Mapping[str, Any]] = OrderedDict()
        self._cache_lock = threading.Lock()

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)

    @property
    def max_lifetime_s(self) -> float:
        return self._max_lifetime

    def verify(self, token: str, *, method: str, model: str) -> Principal:
        """Run checks 1-5 (module docstring); return the principal or raise an ``AccessError``."""
        principal = self.authenticate(token)
        self.authorize(principal, method=method, model=model)
        return principal

    @staticmethod
    def authorize(principal: Principal, *, method: str, model: str) -> None:
        """Check 5 only: may this (already authenticated) principal call ``method`` on ``model``?

        Raises :class:`PermissionDeniedError` (reason ``scope`` or ``unknown-method``).
        """
        allowed = required_scopes(method, model)
        if allowed is not None and not (allowed & principal.scopes):
            raise PermissionDeniedError("scope")

    def authenticate(self, token: str) -> Principal:
        """Checks 1-4 only: who is calling, regardless of what they call."""
        if not isinstance(token, str):
            raise AuthenticationError("malformed")
        with self._cache_lock:
            cached = self._cache.get(token)
            if cached is not None:
                self._cache.move_to_end(token)
        if cached is not None:
            return self._check_claims(cached)
        claims = self._verify_signature(token)
        principal = self._check_claims(claims)  # only tokens that pass now are worth caching
        if self._cache_size:
            with self._cache_lock:
                self._cache[token] = MappingProxyType(claims)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return principal

    def _verify_signature(self, token: str) -> dict[str, Any]:
        # 1. size and shape
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthenticationError("too-large")
        if not token.isascii() or token.count(".") != 2:
            raise AuthenticationError("malformed")
        # 2. kid and alg from the (not yet trusted) header
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthenticationError("malformed") from None
        kid = header.get("kid")
        if not isinstance(kid, str) or kid not in self._keys:
            raise AuthenticationError("unknown-kid")
        key = self._keys[kid]
        if header.get("alg") != key.alg:
            raise AuthenticationError("wrong-alg")
        # 3. signature, with exactly the key's one algorithm allowed
        try:
            payload = self._jws.decode(token, key.key, algorithms=[key.alg])
        except jwt.InvalidSignatureError:
            raise AuthenticationError("bad-signature") from None
        except jwt.PyJWTError:
            raise AuthenticationError("malformed") from None
        try:
            claims = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            raise AuthenticationError("malformed") from None
        if not isinstance(claims, dict):
            raise AuthenticationError("malformed")
        return claims  # 4. claims: checked by the caller, on every call

    def _check_claims(self, claims: Mapping[str, Any]) -> Principal:
        if claims.get("iss") != self._issuer:
            raise AuthenticationError("wrong-issuer")
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if self._audience not in [a for a in audiences if isinstance(a, str)]:
            raise AuthenticationError("wrong-audience")
        now = self._clock().timestamp()
        exp = _number(claims, "exp", required=True)
        nbf = _number(claims, "nbf", required=False)
        iat = _number(claims, "iat", required=True)
        assert exp is not None and iat is not None  # narrowed by required=True
        if now > exp + self._leeway:
            raise AuthenticationError("expired")
        if nbf is not None and now + self._leeway < nbf:
            raise AuthenticationError("not-yet-valid")
        if now + self._leeway < iat or iat > exp:
            raise AuthenticationError("bad-iat")
        # The cap holds against the issuer's claim (exp - iat) and against our clock (exp - now, plus the
        # leeway the issuer's clock may run ahead by). While iat is required and at most now + leeway, the
        # second half follows from the first; it is kept so that the cap never rests on iat alone.
        if exp - iat > self._max_lifetime or exp - now > self._max_lifetime + self._leeway:
            raise AuthenticationError("lifetime")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > _MAX_SUBJECT:
            raise AuthenticationError("bad-subject")
        scope = claims.get("scope", "")
        if not isinstance(scope, str):
            raise AuthenticationError("bad-scope")
        tier, jti = claims.get("tier"), claims.get("jti")
        if tier is not None and not isinstance(tier, str):
            raise AuthenticationError("bad-tier")
        if jti is not None and not isinstance(jti, str):
            raise AuthenticationError("bad-jti")
        return Principal(
            subject=sub,
            scopes=frozenset(scope.split()),
            tier=tier,
            token_id=jti,
            expires_at=datetime.fromtimestamp(exp, UTC),
        )

