"""One batch of model work: the calls a :class:`~enclave_app.batching.Batcher` gathered, one forward pass.

Each call arrives validated and authorised (token, quota and admission were checked on the event loop,
for its own subject); this module concatenates the calls' rows, runs the handler once, splits the answer
back into each call's rows and then runs the output guard **per call**, for the call's own subject and
notes, so that extraction detection, noise and privacy budgets, watermarks and hardening stay exactly
what a call served alone would get. One call's refusal or failure is only that call's.

When the joint forward pass fails (a row the model rejects), every call is run again on its own, so a
caller with a bad row gets its own error and the others their answers: nothing of one caller's input or
failure reaches another.

Batch keys (calls with equal keys may share a forward pass):

* ``Embed``: ``("embed", normalize)``;
* ``Infer``: ``("infer", ((name, dtype, trailing shape), ...))`` for handlers whose rows are independent
  (:attr:`ModelHandler.rows_independent`), otherwise ``None`` (the call runs alone: a causal LM samples
  per call, with its own seed and length);
* ``Generate``: ``None``: a generation holds its worker until its last token (it streams through
  :attr:`GenerateCall.emit` meanwhile, and stops when :attr:`GenerateCall.cancelled` says so).

The handler runs inside :func:`~enclave_app.models.green_list.subject_scope` of its call's subject (a
joint pass: of the one subject all its calls share, else of none), so a per-subject text mark marks
every row for the subject it is returned to, and refuses (fails closed) when that cannot be so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from enclave_app.models import ModelHandler
from enclave_app.models.base import TextGenerator, UnsupportedCallError
from enclave_app.models.causal_lm import Emit, Generated, TextRequest
from enclave_app.models.green_list import subject_scope
from enclave_app.outputs import GuardNotes, OutputGuard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedCall:
    texts: Sequence[str]
    normalize: bool
    subject: str
    notes: GuardNotes

    @property
    def rows(self) -> int:
        return len(self.texts)

    def key(self, handler: ModelHandler) -> Hashable:
        return ("embed", self.normalize)


@dataclass(frozen=True)
class InferCall:
    inputs: Mapping[str, torch.Tensor]
    subject: str
    notes: GuardNotes

    @property
    def rows(self) -> int:
        return max((t.shape[0] for t in self.inputs.values() if t.dim()), default=1)

    def key(self, handler: ModelHandler) -> Hashable | None:
        if not handler.rows_independent or any(t.dim() == 0 for t in self.inputs.values()):
            return None
        rows = {t.shape[0] for t in self.inputs.values()}
        if len(rows) != 1:
            return None  # inconsistent leading dims: the model decides alone (and refuses)
        return ("infer", tuple(sorted((name, str(t.dtype), tuple(t.shape[1:]))
                                      for name, t in self.inputs.items())))


@dataclass(frozen=True)
class GenerateCall:
    request: TextRequest
    subject: str
    #: called on the worker thread with each piece of text as it becomes final
    emit: Emit
    #: asked after every token: True ends the generation at once
    cancelled: Callable[[], bool]
    rows: int = 1

    def key(self, handler: ModelHandler) -> Hashable | None:
        return None


Call = EmbedCall | InferCall | GenerateCall
Answer = np.ndarray | dict[str, torch.Tensor] | Generated


class Forward:
    """The batch function over the served model (``model()`` returns it, or raises when not serving)."""

    def __init__(self, model: Callable[[], tuple[ModelHandler, OutputGuard]]) -> None:
        self._model = model

    def __call__(self, calls: Sequence[Call]) -> list[Answer | BaseException]:
        handler, guard = self._model()
        if len(calls) > 1:
            try:
                return self._joint(handler, guard, calls)
            except Exception as err:  # a row the model refuses: every call alone, below
                log.info("a joint forward pass of %d calls failed (%s): each runs alone",
                         len(calls), type(err).__name__)
        return [self._alone(handler, guard, call) for call in calls]

    def _alone(self, handler: ModelHandler, guard: OutputGuard, call: Call) -> Answer | BaseException:
        # per-subject marks inside the model (the text green list) read the subject from this scope; it
        # is set here, on the worker thread that runs the handler
        with subject_scope(call.subject):
            return self._one(handler, guard, call)

    def _one(self, handler: ModelHandler, guard: OutputGuard, call: Call) -> Answer | BaseException:
        if isinstance(call, EmbedCall):
            return _captured(lambda: guard.embeddings(
                call.subject, call.texts, handler.embed(call.texts, normalize=call.normalize), call.notes))
        if isinstance(call, GenerateCall):
            if not isinstance(handler, TextGenerator):
                return UnsupportedCallError("this model does not generate text")
            return _captured(lambda: handler.generate(call.request, call.emit, call.cancelled))
        return _captured(lambda: guard.classifier(call.subject, call.inputs, handler.infer(call.inputs),
                                                  call.notes))

    def _joint(self, handler: ModelHandler, guard: OutputGuard,
               calls: Sequence[Call]) -> list[Answer | BaseException]:
        """One forward pass over every call's rows, split back; raises when the pass itself fails."""
        # a subject in scope only if every row is that subject's: a pass mixing subjects has none, so a
        # per-subject mark inside the model refuses it and every call runs alone (no row is ever marked
        # for another caller than the one it is returned to)
        subjects = {c.subject for c in calls}
        with subject_scope(subjects.pop() if len(subjects) == 1 else None):
            return self._pass(handler, guard, calls)

    def _pass(self, handler: ModelHandler, guard: OutputGuard,
              calls: Sequence[Call]) -> list[Answer | BaseException]:
        sizes = [call.rows for call in calls]
        embeds = [c for c in calls if isinstance(c, EmbedCall)]
        if len(embeds) == len(calls):
            texts = [t for c in embeds for t in c.texts]
            vectors = handler.embed(texts, normalize=embeds[0].normalize)
            if vectors.shape[0] != len(texts):
                raise ValueError("the model answered another number of rows")
            parts = np.split(vectors, np.cumsum(sizes)[:-1])
            return [_captured(partial(guard.embeddings, c.subject, c.texts, v, c.notes))
                    for c, v in zip(embeds, parts, strict=True)]
        infers = [c for c in calls if isinstance(c, InferCall)]
        if len(infers) != len(calls):
            raise ValueError("a batch mixes methods")
        joined = {name: torch.cat([c.inputs[name] for c in infers]) for name in infers[0].inputs}
        outputs = handler.infer(joined)
        total = sum(sizes)
        if any(t.dim() == 0 or t.shape[0] != total for t in outputs.values()):
            raise ValueError("the model's outputs are not one row per input row")
        split = {name: torch.split(t, sizes) for name, t in outputs.items()}
        return [_captured(partial(guard.classifier, c.subject, c.inputs,
                                  {name: parts[i] for name, parts in split.items()}, c.notes))
                for i, c in enumerate(infers)]


def _captured(step: Callable[[], Answer]) -> Answer | BaseException:
    """One call's work; its refusal or failure is returned, to be raised in its caller (never another's)."""
    try:
        return step()
    except Exception as err:
        return err
