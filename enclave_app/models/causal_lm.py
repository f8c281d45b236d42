"""Causal language models: token ids in, sampled continuation ids out, with logits processors applied
inside the enclave (the green-list text watermark of :mod:`nitrovault.watermark.text`).

As for the generic handler, the architecture's code is registered in the (measured) image in
:data:`LM_ARCHITECTURES`, its hyper-parameters arrive in the sealed metadata key ``nitrovault.config``
(a JSON object) and its weights are the sealed tensors, assigned into a module built on the ``meta``
device. Registered architectures:

* ``bigram``: ``{"vocab_size": V}``; one parameter ``logits`` [V, V], the next-token logits given the
  previous token (the word-bigram LM of ``bench/bench_watermark.py``).
* ``gru``: ``{"vocab_size": V, "dim": D, "layers": L}``; ``embed`` → ``gru`` (batch first) → ``head``.

Every config may also carry ``max_new_tokens`` (default 256, capped at 4096): the largest continuation a
caller may ask for. Unknown config keys are refused.

``Infer`` inputs: ``input_ids`` (integer [batch, seq], seq >= 1, ids in [0, V)), ``max_new_tokens``
(integer, one element, 1..limit) and optionally ``seed`` (integer, one element). Output: ``tokens``
(int64 [batch, max_new_tokens]), the new ids only.

Invariants:

* Each step samples from ``softmax(p_k(...p_1(ids, logits)))``: the last position's logits passed through
  :attr:`CausalLMHandler.logits_processors` in order, each given the whole id sequence so far. The
  enclave appends the watermark processor at boot; callers cannot turn it off.
* Sampling uses its own ``torch.Generator``: seeded from ``seed`` when given (so the call is reproducible)
  and otherwise from :attr:`CausalLMHandler.entropy` (``os.urandom``), never from torch's global state.
* Recurrent state is carried between steps: the prompt is read once, then one token per step.
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from enclave_app.models.base import InvalidInputError, ModelLoadError, UnsupportedCallError
from enclave_app.models.generic import CONFIG_KEY
from nitrovault.errors import NitrovaultError

#: ``max_new_tokens`` when the sealed config does not say, and the most it may say
DEFAULT_MAX_NEW_TOKENS = 256
MAX_NEW_TOKENS_CAP = 4096

INPUT_IDS = "input_ids"
MAX_NEW_TOKENS = "max_new_tokens"
SEED = "seed"
TOKENS = "tokens"

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class GenerationError(NitrovaultError):
    """The model or a logits processor produced no valid next-token distribution (NaN, all ``-inf``,
    wrong shape). A fault of the sealed model or of the image, not of the caller's input."""

    step = "model-generate"


class CausalLM(nn.Module):
    """A registered causal LM: ``forward(input_ids [B, S]) -> logits [B, S, V]`` and the incremental
    :meth:`step` used for generation."""

    vocab_size: int

    def step(self, new_ids: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """Logits [B, V] after reading ``new_ids`` [B, n] on top of ``state`` (``None`` at the start),
        and the state to pass with the next ids."""
        raise NotImplementedError


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
}

_INTEGER_DTYPES = frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64})


def _is_integer(t: torch.Tensor) -> bool:
    return t.dtype in _INTEGER_DTYPES


def _scalar(inputs: Mapping[str, torch.Tensor], name: str) -> int:
    value = inputs[name]
    if not isinstance(value, torch.Tensor) or not _is_integer(value) or value.numel() != 1:
        raise InvalidInputError(f"{name} must be an integer tensor with one element")
    return int(value.item())


@dataclass
class CausalLMHandler:
    module: CausalLM
    architecture: str
    vocab_size: int
    #: the most new tokens one call may ask for (sealed config ``max_new_tokens``)
    max_new_tokens_limit: int = DEFAULT_MAX_NEW_TOKENS
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
        except (ValueError, KeyError, TypeError) as err:
            raise ModelLoadError(f"bad architecture config ({type(err).__name__})") from None
        if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tensors.values()):
            raise ModelLoadError("sealed tensors of a causal LM must be floating point")
        if any(bool(torch.isnan(t).any() or torch.isposinf(t).any()) for t in tensors.values()):
            raise ModelLoadError("sealed tensors contain NaN or +inf")
        try:
            module.load_state_dict(dict(tensors), strict=True, assign=True)
        except RuntimeError:
            raise ModelLoadError("sealed tensors do not fit the registered architecture") from None
        module.eval()
        handler = cls(module=module, architecture=architecture, vocab_size=module.vocab_size,
                      max_new_tokens_limit=limit)
        try:  # one step now, so that a model that cannot run (mixed dtypes...) fails to load
            with torch.inference_mode():
                logits, _ = module.step(torch.zeros(1, 1, dtype=torch.int64), None)
        except (RuntimeError, ValueError, TypeError, IndexError):
            raise ModelLoadError("sealed tensors do not run in the registered architecture") from None
        if logits.shape != (1, handler.vocab_size):
            raise ModelLoadError("the architecture's logits do not have its vocabulary size")
        return handler

    def warm_up(self) -> None:
        self.infer({INPUT_IDS: torch.zeros(1, 1, dtype=torch.int64),
                    MAX_NEW_TOKENS: torch.tensor(1), SEED: torch.tensor(0)})

    def embed(self, texts: Sequence[str], *, normalize: bool) -> np.ndarray:
        raise UnsupportedCallError("this model serves Infer (token ids), not Embed")

    def _validate(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int, int | None]:
        if not {INPUT_IDS, MAX_NEW_TOKENS} <= set(inputs) <= {INPUT_IDS, MAX_NEW_TOKENS, SEED}:
            raise InvalidInputError("inputs are input_ids, max_new_tokens and optionally seed")
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
        seed = _scalar(inputs, SEED) if SEED in inputs else None
        return ids.to(torch.int64), count, seed

    def _generator(self, seed: int | None) -> torch.Generator:
        # any int64 seed and any 8 random bytes are within manual_seed's range [-2**63, 2**64)
        value = int.from_bytes(self.entropy(8), "little") if seed is None else seed
        return torch.Generator().manual_seed(value)

    @torch.inference_mode()
    def infer(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids, count, seed = self._validate(inputs)
        generator = self._generator(seed)
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
            probabilities = torch.softmax(scores.float(), dim=-1)
            if not bool(torch.isfinite(probabilities).all()):
                raise GenerationError("the next-token distribution is not finite")
            sequence[:, end] = torch.multinomial(probabilities, 1, generator=generator)[:, 0]
            if i + 1 < count:
                logits, state = self.module.step(sequence[:, end : end + 1], state)
        return {TOKENS: sequence[:, prompt:].clone()}
