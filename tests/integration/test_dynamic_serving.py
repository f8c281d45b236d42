"""Dynamic weights behind the enclave server: only a call that passed token, scope, quota and admission
decrypts a block (``DynamicWeights.decrypted_blocks`` counts every decryption), batched calls share one
decryption per block, and the answers are the resident model's."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import grpc
from test_enclave_server import (
    ACCESS,
    CONFIG,
    ISSUER,
    Servers,
    channel_for,  # noqa: F401 - fixture
    infer_request,
    mlp_handler,
    mlp_module,
    nsm,  # noqa: F401 - fixture
    pki_dir,  # noqa: F401 - fixture
    rpc_error,
    servers,  # noqa: F401 - fixture
    stub_for,
    x_tensor,
)

from enclave_app.config import WeightsPolicy
from enclave_app.weights import DynamicHandler, protect_weights

SC = grpc.StatusCode
#: one request then nothing for a long while
STINGY = replace(CONFIG, access=replace(ACCESS, tiers={
    "default": {"rate_per_s": 1000.0, "burst": 1000},
    "stingy": {"rate_per_s": 0.001, "burst": 1, "daily_requests": None, "daily_items": None}}))


def _dynamic() -> DynamicHandler:
    handler = protect_weights(WeightsPolicy(mode="dynamic", budget=1), mlp_handler(mlp_module()))
    assert isinstance(handler, DynamicHandler)
    return handler


def test_refused_calls_decrypt_nothing_and_served_ones_decrypt_each_block_once(
        servers: Servers, channel_for: Any) -> None:  # noqa: F811 - the imported fixtures
    handler = _dynamic()
    weights = handler.weights
    server = servers.start(handler, config=STINGY)
    booted = weights.decrypted_blocks  # serve() warms nothing up: the count starts here
    blocks = len(weights.blocks)
    assert blocks == 2  # the test MLP's two linear layers
    anonymous = rpc_error(lambda: stub_for(channel_for(server, token=None)).Infer(
        infer_request(x_tensor()), timeout=10))
    forged = rpc_error(lambda: stub_for(channel_for(server, token="not.a.token")).Infer(
        infer_request(x_tensor()), timeout=10))
    embed_only = ISSUER.issue("e", ["embed:*"], 600)
    unscoped = rpc_error(lambda: stub_for(channel_for(server, token=embed_only)).Infer(
        infer_request(x_tensor()), timeout=10))
    assert (anonymous.code(), forged.code(), unscoped.code()) == (
        SC.UNAUTHENTICATED, SC.UNAUTHENTICATED, SC.PERMISSION_DENIED)
    assert weights.decrypted_blocks == booted  # nothing refused before the model reached it
    stingy = stub_for(channel_for(server, token=ISSUER.issue("s", ["infer:*"], 600, tier="stingy")))
    answer = stingy.Infer(infer_request(x_tensor()), timeout=10)
    after_one = weights.decrypted_blocks
    assert after_one == booted + blocks  # one pass, each block decrypted once
    over = rpc_error(lambda: stingy.Infer(infer_request(x_tensor()), timeout=10))
    assert over.code() == SC.RESOURCE_EXHAUSTED
    assert weights.decrypted_blocks == after_one  # the quota refusal decrypted nothing
    resident = stub_for(channel_for(servers.start(mlp_handler(mlp_module()), config=STINGY)))
    expected = resident.Infer(infer_request(x_tensor()), timeout=10)
    assert [t.SerializeToString() for t in answer.outputs.tensors] == [
        t.SerializeToString() for t in expected.outputs.tensors]  # the resident server's exact bytes
    assert weights.plaintext_blocks() == 0


def test_a_block_whose_ciphertext_was_altered_in_memory_fails_the_call_with_data_loss(
        servers: Servers, channel_for: Any) -> None:  # noqa: F811 - the imported fixtures
    handler = _dynamic()
    tensor = handler.weights.blocks[1].tensors[0]
    tensor.ciphertext = bytes([tensor.ciphertext[0] ^ 1]) + tensor.ciphertext[1:]
    server = servers.start(handler)
    fatal: list[str] = []
    server.server.service.on_fatal = fatal.append  # the composition root stops serving on it
    stub = stub_for(channel_for(server))
    failed = rpc_error(lambda: stub.Infer(infer_request(x_tensor()), timeout=10))
    assert failed.code() == SC.DATA_LOSS
    assert failed.details() == "a block of the model's weights failed authentication in enclave memory"
    assert fatal == ["weights-integrity"]  # the enclave takes itself out of service (FAILED, restart)
    counters = {c.name: c.value for c in server.server.service.metrics.snapshot().counters}
    assert counters["weights_integrity_failures_total"] == 1
    assert handler.weights.plaintext_blocks() == 0
    assert not any(slot.any() for slot in handler.weights._slots)
