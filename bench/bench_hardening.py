"""Function-preserving hardening and per-copy fingerprints, measured (``python -m bench.run hardening``;
docs/hardening.md has the tables).

Lines (one JSON object each):

* ``hardening_equivalence``, one per architecture (the trained digits MLP, the packaged MiniLM, the test-size
  tiny GPT-2, a Llama of the same size trained here on the same corpus): ``value`` = ``max_abs_diff``, the
  largest absolute output difference between the model and its hardened copy on held-out inputs (target
  <= 1e-4), both run by the enclave's own handler; ``top1_agreement`` (``top1`` says what top-1 is per
  architecture); ``alignment_before`` / ``alignment_after`` / ``alignment_after_matching``
  (:func:`~nitrovault.owner.harden.alignment_score` of the reference, of the copy as it is, and of the copy
  after :func:`~nitrovault.owner.harden.align`, which anyone holding the base can run); ``transplant``: the
  base's incoming FFN layer (zero-padded to the copy's unit count) put into one FFN layer of the hardened
  copy, of an unhardened copy and of the hardened copy after matching (the layer-merge attack): top-1
  agreement with the reference and task quality; for transformers also the whole FFN block.
* ``hardening_value_mark_cost``: the optional value mark (``Registry.new(..., value_strength=S)``, the one
  part of a copy that is not function preserving), on the digits MLP at strengths :data:`VALUE_STRENGTHS`
  over the 8 copies the sweep leaks: ``value`` = ``top1_agreement``, the mean share of test digits whose
  predicted class is the reference's (and the fewest), ``max_abs_diff`` over the probabilities, the test
  accuracy of the marked copies against the reference's, the relative weight change of the marked
  tensors, and what it buys: per attack of :data:`VALUE_ATTACKS`, the copies named and the true copy's
  worst value-test p-value. On MiniLM at :data:`VALUE_STRENGTH`, one copy: retrieval agreement (``value``),
  the mean and smallest cosine of the embeddings to the reference's, recall@1/@10 and MRR of both and
  ``ratio`` (their MRRs').
* ``fingerprint_identification``: 100 copies registered under one master key; per attack, setting and
  ``value_mark`` (the registry's strength, 0: none), ``value`` = ``accuracy``, the fraction of the leaked
  copies :func:`~nitrovault.owner.fingerprint.identify` names correctly at its default threshold
  (p <= 1e-6); ``worst_true_p`` (the largest corrected p-value of the true copy) and the worst of each of
  its tests' p-values (``worst_true_order_p``, ``worst_true_traps_p``, ``worst_true_values_p``), ``wrong``
  (leaked copies for which another copy was named), the fewest well-matched units ranked alike and traps
  found for the true copy, and the attacked copies' quality (digits test accuracy; for MiniLM the mean
  cosine of the embeddings to the reference's, on one copy per attack) with its cost against the unattacked
  copies of the same registry. The sweep is on the digits MLP (8 leaked copies per attack, every attack
  without and with the value mark at strength 1: fine-tuning, pruning, noise, int8, re-permutation,
  re-hardening, adding and removing units, re-permutation with trap removal, matching with ``align``, and
  matching followed by fine-tuning or noise) and, smaller, on MiniLM (2 leaked copies per attack, no
  fine-tuning, no value mark; then 1 value-marked copy under the two attacks that defeat the other tests).
* ``fingerprint_trap_drift``, per fine-tuning setting, on one digits copy: ``value`` = the smallest cosine
  of a trap's incoming weights after fine-tuning with before (they do move: the zero outgoing weights get a
  gradient as soon as the trap fires), the traps' outgoing norms against the median unit's, and how many
  traps are among the units with the smallest outgoing norms (what a thief who drops those would remove).
* ``fingerprint_false_identifications``: unmarked digits MLPs (8 trained from other seeds, and the
  unhardened reference) identified against registries of 10 copies under 112 master keys without and 112
  with the value mark (strength 1): ``value`` = the identifications at p <= 1e-6; the empirical rates of
  corrected p-values, of per-copy p-values and of each test's p-values at 0.05.
* ``hardening_bench_seconds``: the whole run (torch on one thread, see :data:`THREADS`).

Data, all offline: scikit-learn's digits; sentences from the docstrings of Python's own standard library
(MiniLM); README.md and docs/*.md of this checkout (the tiny LMs' corpus, held-out tail for evaluation).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.numpy import load_file
from torch import nn

from bench.bench_watermark import _SENTENCE, _docstrings, _ranked
from enclave_app.models import load_handler
from enclave_app.models.generic import MLPClassifier
from nitrovault.local.digits import DIGITS_HANDLER, digits_data, train_classifier
from nitrovault.local.models import demo_model_source
from nitrovault.local.tiny_lm import (
    TEST,
    encode_corpus,
    ensure_tiny_lm,
    project_corpus,
    repo_root,
    sealing_metadata,
    split_held_out,
)
from nitrovault.owner.fingerprint import (
    VALUE_BITS,
    Registry,
    copy_secret,
    harden_copy,
    identify,
    value_keys,
    value_layers,
)
from nitrovault.owner.harden import (
    CONFIG_KEY,
    HANDLER_KEY,
    Model,
    UnitGroup,
    align,
    alignment_score,
    blocks,
    harden,
    plan,
    reorder,
    unit_groups,
)
from nitrovault.watermark.weights import EmbedReport, embed_weight_mark

Tensors = dict[str, np.ndarray]
#: bench fixtures, not secrets
SECRET = hashlib.sha256(b"nitrovault bench hardening secret").digest()
MASTER = hashlib.sha256(b"nitrovault bench fingerprint master key").digest()
THIEF = hashlib.sha256(b"nitrovault bench thief's own hardening secret").digest()
COPIES = 100
LEAKED = 8
MINILM_LEAKED = 2
CALIBRATION_SEEDS = 8
CALIBRATION_KEYS = 112
CALIBRATION_COPIES = 10
PAIRS = 100
LM_WINDOW = 64
#: torch threads for the whole bench: these models' small matrices gain little from a second thread and
#: lose several-fold when another process holds the other core (measured: the tiny LM's build 5 s on one
#: thread, 35 s on two beside another bench)
THREADS = 1
#: the value mark's strengths whose function cost is measured on the digits MLP, and the one the sweeps use
VALUE_STRENGTHS = (0.5, 1.0, 2.0)
VALUE_STRENGTH = 1.0
#: the MiniLM copies leaked per attack in the (slower: 100 value tests per identification) value-marked rows
MINILM_VALUE_LEAKED = 1
REPERMUTED_WITHOUT_TRAPS = "every group; zero-outgoing units dropped"


# -- models and how each is evaluated -------------------------------------------------------------------


@dataclass(frozen=True)
class Outputs:
    #: what ``max_abs_diff`` is taken over (logits, raw embeddings, next-token logits)
    primary: np.ndarray
    #: a second view (probabilities, normalised embeddings), or None
    secondary: np.ndarray | None
    top1: np.ndarray
    #: task quality: digits accuracy, retrieval recall@1, next-token accuracy
    quality: float


@dataclass(frozen=True)
class Subject:
    label: str
    description: str
    inputs: str
    top1: str
    quality: str
    reference: Model
    evaluate: Callable[[Model], Outputs]


def _torch(tensors: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}


def _numpy(tensors: Mapping[str, torch.Tensor]) -> Tensors:
    return {k: v.detach().numpy().copy() for k, v in tensors.items()}


def _handler(model: Model) -> Any:
    return load_handler(model.architecture, _torch(model.tensors), model.file_metadata())


def _config_path(config: dict[str, Any], path: Sequence[str | int], value: int) -> None:
    target: Any = config
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


def with_tensors(model: Model, tensors: Tensors) -> Model:
    """``model`` with ``tensors`` and its config's unit counts read off them (an attack may add or remove
    units; a config count shared by every layer takes the first layer's)."""
    config = json.loads(json.dumps(model.config))
    seen: set[tuple[str | int, ...]] = set()
    for group in model.groups():
        if group.config_path is None or group.config_path in seen:
            continue
        seen.add(group.config_path)
        first = group.parts[0]
        _config_path(config, group.config_path, tensors[first.tensor].shape[first.axis] // first.width)
    return Model(tensors, model.architecture, config, model.metadata)


def _digits_subject() -> tuple[Subject, Callable[[int], Model]]:
    x_train, y_train, x_test, y_test = digits_data()
    x = torch.from_numpy(x_test)

    def model_of(net: MLPClassifier) -> Model:
        linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
        config = {"in_features": linears[0].in_features, "hidden": [m.out_features for m in linears[:-1]],
                  "classes": linears[-1].out_features}
        return Model.from_file_parts(_numpy(net.state_dict()), {HANDLER_KEY: DIGITS_HANDLER,
                                                                 CONFIG_KEY: json.dumps(config)})

    def evaluate(model: Model) -> Outputs:
        out = _handler(model).infer({"x": x})
        logits, probabilities = out["logits"].numpy(), out["probabilities"].numpy()
        top1 = logits.argmax(1)
        return Outputs(logits, probabilities, top1, float(np.mean(top1 == y_test)))

    def trained(seed: int) -> Model:
        return model_of(train_classifier(x_train, y_train, seed=seed))

    subject = Subject("mlp-classifier", "digits MLP 64-64-10 (nitrovault.local.digits, seed 0)",
                      f"{len(x_test)} held-out digits (test split)", "predicted class",
                      "test accuracy", trained(0), evaluate)
    return subject, trained


def _retrieval_texts() -> tuple[list[str], list[str]]:
    """Query = a stdlib docstring's first sentence, document = its second one (``PAIRS`` pairs)."""
    pairs = []
    for doc in _docstrings():
        sentences = _SENTENCE.split(doc)
        if len(sentences) >= 2 and all(4 <= len(s.split()) <= 40 for s in sentences[:2]):
            pairs.append((sentences[0], sentences[1]))
    rng = np.random.default_rng(0)
    chosen = [pairs[i] for i in rng.permutation(len(pairs))[:PAIRS]]
    return [q for q, _ in chosen], [d for _, d in chosen]


def _minilm_subject() -> Subject:
    source, metadata = demo_model_source()
    reference = Model.from_file_parts(load_file(source), metadata)
    queries, documents = _retrieval_texts()
    texts = queries + documents

    def evaluate(model: Model) -> Outputs:
        raw = _handler(model).embed(texts, normalize=False)
        unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
        top1 = (unit[:PAIRS] @ unit[PAIRS:].T).argmax(1)
        return Outputs(raw, unit, top1, float(np.mean(top1 == np.arange(PAIRS))))

    return Subject("sentence-embedding", "all-MiniLM-L6-v2 (the packaged demo model)",
                   f"{len(texts)} stdlib docstring sentences ({PAIRS} query / document pairs)",
                   "retrieved document (nearest by cosine among the documents) for each query",
                   "retrieval recall@1 (query = first sentence, document = second)", reference, evaluate)


def _lm_windows(ids: Sequence[int]) -> torch.Tensor:
    rows = [ids[i:i + LM_WINDOW + 1] for i in range(0, len(ids) - LM_WINDOW - 1, LM_WINDOW)]
    return torch.tensor(rows)


def _lm_evaluator(windows: torch.Tensor) -> Callable[[Model], Outputs]:
    def evaluate(model: Model) -> Outputs:
        with torch.inference_mode():
            logits = _handler(model).module(windows[:, :-1]).numpy()
        top1 = logits.argmax(-1)
        return Outputs(logits, None, top1.reshape(-1), float(np.mean(top1 == windows[:, 1:].numpy())))

    return evaluate


def _train_llama(metadata: Mapping[str, str], train: Sequence[int]) -> Model:
    """A Llama of the tiny LM's test size (GQA: 4 query heads on 2 key/value heads), AdamW on the tiny LM's
    training tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=TEST.vocab_size, hidden_size=TEST.n_embd,
                         intermediate_size=2 * TEST.n_embd, num_hidden_layers=TEST.n_layer,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=TEST.n_positions, bos_token_id=0, eos_token_id=0)
    ids = torch.tensor(list(train))
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        opt = torch.optim.AdamW(model.parameters(), lr=TEST.lr)
        gen = torch.Generator().manual_seed(0)
        offsets = torch.arange(TEST.seq_len + 1)
        model.train()
        for _ in range(TEST.steps):
            starts = torch.randint(0, len(ids) - TEST.seq_len - 1, (TEST.batch, 1), generator=gen)
            window = ids[starts + offsets]
            logits = model(input_ids=window[:, :-1]).logits
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                               window[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
    model.train(False)
    return Model.from_file_parts(_numpy(model.state_dict()), {
        HANDLER_KEY: "causal-lm:llama", CONFIG_KEY: model.config.to_json_string(),
        "nitrovault.tokenizer": metadata["nitrovault.tokenizer"]})


def _lm_subjects(folder: Path) -> list[Subject]:
    from tokenizers import Tokenizer

    metadata = sealing_metadata(folder)
    train, held = split_held_out(encode_corpus(Tokenizer.from_str(metadata["nitrovault.tokenizer"]),
                                               project_corpus(repo_root())))
    windows = _lm_windows(held)
    inputs = (f"{windows.shape[0]} held-out windows of {LM_WINDOW} tokens "
              f"({windows.shape[0] * LM_WINDOW} positions)")
    gpt2 = Model.from_file_parts(load_file(folder / "model.safetensors"), metadata)
    size = f"{TEST.n_layer} layers, width {TEST.n_embd}, vocab {TEST.vocab_size}"
    return [
        Subject("causal-lm:gpt2", f"tiny GPT-2, TEST settings ({size}, {TEST.n_head} heads)", inputs,
                "argmax next-token logit at every position", "next-token accuracy", gpt2,
                _lm_evaluator(windows)),
        Subject("causal-lm:llama", f"Llama trained here like the tiny GPT-2 ({size}, 4 query heads on 2 "
                f"key/value heads, SwiGLU {2 * TEST.n_embd})", inputs,
                "argmax next-token logit at every position", "next-token accuracy",
                _train_llama(metadata, train), _lm_evaluator(windows)),
    ]


# -- the equivalence, alignment and transplant figures ---------------------------------------------------


def _ffn_groups(model: Model) -> list[UnitGroup]:
    return [g for g in model.groups() if g.takes_traps]


def _padded(base: Model, group: UnitGroup, units: int) -> Tensors:
    """The base's tensors with ``group`` zero-padded to ``units`` units (zero units compute nothing)."""
    tensors = dict(base.tensors)
    reorder(tensors, group, group.units, np.concatenate([np.arange(group.units), -np.ones(units - group.units,
                                                                                             int)]))
    return tensors


def transplant(target: Model, base: Model, layer: int, *, block: bool) -> Model:
    """``target`` with FFN layer ``layer``'s incoming layer (``block``: and its outgoing one) replaced by the
    base's, position by position (the base's zero-padded to the target's unit count)."""
    group = _ffn_groups(base)[layer]
    first = group.parts[0]
    units = target.tensors[first.tensor].shape[first.axis]
    padded = _padded(base, group, units)
    tensors = dict(target.tensors)
    for part in group.parts:
        if part.role != "out" or block:
            tensors[part.tensor] = padded[part.tensor]
    return with_tensors(target, tensors)


def _agreement(a: Outputs, b: Outputs) -> float:
    return float(np.mean(a.top1 == b.top1))


def _equivalence(subject: Subject) -> dict[str, Any]:
    started = time.perf_counter()
    reference = subject.reference
    hardened, report = harden(reference, SECRET)
    base_out, hard_out = subject.evaluate(reference), subject.evaluate(hardened)
    diff = float(np.max(np.abs(base_out.primary - hard_out.primary)))
    secondary = None
    if base_out.secondary is not None and hard_out.secondary is not None:
        secondary = float(np.max(np.abs(base_out.secondary - hard_out.secondary)))
    aligned, _ = align(hardened.tensors, reference)
    aligned_model = Model(aligned, reference.architecture, reference.config, reference.metadata)
    layer = len(_ffn_groups(reference)) // 2

    def transplanted(target: Model, *, block: bool = False) -> dict[str, float]:
        out = subject.evaluate(transplant(target, reference, layer, block=block))
        figures = {"top1_agreement": round(_agreement(base_out, out), 4), "quality": round(out.quality, 4)}
        if reference.architecture == "sentence-embedding" and out.secondary is not None:
            assert base_out.secondary is not None
            cosine = np.sum(out.secondary * base_out.secondary, axis=1)
            figures["mean_cosine_to_reference"] = round(float(np.mean(cosine)), 4)
        return figures

    moves: dict[str, Any] = {
        "layer": f"{_ffn_groups(reference)[layer].name} (of {len(_ffn_groups(reference))})",
        "what": "the base's incoming FFN layer, position by position (zero-padded to the copy's units)",
        "hardened": transplanted(hardened), "unhardened": transplanted(reference),
        "hardened_after_matching": transplanted(aligned_model),
    }
    moves["top1_agreement_drop"] = round(moves["unhardened"]["top1_agreement"]
                                         - moves["hardened"]["top1_agreement"], 4)
    moves["quality_drop"] = round(moves["unhardened"]["quality"] - moves["hardened"]["quality"], 4)
    if reference.architecture != DIGITS_HANDLER:
        moves["whole_block_hardened"] = transplanted(hardened, block=True)
    return {
        "name": "hardening_equivalence", "architecture": subject.label, "model": subject.description,
        "inputs": subject.inputs, "value": diff, "target": 1e-4, "max_abs_diff": diff,
        "max_abs_diff_secondary": secondary,
        "output_scale": round(float(np.max(np.abs(base_out.primary))), 4),
        "top1": subject.top1, "top1_agreement": round(_agreement(base_out, hard_out), 4),
        "quality": subject.quality, "quality_reference": round(base_out.quality, 4),
        "quality_hardened": round(hard_out.quality, 4),
        "alignment_before": round(alignment_score(reference.tensors, reference), 4),
        "alignment_after": round(alignment_score(hardened.tensors, reference), 4),
        "alignment_after_matching": round(alignment_score(aligned, reference), 4),
        "transplant": moves, **report.as_dict(), "seconds": round(time.perf_counter() - started, 1),
    }


# -- attacks on a leaked copy -----------------------------------------------------------------------------

Attack = Callable[[Model, np.random.Generator], Tensors]


def _floating(t: np.ndarray) -> bool:
    return bool(np.issubdtype(t.dtype, np.floating))


def _rms(t: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(t, dtype=np.float64)))) if t.size else 0.0


def pruned(fraction: float) -> Attack:
    """Magnitude pruning: the ``fraction`` smallest entries of every 2-D floating tensor set to zero."""
    def attack(copy: Model, rng: np.random.Generator) -> Tensors:
        out = dict(copy.tensors)
        for k, v in copy.tensors.items():
            if _floating(v) and v.ndim == 2:
                out[k] = np.where(np.abs(v) < np.quantile(np.abs(v), fraction), 0, v).astype(v.dtype)
        return out
    return attack


def noisy(sigma: float) -> Attack:
    """Gaussian noise of ``sigma`` times each floating tensor's RMS added to it."""
    def attack(copy: Model, rng: np.random.Generator) -> Tensors:
        return {k: (v + rng.normal(0, sigma * _rms(v), v.shape)).astype(v.dtype) if _floating(v) else v
                for k, v in copy.tensors.items()}
    return attack


def int8(copy: Model, rng: np.random.Generator) -> Tensors:
    """Per-tensor symmetric int8 quantisation (and back) of every floating tensor."""
    out = dict(copy.tensors)
    for k, v in copy.tensors.items():
        if _floating(v) and v.size and np.abs(v).max() > 0:
            scale = np.abs(v).max() / 127
            out[k] = (np.round(v / scale) * scale).astype(v.dtype)
    return out


def repermuted(copy: Model, rng: np.random.Generator) -> Tensors:
    """A random permutation of every unit group (FFN units and heads), via :func:`harden.reorder`."""
    out = dict(copy.tensors)
    for group in copy.groups():
        reorder(out, group, group.units, rng.permutation(group.units))
    return out


def _zero_outgoing(tensors: Tensors, group: UnitGroup, units: int) -> np.ndarray:
    """Which units have all-zero outgoing weights (a trap, as a thief who knows the scheme spots it)."""
    zero = np.ones(units, dtype=bool)
    for part in group.parts:
        if part.role == "out":
            zero &= ~np.any(blocks(tensors[part.tensor], part, units).reshape(units, -1) != 0, axis=1)
    return zero


def _trap_groups(copy: Model, tensors: Tensors) -> list[UnitGroup]:
    """The copy's trap-capable groups, described with ``tensors``' unit counts."""
    groups = unit_groups(copy.architecture, with_tensors(copy, tensors).config, tensors)
    return [g for g in groups if g.takes_traps]


def traps_removed(copy: Model, rng: np.random.Generator) -> Tensors:
    """Every unit with all-zero outgoing weights dropped (the units the copy's own traps are)."""
    out = dict(copy.tensors)
    for group in _trap_groups(copy, out):
        keep = np.flatnonzero(~_zero_outgoing(out, group, group.units))
        reorder(out, group, group.units, keep)
    return out


def repermuted_without_traps(copy: Model, rng: np.random.Generator) -> Tensors:
    return repermuted(with_tensors(copy, traps_removed(copy, rng)), rng)


def units_removed(count: int) -> Attack:
    """``count`` random units (real or trap) of every FFN group dropped."""
    def attack(copy: Model, rng: np.random.Generator) -> Tensors:
        out = dict(copy.tensors)
        for group in _trap_groups(copy, out):
            keep = np.sort(rng.choice(group.units, group.units - count, replace=False))
            reorder(out, group, group.units, keep)
        return out
    return attack


def units_added(count: int) -> Attack:
    """``count`` dead units per FFN group (random incoming weights at the part's RMS, zero outgoing ones)
    inserted at random positions (the existing units keep their order)."""
    def attack(copy: Model, rng: np.random.Generator) -> Tensors:
        out = dict(copy.tensors)
        for group in _trap_groups(copy, out):
            total = group.units + count
            order = -np.ones(total, dtype=np.int64)
            keep = np.sort(rng.choice(total, group.units, replace=False))
            order[keep] = np.arange(group.units)
            reorder(out, group, group.units, order)
            new = order < 0
            for part in group.parts:
                if part.role == "out":
                    continue
                moved = np.moveaxis(out[part.tensor], part.axis, 0).copy()
                assert part.width == 1 and part.offset == 0
                rows = moved[~new]
                moved[new] = rng.normal(0, _rms(rows), (int(new.sum()), *moved.shape[1:]))
                out[part.tensor] = np.moveaxis(moved, 0, part.axis)
        return out
    return attack


def rehardened(copy: Model, rng: np.random.Generator) -> Tensors:
    """The thief runs the same hardening under a secret of its own (re-permute, rescale, add 4 traps)."""
    return harden(copy, THIEF)[0].tensors


def matched(base: Model) -> Attack:
    """The thief runs :func:`harden.align` against ``base``: units matched back to the base's order, the
    rescaling undone, the units left over (the traps, when the base is close) dropped."""
    def attack(copy: Model, rng: np.random.Generator) -> Tensors:
        return align(copy.tensors, base)[0]
    return attack


# -- identification -----------------------------------------------------------------------------------------


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """Torch on ``n`` threads for a while, then as before."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _registry(master: bytes, reference: Model, copies: int, value_strength: float = 0.0) -> Registry:
    registry = Registry.new(master, reference, value_strength=value_strength)
    for i in range(copies):
        registry = registry.with_copy(f"copy-{i:03d}")
    return registry


def _mlp_fine_tuned(epochs: int, lr: float, x: torch.Tensor, y: torch.Tensor) -> Attack:
    """Adam on the digits training split, minibatches of 64."""
    def attack(copy: Model, rng: np.random.Generator) -> Tensors:
        config = cast(dict[str, Any], copy.config)
        net = MLPClassifier(x.shape[1], [int(h) for h in config["hidden"]], int(config["classes"]))
        net.load_state_dict(_torch(copy.tensors))
        torch.manual_seed(int(rng.integers(1 << 30)))
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        with torch.enable_grad():
            for _ in range(epochs):
                for idx in torch.split(torch.randperm(len(x)), 64):
                    opt.zero_grad()
                    loss = nn.functional.cross_entropy(net(x[idx])["logits"], y[idx])
                    loss.backward()  # type: ignore[no-untyped-call]
                    opt.step()
        return _numpy(net.state_dict())
    return attack


@dataclass(frozen=True)
class Sweep:
    subject: Subject
    attacks: Sequence[tuple[str, str, Attack]]
    #: copies leaked per attack (each identified on its own)
    leaked: int
    quality: Callable[[Model], float]
    quality_name: str
    #: the first this many leaked copies of each attack are evaluated for quality
    quality_copies: int
    #: every attack is run once per registry: one per value mark strength (0: no value mark)
    value_strengths: Sequence[float] = (0.0,)


def _leaked_ids(registry: Registry, leaked: int) -> list[str]:
    """The copies leaked (the same ids for every sweep and registry: a paired comparison)."""
    rng = np.random.default_rng(7)
    return [registry.copies[i] for i in rng.choice(COPIES, leaked, replace=False)]


def _sweep(sweep: Sweep) -> Iterator[dict[str, Any]]:
    reference = sweep.subject.reference
    setups = []
    for strength in sweep.value_strengths:
        registry = _registry(MASTER, reference, COPIES, strength)
        copies = {c: harden_copy(reference, MASTER, registry, c)[0]
                  for c in _leaked_ids(registry, sweep.leaked)}
        clean = float(np.mean([sweep.quality(c) for c in list(copies.values())[:sweep.quality_copies]]))
        setups.append((strength, registry, copies, clean))
    for attack_name, setting, attack in sweep.attacks:
        for strength, registry, copies, clean in setups:
            yield _attacked(sweep, attack_name, setting, attack, strength, registry, copies, clean)


def _attacked(sweep: Sweep, attack_name: str, setting: str, attack: Attack, strength: float,
              registry: Registry, copies: Mapping[str, Model], clean: float) -> dict[str, Any]:
    """One row of the sweep: every leaked copy of ``registry`` attacked and identified on its own."""
    started = time.perf_counter()
    reference = sweep.subject.reference
    named, wrong, qualities = 0, 0, []
    worst = {"p_value": 0.0, "order_p": 0.0, "traps_p": 0.0, "values_p": 0.0}
    positions, traps_found, traps, similarity, units = [], [], 0, [], 0
    for i, (copy_id, copy) in enumerate(copies.items()):
        suspect = attack(copy, np.random.default_rng(1000 + i))
        result = identify(suspect, reference, registry, MASTER)
        true = next(s for s in result.scores if s.copy_id == copy_id)
        named += result.copy_id == copy_id
        wrong += result.copy_id not in (None, copy_id)
        for key in worst:
            worst[key] = max(worst[key], float(getattr(true, key)))
        positions.append(true.order_agreeing)
        traps_found.append(true.traps_found)
        traps, units = true.traps, result.units
        similarity.append(result.match_similarity)
        if i < sweep.quality_copies:
            qualities.append(sweep.quality(with_tensors(copy, suspect)))
    attacked = float(np.mean(qualities))
    leaked = len(copies)
    return {"name": "fingerprint_identification", "model": sweep.subject.label, "attack": attack_name,
            "setting": setting, "value_mark": strength, "value": named / leaked, "accuracy": named / leaked,
            "leaked_copies": leaked, "registered_copies": COPIES, "wrong": wrong,
            "worst_true_p": worst["p_value"], "worst_true_order_p": worst["order_p"],
            "worst_true_traps_p": worst["traps_p"],
            "worst_true_values_p": worst["values_p"] if strength > 0 else None,
            "true_order_agreeing_min": int(min(positions)), "units": units,
            "true_traps_found_min": int(min(traps_found)), "traps": traps,
            "match_similarity": round(float(np.mean(similarity)), 4), "quality": sweep.quality_name,
            "quality_unattacked": round(clean, 4), "quality_attacked": round(attacked, 4),
            "quality_cost": round(clean - attacked, 4),
            "quality_copies": min(sweep.quality_copies, leaked),
            "seconds": round(time.perf_counter() - started, 1)}


FINE_TUNING = ((3, 1e-3), (10, 1e-3), (10, 1e-2), (30, 3e-2))


def _trap_drift(reference: Model, x: torch.Tensor, y: torch.Tensor) -> Iterator[dict[str, Any]]:
    """What fine-tuning does to one copy's traps: how far their incoming weights turn, and whether they still
    stand out by their outgoing weights (a thief dropping the smallest-outgoing units)."""
    registry = _registry(MASTER, reference, COPIES)
    copy_id = registry.copies[0]
    copy = harden_copy(reference, MASTER, registry, copy_id)[0]
    group_plan = plan(copy_secret(MASTER, copy_id), reference.groups(), reference.tensors,
                      traps=registry.traps)[0]
    traps = np.flatnonzero(group_plan.order >= group_plan.units)
    before = copy.tensors["net.0.weight"][traps]
    for epochs, lr in FINE_TUNING:
        tuned = _mlp_fine_tuned(epochs, lr, x, y)(copy, np.random.default_rng(5))
        after = tuned["net.0.weight"][traps]
        cosine = np.sum(before * after, 1) / np.linalg.norm(before, axis=1) / np.linalg.norm(after, axis=1)
        outgoing = np.linalg.norm(tuned["net.2.weight"], axis=0)
        smallest = np.argsort(outgoing)[:len(traps)]
        yield {"name": "fingerprint_trap_drift", "model": "mlp-classifier", "copy": copy_id,
               "setting": f"{epochs} epochs lr {lr:g}", "value": round(float(cosine.min()), 4),
               "trap_incoming_cosine_min": round(float(cosine.min()), 4),
               "trap_incoming_relative_change_max": round(float(np.max(
                   np.linalg.norm(after - before, axis=1) / np.linalg.norm(before, axis=1))), 4),
               "trap_outgoing_norm_max": round(float(outgoing[traps].max()), 4),
               "unit_outgoing_norm_median": round(float(np.median(outgoing)), 4),
               "traps_among_smallest_outgoing": int(np.isin(traps, smallest).sum()), "traps": len(traps)}


def then(first: Attack, second: Attack) -> Attack:
    """``first``, then ``second`` on its result."""
    def attack(copy: Model, rng: np.random.Generator) -> Tensors:
        return second(with_tensors(copy, first(copy, rng)), rng)
    return attack


def _digits_training() -> tuple[torch.Tensor, torch.Tensor]:
    x_train, y_train, _, _ = digits_data()
    return torch.from_numpy(x_train), torch.from_numpy(y_train).long()


def _related(subject: Subject) -> Model:
    """The digits reference fine-tuned 10 epochs at lr 1e-3: a relative of the base a thief may hold."""
    x, y = _digits_training()
    tuned = _mlp_fine_tuned(10, 1e-3, x, y)(subject.reference, np.random.default_rng(99))
    return with_tensors(subject.reference, tuned)


RELATED = "to a related model (the reference fine-tuned 10 epochs lr 1e-3)"


def _digits_sweep(subject: Subject, related: Model) -> Iterator[dict[str, Any]]:
    x, y = _digits_training()
    yield from _trap_drift(subject.reference, x, y)
    to_reference = matched(subject.reference)
    attacks: list[tuple[str, str, Attack]] = [
        ("none", "", lambda c, r: dict(c.tensors)),
        *[("fine_tuning", f"{e} epochs lr {lr:g}", _mlp_fine_tuned(e, lr, x, y)) for e, lr in FINE_TUNING],
        *[("pruning", f"{f:.0%} smallest", pruned(f)) for f in (0.3, 0.5, 0.7, 0.9)],
        *[("gaussian_noise", f"{s}x rms", noisy(s)) for s in (0.1, 0.3, 1.0)],
        ("int8_quantisation", "per-tensor symmetric", int8),
        ("re-permutation", "every group", repermuted),
        ("re-hardening", "thief's own secret: permute, rescale, +4 traps", rehardened),
        *[("adding_units", f"+{n} dead units", units_added(n)) for n in (4, 32)],
        ("removing_units", "the zero-outgoing (trap) units", traps_removed),
        *[("removing_units", f"{n} random units", units_removed(n)) for n in (4, 16)],
        ("re-permutation + trap removal", REPERMUTED_WITHOUT_TRAPS, repermuted_without_traps),
        ("matching (align)", "to the reference itself", to_reference),
        ("matching (align)", RELATED, matched(related)),
        *[("matching (align) + fine-tuning", f"to the reference, then {e} epochs lr {lr:g}",
           then(to_reference, _mlp_fine_tuned(e, lr, x, y))) for e, lr in FINE_TUNING[1:]],
        *[("matching (align) + gaussian_noise", f"to the reference, then {s}x rms",
           then(to_reference, noisy(s))) for s in (0.3, 1.0)],
    ]
    yield from _sweep(Sweep(subject, attacks, LEAKED, lambda m: subject.evaluate(m).quality,
                            "digits test accuracy", LEAKED, (0.0, VALUE_STRENGTH)))


def _minilm_sweep(subject: Subject) -> Iterator[dict[str, Any]]:
    reference = subject.evaluate(subject.reference).secondary
    assert reference is not None

    def cosine(model: Model) -> float:
        out = subject.evaluate(model).secondary
        assert out is not None
        return float(np.mean(np.sum(out * reference, axis=1)))

    attacks: list[tuple[str, str, Attack]] = [
        ("none", "", lambda c, r: dict(c.tensors)),
        ("gaussian_noise", "0.1x rms", noisy(0.1)),
        ("int8_quantisation", "per-tensor symmetric", int8),
        ("pruning", "30% smallest", pruned(0.3)),
        ("re-permutation", "every group", repermuted),
        ("removing_units", "the zero-outgoing (trap) units", traps_removed),
        ("re-permutation + trap removal", REPERMUTED_WITHOUT_TRAPS, repermuted_without_traps),
        ("matching (align)", "to the reference itself", matched(subject.reference)),
    ]
    quality = "mean cosine of the embeddings to the reference's"
    yield from _sweep(Sweep(subject, attacks, MINILM_LEAKED, cosine, quality, 1))
    # the value mark, where it matters: the two attacks that remove the order and trap tests
    yield from _sweep(Sweep(subject, attacks[-2:], MINILM_VALUE_LEAKED, cosine, quality, 1,
                            (VALUE_STRENGTH,)))


# -- the value mark's cost -----------------------------------------------------------------------------------


def _value_embedding(reference: Model, registry: Registry, copy_id: str) -> EmbedReport:
    """What :func:`harden_copy` embeds first in copy ``copy_id`` (replayed for its report)."""
    secret = copy_secret(MASTER, copy_id)
    return embed_weight_mark(reference.tensors, value_keys(secret), bits=VALUE_BITS,
                             strength=registry.value_strength, layers=value_layers(reference))[1]


#: what the value mark buys, per strength: the leaked copy identified as it is and after these attacks
VALUE_ATTACKS = ("as leaked", "matched to the reference", "matched to the related model",
                 "matched to the reference, then 30 epochs lr 0.03",
                 "matched to the reference, then 0.3x rms noise")


def _digits_value_cost(subject: Subject, related: Model) -> Iterator[dict[str, Any]]:
    """The value mark's function cost on the digits MLP, per strength, over the sweep's leaked copies, and
    what it buys there (:data:`VALUE_ATTACKS`, each named in the sweep's rows too, with the same seeds)."""
    reference = subject.reference
    base = subject.evaluate(reference)
    assert base.secondary is not None
    x, y = _digits_training()
    to_reference = matched(reference)
    attacks: dict[str, Attack] = dict(zip(VALUE_ATTACKS, (
        lambda c, r: dict(c.tensors), to_reference, matched(related),
        then(to_reference, _mlp_fine_tuned(30, 3e-2, x, y)), then(to_reference, noisy(0.3))), strict=True))
    for strength in VALUE_STRENGTHS:
        started = time.perf_counter()
        registry = _registry(MASTER, reference, COPIES, strength)
        diffs, agreements, qualities, changes = [], [], [], []
        named, worst = dict.fromkeys(attacks, 0), dict.fromkeys(attacks, 0.0)
        leaked = _leaked_ids(registry, LEAKED)
        for i, copy_id in enumerate(leaked):
            copy = harden_copy(reference, MASTER, registry, copy_id)[0]
            out = subject.evaluate(copy)
            assert out.secondary is not None
            diffs.append(float(np.max(np.abs(out.secondary - base.secondary))))
            agreements.append(_agreement(base, out))
            qualities.append(out.quality)
            changes.append(_value_embedding(reference, registry, copy_id).relative_change)
            for key, attack in attacks.items():
                result = identify(attack(copy, np.random.default_rng(1000 + i)), reference, registry, MASTER)
                true = next(s for s in result.scores if s.copy_id == copy_id)
                named[key] += result.copy_id == copy_id
                worst[key] = max(worst[key], true.values_p)
        yield {"name": "hardening_value_mark_cost", "architecture": subject.label,
               "model": subject.description, "inputs": subject.inputs, "value_mark": strength,
               "copies": len(leaked),
               "value": round(float(np.mean(agreements)), 4),
               "top1_agreement": round(float(np.mean(agreements)), 4),
               "top1_agreement_min": round(float(np.min(agreements)), 4),
               "max_abs_diff": max(diffs), "max_abs_diff_of": "probabilities",
               "quality": subject.quality, "quality_reference": round(base.quality, 4),
               "quality_marked_mean": round(float(np.mean(qualities)), 4),
               "quality_marked_min": round(float(np.min(qualities)), 4),
               "quality_marked_max": round(float(np.max(qualities)), 4),
               "relative_weight_change": round(float(np.mean(changes)), 4),
               "marked_tensors": value_layers(reference), "bits": VALUE_BITS,
               "named": {k: f"{v}/{len(leaked)}" for k, v in named.items()},
               "worst_true_values_p": worst, "seconds": round(time.perf_counter() - started, 1)}


def _minilm_value_cost(subject: Subject) -> dict[str, Any]:
    """The value mark's function cost on MiniLM at :data:`VALUE_STRENGTH`, on the first leaked copy."""
    started = time.perf_counter()
    reference = subject.reference
    registry = _registry(MASTER, reference, COPIES, VALUE_STRENGTH)
    copy_id = _leaked_ids(registry, 1)[0]
    base = subject.evaluate(reference)
    out = subject.evaluate(harden_copy(reference, MASTER, registry, copy_id)[0])
    assert base.secondary is not None and out.secondary is not None
    cosine = np.sum(out.secondary * base.secondary, axis=1)
    clean = _ranked(base.secondary[:PAIRS], base.secondary[PAIRS:])
    marked = _ranked(out.secondary[:PAIRS], out.secondary[PAIRS:])
    embedded = _value_embedding(reference, registry, copy_id)
    return {"name": "hardening_value_mark_cost", "architecture": subject.label,
            "model": subject.description, "inputs": subject.inputs, "value_mark": VALUE_STRENGTH,
            "copies": 1, "copy": copy_id,
            "value": round(_agreement(base, out), 4), "top1": subject.top1,
            "top1_agreement": round(_agreement(base, out), 4),
            "max_abs_diff": float(np.max(np.abs(out.primary - base.primary))),
            "max_abs_diff_of": "raw embeddings",
            "mean_cosine_to_reference": round(float(np.mean(cosine)), 6),
            "min_cosine_to_reference": round(float(np.min(cosine)), 6),
            "retrieval_reference": clean, "retrieval_marked": marked,
            "ratio": round(marked["mrr"] / clean["mrr"], 4),
            "relative_weight_change": round(embedded.relative_change, 4),
            "marked_coordinates": embedded.coordinates, "marked_tensors": len(embedded.layers),
            "bits": VALUE_BITS, "seconds": round(time.perf_counter() - started, 1)}


# -- calibration -------------------------------------------------------------------------------------------


def _calibration(reference: Model, trained: Callable[[int], Model]) -> dict[str, Any]:
    """Unmarked models against registries under many master keys, without and with the value mark
    (module docstring)."""
    started = time.perf_counter()
    models = {"reference (unhardened)": reference,
              **{f"independent seed {s}": trained(s) for s in range(1, CALIBRATION_SEEDS + 1)}}
    corrected, per_copy, orders, traps, values = [], [], [], [], []
    named = {0.0: 0, VALUE_STRENGTH: 0}
    for i, strength in enumerate(named):
        for k in range(CALIBRATION_KEYS):
            # distinct master keys per kind: the same key and ids would replay the same order and traps
            master = hashlib.sha256(b"calibration master %d" % (i * CALIBRATION_KEYS + k)).digest()
            registry = _registry(master, reference, CALIBRATION_COPIES, strength)
            for model in models.values():
                result = identify(model.tensors, reference, registry, master)
                named[strength] += result.copy_id is not None
                corrected.append(result.p_value)
                for s in result.scores:
                    tested = [s.order_p, s.traps_p] + ([s.values_p] if strength > 0 else [])
                    per_copy.append(min(1.0, len(tested) * min(tested)))
                    orders.append(s.order_p)
                    traps.append(s.traps_p)
                    if strength > 0:
                        values.append(s.values_p)

    def rate(values: list[float], at: float) -> float:
        return round(float(np.mean(np.asarray(values) <= at)), 4)

    total = sum(named.values())
    return {"name": "fingerprint_false_identifications", "value": total, "threshold": 1e-6,
            "models": list(models), "master_keys": len(named) * CALIBRATION_KEYS,
            "registries": {f"value_mark {k:g}": CALIBRATION_KEYS for k in named},
            "copies_per_registry": CALIBRATION_COPIES, "tests": len(corrected), "copy_tests": len(per_copy),
            "identifications_at_1e-6": total,
            "identifications_by_value_mark": {f"{k:g}": v for k, v in named.items()},
            "min_corrected_p": min(corrected),
            "rate_corrected_p_at_0_05": rate(corrected, 0.05),
            "rate_per_copy_p_at_0_05": rate(per_copy, 0.05), "min_per_copy_p": min(per_copy),
            "rate_order_p_at_0_05": rate(orders, 0.05), "rate_traps_p_at_0_05": rate(traps, 0.05),
            "rate_values_p_at_0_05": rate(values, 0.05), "value_tests": len(values),
            "min_values_p": min(values), "seconds": round(time.perf_counter() - started, 1)}


def run() -> Iterator[dict[str, Any]]:
    started = time.perf_counter()
    with _threads(THREADS):
        digits, trained = _digits_subject()
        minilm = _minilm_subject()
        with tempfile.TemporaryDirectory(prefix="bench-hardening-lm-") as cache:
            folder = ensure_tiny_lm(Path(cache), project_corpus(repo_root()), TEST)
            lms = _lm_subjects(folder)
        related = _related(digits)
        setup = time.perf_counter() - started
        for subject in (digits, minilm, *lms):
            yield _equivalence(subject)
        yield from _digits_value_cost(digits, related)
        yield _minilm_value_cost(minilm)
        yield from _digits_sweep(digits, related)
        yield _calibration(digits.reference, trained)
        yield from _minilm_sweep(minilm)
    yield {"name": "hardening_bench_seconds", "seconds": round(time.perf_counter() - started, 1),
           "setup_seconds": round(setup, 1), "torch_threads": THREADS, "ratio": None}
