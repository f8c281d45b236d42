"""``Generate`` on the served path: a real GPT-2 (the tiny LM trained on the project's docs) behind the
enclave's gRPC server in process, through real gRPC.

What is checked: the stream is the handler's own continuation, piece by piece and in order; its last
message's receipt covers the whole transcript (and fails when a piece is dropped, changed or re-split);
every token is charged before it is sent, so an allowance that runs out ends the stream with
RESOURCE_EXHAUSTED and the tokens sent are exactly the tokens charged; a caller that goes away stops the
generation and frees the worker; bad requests get typed errors; the text watermark is in the stream.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from fakes import WAIT_S, wait_until
from handlers import lm_handler
from test_enclave_server import ACCESS, CONFIG, ISSUER, ServerThread, in_flight, short_socket_dir

from enclave_app.boot import attach_text_watermark
from enclave_app.config import EnclaveConfig
from enclave_app.models.causal_lm import CausalLMHandler, TextRequest
from enclave_app.models.generation import Sampling
from enclave_app.outputs import OutputGuard, SealedExtras
from enclave_app.server import ServingModel
from nitrovault.client import NitrovaultClient
from nitrovault.errors import ReceiptError
from nitrovault.local.nsm import make_local_nsm
from nitrovault.nsm import Nsm
from nitrovault.receipts import Receipt, check_receipt
from nitrovault.rpc.gen.nitrovault.v1 import inference_pb2 as pb
from nitrovault.rpc.gen.nitrovault.v1 import inference_pb2_grpc as pb_grpc
from nitrovault.rpc.streams import Transcript
from nitrovault.watermark import GreenList, derive_watermark_keys, detect_text_mark

SC = grpc.StatusCode
PCRS = {0: bytes([0xC0]) * 48, 1: bytes([0xC1]) * 48, 2: bytes([0xC2]) * 48}
PROMPT = "The parent instance"
TOKEN = ISSUER.issue("writer", ["generate:*"], 3600)
GREEDY = {"temperature": 0.0}


def lm_config(*, tiers: dict[str, Any] | None = None, protection: dict[str, Any] | None = None,
              **limits: Any) -> EnclaveConfig:
    data = json.loads(replace(CONFIG, handler="causal-lm:gpt2", model_id="tiny-gpt2").to_json())
    data["encryption_context"] = {"model": "tiny-gpt2", "version": "3"}
    data["protection"] = protection or {}
    config = EnclaveConfig.from_mapping(data)
    access = replace(ACCESS, tiers=tiers) if tiers else ACCESS
    limits = {"workers": 1, "max_text_chars": 400, **limits}
    return replace(config, access=access, limits=replace(config.limits, **limits))


@pytest.fixture(scope="module")
def nsm(tmp_path_factory: pytest.TempPathFactory) -> Nsm:
    return make_local_nsm(tmp_path_factory.mktemp("pki") / "pki", PCRS)


class Served:
    """A server for ``handler`` with an audit sink; its receipts check against its own boot key."""

    def __init__(self, nsm: Nsm, handler: Any, config: EnclaveConfig) -> None:
        self.nsm = nsm
        self.lines: list[bytes] = []
        self.directory = short_socket_dir()
        self.server = ServerThread(config, nsm, str(self.directory / "g.sock"), audit_sink=self.lines.append)
        guard = OutputGuard.for_handler(config.protection, SealedExtras(), handler)
        self.server.run(self.server.server.serve(ServingModel(handler, "ab" * 32, guard)))
        self.channel = grpc.insecure_channel(self.server.target)
        self.stub = pb_grpc.InferenceStub(self.channel)

    def generate(self, token: str = TOKEN, **fields: Any) -> Any:
        fields.setdefault("prompt", PROMPT)
        metadata = (("authorization", f"Bearer {token}"),)
        return self.stub.Generate(pb.GenerateRequest(**fields), metadata=metadata, timeout=WAIT_S)

    def check(self, receipt: pb.Receipt, transcript: bytes, request: bytes) -> Receipt:
        import cbor2

        body = cbor2.dumps([bytes(receipt.payload), bytes(receipt.signature)], canonical=True)
        return check_receipt(Receipt.from_bytes(body), public_key=self.server.server.service.protections
                             .boot_key.public_key(), pcr0=self.nsm.describe_pcr(0).data,
                             response=transcript, request=request)

    def records(self) -> list[dict[str, Any]]:
        bodies = [json.loads(line)["body"] for line in self.lines]
        return [b for b in bodies if isinstance(b, dict) and b.get("method") == "Generate"]

    def client(self, token: str = TOKEN) -> NitrovaultClient:
        return NitrovaultClient(self.server.target, token=token, timeout=WAIT_S, unsafe_plaintext=True)

    def close(self) -> None:
        self.channel.close()
        self.server.close()


@pytest.fixture
def serve(nsm: Nsm) -> Iterator[Any]:
    made: list[Served] = []

    def make(handler: Any, config: EnclaveConfig | None = None) -> Served:
        made.append(Served(nsm, handler, config or lm_config()))
        return made[-1]

    yield make
    for served in made:
        served.close()


def expected(handler: CausalLMHandler, **request: Any) -> tuple[str, str, int]:
    """The handler's own continuation (text, finish reason, tokens), outside any server."""
    pieces: list[str] = []
    sampling = Sampling(**{k: request.pop(k) for k in ("temperature", "top_p", "seed") if k in request})
    done = handler.generate(TextRequest(request.pop("prompt", PROMPT), sampling=sampling, **request),
                            lambda text, _: pieces.append(text))
    return "".join(pieces), done.finish_reason, done.completion_tokens


def test_the_stream_is_the_models_continuation_and_its_receipt_covers_the_transcript(
        serve: Any, tiny_lm: Path) -> None:
    handler = lm_handler(tiny_lm)
    served = serve(handler)
    messages = list(served.generate(max_new_tokens=40, **GREEDY))
    *pieces, last = messages
    assert pieces and all(not m.HasField("done") and not m.HasField("receipt") for m in pieces)
    text, reason, tokens = expected(handler, max_new_tokens=40, **GREEDY)
    assert "".join(m.text for m in messages) == text
    assert last.done.finish_reason == {"length": pb.FINISH_REASON_LENGTH, "eos": pb.FINISH_REASON_EOS}[reason]
    assert last.done.completion_tokens == tokens == sum(m.tokens for m in messages)
    assert last.done.prompt_tokens == len(handler.tokenizer.encode(PROMPT).ids)  # type: ignore[union-attr]
    assert last.done.model_id == "tiny-gpt2@3"

    request = pb.GenerateRequest(prompt=PROMPT, max_new_tokens=40, temperature=0.0).SerializeToString()
    transcript = Transcript()
    for message in pieces:
        transcript.add(message)
    transcript.add_last(last)
    receipt = served.check(last.receipt, bytes(transcript), request)
    assert receipt.subject == "writer" and receipt.method == "Generate"
    (record,) = served.records()
    assert record["decision"] == "ok" and record["items"] == tokens
    assert record["receipt"] == receipt.receipt_id

    # the receipt fixes every piece, their order and their boundaries
    def tampered(messages: list[pb.GenerateResponse]) -> bytes:
        t = Transcript()
        for m in messages[:-1]:
            t.add(m)
        t.add_last(messages[-1])
        return bytes(t)

    dropped = [m for i, m in enumerate(messages) if i != 1]
    changed = [pb.GenerateResponse(text=m.text + "!", tokens=m.tokens) for m in pieces] + [last]
    joined = [pb.GenerateResponse(text=pieces[0].text + pieces[1].text, tokens=pieces[0].tokens
                                  + pieces[1].tokens), *pieces[2:], last]
    for forged in (dropped, changed, joined):
        with pytest.raises(ReceiptError) as refused:
            served.check(last.receipt, tampered(forged), request)
        assert refused.value.reason == "response"


def test_sampling_over_the_wire_is_reproducible_with_a_seed_and_stops_at_a_stop_sequence(
        serve: Any, tiny_lm: Path) -> None:
    handler = lm_handler(tiny_lm)
    served = serve(handler)
    with served.client() as client:
        first = client.generate(PROMPT, max_new_tokens=30, seed=11, temperature=0.9, top_p=0.95)
        again = client.generate(PROMPT, max_new_tokens=30, seed=11, temperature=0.9, top_p=0.95)
        other = client.generate(PROMPT, max_new_tokens=30, seed=12, temperature=0.9, top_p=0.95)
        assert first.text == again.text != other.text
        assert first.text == expected(handler, max_new_tokens=30, seed=11, temperature=0.9, top_p=0.95)[0]
        # a stop sequence taken from the continuation itself: the same seed's text ends just before it
        stop = next(first.text[i:i + 3] for i in range(5, len(first.text) - 3)
                    if not any(c.isspace() for c in first.text[i:i + 3]))
        stopped = client.generate(PROMPT, max_new_tokens=30, seed=11, temperature=0.9, top_p=0.95,
                                  stop=[stop])
    assert stopped.finish_reason == "stop"
    assert stopped.text == first.text[: first.text.index(stop)]
    assert stopped.completion_tokens < first.completion_tokens


def test_tokens_are_charged_before_they_are_sent_and_the_stream_ends_when_the_allowance_does(
        serve: Any, tiny_lm: Path) -> None:
    tiers = {"default": {"rate_per_s": 1000.0, "burst": 1000, "daily_items": 12}}
    served = serve(lm_handler(tiny_lm), lm_config(tiers=tiers))
    call = served.generate(max_new_tokens=60, **GREEDY)
    received: list[pb.GenerateResponse] = []
    with pytest.raises(grpc.RpcError) as refused:
        for message in call:
            received.append(message)
    assert refused.value.code() == SC.RESOURCE_EXHAUSTED
    trailing = dict(refused.value.trailing_metadata() or ())
    assert int(trailing["retry-after"]) >= 1
    sent = sum(m.tokens for m in received)
    assert 0 < sent <= 12 and not any(m.HasField("receipt") for m in received)
    (record,) = served.records()
    assert record["decision"] == "quota" and record["reason"] == "daily-items"
    assert record["items"] == sent and record["quota"]["remaining_items"] == 12 - sent
    wait_until(lambda: in_flight(served.server) == 0, what="the generation stopped")
    # the allowance is spent for the day: the next stream is refused before any text
    with pytest.raises(grpc.RpcError) as again:
        list(served.generate(max_new_tokens=60, **GREEDY))
    assert again.value.code() == SC.RESOURCE_EXHAUSTED


class Gate:
    """A logits processor that holds the generation at its ``at``-th token until opened, counting steps."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.steps = 0
        self.opened = threading.Event()

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        if self.steps == self.at:
            assert self.opened.wait(WAIT_S), "the test never opened the gate"
        return scores


def test_a_caller_that_goes_away_stops_the_generation_and_frees_the_worker(serve: Any, tiny_lm: Path) -> None:
    handler = lm_handler(tiny_lm)
    pieces: list[int] = []
    handler.generate(TextRequest(PROMPT, 100, Sampling(temperature=0.0)), lambda _, n: pieces.append(n))
    first = pieces[0]  # tokens until the first text is final (a token may be part of a character)
    gate = Gate(at=first + 1)
    handler.logits_processors.append(gate)
    served = serve(handler)
    call = served.generate(max_new_tokens=100, **GREEDY)
    next(call)  # the first text arrived: the generation is now held at the token after it
    call.cancel()
    wait_until(lambda: served.records(), what="the cancelled stream's audit record")
    gate.opened.set()
    wait_until(lambda: in_flight(served.server) == 0, what="the worker was freed")
    assert gate.steps == first + 1  # stopped at the first token after the caller left, not after 100
    (record,) = served.records()
    assert record["code"] == "CANCELLED" and record["receipt"] is None
    # and the worker serves the next caller
    with served.client() as client:
        assert client.generate(PROMPT, max_new_tokens=4, temperature=0.0).completion_tokens >= 1


def test_client_generate_stream_verifies_the_receipt_and_cancel_stops_it(serve: Any, tiny_lm: Path) -> None:
    handler = lm_handler(tiny_lm)
    served = serve(handler)
    with served.client() as client:
        stream = client.generate_stream(PROMPT, max_new_tokens=25, temperature=0.0)
        pieces = list(stream)
        assert stream.result is not None and stream.result.text == "".join(pieces)
        assert stream.result.text == expected(handler, max_new_tokens=25, **GREEDY)[0]
        result = stream.result
        assert result.receipted.receipt and result.receipted.request
        # what `nitrovault receipt verify` checks: the saved transcript against the receipt
        served.check(pb.Receipt(payload=Receipt.from_bytes(result.receipted.receipt).body,
                                signature=Receipt.from_bytes(result.receipted.receipt).signature),
                     result.receipted.response, result.receipted.request)
        with client.generate_stream(PROMPT, max_new_tokens=100, temperature=0.0) as early:
            next(iter(early))
        assert early.result is None
    wait_until(lambda: in_flight(served.server) == 0, what="the cancelled generation ended")


@pytest.mark.parametrize(("fields", "code", "words"), [
    ({"prompt": ""}, SC.INVALID_ARGUMENT, "prompt is empty"),
    ({"prompt": "x" * 401}, SC.INVALID_ARGUMENT, "400 characters"),
    ({"temperature": 9.0}, SC.INVALID_ARGUMENT, "temperature"),
    ({"top_p": 0.0}, SC.INVALID_ARGUMENT, "top_p"),
    ({"stop": ["a", "b", "c", "d", "e"]}, SC.INVALID_ARGUMENT, "stop"),
    ({"stop": [""]}, SC.INVALID_ARGUMENT, "stop"),
    ({"max_new_tokens": 100_000}, SC.INVALID_ARGUMENT, "max_new_tokens"),
    ({"prompt": "ζ" * 130}, SC.INVALID_ARGUMENT, "context"),  # 260 tokens
    ({"model": "other"}, SC.INVALID_ARGUMENT, "unknown model"),
])
def test_bad_requests_get_typed_errors_and_charge_nothing(serve: Any, tiny_lm: Path, fields: dict[str, Any],
                                                          code: grpc.StatusCode, words: str) -> None:
    served = serve(lm_handler(tiny_lm))
    with pytest.raises(grpc.RpcError) as refused:
        list(served.generate(**fields))
    assert refused.value.code() == code
    assert words in (refused.value.details() or ""), refused.value.details()
    (record,) = served.records()
    assert record["items"] == 0 and record["code"] == code.name


def test_the_caller_needs_a_generate_scope_and_a_token(serve: Any, tiny_lm: Path) -> None:
    served = serve(lm_handler(tiny_lm))
    for token, code in ((ISSUER.issue("reader", ["infer:*", "embed:*"], 3600), SC.PERMISSION_DENIED),
                        ("not-a-token", SC.UNAUTHENTICATED),
                        (ISSUER.issue("writer", ["generate:tiny-gpt2"], 3600), None)):
        if code is None:
            assert list(served.generate(token, max_new_tokens=2))[-1].HasField("receipt")
            continue
        with pytest.raises(grpc.RpcError) as refused:
            list(served.generate(token))
        assert refused.value.code() == code


def test_a_malformed_request_message_is_invalid_argument(serve: Any, tiny_lm: Path) -> None:
    served = serve(lm_handler(tiny_lm))
    raw = served.channel.unary_stream("/nitrovault.v1.Inference/Generate", request_serializer=None,
                                      response_deserializer=None)
    with pytest.raises(grpc.RpcError) as refused:
        list(raw(b"\x0a\xff\xff", metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=WAIT_S))
    assert refused.value.code() == SC.INVALID_ARGUMENT
    assert refused.value.details() == "malformed request message"


class Embedder:
    kind = "test-embedder"
    rows_independent = True

    def warm_up(self) -> None:
        pass

    def embed(self, texts: Any, *, normalize: bool) -> Any:
        raise AssertionError("not called")

    def infer(self, inputs: Any) -> Any:
        raise AssertionError("not called")


def test_a_model_that_does_not_generate_text_answers_unimplemented(serve: Any) -> None:
    served = serve(Embedder())
    with pytest.raises(grpc.RpcError) as refused:
        list(served.generate())
    assert refused.value.code() == SC.UNIMPLEMENTED
    wait_until(lambda: in_flight(served.server) == 0, what="the slot was released")


def test_a_model_without_a_tokenizer_answers_unimplemented(serve: Any, tiny_lm: Path) -> None:
    handler = lm_handler(tiny_lm)
    served = serve(replace(handler, tokenizer=None))
    with pytest.raises(grpc.RpcError) as refused:
        list(served.generate())
    assert refused.value.code() == SC.UNIMPLEMENTED
    assert "tokenizer" in (refused.value.details() or "")


def test_streamed_text_carries_the_owners_green_list_mark(serve: Any, tiny_lm: Path) -> None:
    keys = derive_watermark_keys(bytes(range(32)), "tiny-gpt2")
    z = {}
    for asks in (True, False):
        protection = {"watermark": {"text": {"gamma": 0.25, "delta": 4.0}}} if asks else {}
        config = lm_config(protection=protection)
        handler = lm_handler(tiny_lm)
        attach_text_watermark(config, handler, SealedExtras(watermark_keys=keys))
        served = serve(handler, config)
        green = GreenList(keys, vocab_size=handler.vocab_size, gamma=0.25)
        with served.client() as client:
            text = client.generate("The", max_new_tokens=120, seed=5, temperature=1.0).text
        assert handler.tokenizer is not None
        z[asks] = detect_text_mark(handler.tokenizer.encode("The" + text).ids, green).z
    assert z[True] > 4.0 > z[False], z
