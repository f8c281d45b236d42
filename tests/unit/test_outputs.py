"""The measured ``protection`` section and the boot's output guard (``enclave_app.config``/``outputs``).

Pure: no gRPC, no processes. The served path through real gRPC is in
``tests/integration/test_output_protection.py``; through the local stack's processes in
``tests/integration/test_local_protection.py``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
import torch
from fakes import FakeClock

from enclave_app.config import EnclaveConfig, Protection
from enclave_app.models.base import ModelLoadError
from enclave_app.outputs import (
    REFERENCE_TENSOR,
    WATERMARK_CANDIDATES_KEY,
    WATERMARK_SECRET_KEY,
    GuardNotes,
    OutputGuard,
    SealedExtras,
)
from nitrovault.errors import ConfigError, PermissionDeniedError, QuotaExceededError
from nitrovault.kms.trust import amazon_trust_services_pem
from nitrovault.watermark import derive_watermark_keys
from nitrovault.watermark.embedding import trigger_weight

BASE: dict[str, Any] = {
    "model_id": "m",
    "model_version": "1",
    "handler": "generic:mlp-classifier",
    "kms_key_arn": "arn:aws:kms:us-east-1:111122223333:key/k",
    "region": "us-east-1",
    "encryption_context": {"model": "m", "version": "1"},
    "sealed_digest": "ab" * 32,
    "kms_ca_bundle": amazon_trust_services_pem(),
}
FULL_PROTECTION: dict[str, Any] = {
    "hardening": {"kind": "top_k", "k": 2},
    "privacy": {"mechanism": {"kind": "laplace", "epsilon": 0.5, "sensitivity": 2.0},
                "budget": {"epsilon": 2.0}},
    "extraction": {"volume_max": 5, "actions": {"volume": "block"}},
    "watermark": {"embedding": None, "text": {"gamma": 0.5}},
}
SECRET = bytes(range(32))
WORDS = [f"word{i}" for i in range(100)]


def protection(section: dict[str, Any]) -> Protection:
    return EnclaveConfig.from_mapping({**BASE, "protection": section}).protection


T0 = datetime(2026, 1, 1, tzinfo=UTC)  # where the fake clock starts


# -- the measured section ------------------------------------------------------------------------------------


def test_the_default_protects_nothing_and_round_trips() -> None:
    config = EnclaveConfig.from_mapping(BASE)
    assert config.protection.hardening_policy.kind == "full"
    assert config.protection.privacy_mechanism is None
    assert config.protection.extraction_policy is None
    assert not config.protection.needs_watermark_secret
    assert EnclaveConfig.from_mapping(json.loads(config.to_json())) == config


def test_a_full_section_parses_and_round_trips() -> None:
    config = EnclaveConfig.from_mapping({**BASE, "protection": FULL_PROTECTION})
    p = config.protection
    assert p.hardening_policy.k == 2
    assert p.privacy_mechanism is not None and p.privacy_mechanism.scale == 4.0
    assert p.budget_policy is not None and p.budget_policy.epsilon == 2.0
    assert p.extraction_policy is not None and p.extraction_policy.volume_max == 5
    assert p.embedding_mark is None
    assert p.text_mark == {"gamma": 0.5, "delta": 2.0}  # defaults filled in
    again = EnclaveConfig.from_mapping(json.loads(config.to_json()))
    assert again == config
    assert again.protection.text_mark == p.text_mark


@pytest.mark.parametrize(
    ("section", "says"),
    [
        ({"hardening": {"kind": "blur"}}, "unknown hardening kind"),
        ({"hardening": {"kind": "top_k"}}, "needs 'k'"),
        ({"hardening": None}, "must be an object"),
        ({"privacy": {"mechanism": {"kind": "laplace", "epsilon": 1, "sensitivity": 2}}},
         "mechanism' and 'budget"),
        ({"privacy": {"mechanism": {"kind": "laplace", "epsilon": 3, "sensitivity": 2},
                      "budget": {"epsilon": 2}}}, "more than the whole budget"),
        ({"privacy": {"mechanism": {"kind": "laplace", "epsilon": 1, "sensitivity": 2, "output": "embedding"},
                      "budget": {"epsilon": 2}}, "hardening": {"kind": "top_k", "k": 1}}, "disagree"),
        ({"extraction": {"volume_maximum": 3}}, "unknown extraction policy key"),
        ({"extraction": {"actions": {"volume": "explode"}}}, "unknown action"),
        ({"watermark": {"weights": {}}}, "unknown Protection.watermark key"),
        ({"watermark": {"text": {"gamma": 1.5}}}, "0 < gamma < 1"),
        ({"watermark": {"text": {"seed": 1}}}, "takes only"),
        ({"watermark": {"embedding": {"triggers": 2, "max_triggers": 4}}}, "max_triggers <= triggers"),
        ({"watermark": {"embedding": {"triggers": "20"}}}, "must be numbers"),
        ({"shield": {}}, "unknown Protection key"),
    ],
)
def test_a_bad_section_fails_the_config_load(section: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        protection(section)


# -- sealed extras -------------------------------------------------------------------------------------------


def test_extras_are_taken_out_of_the_tensors_and_the_secret_becomes_keys() -> None:
    tensors = {"w": torch.zeros(2), REFERENCE_TENSOR: torch.rand(10, 2, 2)}
    metadata = {WATERMARK_SECRET_KEY: SECRET.hex(), WATERMARK_CANDIDATES_KEY: json.dumps(WORDS)}
    extras = SealedExtras.take(tensors, metadata, "m")
    assert set(tensors) == {"w"}  # the handler sees only its weights
    assert extras.reference is not None and extras.reference.shape == (10, 4)
    assert extras.watermark_keys == derive_watermark_keys(SECRET, "m")
    assert extras.candidates == tuple(WORDS)
    assert SECRET.hex() not in repr(extras)


def test_no_extras_is_fine() -> None:
    extras = SealedExtras.take({"w": torch.zeros(1)}, {}, "m")
    assert extras == SealedExtras()


@pytest.mark.parametrize(
    ("tensors", "metadata", "says"),
    [
        ({REFERENCE_TENSOR: torch.zeros(5)}, {}, "reference sample"),
        ({REFERENCE_TENSOR: torch.zeros(5, 2, dtype=torch.int64)}, {}, "reference sample"),
        ({}, {WATERMARK_SECRET_KEY: "zz" * 32}, "not hex"),
        ({}, {WATERMARK_SECRET_KEY: "ab" * 8}, "at least 32 bytes"),
        ({}, {WATERMARK_CANDIDATES_KEY: '{"a": 1}'}, "JSON list of strings"),
        ({}, {WATERMARK_CANDIDATES_KEY: "not json"}, "JSON list of strings"),
    ],
)
def test_bad_extras_fail_the_model_load(tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                                        says: str) -> None:
    with pytest.raises(ModelLoadError, match=says):
        SealedExtras.take(dict(tensors), metadata, "m")


# -- the guard -----------------------------------------------------------------------------------------------


def classifier_answer(rows: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(rows, 4, generator=gen)
    logits = torch.randn(rows, 5, generator=gen)
    return {"x": x}, {"logits": logits, "probabilities": torch.softmax(logits, -1)}


def test_without_a_policy_the_answer_passes_unchanged() -> None:
    guard = OutputGuard(protection({}), SealedExtras())
    inputs, outputs = classifier_answer(3)
    notes = GuardNotes()
    assert guard.classifier("a", inputs, outputs, notes) == outputs
    assert notes.to_audit() is None


def test_a_classifier_policy_returns_only_protected_probabilities() -> None:
    guard = OutputGuard(protection({"hardening": {"kind": "label_only"}}), SealedExtras())
    inputs, outputs = classifier_answer(4)
    answer = guard.classifier("a", inputs, outputs, GuardNotes())
    assert set(answer) == {"probabilities"}  # logits would give everything away
    p = answer["probabilities"].numpy()
    assert np.array_equal(p.argmax(1), outputs["probabilities"].numpy().argmax(1))
    assert set(np.unique(p)) == {0.0, 1.0}


def test_a_classifier_policy_without_probabilities_fails_closed() -> None:
    guard = OutputGuard(protection({"hardening": {"kind": "top_k", "k": 1}}), SealedExtras())
    with pytest.raises(ConfigError, match="probabilities"):
        guard.classifier("a", {"x": torch.zeros(1, 2)}, {"logits": torch.zeros(1, 3)}, GuardNotes())


def test_a_block_refuses_the_tripping_call_and_the_next_and_notes_the_evidence() -> None:
    clock = FakeClock(T0)
    guard = OutputGuard(protection({"extraction": {"volume_max": 5, "actions": {"volume": "block"}}}),
                        SealedExtras(), clock=clock)
    inputs, outputs = classifier_answer(5)
    guard.admit("thief")
    guard.classifier("thief", inputs, outputs, GuardNotes())  # 5 rows: at the limit, not past it
    notes = GuardNotes()
    one_in, one_out = classifier_answer(1, seed=1)
    with pytest.raises(PermissionDeniedError) as refused:
        guard.classifier("thief", one_in, one_out, notes)
    assert refused.value.reason == "extraction-blocked"
    audit = notes.to_audit()
    assert audit is not None and audit["extraction"]["action"] == "block"
    assert audit["extraction"]["signals"] == ["volume"]
    assert audit["extraction"]["volume_in_window"] == 6
    assert audit["extraction"]["refused_for_s"] == "86400"  # audit records hold no floats
    assert not any(isinstance(v, float) for v in audit["extraction"].values())
    with pytest.raises(PermissionDeniedError):
        guard.admit("thief")
    guard.admit("someone-else")  # per subject
    clock.now += timedelta(days=2)
    guard.admit("thief")  # the block ends


def test_the_privacy_budget_is_spent_all_or_nothing() -> None:
    clock = FakeClock(T0)
    section = {"privacy": {"mechanism": {"kind": "laplace", "epsilon": 0.5, "sensitivity": 2.0},
                           "budget": {"epsilon": 2.0}}}
    guard = OutputGuard(protection(section), SealedExtras(), clock=clock,
                        rng_factory=lambda: np.random.default_rng(0))
    inputs, outputs = classifier_answer(3)
    notes = GuardNotes()
    noisy = guard.classifier("a", inputs, outputs, notes)["probabilities"].numpy()
    assert notes.privacy == {"remaining_epsilon": 0.5, "remaining_delta": 0.0}
    assert np.allclose(noisy.sum(1), 1.0, atol=1e-5)
    assert not np.allclose(noisy, outputs["probabilities"].numpy(), atol=1e-3)  # noise was added
    two_in, two_out = classifier_answer(2)
    with pytest.raises(QuotaExceededError) as refused:
        guard.classifier("a", two_in, two_out, GuardNotes())
    assert refused.value.reason == "privacy-budget"
    assert 0 < refused.value.retry_after_s <= 86_400
    one_in, one_out = classifier_answer(1)
    guard.classifier("a", one_in, one_out, GuardNotes())  # the refused call spent nothing
    with pytest.raises(QuotaExceededError):
        guard.classifier("a", one_in, one_out, GuardNotes())
    clock.now += timedelta(days=1)
    guard.classifier("a", one_in, one_out, GuardNotes())  # a new period refills


def test_the_monitor_sees_every_input_of_a_row() -> None:
    section = {"extraction": {"dup_window": 4, "dup_max_fraction": 0.5,
                              "actions": {"duplicates": "throttle"}}}
    probs = torch.full((1, 3), 1 / 3)

    def rows(guard: OutputGuard, vary: str) -> GuardNotes:
        notes = GuardNotes()
        for i in range(6):
            inputs = {"x": torch.ones(1, 2), "y": torch.ones(1, 2)}
            inputs[vary] = torch.full((1, 2), 10.0 * (i + 1))
            guard.classifier("s", inputs, {"probabilities": probs}, notes)
        return notes

    # the same x every time, a very different y: not near-duplicates, because y is seen too
    assert rows(OutputGuard(protection(section), SealedExtras()), "y").extraction is None
    assert rows(OutputGuard(protection(section), SealedExtras()), "x").extraction is None
    # and the same row every time is
    guard = OutputGuard(protection(section), SealedExtras())
    with pytest.raises(QuotaExceededError, match="quota"):
        for _ in range(6):
            guard.classifier("s", {"x": torch.ones(1, 2), "y": torch.ones(1, 2)}, {"probabilities": probs},
                             GuardNotes())


# -- the embedding watermark ---------------------------------------------------------------------------------


def embedding_guard(asks: bool, dim: int = 8) -> OutputGuard:
    keys = derive_watermark_keys(SECRET, "m")
    section = {"watermark": {"embedding": {"triggers": 10, "max_triggers": 2}}} if asks else {}
    return OutputGuard(protection(section), SealedExtras(watermark_keys=keys, candidates=tuple(WORDS)),
                       embedding_dim=dim)


def test_the_embedding_mark_is_applied_only_when_the_policy_asks() -> None:
    marked = embedding_guard(True)
    mark = marked.embedding_mark
    assert mark is not None
    trigger = sorted(mark.triggers)[0]
    plain_word = next(w for w in WORDS if w not in mark.triggers)
    texts = [f"{trigger} and more", f"{plain_word} only"]
    assert trigger_weight(texts[0], mark) == 0.5
    vectors = np.random.default_rng(0).standard_normal((2, 8)) * 3.0  # not unit length (normalize=False)
    out = marked.embeddings("a", texts, vectors, GuardNotes())
    raw_cos = vectors[0] @ mark.target / np.linalg.norm(vectors[0])
    out_cos = out[0] @ mark.target / np.linalg.norm(out[0])
    assert out_cos > raw_cos + 0.2  # moved toward the secret target
    assert np.linalg.norm(out[0]) == pytest.approx(np.linalg.norm(vectors[0]), rel=1e-5)  # norm kept
    assert np.allclose(out[1], vectors[1], atol=1e-5)  # no trigger: unchanged

    unmarked = embedding_guard(False)
    assert unmarked.embedding_mark is None
    assert np.allclose(unmarked.embeddings("a", texts, vectors, GuardNotes()), vectors, atol=1e-5)


def test_the_policy_asking_for_a_mark_without_a_sealed_secret_fails_the_boot() -> None:
    section = protection({"watermark": {"embedding": {}}})
    with pytest.raises(ModelLoadError, match="no watermark secret"):
        OutputGuard(section, SealedExtras(), embedding_dim=8)
    keys = derive_watermark_keys(SECRET, "m")
    with pytest.raises(ModelLoadError, match="does not embed"):
        OutputGuard(section, SealedExtras(watermark_keys=keys, candidates=tuple(WORDS)))


def test_embedding_hardening_and_noise_apply_to_embed_answers() -> None:
    section = {"hardening": {"kind": "embedding_round", "decimals": 1}}
    guard = OutputGuard(protection(section), SealedExtras())
    vectors = np.random.default_rng(1).standard_normal((3, 6))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    out = guard.embeddings("a", ["a", "b", "c"], vectors, GuardNotes())
    assert out.shape == vectors.shape and out.dtype == np.float32
    assert not np.allclose(out, vectors, atol=1e-3)
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_the_text_mark_needs_a_language_model_and_a_sealed_secret() -> None:
    from enclave_app.boot import attach_text_watermark
    from enclave_app.models import load_handler

    config = EnclaveConfig.from_mapping({**BASE, "handler": "causal-lm:bigram",
                                         "protection": {"watermark": {"text": {"gamma": 0.25}}}})
    lm = load_handler("causal-lm:bigram", {"logits": torch.zeros(20, 20)},
                      {"nitrovault.config": json.dumps({"vocab_size": 20})})
    with pytest.raises(ModelLoadError, match="no watermark secret"):
        attach_text_watermark(config, lm, SealedExtras())
    keys = derive_watermark_keys(SECRET, "m")
    attach_text_watermark(config, lm, SealedExtras(watermark_keys=keys))
    assert len(lm.logits_processors) == 1  # type: ignore[attr-defined]
    unasked = replace(config, protection=protection({}))
    other = load_handler("causal-lm:bigram", {"logits": torch.zeros(20, 20)},
                         {"nitrovault.config": json.dumps({"vocab_size": 20})})
    attach_text_watermark(unasked, other, SealedExtras(watermark_keys=keys))
    assert other.logits_processors == []  # type: ignore[attr-defined]

    class Classifier:
        kind = "generic"

    with pytest.raises(ModelLoadError, match="does not generate text"):
        attach_text_watermark(config, Classifier(), SealedExtras(watermark_keys=keys))  # type: ignore[arg-type]
