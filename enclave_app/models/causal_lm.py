"""Causal language models: token ids in, sampled continuation ids out, with logits processors applied
inside the enclave (the green-list text watermark of :mod:`nitrovault.watermark.text`).

As for the generic handler, the architecture's code is registered in the (measured) image in
:data:`LM_ARCHITECTURES`, its hyper-parameters arrive in the sealed metadata key ``nitrovault.config``
(a JSON object) and its weights are the sealed tensors, assigned into a module built on the ``meta``
device. Registered architectures:

* ``bigram``: ``{"vocab_size": V}``; one parameter ``logits`` [V, V], the next-token logits given the
  previous token (the word-bigram LM of ``bench/bench_watermark.py``).
* ``gru``: ``{"vocab_size": V, "dim": D, "layers": L}``; ``embed`` → ``gru`` (batch first) → ``head``.
* ``gpt2`` and ``llama``: Hugging Face transformers' ``GPT2LMHeadModel`` and ``LlamaForCausalLM`` (and
  every model that shares their code: Llama 2/3-style, TinyLlama, SmolLM...); the config is the model's
  own ``config.json``, its weights its own safetensors (a tied output embedding may be left out, as
  ``save_pretrained`` does). Generation reads the prompt once, then one token per step over the
  transformers key/value cache (:class:`HfCausalLM`).

Every config may also carry ``max_new_tokens`` (default 256, capped at 4096): the largest continuation a
caller may ask for. Unknown config keys are refused by the toy architectures.

With a sealed tokenizer (metadata ``nitrovault.tokenizer``, a ``tokenizers`` JSON), the handler also
serves text: :meth:`CausalLMHandler.generate` tokenizes the prompt, samples (:mod:`.generation`: greedy,
temperature, top-p, a seed), releases text as it is produced and ends at the model's end-of-text token,
a stop sequence, ``max_new_tokens``, or when the caller cancels. Prompt plus continuation must fit in the
model's context (``max_position_embeddings``); a prompt that does not is refused, never cut.

``Infer`` inputs: ``input_ids`` (integer [batch, seq], seq >= 1, ids in [0, V)), ``max_new_tokens``
(integer, one element, 1..limit), optionally ``seed`` (integer, one element) and ``temperature`` /
``top_p`` (floating point, one element). Output: ``tokens`` (int64 [batch, max_new_tokens]), the new ids
only.

Invariants:

* Each step chooses from ``p_k(...p_1(ids, logits))`` (:func:`.generation.choose`): the last position's
  logits passed through :attr:`CausalLMHandler.logits_processors` in order, each given the whole id
  sequence so far. The enclave appends the watermark processor at boot; callers cannot turn it off.
* Sampling uses its own ``torch.Generator``: seeded from ``seed`` when given (so the call is reproducible)
  and otherwise from :attr:`CausalLMHandler.entropy` (``os.urandom``), never from torch's global state.
* State is carried between steps (a recurrent state, a key/value cache): the prompt is read once, then
  one token per step.
* Bad input raises :class:`InvalidInputError` with a fixed message; a model or processor that yields no
  valid distribution raises :class:`GenerationError` (an internal error to the caller).

Example::

    >>> import json, torch
    >>> h = CausalLMHandler.load("bigram", {"logits": torch.zeros(5, 5)},
    ...                          {"nitrovault.config": json.dumps({"vocab_size": 5})})
    >>> h.logits_processors.append(lambda ids, s: s + 1e9 * (torch.arange(5) == 3))
    >>> h.infer({"input_ids": torch.tensor([[0, 1]]), "max_new_tokens": torch.tensor(4)})["tokens"]
    tensor([[3, 3, 3, 3]])
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn
from transformers import (
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

from enclave_app.models.base import InvalidInputError, ModelLoadError, UnsupportedCallError
from enclave_app.models.generation import Sampling, TextStream, check_stop, choose
from enclave_app.models.generic import CONFIG_KEY
from nitrovault.errors import NitrovaultError

#: ``max_new_tokens`` when the sealed config does not say, and the most it may say
DEFAULT_MAX_NEW_TOKENS = 256
MAX_NEW_TOKENS_CAP = 4096

TOKENIZER_KEY = "nitrovault.tokenizer"
INPUT_IDS = "input_ids"
MAX_NEW_TOKENS = "max_new_tokens"
SEED = "seed"
TEMPERATURE = "temperature"
TOP_P = "top_p"
TOKENS = "tokens"
_INFER_INPUTS = frozenset({INPUT_IDS, MAX_NEW_TOKENS, SEED, TEMPERATURE, TOP_P})

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class GenerationError(NitrovaultError):
    """The model or a logits processor produced no valid next-token distribution (NaN, all ``-inf``,
    wrong shape). A fault of the sealed model or of the image, not of the caller's input."""

    step = "model-generate"


class CausalLM(nn.Module):
    """A registered causal LM: ``forward(input_ids [B, S]) -> logits [B, S, V]`` and the incremental
    :meth:`step` used for generation."""

    vocab_size: int
    #: the most tokens (prompt and continuation) the model can attend over; None: no bound (recurrent)
    context_length: int | None = None
    #: the token that ends a text, if the model has one
    eos_token_id: int | None = None

    def step(self, new_ids: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """Logits [B, V] after reading ``new_ids`` [B, n] on top of ``state`` (``None`` at the start),
        and the state to pass with the next ids."""
        raise NotImplementedError

    def load_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Assign the sealed tensors into this module built on ``meta`` (``RuntimeError`` if they do not
        fit exactly)."""
        self.load_state_dict(dict(tensors), strict=True, assign=True)


class BigramLM(CausalLM):
    """Next-token logits given only the previous token: ``logits[previous]``."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.logits = nn.Parameter(torch.empty(vocab_size, vocab_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.logits[input_ids]

    def step(self, new_ids: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        return self.logits[new_ids[:, -1]], None


class GruLM(CausalLM):
    """Embedding → GRU (batch first) → linear head to the vocabulary; the state is the GRU's hidden
    state [layers, B, dim]."""

    def __init__(self, vocab_size: int, dim: int, layers: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, dim)
        self.gru = nn.GRU(dim, dim, num_layers=layers, batch_first=True)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.embed(input_ids))
        logits: torch.Tensor = self.head(out)
        return logits

    def step(self, new_ids: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        out, hidden = self.gru(self.embed(new_ids), state)
        logits: torch.Tensor = self.head(out[:, -1])
        return logits, hidden


class HfCausalLM(CausalLM):
    """A transformers causal LM; :meth:`step` runs the new ids over a ``DynamicCache`` (the state)."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.hf = model
        config = model.config
        self.vocab_size = int(config.vocab_size)
        self.context_length = int(config.max_position_embeddings)
        eos = config.eos_token_id
        self.eos_token_id = eos if isinstance(eos, int) else None

    @classmethod
    def build(cls, config_type: type[PretrainedConfig], model_type: type[PreTrainedModel],
              config: Mapping[str, Any]) -> HfCausalLM:
        expected = config_type.model_type
        if config.get("model_type", expected) != expected:
            raise ValueError("model_type")
        fields = {k: v for k, v in config.items() if k not in (MAX_NEW_TOKENS, "model_type")}
        return cls(model_type(config_type(**fields)))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.hf(input_ids=input_ids).logits
        return logits

    def step(self, new_ids: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        cache = DynamicCache(config=self.hf.config) if state is None else state
        logits: torch.Tensor = self.hf(input_ids=new_ids, cache=cache, use_cache=True).logits
        return logits[:, -1], cache

    def load_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        result = self.hf.load_state_dict(dict(tensors), strict=False, assign=True)
        if result.unexpected_keys:
            raise RuntimeError("unexpected tensors")
        self.hf.tie_weights()  # an output embedding tied to the input one is not stored twice
        # Rotary position tables are non-persistent buffers computed from the config: build them again.
        for name, module in list(self.hf.named_modules()):
            if type(module).__name__.endswith("RotaryEmbedding") and any(
                    b.is_meta for b in module.buffers(recurse=False)):
                parent, _, attr = name.rpartition(".")
                setattr(self.hf.get_submodule(parent), attr, type(module)(config=self.hf.config))
        if any(t.is_meta for t in (*self.hf.parameters(), *self.hf.buffers())):
            raise RuntimeError("tensors missing")


def _hyper(config: Mapping[str, Any], *keys: str) -> list[int]:
    """The positive integers ``config[key]`` for ``keys``; any other key but ``max_new_tokens`` is refused."""
    if not set(config) <= {*keys, MAX_NEW_TOKENS}:
        raise ModelLoadError("unknown keys in the architecture config")
    return [_positive_int(config, key) for key in keys]


def _positive_int(config: Mapping[str, Any], key: str) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(key)
    return value


#: the causal LMs registered in this image: name → factory from the decoded ``nitrovault.config``
LM_ARCHITECTURES: dict[str, Callable[[Mapping[str, Any]], CausalLM]] = {
    "bigram": lambda c: BigramLM(*_hyper(c, "vocab_size")),
    "gru": lambda c: GruLM(*_hyper(c, "vocab_size", "dim", "layers")),
    "gpt2": lambda c: HfCausalLM.build(GPT2Config, GPT2LMHeadModel, c),
    "llama": lambda c: HfCausalLM.build(LlamaConfig, LlamaForCausalLM, c),
}

_INTEGER_DTYPES = frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64})


def _is_integer(t: torch.Tensor) -> bool:
    return t.dtype in _INTEGER_DTYPES


def _scalar(inputs: Mapping[str, torch.Tensor], name: str) -> int:
    value = inputs[name]
    if not isinstance(value, torch.Tensor) or not _is_integer(value) or value.numel() != 1:
        raise InvalidInputError(f"{name} must be an integer tensor with one element")
    return int(value.item())


def _real(inputs: Mapping[str, torch.Tensor], name: str, default: float) -> float:
    value = inputs.get(name)
    if value is None:
        return default
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.numel() != 1:
        raise InvalidInputError(f"{name} must be a floating point tensor with one element")
    return float(value.item())


@dataclass(frozen=True)
class TextRequest:
    """One ``Generate`` call's settings, as the caller sent them (checked by the handler)."""

    prompt: str
    #: None: as many as the limit and the context allow
    max_new_tokens: int | None = None
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Generated:
    """How a generation ended."""

    #: ``length`` (max tokens), ``eos`` (the model ended the text), ``stop`` (a stop sequence),
    #: ``cancelled`` (the caller went away or ran out of allowance)
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


#: ``emit(text, tokens)``: the next releasable text and how many generated tokens it accounts for
Emit = Callable[[str, int], None]


def _never() -> bool:
    return False


@dataclass
class CausalLMHandler:
    module: CausalLM
    architecture: str
    vocab_size: int
    #: the most new tokens one call may ask for (sealed config ``max_new_tokens``)
    max_new_tokens_limit: int = DEFAULT_MAX_NEW_TOKENS
    #: the sealed tokenizer; None: the model serves token ids only (``Infer``)
    tokenizer: Tokenizer | None = None
    #: applied in order at every step: ``(ids so far [B, S] int64, scores [B, V] float32) -> scores``
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    #: randomness for calls without ``seed`` (a parameter so that tests can pin it)
    entropy: Callable[[int], bytes] = os.urandom
    kind: str = "causal-lm"
    #: each call samples with its own seed and length: calls never share a generation loop
    rows_independent: bool = False

    @classmethod
    def load(
        cls, architecture: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
    ) -> CausalLMHandler:
        factory = LM_ARCHITECTURES.get(architecture)
        if factory is None:
            raise ModelLoadError(f"causal LM architecture {architecture!r} is not registered in this image")
        try:
            config = json.loads(metadata.get(CONFIG_KEY, "{}"))
            if not isinstance(config, dict):
                raise TypeError("config")
            limit = DEFAULT_MAX_NEW_TOKENS
            if MAX_NEW_TOKENS in config:
                limit = min(_positive_int(config, MAX_NEW_TOKENS), MAX_NEW_TOKENS_CAP)
            with torch.device("meta"):
                module = factory(config)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ModelLoadError(f"bad architecture config ({type(err).__name__})") from None
        tokenizer = None
        if TOKENIZER_KEY in metadata:
            try:
                tokenizer = Tokenizer.from_str(metadata[TOKENIZER_KEY])
            except Exception:  # the tokenizers library raises its own exception type
                raise ModelLoadError("the sealed tokenizer does not load") from None
            if tokenizer.get_vocab_size(with_added_tokens=True) > module.vocab_size:
                raise ModelLoadError("the sealed tokenizer has more tokens than the model's vocabulary")
        if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tensors.values()):
            raise ModelLoadError("sealed tensors of a causal LM must be floating point")
        if any(bool(torch.isnan(t).any() or torch.isposinf(t).any()) for t in tensors.values()):
            raise ModelLoadError("sealed tensors contain NaN or +inf")
        try:
            module.load_weights(tensors)
        except RuntimeError:
            raise ModelLoadError("sealed tensors do not fit the registered architecture") from None
        module.eval()
        handler = cls(module=module, architecture=architecture, vocab_size=module.vocab_size,
                      max_new_tokens_limit=limit, tokenizer=tokenizer)
        try:  # one step now, so that a model that cannot run (mixed dtypes...) fails to load
            with torch.inference_mode():
                logits, _ = module.step(torch.zeros(1, 1, dtype=torch.int64), None)
        except (RuntimeError, ValueError, TypeError, IndexError):
            raise ModelLoadError("sealed tensors do not run in the registered architecture") from None
        if logits.shape != (1, handler.vocab_size):
            raise ModelLoadError("the architecture's logits do not have its vocabulary size")
        return handler

    @property
    def context_length(self) -> int | None:
        return self.module.context_length

    def warm_up(self) -> None:
        self.infer({INPUT_IDS: torch.zeros(1, 1, dtype=torch.int64),
                    MAX_NEW_TOKENS: torch.tensor(1), SEED: torch.tensor(0)})

    def embed(self, texts: Sequence[str], *, normalize: bool) -> np.ndarray:
        raise UnsupportedCallError("this model serves Infer (token ids), not Embed")

    def _check_length(self, prompt: int, count: int) -> None:
        context = self.context_length
        if context is not None and prompt + count > context:
            raise InvalidInputError(f"the prompt ({prompt} tokens) and max_new_tokens ({count}) exceed the "
                                    f"model's context of {context} tokens")

    def _validate(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int, Sampling]:
        if not {INPUT_IDS, MAX_NEW_TOKENS} <= set(inputs) <= _INFER_INPUTS:
            raise InvalidInputError("inputs are input_ids, max_new_tokens and optionally seed, "
                                    "temperature and top_p")
        ids = inputs[INPUT_IDS]
        if not isinstance(ids, torch.Tensor) or not _is_integer(ids) or ids.dim() != 2:
            raise InvalidInputError("input_ids must be an integer tensor [batch, seq]")
        if ids.shape[0] < 1 or ids.shape[1] < 1:
            raise InvalidInputError("input_ids must have at least one row and one token")
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise InvalidInputError("input_ids must be in [0, vocab_size)")
        count = _scalar(inputs, MAX_NEW_TOKENS)
        if not 1 <= count <= self.max_new_tokens_limit:
            raise InvalidInputError(f"max_new_tokens must be in [1, {self.max_new_tokens_limit}]")
        self._check_length(int(ids.shape[1]), count)
        seed = _scalar(inputs, SEED) if SEED in inputs else None
        sampling = Sampling(temperature=_real(inputs, TEMPERATURE, 1.0), top_p=_real(inputs, TOP_P, 1.0),
                            seed=seed)
        return ids.to(torch.int64), count, sampling

    def _generator(self, seed: int | None) -> torch.Generator:
        # any int64 seed and any 8 random bytes are within manual_seed's range [-2**63, 2**64)
        value = int.from_bytes(self.entropy(8), "little") if seed is None else seed
        return torch.Generator().manual_seed(value)

    def _tokens(self, ids: torch.Tensor, count: int, sampling: Sampling) -> Iterator[torch.Tensor]:
        """The next token of every row [B], step after step, ``count`` times at most (stop early by not
        asking for more: nothing is computed ahead). Run under ``torch.inference_mode``."""
        generator = self._generator(sampling.seed)
        batch, prompt = ids.shape
        # one buffer for the whole sequence; processors see a view of the ids so far
        sequence = torch.empty(batch, prompt + count, dtype=torch.int64)
        sequence[:, :prompt] = ids
        logits, state = self.module.step(ids, None)
        for i in range(count):
            end = prompt + i
            # a copy: a processor may edit scores in place, and a module's logits may alias its weights
            scores = logits.to(torch.float32, copy=True)
            for processor in self.logits_processors:
                scores = processor(sequence[:, :end], scores)
                if not isinstance(scores, torch.Tensor) or scores.shape != (batch, self.vocab_size):
                    raise GenerationError("a logits processor returned scores of the wrong shape")
            try:
                sequence[:, end] = choose(scores.float(), sampling, generator)
            except ValueError:
                raise GenerationError("the next-token distribution is not finite") from None
            yield sequence[:, end]
            if i + 1 < count:
                logits, state = self.module.step(sequence[:, end : end + 1], state)

    @torch.inference_mode()
    def infer(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids, count, sampling = self._validate(inputs)
        return {TOKENS: torch.stack([t.clone() for t in self._tokens(ids, count, sampling)], dim=1)}

    def prompt_ids(self, request: TextRequest) -> tuple[list[int], int]:
        """The prompt's token ids and the number of new tokens to generate, or :class:`InvalidInputError`
        (:class:`UnsupportedCallError` for a model without a tokenizer)."""
        if self.tokenizer is None:
            raise UnsupportedCallError("this model has no sealed tokenizer: it serves Infer on token ids")
        if not request.prompt:
            raise InvalidInputError("the prompt is empty")
        check_stop(request.stop)
        ids = self.tokenizer.encode(request.prompt).ids
        if not ids:
            raise InvalidInputError("the prompt has no tokens")
        context = self.context_length
        if context is not None and len(ids) >= context:
            raise InvalidInputError(f"the prompt ({len(ids)} tokens) does not fit the model's context of "
                                    f"{context} tokens")
        if request.max_new_tokens is None:
            room = self.max_new_tokens_limit if context is None else context - len(ids)
            return ids, min(self.max_new_tokens_limit, room)
        if not 1 <= request.max_new_tokens <= self.max_new_tokens_limit:
            raise InvalidInputError(f"max_new_tokens must be in [1, {self.max_new_tokens_limit}]")
        self._check_length(len(ids), request.max_new_tokens)
        return ids, request.max_new_tokens

    @torch.inference_mode()
    def generate(self, request: TextRequest, emit: Emit, cancelled: Callable[[], bool] = _never) -> Generated:
        """Generate a continuation of ``request.prompt``, calling ``emit`` as text becomes final (module
        docstring); ``cancelled`` is asked after every token and ends the loop at once."""
        ids, count = self.prompt_ids(request)
        assert self.tokenizer is not None  # prompt_ids refuses a model without one
        stream = TextStream(self.tokenizer, request.stop)
        eos = self.module.eos_token_id
        produced = pending = 0
        reason = "length"
        for token in self._tokens(torch.tensor([ids], dtype=torch.int64), count, request.sampling):
            produced += 1
            pending += 1
            value = int(token[0])
            if value == eos:
                reason = "eos"
                break
            piece = stream.push(value)
            if piece:
                emit(piece, pending)
                pending = 0
            if stream.stopped:
                reason = "stop"
                break
            if cancelled():
                return Generated("cancelled", len(ids), produced)
        rest = stream.finish()
        if rest or pending:
            emit(rest, pending)
        return Generated(reason, len(ids), produced)
