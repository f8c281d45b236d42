"""The green-list text watermark inside the generation loop: torch's side of
:mod:`nitrovault.watermark.text` (which stays pure: numpy masks, no torch).

:class:`GreenListProcessor` adds ``delta`` to the green logits of each row before sampling, with the
``(input_ids, scores) -> scores`` signature of a Hugging Face ``LogitsProcessor``; the causal-LM handler
appends it at boot when the sealed metadata asks for the text mark (``enclave_app/boot.py``).

**Per subject** (``per_subject=True``, policy ``protection.watermark.text.per_subject``): the list is the
calling subject's (:func:`~nitrovault.watermark.keys.derive_subject_key`), so generated text names who
asked for it (``nitrovault watermark trace``). A logits processor sees ids and scores, not the call, so
the subject travels in a :class:`contextvars.ContextVar` set by :func:`subject_scope` around the handler
call, on the thread that runs it (``enclave_app.forward.Forward`` does, on the model worker).

Invariants:

* **Fail closed.** A per-subject processor with no subject in scope raises :class:`SubjectScopeError`
  (a :class:`~enclave_app.models.causal_lm.GenerationError`: INTERNAL to the caller, with a correlation
  id and a fixed message); it never falls back to the model's list or to no mark.
* One forward pass, one subject: the scope is one subject, so every row of a pass is marked for it. The
  causal LM never shares a pass between calls (``rows_independent = False``: batch key ``None``), and a
  joint pass over calls of several subjects runs with no subject in scope (so it fails here and each
  call runs alone, ``enclave_app.forward``).
* Bounded memory: at most :data:`SUBJECT_CACHE` subjects' lists are kept (least recently used first
  out), each with at most :data:`SUBJECT_MASKS` masks: ``SUBJECT_CACHE * SUBJECT_MASKS`` masks in all,
  the model-level list's own bound (65536).

Example::

    >>> from nitrovault.watermark.keys import derive_watermark_keys
    >>> p = GreenListProcessor(derive_watermark_keys(bytes(32), "m"), vocab_size=10, per_subject=True)
    >>> with subject_scope("alice"):
    ...     p(torch.zeros(1, 1, dtype=torch.int64), torch.zeros(1, 10)).shape
    torch.Size([1, 10])
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial

import numpy as np
import torch

from enclave_app.models.causal_lm import GenerationError
from nitrovault.errors import ConfigError
from nitrovault.watermark.keys import SubjectCache, WatermarkKeys
from nitrovault.watermark.text import DEFAULT_DELTA, DEFAULT_GAMMA, GreenList

__all__ = ["WARM_UP_SUBJECT", "GreenListProcessor", "SubjectScopeError", "subject_scope"]

#: subjects whose green lists a per-subject processor keeps, and masks kept per subject's list
SUBJECT_CACHE = 64
SUBJECT_MASKS = 1024
#: the fixed scope of the boot's warm-up call (its tokens are thrown away; no token carries this subject
#: as a caller, and if one did, the warm-up's output would still reach nobody)
WARM_UP_SUBJECT = "nitrovault/warm-up"

_SUBJECT: ContextVar[str | None] = ContextVar("nitrovault_watermark_subject", default=None)


class SubjectScopeError(GenerationError):
    """A per-subject watermark ran with no single subject in scope (a wiring fault of the image)."""


@contextmanager
def subject_scope(subject: str | None) -> Iterator[None]:
    """Run the block with ``subject`` as the calling subject of per-subject marks (``None``: no single
    subject; per-subject processors refuse to run). Scopes nest and are restored on exit."""
    token = _SUBJECT.set(subject)
    try:
        yield
    finally:
        _SUBJECT.reset(token)


class GreenListProcessor:
    """Add ``delta`` to the green logits of each row (a Hugging Face-style logits processor).

    ``input_ids``: [batch, seq] token ids so far (the last column seeds the list); ``scores``: [batch, vocab].
    ``per_subject``: use the list of the subject in :func:`subject_scope` (module docstring).
    """

    def __init__(self, keys: WatermarkKeys, gamma: float = DEFAULT_GAMMA, delta: float = DEFAULT_DELTA, *,
                 vocab_size: int, per_subject: bool = False) -> None:
        if delta < 0:
            raise ConfigError("green-list delta must be >= 0")
        # the model's list: validates the parameters, and is the list when not per subject
        self.green = GreenList(keys, vocab_size=vocab_size, gamma=gamma)
        self.delta = delta
        self.per_subject = per_subject
        self._keys = keys
        self._subjects: SubjectCache[GreenList] = SubjectCache(SUBJECT_CACHE)

    def __repr__(self) -> str:
        return f"GreenListProcessor({self.green!r}, delta={self.delta}, per_subject={self.per_subject})"

    def list_for(self, subject: str | None) -> GreenList:
        """The list that marks ``subject``'s text: the model's, or (per subject) that subject's."""
        if not self.per_subject:
            return self.green
        if not subject:
            raise SubjectScopeError("the per-subject text watermark has no subject in scope")
        return self._subjects.get(subject, partial(
            GreenList, self._keys, vocab_size=self.green.vocab_size, gamma=self.green.gamma,
            cache_size=SUBJECT_MASKS, subject=subject))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        green = self.list_for(_SUBJECT.get())
        if scores.shape[-1] != green.vocab_size:
            raise ConfigError("logits do not have the green list's vocabulary size")
        previous = input_ids[:, -1].tolist()
        masks = np.stack([green.mask(int(p)) for p in previous])
        bias = torch.from_numpy(masks).to(device=scores.device, dtype=scores.dtype) * self.delta
        return scores + bias
