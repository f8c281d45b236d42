"""Causal-LM handler: loads sealed bigram and GRU models, samples reproducibly under a seed, applies the
enclave's logits processors in order (the green-list watermark is detectable in what it generates), reads
the prompt once and carries the GRU state, and refuses bad inputs and bad sealed models with typed errors."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from enclave_app.models import load_handler
from enclave_app.models.base import InvalidInputError, ModelLoadError, UnsupportedCallError
from enclave_app.models.causal_lm import (
    DEFAULT_MAX_NEW_TOKENS,
    MAX_NEW_TOKENS_CAP,
    BigramLM,
    CausalLMHandler,
    GenerationError,
    GruLM,
)
from enclave_app.models.green_list import GreenListProcessor
from nitrovault.watermark import GreenList, derive_watermark_keys, detect_text_mark

V = 50


def _meta(**config: Any) -> dict[str, str]:
    return {"nitrovault.config": json.dumps(config)}


def _bigram(v: int = V, scale: float = 2.0, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"logits": torch.randn(v, v, generator=g) * scale}


def _gru(v: int = V, dim: int = 16, layers: int = 2) -> tuple[dict[str, torch.Tensor], GruLM]:
    torch.manual_seed(0)
    reference = GruLM(v, dim, layers).eval()
    return {k: t.clone() for k, t in reference.state_dict().items()}, reference


def _gru_handler(**extra: Any) -> CausalLMHandler:
    tensors, _ = _gru()
    handler = load_handler("causal-lm:gru", tensors, _meta(vocab_size=V, dim=16, layers=2, **extra))
    assert isinstance(handler, CausalLMHandler)
    return handler


def _bigram_handler(tensors: dict[str, torch.Tensor] | None = None, v: int = V) -> CausalLMHandler:
    handler = load_handler("causal-lm:bigram", tensors or _bigram(v), _meta(vocab_size=v))
    assert isinstance(handler, CausalLMHandler)
    return handler


def _call(handler: CausalLMHandler, ids: list[list[int]], n: int, seed: int | None = 0) -> torch.Tensor:
    inputs = {"input_ids": torch.tensor(ids), "max_new_tokens": torch.tensor([n])}
    if seed is not None:
        inputs["seed"] = torch.tensor(seed)
    out = handler.infer(inputs)
    assert set(out) == {"tokens"}
    return out["tokens"]


# -- loading ----------------------------------------------------------------------------------------


def test_loads_both_architectures_and_generates_new_tokens_only() -> None:
    for handler in (_bigram_handler(), _gru_handler()):
        assert handler.kind == "causal-lm"
        assert handler.vocab_size == V
        assert handler.max_new_tokens_limit == DEFAULT_MAX_NEW_TOKENS
        assert handler.logits_processors == []
        handler.warm_up()
        tokens = _call(handler, [[1, 2, 3], [4, 5, 6]], 7)
        assert tokens.dtype == torch.int64
        assert tokens.shape == (2, 7)
        assert int(tokens.min()) >= 0 and int(tokens.max()) < V


def test_bigram_is_the_bench_model_and_forward_shapes() -> None:
    tensors = _bigram()
    handler = _bigram_handler(tensors)
    assert isinstance(handler.module, BigramLM)
    assert set(handler.module.state_dict()) == {"logits"}
    ids = torch.tensor([[0, 3, 7]])
    assert torch.equal(handler.module(ids), tensors["logits"][ids])
    assert _gru_handler().module(ids).shape == (1, 3, V)


def test_max_new_tokens_comes_from_the_sealed_config_and_is_capped() -> None:
    assert _gru_handler(max_new_tokens=10).max_new_tokens_limit == 10
    assert _gru_handler(max_new_tokens=10**6).max_new_tokens_limit == MAX_NEW_TOKENS_CAP
    with pytest.raises(InvalidInputError, match=r"max_new_tokens must be in \[1, 10\]"):
        _call(_gru_handler(max_new_tokens=10), [[0]], 11)
    assert _call(_gru_handler(max_new_tokens=10), [[0]], 10).shape == (1, 10)


# -- sampling ---------------------------------------------------------------------------------------


def test_seed_makes_sampling_reproducible_and_different_seeds_differ() -> None:
    for handler in (_bigram_handler(), _gru_handler()):
        a = _call(handler, [[1, 2], [3, 4]], 30, seed=1)
        assert torch.equal(a, _call(handler, [[1, 2], [3, 4]], 30, seed=1))
        assert not torch.equal(a, _call(handler, [[1, 2], [3, 4]], 30, seed=2))


def test_without_a_seed_the_generator_is_seeded_from_entropy() -> None:
    handler = _bigram_handler()
    handler.entropy = lambda n: (12345).to_bytes(n, "little")
    assert torch.equal(_call(handler, [[1]], 20, seed=None), _call(handler, [[1]], 20, seed=12345))
    handler.entropy = lambda n: (54321).to_bytes(n, "little")
    assert not torch.equal(_call(handler, [[1]], 20, seed=None), _call(handler, [[1]], 20, seed=12345))


def test_default_entropy_gives_different_samples() -> None:
    handler = _bigram_handler(_bigram(scale=0.1))
    assert not torch.equal(_call(handler, [[1]], 40, seed=None), _call(handler, [[1]], 40, seed=None))


def test_minus_infinity_logits_are_never_sampled() -> None:
    tensors = _bigram()
    tensors["logits"][:, V // 2 :] = float("-inf")  # log(0): the bench's LM could seal such a table
    tokens = _call(_bigram_handler(tensors), [[0], [V - 1]], 100)
    assert int(tokens.max()) < V // 2


# -- processors -------------------------------------------------------------------------------------


def _force(token: int) -> Any:
    def processor(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores + 1e9 * (torch.arange(scores.shape[-1]) == token)

    return processor


def _flatten(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    return scores * 0


def test_processors_are_applied_in_order_with_the_ids_so_far() -> None:
    for handler in (_bigram_handler(), _gru_handler()):
        seen: list[torch.Tensor] = []

        def record(ids: torch.Tensor, scores: torch.Tensor, seen: list[torch.Tensor] = seen) -> torch.Tensor:
            assert scores.dtype == torch.float32 and scores.shape == (2, V)
            seen.append(ids.clone())
            return scores

        handler.logits_processors += [_flatten, _force(7), record]
        tokens = _call(handler, [[1, 2], [3, 4]], 12)
        assert (tokens == 7).all()
        # every step saw the prompt and exactly the tokens generated before it
        assert [s.shape[1] for s in seen] == list(range(2, 14))
        assert torch.equal(seen[-1], torch.cat([torch.tensor([[1, 2], [3, 4]]), tokens[:, :-1]], 1))

        # the same two processors in the other order: the forcing bias is wiped out, sampling is uniform
        handler.logits_processors[:] = [_force(7), _flatten]
        tokens = _call(handler, [[1, 2], [3, 4]], 40)
        assert (tokens != 7).any()
        assert len(set(tokens.flatten().tolist())) > 10


def test_a_processor_editing_scores_in_place_does_not_touch_the_weights() -> None:
    tensors = _bigram()
    before = tensors["logits"].clone()
    handler = _bigram_handler(tensors)

    def in_place(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, 0] = 1e9
        return scores

    handler.logits_processors.append(in_place)
    assert (_call(handler, [[1]], 5) == 0).all()
    assert torch.equal(handler.module.state_dict()["logits"], before)


def test_a_processor_that_breaks_the_distribution_is_a_generation_error() -> None:
    handler = _bigram_handler()
    handler.logits_processors.append(lambda ids, s: s * float("nan"))
    with pytest.raises(GenerationError, match="not finite"):
        _call(handler, [[1]], 3)
    handler.logits_processors[:] = [lambda ids, s: s[:, :-1]]
    with pytest.raises(GenerationError, match="wrong shape"):
        _call(handler, [[1]], 3)


# -- the GRU reads the prompt once and carries its state ---------------------------------------------


def _naive(module: GruLM, ids: torch.Tensor, n: int, seed: int, processors: list[Any]) -> torch.Tensor:
    """Reference: recompute the whole sequence at every step."""
    g = torch.Generator().manual_seed(seed)
    seq = ids.clone()
    with torch.inference_mode():
        for _ in range(n):
            scores = module(seq)[:, -1].float()
            for p in processors:
                scores = p(seq, scores)
            seq = torch.cat([seq, torch.multinomial(torch.softmax(scores, -1), 1, generator=g)], 1)
    return seq[:, ids.shape[1] :]


def test_gru_incremental_generation_equals_full_recompute() -> None:
    _, reference = _gru()
    handler = _gru_handler()
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]])
    for seed in (0, 1, 2):
        ours = _call(handler, ids.tolist(), 25, seed=seed)
        assert torch.equal(ours, _naive(reference, ids, 25, seed, []))
    # with a processor in the loop too
    processor = GreenListProcessor(derive_watermark_keys(bytes(32), "m"), vocab_size=V)
    handler.logits_processors.append(processor)
    assert torch.equal(_call(handler, ids.tolist(), 25, seed=3), _naive(reference, ids, 25, 3, [processor]))
    # and the step logits themselves agree with the full forward pass
    with torch.inference_mode():
        full = reference(ids)
        logits, state = handler.module.step(ids[:, :2], None)
        assert torch.allclose(logits, full[:, 1], atol=1e-5)
        logits, _ = handler.module.step(ids[:, 2:3], state)
        assert torch.allclose(logits, full[:, 2], atol=1e-5)


def test_gru_reads_each_token_once() -> None:
    handler = _gru_handler()
    assert isinstance(handler.module, GruLM)
    lengths: list[int] = []
    handler.module.gru.register_forward_hook(lambda m, args, out: lengths.append(args[0].shape[1]))
    _call(handler, [[1, 2, 3, 4, 5]], 6)
    assert lengths == [5, 1, 1, 1, 1, 1]  # the prompt once, then each new token but the last


# -- the watermark ----------------------------------------------------------------------------------


def test_green_list_watermark_is_detected_only_when_the_processor_is_applied() -> None:
    v = 300
    keys = derive_watermark_keys(bytes(32), "m")
    green = GreenList(keys, vocab_size=v, gamma=0.25)
    tensors = _bigram(v, scale=0.5)  # a fairly flat next-token distribution: ~5 nats of entropy
    plain = _bigram_handler(tensors, v)
    marked = _bigram_handler(tensors, v)
    marked.logits_processors.append(GreenListProcessor(keys, 0.25, 2.0, vocab_size=v))
    prompts = [[0], [1], [2]]
    for handler, expect_marked in ((marked, True), (plain, False)):
        tokens = _call(handler, prompts, 200, seed=7)
        for prompt, row in zip(prompts, tokens.tolist(), strict=True):
            detection = detect_text_mark(prompt + row, green)
            assert detection.scored > 150
            if expect_marked:
                assert detection.z > 8
                assert detection.detected
            else:
                assert detection.z < 4
                assert not detection.detected


# -- bad input ---------------------------------------------------------------------------------------

_IDS = torch.tensor([[1, 2]])
_N = torch.tensor(3)
_BASE = {"input_ids": _IDS, "max_new_tokens": _N}


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"max_new_tokens": _N}, "inputs are input_ids"),
        ({"input_ids": _IDS}, "inputs are input_ids"),
        ({"input_ids": _IDS, "max_new_tokens": _N, "top_k": torch.tensor(1)}, "inputs are input_ids"),
        ({**_BASE, "temperature": torch.tensor(1)}, "temperature must be a f"),
        ({**_BASE, "temperature": torch.tensor(-0.5)}, r"temperature must be in"),
        ({**_BASE, "temperature": torch.tensor(float("nan"))}, "temperature"),
        ({**_BASE, "temperature": torch.tensor(6.0)}, r"in \[0, 5\]"),
        ({**_BASE, "top_p": torch.tensor(0.0)}, r"top_p must be in \(0, 1\]"),
        ({**_BASE, "top_p": torch.tensor(1.01)}, r"top_p must be in \(0, 1\]"),
        ({**_BASE, "top_p": torch.tensor([0.5, 0.5])}, "top_p must be a f"),
        ({"x": _IDS}, "inputs are input_ids"),
        ({"input_ids": _IDS.float(), "max_new_tokens": _N}, "integer tensor"),
        ({"input_ids": _IDS.bool(), "max_new_tokens": _N}, "integer tensor"),
        ({"input_ids": torch.tensor([1, 2]), "max_new_tokens": _N}, "integer tensor"),
        ({"input_ids": torch.tensor([[[1, 2]]]), "max_new_tokens": _N}, "integer tensor"),
        ({"input_ids": torch.tensor([[1, -1]]), "max_new_tokens": _N}, r"in \[0, vocab_size\)"),
        ({"input_ids": torch.tensor([[1, V]]), "max_new_tokens": _N}, r"in \[0, vocab_size\)"),
        ({"input_ids": torch.zeros(1, 0, dtype=torch.int64), "max_new_tokens": _N}, "at least one"),
        ({"input_ids": torch.zeros(0, 2, dtype=torch.int64), "max_new_tokens": _N}, "at least one"),
        ({"input_ids": _IDS, "max_new_tokens": torch.tensor(0)}, r"max_new_tokens must be in \[1, 256\]"),
        ({"input_ids": _IDS, "max_new_tokens": torch.tensor(-5)}, r"max_new_tokens must be in \[1, 256\]"),
        ({"input_ids": _IDS, "max_new_tokens": torch.tensor(257)}, r"max_new_tokens must be in \[1, 256\]"),
        ({"input_ids": _IDS, "max_new_tokens": torch.tensor(3.0)}, "max_new_tokens must be an integer"),
        ({"input_ids": _IDS, "max_new_tokens": torch.tensor([3, 4])}, "max_new_tokens must be an integer"),
        ({"input_ids": _IDS, "max_new_tokens": torch.tensor([], dtype=torch.int64)}, "max_new_tokens must"),
        ({"input_ids": _IDS, "max_new_tokens": _N, "seed": torch.tensor(1.5)}, "seed must be an integer"),
        ({"input_ids": _IDS, "max_new_tokens": _N, "seed": torch.tensor([1, 2])}, "seed must be an integer"),
    ],
)
def test_bad_inputs_are_typed_errors_with_fixed_messages(
    inputs: dict[str, torch.Tensor], message: str
) -> None:
    for handler in (_bigram_handler(), _gru_handler()):
        with pytest.raises(InvalidInputError, match=message) as info:
            handler.infer(inputs)
        assert "Error" not in str(info.value) and len(str(info.value)) < 80
        assert info.value.__cause__ is None


def test_integer_dtypes_of_the_wire_are_accepted() -> None:
    handler = _gru_handler()
    reference = _call(handler, [[1, 2]], 5, seed=4)
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        out = handler.infer({"input_ids": torch.tensor([[1, 2]], dtype=dtype),
                             "max_new_tokens": torch.tensor([[5]], dtype=dtype),
                             "seed": torch.tensor([4], dtype=dtype)})
        assert torch.equal(out["tokens"], reference)


def test_embed_is_unsupported() -> None:
    with pytest.raises(UnsupportedCallError):
        _bigram_handler().embed(["hello"], normalize=True)


# -- bad sealed models -------------------------------------------------------------------------------


def _bad_loads() -> list[tuple[str, dict[str, torch.Tensor], dict[str, str], str]]:
    gru, _ = _gru()
    gru_meta = _meta(vocab_size=V, dim=16, layers=2)
    nan = _bigram()
    nan["logits"][3, 4] = float("nan")
    posinf = _bigram()
    posinf["logits"][0, 0] = float("inf")
    return [
        ("causal-lm:transformer", _bigram(), _meta(vocab_size=V), "not registered"),
        ("causal-lm:bigram", _bigram(), {}, "bad architecture config"),
        ("causal-lm:bigram", _bigram(), {"nitrovault.config": "{not json"}, "bad architecture config"),
        ("causal-lm:bigram", _bigram(), {"nitrovault.config": "[50]"}, "bad architecture config"),
        ("causal-lm:bigram", _bigram(), _meta(vocab_size=0), "bad architecture config"),
        ("causal-lm:bigram", _bigram(), _meta(vocab_size=True), "bad architecture config"),
        ("causal-lm:bigram", _bigram(), _meta(vocab_size="50"), "bad architecture config"),
        ("causal-lm:bigram", _bigram(), _meta(vocab_size=V, max_new_tokens=0), "bad architecture config"),
        ("causal-lm:bigram", _bigram(), _meta(vocab_size=V, max_new_token=8), "unknown keys"),
        ("causal-lm:bigram", _bigram(V + 1), _meta(vocab_size=V), "do not fit"),
        ("causal-lm:bigram", {"logits": torch.zeros(V)}, _meta(vocab_size=V), "do not fit"),
        ("causal-lm:bigram", {}, _meta(vocab_size=V), "do not fit"),
        ("causal-lm:bigram", {**_bigram(), "bias": torch.zeros(V)}, _meta(vocab_size=V), "do not fit"),
        ("causal-lm:bigram", {"logits": torch.zeros(V, V, dtype=torch.int64)}, _meta(vocab_size=V),
         "floating point"),
        ("causal-lm:bigram", nan, _meta(vocab_size=V), "NaN or"),
        ("causal-lm:bigram", posinf, _meta(vocab_size=V), "NaN or"),
        ("causal-lm:gru", gru, _meta(vocab_size=V, dim=16), "bad architecture config"),
        ("causal-lm:gru", gru, _meta(vocab_size=V, dim=16, layers=3), "do not fit"),
        ("causal-lm:gru", {k: v for k, v in gru.items() if "head" not in k}, gru_meta, "do not fit"),
        ("causal-lm:gru", {**gru, "embed.weight": gru["embed.weight"].half()}, gru_meta, "do not run"),
        ("causal-lm:gru", gru, {**gru_meta, "nitrovault.handler": "causal-lm:bigram"}, "sealed for"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_loads())))
def test_bad_sealed_models_are_load_errors(case: int) -> None:
    name, tensors, metadata, message = _bad_loads()[case]
    with pytest.raises(ModelLoadError, match=message) as info:
        load_handler(name, tensors, metadata)
    assert info.value.__cause__ is None
