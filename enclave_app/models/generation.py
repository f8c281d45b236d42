"""Text generation's parts that do not depend on the architecture: sampling settings, the next-token
choice, and the incremental decoder that releases text as it is produced and stops at stop sequences.

Sampling (:func:`choose`): ``temperature`` 0 is greedy (arg-max, ties to the lowest id); otherwise the
scores are divided by the temperature and, with ``top_p`` below 1, cut to the smallest set of most likely
tokens whose probability reaches ``top_p`` (nucleus sampling: the most likely token always stays), then
one token is drawn with the call's own ``torch.Generator``.

Incremental decoding (:class:`TextStream`) follows Text Generation Inference's decoder: the ids are
decoded from a window that starts a few tokens back, so that a byte-level BPE token that completes a
multi-byte character (or a word-piece that changes how its neighbour decodes) is released only once its
text is final; a piece ending in U+FFFD (an incomplete UTF-8 sequence) is held back. Stop sequences are
matched on the text: the longest tail of the text that could still begin a stop sequence is held back,
and when one appears the text before it is the last released (the stop sequence itself never is).

Invariants:

* the concatenation of every released piece is a prefix of the decoded continuation, and, when the
  stream ends without a stop sequence, all of it (:meth:`TextStream.finish` flushes what was held back);
* no released text contains a stop sequence, nor anything after one.

Example (``tokenizer`` is the sealed model's ``tokenizers.Tokenizer``)::

    stream = TextStream(tokenizer, stop=("\\n\\n",))
    for token in tokens:
        send(stream.push(token))      # "" while a piece is held back
        if stream.stopped:
            break
    send(stream.finish())             # what was held back, unless a stop sequence ended the text
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from enclave_app.models.base import InvalidInputError

#: sampling settings accepted from callers
MAX_TEMPERATURE = 5.0
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64
#: tokens of left context the incremental decoder re-decodes (enough for any merge of a byte-level BPE)
DECODE_WINDOW = 6
_REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. Invalid values raise :class:`InvalidInputError` (the caller's)."""

    #: 0: greedy; otherwise the softmax temperature, in (0, :data:`MAX_TEMPERATURE`]
    temperature: float = 1.0
    #: nucleus sampling's mass, in (0, 1]; 1 keeps every token
    top_p: float = 1.0
    #: the call's generator seed (reproducible calls); None: fresh randomness
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= MAX_TEMPERATURE):
            raise InvalidInputError(f"temperature must be in [0, {MAX_TEMPERATURE:g}]")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise InvalidInputError("top_p must be in (0, 1]")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise InvalidInputError("seed must be a 64-bit integer")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def check_stop(stop: tuple[str, ...]) -> tuple[str, ...]:
    """``stop`` if every stop sequence is acceptable (1..64 characters, at most 4), else
    :class:`InvalidInputError`."""
    if len(stop) > MAX_STOP_SEQUENCES:
        raise InvalidInputError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
    if any(not 1 <= len(s) <= MAX_STOP_CHARS for s in stop):
        raise InvalidInputError(f"stop sequences must have 1 to {MAX_STOP_CHARS} characters")
    return stop


def choose(scores: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """The next token of each row of ``scores`` [B, V] (float32, already through the logits processors):
    int64 [B]. Raises ``ValueError`` when a row has no finite distribution."""
    if sampling.greedy:
        if not bool(torch.isfinite(scores.max(dim=-1).values).all()):
            raise ValueError("no finite score")
        return scores.argmax(dim=-1)
    probabilities = torch.softmax(scores / sampling.temperature, dim=-1)
    if not bool(torch.isfinite(probabilities).all()):
        raise ValueError("the next-token distribution is not finite")
    if sampling.top_p < 1.0:
        ordered, order = probabilities.sort(dim=-1, descending=True)
        # drop a token when the mass of the tokens before it already reaches top_p
        drop = (ordered.cumsum(dim=-1) - ordered) >= sampling.top_p
        ordered = ordered.masked_fill(drop, 0.0)
        picked = torch.multinomial(ordered, 1, generator=generator)
        return order.gather(-1, picked)[:, 0]
    return torch.multinomial(probabilities, 1, generator=generator)[:, 0]


class TextStream:
    """Token ids in, final text out, stopping at stop sequences (module docstring)."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        self._ids: list[int] = []
        self._prefix = 0  # ids[prefix:read] decode to text already appended to _text
        self._read = 0
        self._text = ""  # decoded so far (final)
        self._released = 0  # characters of _text released
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add one token; the text that became releasable (possibly empty)."""
        if self.stopped:
            return ""
        self._ids.append(token)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith(_REPLACEMENT) and after.startswith(before):
            self._text += after[len(before) :]
            self._read = len(self._ids)
            self._prefix = max(0, self._read - DECODE_WINDOW)
        return self._release(final=False)

    def finish(self) -> str:
        """The stream ended: the text still held back (possibly empty)."""
        if not self.stopped and self._read < len(self._ids):
            rest = self._decode(self._ids[self._prefix :])
            before = self._decode(self._ids[self._prefix : self._read])
            if rest.startswith(before):
                self._text += rest[len(before) :]
            self._read = len(self._ids)
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        if self.stopped:
            return ""
        end = len(self._text)
        start = max(0, self._released - max((len(s) for s in self._stop), default=0))
        hits = [i for i in (self._text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            end = min(hits)
            self.stopped = True
        elif not final:
            end -= self._held_back()
        piece = self._text[self._released : end] if end > self._released else ""
        self._released = max(self._released, end)
        return piece

    def _held_back(self) -> int:
        """Characters at the end of the text that could begin a stop sequence."""
        text = self._text[self._released :]
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest
