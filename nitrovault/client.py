"""A synchronous Python client for ``nitrovault.v1.Inference`` (through the parent's bridge, or direct).

Invariants:

* Every call carries the bearer token as metadata ``authorization: Bearer <token>`` (when one is given)
  and a deadline (``timeout``); the token never appears in a log line, an exception or ``repr``.
* TLS is used exactly when ``root_certificates`` are given. A token sent over plaintext to anything but a
  loopback or unix-socket target logs a warning (the local stack listens on plaintext loopback).
* Every gRPC failure becomes :class:`~nitrovault.errors.ClientError` (status code name + details, and the
  enclave's correlation id for INTERNAL errors); responses are validated like requests are in the enclave
  (:mod:`nitrovault.rpc.tensors`) before a buffer is interpreted.
* :meth:`NitrovaultClient.embed_with_receipt` returns the response's receipt as the CBOR bytes
  ``nitrovault receipt verify`` reads, and the response bytes it covers: the response message serialized
  deterministically with its ``receipt`` field cleared (docs/access-and-audit.md, "Receipts").
* :meth:`NitrovaultClient.attest_verified` is the only method that says anything about *which* code is
  serving: it sends a fresh random nonce and verifies the returned document's chain, signature, nonce,
  freshness and the caller's expected PCRs. Everything else trusts the transport only.

Example::

    with NitrovaultClient("127.0.0.1:50051", token=token) as client:
        client.wait_until_serving(30)
        verified = client.attest_verified(root=load_root("pki/root.pem"), expect_pcrs={0: pcr0})
        vectors = client.embed(["A man is eating food.", "A man is eating bread."])
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType, TracebackType
from typing import Any, TypeVar

import grpc
import numpy as np
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nitrovault.attestation import Expectations, VerifiedAttestation, verify_document
from nitrovault.errors import ClientError, ConfigError
from nitrovault.rpc.gen.nitrovault.v1 import inference_pb2 as pb
from nitrovault.rpc.gen.nitrovault.v1 import inference_pb2_grpc as pb_grpc
from nitrovault.rpc.tensors import TensorFormatError, from_numpy, to_numpy

__all__ = ["ModelInfo", "NitrovaultClient", "Receipted", "ServingLimits"]

log = logging.getLogger(__name__)
R = TypeVar("R")

#: trailing metadata key the enclave puts the correlation id of an INTERNAL error in
CORRELATION_KEY = "x-correlation-id"
#: bytes of the nonce :meth:`NitrovaultClient.attest_verified` sends (the enclave accepts up to 64)
NONCE_LEN = 32
#: how old a document :meth:`NitrovaultClient.attest_verified` accepts (it was requested just now)
ATTEST_MAX_AGE = timedelta(minutes=5)
#: largest response the client accepts; the enclave bounds its own responses lower (Info.limits)
MAX_RESPONSE_BYTES = 64 << 20


@dataclass(frozen=True)
class ServingLimits:
    """The limits the enclave enforces (``InfoResponse.limits``); 0 means "no limit of this kind"."""

    max_request_bytes: int
    max_response_bytes: int
    max_tensor_elements: int
    max_text_chars: int
    max_inflight: int


@dataclass(frozen=True)
class ModelInfo:
    """What ``Info`` reports. Not attested: compare with :meth:`NitrovaultClient.attest_verified`."""

    model_id: str
    model_version: str
    #: hex SHA-256 of the sealed model the enclave loaded
    sealed_digest: str
    #: PCR index -> 48-byte value as the enclave's NSM reports it (read-only)
    pcrs: Mapping[int, bytes] = field(hash=False)
    enclave_version: str
    max_batch: int
    limits: ServingLimits
    #: id of the enclave's receipt/audit key for this boot (its public key is in Attest's user_data)
    receipt_key_id: str = ""


@dataclass(frozen=True)
class Receipted:
    """A response's receipt and the exact bytes it covers (both empty when the enclave sent no receipt)."""

    #: deterministic CBOR ``[payload, signature]``: the file ``nitrovault receipt verify`` reads
    receipt: bytes
    #: the response message serialized deterministically with ``receipt`` cleared (``--response FILE``)
    response: bytes

    @classmethod
    def of(cls, response: Any) -> Receipted:
        import cbor2

        if not response.HasField("receipt"):
            return cls(b"", b"")
        body, signature = bytes(response.receipt.payload), bytes(response.receipt.signature)
        unsigned = type(response)()
        unsigned.CopyFrom(response)
        unsigned.ClearField("receipt")
        receipt = cbor2.dumps([body, signature], canonical=True)
        return cls(receipt, unsigned.SerializeToString(deterministic=True))


class NitrovaultClient:
    """A client for one endpoint. Thread-safe (one gRPC channel); close it, or use it as a context manager."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        root_certificates: bytes | None = None,
        server_name: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        if token is not None:
            _check_token(token)
        if server_name is not None and root_certificates is None:
            raise ConfigError("server_name only applies to TLS: give root_certificates too")
        self.target = target
        self.timeout = timeout
        self._tls = root_certificates is not None
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token is not None else ()
        )
        options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", MAX_RESPONSE_BYTES)]
        if root_certificates is not None:
            if server_name is not None:
                options.append(("grpc.ssl_target_name_override", server_name))
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            if token is not None and not _is_local(target):
                log.warning("sending a bearer token without TLS to %s; give root_certificates", target)
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.InferenceStub(self._channel)  # type: ignore[no-untyped-call]  # generated code
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __repr__(self) -> str:
        tls = "tls" if self._tls else "plaintext"
        return f"NitrovaultClient({self.target!r}, {tls}, token={'yes' if self._metadata else 'no'})"

    # -- calls -------------------------------------------------------------------------------------------

    def embed(self, texts: Sequence[str], *, normalize: bool = True) -> np.ndarray:
        """One float32 vector per text: shape ``[len(texts), dim]``, row ``i`` for ``texts[i]``."""
        return self.embed_with_receipt(texts, normalize=normalize)[0]

    def embed_with_receipt(
        self, texts: Sequence[str], *, normalize: bool = True
    ) -> tuple[np.ndarray, Receipted]:
        """:meth:`embed` plus the enclave's signed receipt of the call (not verified here: use
        ``nitrovault receipt verify`` or :func:`nitrovault.receipts.verify_receipt` with an attestation)."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not one string")
        request = pb.EmbedRequest(texts=list(texts), normalize=normalize)
        response = self._call(self._stub.Embed, request)
        vectors = _decode(response.embeddings)
        if vectors.dtype != np.float32 or vectors.ndim != 2 or vectors.shape[0] != len(request.texts):
            raise ClientError("INTERNAL", "malformed response: embeddings are not float32 [texts, dim]")
        return vectors, Receipted.of(response)

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on named arrays; the model's named outputs (bfloat16 ones widened to float32)."""
        return self.infer_with_receipt(inputs)[0]

    def infer_with_receipt(self, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], Receipted]:
        """:meth:`infer` plus the enclave's signed receipt of the call (see :meth:`embed_with_receipt`)."""
        tensors = [from_numpy(name, np.asarray(array)) for name, array in inputs.items()]
        response = self._call(self._stub.Infer, pb.InferRequest(inputs=pb.Tensors(tensors=tensors)))
        if response.WhichOneof("body") != "outputs":
            raise ClientError("INTERNAL", "malformed response: no plaintext outputs")
        return {tensor.name: _decode(tensor) for tensor in response.outputs.tensors}, Receipted.of(response)

    def info(self) -> ModelInfo:
        response = self._call(self._stub.Info, pb.InfoRequest())
        limits = response.limits
        return ModelInfo(
            model_id=response.model_id,
            model_version=response.model_version,
            sealed_digest=response.sealed_digest,
            pcrs=MappingProxyType({int(i): bytes(v) for i, v in sorted(response.pcrs.items())}),
            enclave_version=response.enclave_version,
            max_batch=response.max_batch,
            limits=ServingLimits(
                max_request_bytes=limits.max_request_bytes,
                max_response_bytes=limits.max_response_bytes,
                max_tensor_elements=limits.max_tensor_elements,
                max_text_chars=limits.max_text_chars,
                max_inflight=limits.max_inflight,
            ),
            receipt_key_id=response.receipt_key_id,
        )

    def attest(self, nonce: bytes | None = None) -> bytes:
        """A fresh attestation document (COSE_Sign1 bytes) binding ``nonce``; **not** verified."""
        response = self._call(self._stub.Attest, pb.AttestRequest(nonce=nonce or b""))
        return bytes(response.document)

    def attest_verified(
        self,
        *,
        root: x509.Certificate | None,
        at: datetime | None = None,
        expect_pcrs: Mapping[int, bytes] | None = None,
        rng: Callable[[int], bytes] = os.urandom,
    ) -> VerifiedAttestation:
        """Ask for a document binding a fresh random nonce and verify it.

        ``root=None`` means the pinned AWS Nitro Enclaves Root G1 (say it explicitly); locally, pass the
        local PKI's root. ``at`` defaults to now. Raises the :class:`~nitrovault.errors.AttestationError`
        subclass of the failed step (``PCRMismatchError`` when ``expect_pcrs`` differ).
        """
        nonce = rng(NONCE_LEN)
        if len(nonce) != NONCE_LEN:
            raise ConfigError(f"rng must return {NONCE_LEN} bytes")
        document = self.attest(nonce)
        expect = Expectations(pcrs=dict(expect_pcrs or {}), nonce=nonce, max_age=ATTEST_MAX_AGE)
        return verify_document(document, at=at or datetime.now(UTC), root=root, expect=expect)

    def health(self, service: str = "") -> str:
        """The standard health status name: ``SERVING``, ``NOT_SERVING``, ``SERVICE_UNKNOWN``, ``UNKNOWN``."""
        response = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def wait_until_serving(self, timeout: float, *, service: str = "", poll: float = 0.1) -> None:
        """Poll health until it says SERVING; ClientError ``DEADLINE_EXCEEDED`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ClientError("DEADLINE_EXCEEDED", f"not SERVING after {timeout:g}s (last: {last})")
            try:
                request = health_pb2.HealthCheckRequest(service=service)
                status = self._call(self._health.Check, request, timeout=min(remaining, 5.0))
            except ClientError as err:
                if err.code not in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                    raise
                last = err.code
            else:
                last = str(health_pb2.HealthCheckResponse.ServingStatus.Name(status.status))
                if last == "SERVING":
                    return
            time.sleep(min(poll, max(0.0, deadline - time.monotonic())))

    # -- plumbing ------------------------------------------------------------------------------------------

    def _call(self, method: Callable[..., R], request: Any, *, timeout: float | None = None) -> R:
        deadline = self.timeout if timeout is None else timeout
        try:
            return method(request, timeout=deadline, metadata=self._metadata)
        except grpc.RpcError as err:
            raise _client_error(err) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> NitrovaultClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _client_error(err: grpc.RpcError) -> ClientError:
    code = err.code() if callable(getattr(err, "code", None)) else None
    details = err.details() if callable(getattr(err, "details", None)) else None
    trailing = err.trailing_metadata() if callable(getattr(err, "trailing_metadata", None)) else None
    correlation = None
    for key, value in _pairs(trailing):
        if key == CORRELATION_KEY and isinstance(value, str):
            correlation = value
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    return ClientError(name, str(details or ""), correlation_id=correlation)


def _pairs(metadata: Any) -> Iterator[tuple[str, Any]]:
    for item in metadata or ():
        key, value = (item.key, item.value) if hasattr(item, "key") else item
        yield str(key), value


def _decode(tensor: pb.Tensor) -> np.ndarray:
    """A writable array of a response tensor, validated; bfloat16 is widened (exactly) to float32."""
    try:
        # Every element takes at least one byte, so a well-formed tensor never has more elements than
        # data bytes: the message size limit bounds the work.
        wire = to_numpy(tensor, max_elements=len(tensor.data))
    except TensorFormatError as err:
        raise ClientError("INTERNAL", f"malformed response: {err}") from None
    if wire.bfloat16:
        return (wire.array.astype(np.uint32) << 16).view(np.float32)
    return wire.array.copy()


def _check_token(token: str) -> None:
    # Metadata values must be printable ASCII; say what is wrong without echoing any of the token.
    if not token or not all(33 <= ord(c) <= 126 for c in token):
        raise ConfigError("token must be non-empty printable ASCII without spaces or newlines")


def _is_local(target: str) -> bool:
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    host = target.removeprefix("dns:").removeprefix("ipv4:").removeprefix("ipv6:").lstrip("/")
    if host.startswith("["):
        host = host[1 : host.find("]")]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
