"""Dynamic weights (``enclave_app/weights.py``): the same answers as resident weights, byte for byte; at
most ``budget`` blocks plaintext at any instant and none between calls; ciphertext that does not
authenticate is refused; a forward pass around the hooks fails instead of computing; bad sections fail
the config load and patterns that match nothing fail the model load."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from handlers import lm_handler

from enclave_app.config import EnclaveConfig, WeightsPolicy
from enclave_app.models import ModelLoadError, load_handler
from enclave_app.models.causal_lm import CausalLMHandler, TextRequest
from enclave_app.models.generation import Sampling
from enclave_app.models.generic import MLPClassifier
from enclave_app.weights import DynamicHandler, DynamicWeights, WeightsIntegrityError, protect_weights
from nitrovault.errors import ConfigError
from nitrovault.kms.trust import amazon_trust_services_pem
from nitrovault.local.models import LocalModel, demo_handler, describe_protection, with_weights

MLP_CONFIG = {"in_features": 64, "hidden": [32, 16], "classes": 10}
TEXTS = ["A man is eating food.", "The cat sits outside.", "word " * 80, "x"]


def _mlp(seed: int = 7) -> Any:
    torch.manual_seed(seed)
    state = {k: v.clone() for k, v in MLPClassifier(**MLP_CONFIG).state_dict().items()}  # type: ignore[arg-type]
    return load_handler("generic:mlp-classifier", state, {"nitrovault.config": json.dumps(MLP_CONFIG)})


def _dynamic(handler: Any, **policy: Any) -> DynamicHandler:
    protected = protect_weights(WeightsPolicy(mode="dynamic", **policy), handler)
    assert isinstance(protected, DynamicHandler)
    return protected


def _generated(handler: Any, sampling: Sampling) -> tuple[str, int]:
    pieces: list[str] = []
    done = handler.generate(TextRequest("The enclave", 30, sampling), lambda text, _: pieces.append(text))
    return "".join(pieces), done.completion_tokens


@pytest.fixture(scope="module")
def minilm_resident() -> Any:
    return demo_handler()


@pytest.mark.parametrize("budget", [1, 2, 3])
def test_minilm_embeddings_are_byte_for_byte_the_resident_ones(minilm_resident: Any, budget: int) -> None:
    dynamic = _dynamic(demo_handler(), budget=budget)
    passes: list[None] = []
    dynamic.inner.model.encoder.register_forward_hook(lambda *_: passes.append(None))  # type: ignore[attr-defined]
    for normalize in (True, False):
        expected = minilm_resident.embed(TEXTS, normalize=normalize)
        assert dynamic.embed(TEXTS, normalize=normalize).tobytes() == expected.tobytes()
    # every forward pass (one per length bucket) decrypts each of the 6 blocks once
    assert len(dynamic.weights.blocks) == 6 and dynamic.weights.decrypted_blocks == 6 * len(passes) > 0


def test_digits_probabilities_are_the_resident_ones() -> None:
    resident, dynamic = _mlp(), _dynamic(_mlp(), budget=1)
    x = {"x": torch.rand(16, 64, generator=torch.Generator().manual_seed(1))}
    for name, value in resident.infer(x).items():
        assert torch.equal(dynamic.infer(x)[name], value), name


@pytest.mark.parametrize("budget", [1, 2])
def test_a_causal_lm_generates_the_same_text(tiny_lm: Path, budget: int) -> None:
    resident, dynamic = lm_handler(tiny_lm), _dynamic(lm_handler(tiny_lm), budget=budget)
    for sampling in (Sampling(temperature=0.0), Sampling(temperature=0.9, top_p=0.9, seed=4)):
        assert _generated(dynamic, sampling) == _generated(resident, sampling)
    assert isinstance(dynamic.inner, CausalLMHandler)
    assert dynamic.vocab_size == resident.vocab_size  # everything else is the inner handler's


@pytest.mark.parametrize("budget", [1, 2])
def test_at_most_the_budget_is_plaintext_during_a_pass_and_nothing_after(budget: int) -> None:
    dynamic = _dynamic(demo_handler(), budget=budget)
    weights = dynamic.weights
    seen: list[int] = []
    for block in weights.blocks:  # runs after the weights' own pre-hook: the block is decrypted
        block.module.register_forward_pre_hook(lambda *_: seen.append(weights.plaintext_blocks()))
    dynamic.embed(TEXTS, normalize=True)
    assert len(seen) >= 6 and len(seen) % 6 == 0 and max(seen) == budget and min(seen) >= 1
    assert weights.peak_plain_bytes <= budget * max(b.nbytes for b in weights.blocks)
    assert weights.plaintext_blocks() == 0
    assert all(not slot.any() for slot in weights._slots)  # every slot overwritten
    assert all(t.param.numel() == 0 for b in weights.blocks for t in b.tensors)  # placeholders


def test_the_selected_tensors_are_the_block_weights_and_the_rest_stays_resident() -> None:
    dynamic = _dynamic(demo_handler())
    module = dynamic.inner.model  # type: ignore[attr-defined]
    empty = {n for n, p in module.named_parameters() if p.numel() == 0}
    assert empty and all(n.startswith("encoder.layer.") and n.endswith(".weight") for n in empty)
    assert not any("LayerNorm" in n or "embeddings" in n for n in empty)
    assert len(empty) == 6 * 6  # q, k, v, attention output, intermediate, output per block
    assert dynamic.weights.plain_bytes == sum(
        p.numel() * 4 for n, p in demo_handler().model.named_parameters() if n in empty)


def test_a_pass_around_the_hooks_fails_instead_of_computing() -> None:
    dynamic = _dynamic(demo_handler())
    block = dynamic.weights.blocks[0].module
    with pytest.raises(RuntimeError), torch.inference_mode():
        block.forward(torch.zeros(1, 4, 384))  # not through __call__: no hook, only placeholders
    assert dynamic.embed(["still served"], normalize=True).shape == (1, 384)


def test_ciphertext_that_does_not_authenticate_is_refused_and_wiped() -> None:
    dynamic = _dynamic(demo_handler(), budget=1)
    tensor = dynamic.weights.blocks[3].tensors[0]
    tampered = bytearray(tensor.ciphertext)
    tampered[100] ^= 1
    tensor.ciphertext = bytes(tampered)
    with pytest.raises(WeightsIntegrityError, match="failed authentication"):
        dynamic.embed(TEXTS, normalize=True)
    assert dynamic.weights.plaintext_blocks() == 0
    assert all(not slot.any() for slot in dynamic.weights._slots)


def test_concurrent_calls_share_the_weights_one_pass_at_a_time(minilm_resident: Any) -> None:
    dynamic = _dynamic(demo_handler(), budget=2)
    results: dict[tuple[str, int], bytes] = {}

    def call(handler: Any, name: str, i: int) -> None:
        torch.set_num_threads(1)  # a thread's own count: the same float sums on both sides
        results[name, i] = handler.embed([TEXTS[i % len(TEXTS)]], normalize=True).tobytes()

    threads = [threading.Thread(target=call, args=(dynamic, "dynamic", i)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(len(TEXTS)):  # the resident answers, one at a time
        (alone := threading.Thread(target=call, args=(minilm_resident, "resident", i))).start()
        alone.join()
    assert len(results) == 8 + len(TEXTS)
    for i in range(8):
        assert results["dynamic", i] == results["resident", i % len(TEXTS)]
    assert dynamic.weights.plaintext_blocks() == 0


def test_named_tensor_patterns_select_exactly_those() -> None:
    dynamic = _dynamic(demo_handler(), tensors=("encoder.layer.*.intermediate.dense.weight",), budget=1)
    assert [len(b.tensors) for b in dynamic.weights.blocks] == [1] * 6
    with pytest.raises(ModelLoadError, match=r"'decoder\.\*' matches no tensor"):
        _dynamic(demo_handler(), tensors=("encoder.layer.*.intermediate.dense.weight", "decoder.*"))


def test_a_model_without_numbered_blocks_needs_named_tensors() -> None:
    bigram = load_handler("causal-lm:bigram", {"logits": torch.zeros(8, 8)},
                          {"nitrovault.config": '{"vocab_size": 8}'})
    with pytest.raises(ModelLoadError, match="no numbered blocks"):
        _dynamic(bigram)
    assert _dynamic(bigram, tensors=("*",)).weights.plain_bytes == 8 * 8 * 4


def test_resident_is_the_default_and_changes_nothing() -> None:
    handler = demo_handler()
    assert protect_weights(WeightsPolicy(), handler) is handler


def _config(weights: Any, workers: int | None = None) -> Mapping[str, Any]:
    limits = {} if workers is None else {"limits": {"workers": workers}}
    return limits | {
        "model_id": "m", "model_version": "1", "handler": "generic:mlp-classifier",
        "kms_key_arn": "arn:aws:kms:eu-west-1:111122223333:key/k", "region": "eu-west-1",
        "encryption_context": {"model": "m", "version": "1"},
        "sealed_digest": "ab" * 32, "kms_ca_bundle": amazon_trust_services_pem(),
        "protection": {"weights": weights},
    }


def test_the_weights_section_round_trips() -> None:
    section = {"mode": "dynamic", "tensors": ["encoder.layer.*.weight"], "budget": 1}
    config = EnclaveConfig.from_mapping(_config(section))
    assert config.protection.weights_policy == WeightsPolicy("dynamic", ("encoder.layer.*.weight",), 1)
    again = EnclaveConfig.from_mapping(json.loads(config.to_json()))
    assert again.protection.weights_policy == config.protection.weights_policy
    assert EnclaveConfig.from_mapping(_config(None)).protection.weights_policy == WeightsPolicy()


@pytest.mark.parametrize("section", [
    {"mode": "lazy"}, {"mode": "dynamic", "budget": 0}, {"mode": "dynamic", "budget": True},
    {"mode": "dynamic", "budget": 65}, {"mode": "dynamic", "tensors": []},
    {"mode": "dynamic", "tensors": [""]}, {"mode": "dynamic", "tensors": "encoder.*"},
    {"mode": "dynamic", "tensors": [3]}, {"mode": "dynamic", "blocks": 2}, "dynamic",
])
def test_a_bad_weights_section_is_refused_at_config_load(section: Any) -> None:
    with pytest.raises(ConfigError, match="weights"):
        EnclaveConfig.from_mapping(_config(section))


def test_the_per_boot_key_is_fresh_for_every_boot() -> None:
    a = DynamicWeights(_mlp().module, WeightsPolicy("dynamic", budget=1))
    b = DynamicWeights(_mlp().module, WeightsPolicy("dynamic", budget=1))
    assert a._key != b._key and len(a._key) == 32
    assert a.blocks[0].tensors[0].ciphertext != b.blocks[0].tensors[0].ciphertext
    assert any(a._key) and any(b._key)


def test_dynamic_weights_run_one_worker_with_every_vcpu_and_refuse_more() -> None:
    dynamic = EnclaveConfig.from_mapping(_config({"mode": "dynamic"}))
    assert dynamic.model_threads(4) == (1, 4)
    assert EnclaveConfig.from_mapping(_config(None)).model_threads(4) == (4, 1)
    assert EnclaveConfig.from_mapping(_config({"mode": "dynamic"}, workers=1)).model_threads(4) == (1, 4)
    with pytest.raises(ConfigError, match=r"limits\.workers must be 0 or 1"):
        EnclaveConfig.from_mapping(_config({"mode": "dynamic"}, workers=2))
    assert EnclaveConfig.from_mapping(_config({"mode": "resident"}, workers=2)).model_threads(4) == (2, 2)


def test_the_local_stack_switch_sets_the_mode_and_keeps_the_rest_of_the_section(tmp_path: Path) -> None:
    model = LocalModel("m", "1", "sentence-embedding", tmp_path / "m.safetensors",
                       protection={"watermark": {"embedding": None, "text": None},
                                   "weights": {"budget": 2}})
    assert with_weights(model, "resident") is model
    dynamic = with_weights(model, "dynamic")
    assert dynamic.protection is not None
    assert dynamic.protection["weights"] == {"budget": 2, "mode": "dynamic"}
    assert dynamic.protection["watermark"] == model.protection["watermark"]  # type: ignore[index]
    assert "dynamic weights (at most 2 block(s)" in describe_protection(dynamic.protection)
    assert "dynamic" not in describe_protection(model.protection)
