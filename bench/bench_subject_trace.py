"""Per-subject output fingerprints, measured: how many outputs name the subject behind a leak among 100
listed subjects at a family-wise false-naming rate of 1e-6 (Bonferroni-corrected), and what the
per-subject mark costs in quality.

Lines (one JSON object each; ``value`` is the headline):

* ``subject_trace_embeddings``: MiniLM through the enclave's handler, the subject's answers marked with
  :func:`~nitrovault.watermark.embedding.subject_mark`; a leak = ``n`` random natural queries (stdlib
  docstring sentences, ~7 % of which carry a trigger) and their answers. ``value``: the smallest ``n``
  at which at least 95 % of :data:`DRAWS` random leaks name the right subject; per ``n``: the share named,
  the median corrected ``log10 p``, the triggered rows; ``false_namings`` over leaks of unmarked outputs
  and of an unlisted subject's outputs (50, 200 and 500 queries, 100 subjects each).
* ``subject_trace_embedding_surrogate``: a bag-of-words ridge copy (``fit_bow_surrogate``) trained on
  1500 of the subject's answers. ``value``: backdoor verification texts (m trigger words each) the owner
  needs to send the copy to name the subject (95 % of draws); also the copy queried with natural texts.
* ``subject_trace_embedding_quality``: retrieval MRR per-subject marked / clean (``value`` and ``ratio``),
  recall@1/@10 (the retrieval pairs of ``bench_watermark``).
* ``subject_trace_text``: the word-bigram LM of ``bench_watermark`` (vocab 2000), gamma 0.25, delta 2,
  per-subject green list. ``value``: the smallest number of generated tokens at which 95 % of samples
  name the subject; per length the share named and median corrected ``log10 p``; ``false_namings`` over
  unmarked and unlisted-subject samples.
* ``subject_trace_text_quality``: perplexity under the LM of the per-subject marked / unmarked next-token
  distribution (``value`` and ``ratio``), exact over the next token, at the same contexts (those of
  marked and unmarked generations); ``ratio_model_level``: the model-level list's, at those contexts.

Everything is offline and seeded; ~50 s on 2 idle cores.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from bench.bench_watermark import (
    KEYS,
    _docstrings,
    _ranked,
    _retrieval_pairs,
    _sentences,
    bigram_lm,
)
from enclave_app.models.green_list import GreenListProcessor, subject_scope
from nitrovault.local.models import demo_handler
from nitrovault.watermark.embedding import (
    EmbeddingMark,
    derive_embedding_mark,
    fit_bow_surrogate,
    frequency_band,
    mark_embeddings,
    subject_mark,
    trace_embedding_subjects,
    trigger_weight,
    verification_texts,
)
from nitrovault.watermark.keys import WatermarkKeys
from nitrovault.watermark.subjects import DEFAULT_TRACE_THRESHOLD, name_subject
from nitrovault.watermark.text import GreenList, binom_log10_sf

SUBJECTS = [f"user-{i:03d}" for i in range(100)]
LEAKER = SUBJECTS[37]
UNLISTED = "not-on-the-list"
#: random leaks per size; the headline is the smallest size that at least NAMED_SHARE of them name
DRAWS = 100
NAMED_SHARE = 0.95
EMBEDDING_SIZES = (5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500)
BACKDOOR_SIZES = (1, 2, 3, 5, 10, 20)
TEXT_LENGTHS = (10, 15, 20, 25, 30, 40, 50, 75, 100, 150, 200)
TEXT_SAMPLES = 40
#: samples per side of the perplexity ratio (generation only: cheap)
PERPLEXITY_SAMPLES = 100


def _needed(sizes: Sequence[int], shares: Sequence[float]) -> int | None:
    return next((n for n, share in zip(sizes, shares, strict=True) if share >= NAMED_SHARE), None)


def _leaks(texts: Sequence[str], outputs: np.ndarray, mark: EmbeddingMark, sizes: Sequence[int],
           rng: np.random.Generator, draws: int = DRAWS) -> tuple[list[float], list[float], list[float], int]:
    """Per size: share of random leaks naming :data:`LEAKER`, median corrected log10 p, median triggered
    rows; and the number of leaks naming anyone else."""
    shares, medians, rows = [], [], []
    wrong = 0
    for n in sizes:
        named, logs, used = 0, [], []
        for _ in range(draws):
            pick = rng.choice(len(texts), size=min(n, len(texts)), replace=False)
            traced = trace_embedding_subjects([texts[i] for i in pick], outputs[pick], mark, KEYS, SUBJECTS)
            named += traced.subject == LEAKER
            wrong += traced.subject not in (None, LEAKER)
            logs.append(traced.log10_p_value)
            used.append(traced.rows)
        shares.append(round(named / draws, 3))
        medians.append(round(float(np.median(logs)), 2) + 0.0)  # + 0.0: no "-0.0"
        rows.append(float(np.median(used)))
    return shares, medians, rows, wrong


def _embedding_lines(docs: list[str], keys: WatermarkKeys) -> Iterator[dict[str, Any]]:
    started = time.perf_counter()
    handler = demo_handler()

    def teacher(texts: Sequence[str]) -> np.ndarray:
        return np.concatenate([handler.embed(list(texts[i:i + 64]), normalize=True)
                               for i in range(0, len(texts), 64)])

    sentences = _sentences(docs)
    rng = np.random.default_rng(0)
    corpus = [sentences[i] for i in rng.permutation(len(sentences))[:2000]]  # bench_watermark's queries
    candidates = frequency_band(sentences, 0.002, 0.01)
    clean = teacher(corpus)
    mark = derive_embedding_mark(keys, candidates, clean.shape[1])
    own = subject_mark(mark, keys, LEAKER)
    served = mark_embeddings(corpus, clean, own)
    triggered = float(np.mean([trigger_weight(t, mark) > 0 for t in corpus]))

    draws = np.random.default_rng(1)
    shares, medians, rows, wrong = _leaks(corpus, served, mark, EMBEDDING_SIZES, draws)
    null_sizes = (50, 200, 500)
    false_named = 0
    for outputs in (clean, mark_embeddings(corpus, clean, subject_mark(mark, keys, UNLISTED))):
        null_shares, _, _, null_wrong = _leaks(corpus, outputs, mark, null_sizes, draws)
        false_named += null_wrong + sum(round(s * DRAWS) for s in null_shares)
    yield {"name": "subject_trace_embeddings", "value": _needed(EMBEDDING_SIZES, shares),
           "unit": "natural queries", "subjects": len(SUBJECTS), "threshold": DEFAULT_TRACE_THRESHOLD,
           "teacher": "all-MiniLM-L6-v2 (enclave handler)", "queries": len(corpus),
           "fraction_queries_triggered": round(triggered, 4), "draws": DRAWS, "sizes": list(EMBEDDING_SIZES),
           "share_named": shares, "median_corrected_log10_p": medians, "median_triggered_rows": rows,
           "wrong_subject_named": wrong, "null_leaks": 2 * DRAWS * len(null_sizes),
           "null_tests": 2 * DRAWS * len(null_sizes) * len(SUBJECTS), "false_namings": false_named,
           "ratio": None, "seconds": round(time.perf_counter() - started, 1)}

    started = time.perf_counter()
    train, held = corpus[:1500], corpus[1500:]
    copy = fit_bow_surrogate(train, served[:1500])
    backdoor, _ = verification_texts(mark, candidates, 300, np.random.default_rng(2))
    b_shares, b_medians, _, b_wrong = _leaks(backdoor, copy(backdoor), mark, BACKDOOR_SIZES, draws)
    natural = trace_embedding_subjects(held, copy(held), mark, KEYS, SUBJECTS)
    independent = fit_bow_surrogate(train, clean[:1500])
    clean_copy = trace_embedding_subjects(backdoor, independent(backdoor), mark, KEYS, SUBJECTS)
    yield {"name": "subject_trace_embedding_surrogate", "value": _needed(BACKDOOR_SIZES, b_shares),
           "unit": "backdoor texts sent to the copy", "surrogate": "bag-of-words ridge, 1500 answers",
           "sizes": list(BACKDOOR_SIZES), "share_named": b_shares, "median_corrected_log10_p": b_medians,
           "wrong_subject_named": b_wrong, "natural_held_out_queries": len(held),
           "natural_named": natural.subject == LEAKER,
           "natural_corrected_log10_p": round(natural.log10_p_value, 2),
           "unmarked_copy_named": clean_copy.subject, "unmarked_copy_corrected_p": clean_copy.p_value,
           "ratio": None, "seconds": round(time.perf_counter() - started, 1)}

    queries, targets = _retrieval_pairs(docs, rng)
    q, d = teacher(queries), teacher(targets)
    clean_r = _ranked(q, d)
    marked_r = _ranked(mark_embeddings(queries, q, own), mark_embeddings(targets, d, own))
    ratio = round(marked_r["mrr"] / clean_r["mrr"], 4)
    yield {"name": "subject_trace_embedding_quality", "value": ratio, "ratio": ratio,
           "retrieval_pairs": len(queries), "retrieval_clean": clean_r,
           "retrieval_marked_per_subject": marked_r}


def _prefix_p(tokens: Sequence[int], green: GreenList, lengths: Sequence[int]) -> list[float]:
    """The exact one-sided binomial ``log10 p`` of :func:`~nitrovault.watermark.text.trace_text_subjects`
    for each prefix length (repeated pairs scored once), in one pass over the tokens."""
    seen: set[tuple[int, int]] = set()
    scored = hits = 0
    out: dict[int, float] = {}
    wanted = set(lengths)
    for i, (previous, token) in enumerate(itertools.pairwise(tokens), start=2):
        if (previous, token) not in seen:
            seen.add((previous, token))
            scored += 1
            hits += green.is_green(previous, token)
        if i in wanted:
            out[i] = binom_log10_sf(hits, scored, green.green_count / green.vocab_size)
    return [out[n] for n in lengths]


def _text_lines(docs: list[str], keys: WatermarkKeys) -> Iterator[dict[str, Any]]:
    started = time.perf_counter()
    lm = bigram_lm(docs)
    v, gamma, delta, length = lm.vocab_size, 0.25, 2.0, max(TEXT_LENGTHS)
    processor = GreenListProcessor(keys, gamma, delta, vocab_size=v, per_subject=True)

    def per_subject(subject: str, n: int, seed: int) -> list[list[int]]:
        with subject_scope(subject):
            return lm.generate(processor, n, length, seed)

    marked = per_subject(LEAKER, TEXT_SAMPLES, 1)
    nulls = [*lm.generate(None, TEXT_SAMPLES // 2, length, 2), *per_subject(UNLISTED, TEXT_SAMPLES // 2, 3)]
    samples = [*marked, *nulls]
    # log10 p of every sample, listed subject and length: one subject's list at a time (bounded memory)
    logs = np.empty((len(samples), len(SUBJECTS), len(TEXT_LENGTHS)))
    for j, subject in enumerate(SUBJECTS):
        green = GreenList(keys, vocab_size=v, gamma=gamma, subject=subject, cache_size=v)
        for i, sample in enumerate(samples):
            logs[i, j] = _prefix_p(sample, green, TEXT_LENGTHS)
    named = [[name_subject(dict(zip(SUBJECTS, logs[i, :, k], strict=True)), rows=n).subject
              for k, n in enumerate(TEXT_LENGTHS)] for i in range(len(samples))]
    shares = [round(float(np.mean([row[k] == LEAKER for row in named[:len(marked)]])), 3)
              for k in range(len(TEXT_LENGTHS))]
    own = logs[:len(marked), SUBJECTS.index(LEAKER)] + np.log10(len(SUBJECTS))  # Bonferroni-corrected
    medians = [round(float(np.median(np.minimum(own[:, k], 0.0))), 2) + 0.0 for k in range(len(TEXT_LENGTHS))]
    false_named = sum(s is not None for row in named[len(marked):] for s in row)
    yield {"name": "subject_trace_text", "value": _needed(TEXT_LENGTHS, shares), "unit": "generated tokens",
           "subjects": len(SUBJECTS), "threshold": DEFAULT_TRACE_THRESHOLD, "gamma": gamma, "delta": delta,
           "lm": f"word bigram (bench_watermark), vocab {v}, entropy {lm.entropy:.2f} nats",
           "samples": TEXT_SAMPLES, "lengths": list(TEXT_LENGTHS), "share_named": shares,
           "median_corrected_log10_p": medians, "null_samples": len(nulls),
           "null_tests": len(nulls) * len(SUBJECTS) * len(TEXT_LENGTHS), "false_namings": false_named,
           "ratio": None, "seconds": round(time.perf_counter() - started, 1)}

    model_level = GreenListProcessor(keys, gamma, delta, vocab_size=v)

    def cross_entropies(generated: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per position of ``generated``: the LM's cross-entropy of the per-subject marked next-token
        distribution, of the model-level marked one and of the unmarked one (its entropy), all exact over
        the next token."""
        previous = torch.tensor([t for sample in generated for t in sample[:-1]], dtype=torch.int64)
        out: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] = ([], [], [])
        with subject_scope(LEAKER):
            for chunk in torch.split(previous, 4096):
                log_p = lm.logits[chunk]
                for ce, scores in zip(out, (processor(chunk[:, None], log_p),
                                            model_level(chunk[:, None], log_p), log_p), strict=True):
                    ce.append(-(torch.softmax(scores, -1) * log_p).sum(1))
        return torch.cat(out[0]), torch.cat(out[1]), torch.cat(out[2])

    # the same contexts for both (those of marked and of unmarked generations): the ratio is the cost of
    # the mark at equal context, free of the noise of which contexts a sample happens to visit
    generated = [*per_subject(LEAKER, PERPLEXITY_SAMPLES, 4),
                 *lm.generate(None, PERPLEXITY_SAMPLES, length, 5)]
    marked_ppl, model_ppl, clean_ppl = (float(ce.mean().exp()) for ce in cross_entropies(generated))
    ratio = round(marked_ppl / clean_ppl, 4)
    yield {"name": "subject_trace_text_quality", "value": ratio, "ratio": ratio,
           "perplexity_marked_per_subject": round(marked_ppl, 2), "perplexity_unmarked": round(clean_ppl, 2),
           "perplexity_marked_model_level": round(model_ppl, 2),
           "ratio_model_level": round(model_ppl / clean_ppl, 4),
           "positions": sum(len(sample) - 1 for sample in generated),
           "measure": "exp(mean cross-entropy under the LM of the next-token distribution), same contexts"}


def run() -> Iterator[dict[str, Any]]:
    started = time.perf_counter()
    docs = _docstrings()
    yield from _text_lines(docs, KEYS)
    yield from _embedding_lines(docs, KEYS)
    yield {"name": "subject_trace_bench_seconds", "seconds": round(time.perf_counter() - started, 1),
           "ratio": None}
