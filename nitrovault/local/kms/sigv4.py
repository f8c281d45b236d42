"""AWS Signature Version 4 verification for the KMS emulator (server side, pure).

The steps follow the AWS SigV4 documentation ("Create a signed AWS API request"), and are numbered:

1. Parse ``Authorization: AWS4-HMAC-SHA256 Credential=AKID/DATE/REGION/SERVICE/aws4_request,
   SignedHeaders=..., Signature=...``.
2. Look up the access key id (unknown: ``UnrecognizedClientException``); a configured session token
   must match ``x-amz-security-token``.
3. Check the credential scope: service ``kms``, terminator ``aws4_request``, date = the x-amz-date day,
   region = one of the configured regions when some are configured.
4. Check ``x-amz-date`` is within 15 minutes of the verifier's clock (``InvalidSignatureException``,
   "Signature expired").
5. ``host`` and ``x-amz-date`` must be signed.
6. Rebuild the canonical request (method, URI, query, signed headers, SHA-256 of the body actually
   received) and the string to sign; derive the signing key; compare signatures in constant time.

Invariants: the secret key never appears in an error or log; the payload hash is always recomputed
from the body received (a client-sent ``x-amz-content-sha256`` must equal it). Time is a parameter.

Hand-written because botocore only signs (its ``SigV4Auth`` is used in the tests as the reference
implementation); no maintained library verifies SigV4 on the server side with the stdlib alone.

Example::

    >>> from datetime import datetime, timezone
    >>> creds = {"AKIDEXAMPLE": Credentials("secret", "arn:aws:iam::111122223333:role/r")}
    >>> verify_request("POST", "/", {"host": "x"}, b"", creds=creds, now=datetime.now(timezone.utc))
    Traceback (most recent call last):
    ...
    nitrovault.errors.KeyReleaseError: Request is missing Authentication Token
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl, quote

from nitrovault.errors import KeyReleaseError

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "kms"
MAX_SKEW = timedelta(minutes=15)
_AUTH_RE = re.compile(
    r"^AWS4-HMAC-SHA256\s+Credential=(?P<cred>[^,\s]+),\s*SignedHeaders=(?P<signed>[^,\s]+),"
    r"\s*Signature=(?P<sig>[0-9a-f]{64})$"
)
_AMZ_DATE = "%Y%m%dT%H%M%SZ"


@dataclass(frozen=True)
class Credentials:
    """What the emulator knows about one access key id (from the ``--principals`` file)."""

    secret: str = ""
    arn: str = ""
    #: when set, requests must carry exactly this ``x-amz-security-token``
    session_token: str | None = None

    def __repr__(self) -> str:  # the secret must never reach a log line
        return f"Credentials(arn={self.arn!r})"


@dataclass(frozen=True)
class Caller:
    """An authenticated request's principal."""

    access_key_id: str
    arn: str
    region: str

    @property
    def account(self) -> str:
        parts = self.arn.split(":")
        return parts[4] if len(parts) > 4 else ""


def _invalid_signature(message: str) -> KeyReleaseError:
    return KeyReleaseError(message, code="InvalidSignatureException")


def _canonical_uri(path: str) -> str:
    # botocore: quote(normalize_url_path(path), safe='/~'); KMS only uses "/".
    return quote(path or "/", safe="/~")


def _canonical_query(query: str) -> str:
    pairs = parse_qsl(query, keep_blank_values=True)
    encoded = sorted((quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, v in pairs)
    return "&".join(f"{k}={v}" for k, v in encoded)


def _header_value(value: str) -> str:
    return " ".join(value.split())


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    k = _hmac(("AWS4" + secret).encode("utf-8"), date)
    k = _hmac(k, region)
    k = _hmac(k, service)
    return _hmac(k, "aws4_request")


def verify_request(
    method: str,
    target: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    creds: Mapping[str, Credentials],
    now: datetime,
    region: str | Collection[str] | None = None,
) -> Caller:
    """Verify one request; ``headers`` keys are compared case-insensitively. Returns the caller.

    ``region``: the region (or regions) the scope must name; ``None`` accepts any.

    Raises :class:`KeyReleaseError` whose ``code`` is the KMS error code to answer with.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    # Step 1: the Authorization header.
    auth = lower.get("authorization")
    if not auth:
        raise KeyReleaseError("Request is missing Authentication Token",
                              code="MissingAuthenticationTokenException")
    match = _AUTH_RE.match(auth.strip())
    if match is None:
        raise KeyReleaseError("Authorization header is not a valid AWS4-HMAC-SHA256 header",
                              code="IncompleteSignatureException")
    scope_parts = match["cred"].split("/")
    if len(scope_parts) != 5:
        raise KeyReleaseError("Credential is not AKID/date/region/service/aws4_request",
                              code="IncompleteSignatureException")
    akid, date, scope_region, service, terminator = scope_parts
    # Step 2: the access key id.
    known = creds.get(akid)
    if known is None:
        raise KeyReleaseError("The security token included in the request is invalid.",
                              code="UnrecognizedClientException")
    token = lower.get("x-amz-security-token")
    if known.session_token is not None and not (
        token is not None and hmac.compare_digest(token.encode(), known.session_token.encode())
    ):
        raise KeyReleaseError("The security token included in the request is invalid.",
                              code="UnrecognizedClientException")
    # Step 3: the credential scope.
    amz_date = lower.get("x-amz-date", "")
    try:
        signed_at = datetime.strptime(amz_date, _AMZ_DATE).replace(tzinfo=UTC)
    except ValueError:
        raise KeyReleaseError("x-amz-date is missing or malformed",
                              code="IncompleteSignatureException") from None
    if service != SERVICE or terminator != "aws4_request":
        raise _invalid_signature(f"Credential should be scoped to correct service: '{SERVICE}'.")
    if date != amz_date[:8]:
        raise _invalid_signature("Date in Credential scope does not match YYYYMMDD from x-amz-date.")
    allowed = None if region is None else {region} if isinstance(region, str) else set(region)
    if allowed is not None and scope_region not in allowed:
        raise _invalid_signature(f"Credential should be scoped to a valid region, not '{scope_region}'.")
    # Step 4: freshness.
    if abs(now - signed_at) > MAX_SKEW:
        raise _invalid_signature(
            f"Signature expired: {amz_date} is now earlier than "
            f"{(now - MAX_SKEW).strftime(_AMZ_DATE)} ({now.strftime(_AMZ_DATE)} - 15 min.)"
            if signed_at < now
            else f"Signature not yet current: {amz_date} is still later than "
            f"{(now + MAX_SKEW).strftime(_AMZ_DATE)} ({now.strftime(_AMZ_DATE)} + 15 min.)"
        )
    # Step 5: required signed headers.
    signed = match["signed"].split(";")
    if signed != sorted(signed) or "host" not in signed or "x-amz-date" not in signed:
        raise _invalid_signature("SignedHeaders must be sorted and include host and x-amz-date.")
    if any(name not in lower for name in signed):
        raise _invalid_signature("A signed header is missing from the request.")
    # Step 6: recompute.
    payload_hash = hashlib.sha256(body).hexdigest()
    claimed = lower.get("x-amz-content-sha256")
    if claimed is not None and claimed != payload_hash:
        raise _invalid_signature("The provided x-amz-content-sha256 header does not match what was computed.")
    path, _, query = target.partition("?")
    canonical_request = "\n".join(
        [
            method.upper(),
            _canonical_uri(path),
            _canonical_query(query),
            "".join(f"{name}:{_header_value(lower[name])}\n" for name in signed),
            ";".join(signed),
            payload_hash,
        ]
    )
    scope = f"{date}/{scope_region}/{service}/{terminator}"
    string_to_sign = "\n".join(
        [ALGORITHM, amz_date, scope, hashlib.sha256(canonical_request.encode("utf-8")).hexdigest()]
    )
    key = signing_key(known.secret, date, scope_region, service)
    expected = hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, match["sig"]):
        raise _invalid_signature(
            "The request signature we calculated does not match the signature you provided. "
            "Check your AWS Secret Access Key and signing method. Consult the service documentation "
            "for details."
        )
    return Caller(access_key_id=akid, arn=known.arn, region=scope_region)
