"""The enclave's gRPC server: ``nitrovault.v1.Inference`` plus standard health checking and reflection.

Invariants:

* Health says NOT_SERVING until boot has unsealed and warmed up the model; calls before then get
  UNAVAILABLE.
* Model work runs on ``limits.workers`` worker threads (:class:`~enclave_app.batching.Batcher`) behind an
  admission bound (``workers + queue_depth`` calls); beyond it calls get RESOURCE_EXHAUSTED at once
  instead of queueing without limit. Concurrent calls that can share a forward pass are gathered into
  one (``batching`` in the measured config; :mod:`enclave_app.forward` keeps every protection per call).
  A slot is held until the model work really ends (a caller that gave up does not free a busy worker).
  A call whose deadline has passed by the time its batch forms is not run.
* Request and response sizes are bounded by gRPC options and by per-item checks (texts, tensor elements).
* Errors become status codes in one table (:mod:`enclave_app.status`); no exception text leaves the
  enclave, only a code and, for internal errors, a correlation id.
* Every call runs the protections of :mod:`enclave_app.protections` in this order: bearer token
  (``authorization`` metadata; missing → UNAUTHENTICATED) → scopes for this method and model → the audit
  gate (UNAVAILABLE while the parent withholds the audit log beyond the measured bound) → quota
  (RESOURCE_EXHAUSTED with ``retry-after``; with a shared state store, charged there on a worker thread,
  never on the event loop, and UNAVAILABLE when the store cannot decide) → model → receipt
  (Infer/Embed: the response's ``receipt`` field, signed over the request bytes as received and the
  response serialized deterministically with ``receipt`` unset) → one audit record, for refusals and
  errors too. Info needs a valid token (any scope) and is charged as a request with 0 items. ``Attest``
  needs none: a client verifies the enclave before it sends its token (``docs/confidential-serving.md``);
  it is bounded instead (``limits.max_concurrent_attestations`` signing at once,
  ``limits.attestation_queue`` waiting, beyond that RESOURCE_EXHAUSTED) and audited.
* TLS ends here, inside the enclave (:class:`EnclaveServer` with the sealed :class:`TlsIdentity`): the
  parent relays ciphertext only. Unauthenticated long-lived calls are bounded: health ``Watch`` streams
  by ``limits.max_watch_streams`` in total, every connection by ``limits.max_streams_per_connection``
  streams; reflection (v1 and v1alpha) needs a valid token.
* Between the model and the receipt, ``Infer``/``Embed`` answers go through the boot's
  :class:`~enclave_app.outputs.OutputGuard` (extraction detection, watermark, calibrated noise,
  hardening; a blocked or throttled subject is refused before the model runs). It runs on the model
  worker, so its numpy work never blocks the event loop, and the receipt covers what is returned.
* Every attestation document this enclave produces binds the boot's receipt key in ``user_data``, and,
  from the moment TLS serving starts, the SHA-256 of the TLS key (:mod:`nitrovault.bindings`).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar, cast

import grpc
import numpy as np
import torch
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

import nitrovault
from enclave_app.batching import Batcher, Job
from enclave_app.config import EnclaveConfig
from enclave_app.forward import Answer, Call, EmbedCall, Forward, GenerateCall, InferCall
from enclave_app.metrics import EnclaveMetrics
from enclave_app.models import ModelHandler
from enclave_app.models.base import InvalidInputError
from enclave_app.models.causal_lm import Generated, TextRequest
from enclave_app.models.generation import Sampling
from enclave_app.outputs import OutputGuard
from enclave_app.protections import RECEIPTED, CallRecord, Protections, Sink, boot_key_from_nsm
from enclave_app.status import NotReadyError, OverloadedError, abort_with, classify
from enclave_app.streams import ReleasedText, messages
from enclave_app.weights import WeightsIntegrityError
from nitrovault.errors import AccessError, ProtectionUnavailableError, StateStoreError
from nitrovault.identity import TlsIdentity
from nitrovault.nsm import Nsm
from nitrovault.receipts import enclave_user_data
from nitrovault.rpc.gen.nitrovault.v1 import inference_pb2 as pb
from nitrovault.rpc.gen.nitrovault.v1 import inference_pb2_grpc as pb_grpc
from nitrovault.rpc.streams import Transcript
from nitrovault.rpc.tensors import from_numpy, to_numpy
from nitrovault.state import StateStore

T = TypeVar("T")
SERVICE = "nitrovault.v1.Inference"
#: reflection v1 has the v1alpha messages under a new package name (same fields, same wire format)
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
#: PCRs reported by Info: the image (0, 1, 2), the parent's role and instance (3, 4), the signer (8).
INFO_PCRS = (0, 1, 2, 3, 4, 8)
MAX_NONCE = 64
#: the request message's bytes as received (set by the handler that parses them), for the receipt
_RAW_REQUEST: contextvars.ContextVar[bytes | None] = contextvars.ContextVar("raw_request", default=None)

log = logging.getLogger(__name__)


def _discard(line: bytes) -> None:
    """The audit sink of a server built without one (in-process tests): lines are not kept."""
    del line


@dataclass(frozen=True)
class ServingModel:
    handler: ModelHandler
    sealed_digest: str
    #: the boot's output protections (:func:`enclave_app.boot.boot` builds them with the sealed extras)
    outputs: OutputGuard
    #: the shared state store the boot opened (quotas are charged there), or None: limits in memory
    store: StateStore | None = None


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, config: EnclaveConfig, nsm: Nsm, *, audit_sink: Sink | None = None) -> None:
        self.config = config
        self.nsm = nsm
        self.model: ServingModel | None = None
        if audit_sink is None:
            log.warning("no audit sink: audit records of this server are not stored")
        self.protections = Protections(
            config, boot_key_from_nsm(nsm), pcr0=nsm.describe_pcr(0).data, sink=audit_sink or _discard
        )
        #: aggregate serving metrics (enclave_app.metrics), sent to the parent by the composition root
        self.metrics = EnclaveMetrics()
        self.metrics.count("weights_integrity_failures_total", 0)  # present from boot: a rise is visible
        self.protections.metrics = self.metrics
        #: told once when serving must stop (the composition root stops the enclave: fail closed)
        self.on_fatal: Callable[[str], None] | None = None
        #: the attestation ``user_data`` binding this boot's receipt/audit key (in every document)
        self.user_data = self.protections.user_data
        workers, threads = config.model_threads(os.cpu_count() or 1)
        self.workers = workers
        self.batcher: Batcher[Call, Answer] = Batcher(
            Forward(self._handler_and_guard), workers=workers, max_rows=config.batching.max_rows,
            max_delay_s=config.batching.max_delay_ms / 1000, on_start=lambda: torch.set_num_threads(threads),
            on_batch=self.metrics.batch)
        # Counted from admission until the model work has really finished (or was cancelled before it
        # started), so a call abandoned by its caller keeps its slot while a worker still runs it.
        self._admitted = 0
        self._admitted_lock = threading.Lock()
        self._capacity = workers + config.limits.queue_depth
        self._pcrs: dict[int, bytes] | None = None
        self._attest_waiting = 0
        self._attest_slots = asyncio.Semaphore(config.limits.max_concurrent_attestations)

    def bind_tls(self, identity: TlsIdentity) -> None:
        """From now on every served attestation document also binds this TLS key."""
        self.user_data = enclave_user_data(self.protections.boot_key.public_key(), identity.spki_sha256)

    # -- admission -------------------------------------------------------------------------------------

    async def _run(self, context: grpc.aio.ServicerContext, call: Call, key: Hashable | None) -> Answer:
        """Admit ``call`` (or refuse it at once: RESOURCE_EXHAUSTED) and await its batch's answer."""
        with self._admitted_lock:
            if self._admitted >= self._capacity:
                raise OverloadedError("queue full")
            self._admitted += 1
        remaining = context.time_remaining()
        deadline = None if remaining is None else self.batcher.monotonic() + remaining
        try:
            future = self.batcher.submit(Job(call, rows=call.rows, key=key, deadline=deadline))
        except BaseException:
            self._release()
            raise
        # Runs in the worker thread when the work ends, or at once if a cancelled call's work never started.
        future.add_done_callback(lambda _: self._release())
        return await asyncio.wrap_future(future)

    def _handler_and_guard(self) -> tuple[ModelHandler, OutputGuard]:
        model = self._serving()
        return model.handler, model.outputs

    def _release(self) -> None:
        with self._admitted_lock:
            self._admitted -= 1

    def _serving(self) -> ServingModel:
        if self.model is None:
            raise NotReadyError("model not loaded")
        return self.model

    def _check_model(self, requested: str) -> None:
        if requested and requested not in (self.config.model_id, self._model_name()):
            raise InvalidInputError("unknown model")

    def _model_name(self) -> str:
        return f"{self.config.model_id}@{self.config.model_version}"

    # -- RPCs ------------------------------------------------------------------------------------------

    async def _protected(self, context: grpc.aio.ServicerContext, method: str, items: int,
                         work: Callable[[CallRecord], Awaitable[T]], *, public: bool = False) -> T:
        """Token → quota → (extraction admit) → work → receipt → audit record (module docstring), errors
        through the table. ``public``: no token and no charge (Attest), still audited."""
        started = time.perf_counter_ns()
        call = CallRecord(method=method, model=self.config.model_id, items=items)
        try:
            if not public:
                await self._admit(context, call)
            response = await work(call)
            if method in RECEIPTED:
                raw = _RAW_REQUEST.get()
                response.receipt.CopyFrom(self._sign(  # type: ignore[attr-defined]
                    call, raw if raw is not None else b"",
                    response.SerializeToString(deterministic=True)))  # type: ignore[attr-defined]
        except Exception as caught:
            await self._refuse(context, call, caught, started)
        self.protections.record(call, decision="ok", latency_us=_since(started))
        return response

    async def _admit(self, context: grpc.aio.ServicerContext, call: CallRecord) -> None:
        """Token → scopes → audit gate → quota for ``call.items`` (and the output guard's admission)."""
        guard = self.protections
        method = call.method
        call.principal = guard.identify(context.invocation_metadata())
        guard.authorize(call.principal, method)  # after call.principal: a scope refusal is attributed
        guard.check_audit()
        principal, items = call.principal, call.items
        outputs = self.model.outputs if method in RECEIPTED and self.model is not None else None
        if guard.shared:  # one round trip, never on the event loop (a slow store must not stall it)
            privacy = None if outputs is None else outputs.privacy_cost(method, items)
            await asyncio.to_thread(guard.admit, call, items, privacy=privacy,
                                    refusals=outputs is not None and outputs.refuses)
            return
        call.quota = guard.charge(principal, items)
        if outputs is not None:
            outputs.admit(principal.subject)

    def _sign(self, call: CallRecord, request_bytes: bytes, response_bytes: bytes) -> pb.Receipt:
        if call.principal is None:  # _admit authenticates before any receipted work runs
            raise RuntimeError("a receipt for an unauthenticated call")
        receipt = self.protections.sign(call.principal, call.method, request_bytes, response_bytes)
        call.receipt_id = receipt.receipt_id
        return pb.Receipt(payload=receipt.body, signature=receipt.signature, key_id=receipt.key_id)

    async def _refuse(self, context: grpc.aio.ServicerContext, call: CallRecord, caught: Exception,
                      started: int) -> NoReturn:
        """Audit ``caught`` and answer the call with its status (the table); never returns."""
        guard = self.protections
        latency_us = _since(started)
        err: Exception = caught
        if isinstance(caught, StateStoreError):  # limits cannot be decided: fail closed
            log.warning("%s: refusing the call", caught)
            err = ProtectionUnavailableError("state-store-unavailable")
        if isinstance(caught, WeightsIntegrityError):  # memory was tampered with: stop serving at once
            self.metrics.count("weights_integrity_failures_total")
            if self.on_fatal is not None:
                self.on_fatal("weights-integrity")
        if call.notes.precharged is not None:  # spent at admission, but no answer is released
            await asyncio.to_thread(guard.refund, call)
        decision, reason = guard.decision_of(err)
        if isinstance(err, grpc.aio.AbortError):  # aborted by grpc itself, already answered
            guard.record(call, decision=decision, reason=reason, code="ABORTED", latency_us=latency_us)
            raise err
        classified = classify(err)
        guard.record(call, decision=decision, reason=reason, code=classified[0].name, latency_us=latency_us)
        await abort_with(context, err, classified)
        raise AssertionError("unreachable") from None

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        return await self._protected(context, "Embed", min(len(request.texts), self.config.limits.max_batch),
                                     lambda call: self._embed(request, context, call))

    async def _embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext,
                     call: CallRecord) -> pb.EmbedResponse:
        model = self._serving()
        self._check_model(request.model)
        texts: Sequence[str] = list(request.texts)
        limits = self.config.limits
        if not texts:
            raise InvalidInputError("no texts")
        if len(texts) > limits.max_batch:
            raise InvalidInputError(f"at most {limits.max_batch} texts per call")
        if any(len(t) > limits.max_text_chars for t in texts):
            raise InvalidInputError(f"texts are limited to {limits.max_text_chars} characters")
        work = EmbedCall(texts, request.normalize, _subject(call), call.notes)
        answer = await self._run(context, work, work.key(model.handler))
        vectors = cast(np.ndarray, answer)  # an EmbedCall's answer
        return pb.EmbedResponse(
            model_id=self._model_name(), embeddings=from_numpy("embeddings", vectors.astype(np.float32))
        )

    async def Infer(self, request: pb.InferRequest, context: grpc.aio.ServicerContext) -> pb.InferResponse:
        return await self._protected(context, "Infer", self._rows(request),
                                     lambda call: self._infer(request, context, call))

    def _rows(self, request: pb.InferRequest) -> int:
        """Items charged for an Infer call: its batch size, read before validation, so clamped to the
        batch limit (a bogus shape must not charge billions of items; validation refuses it later)."""
        rows = [t.shape[0] for t in request.inputs.tensors if t.shape] if request.HasField("inputs") else []
        return max(1, min(max(rows, default=1), self.config.limits.max_batch))

    async def _infer(self, request: pb.InferRequest, context: grpc.aio.ServicerContext,
                     call: CallRecord) -> pb.InferResponse:
        model = self._serving()
        self._check_model(request.model)
        if request.WhichOneof("body") != "inputs":
            raise InvalidInputError("sealed payloads are not supported yet; send inputs")
        limits = self.config.limits
        inputs: dict[str, torch.Tensor] = {}
        for tensor in request.inputs.tensors:
            wire = to_numpy(tensor, max_elements=limits.max_tensor_elements)
            name = wire.name or "x"
            if name in inputs:
                raise InvalidInputError("duplicate input name")
            if 0 in wire.array.shape:
                raise InvalidInputError("input tensors must not be empty")
            value = torch.from_numpy(wire.array.copy())
            inputs[name] = value.view(torch.bfloat16) if wire.bfloat16 else value
        if not inputs:
            raise InvalidInputError("no input tensors")
        if any(t.dim() and t.shape[0] > limits.max_batch for t in inputs.values()):
            raise InvalidInputError(f"at most {limits.max_batch} rows per call")
        work = InferCall(inputs, _subject(call), call.notes)
        outputs = cast(dict[str, torch.Tensor], await self._run(context, work, work.key(model.handler)))
        wire_out = []
        for name, value in outputs.items():
            value = value.detach().contiguous()
            if value.dtype == torch.bfloat16:
                wire_out.append(from_numpy(name, value.view(torch.uint16).numpy(), bfloat16=True))
            else:
                wire_out.append(from_numpy(name, value.numpy()))
        return pb.InferResponse(model_id=self._model_name(), outputs=pb.Tensors(tensors=wire_out))

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        """Stream a continuation of the prompt (module docstring, "Generate"). Admission charges the
        request; each piece's tokens are charged before the piece is sent, so a subject never receives
        more tokens than its allowance. The last message carries ``done`` and the receipt over the
        transcript (:mod:`nitrovault.rpc.streams`). Any way the stream ends early (an error, the
        allowance running out, the caller cancelling) stops the model at its next token."""
        started = time.perf_counter_ns()
        call = CallRecord(method="Generate", model=self.config.model_id, items=0)
        raw = _RAW_REQUEST.get()
        stopped = threading.Event()
        task: asyncio.Future[Answer] | None = None
        try:
            await self._admit(context, call)
            self._serving()
            self._check_model(request.model)
            work_request = self._text_request(request)
            released = ReleasedText(asyncio.get_running_loop())
            work = GenerateCall(work_request, _subject(call), released.push, stopped.is_set)
            task = asyncio.ensure_future(self._run(context, work, None))
            # the worker's last push happens before its answer is set, so the end comes after all the text
            task.add_done_callback(functools.partial(_finished, released))
            transcript = Transcript()
            async for text, tokens in messages(released, self.config.batching.stream_interval_ms / 1000):
                await self._charge_tokens(call, tokens)
                message = pb.GenerateResponse(text=text, tokens=tokens)
                transcript.add(message)
                yield message
            generated = cast(Generated, task.result())
            last = pb.GenerateResponse(done=pb.GenerateDone(
                model_id=self._model_name(), finish_reason=_FINISH[generated.finish_reason],
                prompt_tokens=generated.prompt_tokens, completion_tokens=generated.completion_tokens))
            transcript.add_last(last)
            last.receipt.CopyFrom(self._sign(call, raw if raw is not None else b"", bytes(transcript)))
        except Exception as caught:
            stopped.set()
            await self._refuse(context, call, caught, started)
        except BaseException:  # the caller went away (CancelledError) or closed the stream
            stopped.set()
            self.protections.record(call, decision="error", reason="cancelled", code="CANCELLED",
                                    latency_us=_since(started))
            raise
        finally:
            stopped.set()
            if task is not None and not task.done():
                task.cancel()  # a job not started yet is dropped; a running one sees `stopped`
        self.protections.record(call, decision="ok", latency_us=_since(started))
        yield last

    def _text_request(self, request: pb.GenerateRequest) -> TextRequest:
        """The handler's view of a GenerateRequest; what needs the tokenizer is checked by the handler."""
        limit = self.config.limits.max_text_chars
        if len(request.prompt) > limit:
            raise InvalidInputError(f"the prompt is limited to {limit} characters")
        sampling = Sampling(
            temperature=request.temperature if request.HasField("temperature") else 1.0,
            top_p=request.top_p if request.HasField("top_p") else 1.0,
            seed=request.seed if request.HasField("seed") else None)
        return TextRequest(prompt=request.prompt, max_new_tokens=request.max_new_tokens or None,
                           sampling=sampling, stop=tuple(request.stop))

    async def _charge_tokens(self, call: CallRecord, tokens: int) -> None:
        """Charge a piece's tokens before it is sent (the shared store: off the event loop)."""
        if call.principal is None or not tokens:
            return
        guard = self.protections
        if guard.shared:
            call.quota = await asyncio.to_thread(guard.charge_items, call.principal, tokens)
        else:
            call.quota = guard.charge_items(call.principal, tokens)
        call.items += tokens

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        return await self._protected(context, "Info", 0, lambda _: self._info())

    async def _info(self) -> pb.InfoResponse:
        model = self._serving()
        if self._pcrs is None:
            self._pcrs = {i: self.nsm.describe_pcr(i).data for i in INFO_PCRS}
        limits = self.config.limits
        return pb.InfoResponse(
            model_id=self.config.model_id,
            model_version=self.config.model_version,
            sealed_digest=model.sealed_digest,
            pcrs=self._pcrs,
            enclave_version=nitrovault.__version__,
            max_batch=limits.max_batch,
            limits=pb.Limits(
                max_request_bytes=limits.max_request_bytes,
                max_response_bytes=limits.max_response_bytes,
                max_tensor_elements=limits.max_tensor_elements,
                max_text_chars=limits.max_text_chars,
                max_inflight=self._capacity,
            ),
            receipt_key_id=self.protections.key_id,
        )

    async def Attest(self, request: pb.AttestRequest, context: grpc.aio.ServicerContext) -> pb.AttestResponse:
        return await self._protected(context, "Attest", 0, lambda _: self._attest(request), public=True)

    async def _attest(self, request: pb.AttestRequest) -> pb.AttestResponse:
        if len(request.nonce) > MAX_NONCE:
            raise InvalidInputError(f"nonce is limited to {MAX_NONCE} bytes")
        if self._attest_waiting >= self.config.limits.attestation_queue:
            raise OverloadedError("attestations queued")
        self._attest_waiting += 1  # the event loop's thread only: no lock needed
        try:
            async with self._attest_slots:
                user_data = self.user_data
                document = await asyncio.to_thread(
                    self.nsm.attestation, nonce=request.nonce or None, user_data=user_data
                )
        finally:
            self._attest_waiting -= 1
        return pb.AttestResponse(document=document, user_data=user_data)

    def close(self) -> None:
        self.batcher.close()


#: Generated.finish_reason → the wire enum ("cancelled" never reaches a caller: its stream is gone)
_FINISH = {"length": pb.FINISH_REASON_LENGTH, "eos": pb.FINISH_REASON_EOS, "stop": pb.FINISH_REASON_STOP,
           "cancelled": pb.FINISH_REASON_UNSPECIFIED}


def _finished(released: ReleasedText, task: asyncio.Future[Answer]) -> None:
    released.end()
    if not task.cancelled():
        task.exception()  # retrieved here too: a stream that ended early never asks for it


def _since(started_ns: int) -> int:
    return (time.perf_counter_ns() - started_ns) // 1000


def _subject(call: CallRecord) -> str:
    if call.principal is None:  # _protected authenticates before any work runs
        raise RuntimeError("model work without an authenticated principal")
    return call.principal.subject


_METHODS: dict[str, type[Any]] = {
    "Infer": pb.InferRequest,
    "Embed": pb.EmbedRequest,
    "Info": pb.InfoRequest,
    "Attest": pb.AttestRequest,
}


def _inference_handlers(service: InferenceService) -> grpc.GenericRpcHandler:
    """The Inference methods, parsing requests ourselves: grpc would answer a malformed request with
    UNKNOWN and the parser's exception text; we answer INVALID_ARGUMENT with a fixed message."""

    def handler(request_type: type[Any], method: Callable[..., Awaitable[Any]]) -> grpc.RpcMethodHandler:
        async def parse_then_call(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            try:
                request = request_type.FromString(raw)
            except DecodeError:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed request message")
            _RAW_REQUEST.set(raw)
            return await method(request, context)

        return grpc.unary_unary_rpc_method_handler(
            parse_then_call, request_deserializer=None, response_serializer=_serialize
        )

    async def generate(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            request = pb.GenerateRequest.FromString(raw)
        except DecodeError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed request message")
        _RAW_REQUEST.set(raw)
        async for message in service.Generate(request, context):
            yield message

    handlers = {name: handler(kind, getattr(service, name)) for name, kind in _METHODS.items()}
    handlers["Generate"] = grpc.unary_stream_rpc_method_handler(
        generate, request_deserializer=None, response_serializer=_serialize)
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


def _serialize(message: Any) -> bytes:
    return cast(bytes, message.SerializeToString())


class _BoundedHealth(health_aio.HealthServicer):  # type: ignore[misc]  # untyped base
    """The standard health service with a cap on ``Watch`` streams (they need no token and stay open)."""

    def __init__(self, max_watch_streams: int) -> None:
        super().__init__()
        self._max_watch = max_watch_streams
        self.watching = 0

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        if self.watching >= self._max_watch:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many health watches; use Check")
        self.watching += 1
        try:
            await super().Watch(request, context)
        finally:
            self.watching -= 1


class _ReflectionNeedsToken(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # untyped base
    """Reflection lists every method and message: only for callers with a valid token (any scope)."""

    def __init__(self, protections: Protections) -> None:
        self._protections = protections

        async def deny(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "authentication required")

        self._deny = grpc.stream_stream_rpc_method_handler(deny)

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        if details.method.startswith("/grpc.reflection."):
            try:
                self._protections.identify(details.invocation_metadata)
            except AccessError:
                return self._deny
        return await continuation(details)


def _reflection_v1(servicer: Any) -> grpc.GenericRpcHandler:
    """``grpc.reflection.v1`` served by the v1alpha servicer (grpcio-reflection only ships v1alpha; the
    two protos differ only in their package name, so the messages are the same bytes)."""
    return grpc.method_handlers_generic_handler(REFLECTION_V1, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
    })


class EnclaveServer:
    """The gRPC server on a unix socket (the in-enclave relay carries vsock to it).

    With ``tls`` (always, in the enclave: ``enclave_app.main``) it serves TLS with the sealed identity and
    binds the identity's key into every attestation document it serves; without, plaintext (in-process
    tests only). ``service`` lets the caller build the service (and its boot key) before boot.
    """

    def __init__(self, config: EnclaveConfig, nsm: Nsm, socket_path: str, *,
                 audit_sink: Sink | None = None, service: InferenceService | None = None,
                 tls: TlsIdentity | None = None) -> None:
        limits = config.limits
        self.socket_path = socket_path
        self.service = service or InferenceService(config, nsm, audit_sink=audit_sink)
        self.health = _BoundedHealth(limits.max_watch_streams)
        self.server = grpc.aio.server(
            interceptors=(_ReflectionNeedsToken(self.service.protections),),
            options=[
                ("grpc.max_receive_message_length", limits.max_request_bytes),
                ("grpc.max_send_message_length", limits.max_response_bytes),
                ("grpc.max_concurrent_streams", limits.max_streams_per_connection),
            ],
        )
        self.server.add_generic_rpc_handlers((_inference_handlers(self.service),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflected = (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                     reflection.SERVICE_NAME, REFLECTION_V1)
        reflector = reflection.ReflectionServicer(reflected)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflector, self.server)
        self.server.add_generic_rpc_handlers((_reflection_v1(reflector),))
        if tls is None:
            self.server.add_insecure_port(f"unix:{socket_path}")
        else:
            credentials = grpc.ssl_server_credentials([(tls.private_key_pem, tls.chain_pem)])
            self.server.add_secure_port(f"unix:{socket_path}", credentials)
            self.service.bind_tls(tls)

    async def start(self) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        os.chmod(self.socket_path, 0o600)

    async def serve(self, model: ServingModel) -> None:
        self.service.protections.serving(model.sealed_digest, model.store)
        self.service.model = model
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float = 2.0) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
        self.service.close()

    async def _set_health(self, status: Any) -> None:
        await self.health.set("", status)
        await self.health.set(SERVICE, status)
