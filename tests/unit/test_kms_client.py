"""KmsClient over a botocore Stubber: the Recipient path, the fail-closed checks and every error mapping.

The Stubber is a unit-test double only; the integration against the KMS emulator lives elsewhere.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from botocore.exceptions import (
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
    ProxyConnectionError,
    ReadTimeoutError,
    SSLError,
)
from botocore.stub import Stubber
from urllib3.exceptions import ProxyError
from urllib3.exceptions import SSLError as URLLib3SSLError
from urllib3.util.ssl_match_hostname import CertificateError as HostnameMismatch

from nitrovault.errors import (
    ConfigError,
    EnvelopeError,
    InvalidCiphertextError,
    KeyAccessDeniedError,
    KeyNotFoundError,
    KeyReleaseError,
    KeyUnavailableError,
    KmsTlsError,
    KmsTransportError,
)
from nitrovault.kms import (
    AwsCredentials,
    DataKey,
    KmsClient,
    Recipient,
    RecipientKey,
    build_ciphertext_for_recipient,
    kms_client_from_env,
)
from nitrovault.kms.client import _translate

KEY_ARN = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
CONTEXT = {"model": "m1", "version": "3"}
DOC = b'\x84D\xa1\x018"\xa0fake-attestation-document'
BLOB = b"\x01\x02\x03kms-ciphertext-blob"
SECRET = b"S" * 32


@pytest.fixture(scope="module")
def recipient_key() -> RecipientKey:
    return RecipientKey.generate()


@pytest.fixture
def recipient(recipient_key: RecipientKey) -> Recipient:
    return Recipient(attestation_document=DOC, key=recipient_key)


@pytest.fixture(scope="module")
def boto() -> Any:
    return kms_client_from_env(
        "us-east-1",
        endpoint_url="http://127.0.0.1:9",
        credentials=AwsCredentials("AKIDEXAMPLE", "not-a-real-secret", "token"),
    )


@pytest.fixture
def stub(boto: Any) -> Iterator[Stubber]:
    with Stubber(boto) as stubber:
        yield stubber
        stubber.assert_no_pending_responses()


def _recipient_param() -> dict[str, Any]:
    return {"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": DOC}


# -- RecipientKey / Recipient ------------------------------------------------------------------------


def test_recipient_key_is_rsa2048_spki_and_hides_the_private_key(recipient_key: RecipientKey) -> None:
    from cryptography.hazmat.primitives import serialization

    pub = serialization.load_der_public_key(recipient_key.public_key_der)
    assert pub.key_size == 2048  # type: ignore[union-attr]
    assert pub.public_numbers().e == 65537  # type: ignore[union-attr]
    assert "private_key" not in repr(recipient_key)
    with pytest.raises(AttributeError):
        recipient_key.private_key = recipient_key.private_key  # type: ignore[misc]


def test_recipient_key_refuses_small_or_non_rsa_keys() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    with pytest.raises(ValueError):
        RecipientKey(rsa.generate_private_key(public_exponent=65537, key_size=1024))  # noqa: S505
    with pytest.raises(TypeError):
        RecipientKey(ec.generate_private_key(ec.SECP256R1()))  # type: ignore[arg-type]


def test_recipient_to_boto(recipient: Recipient) -> None:
    assert recipient.to_boto() == _recipient_param()
    with pytest.raises(ValueError):
        Recipient(attestation_document=b"", key=recipient.key)


# -- the Recipient path ------------------------------------------------------------------------------


def test_decrypt_with_recipient_round_trip(stub: Stubber, boto: Any, recipient: Recipient) -> None:
    envelope = build_ciphertext_for_recipient(SECRET, recipient.key.public_key_der)
    stub.add_response(
        "decrypt",
        {"KeyId": KEY_ARN, "CiphertextForRecipient": envelope, "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"},
        expected_params={
            "CiphertextBlob": BLOB,
            "KeyId": KEY_ARN,
            "EncryptionContext": CONTEXT,
            "Recipient": _recipient_param(),
        },
    )
    assert (
        KmsClient(boto).decrypt(BLOB, key_id=KEY_ARN, encryption_context=CONTEXT, recipient=recipient)
        == SECRET
    )


def test_decrypt_with_recipient_refuses_plaintext_in_the_answer(
    stub: Stubber, boto: Any, recipient: Recipient
) -> None:
    envelope = build_ciphertext_for_recipient(SECRET, recipient.key.public_key_der)
    stub.add_response("decrypt", {"KeyId": KEY_ARN, "CiphertextForRecipient": envelope, "Plaintext": SECRET})
    with pytest.raises(KeyReleaseError, match="Plaintext although a Recipient") as info:
        KmsClient(boto).decrypt(BLOB, recipient=recipient)
    assert SECRET.decode() not in str(info.value)


def test_decrypt_with_recipient_requires_ciphertext_for_recipient(
    stub: Stubber, boto: Any, recipient: Recipient
) -> None:
    stub.add_response("decrypt", {"KeyId": KEY_ARN})
    with pytest.raises(KeyReleaseError, match="no CiphertextForRecipient"):
        KmsClient(boto).decrypt(BLOB, recipient=recipient)


def test_decrypt_with_recipient_envelope_for_another_key_fails(
    stub: Stubber, boto: Any, recipient: Recipient
) -> None:
    other = RecipientKey.generate()
    envelope = build_ciphertext_for_recipient(SECRET, other.public_key_der)
    stub.add_response("decrypt", {"KeyId": KEY_ARN, "CiphertextForRecipient": envelope})
    with pytest.raises(EnvelopeError):
        KmsClient(boto).decrypt(BLOB, recipient=recipient)


def test_decrypt_without_recipient(stub: Stubber, boto: Any) -> None:
    stub.add_response(
        "decrypt", {"KeyId": KEY_ARN, "Plaintext": SECRET}, expected_params={"CiphertextBlob": BLOB}
    )
    assert KmsClient(boto).decrypt(BLOB) == SECRET


def test_decrypt_without_recipient_requires_plaintext(stub: Stubber, boto: Any) -> None:
    stub.add_response("decrypt", {"KeyId": KEY_ARN})
    with pytest.raises(KeyReleaseError, match="no Plaintext"):
        KmsClient(boto).decrypt(BLOB)


def test_generate_data_key_with_recipient(stub: Stubber, boto: Any, recipient: Recipient) -> None:
    envelope = build_ciphertext_for_recipient(SECRET, recipient.key.public_key_der)
    stub.add_response(
        "generate_data_key",
        {"KeyId": KEY_ARN, "CiphertextBlob": BLOB, "CiphertextForRecipient": envelope},
        expected_params={
            "KeyId": "alias/model",
            "EncryptionContext": CONTEXT,
            "NumberOfBytes": 32,
            "Recipient": _recipient_param(),
        },
    )
    key = KmsClient(boto).generate_data_key("alias/model", encryption_context=CONTEXT, recipient=recipient)
    assert key == DataKey(plaintext=bytearray(SECRET), ciphertext_blob=BLOB, key_id=KEY_ARN)
    assert isinstance(key.plaintext, bytearray)
    assert "SSSS" not in repr(key)
    key.wipe()
    assert key.plaintext == bytearray(32)


def test_generate_data_key_with_recipient_refuses_plaintext(
    stub: Stubber, boto: Any, recipient: Recipient
) -> None:
    envelope = build_ciphertext_for_recipient(SECRET, recipient.key.public_key_der)
    stub.add_response(
        "generate_data_key",
        {"KeyId": KEY_ARN, "CiphertextBlob": BLOB, "CiphertextForRecipient": envelope, "Plaintext": SECRET},
    )
    with pytest.raises(KeyReleaseError, match="Plaintext although a Recipient"):
        KmsClient(boto).generate_data_key("alias/model", encryption_context=CONTEXT, recipient=recipient)


def test_generate_data_key_plain_and_length_check(stub: Stubber, boto: Any) -> None:
    stub.add_response(
        "generate_data_key",
        {"KeyId": KEY_ARN, "CiphertextBlob": BLOB, "Plaintext": b"k" * 16},
        expected_params={"KeyId": "alias/model", "EncryptionContext": CONTEXT, "NumberOfBytes": 16},
    )
    stub.add_response("generate_data_key", {"KeyId": KEY_ARN, "CiphertextBlob": BLOB, "Plaintext": b"k" * 31})
    client = KmsClient(boto)
    key = client.generate_data_key("alias/model", encryption_context=CONTEXT, number_of_bytes=16)
    assert key.plaintext == b"k" * 16 and key.ciphertext_blob == BLOB and key.key_id == KEY_ARN
    with pytest.raises(KeyReleaseError, match="wrong length"):
        client.generate_data_key("alias/model", encryption_context=CONTEXT)


def test_generate_data_key_requires_ciphertext_blob(stub: Stubber, boto: Any) -> None:
    stub.add_response("generate_data_key", {"KeyId": KEY_ARN, "Plaintext": SECRET})
    with pytest.raises(KeyReleaseError, match="no CiphertextBlob"):
        KmsClient(boto).generate_data_key("alias/model", encryption_context=CONTEXT)


def test_generate_random_with_and_without_recipient(stub: Stubber, boto: Any, recipient: Recipient) -> None:
    random = bytes(range(24))
    envelope = build_ciphertext_for_recipient(random, recipient.key.public_key_der)
    stub.add_response(
        "generate_random",
        {"CiphertextForRecipient": envelope},
        expected_params={"NumberOfBytes": 24, "Recipient": _recipient_param()},
    )
    stub.add_response("generate_random", {"Plaintext": random}, expected_params={"NumberOfBytes": 24})
    stub.add_response("generate_random", {"Plaintext": random[:-1]})
    client = KmsClient(boto)
    assert client.generate_random(24, recipient=recipient) == random
    assert client.generate_random(24) == random
    with pytest.raises(KeyReleaseError, match="23 bytes, not 24"):
        client.generate_random(24)


def test_generate_random_with_recipient_refuses_plaintext(
    stub: Stubber, boto: Any, recipient: Recipient
) -> None:
    envelope = build_ciphertext_for_recipient(b"r" * 8, recipient.key.public_key_der)
    stub.add_response("generate_random", {"CiphertextForRecipient": envelope, "Plaintext": b"r" * 8})
    with pytest.raises(KeyReleaseError, match="Plaintext although a Recipient"):
        KmsClient(boto).generate_random(8, recipient=recipient)


def test_encrypt(stub: Stubber, boto: Any) -> None:
    stub.add_response(
        "encrypt",
        {"KeyId": KEY_ARN, "CiphertextBlob": BLOB},
        expected_params={"KeyId": KEY_ARN, "Plaintext": SECRET, "EncryptionContext": CONTEXT},
    )
    assert KmsClient(boto).encrypt(KEY_ARN, SECRET, encryption_context=CONTEXT) == BLOB


# -- error mapping -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("AccessDeniedException", 400, KeyAccessDeniedError),
        ("NotFoundException", 400, KeyNotFoundError),
        ("DisabledException", 400, KeyUnavailableError),
        ("KeyUnavailableException", 500, KeyUnavailableError),
        ("KMSInvalidStateException", 400, KeyUnavailableError),
        ("InvalidCiphertextException", 400, InvalidCiphertextError),
        ("IncorrectKeyException", 400, InvalidCiphertextError),
        ("ThrottlingException", 400, KmsTransportError),
        ("KMSInternalException", 500, KmsTransportError),
        ("DependencyTimeoutException", 503, KmsTransportError),
        ("SomethingNewException", 502, KmsTransportError),
        ("InvalidKeyUsageException", 400, KeyReleaseError),
        ("ValidationException", 400, KeyReleaseError),
    ],
)
def test_client_errors_map_to_the_tree(
    stub: Stubber, boto: Any, recipient: Recipient, code: str, status: int, expected: type[KeyReleaseError]
) -> None:
    stub.add_client_error(
        "decrypt", service_error_code=code, service_message=f"kms says {code}", http_status_code=status
    )
    with pytest.raises(KeyReleaseError) as info:
        KmsClient(boto).decrypt(BLOB, encryption_context=CONTEXT, recipient=recipient)
    err = info.value
    assert type(err) is expected
    assert err.code == code
    assert f"kms says {code}" in str(err)
    assert "Decrypt" in str(err)
    # no request data in the error, and the botocore exception (which may quote it) is not chained
    for secret in (BLOB, DOC):
        assert secret.decode(errors="replace") not in str(err)
    assert err.__cause__ is None and err.__suppress_context__


@pytest.mark.parametrize("operation", ["generate_data_key", "generate_random", "encrypt"])
def test_every_operation_translates_errors(stub: Stubber, boto: Any, operation: str) -> None:
    stub.add_client_error(operation, service_error_code="AccessDeniedException", http_status_code=400)
    client = KmsClient(boto)
    calls: dict[str, Callable[[], object]] = {
        "generate_data_key": lambda: client.generate_data_key(KEY_ARN, encryption_context=CONTEXT),
        "generate_random": lambda: client.generate_random(32),
        "encrypt": lambda: client.encrypt(KEY_ARN, SECRET, encryption_context=CONTEXT),
    }
    with pytest.raises(KeyAccessDeniedError):
        calls[operation]()


@pytest.mark.parametrize(
    "err",
    [
        EndpointConnectionError(endpoint_url="https://kms.us-east-1.amazonaws.com"),
        ConnectTimeoutError(endpoint_url="https://kms.us-east-1.amazonaws.com"),
        ReadTimeoutError(endpoint_url="https://kms.us-east-1.amazonaws.com"),
        ConnectionClosedError(endpoint_url="https://kms.us-east-1.amazonaws.com"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_connection_errors_are_transport_errors(err: Exception) -> None:
    class Unreachable:
        def decrypt(self, **_: Any) -> Any:
            raise err

    with pytest.raises(KmsTransportError) as info:
        KmsClient(Unreachable()).decrypt(BLOB)
    assert info.value.code is None
    assert "kms.us-east-1.amazonaws.com" in str(info.value)


def test_no_credentials_is_a_key_release_error() -> None:
    translated = _translate(NoCredentialsError())
    assert type(translated) is KeyReleaseError
    assert "credentials" in str(translated)


def test_param_validation_error_does_not_leak_parameters(boto: Any) -> None:
    # a real botocore ParamValidationError quotes the bad value; our error must not
    with pytest.raises(KeyReleaseError) as info:
        KmsClient(boto).encrypt(KEY_ARN, SECRET, encryption_context={"k": 12345})  # type: ignore[dict-item]
    assert type(info.value) is KeyReleaseError
    assert "ParamValidationError" in str(info.value)
    assert "12345" not in str(info.value)
    assert "12345" in str(ParamValidationError(report="value: 12345"))


# -- the factory -------------------------------------------------------------------------------------


def test_kms_client_from_env_config() -> None:
    client = kms_client_from_env(
        "eu-west-1", endpoint_url="http://127.0.0.1:4566", credentials=AwsCredentials("AKID", "SECRET", "TOK")
    )
    config = client.meta.config
    assert client.meta.region_name == "eu-west-1"
    assert client.meta.endpoint_url == "http://127.0.0.1:4566"
    assert config.connect_timeout == 5 and config.read_timeout == 5
    assert config.retries == {"mode": "standard", "total_max_attempts": 3}
    creds = client._request_signer._credentials
    assert (creds.access_key, creds.secret_key, creds.token) == ("AKID", "SECRET", "TOK")
    assert "SECRET" not in repr(AwsCredentials("AKID", "SECRET", "TOK"))


def test_kms_client_from_env_default_endpoint() -> None:
    client = kms_client_from_env("us-east-2", credentials=AwsCredentials("AKID", "SECRET"))
    assert client.meta.endpoint_url == "https://kms.us-east-2.amazonaws.com"


# -- TLS to KMS: the measured bundle, the forwarder as proxy, and TLS failures ----------------------------


def _verify_error(message: str = "unable to get local issuer certificate") -> ssl.SSLCertVerificationError:
    err = ssl.SSLCertVerificationError(
        1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message}"
    )
    err.verify_message = message
    err.reason = "CERTIFICATE_VERIFY_FAILED"
    return err


_KMS_URL = "https://kms.us-east-1.amazonaws.com/"


@pytest.mark.parametrize(
    ("err", "detail"),
    [
        pytest.param(
            SSLError(endpoint_url=_KMS_URL, error=URLLib3SSLError(_verify_error())),
            "certificate verify failed: unable to get local issuer certificate",
            id="botocore_ssl_error",
        ),
        pytest.param(
            SSLError(
                endpoint_url=_KMS_URL,
                error=URLLib3SSLError(
                    HostnameMismatch("hostname 'kms.us-east-1.amazonaws.com' doesn't match 'evil.example'")
                ),
            ),
            "not for the KMS host name",
            id="urllib3_hostname_mismatch",
        ),
        pytest.param(
            EndpointConnectionError(endpoint_url=_KMS_URL, error=_verify_error("self-signed certificate")),
            "certificate verify failed: self-signed certificate",
            id="endpoint_connection_error_over_a_verify_error",
        ),
        pytest.param(
            ProxyConnectionError(
                proxy_url="http://127.0.0.1:8001",
                error=ProxyError("Unable to connect to proxy", _verify_error()),
            ),
            "certificate verify failed",
            id="proxy_connection_error_over_a_verify_error",
        ),
        pytest.param(
            SSLError(
                endpoint_url=_KMS_URL, error=URLLib3SSLError(ssl.SSLError(1, "[SSL] wrong version number"))
            ),
            "TLS handshake failed",
            id="handshake_failure",
        ),
    ],
)
def test_tls_failures_are_kms_tls_errors(err: Exception, detail: str) -> None:
    translated = _translate(err)
    assert isinstance(translated, KmsTlsError)
    assert isinstance(translated, KmsTransportError)  # callers catching transport errors still do
    assert str(translated).startswith("TLS verification of the KMS endpoint failed: ")
    assert detail in str(translated)
    assert translated.step == "kms-tls"


def test_a_refused_connection_is_a_transport_error_not_a_tls_error() -> None:
    err = EndpointConnectionError(endpoint_url=_KMS_URL, error=ConnectionRefusedError(111, "refused"))
    assert type(_translate(err)) is KmsTransportError


def test_proxy_and_bundle_defaults_leave_botocore_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    client = kms_client_from_env("us-east-1", credentials=AwsCredentials("AKID", "SECRET"))
    session = client._endpoint.http_session
    assert client.meta.config.proxies is None
    assert session._verify == os.environ.get("REQUESTS_CA_BUNDLE", True)  # botocore's default, as before
    assert session._proxy_config.proxy_url_for(_KMS_URL) == "http://proxy.example:3128"  # env, as before


def test_an_explicit_proxy_ignores_proxy_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "*")
    client = kms_client_from_env(
        "us-east-1", credentials=AwsCredentials("AKID", "SECRET"), proxy="http://127.0.0.1:8001"
    )
    assert client.meta.config.proxies == {"https": "http://127.0.0.1:8001"}
    assert client._endpoint.http_session._proxy_config.proxy_url_for(_KMS_URL) == "http://127.0.0.1:8001"


@pytest.mark.parametrize("proxy", ["https://127.0.0.1:8001", "socks5://127.0.0.1:1080", "127.0.0.1:8001"])
def test_the_proxy_must_be_a_plain_http_url(proxy: str) -> None:
    with pytest.raises(ConfigError, match="http://"):
        kms_client_from_env("us-east-1", credentials=AwsCredentials("AKID", "SECRET"), proxy=proxy)
