"""A synchronous Python client for ``nitrovault.v1.Inference`` that verifies the enclave before it sends.

TLS ends inside the enclave; the parent instance in between only relays bytes and is not trusted. So
the client proves, on every new connection and before any token or request leaves it, that the server
at the other end is an attested enclave running the code its caller expects:

1. **TLS.** A TLS 1.3 handshake (ALPN ``h2``) with the target; the server's leaf certificate is taken
   (and, when :attr:`Expect.ca` is given, its chain is verified against the owner's CA and the name).
2. **Pin.** The gRPC channel trusts exactly that certificate, so every connection it makes (also after a
   reconnect) is to a holder of the same private key.
3. **Attest.** ``Attest`` with a fresh 32-byte nonce, no token: the document is verified (chain to the
   trust root, signature, freshness, nonce, the expected PCRs:
   :func:`nitrovault.attestation.verify_document`).
4. **Bind.** The document's ``user_data`` (:mod:`nitrovault.bindings`) must bind the SHA-256 of the
   pinned certificate's public key: the key this connection was made with is held only by that enclave.
   Otherwise :class:`~nitrovault.errors.TlsBindingError`.

Only then is the token sent. Every receipt is checked against the attested receipt key, PCR0, the exact
request bytes sent and the response (:func:`nitrovault.receipts.check_receipt`) unless
``verify_receipts=False``; a response whose receipt fails is never returned. When the channel loses its
connection, the next call attests again first. Any mismatch raises a typed error and nothing was sent.

Other invariants:

* The token travels as ``authorization: Bearer <token>`` and never appears in a log line, an exception
  or ``repr``; every call has a deadline (``timeout``).
* Every gRPC failure becomes :class:`~nitrovault.errors.ClientError` (status code name + details, and
  the enclave's correlation id for INTERNAL errors); responses are validated like requests are in the
  enclave (:mod:`nitrovault.rpc.tensors`) before a buffer is interpreted.
* ``unsafe_plaintext=True`` (in-process tests of the server only) skips steps 1-4 and logs a warning
  each time: nothing about the server is then verified.

Example::

    expect = Expect.from_manifest("build/pcr-manifest.json")          # AWS Nitro root by default
    with NitrovaultClient("models.example.com:443", expect=expect, token=token) as client:
        print(client.attestation.pcrs[0].hex(), client.fingerprint)
        vectors = client.embed(["A man is eating food.", "A man is eating bread."])
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any

import grpc
import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from nitrovault.attestation import Expectations, VerifiedAttestation, verify_document
from nitrovault.bindings import EnclaveBindings
from nitrovault.clock import Clock, utc_now
from nitrovault.errors import (
    BindingError,
    ClientError,
    ConfigError,
    TlsBindingError,
    TlsIdentityError,
)
from nitrovault.identity import certificate_fingerprint, dns_names, spki_sha256
from nitrovault.policy.manifest import load_manifest
from nitrovault.receipts import Receipt, check_receipt
from nitrovault.rpc.gen.nitrovault.v1 import inference_pb2 as pb
from nitrovault.rpc.streams import Transcript
from nitrovault.rpc.tensors import TensorFormatError, from_numpy, to_numpy

__all__ = [
    "Expect", "GenerateStream", "Generation", "ModelInfo", "NitrovaultClient", "Receipted", "ServingLimits",
    "probe_certificate",
]

log = logging.getLogger(__name__)

#: trailing metadata key the enclave puts the correlation id of an INTERNAL error in
CORRELATION_KEY = "x-correlation-id"
#: trailing metadata key of a quota refusal: whole seconds until the call would be accepted
RETRY_AFTER_KEY = "retry-after"
#: bytes of the nonce sent with each connection's ``Attest`` (the enclave accepts up to 64)
NONCE_LEN = 32
#: how old a document the client accepts (it was requested just now)
ATTEST_MAX_AGE = timedelta(minutes=5)
#: largest response the client accepts; the enclave bounds its own responses lower (Info.limits)
MAX_RESPONSE_BYTES = 64 << 20
_SERVICE = "/nitrovault.v1.Inference/"
_HEALTH_CHECK = "/grpc.health.v1.Health/Check"


@dataclass(frozen=True)
class Expect:
    """What the client requires of the enclave before it sends anything.

    ``pcrs``: index -> exact 48-byte value (at least PCR0; the image build's ``pcr-manifest.json`` has
    0, 1, 2); ``root``: the attestation trust root, ``None`` = the pinned AWS Nitro Enclaves Root G1;
    ``ca``: optional PEM of the owner's CA when the enclave's identity is CA-issued: the server's chain
    must then validate to it for the certificate's name as well.
    """

    pcrs: Mapping[int, bytes] = field(hash=False)
    root: x509.Certificate | None = field(default=None, compare=False)
    ca: bytes | None = None

    def __post_init__(self) -> None:
        checked = Expectations(pcrs=dict(self.pcrs))  # the verifier's own checks: 48 bytes, 0..31
        if 0 not in checked.pcrs:
            raise ConfigError("expect at least PCR0 (the enclave image): without it nothing is proven")
        object.__setattr__(self, "pcrs", checked.pcrs)

    @classmethod
    def from_manifest(cls, path: str | Path, *, root: x509.Certificate | None = None,
                      ca: bytes | None = None) -> Expect:
        """The PCRs of an image build's ``pcr-manifest.json``."""
        return cls(pcrs=dict(load_manifest(Path(path)).pcrs), root=root, ca=ca)


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
    """What ``Info`` reports (over the attested connection, but not itself signed)."""

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
    #: the request message exactly as sent (``--request FILE``); empty when unknown
    request: bytes = b""

    @classmethod
    def of(cls, response: Any, request: bytes = b"") -> Receipted:
        if not response.HasField("receipt"):
            return cls(b"", b"", request)
        unsigned = type(response)()
        unsigned.CopyFrom(response)
        unsigned.ClearField("receipt")
        return cls(_receipt_file(response.receipt), unsigned.SerializeToString(deterministic=True), request)


def _receipt_file(receipt: pb.Receipt) -> bytes:
    """The receipt as ``nitrovault receipt verify`` reads it: deterministic CBOR ``[payload, signature]``."""
    import cbor2

    return cbor2.dumps([bytes(receipt.payload), bytes(receipt.signature)], canonical=True)


#: GenerateDone.finish_reason → the word :class:`Generation` reports
_FINISH = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_EOS: "eos", pb.FINISH_REASON_STOP: "stop"}


@dataclass(frozen=True)
class Generation:
    """A finished ``Generate`` stream."""

    text: str
    #: ``length`` (max_new_tokens or the context), ``eos`` (the model ended it), ``stop`` (a stop sequence)
    finish_reason: str
    prompt_tokens: int
    #: tokens generated and charged (the end-of-text token included)
    completion_tokens: int
    model_id: str
    #: the receipt over the stream's transcript (``response``: :class:`nitrovault.rpc.streams.Transcript`)
    receipted: Receipted


class GenerateStream:
    """A ``Generate`` call in flight: iterate for the text pieces as the enclave releases them; after the
    last one :attr:`result` holds the :class:`Generation`, its receipt verified (unless the client was
    made with ``verify_receipts=False``). Pieces are authenticated by the attested TLS channel as they
    arrive; the receipt, which signs the whole transcript, can only be checked at the end, and a failure
    raises there. :meth:`cancel` (or leaving the ``with`` block early) stops the generation in the
    enclave. Iterate once."""

    def __init__(self, call: Any, request: bytes, check: Callable[[pb.Receipt, bytes], None] | None) -> None:
        self._call = call
        self._request = request
        self._check = check
        self.result: Generation | None = None

    def __iter__(self) -> Iterator[str]:
        transcript = Transcript()
        texts: list[str] = []
        tokens = 0
        try:
            for raw in self._call:
                if self.result is not None:
                    raise ClientError("INTERNAL", "malformed response: a message after the last one")
                try:
                    message = pb.GenerateResponse.FromString(raw)
                except DecodeError:
                    raise ClientError("INTERNAL", "malformed response: not a GenerateResponse") from None
                if not message.HasField("done"):
                    transcript.add(message)
                    texts.append(message.text)
                    tokens += message.tokens
                    yield message.text
                    continue
                transcript.add_last(message)
                self.result = self._finish(message, "".join(texts) + message.text, tokens + message.tokens,
                                           bytes(transcript))
                if message.text:
                    yield message.text
        except grpc.RpcError as err:
            raise _client_error(err) from None
        if self.result is None:
            raise ClientError("INTERNAL", "malformed response: the stream ended without its last message")

    def _finish(self, last: pb.GenerateResponse, text: str, tokens: int, transcript: bytes) -> Generation:
        done = last.done
        if done.finish_reason not in _FINISH or done.completion_tokens != tokens:
            raise ClientError("INTERNAL", "malformed response: the last message does not add up")
        if self._check is not None:
            if not last.HasField("receipt"):
                raise ClientError("INTERNAL", "the enclave sent no receipt for Generate")
            self._check(last.receipt, transcript)
        receipt = _receipt_file(last.receipt) if last.HasField("receipt") else b""
        return Generation(text, _FINISH[done.finish_reason], done.prompt_tokens, done.completion_tokens,
                          done.model_id, Receipted(receipt, transcript if receipt else b"", self._request))

    def cancel(self) -> None:
        """Stop the call (and the generation in the enclave); iterating then raises CANCELLED."""
        self._call.cancel()

    def __enter__(self) -> GenerateStream:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.result is None:
            self.cancel()


# -- steps 1 and 2: the server's certificate -----------------------------------------------------------------


def _socket_address(target: str) -> tuple[int, Any]:
    """(family, address) of a gRPC target ``host:port``, ``[v6]:port`` or ``unix:/path``."""
    if target.startswith("unix:"):
        return socket.AF_UNIX, target.removeprefix("unix:").removeprefix("//")
    host = target.removeprefix("dns:").removeprefix("ipv4:").removeprefix("ipv6:").lstrip("/")
    if host.startswith("["):
        end = host.find("]")
        name, port = host[1:end], host[end + 2:]
    else:
        name, _, port = host.rpartition(":")
    if not name or not port.isdigit():
        raise ConfigError(f"target must be host:port or unix:/path, got {target!r}")
    return socket.AF_UNSPEC, (name, int(port))


def probe_certificate(target: str, *, timeout: float, ca: bytes | None = None,
                      server_name: str | None = None) -> x509.Certificate:
    """Step 1: a TLS 1.3 handshake with ALPN h2; the server's leaf certificate.

    Without ``ca`` nothing is trusted yet (the attestation decides); with it the chain must validate to
    ``ca`` for ``server_name``. :class:`TlsIdentityError` when the server is not TLS 1.3 + h2 or its
    chain does not validate; :class:`ClientError` ``UNAVAILABLE`` when it cannot be reached.
    """
    family, address = _socket_address(target)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["h2"])
    if ca is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(cadata=ca.decode("ascii", "replace"))
        context.check_hostname = server_name is not None
    try:
        if family == socket.AF_UNIX:
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            raw.settimeout(timeout)
            raw.connect(address)
        else:
            raw = socket.create_connection(address, timeout=timeout)
    except OSError as err:
        raise ClientError("UNAVAILABLE", f"cannot connect to {target} ({type(err).__name__})") from None
    try:
        # No SNI unless a name is known: the certificate's name is learnt from this very handshake, and a
        # name the enclave does not serve would only make it log a mismatch for every new client.
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
            if tls.version() != "TLSv1.3" or tls.selected_alpn_protocol() != "h2":
                raise TlsIdentityError("the server did not negotiate TLS 1.3 with ALPN h2")
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError) as err:  # closed: e.g. enclave down
        raise ClientError("UNAVAILABLE", f"{target} closed the connection ({type(err).__name__})") from None
    except ssl.SSLCertVerificationError as err:
        message = f"the server's certificate does not validate to the CA: {err.verify_message}"
        raise TlsIdentityError(message) from None
    except ssl.SSLError as err:
        raise TlsIdentityError(f"TLS handshake with {target} failed ({err.reason or type(err).__name__})") \
            from None
    except OSError as err:
        raise ClientError("UNAVAILABLE", f"TLS handshake with {target} failed ({type(err).__name__})") \
            from None
    finally:
        raw.close()
    if not der:
        raise TlsIdentityError("the server presented no certificate")
    return x509.load_der_x509_certificate(der)


def _dns_name(certificate: x509.Certificate) -> str:
    names = dns_names(certificate)
    if not names:
        raise TlsIdentityError("the server's certificate names no DNS host (subjectAltName)")
    return names[0]


@dataclass(frozen=True)
class _Session:
    """What one verified connection established: the pinned certificate and the attested keys."""

    certificate: x509.Certificate
    attestation: VerifiedAttestation
    receipt_key: ed25519.Ed25519PublicKey
    pcr0: bytes


class NitrovaultClient:
    """A client for one endpoint. Thread-safe (one gRPC channel); close it, or use it as a context manager."""

    def __init__(
        self,
        target: str,
        *,
        expect: Expect | None = None,
        token: str | None = None,
        timeout: float = 30.0,
        verify_receipts: bool = True,
        server_name: str | None = None,
        clock: Clock | None = None,
        rng: Callable[[int], bytes] = os.urandom,
        unsafe_plaintext: bool = False,
    ) -> None:
        if token is not None:
            _check_token(token)
        if expect is None and not unsafe_plaintext:
            raise ConfigError("give expect=Expect(...) (the PCRs you trust, or Expect.from_manifest); "
                              "unsafe_plaintext=True is only for a plaintext test server")
        if expect is not None and unsafe_plaintext:
            raise ConfigError("expect and unsafe_plaintext exclude each other")
        self.target = target
        self.timeout = timeout
        self.expect = expect
        self.verify_receipts = verify_receipts and not unsafe_plaintext
        self._server_name = server_name
        self._clock = clock or utc_now
        self._rng = rng
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token is not None else ()
        )
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._session: _Session | None = None
        self._stale = False
        if unsafe_plaintext:
            log.warning("unsafe_plaintext: %s is not verified and the connection is not encrypted", target)
            if token is not None and not _is_local(target):
                log.warning("sending a bearer token without TLS to %s", target)
            self._channel = grpc.insecure_channel(target, options=self._options())

    def __repr__(self) -> str:
        mode = "attested" if self.expect is not None else "unsafe-plaintext"
        return f"NitrovaultClient({self.target!r}, {mode}, token={'yes' if self._metadata else 'no'})"

    # -- the verified connection -------------------------------------------------------------------------

    def _options(self, server_name: str | None = None) -> list[tuple[str, Any]]:
        options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", MAX_RESPONSE_BYTES)]
        if server_name is not None:
            options.append(("grpc.ssl_target_name_override", server_name))
        return options

    def connect(self) -> VerifiedAttestation:
        """Run steps 1-4 (module docstring) now if the connection is not verified; return the attestation."""
        return self._verified().attestation

    def _verified(self) -> _Session:
        with self._lock:
            if self._session is not None and not self._stale:
                return self._session
            return self._establish()

    def _establish(self) -> _Session:
        expect = self.expect
        if expect is None:  # unsafe_plaintext: nothing to verify
            raise ConfigError("this client has no expectations to verify (unsafe_plaintext)")
        certificate = probe_certificate(self.target, timeout=self.timeout, ca=expect.ca,
                                        server_name=self._server_name)  # 1
        name = self._server_name or _dns_name(certificate)
        pinned = certificate.public_bytes(serialization.Encoding.PEM)
        credentials = grpc.ssl_channel_credentials(root_certificates=pinned)  # 2
        self._close_channel()
        channel = grpc.secure_channel(self.target, credentials, options=self._options(name))
        self._channel = channel
        self._session = None
        self._stale = False
        nonce = self._rng(NONCE_LEN)
        if len(nonce) != NONCE_LEN:
            raise ConfigError(f"rng must return {NONCE_LEN} bytes")
        raw = self._invoke(channel, "Attest", pb.AttestRequest(nonce=nonce).SerializeToString(),
                           self.timeout, metadata=())  # 3: no token yet
        document = bytes(pb.AttestResponse.FromString(raw).document)
        verified = verify_document(document, at=self._clock(), root=expect.root, expect=Expectations(
            pcrs=expect.pcrs, nonce=nonce, max_age=ATTEST_MAX_AGE))
        try:  # 4
            bindings = EnclaveBindings.parse(verified.user_data)
        except BindingError as err:
            raise TlsBindingError(f"the attestation document binds no TLS key: {err}") from None
        if bindings.tls_spki_sha256 != spki_sha256(certificate):
            raise TlsBindingError("the attested enclave's TLS key is not the key of this connection")
        session = _Session(certificate=certificate, attestation=verified,
                           receipt_key=ed25519.Ed25519PublicKey.from_public_bytes(bindings.receipt_key),
                           pcr0=verified.pcrs[0])
        channel.subscribe(self._on_connectivity, try_to_connect=False)
        self._session = session
        return session

    def _on_connectivity(self, state: grpc.ChannelConnectivity) -> None:
        # A lost connection means the next one may be another instance: attest it before the next call.
        if state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.IDLE,
                     grpc.ChannelConnectivity.SHUTDOWN):
            self._stale = True

    @property
    def attestation(self) -> VerifiedAttestation:
        """The verified attestation of the current connection (connects first when needed)."""
        return self._verified().attestation

    @property
    def certificate_pem(self) -> bytes:
        """The pinned certificate, PEM (for ``--cacert`` of grpcurl and other clients)."""
        return self._verified().certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def fingerprint(self) -> str:
        """Hex SHA-256 of the pinned certificate."""
        return certificate_fingerprint(self._verified().certificate)

    # -- calls -------------------------------------------------------------------------------------------

    def embed(self, texts: Sequence[str], *, normalize: bool = True) -> np.ndarray:
        """One float32 vector per text: shape ``[len(texts), dim]``, row ``i`` for ``texts[i]``."""
        return self.embed_with_receipt(texts, normalize=normalize)[0]

    def embed_with_receipt(
        self, texts: Sequence[str], *, normalize: bool = True
    ) -> tuple[np.ndarray, Receipted]:
        """:meth:`embed` plus the enclave's signed receipt of the call (verified unless
        ``verify_receipts=False``) and the exact bytes it covers."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not one string")
        request = pb.EmbedRequest(texts=list(texts), normalize=normalize)
        response, receipted = self._receipted("Embed", request, pb.EmbedResponse)
        vectors = _decode(response.embeddings)
        if vectors.dtype != np.float32 or vectors.ndim != 2 or vectors.shape[0] != len(request.texts):
            raise ClientError("INTERNAL", "malformed response: embeddings are not float32 [texts, dim]")
        return vectors, receipted

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on named arrays; the model's named outputs (bfloat16 ones widened to float32)."""
        return self.infer_with_receipt(inputs)[0]

    def infer_with_receipt(self, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], Receipted]:
        """:meth:`infer` plus the enclave's signed receipt of the call (see :meth:`embed_with_receipt`)."""
        tensors = [from_numpy(name, np.asarray(array)) for name, array in inputs.items()]
        request = pb.InferRequest(inputs=pb.Tensors(tensors=tensors))
        response, receipted = self._receipted("Infer", request, pb.InferResponse)
        if response.WhichOneof("body") != "outputs":
            raise ClientError("INTERNAL", "malformed response: no plaintext outputs")
        return {tensor.name: _decode(tensor) for tensor in response.outputs.tensors}, receipted

    def generate(self, prompt: str, *, max_new_tokens: int = 0, temperature: float | None = None,
                 top_p: float | None = None, stop: Sequence[str] = (), seed: int | None = None,
                 timeout: float | None = None) -> Generation:
        """The whole continuation of ``prompt`` (see :meth:`generate_stream` for the arguments)."""
        with self.generate_stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_p=top_p, stop=stop, seed=seed, timeout=timeout) as stream:
            for _ in stream:
                pass
        assert stream.result is not None  # iteration raises unless the last message arrived
        return stream.result

    def generate_stream(self, prompt: str, *, max_new_tokens: int = 0, temperature: float | None = None,
                        top_p: float | None = None, stop: Sequence[str] = (), seed: int | None = None,
                        timeout: float | None = None) -> GenerateStream:
        """Start generating: ``max_new_tokens`` 0 lets the enclave's limit and the context decide;
        ``temperature`` 0 is greedy (absent: 1); ``top_p`` in (0, 1]; up to 4 ``stop`` sequences, never
        part of the text; ``seed`` makes sampling reproducible. ``timeout`` bounds the whole stream
        (default: the client's). Every generated token is charged to the caller's item allowance."""
        if isinstance(stop, str):
            raise TypeError("stop must be a sequence of strings, not one string")
        request = pb.GenerateRequest(prompt=prompt, max_new_tokens=max_new_tokens, stop=list(stop))
        if temperature is not None:
            request.temperature = temperature
        if top_p is not None:
            request.top_p = top_p
        if seed is not None:
            request.seed = seed
        request_bytes = request.SerializeToString()
        check = None
        if self.verify_receipts:
            session = self._verified()

            def check(receipt: pb.Receipt, transcript: bytes) -> None:
                check_receipt(Receipt.from_bytes(_receipt_file(receipt)), public_key=session.receipt_key,
                              pcr0=session.pcr0, response=transcript, request=request_bytes)

        elif self.expect is not None:
            self._verified()
        channel = self._channel
        if channel is None:
            raise ClientError("CANCELLED", "the client is closed")
        stub = channel.unary_stream(_SERVICE + "Generate", request_serializer=None,
                                    response_deserializer=None)
        call = stub(request_bytes, timeout=self.timeout if timeout is None else timeout,
                    metadata=self._metadata)
        return GenerateStream(call, request_bytes, check)

    def info(self) -> ModelInfo:
        response = pb.InfoResponse.FromString(self._call("Info", pb.InfoRequest().SerializeToString()))
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
        """A fresh attestation document (COSE_Sign1 bytes) binding ``nonce``, over the verified connection
        (the connection itself was attested with the client's own nonce); not verified again here."""
        raw = self._call("Attest", pb.AttestRequest(nonce=nonce or b"").SerializeToString(), token=False)
        return bytes(pb.AttestResponse.FromString(raw).document)

    def health(self, service: str = "") -> str:
        """The standard health status name: ``SERVING``, ``NOT_SERVING``, ``SERVICE_UNKNOWN``, ``UNKNOWN``."""
        raw = self._call(_HEALTH_CHECK, health_pb2.HealthCheckRequest(service=service).SerializeToString(),
                         token=False)
        status = health_pb2.HealthCheckResponse.FromString(raw).status
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(status))

    def wait_until_serving(self, timeout: float, *, service: str = "", poll: float = 0.1) -> None:
        """Poll (connect, attest, health) until SERVING; ClientError ``DEADLINE_EXCEEDED`` after ``timeout``.
        A verification failure is raised at once: waiting cannot fix it."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ClientError("DEADLINE_EXCEEDED", f"not SERVING after {timeout:g}s (last: {last})")
            try:
                last = self.health(service)
                if last == "SERVING":
                    return
            except ClientError as err:
                if err.code not in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                    raise
                last = err.code
            time.sleep(min(poll, max(0.0, deadline - time.monotonic())))

    # -- plumbing ------------------------------------------------------------------------------------------

    def _receipted(self, method: str, request: Any, response_type: Any) -> tuple[Any, Receipted]:
        request_bytes = request.SerializeToString()
        response = response_type.FromString(self._call(method, request_bytes))
        receipted = Receipted.of(response, request_bytes)
        if self.verify_receipts:
            session = self._verified()
            if not receipted.receipt:
                raise ClientError("INTERNAL", f"the enclave sent no receipt for {method}")
            check_receipt(Receipt.from_bytes(receipted.receipt), public_key=session.receipt_key,
                          pcr0=session.pcr0, response=receipted.response, request=request_bytes)
        return response, receipted

    def _call(self, method: str, request: bytes, *, token: bool = True) -> bytes:
        if self.expect is not None:
            self._verified()
        channel = self._channel
        if channel is None:
            raise ClientError("CANCELLED", "the client is closed")
        return self._invoke(channel, method, request, self.timeout, metadata=self._metadata if token else ())

    @staticmethod
    def _invoke(channel: grpc.Channel, method: str, request: bytes, timeout: float,
                metadata: tuple[tuple[str, str], ...]) -> bytes:
        path = method if method.startswith("/") else _SERVICE + method
        stub = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        try:
            return bytes(stub(request, timeout=timeout, metadata=metadata))
        except grpc.RpcError as err:
            raise _client_error(err) from None

    def _close_channel(self) -> None:
        if self._channel is not None:
            if self._session is not None:
                self._channel.unsubscribe(self._on_connectivity)
                _close_after_poller(self._channel)
            else:
                self._channel.close()
        self._channel = None
        self._session = None

    def close(self) -> None:
        with self._lock:
            self._close_channel()

    def __enter__(self) -> NitrovaultClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _close_after_poller(channel: grpc.Channel) -> None:
    """Close a channel that was subscribed to, once grpcio's connectivity poller has noticed the
    unsubscription: the poller wakes every 0.2 s, and a channel closed under it makes its thread raise
    ("Cannot monitor channel state: Channel closed!"). Done on a daemon thread, so close() does not wait."""

    def close_when_idle() -> None:
        state = getattr(channel, "_connectivity_state", None)  # grpcio internals; absent: close at once
        deadline = time.monotonic() + 1.0
        while getattr(state, "polling", False) and time.monotonic() < deadline:
            time.sleep(0.02)
        channel.close()

    threading.Thread(target=close_when_idle, name="nitrovault-channel-close", daemon=True).start()


def _client_error(err: grpc.RpcError) -> ClientError:
    code = err.code() if callable(getattr(err, "code", None)) else None
    details = err.details() if callable(getattr(err, "details", None)) else None
    trailing = err.trailing_metadata() if callable(getattr(err, "trailing_metadata", None)) else None
    correlation = retry_after = None
    for key, value in _pairs(trailing):
        if key == CORRELATION_KEY and isinstance(value, str):
            correlation = value
        elif key == RETRY_AFTER_KEY and isinstance(value, str) and value.isdigit() and len(value) <= 9:
            retry_after = int(value)
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    if name == "UNKNOWN" and str(details or "").startswith("Stream removed"):
        # gRPC core's word for a connection that broke mid-call (a TLS record failed to authenticate, the
        # peer vanished). The enclave itself never answers UNKNOWN; for the caller it is UNAVAILABLE.
        name = "UNAVAILABLE"
    return ClientError(name, str(details or ""), correlation_id=correlation, retry_after_s=retry_after)


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
