"""Dynamic batching on the served path: the enclave's gRPC server in process, through real gRPC.

Calls queue while a gated first call holds the only worker, so which calls share a forward pass is decided
by the test, never by timing. Every test then checks what batching must not change: each caller gets its
own rows, its own errors, its own receipt and its own audit record, under its own subject's limits.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import cbor2
import grpc
import numpy as np
import pytest
import torch
from fakes import WAIT_S, wait_until
from test_enclave_server import (
    ACCESS,
    CONFIG,
    ISSUER,
    TOKEN,
    ServerThread,
    infer_request,
    mlp_handler,
    mlp_module,
    short_socket_dir,
)

from enclave_app.config import Batching, EnclaveConfig
from enclave_app.models.base import InvalidInputError
from enclave_app.outputs import OutputGuard, SealedExtras
from enclave_app.server import ServingModel
from nitrovault.local.nsm import make_local_nsm
from nitrovault.nsm import Nsm
from nitrovault.receipts import Receipt
from nitrovault.rpc.gen.nitrovault.v1 import inference_pb2 as pb
from nitrovault.rpc.gen.nitrovault.v1 import inference_pb2_grpc as pb_grpc
from nitrovault.rpc.tensors import from_numpy, to_numpy

SC = grpc.StatusCode
PCRS = {0: bytes([0xB0]) * 48, 1: bytes([0xB1]) * 48, 2: bytes([0xB2]) * 48}


class RowsHandler:
    """A row-independent model (``y = 2x``, embeddings from the text's bytes) whose first call waits on a
    gate; it records the rows of every forward pass, and refuses any row holding a negative number."""

    kind = "test-rows"
    rows_independent = True

    def __init__(self) -> None:
        self.passes: list[int] = []
        self.gate = threading.Event()
        self._changed = threading.Condition()

    def warm_up(self) -> None:
        pass

    def _pass(self, rows: int) -> None:
        with self._changed:
            self.passes.append(rows)
            first = len(self.passes) == 1
            self._changed.notify_all()
        if first:
            assert self.gate.wait(WAIT_S), "the test never opened the gate"

    def wait_passes(self, n: int) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.passes) >= n, WAIT_S), self.passes

    def infer(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = inputs["x"]
        self._pass(x.shape[0])
        if bool((x < 0).any()):
            raise InvalidInputError("negative inputs are not accepted")
        return {"y": x * 2}

    def embed(self, texts: Sequence[str], *, normalize: bool) -> np.ndarray:
        self._pass(len(texts))
        return np.array([[len(t), t.count("a"), normalize, 1.0] for t in texts], np.float32)


@pytest.fixture(scope="module")
def nsm(tmp_path_factory: pytest.TempPathFactory) -> Nsm:
    return make_local_nsm(tmp_path_factory.mktemp("pki") / "pki", PCRS)


class Batched:
    """A server with one worker and batching on, an audit sink, and a pool of concurrent callers."""

    def __init__(self, nsm: Nsm, handler: Any, config: EnclaveConfig) -> None:
        self.lines: list[bytes] = []
        self.directory = short_socket_dir()
        self.server = ServerThread(config, nsm, str(self.directory / "g.sock"), audit_sink=self.lines.append)
        guard = OutputGuard.for_handler(config.protection, SealedExtras(), handler)
        self.server.run(self.server.server.serve(ServingModel(handler, "ab" * 32, guard)))
        self.pool = ThreadPoolExecutor(max_workers=16)
        self.channels: list[grpc.Channel] = []

    def stub(self) -> pb_grpc.InferenceStub:
        channel = grpc.insecure_channel(self.server.target)
        self.channels.append(channel)
        return pb_grpc.InferenceStub(channel)

    def queued(self) -> int:
        return self.server.server.service.batcher.queued

    def records(self, method: str) -> list[dict[str, Any]]:
        bodies = [json.loads(line)["body"] for line in self.lines]
        return [b for b in bodies if isinstance(b, dict) and b.get("method") == method]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        for channel in self.channels:
            channel.close()
        self.server.close()


def batching_config(**limits: Any) -> EnclaveConfig:
    tiers = {"default": {"rate_per_s": 1000.0, "burst": 1000}, "tiny": {"rate_per_s": 0.001, "burst": 1}}
    return replace(CONFIG, limits=replace(CONFIG.limits, workers=1, queue_depth=8, **limits),
                   batching=Batching(max_rows=64), access=replace(ACCESS, tiers=tiers))


@pytest.fixture
def batched(nsm: Nsm) -> Iterator[Callable[..., Batched]]:
    made: list[tuple[Batched, Any]] = []

    def make(handler: Any = None, config: EnclaveConfig | None = None) -> Batched:
        handler = handler or RowsHandler()
        served = Batched(nsm, handler, config or batching_config())
        made.append((served, handler))
        return served

    yield make
    for served, handler in made:
        gate = getattr(handler, "gate", None)
        if gate is not None:
            gate.set()
        served.close()


def out(tensor: pb.Tensor) -> Any:
    return to_numpy(tensor, max_elements=1 << 20)


def bearer(token: str = TOKEN) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def rows(value: float, n: int = 2) -> pb.Tensor:
    return from_numpy("x", np.full((n, 8), value, np.float32))


def hold_the_worker(served: Batched, handler: RowsHandler) -> grpc.Future:
    """A first call that occupies the only worker until the handler's gate opens."""
    held = served.stub().Infer.future(infer_request(rows(0.5)), metadata=bearer(), timeout=WAIT_S)
    handler.wait_passes(1)
    return held


def release(handler: RowsHandler, held: grpc.Future) -> None:
    """Open the handler's gate and let the held first call finish."""
    handler.gate.set()
    held.result()


def test_concurrent_calls_share_one_forward_pass_and_each_gets_its_own_rows(
    batched: Callable[..., Batched],
) -> None:
    handler = RowsHandler()
    served = batched(handler)
    held = hold_the_worker(served, handler)
    requests = [infer_request(rows(float(i + 1), n=i + 1)) for i in range(4)]
    futures = [served.stub().Infer.future(r, metadata=bearer(), timeout=WAIT_S) for r in requests]
    wait_until(lambda: served.queued() == 4, what="the four calls to queue behind the held one")
    release(handler, held)
    for i, future in enumerate(futures):
        y = out(future.result().outputs.tensors[0]).array
        np.testing.assert_array_equal(y, np.full((i + 1, 8), 2.0 * (i + 1), np.float32))
    assert handler.passes == [2, 1 + 2 + 3 + 4]  # the held call, then the four queued ones in one pass
    stats = served.server.server.service.batcher.stats
    assert (stats.batches, stats.jobs, stats.largest_rows) == (2, 5, 10)


def test_each_batched_call_has_its_own_receipt_and_audit_record(batched: Callable[..., Batched]) -> None:
    handler = RowsHandler()
    served = batched(handler)
    held = hold_the_worker(served, handler)
    tokens = {name: ISSUER.issue(name, ["infer:*"], 600) for name in ("ann", "bob", "cyd")}
    requests = {name: infer_request(rows(float(len(name) + i))) for i, name in enumerate(tokens)}
    futures = {name: served.stub().Infer.future(requests[name], metadata=bearer(token), timeout=WAIT_S)
               for name, token in tokens.items()}
    wait_until(lambda: served.queued() == 3, what="the three calls to queue")
    release(handler, held)
    receipts = {}
    for name, future in futures.items():
        response = future.result()
        receipt = Receipt.from_bytes(cbor2.dumps([response.receipt.payload, response.receipt.signature],
                                                 canonical=True))
        unsigned = pb.InferResponse()
        unsigned.CopyFrom(response)
        unsigned.ClearField("receipt")
        assert receipt.subject == name
        assert receipt.request_sha256 == hashlib.sha256(requests[name].SerializeToString()).digest()
        response_bytes = unsigned.SerializeToString(deterministic=True)
        assert receipt.response_sha256 == hashlib.sha256(response_bytes).digest()
        receipts[name] = receipt.receipt_id
    assert handler.passes == [2, 6]
    wait_until(lambda: len(served.records("Infer")) == 4, what="one audit record per call")
    by_subject = {r["subject"]: r for r in served.records("Infer")}
    for name, receipt_id in receipts.items():
        assert by_subject[name]["receipt"] == receipt_id
        assert by_subject[name]["items"] == 2
        assert by_subject[name]["decision"] == "ok"


def test_a_bad_row_fails_only_its_own_call_and_the_others_are_served(
    batched: Callable[..., Batched],
) -> None:
    handler = RowsHandler()
    served = batched(handler)
    held = hold_the_worker(served, handler)
    values = [1.0, -1.0, 3.0]
    futures = [served.stub().Infer.future(infer_request(rows(v)), metadata=bearer(), timeout=WAIT_S)
               for v in values]
    wait_until(lambda: served.queued() == 3, what="the three calls to queue")
    release(handler, held)
    np.testing.assert_array_equal(out(futures[0].result().outputs.tensors[0]).array,
                                  np.full((2, 8), 2.0, np.float32))
    with pytest.raises(grpc.RpcError) as caught:
        futures[1].result()
    assert caught.value.code() == SC.INVALID_ARGUMENT
    assert caught.value.details() == "negative inputs are not accepted"
    np.testing.assert_array_equal(out(futures[2].result().outputs.tensors[0]).array,
                                  np.full((2, 8), 6.0, np.float32))
    # the joint pass of 6 rows failed, then each call ran alone
    assert handler.passes == [2, 6, 2, 2, 2]


def test_a_subject_over_its_quota_is_refused_before_the_queue_and_does_not_touch_the_batch(
    batched: Callable[..., Batched],
) -> None:
    handler = RowsHandler()
    served = batched(handler)
    tiny = ISSUER.issue("tiny-caller", ["infer:*"], 600, tier="tiny")
    stub = served.stub()
    handler.gate.set()
    stub.Infer(infer_request(rows(1.0, n=1)), metadata=bearer(tiny), timeout=WAIT_S)  # the tier's one call
    with pytest.raises(grpc.RpcError) as caught:
        stub.Infer(infer_request(rows(1.0, n=1)), metadata=bearer(tiny), timeout=WAIT_S)
    assert caught.value.code() == SC.RESOURCE_EXHAUSTED
    assert handler.passes == [1]  # the refused call never reached the model
    assert served.server.server.service.batcher.stats.jobs == 1


def test_calls_that_differ_in_shape_or_method_never_share_a_pass(batched: Callable[..., Batched]) -> None:
    handler = RowsHandler()
    served = batched(handler)
    held = hold_the_worker(served, handler)
    narrow = from_numpy("x", np.ones((1, 4), np.float32))
    futures = [
        served.stub().Infer.future(infer_request(rows(1.0)), metadata=bearer(), timeout=WAIT_S),
        served.stub().Infer.future(infer_request(narrow), metadata=bearer(), timeout=WAIT_S),
        served.stub().Embed.future(pb.EmbedRequest(texts=["a", "aa"]), metadata=bearer(), timeout=WAIT_S),
        served.stub().Embed.future(pb.EmbedRequest(texts=["b"], normalize=True), metadata=bearer(),
                                   timeout=WAIT_S),
        served.stub().Infer.future(infer_request(rows(2.0)), metadata=bearer(), timeout=WAIT_S),
        served.stub().Embed.future(pb.EmbedRequest(texts=["aaa"]), metadata=bearer(), timeout=WAIT_S),
    ]
    wait_until(lambda: served.queued() == 6, what="the six calls to queue")
    release(handler, held)
    answers = [f.result() for f in futures]
    assert sorted(handler.passes[1:]) == sorted([4, 1, 3, 1])  # (8-wide x2) (4-wide) (embed x2) (normalized)
    np.testing.assert_array_equal(out(answers[4].outputs.tensors[0]).array,
                                  np.full((2, 8), 4.0, np.float32))
    np.testing.assert_array_equal(out(answers[2].embeddings).array[:, :3], [[1, 1, 0], [2, 2, 0]])
    np.testing.assert_array_equal(out(answers[3].embeddings).array[:, :3], [[1, 0, 1]])
    np.testing.assert_array_equal(out(answers[5].embeddings).array[:, :3], [[3, 3, 0]])


def test_a_model_whose_rows_are_not_independent_is_called_once_per_call(
    batched: Callable[..., Batched],
) -> None:
    handler = RowsHandler()
    handler.rows_independent = False  # type: ignore[misc]
    served = batched(handler)
    held = hold_the_worker(served, handler)
    futures = [served.stub().Infer.future(infer_request(rows(1.0)), metadata=bearer(), timeout=WAIT_S)
               for _ in range(3)]
    wait_until(lambda: served.queued() == 3, what="the three calls to queue")
    release(handler, held)
    for future in futures:
        future.result()
    assert handler.passes == [2, 2, 2, 2]


def test_a_queued_call_whose_caller_gave_up_is_not_run(batched: Callable[..., Batched]) -> None:
    handler = RowsHandler()
    served = batched(handler)
    held = hold_the_worker(served, handler)
    gone = served.stub().Infer.future(infer_request(rows(5.0)), metadata=bearer(), timeout=WAIT_S)
    kept = served.stub().Infer.future(infer_request(rows(1.0)), metadata=bearer(), timeout=WAIT_S)
    wait_until(lambda: served.queued() == 2, what="both calls to queue")
    assert gone.cancel()
    wait_until(lambda: served.server.server.service._admitted == 2, what="the cancelled call's slot back")
    release(handler, held)
    kept.result()
    assert handler.passes == [2, 2]  # the abandoned call's rows never reached the model


def test_batched_mlp_answers_equal_the_module_row_for_row(batched: Callable[..., Batched]) -> None:
    """A real model: the gathered pass answers each caller what the module answers for its rows."""
    module = mlp_module()
    handler = mlp_handler(module)
    config = replace(batching_config(), handler="generic:mlp-classifier")
    served = batched(handler, config)
    rng = np.random.default_rng(3)
    inputs = [rng.standard_normal((n, 8)).astype(np.float32) for n in (1, 3, 2, 5, 4, 1, 2, 3)]
    stubs = [served.stub() for _ in inputs]
    futures = [s.Infer.future(infer_request(from_numpy("x", x)), metadata=bearer(), timeout=WAIT_S)
               for s, x in zip(stubs, inputs, strict=True)]
    for x, future in zip(inputs, futures, strict=True):
        got = {t.name: out(t).array for t in future.result().outputs.tensors}
        with torch.inference_mode():
            want = module(torch.from_numpy(x))
        np.testing.assert_allclose(got["probabilities"], want["probabilities"].numpy(), rtol=1e-5, atol=1e-6)
