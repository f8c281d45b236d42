"""The enclave's gRPC server (``enclave_app.server``) in process, on a unix socket, through real gRPC.

The server runs on an asyncio loop in a background thread (:class:`ServerThread`); tests call it with the
ordinary synchronous stubs. The NSM is the local fake device over a throwaway PKI, the model a real
``generic:mlp-classifier`` built from a torch module's state dict, or a fake handler (slow, broken) for
the queue, deadline and error-mapping paths. ``tests/integration/test_client.py`` reuses the harness.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ed25519
from fakes import WAIT_S, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import nitrovault
from enclave_app.config import Access, EnclaveConfig, Limits
from enclave_app.models import ModelHandler, load_handler
from enclave_app.models.generic import MLPClassifier
from enclave_app.outputs import OutputGuard, SealedExtras
from enclave_app.server import INFO_PCRS, EnclaveServer, ServingModel
from enclave_app.status import CORRELATION_KEY
from nitrovault.attestation import Expectations, load_root, parse_document, verify_document
from nitrovault.kms.trust import amazon_trust_services_pem
from nitrovault.local.nsm import make_local_nsm
from nitrovault.nsm import Nsm
from nitrovault.owner.issuer import TokenIssuer
from nitrovault.rpc.gen.nitrovault.v1 import inference_pb2 as pb
from nitrovault.rpc.gen.nitrovault.v1 import inference_pb2_grpc as pb_grpc
from nitrovault.rpc.tensors import from_numpy, to_numpy

SC = grpc.StatusCode
T = TypeVar("T")

PCRS = {0: bytes([0xA0]) * 48, 1: bytes([0xA1]) * 48, 2: bytes([0xA2]) * 48, 8: bytes([0xA8]) * 48}
DIGEST = "ab" * 32
LIMITS = Limits(
    max_request_bytes=64 * 1024,
    max_response_bytes=256 * 1024,
    max_batch=8,
    queue_depth=4,
    workers=2,
    max_text_chars=100,
    max_tensor_elements=1024,
)
#: the tests' token issuer, baked into CONFIG like an owner's issuer into the measured config
ISSUER = TokenIssuer(
    ed25519.Ed25519PrivateKey.generate(), "test-kid", "https://issuer.test", "nitrovault-test"
)
#: a token allowed every method on every model, sent by every channel of ``channel_for``
TOKEN = ISSUER.issue("tester", ["infer:*", "embed:*"], 3600)
ACCESS = Access(issuer="https://issuer.test", audience="nitrovault-test", jwks=ISSUER.jwks,
                tiers={"default": {"rate_per_s": 1000.0, "burst": 1000}})
CONFIG = EnclaveConfig(
    model_id="mlp",
    model_version="3",
    handler="generic:mlp-classifier",
    kms_key_arn="arn:aws:kms:us-east-1:111122223333:key/00000000-0000-0000-0000-000000000000",
    region="us-east-1",
    encryption_context={"model": "mlp", "version": "3"},
    sealed_digest="cd" * 32,
    kms_ca_bundle=amazon_trust_services_pem(),
    limits=LIMITS,
    access=ACCESS,
)
MLP_CONFIG = {"in_features": 8, "hidden": [16], "classes": 3}


# -- the harness (shared with test_client.py) ---------------------------------------------------------------


class ServerThread:
    """An :class:`EnclaveServer` on ``unix:<socket_path>``, served by an event loop in a daemon thread."""

    def __init__(self, config: EnclaveConfig, nsm: Nsm, socket_path: str, **server_options: Any) -> None:
        self.target = f"unix:{socket_path}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="enclave-loop", daemon=True)
        self.thread.start()

        async def make() -> EnclaveServer:
            server = EnclaveServer(config, nsm, socket_path, **server_options)
            await server.start()
            return server

        self.server = self.run(make())

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def serve(self, handler: ModelHandler, digest: str = DIGEST) -> None:
        """Serve ``handler`` under the config's protection, with no sealed extras (as a model sealed
        without any would be)."""
        outputs = OutputGuard.for_handler(self.server.service.config.protection, SealedExtras(), handler)
        self.run(self.server.serve(ServingModel(handler=handler, sealed_digest=digest, outputs=outputs)))

    def close(self) -> None:
        try:
            self.run(self.server.stop(0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()



def short_socket_dir() -> Path:
    """A private directory with a short path (unix socket paths are limited to ~107 bytes)."""
    return Path(tempfile.mkdtemp(prefix="nv-", dir="/tmp"))


@dataclass
class Servers:
    """Starts servers for one test and stops them all afterwards."""

    nsm: Nsm
    started: list[tuple[ServerThread, Path]] = field(default_factory=list)

    def start(
        self, handler: ModelHandler | None = None, *, config: EnclaveConfig = CONFIG, **limits: int
    ) -> ServerThread:
        if limits:
            config = replace(config, limits=replace(config.limits, **limits))
        directory = short_socket_dir()
        server = ServerThread(config, self.nsm, str(directory / "g.sock"))
        self.started.append((server, directory))
        if handler is not None:
            server.serve(handler)
        return server

    def close(self) -> None:
        for server, directory in self.started:
            server.close()
            shutil.rmtree(directory, ignore_errors=True)


def mlp_module(seed: int = 7) -> MLPClassifier:
    torch.manual_seed(seed)
    return MLPClassifier(**MLP_CONFIG).eval()  # type: ignore[arg-type]


def mlp_handler(module: MLPClassifier) -> ModelHandler:
    state = {k: v.clone() for k, v in module.state_dict().items()}
    return load_handler("generic:mlp-classifier", state, {"nitrovault.config": json.dumps(MLP_CONFIG)})


@dataclass
class SlowHandler:
    """Sleeps ``delay`` seconds per call; counts the calls that really ran."""

    delay: float
    kind: str = "test-slow"
    rows_independent: bool = False
    calls: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def warm_up(self) -> None:
        pass

    def embed(self, texts: Sequence[str], *, normalize: bool) -> np.ndarray:
        self._count()
        time.sleep(self.delay)
        return np.ones((len(texts), 4), np.float32)

    def infer(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self._count()
        time.sleep(self.delay)
        return {"y": inputs["x"] * 2}

    def _count(self) -> None:
        with self._lock:
            self.calls += 1


class GatedHandler:
    """Every call's work blocks until :meth:`release`, so a test decides how long the model is busy and
    asserts on the server while the work is provably unfinished. ``calls`` counts the calls whose work
    started, ``finished`` the ones that returned."""

    kind = "test-gated"
    rows_independent = False

    def __init__(self) -> None:
        self.calls = 0
        self.finished = 0
        self._gate = threading.Event()
        self._changed = threading.Condition()

    def warm_up(self) -> None:
        pass

    def embed(self, texts: Sequence[str], *, normalize: bool) -> np.ndarray:
        self._work()
        return np.ones((len(texts), 4), np.float32)

    def infer(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self._work()
        return {"y": inputs["x"] * 2}

    def release(self) -> None:
        self._gate.set()

    def wait_for_calls(self, n: int) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: self.calls >= n, WAIT_S):
                pytest.fail(f"timed out after {WAIT_S:g}s waiting for {n} model call(s) to start "
                            f"(saw {self.calls})")

    def _work(self) -> None:
        with self._changed:
            self.calls += 1
            self._changed.notify_all()
        # Longer than any call's own timeout in these tests: a server that waits for this work is caught
        # by the assertion on the call, not by this safety net (which only frees a forgotten worker).
        if not self._gate.wait(2 * WAIT_S):
            raise TimeoutError("the test never released the gated work")
        with self._changed:
            self.finished += 1
            self._changed.notify_all()


def in_flight(server: ServerThread) -> int:
    """Calls the server holds an admission slot for (its admission counter; no RPC reports it)."""
    return server.server.service._admitted


def watch_cancellations(server: ServerThread) -> threading.Event:
    """An event set once the server has seen one of its model calls cancelled (its caller gave up)."""
    service = server.server.service
    original = service._run
    seen = threading.Event()

    async def spy(context: grpc.aio.ServicerContext, call: Any, key: Any) -> Any:
        try:
            return await original(context, call, key)
        except asyncio.CancelledError:
            seen.set()
            raise

    service._run = spy  # type: ignore[method-assign]
    return seen


SECRET_TEXT = "db password is hunter2 at 0xdeadbeef"


class BrokenHandler:
    """Raises an unexpected exception whose text must never reach the caller."""

    kind = "test-broken"
    rows_independent = False

    def warm_up(self) -> None:
        pass

    def embed(self, texts: Sequence[str], *, normalize: bool) -> np.ndarray:
        raise KeyError(SECRET_TEXT)

    def infer(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise RuntimeError(SECRET_TEXT)


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pki") / "pki"


@pytest.fixture(scope="session")
def nsm(pki_dir: Path) -> Nsm:
    return make_local_nsm(pki_dir, PCRS)


@pytest.fixture
def gated() -> Iterator[GatedHandler]:
    """A :class:`GatedHandler`, released when the test ends (before the servers stop) whatever happened."""
    handler = GatedHandler()
    try:
        yield handler
    finally:
        handler.release()


@pytest.fixture
def servers(nsm: Nsm) -> Iterator[Servers]:
    started = Servers(nsm)
    try:
        yield started
    finally:
        started.close()


class BearerInterceptor(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Adds ``authorization: Bearer <token>`` to every unary call of a channel."""

    def __init__(self, token: str) -> None:
        self.token = token

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = [*(details.metadata or ()), ("authorization", f"Bearer {self.token}")]
        return continuation(details._replace(metadata=metadata), request)


@pytest.fixture
def channel_for() -> Iterator[Callable[..., grpc.Channel]]:
    opened: list[grpc.Channel] = []

    def open_channel(server: ServerThread, token: str | None = TOKEN) -> grpc.Channel:
        channel = grpc.insecure_channel(server.target)
        opened.append(channel)
        return channel if token is None else grpc.intercept_channel(channel, BearerInterceptor(token))

    yield open_channel
    for channel in opened:
        channel.close()


def stub_for(channel: grpc.Channel) -> pb_grpc.InferenceStub:
    return pb_grpc.InferenceStub(channel)


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def infer_request(*tensors: pb.Tensor) -> pb.InferRequest:
    return pb.InferRequest(inputs=pb.Tensors(tensors=list(tensors)))


def x_tensor(rows: int = 2, name: str = "x") -> pb.Tensor:
    return from_numpy(name, np.zeros((rows, 8), np.float32))


# -- health and readiness ------------------------------------------------------------------------------------


def test_not_serving_before_serve_then_serving(servers: Servers, channel_for: Any) -> None:
    server = servers.start()
    channel = channel_for(server)
    health = health_pb2_grpc.HealthStub(channel)
    stub = stub_for(channel)
    for service in ("", "nitrovault.v1.Inference"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    for call in (
        lambda: stub.Infer(infer_request(x_tensor()), timeout=5),
        lambda: stub.Embed(pb.EmbedRequest(texts=["a"]), timeout=5),
        lambda: stub.Info(pb.InfoRequest(), timeout=5),
    ):
        err = rpc_error(call)
        assert err.code() == SC.UNAVAILABLE
        assert err.details() == "enclave is not serving yet"

    server.serve(mlp_handler(mlp_module()))
    for service in ("", "nitrovault.v1.Inference"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    assert stub.Info(pb.InfoRequest(), timeout=5).model_id == "mlp"


def test_socket_is_private(servers: Servers) -> None:
    server = servers.start()
    assert os.stat(server.server.socket_path).st_mode & 0o777 == 0o600


@pytest.mark.parametrize("stub_class", [reflection_pb2_grpc.ServerReflectionStub, "v1"])
def test_reflection_v1_and_v1alpha_list_the_services_to_token_holders_only(
    servers: Servers, channel_for: Any, stub_class: Any
) -> None:
    channel = channel_for(servers.start(mlp_handler(mlp_module())), token=None)
    if stub_class == "v1":  # grpcio-reflection has no v1 stubs: the same messages under the v1 name
        method = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
    else:
        method = stub_class(channel).ServerReflectionInfo
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = method(iter([request]), timeout=5, metadata=(("authorization", f"Bearer {TOKEN}"),))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"nitrovault.v1.Inference", "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection"} <= names
    anonymous = rpc_error(lambda: list(method(iter([request]), timeout=5)))
    assert anonymous.code() == SC.UNAUTHENTICATED
    forged = rpc_error(lambda: list(method(iter([request]), timeout=5,
                                            metadata=(("authorization", "Bearer not.a.token"),))))
    assert forged.code() == SC.UNAUTHENTICATED


def test_health_watch_streams_are_capped_and_check_still_answers(servers: Servers, channel_for: Any) -> None:
    server = servers.start(mlp_handler(mlp_module()), max_watch_streams=2)
    channel = channel_for(server, token=None)
    health = health_pb2_grpc.HealthStub(channel)
    watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(2)]
    for watch in watches:  # each open watch has answered once: both are being served
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    third = health.Watch(health_pb2.HealthCheckRequest(), timeout=30)
    refused = rpc_error(lambda: next(third))
    assert refused.code() == SC.RESOURCE_EXHAUSTED
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING
    watches[0].cancel()
    while server.server.health.watching > 1:  # the cancelled stream's slot comes back
        threading.Event().wait(0.01)
    again = health.Watch(health_pb2.HealthCheckRequest(), timeout=30)
    assert next(again).status == health_pb2.HealthCheckResponse.SERVING
    for watch in (watches[1], again):
        watch.cancel()


def test_attest_needs_no_token_and_is_audited(servers: Servers, channel_for: Any) -> None:
    server = servers.start(mlp_handler(mlp_module()))
    stub = stub_for(channel_for(server, token=None))
    assert stub.Attest(pb.AttestRequest(nonce=b"n1"), timeout=10).document
    assert rpc_error(lambda: stub.Info(pb.InfoRequest(), timeout=10)).code() == SC.UNAUTHENTICATED


def test_an_empty_tensor_is_invalid_argument_not_internal(servers: Servers, channel_for: Any) -> None:
    stub = stub_for(channel_for(servers.start(mlp_handler(mlp_module()))))
    for shape in ((0, 8), (2, 0), (0,)):
        empty = np.zeros(shape, np.float32)
        request = pb.InferRequest(inputs=pb.Tensors(tensors=[from_numpy("x", empty)]))
        err = rpc_error(lambda request=request: stub.Infer(request, timeout=10))
        assert err.code() == SC.INVALID_ARGUMENT, shape
        assert "internal" not in (err.details() or "")


# -- Infer, Info, Attest ------------------------------------------------------------------------------------


def test_infer_round_trip_equals_the_torch_module(servers: Servers, channel_for: Any) -> None:
    module = mlp_module()
    stub = stub_for(channel_for(servers.start(mlp_handler(module))))
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    response = stub.Infer(infer_request(from_numpy("x", x)), timeout=10)
    assert response.model_id == "mlp@3"
    outputs = {t.name: to_numpy(t, max_elements=10_000).array for t in response.outputs.tensors}
    with torch.inference_mode():
        expected = module(torch.from_numpy(x))
    assert set(outputs) == {"logits", "probabilities"}
    for name in outputs:
        assert outputs[name].shape == (5, 3) and outputs[name].dtype == np.float32
        np.testing.assert_allclose(outputs[name], expected[name].numpy(), rtol=1e-6, atol=1e-6)


def test_an_unnamed_input_is_x(servers: Servers, channel_for: Any) -> None:
    stub = stub_for(channel_for(servers.start(mlp_handler(mlp_module()))))
    response = stub.Infer(infer_request(x_tensor(name="")), timeout=10)
    assert {t.name for t in response.outputs.tensors} == {"logits", "probabilities"}


def test_info_reports_identity_measurements_and_limits(servers: Servers, channel_for: Any) -> None:
    stub = stub_for(channel_for(servers.start(mlp_handler(mlp_module()))))
    info = stub.Info(pb.InfoRequest(), timeout=5)
    assert (info.model_id, info.model_version, info.sealed_digest) == ("mlp", "3", DIGEST)
    assert dict(info.pcrs) == {i: PCRS.get(i, bytes(48)) for i in INFO_PCRS}
    assert info.enclave_version == nitrovault.__version__
    assert info.max_batch == LIMITS.max_batch
    assert info.limits.max_request_bytes == LIMITS.max_request_bytes
    assert info.limits.max_response_bytes == LIMITS.max_response_bytes
    assert info.limits.max_tensor_elements == LIMITS.max_tensor_elements
    assert info.limits.max_text_chars == LIMITS.max_text_chars
    assert info.limits.max_inflight == LIMITS.workers + LIMITS.queue_depth


def test_attest_binds_the_nonce_and_verifies_with_the_local_root(
    servers: Servers, channel_for: Any, pki_dir: Path
) -> None:
    stub = stub_for(channel_for(servers.start(mlp_handler(mlp_module()))))
    nonce = os.urandom(64)  # the largest accepted
    document = stub.Attest(pb.AttestRequest(nonce=nonce), timeout=10).document
    verified = verify_document(
        document,
        at=datetime.now(UTC),
        root=load_root(pki_dir / "root.pem"),
        expect=Expectations(pcrs={0: PCRS[0], 2: PCRS[2]}, nonce=nonce),
    )
    assert verified.nonce == nonce
    without = stub.Attest(pb.AttestRequest(), timeout=10).document
    assert parse_document(without).nonce is None


def test_attest_rejects_a_nonce_over_64_bytes(servers: Servers, channel_for: Any) -> None:
    stub = stub_for(channel_for(servers.start(mlp_handler(mlp_module()))))
    err = rpc_error(lambda: stub.Attest(pb.AttestRequest(nonce=b"n" * 65), timeout=10))
    assert err.code() == SC.INVALID_ARGUMENT
    assert "64 bytes" in err.details()


# -- malformed and oversized requests ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tensor", "says"),
    [
        (pb.Tensor(name="x", dtype=pb.DTYPE_FLOAT32, shape=[2, 8], data=b"\0" * 63), "data size"),
        (pb.Tensor(name="x", dtype=99, shape=[2, 8], data=b"\0" * 64), "unknown dtype"),
        (pb.Tensor(name="x", dtype=pb.DTYPE_UNSPECIFIED, shape=[2, 8], data=b"\0" * 64), "unknown dtype"),
        (pb.Tensor(name="x", dtype=pb.DTYPE_FLOAT32, shape=[-2, -8], data=b"\0" * 64), "negative"),
        (pb.Tensor(name="x", dtype=pb.DTYPE_FLOAT32, shape=[1, 1025], data=b"\0" * 4100), "exceed"),
        (pb.Tensor(name="x", dtype=pb.DTYPE_FLOAT32, shape=[1 << 40, 1 << 40], data=b""), "exceed"),
        (pb.Tensor(name="x", dtype=pb.DTYPE_BOOL, shape=[2], data=b"\x01\x02"), "0 or 1"),
    ],
    ids=["size-mismatch", "unknown-dtype", "unspecified-dtype", "negative-dim", "too-many-elements",
         "overflowing-shape", "bad-bool"],
)
def test_malformed_tensors_are_invalid_argument(
    servers: Servers, channel_for: Any, tensor: pb.Tensor, says: str
) -> None:
    stub = stub_for(channel_for(servers.start(mlp_handler(mlp_module()))))
    err = rpc_error(lambda: stub.Infer(infer_request(tensor), timeout=10))
    assert err.code() == SC.INVALID_ARGUMENT
    assert says in err.details()


@pytest.mark.parametrize(
    ("request_", "says"),
    [
        (infer_request(x_tensor(rows=LIMITS.max_batch + 1)), "rows per call"),
        (infer_request(x_tensor(), x_tensor(name="")), "duplicate input"),
        (infer_request(), "no input tensors"),
        (infer_request(from_numpy("x", np.zeros((2, 5), np.float32))), "do not fit the model"),
        (pb.InferRequest(model="other", inputs=pb.Tensors(tensors=[x_tensor()])), "unknown model"),
        (pb.InferRequest(sealed=pb.SealedPayload(ciphertext=b"c")), "sealed payloads"),
    ],
    ids=["too-many-rows", "duplicate-name", "no-inputs", "wrong-shape", "unknown-model", "sealed"],
)
def test_bad_infer_requests_are_invalid_argument(
    servers: Servers, channel_for: Any, request_: pb.InferRequest, says: str
) -> None:
    stub = stub_for(channel_for(servers.start(mlp_handler(mlp_module()))))
    err = rpc_error(lambda: stub.Infer(request_, timeout=10))
    assert err.code() == SC.INVALID_ARGUMENT
    assert says in err.details()


def test_the_model_name_with_version_is_accepted(servers: Servers, channel_for: Any) -> None:
    stub = stub_for(channel_for(servers.start(mlp_handler(mlp_module()))))
    for model in ("mlp", "mlp@3"):
        request = pb.InferRequest(model=model, inputs=pb.Tensors(tensors=[x_tensor()]))
        assert stub.Infer(request, timeout=10).model_id == "mlp@3"


@pytest.mark.parametrize(
    ("texts", "says"),
    [
        (["t"] * (LIMITS.max_batch + 1), "texts per call"),
        (["x" * (LIMITS.max_text_chars + 1)], "characters"),
        ([], "no texts"),
    ],
    ids=["too-many-texts", "text-too-long", "no-texts"],
)
def test_bad_embed_requests_are_invalid_argument(
    servers: Servers, channel_for: Any, texts: list[str], says: str
) -> None:
    handler = SlowHandler(delay=0)
    stub = stub_for(channel_for(servers.start(handler)))
    err = rpc_error(lambda: stub.Embed(pb.EmbedRequest(texts=texts), timeout=10))
    assert err.code() == SC.INVALID_ARGUMENT
    assert says in err.details()
    assert handler.calls == 0
    assert stub.Embed(pb.EmbedRequest(texts=["t"] * LIMITS.max_batch), timeout=10).embeddings.shape == [8, 4]


def test_a_request_over_max_request_bytes_is_resource_exhausted(servers: Servers, channel_for: Any) -> None:
    stub = stub_for(channel_for(servers.start(mlp_handler(mlp_module()))))
    big = pb.Tensor(name="x", dtype=pb.DTYPE_UINT8, shape=[70_000], data=b"\0" * 70_000)
    assert infer_request(big).ByteSize() > LIMITS.max_request_bytes
    err = rpc_error(lambda: stub.Infer(infer_request(big), timeout=10))
    assert err.code() == SC.RESOURCE_EXHAUSTED
    assert stub.Infer(infer_request(x_tensor()), timeout=10).model_id == "mlp@3"  # still serving


def test_embed_on_a_classifier_is_unimplemented(servers: Servers, channel_for: Any) -> None:
    stub = stub_for(channel_for(servers.start(mlp_handler(mlp_module()))))
    err = rpc_error(lambda: stub.Embed(pb.EmbedRequest(texts=["hello"]), timeout=10))
    assert err.code() == SC.UNIMPLEMENTED


# -- admission, deadlines, internal errors -------------------------------------------------------------------


def test_a_full_queue_answers_resource_exhausted_at_once(
    servers: Servers, channel_for: Any, gated: GatedHandler
) -> None:
    stub = stub_for(channel_for(servers.start(gated, workers=1, queue_depth=1)))
    futures = [stub.Infer.future(infer_request(x_tensor()), timeout=WAIT_S) for _ in range(5)]
    # "At once": the calls beyond capacity are answered while the admitted work is still held.
    wait_until(lambda: sum(f.done() for f in futures) >= 3, what="the calls beyond capacity to be answered")
    answered_while_busy = [f for f in futures if f.done()]
    assert len(answered_while_busy) == 3
    assert gated.finished == 0
    gated.release()
    rejected: list[grpc.Future] = []
    succeeded = 0
    for future in futures:
        try:
            future.result()
            succeeded += 1
        except grpc.RpcError as err:
            assert err.code() == SC.RESOURCE_EXHAUSTED
            assert err.details() == "too many requests in flight; retry later"
            rejected.append(future)
    assert succeeded == 2  # capacity = workers + queue_depth
    assert len(rejected) == 3
    assert rejected == answered_while_busy
    assert gated.calls == 2
    # The slots are free again once the admitted calls are done.
    assert stub.Infer(infer_request(x_tensor()), timeout=10).outputs.tensors[0].name == "y"


def test_rejections_do_not_wait_for_the_queue(
    servers: Servers, channel_for: Any, gated: GatedHandler
) -> None:
    stub = stub_for(channel_for(servers.start(gated, workers=1, queue_depth=0)))
    busy = stub.Infer.future(infer_request(x_tensor()), timeout=WAIT_S)
    gated.wait_for_calls(1)
    err = rpc_error(lambda: stub.Infer(infer_request(x_tensor()), timeout=WAIT_S))
    assert err.code() == SC.RESOURCE_EXHAUSTED
    assert gated.finished == 0  # refused while the only worker is still busy: it did not wait for it
    gated.release()
    busy.result()


def test_a_deadline_shorter_than_the_work_is_deadline_exceeded(
    servers: Servers, channel_for: Any, gated: GatedHandler
) -> None:
    stub = stub_for(channel_for(servers.start(gated)))
    err = rpc_error(lambda: stub.Infer(infer_request(x_tensor()), timeout=0.2))
    assert err.code() == SC.DEADLINE_EXCEEDED
    assert gated.finished == 0  # answered at the deadline, while the work is still held


def test_a_queued_call_past_its_deadline_is_not_run(
    servers: Servers, channel_for: Any, gated: GatedHandler
) -> None:
    server = servers.start(gated, workers=1, queue_depth=2)
    stub = stub_for(channel_for(server))
    first = stub.Infer.future(infer_request(x_tensor()), timeout=WAIT_S)
    gated.wait_for_calls(1)
    err = rpc_error(lambda: stub.Infer(infer_request(x_tensor()), timeout=0.2))
    assert err.code() == SC.DEADLINE_EXCEEDED
    gated.release()
    first.result()
    # Both calls are settled (the first ran, the queued one was dropped or skipped) once no slot is held.
    wait_until(lambda: in_flight(server) == 0, what="the queued call to be settled")
    assert gated.calls == 1
    assert stub.Infer(infer_request(x_tensor()), timeout=10).outputs.tensors[0].name == "y"


def test_an_abandoned_call_keeps_its_slot_while_its_work_runs(
    servers: Servers, channel_for: Any, gated: GatedHandler
) -> None:
    """Admission counts model work, not waiting callers: a worker still busy for a caller that gave up
    is not free, so the next call beyond capacity is refused instead of queueing past the bound."""
    server = servers.start(gated, workers=1, queue_depth=0)
    cancelled = watch_cancellations(server)
    stub = stub_for(channel_for(server))
    # The caller gives up once its work has started (a cancel, not a deadline: no race with the start);
    # the work then runs until released.
    abandoned = stub.Infer.future(infer_request(x_tensor()), timeout=WAIT_S)
    gated.wait_for_calls(1)
    assert abandoned.cancel()
    assert abandoned.cancelled()
    assert cancelled.wait(WAIT_S), "the server never saw the abandoned call cancelled"
    refused = rpc_error(lambda: stub.Infer(infer_request(x_tensor()), timeout=10))
    assert refused.code() == SC.RESOURCE_EXHAUSTED
    gated.release()  # the abandoned work ends and gives the slot back
    wait_until(lambda: in_flight(server) == 0, what="the abandoned work to give its slot back")
    assert stub.Infer(infer_request(x_tensor()), timeout=10).outputs.tensors[0].name == "y"
    assert gated.calls == 2


def test_an_unexpected_error_is_internal_with_a_correlation_id_only(
    servers: Servers, channel_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    stub = stub_for(channel_for(servers.start(BrokenHandler())))
    with caplog.at_level(logging.ERROR, logger="enclave_app.status"):
        for call in (
            lambda: stub.Infer(infer_request(x_tensor()), timeout=10),
            lambda: stub.Embed(pb.EmbedRequest(texts=["a"]), timeout=10),
        ):
            err = rpc_error(call)
            assert err.code() == SC.INTERNAL
            assert SECRET_TEXT not in err.details()
            assert "hunter2" not in str(err.trailing_metadata())
            found = re.fullmatch(r"internal error \(correlation id ([0-9a-f]{16})\)", err.details())
            assert found is not None, err.details()
            assert dict(err.trailing_metadata())[CORRELATION_KEY] == found.group(1)
            # The enclave's own log ties the id to the real cause.
            assert any(found.group(1) in r.getMessage() for r in caplog.records)
