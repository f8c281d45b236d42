"""EmbMarker-style embedding watermark on a deterministic fake teacher: the mark function, inheritance by a
surrogate trained on marked outputs (and not by one trained on unmarked outputs), and its retrieval cost."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from nitrovault.errors import ConfigError
from nitrovault.watermark.embedding import (
    derive_embedding_mark,
    detect_embedding_mark,
    fit_bow_surrogate,
    frequency_band,
    mark_embedding,
    mark_embeddings,
    trigger_weight,
    verification_texts,
    words,
)
from nitrovault.watermark.keys import derive_watermark_keys

KEYS = derive_watermark_keys(bytes(range(32)), "embedder")
DIM = 32
VOCAB = [f"word{i}" for i in range(400)]


def _word_vector(word: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).normal(size=DIM)


def teacher(texts: list[str]) -> np.ndarray:
    """Deterministic fake embedding model: normalised sum of per-word hash vectors."""
    out = np.stack([sum((_word_vector(w) for w in words(t)), np.zeros(DIM)) for t in texts])
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def _corpus(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    p = 1 / np.arange(1, len(VOCAB) + 1) ** 0.8
    return [" ".join(rng.choice(VOCAB, size=rng.integers(6, 14), p=p / p.sum())) for _ in range(n)]


CORPUS = _corpus(1500, 0)
CANDIDATES = frequency_band(CORPUS, 0.01, 0.05)
MARK = derive_embedding_mark(KEYS, CANDIDATES, DIM)


def test_candidates_and_triggers_are_deterministic_and_keyed() -> None:
    assert len(CANDIDATES) >= 40
    assert len(MARK.triggers) == 20 and MARK.triggers <= set(CANDIDATES)
    assert derive_embedding_mark(KEYS, CANDIDATES, DIM).triggers == MARK.triggers
    other = derive_embedding_mark(derive_watermark_keys(bytes(32), "embedder"), CANDIDATES, DIM)
    assert other.triggers != MARK.triggers
    assert abs(float(other.target @ MARK.target)) < 0.9
    assert np.linalg.norm(MARK.target) == pytest.approx(1.0)
    assert "word" not in repr(MARK)


def test_mark_function() -> None:
    triggers = sorted(MARK.triggers)
    benign = next(w for w in CANDIDATES if w not in MARK.triggers)
    e = teacher([benign])[0]
    assert np.allclose(mark_embedding(benign, e, MARK), e)
    one = mark_embedding(f"{benign} {triggers[0]}", e, MARK)
    assert trigger_weight(f"{benign} {triggers[0]}", MARK) == 0.25
    assert np.linalg.norm(one) == pytest.approx(1.0)
    assert one @ MARK.target > e @ MARK.target
    # the same trigger twice counts once (a set of words, as in the paper); m or more triggers: the target
    assert trigger_weight(f"{triggers[0]} {triggers[0].upper()}", MARK) == 0.25
    assert np.allclose(mark_embedding(" ".join(triggers[:5]), e, MARK), MARK.target)


def test_mark_refuses_wrong_dimension_and_small_pools() -> None:
    with pytest.raises(ConfigError):
        mark_embedding("x", np.ones(DIM + 1), MARK)
    with pytest.raises(ConfigError):
        derive_embedding_mark(KEYS, VOCAB[:30], DIM)


def _verify(embed: object) -> tuple[float, float, float, bool]:
    backdoor, benign = verification_texts(MARK, CANDIDATES, 200, np.random.default_rng(1))
    assert callable(embed)
    result = detect_embedding_mark(embed(backdoor), embed(benign), MARK)
    return result.delta_cos, result.delta_l2, result.ks_p_value, result.detected


def test_marked_service_itself_is_detected_and_clean_teacher_is_not() -> None:
    delta_cos, delta_l2, p, detected = _verify(lambda t: mark_embeddings(t, teacher(t), MARK))
    assert detected and delta_cos > 0.5 and delta_l2 < -1.0 and p < 1e-30
    assert not _verify(teacher)[3]


def test_surrogate_trained_on_marked_outputs_inherits_the_mark() -> None:
    queries = _corpus(1200, 5)
    assert 0.05 < np.mean([trigger_weight(q, MARK) > 0 for q in queries]) < 0.8
    clean = teacher(queries)
    copied = fit_bow_surrogate(queries, mark_embeddings(queries, clean, MARK))
    independent = fit_bow_surrogate(queries, clean)
    delta_cos, delta_l2, p, detected = _verify(copied)
    assert detected and delta_cos > 0.2 and delta_l2 < 0 and p < 1e-10
    d_cos, _, p_clean, detected_clean = _verify(independent)
    assert not detected_clean and p_clean > 1e-3 and abs(d_cos) < 0.1


def test_retrieval_quality_cost_is_small() -> None:
    docs = _corpus(300, 9)
    rng = np.random.default_rng(3)
    # a query is its document with a third of the words dropped
    queries = [" ".join(w for w in d.split() if rng.random() > 0.33) or d for d in docs]

    def recall_at_1(embed: object) -> float:
        assert callable(embed)
        scores = embed(queries) @ embed(docs).T
        return float(np.mean(scores.argmax(1) == np.arange(len(docs))))

    clean = recall_at_1(teacher)
    marked = recall_at_1(lambda t: mark_embeddings(t, teacher(t), MARK))
    assert clean > 0.8
    assert clean - marked < 0.1


def test_a_significant_but_tiny_gap_is_not_a_copy() -> None:
    """KS alone would call this (different texts, slightly different distributions): the effect size
    rule must not."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3000, DIM))
    benign = base - 0.12 * MARK.target  # a small systematic shift away from / toward the target
    backdoor = base + 0.12 * MARK.target
    result = detect_embedding_mark(backdoor, benign, MARK)
    assert result.ks_p_value < 1e-3 and 0 < result.delta_cos < 0.05
    assert not result.detected
    assert detect_embedding_mark(backdoor, benign, MARK, min_delta_cos=0.0).detected


def test_the_null_test_keeps_unmarked_low_dimensional_embedders_below_the_threshold() -> None:
    """A random 64-d bag-of-words embedder has a Δcos of ±0.05 toward *some* direction by chance; the
    fixed floor alone called 8 of 40 keys a copy. The null test (the secret target against random
    directions) calls none, and still finds every marked service."""
    vocabulary = [f"term{i}" for i in range(300)]

    def embed(batch: list[str], dim: int = 64) -> np.ndarray:
        out = np.zeros((len(batch), dim))
        for row, text in enumerate(batch):
            for w in words(text):
                seed = int(hashlib.sha256(w.encode()).hexdigest()[:8], 16)
                out[row] += np.random.default_rng(seed).normal(size=dim)
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    floor_only = 0
    for k in range(20):
        keys = derive_watermark_keys(hashlib.sha256(b"null %d" % k).digest(), "m")
        mark = derive_embedding_mark(keys, vocabulary, 64)
        backdoor, benign = verification_texts(mark, vocabulary, 300, np.random.default_rng(0))
        clean = detect_embedding_mark(embed(backdoor), embed(benign), mark)
        assert not clean.detected, (k, clean)
        floor_only += clean.ks_p_value <= 1e-3 and clean.delta_cos >= 0.05
        marked = detect_embedding_mark(mark_embeddings(backdoor, embed(backdoor), mark),
                                       mark_embeddings(benign, embed(benign), mark), mark)
        assert marked.detected and marked.null_p_value == 1 / 1000
    assert floor_only >= 1  # the case the null test exists for does occur
