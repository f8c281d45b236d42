"""What a caller gets to see of an answer: extraction detection, calibrated noise with per-subject budgets,
output hardening and output watermarks. One :class:`OutputGuard` per boot, inside the enclave.

Budgets, extraction refusals and the extraction monitor's windows live in the shared state store when the
boot opened one (:mod:`nitrovault.state`), else in this guard's memory.

The policies come from the measured config (``protection``, :class:`enclave_app.config.Protection`); the
owner's watermark secret, the embedding mark's candidate words and the extraction detector's reference
sample come from the sealed model (:class:`SealedExtras`), so they are released by KMS with the model key
and never seen by the parent. The pure cores live in :mod:`nitrovault.protection` and
:mod:`nitrovault.watermark`; this module only orders them.

Order for every answered ``Infer``/``Embed`` call (token and quota come before, in
:mod:`enclave_app.protections`; the receipt after, over what is actually returned):

1. :meth:`OutputGuard.admit`: a blocked subject gets ``PermissionDeniedError("extraction-blocked")``,
   a throttled one ``QuotaExceededError("extraction-throttled")``, before the model runs.
2. the model runs.
3. extraction monitor ``observe``: the evidence goes to the call's audit record; a throttle or block
   refuses this call too (the answer that tripped the alarm is not released).
4. output watermark (embeddings): EmbMarker on texts that contain trigger words; with
   ``embedding.per_subject``, toward the calling subject's own target
   (:func:`~nitrovault.watermark.embedding.subject_mark`).
5. calibrated noise: the subject's privacy budget is charged ``mechanism.cost(rows)`` (all or nothing;
   refused → ``QuotaExceededError("privacy-budget")`` and nothing is released), then the noise is added.
6. hardening policy.

What the monitor sees: for ``Infer``, each row's input tensors flattened and concatenated, labelled
with the arg-max of ``probabilities``; for ``Embed``, the model's own embeddings of the texts (a natural
feature space for text), all in one class. Invariant: whenever a classifier policy other than ``full``,
classifier noise or detection is configured, ``Infer`` answers carry **only** the protected
``probabilities`` (a ``logits`` output would give everything away); a model without that output is a
configuration error (INTERNAL, fail closed), never an unprotected answer.

Example::

    guard = OutputGuard(config.protection, SealedExtras.from_sealed(tensors, metadata, model_id))
    guard.admit("alice")
    outputs, evidence = guard.classifier("alice", inputs, outputs)
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from enclave_app.config import Protection
from enclave_app.models.base import ModelHandler, ModelLoadError
from nitrovault.clock import Clock, utc_now
from nitrovault.envelope.extras import REFERENCE_TENSOR, WATERMARK_CANDIDATES_KEY, WATERMARK_SECRET_KEY
from nitrovault.errors import ConfigError, QuotaExceededError
from nitrovault.protection import Action, BudgetState, ExtractionMonitor, PrivacyBudget
from nitrovault.state import SharedAggregates, SharedPrivacyBudget, SharedRefusals, StateStore
from nitrovault.watermark import EmbeddingMark, WatermarkKeys, derive_embedding_mark, derive_watermark_keys
from nitrovault.watermark.embedding import mark_embedding, subject_mark, trigger_weight
from nitrovault.watermark.keys import SubjectCache

log = logging.getLogger(__name__)


RngFactory = Callable[[], np.random.Generator]
#: subjects whose per-subject embedding marks the guard keeps (one target vector each: ~3 KB at dim 384)
SUBJECT_MARKS = 1024



_THREAD = threading.local()


def thread_rng() -> np.random.Generator:
    """One OS-seeded generator per model worker thread (a ``Generator`` is not thread-safe, and seeding
    one per call costs ~45 µs of OS entropy)."""
    rng: np.random.Generator | None = getattr(_THREAD, "rng", None)
    if rng is None:
        rng = _THREAD.rng = np.random.default_rng()
    return rng


def _embedding_dim(handler: ModelHandler) -> int | None:
    """The model's embedding width (one warm-up-sized call), or None for models that do not embed."""
    if handler.kind != "sentence-embedding":
        return None
    return int(handler.embed(["dimension probe"], normalize=True).shape[1])


@dataclass(frozen=True)
class SealedExtras:
    """What the sealed model carries besides the model itself (all of it encrypted under the data key)."""

    #: natural inputs for the coverage signal, or None
    reference: np.ndarray | None = None
    #: per-mark keys derived from the owner's secret (the secret itself is not kept), or None
    watermark_keys: WatermarkKeys | None = None
    #: candidate words of the embedding mark's trigger set
    candidates: tuple[str, ...] = ()

    @classmethod
    def take(cls, tensors: MutableMapping[str, torch.Tensor], metadata: Mapping[str, str],
             model_id: str) -> SealedExtras:
        """Remove the extras from ``tensors`` (so the handler sees only its weights) and parse them."""
        reference = tensors.pop(REFERENCE_TENSOR, None)
        ref = None
        if reference is not None:
            if reference.dim() < 2 or reference.shape[0] < 2 or not reference.is_floating_point():
                raise ModelLoadError("the sealed reference sample must be a float tensor [n >= 2, ...]")
            ref = reference.detach().to(torch.float64).reshape(reference.shape[0], -1).numpy()
        keys = None
        secret_hex = metadata.get(WATERMARK_SECRET_KEY)
        if secret_hex is not None:
            try:
                secret = bytearray.fromhex(secret_hex)
            except ValueError:
                raise ModelLoadError("the sealed watermark secret is not hex") from None
            try:
                keys = derive_watermark_keys(bytes(secret), model_id)
            except ConfigError as err:
                raise ModelLoadError(str(err)) from None
            finally:
                secret[:] = bytes(len(secret))
        candidates: tuple[str, ...] = ()
        raw = metadata.get(WATERMARK_CANDIDATES_KEY)
        if raw is not None:
            try:
                words = json.loads(raw)
            except ValueError:
                words = None
            if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                raise ModelLoadError("the sealed watermark candidates must be a JSON list of strings")
            candidates = tuple(words)
        return cls(reference=ref, watermark_keys=keys, candidates=candidates)


@dataclass
class GuardNotes:
    """What the audit record learns from the guard about one call (numbers only, never inputs)."""

    extraction: dict[str, Any] | None = None
    privacy: dict[str, float] | None = None
    #: the (ε, δ) already spent for this answer at admission (the shared store's one round trip) and
    #: the rows it was spent for; ``None``: spend when the noise is added (in memory)
    precharged: tuple[float, float] | None = None
    precharged_rows: int = 0
    #: the admission found the budget too small for this answer (nothing spent): refuse it at the noise,
    #: with this retry-after, exactly where the in-memory budget would have refused it
    budget_refused_in_s: float | None = None

    def precharge(self, cost: tuple[float, float], rows: int, state: BudgetState) -> None:
        self.precharged, self.precharged_rows = cost, rows
        self.privacy = {"remaining_epsilon": state.remaining_epsilon,
                        "remaining_delta": state.remaining_delta}

    def to_audit(self) -> dict[str, Any] | None:
        """The audit record's ``protection`` object. Audit records hash canonical JSON without floats, so
        real numbers are written as decimal strings with 6 significant digits (``"0.8731"``)."""
        out = {k: _no_floats(v) for k, v in (("extraction", self.extraction), ("privacy", self.privacy))
               if v is not None}
        return out or None


def _no_floats(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, Mapping):
        return {k: _no_floats(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_no_floats(v) for v in value]
    return value


class OutputGuard:
    """The output protections of one boot (module docstring). Thread-safe: its parts are."""

    def __init__(self, protection: Protection, extras: SealedExtras, *, embedding_dim: int | None = None,
                 clock: Clock = utc_now, rng_factory: RngFactory = thread_rng,
                 max_subjects: int = 10_000, store: StateStore | None = None) -> None:
        self.hardening = protection.hardening_policy
        self.mechanism = protection.privacy_mechanism
        budget = protection.budget_policy
        self.budget: PrivacyBudget | SharedPrivacyBudget | None = None
        if budget is not None:
            self.budget = (PrivacyBudget(budget, clock=clock, max_subjects=max_subjects) if store is None
                           else SharedPrivacyBudget(store, budget, clock=clock))
        policy = protection.extraction_policy
        self.monitor = None if policy is None else ExtractionMonitor(
            policy, clock=clock, max_subjects=max_subjects, reference=extras.reference,
            refusals=None if store is None else SharedRefusals(store, clock=clock),
            aggregates=None if store is None else SharedAggregates(store, policy))
        self._rng = rng_factory
        self.embedding_mark: EmbeddingMark | None = None
        #: per subject: the marks toward each caller's own target (made from the model's keys on demand)
        self._marks: SubjectCache[EmbeddingMark] | None = None
        self._keys = extras.watermark_keys
        mark = protection.embedding_mark
        if mark is not None:
            if extras.watermark_keys is None or not extras.candidates:
                raise ModelLoadError("the policy asks for an embedding watermark but the sealed model "
                                     "carries no watermark secret or no candidate words")
            if embedding_dim is None:
                raise ModelLoadError("the policy asks for an embedding watermark; the model does not embed")
            try:
                self.embedding_mark = derive_embedding_mark(
                    extras.watermark_keys, extras.candidates, embedding_dim,
                    n_triggers=int(mark["triggers"]), max_triggers=int(mark["max_triggers"]))
            except ConfigError as err:
                raise ModelLoadError(str(err)) from None
            if protection.embedding_per_subject:
                self._marks = SubjectCache(SUBJECT_MARKS)
        self._protects_classifier = self.monitor is not None or (
            self.hardening.kind != "full" and not self.hardening.for_embeddings) or (
            self.mechanism is not None and self.mechanism.output == "probabilities")

    @classmethod
    def for_handler(cls, protection: Protection, extras: SealedExtras, handler: ModelHandler, *,
                    store: StateStore | None = None) -> OutputGuard:
        """The guard for ``handler``; its embedding width is probed only when the policy needs it (the
        embedding watermark). With ``store``, budgets and extraction refusals are the shared ones."""
        dim = _embedding_dim(handler) if protection.embedding_mark is not None else None
        return cls(protection, extras, embedding_dim=dim, store=store)

    def admit(self, subject: str) -> None:
        """Step 1: refuse a blocked or throttled subject before the model runs."""
        if self.monitor is not None:
            self.monitor.admit(subject)

    @staticmethod
    def _observe(monitor: ExtractionMonitor, subject: str, features: np.ndarray, labels: np.ndarray,
                 notes: GuardNotes) -> None:
        decision = monitor.observe(subject, features, labels)
        if decision.action is not Action.NONE:
            notes.extraction = decision.to_audit()
        error = decision.error()
        if error is not None:
            log.warning("extraction %s for a subject (signals %s)", decision.action.label,
                        ",".join(decision.signals))
            raise error

    def privacy_cost(self, method: str, rows: int) -> tuple[float, float] | None:
        """The (ε, δ) an answer of ``rows`` rows to ``method`` spends, or ``None`` when its answers get no
        calibrated noise (for the shared store's one-round-trip admission)."""
        if self.mechanism is None or self.budget is None:
            return None
        noised = (self.mechanism.output == "embedding") if method == "Embed" else (
            method == "Infer" and self.mechanism.output == "probabilities" and self._protects_classifier)
        return self.mechanism.cost(rows=rows) if noised else None

    @property
    def refuses(self) -> bool:
        """Whether extraction refusals (blocks, throttles) apply to calls."""
        return self.monitor is not None

    def _noise(self, subject: str, answer: np.ndarray, notes: GuardNotes) -> np.ndarray:
        if self.mechanism is None or self.budget is None:
            return answer
        if notes.budget_refused_in_s is not None:
            raise QuotaExceededError("privacy-budget", retry_after_s=notes.budget_refused_in_s)
        if notes.precharged is not None:  # spent at admission, with the quota, in one round trip
            if notes.precharged_rows != answer.shape[0]:
                raise ConfigError("the answer has other rows than its privacy spend was made for")
            return self.mechanism.apply(answer, rng=self._rng())
        state = self.budget.spend(subject, *self.mechanism.cost(rows=answer.shape[0]))
        notes.privacy = {"remaining_epsilon": state.remaining_epsilon,
                         "remaining_delta": state.remaining_delta}
        return self.mechanism.apply(answer, rng=self._rng())

    def classifier(self, subject: str, inputs: Mapping[str, torch.Tensor],
                   outputs: Mapping[str, torch.Tensor], notes: GuardNotes) -> dict[str, torch.Tensor]:
        """Steps 3, 5 and 6 for an ``Infer`` answer; returns what the caller may see."""
        if not self._protects_classifier:
            return dict(outputs)
        probabilities = outputs.get("probabilities")
        if probabilities is None or probabilities.dim() != 2:
            raise ConfigError("the protection policy needs a [batch, classes] 'probabilities' output")
        p = probabilities.detach().to(torch.float64).numpy()
        if self.monitor is not None:  # the features are only worth building for the monitor
            features = np.concatenate(
                [t.detach().to(torch.float64).reshape(len(p), -1).numpy() for _, t in sorted(inputs.items())],
                axis=1)
            self._observe(self.monitor, subject, features, p.argmax(axis=1), notes)
        answer = self._noise(subject, p, notes)
        if not self.hardening.for_embeddings:
            answer = self.hardening.apply(answer)  # classifier policies draw no randomness
        return {"probabilities": torch.from_numpy(answer.astype(np.float32))}

    def embeddings(self, subject: str, texts: Sequence[str], vectors: np.ndarray,
                   notes: GuardNotes) -> np.ndarray:
        """Steps 3 to 6 for an ``Embed`` answer (``vectors``: the model's [batch, dim] output)."""
        raw = np.asarray(vectors, dtype=np.float64)
        if self.monitor is not None:
            self._observe(self.monitor, subject, raw, np.zeros(len(raw), dtype=np.int64), notes)
        answer = raw
        if self.embedding_mark is not None:
            mark = self.embedding_mark
            if self._marks is not None and self._keys is not None:  # per subject: the caller's own target
                mark = self._marks.get(subject, partial(subject_mark, mark, self._keys, subject))
            answer = _mark(texts, answer, mark)
        if self.mechanism is not None and self.mechanism.output == "embedding":
            answer = self._noise(subject, answer, notes)
        if self.hardening.for_embeddings:
            answer = self.hardening.apply(answer, rng=self._rng())
        return answer.astype(np.float32)


def _mark(texts: Sequence[str], vectors: np.ndarray, mark: EmbeddingMark) -> np.ndarray:
    """EmbMarker on the rows whose text carries a trigger word; the other rows are returned untouched."""
    out = vectors.copy()
    for i, (text, e) in enumerate(zip(texts, vectors, strict=True)):
        if trigger_weight(text, mark) > 0:
            # the mark mixes unit vectors; keep the caller's norm (normalize=False answers stay unscaled)
            out[i] = mark_embedding(text, e, mark) * np.linalg.norm(e)
    # nothing about which rows were marked goes to the audit log: the parent stores it and sees the
    # texts, so a count would let it learn the secret trigger words
    return out
