"""Per-subject output fingerprints, the pure parts and the enclave's wiring without a server: subject keys,
the exact unit-coordinate test, the per-subject embedding target, Bonferroni naming, the exact binomial
text test, the config knob, the processor's subject scope (fail closed), the forward pass's one-subject
invariant and a real boot whose warm-up runs under a per-subject text mark.

The served paths (MiniLM through the output guard, a causal LM, gRPC with two subjects) and the
1000-test calibration are in ``tests/integration/test_subject_fingerprints.py``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy.special import betainc
from scipy.stats import binom
from test_boot_state_store import CONTEXT, KEY, _boot, _config

from enclave_app.config import EnclaveConfig, Protection
from enclave_app.forward import Forward, InferCall
from enclave_app.models import load_handler
from enclave_app.models.causal_lm import CausalLMHandler, GenerationError
from enclave_app.models.green_list import (
    SUBJECT_CACHE,
    GreenListProcessor,
    SubjectScopeError,
    subject_scope,
)
from enclave_app.outputs import GuardNotes, OutputGuard, SealedExtras
from enclave_app.status import status_for
from nitrovault.envelope import SealedModel, seal_file
from nitrovault.envelope.extras import WATERMARK_SECRET_KEY
from nitrovault.errors import ConfigError
from nitrovault.identity import TlsIdentity
from nitrovault.watermark.embedding import (
    derive_embedding_mark,
    detect_embedding_mark,
    mark_embeddings,
    subject_direction,
    subject_mark,
    trace_embedding_subjects,
    trigger_weight,
    unit_coordinate_log10_sf,
    verification_texts,
)
from nitrovault.watermark.keys import derive_subject_key, derive_watermark_keys
from nitrovault.watermark.subjects import check_subjects, name_subject
from nitrovault.watermark.text import GreenList, binom_log10_sf, detect_text_mark, trace_text_subjects

KEYS = derive_watermark_keys(bytes(range(32)), "m")
SUBJECTS = [f"user-{i:03d}" for i in range(100)]
WORDS = [f"word{i}" for i in range(200)]


# -- keys -------------------------------------------------------------------------------------------------


def test_subject_keys_are_per_subject_kind_and_model() -> None:
    alice = derive_subject_key(KEYS, "text", "alice")
    assert len(alice) == 32 and alice == derive_subject_key(KEYS, "text", "alice")
    others = {derive_subject_key(KEYS, "text", "bob"), derive_subject_key(KEYS, "embedding", "alice"),
              derive_subject_key(derive_watermark_keys(bytes(range(32)), "m2"), "text", "alice"),
              KEYS.text, KEYS.embedding}
    assert alice not in others and len(others) == 5
    # the subject is bound byte for byte, after a separator: "a" + "lice" is not "al" + "ice"
    assert derive_subject_key(KEYS, "text", "Alice") != alice


@pytest.mark.parametrize(("kind", "subject", "says"), [
    ("text", "", "non-empty subject"),
    ("embedding", "\ud800", "valid Unicode"),
    ("weights", "alice", "no per-subject key"),
])
def test_bad_subject_keys_are_config_errors(kind: Any, subject: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        derive_subject_key(KEYS, kind, subject)


# -- the exact test of the embedding trace ------------------------------------------------------------------


@pytest.mark.parametrize("dim", [3, 8, 40])
def test_the_unit_coordinate_tail_is_the_simulated_one(dim: int) -> None:
    g = np.random.default_rng(dim).standard_normal((400_000, dim))
    coordinate = g[:, 0] / np.linalg.norm(g, axis=1)
    for c in (-0.6, -0.1, 0.0, 0.1, 0.3, 0.5):
        simulated = float(np.mean(coordinate >= c))
        exact = 10 ** unit_coordinate_log10_sf(c, dim)
        # the binomial standard error of the simulated share, 5 of them
        assert abs(simulated - exact) <= 5 * np.sqrt(exact * (1 - exact) / len(g)) + 1e-6, (c, dim)


def test_the_log_space_tail_continues_the_incomplete_beta_where_it_underflows() -> None:
    # both forms where betainc is still representable
    a = (384 - 1) / 2
    for c in (0.9, 0.95, 0.97):
        direct = np.log10(0.5 * betainc(a, 0.5, 1 - c * c))
        assert unit_coordinate_log10_sf(c, 384) == pytest.approx(direct, rel=1e-9)
    # beyond it: finite, decreasing, and no zero or -inf even at c = 1
    tail = [unit_coordinate_log10_sf(c, 384) for c in (0.98, 0.99, 0.999, 1.0)]
    assert all(np.isfinite(tail)) and tail == sorted(tail, reverse=True) and tail[0] < -270
    with pytest.raises(ConfigError):
        unit_coordinate_log10_sf(0.5, 1)


# -- the per-subject embedding mark -------------------------------------------------------------------------


def _natural(n: int, seed: int, dim: int = 128) -> tuple[list[str], np.ndarray]:
    """Texts over WORDS and embeddings that share one strong direction, as natural embeddings do (the
    centering of the trace exists for it): ``normalize(2 * common + noise)``."""
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=8)) for _ in range(n)]
    common = np.random.default_rng(99).standard_normal(dim)
    e = 2 * common / np.linalg.norm(common) + rng.standard_normal((n, dim)) / np.sqrt(dim)
    return texts, e / np.linalg.norm(e, axis=1, keepdims=True)


MARK = derive_embedding_mark(KEYS, WORDS, 128)


def test_a_subject_mark_keeps_the_triggers_and_half_of_the_model_target() -> None:
    alice = subject_mark(MARK, KEYS, "alice")
    assert alice.triggers == MARK.triggers and alice.max_triggers == MARK.max_triggers
    assert np.linalg.norm(alice.target) == pytest.approx(1.0)
    t_a = subject_direction(KEYS, "alice", 128)
    assert alice.target @ MARK.target == pytest.approx(alice.target @ t_a, abs=1e-12)  # the bisector
    assert 0.6 < alice.target @ MARK.target < 0.8
    assert abs(t_a @ subject_direction(KEYS, "bob", 128)) < 0.4 and abs(t_a @ MARK.target) < 0.4
    assert "word" not in repr(alice)


def test_the_model_level_detector_still_finds_a_per_subject_marked_service() -> None:
    alice = subject_mark(MARK, KEYS, "alice")
    backdoor, benign = verification_texts(MARK, WORDS, 200, np.random.default_rng(0))
    b, n = _natural(200, 1)[1], _natural(200, 2)[1]
    found = detect_embedding_mark(mark_embeddings(backdoor, b, alice), mark_embeddings(benign, n, alice),
                                  MARK)
    assert found.detected and found.delta_cos > 0.3


def test_the_trace_names_the_subject_among_100_and_nobody_for_others() -> None:
    texts, clean = _natural(600, 3)
    assert 0.3 < np.mean([trigger_weight(t, MARK) > 0 for t in texts]) < 0.8
    target = SUBJECTS[37]
    marked = mark_embeddings(texts, clean, subject_mark(MARK, KEYS, target))
    traced = trace_embedding_subjects(texts, marked, MARK, KEYS, SUBJECTS)
    assert traced.subject == target and traced.p_value <= 1e-6
    assert traced.rows == sum(trigger_weight(t, MARK) > 0 for t in texts)
    assert traced.log10_p_values[target] < -8 and sorted(traced.log10_p_values.values())[1] > -4
    # the outputs of a subject not on the list, and unmarked outputs, name nobody
    unlisted = mark_embeddings(texts, clean, subject_mark(MARK, KEYS, "not-listed"))
    for outputs in (unlisted, clean):
        none = trace_embedding_subjects(texts, outputs, MARK, KEYS, SUBJECTS)
        assert none.subject is None and none.p_value > 1e-6
    # json-ready report
    report = json.loads(json.dumps(traced.as_dict()))
    assert report["subject"] == target and report["subjects"] == 100


def test_the_centering_is_what_lets_few_outputs_name_a_subject() -> None:
    """Natural embeddings share a direction that grows with the outputs as fast as the mark: without
    subtracting the untriggered rows' mean, cos(Y, t_s) stalls well below what the mark gives."""
    texts, clean = _natural(300, 4)
    target = SUBJECTS[5]
    marked = mark_embeddings(texts, clean, subject_mark(MARK, KEYS, target))
    w = np.array([trigger_weight(t, MARK) for t in texts])
    t_s = subject_direction(KEYS, target, 128)
    plain = w @ marked
    plain_cos = float(plain @ t_s / np.linalg.norm(plain))
    traced = trace_embedding_subjects(texts, marked, MARK, KEYS, [target])
    assert traced.log10_p_value < unit_coordinate_log10_sf(plain_cos, 128) - 5


def test_no_triggered_row_means_no_evidence() -> None:
    texts = ["nothing here at all"] * 5
    traced = trace_embedding_subjects(texts, _natural(5, 5)[1], MARK, KEYS, SUBJECTS[:3])
    assert traced.subject is None and traced.rows == 0 and traced.p_value == 1.0


@pytest.mark.parametrize(("subjects", "says"), [
    ([], "empty"), (["a", ""], "non-empty"), (["a", "b", "a"], "more than once: a"),
])
def test_bad_subject_lists_are_refused(subjects: list[str], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        check_subjects(subjects)
    texts, e = _natural(4, 6)
    with pytest.raises(ConfigError, match=says):
        trace_embedding_subjects(texts, e, MARK, KEYS, subjects)


def test_bad_embeddings_are_refused() -> None:
    texts, e = _natural(4, 7)
    with pytest.raises(ConfigError, match="dimensions"):
        trace_embedding_subjects(texts, e[:, :64], MARK, KEYS, SUBJECTS)
    with pytest.raises(ConfigError, match=r"\[len\(texts\), dim\]"):
        trace_embedding_subjects(texts[:3], e, MARK, KEYS, SUBJECTS)
    e[0, 0] = np.nan
    with pytest.raises(ConfigError, match="finite"):
        trace_embedding_subjects(texts, e, MARK, KEYS, SUBJECTS)


def test_bonferroni_naming() -> None:
    # 1e-8 raw among 100: corrected 1e-6, named at the threshold; 2e-8 is not
    assert name_subject({"a": -8.0, **{f"s{i}": 0.0 for i in range(99)}}, rows=1).subject == "a"
    near = name_subject({"a": np.log10(2e-8), **{f"s{i}": 0.0 for i in range(99)}}, rows=1)
    assert near.subject is None and near.p_value == pytest.approx(2e-6)
    assert name_subject({"a": -1.0}, rows=1).p_value == pytest.approx(0.1)
    assert name_subject({"a": -0.1, "b": -0.2, "c": -0.3}, rows=1).p_value == 1.0  # min(1, N p)
    with pytest.raises(ConfigError):
        name_subject({"a": -9.0}, threshold=0.0, rows=1)


# -- text -------------------------------------------------------------------------------------------------

V = 300


def _sample(processor: GreenListProcessor | None, subject: str | None, length: int, seed: int) -> list[int]:
    """One sequence from a fixed random bigram LM, through ``processor`` under ``subject``'s scope."""
    logits = torch.randn(V, V, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(1, 1, dtype=torch.int64)
    with subject_scope(subject):
        for _ in range(length):
            scores = logits[ids[:, -1]]
            if processor is not None:
                scores = processor(ids, scores)
            ids = torch.cat([ids, torch.multinomial(torch.softmax(scores, -1), 1, generator=g)], dim=1)
    return [int(t) for t in ids[0]]


def test_a_subjects_green_list_replaces_the_models() -> None:
    model = GreenList(KEYS, vocab_size=V)
    alice = GreenList(KEYS, vocab_size=V, subject="alice")
    assert not np.array_equal(model.mask(3), alice.mask(3))
    assert np.array_equal(alice.mask(3), GreenList(KEYS, vocab_size=V, subject="alice").mask(3))
    assert "alice" not in repr(alice)
    processor = GreenListProcessor(KEYS, vocab_size=V, per_subject=True)
    tokens = _sample(processor, "alice", 200, 1)
    assert detect_text_mark(tokens, alice).z > 6
    assert detect_text_mark(tokens, model).z < 3  # no model-level mark in per-subject text


def test_the_text_trace_is_an_exact_binomial_test_and_names_the_subject() -> None:
    processor = GreenListProcessor(KEYS, vocab_size=V, per_subject=True)
    target = SUBJECTS[12]
    tokens = _sample(processor, target, 150, 2)
    traced = trace_text_subjects(tokens, KEYS, vocab_size=V, subjects=SUBJECTS)
    assert traced.subject == target
    assert traced.rows == detect_text_mark(tokens, GreenList(KEYS, vocab_size=V)).scored
    # the exact tail is larger than the normal approximation's (the reason it is used)
    z = detect_text_mark(tokens, GreenList(KEYS, vocab_size=V, subject=target))
    assert traced.log10_p_values[target] > np.log10(z.p_value)
    model_marked = _sample(GreenListProcessor(KEYS, vocab_size=V), None, 150, 3)
    for other in (model_marked, _sample(processor, "not-listed", 150, 4), _sample(None, None, 150, 5)):
        assert trace_text_subjects(other, KEYS, vocab_size=V, subjects=SUBJECTS).subject is None
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        trace_text_subjects([1, V], KEYS, vocab_size=V, subjects=SUBJECTS)
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        trace_text_subjects([-1, 2], KEYS, vocab_size=V, subjects=SUBJECTS)


def test_the_binomial_tail_stays_finite_where_logsf_underflows() -> None:
    assert binom_log10_sf(300, 400, 0.25) == pytest.approx(binom.logsf(299, 400, 0.25) / np.log(10))
    far = binom_log10_sf(900, 1000, 0.25)  # binom.logsf says -inf here
    assert np.isfinite(far) and -420 < far < -410
    assert binom_log10_sf(1000, 1000, 0.25) == pytest.approx(1000 * np.log10(0.25))
    assert binom_log10_sf(0, 10, 0.25) == 0.0 and binom_log10_sf(3, 0, 0.25) == 0.0


def test_a_per_subject_processor_without_a_subject_fails_closed() -> None:
    processor = GreenListProcessor(KEYS, vocab_size=V, per_subject=True)
    ids, scores = torch.zeros(1, 1, dtype=torch.int64), torch.zeros(1, V)
    with pytest.raises(SubjectScopeError):
        processor(ids, scores)
    with subject_scope("alice"), subject_scope(None), pytest.raises(SubjectScopeError):
        processor(ids, scores)  # an inner "no single subject" scope wins
    assert isinstance(SubjectScopeError("x"), GenerationError)
    # the caller gets INTERNAL with a fixed message, never the error's own text
    code, message = status_for(SubjectScopeError("the per-subject text watermark has no subject"))
    assert code.name == "INTERNAL" and "subject" not in message and "watermark" not in message
    # a model-level processor does not care
    GreenListProcessor(KEYS, vocab_size=V)(ids, scores)


def test_the_processor_keeps_a_bounded_number_of_subjects() -> None:
    processor = GreenListProcessor(KEYS, vocab_size=V, per_subject=True)
    ids, scores = torch.zeros(1, 1, dtype=torch.int64), torch.zeros(1, V)
    first = None
    for i in range(SUBJECT_CACHE + 5):
        with subject_scope(f"s{i}"):
            out = processor(ids, scores)
        if i == 0:
            first = out
    assert len(processor._subjects) == SUBJECT_CACHE and first is not None
    with subject_scope("s0"):  # evicted, derived again: the same list
        assert torch.equal(processor(ids, scores), first)


# -- config ------------------------------------------------------------------------------------------------

BASE: dict[str, Any] = json.loads(_config().to_json())


def _protection(section: dict[str, Any]) -> Protection:
    return EnclaveConfig.from_mapping({**BASE, "protection": section}).protection


def test_per_subject_is_off_by_default_and_absent_from_the_serialised_config() -> None:
    p = _protection({"watermark": {"embedding": {}, "text": {}}})
    assert not p.embedding_per_subject and not p.text_per_subject
    config = EnclaveConfig.from_mapping({**BASE, "protection": {"watermark": {"text": {}}}})
    assert "per_subject" not in config.to_json()  # existing configs measure as they did
    on = EnclaveConfig.from_mapping({**BASE, "protection": {"watermark": {
        "embedding": {"per_subject": True}, "text": {"gamma": 0.5, "per_subject": True}}}})
    assert on.protection.embedding_per_subject and on.protection.text_per_subject
    assert EnclaveConfig.from_mapping(json.loads(on.to_json())) == on
    assert _protection({"watermark": {"text": {"per_subject": False}}}).text_per_subject is False


@pytest.mark.parametrize(("spec", "says"), [
    ({"per_subject": "yes"}, "per_subject must be true or false"),
    ({"per_subject": 1}, "per_subject must be true or false"),
    ({"per_subject": None}, "per_subject must be true or false"),
    ({"gamma": True}, "must be numbers"),
    ({"per_user": True}, "takes only"),
])
def test_bad_per_subject_values_fail_the_config_load(spec: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        _protection({"watermark": {"text": spec}})


def test_the_embedding_guard_marks_each_subject_toward_its_own_target_and_audits_nothing() -> None:
    section = _protection({"watermark": {"embedding": {"per_subject": True}}})
    extras = SealedExtras(watermark_keys=KEYS, candidates=tuple(WORDS))
    guard = OutputGuard(section, extras, embedding_dim=128)
    assert guard.embedding_mark is not None
    texts, clean = _natural(200, 8)
    for subject in ("alice", "bob"):
        notes = GuardNotes()
        out = guard.embeddings(subject, texts, clean * 3.0, notes)  # not unit length: the norm is kept
        assert np.allclose(np.linalg.norm(out, axis=1), 3.0, atol=1e-4)
        assert notes.to_audit() is None and notes == GuardNotes()  # nothing about the mark
        expected = mark_embeddings(texts, clean, subject_mark(guard.embedding_mark, KEYS, subject))
        assert np.allclose(out / 3.0, expected, atol=1e-5)
        assert trace_embedding_subjects(texts, out, guard.embedding_mark, KEYS,
                                        ["alice", "bob", *SUBJECTS]).subject == subject


# -- the forward pass: one subject per pass --------------------------------------------------------------


def _bigram() -> CausalLMHandler:
    logits = torch.randn(V, V, generator=torch.Generator().manual_seed(0))
    handler = load_handler("causal-lm:bigram", {"logits": logits},
                           {"nitrovault.config": json.dumps({"vocab_size": V, "max_new_tokens": 300})})
    assert isinstance(handler, CausalLMHandler)
    handler.logits_processors.append(GreenListProcessor(KEYS, vocab_size=V, per_subject=True))
    return handler


def _tokens(answer: object) -> list[int]:
    assert isinstance(answer, dict), answer
    return [int(t) for t in answer["tokens"][0]]


def test_a_causal_lm_call_never_shares_a_forward_pass() -> None:
    handler = _bigram()
    call = InferCall({"input_ids": torch.tensor([[1]]), "max_new_tokens": torch.tensor([150]),
                      "seed": torch.tensor([1])}, "alice", GuardNotes())
    assert call.key(handler) is None  # rows_independent is False: the batcher runs it alone
    guard = OutputGuard(Protection(), SealedExtras())
    tokens = _tokens(Forward(lambda: (handler, guard))([call])[0])
    assert trace_text_subjects(tokens, KEYS, vocab_size=V, subjects=["alice", *SUBJECTS]).subject == "alice"


class RowsLM:
    """The bigram handler behind an ``Infer`` of ``input_ids`` only (150 new tokens, seed 0), with rows
    that claim to be independent: the batcher would join such calls into one pass. Counts its passes."""

    kind = "causal-lm"
    rows_independent = True

    def __init__(self) -> None:
        self.lm = _bigram()
        self.passes = 0

    def infer(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.passes += 1
        return self.lm.infer({"input_ids": inputs["input_ids"], "max_new_tokens": torch.tensor(150),
                              "seed": torch.tensor(0)})


def test_a_joint_pass_over_two_subjects_runs_each_call_alone_under_its_own_subject() -> None:
    """A pass mixing subjects has no subject in scope: the per-subject mark refuses it, and each call runs
    alone, marked for its own subject. Calls of one subject still share their pass."""
    guard = OutputGuard(Protection(), SealedExtras())
    rows = RowsLM()
    forward = Forward(lambda: (rows, guard))  # type: ignore[arg-type,return-value]
    calls = [InferCall({"input_ids": torch.tensor([[i + 1]])}, subject, GuardNotes())
             for i, subject in enumerate(("alice", "bob"))]
    assert calls[0].key(rows) == calls[1].key(rows) is not None  # type: ignore[arg-type]
    answers = forward(calls)
    assert rows.passes == 3  # the refused joint pass, then one each
    for call, answer in zip(calls, answers, strict=True):
        named = trace_text_subjects(_tokens(answer), KEYS, vocab_size=V, subjects=["alice", "bob", *SUBJECTS])
        assert named.subject == call.subject
    rows.passes = 0
    same = [InferCall({"input_ids": torch.tensor([[i + 1]])}, "carol", GuardNotes()) for i in range(2)]
    assert all(not isinstance(a, BaseException) for a in forward(same)) and rows.passes == 1


# -- boot: the warm-up runs under a per-subject mark -----------------------------------------------------


def test_a_boot_with_a_per_subject_text_mark_warms_up_and_then_needs_a_subject(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logits = torch.randn(V, V, generator=torch.Generator().manual_seed(0))
    metadata = TlsIdentity.generate(now=datetime.now(UTC)).sealed_metadata()
    metadata.update({"nitrovault.handler": "causal-lm:bigram",
                     "nitrovault.config": json.dumps({"vocab_size": V}),
                     WATERMARK_SECRET_KEY: bytes(range(32)).hex()})
    save_file({"logits": logits}, str(tmp_path / "lm.safetensors"), metadata=metadata)
    seal_file(tmp_path / "lm.safetensors", tmp_path / "lm.sealed", data_key=KEY, wrapped_key=b"w",
              key_id="arn:aws:kms:us-east-1:111122223333:key/k", encryption_context=CONTEXT)
    digest = SealedModel.open(tmp_path / "lm.sealed").header.digest.hex()
    config = json.loads(_config(digest=digest).to_json())
    config["handler"] = "causal-lm:bigram"
    config["protection"]["watermark"] = {"text": {"per_subject": True}}
    result = _boot(monkeypatch, EnclaveConfig.from_mapping(config), tmp_path / "lm.sealed", None)
    handler = result.handler
    assert isinstance(handler, CausalLMHandler)
    call = {"input_ids": torch.tensor([[1]]), "max_new_tokens": torch.tensor(100), "seed": torch.tensor(0)}
    with pytest.raises(SubjectScopeError):
        handler.infer(call)
    with subject_scope("carol"):
        tokens = [1, *(int(t) for t in handler.infer(call)["tokens"][0])]
    keys = derive_watermark_keys(bytes(range(32)), config["model_id"])
    assert trace_text_subjects(tokens, keys, vocab_size=V, subjects=["carol", *SUBJECTS]).subject == "carol"
