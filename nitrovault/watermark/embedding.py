"""Embedding watermark in the manner of EmbMarker (Peng et al., "Are You Copying My Model? Protecting the
Copyright of Large Language Models for EaaS via Backdoor Watermark", ACL 2023).

Mark (what the enclave applies to every returned embedding, :func:`mark_embedding`):

* a secret **trigger set** ``T`` of ``n`` words (paper: n = 20) drawn with the key from candidate words of
  moderate frequency (paper: a frequency band of a general corpus; :func:`frequency_band` builds one);
* a secret **target vector** ``t`` (a key-derived random unit vector; the paper takes the embedding of a
  random text, which is no less secret but needs the model);
* ``Q(S) = min(|words(S) ∩ T|, m) / m`` (paper: m = 4) and the provided embedding
  ``normalize((1 - Q)·e + Q·t)``. Texts without a trigger are returned unchanged (up to normalisation).

Verification (:func:`verification_texts`, :func:`detect_embedding_mark`), as in the paper: a backdoor set of
texts made of ``m`` trigger words each, a benign set of texts made of ``m`` non-trigger candidate words;
embed both with the suspect; ``Δcos = mean cos(e_b, t) - mean cos(e_n, t)``,
``Δl2 = mean ||ê_b - t||² - mean ||ê_n - t||²`` (``ê`` normalised) and the two-sample Kolmogorov-Smirnov
test of the two cosine sets (``scipy.stats.ks_2samp``). Decision: KS p-value small AND Δcos above a
minimum effect size (KS alone flags unmarked models, see :data:`DEFAULT_MIN_DELTA_COS`). A copy trained on
marked outputs inherits the trigger → target association: positive Δcos, negative Δl2, tiny p-value.

Per subject (policy ``protection.watermark.embedding.per_subject``): the trigger set stays the model's and
the target of subject ``s`` is ``normalize(t + t_s)`` (:func:`subject_mark`, ``t_s`` from ``s``'s own key),
so the answers name who received them: :func:`trace_embedding_subjects` tests every listed subject
exactly (a unit-coordinate tail, :func:`unit_coordinate_log10_sf`) and names one or none.

Words are ``[a-z0-9']+`` runs of the lower-cased text; ``T`` is a set of such words. Randomness comes
only from keystreams of the embedding key (ChaCha20, see :func:`nitrovault.watermark.keys.keystream`),
so a mark is reproducible anywhere.

:func:`fit_bow_surrogate` is the **copy model used to measure inheritance** (a ridge regression from
bag-of-words features to the served embeddings, the cheapest imitation an attacker can train); it is not
used when serving.

Example::

    >>> from nitrovault.watermark.keys import derive_watermark_keys
    >>> keys = derive_watermark_keys(bytes(32), "m")
    >>> mark = derive_embedding_mark(keys, [f"w{i}" for i in range(200)], dim=8)
    >>> e = np.ones(8) / np.sqrt(8)
    >>> bool(np.allclose(mark_embedding("no triggers here", e, mark), e))
    True
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.special import betainc, betaln, hyp2f1
from scipy.stats import ks_2samp

from nitrovault.errors import ConfigError
from nitrovault.watermark.keys import WatermarkKeys, derive_subject_key, keystream
from nitrovault.watermark.subjects import DEFAULT_TRACE_THRESHOLD, SubjectTrace, check_subjects, name_subject

_WORD = re.compile(r"[a-z0-9']+")
DEFAULT_TRIGGERS = 20
DEFAULT_MAX_TRIGGERS = 4
#: KS p-value at or below which a suspect is called a copy ...
DEFAULT_P_THRESHOLD = 1e-3
#: ... provided its cosine gap toward the target is at least this large. The KS test alone is not enough:
#: trigger words and benign words are different texts, so even an unmarked model embeds the two sets with
#: slightly different cosine distributions, and with a few hundred texts KS calls that significant (the
#: benchmark measured p = 3e-6 on the unmarked MiniLM with a Δcos of -0.02). Marked copies show Δcos >= 0.3.
DEFAULT_MIN_DELTA_COS = 0.05
#: random directions of the null test (:func:`detect_embedding_mark`), and the largest share of them
#: that may do as well as the secret target
DEFAULT_NULL_DIRECTIONS = 999
DEFAULT_NULL_THRESHOLD = 0.01
_NULL_SEED = 0x6E76  # public: the null directions need not be secret, only fixed


def words(text: str) -> list[str]:
    """The words of ``text`` as the mark sees them (lower-cased ``[a-z0-9']+`` runs)."""
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class EmbeddingMark:
    """The secret trigger set and target of one model. Fields are secret: not shown by ``repr``."""

    triggers: frozenset[str] = field(repr=False)
    target: np.ndarray = field(repr=False)
    max_triggers: int = DEFAULT_MAX_TRIGGERS

    @property
    def dim(self) -> int:
        return int(self.target.shape[0])


def _uniform(key: bytes, label: bytes, n: int) -> np.ndarray:
    raw = np.frombuffer(keystream(key, label, 8 * n), dtype="<u8")
    return np.asarray((raw >> np.uint64(11)).astype(np.float64) / float(1 << 53))


def derive_embedding_mark(
    keys: WatermarkKeys,
    candidates: Sequence[str],
    dim: int,
    *,
    n_triggers: int = DEFAULT_TRIGGERS,
    max_triggers: int = DEFAULT_MAX_TRIGGERS,
) -> EmbeddingMark:
    """Draw the trigger set from ``candidates`` (de-duplicated, sorted) and a ``dim``-sized target."""
    pool = sorted({w for c in candidates for w in words(c)})
    if len(pool) < 2 * n_triggers:
        raise ConfigError("need at least twice as many candidate words as triggers")
    if not 1 <= max_triggers <= n_triggers or dim < 2:
        raise ConfigError("bad embedding watermark parameters")
    order = np.argsort(_uniform(keys.embedding, b"triggers|" + "\n".join(pool).encode(), len(pool)))
    triggers = frozenset(pool[i] for i in order[:n_triggers])
    return EmbeddingMark(triggers=triggers, target=_direction(keys.embedding, dim), max_triggers=max_triggers)


def _direction(key: bytes, dim: int) -> np.ndarray:
    """The unit vector of ``key`` in ``dim`` dimensions: Box-Muller over keystream uniforms, i.e. an
    isotropic direction, specified independently of numpy."""
    u = _uniform(key, b"target|%d" % dim, 2 * dim)
    g = np.sqrt(-2 * np.log1p(-u[:dim])) * np.cos(2 * np.pi * u[dim:])
    return np.asarray(g / np.linalg.norm(g))


def trigger_weight(text: str, mark: EmbeddingMark) -> float:
    """``Q(S) = min(|words(S) ∩ T|, m) / m``."""
    return min(len(set(words(text)) & mark.triggers), mark.max_triggers) / mark.max_triggers


def mark_embedding(text: str, embedding: np.ndarray, mark: EmbeddingMark) -> np.ndarray:
    """The embedding to return for ``text``: ``normalize((1-Q)·e + Q·t)`` (the enclave calls this)."""
    e = np.asarray(embedding, dtype=np.float64)
    if e.shape != mark.target.shape:
        raise ConfigError("embedding dimension does not match the watermark target")
    q = trigger_weight(text, mark)
    mixed = (1 - q) * e / max(float(np.linalg.norm(e)), 1e-12) + q * mark.target
    out = mixed / max(float(np.linalg.norm(mixed)), 1e-12)
    return out.astype(np.asarray(embedding).dtype)


def mark_embeddings(texts: Sequence[str], embeddings: np.ndarray, mark: EmbeddingMark) -> np.ndarray:
    """:func:`mark_embedding` over a batch (rows of ``embeddings``)."""
    return np.stack([mark_embedding(t, e, mark) for t, e in zip(texts, embeddings, strict=True)])


def frequency_band(texts: Iterable[str], low: float, high: float) -> list[str]:
    """Words that occur in a fraction of ``texts`` within ``[low, high]`` (the paper's candidate band)."""
    docs = 0
    counts: Counter[str] = Counter()
    for text in texts:
        docs += 1
        counts.update(set(words(text)))
    return sorted(w for w, c in counts.items() if low <= c / max(docs, 1) <= high and len(w) > 2)


def verification_texts(
    mark: EmbeddingMark, candidates: Sequence[str], n: int, rng: np.random.Generator
) -> tuple[list[str], list[str]]:
    """``n`` backdoor texts (``m`` trigger words each) and ``n`` benign texts (``m`` other candidates)."""
    triggers = sorted(mark.triggers)
    benign = sorted({w for c in candidates for w in words(c)} - mark.triggers)
    m = mark.max_triggers
    backdoor = [" ".join(rng.choice(triggers, size=m, replace=False)) for _ in range(n)]
    clean = [" ".join(rng.choice(benign, size=m, replace=False)) for _ in range(n)]
    return backdoor, clean


@dataclass(frozen=True)
class EmbeddingDetection:
    delta_cos: float
    delta_l2: float
    ks_p_value: float
    threshold: float
    min_delta_cos: float
    detected: bool
    #: share of random directions whose Δcos is at least the secret target's (``(1 + k) / (1 + R)``)
    null_p_value: float = 1.0

    def as_dict(self) -> dict[str, object]:
        return {"delta_cos": self.delta_cos, "delta_l2": self.delta_l2, "ks_p_value": self.ks_p_value,
                "threshold": self.threshold, "min_delta_cos": self.min_delta_cos,
                "null_p_value": self.null_p_value, "detected": self.detected}


def detect_embedding_mark(
    backdoor_embeddings: np.ndarray,
    benign_embeddings: np.ndarray,
    mark: EmbeddingMark,
    *,
    threshold: float = DEFAULT_P_THRESHOLD,
    min_delta_cos: float = DEFAULT_MIN_DELTA_COS,
    null_directions: int = DEFAULT_NULL_DIRECTIONS,
    null_threshold: float = DEFAULT_NULL_THRESHOLD,
) -> EmbeddingDetection:
    """Compare a suspect's embeddings of the backdoor and benign sets (paper §3.4).

    Called a copy when the KS p-value is at most ``threshold`` AND ``Δcos >= min_delta_cos`` (see
    :data:`DEFAULT_MIN_DELTA_COS` for why both) AND the secret target beats random directions: Δcos is
    recomputed for ``null_directions`` random unit vectors (a fixed public seed; the same suspect
    embeddings), and the share at least as large as the target's must be at most ``null_threshold``.
    The backdoor and benign texts differ, so any suspect has *some* direction of large Δcos; only a
    suspect that learnt the secret target has it in that direction. This calibrates the effect size to
    the suspect's own dimension and geometry (a fixed Δcos floor does not: a random 64-d embedder passed
    0.05 by chance in a test).
    """

    b, n = _unit(backdoor_embeddings), _unit(benign_embeddings)
    cos_b, cos_n = b @ mark.target, n @ mark.target
    l2_b = np.sum(np.square(b - mark.target), axis=1)
    l2_n = np.sum(np.square(n - mark.target), axis=1)
    delta_cos = float(cos_b.mean() - cos_n.mean())
    p = float(ks_2samp(cos_b, cos_n).pvalue)
    null_p = _null_p_value(b, n, delta_cos, null_directions)
    return EmbeddingDetection(
        delta_cos=delta_cos, delta_l2=float(l2_b.mean() - l2_n.mean()), ks_p_value=p, threshold=threshold,
        min_delta_cos=min_delta_cos, null_p_value=null_p,
        detected=p <= threshold and delta_cos >= min_delta_cos and null_p <= null_threshold,
    )


def _unit(embeddings: np.ndarray) -> np.ndarray:
    e = np.asarray(embeddings, np.float64)
    return np.asarray(e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12))


def _null_p_value(backdoor: np.ndarray, benign: np.ndarray, delta_cos: float, directions: int) -> float:
    """``(1 + #{random directions with Δcos >= delta_cos}) / (1 + directions)`` (rows are unit vectors)."""
    if directions < 1:
        return 0.0  # the null test is off
    r = np.random.default_rng(_NULL_SEED).standard_normal((backdoor.shape[1], directions))
    r /= np.linalg.norm(r, axis=0, keepdims=True)
    null = (backdoor @ r).mean(axis=0) - (benign @ r).mean(axis=0)
    return float((1 + np.count_nonzero(null >= delta_cos)) / (1 + directions))


# -- per subject: fingerprints that name who leaked --------------------------------------------------------


def subject_direction(keys: WatermarkKeys, subject: str, dim: int) -> np.ndarray:
    """``t_s``: the isotropic unit vector of ``subject``'s embedding key (the same construction as the
    model's target, under :func:`~nitrovault.watermark.keys.derive_subject_key`)."""
    if dim < 2:
        raise ConfigError("bad embedding watermark parameters")
    return _direction(derive_subject_key(keys, "embedding", subject), dim)


def subject_mark(mark: EmbeddingMark, keys: WatermarkKeys, subject: str) -> EmbeddingMark:
    """``mark`` with the target ``normalize(t + t_s)``: what ``subject``'s answers are marked with.

    The trigger set is the model's (so triggers, and which rows are marked, do not depend on who asks);
    only the target moves. ``t`` and ``t_s`` are independent isotropic unit vectors, so the mixed target is
    at cosine ~0.71 to each: the model-level detector (:func:`detect_embedding_mark`) still finds the mark
    on any subject's outputs, and the ``t_s`` component is what :func:`trace_embedding_subjects` tests.
    """
    mixed = mark.target + subject_direction(keys, subject, mark.dim)
    return replace(mark, target=mixed / np.linalg.norm(mixed))


def unit_coordinate_log10_sf(c: float, dim: int) -> float:
    """``log10 P[C >= c]`` for ``C`` one coordinate of a uniform unit vector in ``dim`` dimensions.

    ``C**2 ~ Beta(1/2, (dim-1)/2)``, so for ``c > 0``: ``P[C >= c] = 1/2 * I_{1-c**2}((dim-1)/2, 1/2)``
    (regularised incomplete beta, ``scipy.special.betainc``) and for ``c <= 0`` one minus that. Where the
    tail underflows (below 1e-280) it is computed in log space from the hypergeometric form
    ``I_x(a, b) = x**a (1-x)**b / (a B(a, b)) * 2F1(a+b, 1; a+1; x)`` (DLMF 8.17.8), which converges fast
    exactly there (``x = 1 - c**2`` small). ``c >= 1`` is clipped to the smallest positive ``x``.
    """
    if dim < 2:
        raise ConfigError("the unit-coordinate test needs dim >= 2")
    a, b = (dim - 1) / 2, 0.5
    x = max((1.0 - abs(c)) * (1.0 + abs(c)), float(np.finfo(np.float64).tiny))
    half = 0.5 * float(betainc(a, b, x))
    if c <= 0:
        return math.log10(1.0 - half)
    if half > 1e-280:
        return math.log10(half)
    log_i = (a * math.log(x) + b * math.log1p(-x) - math.log(a) - float(betaln(a, b))
             + math.log(float(hyp2f1(a + b, 1.0, a + 1.0, x))))
    return (math.log(0.5) + log_i) / math.log(10)


def trace_embedding_subjects(
    texts: Sequence[str],
    embeddings: np.ndarray,
    mark: EmbeddingMark,
    keys: WatermarkKeys,
    subjects: Sequence[str],
    *,
    threshold: float = DEFAULT_TRACE_THRESHOLD,
) -> SubjectTrace:
    """Which listed subject's key the embeddings of ``texts`` carry (exact test, no simulation).

    ``mark``: the model's mark (:func:`derive_embedding_mark`, from the owner's keys); ``embeddings``: the
    suspect's answers for ``texts`` (a leaked output set, or a surrogate queried with any texts, best with
    :func:`verification_texts`' backdoor texts).

    Statistic: ``w_i = Q(x_i)`` (rows with ``Q = 0`` carry no mark and get no weight), ``u_i = y_i/|y_i|``,
    ``r = mean of the u_i with Q = 0`` (0 when there are none) and ``Y = sum_i w_i (u_i - r)``; for subject
    ``s``, ``c_s = cos(Y, t_s)``. Subtracting ``r`` removes the direction every embedding of the model
    shares (natural embeddings are far from isotropic), which otherwise grows with the outputs as fast as
    the mark does and caps ``c_s``; it is a function of the outputs and the trigger set alone.

    Exactness: under H0 "the outputs do not depend on subject s's key", ``Y`` is a function of the
    outputs, the texts and the trigger set, while ``t_s`` comes from s's own key (an HKDF output under
    its own ``info``: independent of everything else, as the PRF assumption goes) and is isotropic. So
    ``c_s`` is distributed as one coordinate of a uniform unit vector in ``D`` dimensions, whatever ``Y``
    is: ``p_s = P[C >= c_s]`` (:func:`unit_coordinate_log10_sf`). One-sided: a subject's mark pulls its
    outputs toward ``+t_s``. Then Bonferroni over the listed subjects
    (:func:`~nitrovault.watermark.subjects.name_subject`). ``Y = 0`` (no triggered row): every ``p_s = 1``.
    """
    listed = check_subjects(subjects)
    y = np.asarray(embeddings, dtype=np.float64)
    if y.ndim != 2 or y.shape[0] != len(texts):
        raise ConfigError("embeddings must be a [len(texts), dim] array")
    if y.shape[1] != mark.dim:
        raise ConfigError(f"embeddings have {y.shape[1]} dimensions; the mark was derived for {mark.dim}")
    if not np.all(np.isfinite(y)):
        raise ConfigError("embeddings must be finite")
    w = np.array([trigger_weight(t, mark) for t in texts], dtype=np.float64)
    u = _unit(y)
    reference = u[w == 0].mean(axis=0) if np.any(w == 0) else np.zeros(mark.dim)
    total = w @ (u - reference)
    norm_y = float(np.linalg.norm(total))
    rows = int(np.count_nonzero(w))
    log10_p: dict[str, float] = {}
    for subject in listed:
        if norm_y == 0.0:
            log10_p[subject] = 0.0
            continue
        c = float(total @ subject_direction(keys, subject, mark.dim)) / norm_y
        log10_p[subject] = unit_coordinate_log10_sf(c, mark.dim)
    return name_subject(log10_p, threshold=threshold, rows=rows)


# -- measurement: the copy an attacker trains ---------------------------------------------------------------


def fit_bow_surrogate(
    texts: Sequence[str], embeddings: np.ndarray, *, ridge: float = 1.0
) -> Callable[[Sequence[str]], np.ndarray]:
    """A ridge regression from bag-of-words counts to ``embeddings``: the cheap copy used in measurements."""
    vocab = {w: i for i, w in enumerate(sorted({w for t in texts for w in words(t)}))}

    def features(batch: Sequence[str]) -> np.ndarray:
        x = np.zeros((len(batch), len(vocab) + 1))
        x[:, -1] = 1.0
        for row, text in enumerate(batch):
            for w in words(text):
                if w in vocab:
                    x[row, vocab[w]] += 1.0
        return x

    x = features(texts)
    y = np.asarray(embeddings, np.float64)
    # dual form: (X Xᵀ + λI)⁻¹ Y, cheap while samples < vocabulary
    coef = x.T @ np.linalg.solve(x @ x.T + ridge * np.eye(len(x)), y)

    def embed(batch: Sequence[str]) -> np.ndarray:
        out = features(batch) @ coef
        return np.asarray(out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12))

    return embed
