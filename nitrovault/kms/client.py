"""A thin KMS adapter over a boto3 client: attested key release with ``Recipient``.

This is the I/O shell around :mod:`nitrovault.kms.cms`. Invariants:

* every botocore failure is translated exactly once, in :func:`_translate`, into the
  :class:`~nitrovault.errors.KeyReleaseError` tree. The KMS error code is kept on ``.code`` and
  KMS's message (which is not secret) in the text; request parameters (plaintext, ciphertext,
  attestation documents) never are, and the botocore exception is not chained (its text can quote
  parameters, e.g. ``ParamValidationError``);
* with a ``Recipient``, the answer must carry ``CiphertextForRecipient`` and must *not* carry a
  non-empty ``Plaintext``: KMS never sends both, so such an answer is refused (fail closed), and the
  plaintext only ever comes from opening the envelope with the recipient's private key;
* returned lengths are checked (a data key or random string of the wrong size is refused);
* data keys are returned as ``bytearray`` so the caller can zero them (:meth:`DataKey.wipe`).

Example (``boto3_kms`` is any boto3 KMS client: real, the local emulator, or a Stubber)::

    client = KmsClient(kms_client_from_env("us-east-1"))
    key = client.generate_data_key("alias/model", encryption_context={"model": "m1"})
    data_key = client.decrypt(key.ciphertext_blob, encryption_context={"model": "m1"},
                              recipient=Recipient(document, recipient_key))
"""

from __future__ import annotations

import fcntl
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
    SSLError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)
from cryptography import x509
from urllib3.exceptions import SSLError as URLLib3SSLError

try:  # urllib3 2: its own host-name check (botocore turns the ssl module's off), a ValueError
    from urllib3.util.ssl_match_hostname import CertificateError as HostnameMismatch
except ImportError:  # pragma: no cover - urllib3 1.26 uses the ssl module's
    HostnameMismatch = ssl.CertificateError  # type: ignore[misc,assignment]

from nitrovault.errors import (
    ConfigError,
    InvalidCiphertextError,
    KeyAccessDeniedError,
    KeyNotFoundError,
    KeyReleaseError,
    KeyUnavailableError,
    KmsTlsError,
    KmsTransportError,
)
from nitrovault.kms.cms import open_ciphertext_for_recipient
from nitrovault.kms.recipient import Recipient

__all__ = ["AwsCredentials", "DataKey", "KmsClient", "kms_client_from_env"]

#: botocore client settings: short timeouts (the KMS path is a vsock relay, not the open internet)
#: and botocore's "standard" retry mode (retries throttling and transient errors), 3 attempts in total.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 5.0
MAX_ATTEMPTS = 3

_ACCESS_DENIED = frozenset({"AccessDeniedException"})
_NOT_FOUND = frozenset({"NotFoundException"})
_UNAVAILABLE = frozenset({"DisabledException", "KeyUnavailableException", "KMSInvalidStateException"})
_INVALID_CIPHERTEXT = frozenset({"InvalidCiphertextException", "IncorrectKeyException"})
_TRANSPORT = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "ThrottledException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "KMSInternalException",
        "DependencyTimeoutException",
        "InternalFailure",
        "ServiceUnavailable",
        "ServiceUnavailableException",
    }
)


def _tls_cause(err: BaseException) -> BaseException | None:
    """The TLS failure behind a botocore error, if there is one (the most specific one found).

    botocore wraps urllib3's errors (``SSLError(error=...)``, ``EndpointConnectionError(error=...)``,
    ``ProxyConnectionError(error=ProxyError(msg, original))``), and urllib3 wraps the ``ssl`` module's:
    the walk follows ``kwargs["error"]``, ``original_error``, ``reason``, exception ``args``, ``__cause__``
    and ``__context__``, and prefers a certificate or host-name failure, then an ``ssl.SSLError``, over a
    wrapper that only names one. urllib3 2 checks the host name itself, after the handshake (botocore's
    context has ``check_hostname=False``), raising its own ``CertificateError``, a ``ValueError``.
    """
    found: BaseException | None = None
    seen: set[int] = set()
    todo: list[BaseException] = [err]
    while todo:
        current = todo.pop()
        if id(current) in seen or len(seen) > 32:
            continue
        seen.add(id(current))
        if isinstance(current, HostnameMismatch | ssl.SSLCertVerificationError):
            return current  # as specific as it gets
        wrapper = isinstance(current, SSLError | URLLib3SSLError)
        if isinstance(current, ssl.SSLError) or (wrapper and found is None):
            found = current
        kwargs = getattr(current, "kwargs", None)
        inner = [kwargs.get("error")] if isinstance(kwargs, dict) else []
        inner += [getattr(current, "original_error", None), getattr(current, "reason", None)]
        inner += [*current.args, current.__cause__, current.__context__]
        todo.extend(e for e in inner if isinstance(e, BaseException))
    return found


def _tls_detail(cause: BaseException) -> str:
    """What went wrong in TLS, in words that hold no secret (OpenSSL's reason, never request bytes)."""
    if isinstance(cause, HostnameMismatch) and not isinstance(cause, ssl.SSLError):
        return f"the certificate is not for the KMS host name ({cause})"
    # getattr: an SSLError not raised by the ssl module itself lacks these attributes
    reason = getattr(cause, "reason", None)
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {getattr(cause, 'verify_message', None) or reason or 'rejected'}"
    if isinstance(cause, ssl.SSLError):
        return f"TLS handshake failed: {reason or type(cause).__name__}"
    return f"TLS handshake failed ({type(cause).__name__})"


def _translate(err: Exception) -> KeyReleaseError:
    """The one place botocore errors become nitrovault errors (never quoting request data)."""
    if isinstance(err, ClientError):
        error = err.response.get("Error", {}) or {}
        code = str(error.get("Code") or "Unknown")
        message = str(error.get("Message") or "")
        status = int((err.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode") or 0)
        text = f"KMS {err.operation_name} failed: {code}" + (f": {message}" if message else "")
        if code in _ACCESS_DENIED:
            return KeyAccessDeniedError(text, code=code)
        if code in _NOT_FOUND:
            return KeyNotFoundError(text, code=code)
        if code in _UNAVAILABLE:
            return KeyUnavailableError(text, code=code)
        if code in _INVALID_CIPHERTEXT:
            return InvalidCiphertextError(text, code=code)
        if code in _TRANSPORT or status >= 500:
            return KmsTransportError(text, code=code)
        return KeyReleaseError(text, code=code)
    tls = _tls_cause(err) if isinstance(err, SSLError | HTTPClientError | BotoConnectionError) else None
    if tls is not None:
        # botocore's SSLError, or an EndpointConnectionError / ProxyConnectionError over a TLS failure: the
        # peer on the KMS leg did not prove to be KMS (measured CA bundle, KMS host name) or broke the
        # handshake.
        return KmsTlsError(f"TLS verification of the KMS endpoint failed: {_tls_detail(tls)}")
    if isinstance(err, HTTPClientError | BotoConnectionError):
        # EndpointConnectionError, ConnectTimeoutError (ConnectionError), ReadTimeoutError and
        # ConnectionClosedError (HTTPClientError), ...:
        # their text names the endpoint URL, never the request body.
        return KmsTransportError(f"KMS unreachable: {type(err).__name__}: {err}")
    if isinstance(err, NoCredentialsError | PartialCredentialsError):
        return KeyReleaseError(f"no usable AWS credentials: {type(err).__name__}")
    if isinstance(err, BotoCoreError):
        # Only the class name: e.g. ParamValidationError's text quotes parameter values.
        return KeyReleaseError(f"KMS call failed in botocore: {type(err).__name__}")
    return KeyReleaseError(f"KMS call failed: {type(err).__name__}")


@dataclass(frozen=True)
class DataKey:
    """A KMS data key: ``plaintext`` (zero it with :meth:`wipe`), the wrapped blob, and the key ARN."""

    plaintext: bytearray | bytes | None = field(repr=False)
    ciphertext_blob: bytes
    key_id: str

    def wipe(self) -> None:
        """Overwrite the plaintext in place (only possible when it is a ``bytearray``)."""
        if isinstance(self.plaintext, bytearray):
            self.plaintext[:] = bytes(len(self.plaintext))


@dataclass(frozen=True)
class AwsCredentials:
    """Explicit AWS credentials (e.g. handed to the enclave by the parent); secrets kept out of repr."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


def kms_client_from_env(
    region: str,
    endpoint_url: str | None = None,
    credentials: AwsCredentials | None = None,
    *,
    ca_bundle: bytes | None = None,
    proxy: str | None = None,
) -> Any:
    """A boto3 KMS client with bounded timeouts and standard retries.

    ``credentials=None`` uses botocore's default provider chain; ``endpoint_url`` is KMS's real endpoint
    in an enclave (``https://kms.<region>.amazonaws.com``) or the local emulator's. The defaults
    (``ca_bundle=None``, ``proxy=None``) leave botocore's own behaviour unchanged.

    ``ca_bundle`` (PEM, one or more certificates, else :class:`ConfigError`): verify KMS against exactly
    these CAs. The bundle goes into a sealed anonymous memfd (:func:`sealed_pem_file`) whose
    ``/proc/self/fd/N`` path is botocore's ``verify``, so there is no file on disk a parent could swap.
    Passed explicitly, ``verify`` wins over ``AWS_CA_BUNDLE`` and ``ca_bundle`` in config files
    (``Session.create_client`` only reads those when ``verify`` is None) and over ``REQUESTS_CA_BUNDLE``
    (``EndpointCreator._get_verify_value``); urllib3 then loads only that file into a context that has
    no default CAs (botocore never calls ``load_default_certs``, so ``SSL_CERT_FILE`` is not read either).

    ``proxy`` (``http://127.0.0.1:PORT``, the in-enclave CONNECT forwarder): the HTTPS proxy; TLS to KMS
    runs end to end through its tunnel, with SNI and host-name check for the endpoint's name. Given
    ``Config(proxies=...)``, botocore does not look at the environment at all (``EndpointCreator`` only
    calls ``get_environ_proxies`` when ``proxies`` is None), so ``HTTPS_PROXY`` cannot redirect it and
    ``NO_PROXY`` cannot bypass it. The ``proxies_config`` knobs (``proxy_ca_bundle``,
    ``proxy_client_cert``, ``proxy_use_forwarding_for_https``) only come from a ``Config`` and only
    apply to ``https://`` proxies: with an ``http://`` proxy urllib3 always tunnels with CONNECT.
    """
    if proxy is not None and not proxy.startswith("http://"):
        raise ConfigError("the KMS proxy must be an http:// URL (the CONNECT forwarder on 127.0.0.1)")
    verify = sealed_pem_file(ca_bundle) if ca_bundle is not None else None
    config = Config(
        region_name=region,
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        retries={"mode": "standard", "total_max_attempts": MAX_ATTEMPTS},
        proxies={"https": proxy} if proxy is not None else None,
    )
    session_args: dict[str, str] = {"region_name": region}
    if credentials is not None:
        session_args["aws_access_key_id"] = credentials.access_key_id
        session_args["aws_secret_access_key"] = credentials.secret_access_key
        if credentials.session_token:
            session_args["aws_session_token"] = credentials.session_token
    session = boto3.session.Session(**session_args)
    return session.client("kms", endpoint_url=endpoint_url, config=config, verify=verify)


#: memfds holding CA bundles, one per distinct bundle, open for the process's life: a client reads its
#: bundle again for every new connection, and a process holds one or two bundles (bounded by its config)
_BUNDLES: dict[bytes, int] = {}


def sealed_pem_file(pem: bytes) -> str:
    """A ``/proc/self/fd/N`` path to an anonymous memfd holding ``pem``, sealed against any change.

    ``pem`` must hold one or more PEM X.509 certificates (:class:`ConfigError` otherwise). The memfd is
    sealed with ``F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL``: nobody, this process
    included, can write, resize or unseal it; it lives only in this process's fd table (``MFD_CLOEXEC``).
    """
    if not isinstance(pem, bytes):
        raise ConfigError("the KMS CA bundle must be PEM bytes")
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        certificates = []
    if not certificates:
        raise ConfigError("the KMS CA bundle holds no PEM X.509 certificate")
    fd = _BUNDLES.get(pem)
    if fd is None:
        fd = os.memfd_create("nitrovault-kms-ca", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(pem)
            while view:
                view = view[os.write(fd, view) :]
            fcntl.fcntl(
                fd,
                fcntl.F_ADD_SEALS,
                fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL,
            )
        except BaseException:
            os.close(fd)
            raise
        _BUNDLES[pem] = fd
    return f"/proc/self/fd/{fd}"


class KmsClient:
    """KMS operations nitrovault needs, with ``Recipient`` support and one error translation."""

    def __init__(self, boto3_kms_client: Any) -> None:
        self._client = boto3_kms_client

    def _call(self, operation: str, params: Mapping[str, Any]) -> Mapping[str, Any]:
        try:
            response = getattr(self._client, operation)(**params)
        except (ClientError, BotoCoreError) as err:
            raise _translate(err) from None
        if not isinstance(response, Mapping):
            raise KeyReleaseError(f"KMS {operation} returned no response object")
        return response

    @staticmethod
    def _released(operation: str, response: Mapping[str, Any], recipient: Recipient | None) -> bytes:
        """The released secret: opened from ``CiphertextForRecipient``, or plain ``Plaintext``."""
        plaintext = response.get("Plaintext")
        if recipient is None:
            if not isinstance(plaintext, bytes):
                raise KeyReleaseError(f"KMS {operation} answer has no Plaintext")
            return plaintext
        if plaintext:
            raise KeyReleaseError(
                f"KMS {operation} answered with Plaintext although a Recipient was sent; refusing"
            )
        envelope = response.get("CiphertextForRecipient")
        if not isinstance(envelope, bytes) or not envelope:
            raise KeyReleaseError(f"KMS {operation} answer has no CiphertextForRecipient")
        return open_ciphertext_for_recipient(envelope, recipient.key.private_key)

    def decrypt(
        self,
        ciphertext_blob: bytes,
        *,
        key_id: str | None = None,
        encryption_context: Mapping[str, str] | None = None,
        recipient: Recipient | None = None,
    ) -> bytes:
        """KMS ``Decrypt``; with ``recipient`` the plaintext comes out of the CMS envelope."""
        params: dict[str, Any] = {"CiphertextBlob": bytes(ciphertext_blob)}
        if key_id is not None:
            params["KeyId"] = key_id
        if encryption_context:
            params["EncryptionContext"] = dict(encryption_context)
        if recipient is not None:
            params["Recipient"] = recipient.to_boto()
        response = self._call("decrypt", params)
        return self._released("Decrypt", response, recipient)

    def generate_data_key(
        self,
        key_id: str,
        *,
        encryption_context: Mapping[str, str],
        number_of_bytes: int = 32,
        recipient: Recipient | None = None,
    ) -> DataKey:
        """KMS ``GenerateDataKey``; the plaintext key is a ``bytearray`` of ``number_of_bytes``."""
        if not 1 <= number_of_bytes <= 1024:
            raise ValueError("number_of_bytes must be in 1..1024")
        params: dict[str, Any] = {
            "KeyId": key_id,
            "EncryptionContext": dict(encryption_context),
            "NumberOfBytes": number_of_bytes,
        }
        if recipient is not None:
            params["Recipient"] = recipient.to_boto()
        response = self._call("generate_data_key", params)
        secret = self._released("GenerateDataKey", response, recipient)
        if len(secret) != number_of_bytes:
            raise KeyReleaseError(f"KMS GenerateDataKey returned a key of the wrong length ({len(secret)})")
        blob = response.get("CiphertextBlob")
        if not isinstance(blob, bytes) or not blob:
            raise KeyReleaseError("KMS GenerateDataKey answer has no CiphertextBlob")
        key_arn = str(response.get("KeyId", ""))
        return DataKey(plaintext=bytearray(secret), ciphertext_blob=blob, key_id=key_arn)

    def generate_random(self, n: int, *, recipient: Recipient | None = None) -> bytes:
        """KMS ``GenerateRandom`` of ``n`` bytes (1..1024)."""
        if not 1 <= n <= 1024:
            raise ValueError("n must be in 1..1024")
        params: dict[str, Any] = {"NumberOfBytes": n}
        if recipient is not None:
            params["Recipient"] = recipient.to_boto()
        response = self._call("generate_random", params)
        random = self._released("GenerateRandom", response, recipient)
        if len(random) != n:
            raise KeyReleaseError(f"KMS GenerateRandom returned {len(random)} bytes, not {n}")
        return random

    def encrypt(self, key_id: str, plaintext: bytes, *, encryption_context: Mapping[str, str]) -> bytes:
        """KMS ``Encrypt``; returns the ciphertext blob."""
        params: dict[str, Any] = {
            "KeyId": key_id,
            "Plaintext": bytes(plaintext),
            "EncryptionContext": dict(encryption_context),
        }
        response = self._call("encrypt", params)
        blob = response.get("CiphertextBlob")
        if not isinstance(blob, bytes) or not blob:
            raise KeyReleaseError("KMS Encrypt answer has no CiphertextBlob")
        return blob
