"""Issuing bearer tokens: the owner's side of :mod:`nitrovault.access.tokens`.

The enclave only ever verifies tokens; signing them is the owner's (or the owner's identity provider's)
job, so this module is not part of the measured enclave image (``nitrovault/image.py``). It holds the
issuer the local stack and ``nitrovault token`` use: :class:`TokenIssuer` signs EdDSA / ES256 / RS256
JWTs with the claims :class:`~nitrovault.access.tokens.TokenVerifier` checks, and
:func:`generate_issuer_keys` / :func:`load_issuer` keep its key in a folder (``issuer.key`` 0600,
``jwks.json`` and ``issuer.json`` to bake into the enclave config), rotating without breaking live tokens.

Example::

    generate_issuer_keys(keys_dir)
    token = load_issuer(keys_dir).issue("alice", ["embed:minilm"], ttl=3600)
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from nitrovault.clock import Clock, utc_now
from nitrovault.errors import ConfigError
from nitrovault.files import write_atomic

__all__ = [
    "LOCAL_AUDIENCE",
    "LOCAL_ISSUER",
    "PrivateKey",
    "TokenIssuer",
    "generate_issuer_keys",
    "jwk_thumbprint",
    "load_issuer",
    "public_jwk",
]


PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(key: PrivateKey | ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
               kid: str | None = None) -> dict[str, str]:
    """The public JWK of ``key`` with ``kid`` (default: its RFC 7638 thumbprint) and ``alg``/``use``."""
    pub = key.public_key() if isinstance(key, PrivateKey) else key
    if isinstance(pub, ed25519.Ed25519PublicKey):
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": _b64url(raw)}
        alg = "EdDSA"
    elif isinstance(pub, ec.EllipticCurvePublicKey) and isinstance(pub.curve, ec.SECP256R1):
        numbers = pub.public_numbers()
        jwk = {"kty": "EC", "crv": "P-256", "x": _b64url(numbers.x.to_bytes(32, "big")),
               "y": _b64url(numbers.y.to_bytes(32, "big"))}
        alg = "ES256"
    elif isinstance(pub, rsa.RSAPublicKey):
        rn = pub.public_numbers()
        jwk = {"kty": "RSA", "e": _b64url(rn.e.to_bytes((rn.e.bit_length() + 7) // 8, "big")),
               "n": _b64url(rn.n.to_bytes((rn.n.bit_length() + 7) // 8, "big"))}
        alg = "RS256"
    else:
        raise ConfigError("issuer keys must be Ed25519, EC P-256 or RSA")
    return {**jwk, "kid": kid or jwk_thumbprint(jwk), "alg": alg, "use": "sig"}


def jwk_thumbprint(jwk: Mapping[str, str]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url) of the key's required members."""
    members = {"OKP": ("crv", "kty", "x"), "EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n")}
    names = members.get(jwk.get("kty", ""))
    if names is None:
        raise ConfigError(f"no thumbprint for key type {jwk.get('kty')!r}")
    canonical = json.dumps({n: jwk[n] for n in names}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode()).digest())


class TokenIssuer:
    """Signs tokens for the local stack (production tokens come from the owner's own issuer)."""

    def __init__(self, key: PrivateKey, kid: str, issuer: str, audience: str, *, clock: Clock = utc_now,
                 rng: Callable[[int], bytes] = os.urandom) -> None:
        self._jwk = public_jwk(key, kid)
        self._key = key
        self._kid = kid
        self._alg = self._jwk["alg"]
        self._issuer = issuer
        self._audience = audience
        self._clock = clock
        self._rng = rng

    @property
    def jwks(self) -> dict[str, Any]:
        """A JWKS holding just this issuer's public key."""
        return {"keys": [self._jwk]}

    def issue(self, subject: str, scopes: Iterable[str], ttl: timedelta | float,
              tier: str | None = None) -> str:
        """A signed token for ``subject`` valid from now for ``ttl`` (a timedelta or seconds)."""
        seconds = ttl.total_seconds() if isinstance(ttl, timedelta) else float(ttl)
        if not subject or seconds <= 0:
            raise ConfigError("a token needs a subject and a positive ttl")
        scope_list = list(scopes)
        if any(not s or any(c.isspace() for c in s) for s in scope_list):
            raise ConfigError("scopes must be non-empty and contain no whitespace")
        now = int(self._clock().timestamp())
        claims: dict[str, Any] = {
            "iss": self._issuer, "aud": self._audience, "sub": subject,
            "iat": now, "nbf": now, "exp": now + math.ceil(seconds),
            "jti": self._rng(16).hex(), "scope": " ".join(scope_list),
        }
        if tier is not None:
            claims["tier"] = tier
        return jwt.encode(claims, self._key, algorithm=self._alg, headers={"kid": self._kid, "typ": "JWT"})


# -- local key files ----------------------------------------------------------------------------------------

_KEY_FILE = "issuer.key"
_JWKS_FILE = "jwks.json"
_META_FILE = "issuer.json"
LOCAL_ISSUER = "nitrovault-local"
LOCAL_AUDIENCE = "nitrovault"


def generate_issuer_keys(directory: Path | str, *, issuer: str = LOCAL_ISSUER, audience: str = LOCAL_AUDIENCE,
                         rotate: bool = False) -> tuple[Path, Path]:
    """Create (or keep) the local issuer's Ed25519 key; return ``(private key file, jwks.json)``.

    ``DIR/issuer.key`` (PKCS#8 PEM, 0600) is the current signing key, ``DIR/jwks.json`` the public keys to
    bake into the enclave config, ``DIR/issuer.json`` names the current kid, issuer and audience. An existing
    key is kept; ``rotate=True`` makes a new current key and keeps the old public keys in the JWKS, so
    tokens signed before the rotation verify until they expire.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_path, jwks_path, meta_path = directory / _KEY_FILE, directory / _JWKS_FILE, directory / _META_FILE
    if key_path.exists() and jwks_path.exists() and meta_path.exists() and not rotate:
        return key_path, jwks_path
    old_keys: list[dict[str, Any]] = []
    if jwks_path.exists():
        old_keys = list(json.loads(jwks_path.read_text()).get("keys", []))
    key = ed25519.Ed25519PrivateKey.generate()
    jwk = public_jwk(key)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_atomic(key_path, pem, 0o600)
    keys = [jwk, *[k for k in old_keys if k.get("kid") != jwk["kid"]]]
    write_atomic(jwks_path, (json.dumps({"keys": keys}, indent=2) + "\n").encode(), 0o644)
    meta = {"kid": jwk["kid"], "issuer": issuer, "audience": audience}
    write_atomic(meta_path, (json.dumps(meta, indent=2) + "\n").encode(), 0o644)
    return key_path, jwks_path


def load_issuer(directory: Path | str, *, clock: Clock = utc_now) -> TokenIssuer:
    """The :class:`TokenIssuer` of a directory made by :func:`generate_issuer_keys`."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / _META_FILE).read_text())
        key = serialization.load_pem_private_key((directory / _KEY_FILE).read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"no usable issuer keys in {directory}: {type(exc).__name__}") from None
    if not isinstance(key, PrivateKey):
        raise ConfigError("issuer.key is not an Ed25519, EC or RSA private key")
    return TokenIssuer(key, meta["kid"], meta["issuer"], meta["audience"], clock=clock)
