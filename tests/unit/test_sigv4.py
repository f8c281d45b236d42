"""SigV4 verification against botocore's own signer (the reference); one negative test per step."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from unittest import mock

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials

from nitrovault.errors import KeyReleaseError
from nitrovault.local.kms.sigv4 import Caller, Credentials, verify_request

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
ARN = "arn:aws:iam::111122223333:role/r"
CREDS = {"AKIDEXAMPLE": Credentials("s3cr3t", ARN)}
BODY = b'{"KeyId": "alias/x"}'


def signed(
    body: bytes = BODY,
    *,
    akid: str = "AKIDEXAMPLE",
    secret: str = "s3cr3t",  # noqa: S107 - a test fixture secret
    region: str = "us-east-1",
    service: str = "kms",
    at: datetime = NOW,
    token: str | None = None,
    url: str = "http://127.0.0.1:8123/",
) -> dict[str, str]:
    request = AWSRequest(method="POST", url=url, data=body, headers={
        "X-Amz-Target": "TrentService.Encrypt", "Content-Type": "application/x-amz-json-1.1"})
    with mock.patch("botocore.auth.get_current_datetime", lambda remove_tzinfo=True: at.replace(tzinfo=None)):
        SigV4Auth(BotoCredentials(akid, secret, token), service, region).add_auth(request)
    headers = dict(request.headers.items())
    headers["Host"] = "127.0.0.1:8123"
    return headers


def verify(headers: dict[str, str], body: bytes = BODY, **kwargs: object) -> Caller:
    options: dict[str, object] = {"creds": CREDS, "now": NOW, "region": "us-east-1"}
    options.update(kwargs)
    return verify_request("POST", "/", headers, body, **options)  # type: ignore[arg-type]


def code_of(excinfo: pytest.ExceptionInfo[KeyReleaseError]) -> str | None:
    return excinfo.value.code


def test_botocore_signature_verifies() -> None:
    caller = verify(signed())
    assert caller == Caller("AKIDEXAMPLE", ARN, "us-east-1")
    assert caller.account == "111122223333"


def test_any_region_when_none_is_configured() -> None:
    assert verify(signed(region="eu-west-1"), region=None).region == "eu-west-1"


def test_step1_missing_authorization() -> None:
    headers = signed()
    del headers["Authorization"]
    with pytest.raises(KeyReleaseError) as exc:
        verify(headers)
    assert code_of(exc) == "MissingAuthenticationTokenException"


def test_step1_malformed_authorization() -> None:
    headers = signed()
    headers["Authorization"] = headers["Authorization"].replace("SignedHeaders=", "Headers=")
    with pytest.raises(KeyReleaseError) as exc:
        verify(headers)
    assert code_of(exc) == "IncompleteSignatureException"


def test_step2_unknown_access_key() -> None:
    with pytest.raises(KeyReleaseError) as exc:
        verify(signed(akid="AKIDUNKNOWN"))
    assert code_of(exc) == "UnrecognizedClientException"


def test_step2_session_token_must_match_when_configured() -> None:
    creds = {"AKIDEXAMPLE": Credentials("s3cr3t", ARN, session_token="tok")}
    assert verify(signed(token="tok"), creds=creds).arn == ARN
    with pytest.raises(KeyReleaseError) as exc:
        verify(signed(token="other"), creds=creds)
    assert code_of(exc) == "UnrecognizedClientException"
    assert verify(signed(token="anything")).arn == ARN  # no token configured: any signed token is accepted


def test_step3_wrong_service() -> None:
    with pytest.raises(KeyReleaseError) as exc:
        verify(signed(service="s3"))
    assert code_of(exc) == "InvalidSignatureException"


def test_step3_wrong_region() -> None:
    with pytest.raises(KeyReleaseError) as exc:
        verify(signed(region="eu-west-1"))
    assert code_of(exc) == "InvalidSignatureException"
    assert "region" in str(exc.value)


def test_step3_scope_date_must_match_amz_date() -> None:
    headers = signed()
    headers["Authorization"] = headers["Authorization"].replace("/20250301/", "/20250302/")
    with pytest.raises(KeyReleaseError) as exc:
        verify(headers)
    assert code_of(exc) == "InvalidSignatureException"
    assert "Date in Credential scope" in str(exc.value)


@pytest.mark.parametrize("skew", [timedelta(minutes=16), -timedelta(minutes=16)])
def test_step4_outside_fifteen_minutes(skew: timedelta) -> None:
    with pytest.raises(KeyReleaseError) as exc:
        verify(signed(at=NOW - skew))
    assert code_of(exc) == "InvalidSignatureException"
    assert "Signature expired" in str(exc.value) or "not yet current" in str(exc.value)


def test_step4_within_fifteen_minutes() -> None:
    assert verify(signed(at=NOW - timedelta(minutes=14))).arn == ARN


def test_step5_host_must_be_signed() -> None:
    headers = signed()
    auth = headers["Authorization"]
    headers["Authorization"] = auth.replace("SignedHeaders=content-type;host;", "SignedHeaders=content-type;")
    assert headers["Authorization"] != auth
    with pytest.raises(KeyReleaseError) as exc:
        verify(headers)
    assert code_of(exc) == "InvalidSignatureException"


def test_step6_changed_body() -> None:
    with pytest.raises(KeyReleaseError) as exc:
        verify(signed(), body=BODY.replace(b"alias/x", b"alias/y"))
    assert code_of(exc) == "InvalidSignatureException"


def test_step6_changed_signed_header() -> None:
    headers = signed()
    headers["X-Amz-Target"] = "TrentService.Decrypt"
    with pytest.raises(KeyReleaseError) as exc:
        verify(headers)
    assert code_of(exc) == "InvalidSignatureException"


def test_step6_wrong_secret() -> None:
    with pytest.raises(KeyReleaseError) as exc:
        verify(signed(secret="not-the-secret"))
    assert code_of(exc) == "InvalidSignatureException"
    assert "s3cr3t" not in str(exc.value) and "not-the-secret" not in str(exc.value)


def test_step6_content_sha256_header_must_match_body() -> None:
    headers = signed()
    headers["X-Amz-Content-SHA256"] = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(KeyReleaseError) as exc:
        verify(headers)
    assert code_of(exc) == "InvalidSignatureException"


def test_credentials_repr_hides_the_secret() -> None:
    assert "s3cr3t" not in repr(CREDS["AKIDEXAMPLE"])
