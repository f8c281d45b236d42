"""Transformer causal LMs (GPT-2, Llama) from sealed safetensors, config and tokenizer: KV-cache generation
equal to transformers' own, sampling, streaming text with stop sequences, cancellation and bad input."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from enclave_app.models import load_handler
from enclave_app.models.base import InvalidInputError, ModelLoadError, UnsupportedCallError
from enclave_app.models.causal_lm import CausalLMHandler, TextRequest
from enclave_app.models.generation import Sampling, TextStream

CORPUS = ("The enclave keeps the weights sealed. The parent relays bytes it cannot read. "
          "Café, naïve, 東京 and 🙂 are text too. ") * 20
VOCAB = 320
CONTEXT = 48


@cache
def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS], trainer)
    return tok


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, n_positions=CONTEXT,
                                       bos_token_id=0, eos_token_id=0))
    model.train(False)
    return model


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=CONTEXT, bos_token_id=0, eos_token_id=0))
    model.train(False)
    return model


def sealed(model: PreTrainedModel, **extra: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What the enclave unseals: the tensors as ``save_pretrained`` stores them (a tied head left out),
    the model's config.json and its tokenizer.json."""
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight")
    config = {**json.loads(model.config.to_json_string()), **extra}
    return tensors, {"nitrovault.config": json.dumps(config), "nitrovault.tokenizer": tokenizer().to_str()}


def handler(arch: str, **extra: int) -> CausalLMHandler:
    model = gpt2() if arch == "gpt2" else llama()
    result = load_handler(f"causal-lm:{arch}", *sealed(model, **extra))
    assert isinstance(result, CausalLMHandler)
    return result


def collect(h: CausalLMHandler, request: TextRequest,
            cancelled: Callable[[], bool] | None = None) -> tuple[list[tuple[str, int]], str, int]:
    pieces: list[tuple[str, int]] = []
    done = h.generate(request, lambda text, n: pieces.append((text, n)),
                      *(() if cancelled is None else (cancelled,)))
    return pieces, done.finish_reason, done.completion_tokens


ARCHS = ("gpt2", "llama")


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_equal_transformers_generate_over_the_kv_cache(arch: str) -> None:
    reference = gpt2() if arch == "gpt2" else llama()
    prompt = torch.tensor([tokenizer().encode("The enclave keeps").ids])
    expected = reference.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12,
                                  eos_token_id=None, pad_token_id=0)[:, prompt.shape[1]:]
    ours = handler(arch).infer({"input_ids": prompt, "max_new_tokens": torch.tensor(12),
                                "temperature": torch.tensor(0.0)})["tokens"]
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_sampling_is_reproducible_with_a_seed_and_top_p_near_zero_is_greedy(arch: str) -> None:
    h = handler(arch)
    ids = torch.tensor([tokenizer().encode("The parent").ids])

    def run(**params: float) -> torch.Tensor:
        inputs = {"input_ids": ids, "max_new_tokens": torch.tensor(16),
                  **{k: torch.tensor(v) for k, v in params.items()}}
        return h.infer(inputs)["tokens"]

    assert torch.equal(run(seed=7), run(seed=7))
    assert not torch.equal(run(seed=7), run(seed=8))
    assert torch.equal(run(seed=3, top_p=1e-6), run(temperature=0.0))
    assert not torch.equal(run(seed=3, temperature=5.0), run(temperature=0.0))


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_text_is_the_decoded_continuation_and_counts_every_token(arch: str) -> None:
    h = handler(arch)
    request = TextRequest("The enclave", max_new_tokens=20, sampling=Sampling(temperature=0.0))
    pieces, reason, produced = collect(h, request)
    ids = torch.tensor([tokenizer().encode("The enclave").ids])
    tokens = h.infer({"input_ids": ids, "max_new_tokens": torch.tensor(20),
                      "temperature": torch.tensor(0.0)})["tokens"][0].tolist()
    if 0 in tokens:  # the model may end the text itself: then it stops there
        tokens = tokens[: tokens.index(0) + 1]
        assert reason == "eos"
    else:
        assert reason == "length"
    assert produced == len(tokens) == sum(n for _, n in pieces)
    assert "".join(text for text, _ in pieces) == tokenizer().decode(tokens, skip_special_tokens=True)
    assert all(n >= 1 for _, n in pieces)


def test_a_stop_sequence_ends_the_text_before_it() -> None:
    h = handler("gpt2")
    greedy = Sampling(temperature=0.0)
    full = "".join(t for t, _ in collect(h, TextRequest("The", max_new_tokens=24, sampling=greedy))[0])
    stop = full[5:8]
    assert len(stop.strip()) >= 1
    request = TextRequest("The", max_new_tokens=24, sampling=greedy, stop=(stop,))
    pieces, reason, produced = collect(h, request)
    text = "".join(t for t, _ in pieces)
    assert reason == "stop"
    assert text == full[: full.index(stop)]
    assert stop not in text
    assert produced == sum(n for _, n in pieces) < 24


def test_the_models_end_of_text_token_ends_the_stream() -> None:
    h = handler("llama")
    seen: list[int] = []

    def end_after_three(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        seen.append(ids.shape[1])
        if len(seen) == 4:
            scores[:, 0] = 1e9
        return scores

    h.logits_processors.append(end_after_three)
    pieces, reason, produced = collect(h, TextRequest("The parent", max_new_tokens=20))
    assert (reason, produced, sum(n for _, n in pieces)) == ("eos", 4, 4)


def test_cancellation_stops_the_loop_after_the_current_token() -> None:
    h = handler("gpt2")
    steps: list[int] = []
    def count(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        steps.append(1)
        return scores

    h.logits_processors.append(count)
    done = h.generate(TextRequest("The", max_new_tokens=30, sampling=Sampling(temperature=0.0)),
                      lambda text, n: None, lambda: len(steps) >= 3)
    assert (done.finish_reason, done.completion_tokens, len(steps)) == ("cancelled", 3, 3)


def test_the_default_length_is_what_fits_in_the_context() -> None:
    h = handler("gpt2", max_new_tokens=100)
    prompt_len = len(tokenizer().encode("The enclave").ids)
    h.logits_processors.append(lambda ids, scores: scores.index_fill_(1, torch.tensor([0]), -1e9))
    _, reason, produced = collect(h, TextRequest("The enclave"))
    assert (reason, produced) == ("length", CONTEXT - prompt_len)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (TextRequest(""), "the prompt is empty"),
        (TextRequest("enclave " * 60), r"does not fit the model's context of 48 tokens"),
        (TextRequest("The", max_new_tokens=0), r"max_new_tokens must be in \[1, 256\]"),
        (TextRequest("The", max_new_tokens=257), r"max_new_tokens must be in \[1, 256\]"),
        (TextRequest("The enclave keeps", max_new_tokens=47), r"exceed the model's context of 48"),
        (TextRequest("The", stop=("a", "b", "c", "d", "e")), "at most 4 stop sequences"),
        (TextRequest("The", stop=("",)), "stop sequences must have 1 to 64"),
        (TextRequest("The", stop=("x" * 65,)), "stop sequences must have 1 to 64"),
    ],
)
def test_bad_generate_requests_are_refused_before_any_token(request_: TextRequest, message: str) -> None:
    h = handler("gpt2")
    emitted: list[str] = []
    with pytest.raises(InvalidInputError, match=message):
        h.generate(request_, lambda text, n: emitted.append(text))
    assert emitted == []


@pytest.mark.parametrize(("params", "message"), [
    ({"temperature": -1.0}, r"temperature must be in \[0, 5\]"),
    ({"temperature": float("inf")}, "temperature"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": float("nan")}, "top_p"),
    ({"seed": 2**64}, "seed must be a 64-bit integer"),
])
def test_invalid_sampling_settings_are_the_callers_error(params: dict[str, float], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        Sampling(**params)  # type: ignore[arg-type]


def test_infer_refuses_a_prompt_and_length_past_the_context() -> None:
    with pytest.raises(InvalidInputError, match="exceed the model's context"):
        handler("llama").infer({"input_ids": torch.zeros(1, 40, dtype=torch.int64),
                                "max_new_tokens": torch.tensor(9)})


def test_a_model_sealed_without_a_tokenizer_serves_ids_only() -> None:
    tensors, metadata = sealed(gpt2())
    del metadata["nitrovault.tokenizer"]
    h = load_handler("causal-lm:gpt2", tensors, metadata)
    assert isinstance(h, CausalLMHandler)
    with pytest.raises(UnsupportedCallError, match="no sealed tokenizer"):
        h.generate(TextRequest("The"), lambda text, n: None)


def _drop_one(t: dict[str, torch.Tensor], m: dict[str, str]) -> None:
    del t["transformer.h.1.mlp.c_fc.weight"]


def _add_one(t: dict[str, torch.Tensor], m: dict[str, str]) -> None:
    t["transformer.extra"] = torch.zeros(2)


def _other_type(t: dict[str, torch.Tensor], m: dict[str, str]) -> None:
    m["nitrovault.config"] = json.dumps({**json.loads(m["nitrovault.config"]), "model_type": "llama"})


def _small_vocab(t: dict[str, torch.Tensor], m: dict[str, str]) -> None:
    m["nitrovault.config"] = json.dumps({**json.loads(m["nitrovault.config"]), "vocab_size": 100})


def _bad_tokenizer(t: dict[str, torch.Tensor], m: dict[str, str]) -> None:
    m["nitrovault.tokenizer"] = "{not json"


def _reshaped(t: dict[str, torch.Tensor], m: dict[str, str]) -> None:
    t["transformer.wpe.weight"] = torch.zeros(CONTEXT + 1, 32)


@pytest.mark.parametrize(("spoil", "message"), [
    (_drop_one, "do not fit the registered architecture"),
    (_add_one, "do not fit the registered architecture"),
    (_reshaped, "do not fit the registered architecture"),
    (_other_type, "bad architecture config"),
    (_small_vocab, "more tokens than the model's vocabulary"),
    (_bad_tokenizer, "the sealed tokenizer does not load"),
])
def test_a_sealed_model_that_does_not_fit_fails_to_load(
        spoil: Callable[[dict[str, torch.Tensor], dict[str, str]], None], message: str) -> None:
    tensors, metadata = sealed(gpt2())
    spoil(tensors, metadata)
    with pytest.raises(ModelLoadError, match=message):
        load_handler("causal-lm:gpt2", tensors, metadata)


def test_an_untied_llama_needs_its_output_head() -> None:
    tensors, metadata = sealed(llama())
    del tensors["lm_head.weight"]
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_handler("causal-lm:llama", tensors, metadata)


def test_the_loaded_weights_are_the_sealed_tensors_not_copies() -> None:
    tensors, metadata = sealed(gpt2())
    h = load_handler("causal-lm:gpt2", tensors, metadata)
    assert isinstance(h, CausalLMHandler)
    model = h.module.hf
    assert isinstance(model, GPT2LMHeadModel)
    assert model.transformer.wte.weight.data_ptr() == tensors["transformer.wte.weight"].data_ptr()
    assert model.lm_head.weight is model.transformer.wte.weight


# -- the incremental decoder -------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.sampled_from("ab é東🙂.\n"), min_size=1, max_size=40),
       stop_at=st.integers(0, 40), stop_len=st.integers(1, 4), use_stop=st.booleans())
def test_released_text_is_the_decoded_text_cut_before_the_first_stop(
        text: str, stop_at: int, stop_len: int, use_stop: bool) -> None:
    ids = tokenizer().encode(text).ids
    decoded = tokenizer().decode(ids)
    chosen = decoded[stop_at : stop_at + stop_len]
    stop = (chosen,) if use_stop and chosen else ()
    stream = TextStream(tokenizer(), stop)
    released = ""
    for token in ids:
        piece = stream.push(token)
        assert "\ufffd" not in piece or "\ufffd" in decoded
        released += piece
        assert decoded.startswith(released)
        if stream.stopped:
            break
    released += stream.finish()
    expected = decoded[: decoded.index(stop[0])] if stop else decoded
    assert released == expected
    assert stream.stopped == bool(stop)
