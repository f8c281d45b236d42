"""Per-copy fingerprints (nitrovault/owner/fingerprint.py): the leaked copy among 100 is named, nothing is
named for models that are no copy, and each test (order, traps, values) carries the identification alone."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from test_harden import SECRET, minilm, mlp, torch_tensors

from enclave_app.models import load_handler
from enclave_app.models.generic import MLPClassifier
from nitrovault.errors import ConfigError
from nitrovault.local.digits import digits_data, train_classifier
from nitrovault.owner.fingerprint import Registry, copy_secret, harden_copy, identify, score_copy
from nitrovault.owner.harden import Model, align, plan, reorder

COPIES = 100
#: identification threshold (corrected for every registered copy): the issue's false-positive level
THRESHOLD = 1e-6
#: independently initialised models x copies each: at least 1,000 tests of "no copy"
NULL_MODELS, NULL_COPIES = 10, 100
#: the raw per-copy p-value is conservative: at level 0.05 at most this share of null tests may fall
LOOSE_LEVEL, LOOSE_MAX_RATE = 0.05, 0.05
#: a value-marked copy (strength 1) keeps the reference's top-1 on at least this share of test digits
VALUE_MARK_MIN_AGREEMENT = 0.97


@cache
def registry(architecture: str = "mlp") -> Registry:
    reference = mlp() if architecture == "mlp" else minilm()
    reg = Registry.new(SECRET, reference)
    for i in range(COPIES):
        reg = reg.with_copy(f"customer-{i:03d}")
    return reg


def leaked(copy_id: str) -> dict[str, np.ndarray]:
    return harden_copy(mlp(), SECRET, registry(), copy_id)[0].tensors


def repermuted(tensors: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """The thief's own permutation of every group (function preserving)."""
    out = dict(tensors)
    rng = np.random.default_rng(seed)
    for group in Model(out, "generic:mlp-classifier", {"hidden": _hidden(out), "in_features": 64,
                                                         "classes": 10}).groups():
        reorder(out, group, group.units, rng.permutation(group.units))
    return out


def without_dead_units(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a thief who spots units with all-zero outgoing weights does: removes them."""
    out = dict(tensors)
    hidden = _hidden(out)
    config = {"hidden": hidden, "in_features": 64, "classes": 10}
    for group in reversed(Model(out, "generic:mlp-classifier", config).groups()):
        outgoing = next(p for p in group.parts if p.role == "out")
        alive = np.flatnonzero(np.any(out[outgoing.tensor] != 0, axis=0))
        reorder(out, group, group.units, alive)
    return out


def _hidden(tensors: dict[str, np.ndarray]) -> list[int]:
    return [tensors["net.0.weight"].shape[0], tensors["net.2.weight"].shape[0]]


@pytest.mark.parametrize("copy_id", ["customer-000", "customer-042", "customer-099"])
def test_the_leaked_copy_is_named_among_100(copy_id: str) -> None:
    result = identify(leaked(copy_id), mlp(), registry(), SECRET)
    assert result.copy_id == copy_id and result.p_value <= THRESHOLD
    others = [s for s in result.scores if s.copy_id != copy_id]
    assert len(others) == COPIES - 1 and min(s.p_value for s in others) > THRESHOLD


def test_a_hardened_minilm_copy_is_named_among_100() -> None:
    reg = registry("minilm")
    suspect = harden_copy(minilm(), SECRET, reg, "customer-017")[0].tensors
    result = identify(suspect, minilm(), reg, SECRET)
    assert result.copy_id == "customer-017"
    best = next(s for s in result.scores if s.copy_id == "customer-017")
    assert best.order_agreeing == result.units and best.traps_found == best.traps


def test_the_original_and_an_independently_trained_model_name_no_copy() -> None:
    for suspect in (mlp().tensors, mlp(seed=11).tensors):
        result = identify(suspect, mlp(), registry(), SECRET)
        assert result.copy_id is None and result.p_value > THRESHOLD


def test_a_re_permuted_copy_is_named_by_its_traps_alone() -> None:
    result = identify(repermuted(leaked("customer-007"), seed=1), mlp(), registry(), SECRET)
    best = next(s for s in result.scores if s.copy_id == "customer-007")
    assert result.copy_id == "customer-007"
    assert best.order_p > THRESHOLD and best.traps_p <= THRESHOLD  # positions lost, traps carry it


def test_a_copy_without_its_dead_units_is_named_by_positions_alone() -> None:
    stripped = without_dead_units(leaked("customer-008"))
    assert _hidden(stripped) == [128, 128]
    result = identify(stripped, mlp(), registry(), SECRET)
    best = next(s for s in result.scores if s.copy_id == "customer-008")
    assert result.copy_id == "customer-008"
    assert best.traps_found == 0 and best.order_p <= THRESHOLD


def test_re_permutation_plus_dead_unit_removal_removes_the_fingerprint() -> None:
    """The documented limit (docs/hardening.md): a thief who knows the scheme does both."""
    suspect = repermuted(without_dead_units(leaked("customer-009")), seed=2)
    assert identify(suspect, mlp(), registry(), SECRET).copy_id is None


def test_no_false_identification_in_at_least_1000_null_tests() -> None:
    reference = mlp()
    groups = reference.groups()
    raw: list[float] = []
    named = 0
    for seed in range(NULL_MODELS):
        _, alignments = align(mlp(seed=100 + seed).tensors, reference)
        for c in range(NULL_COPIES):
            copy_id = f"null-{c}"
            plans = plan(copy_secret(SECRET, copy_id), groups, reference.tensors)
            score = score_copy(copy_id, plans, alignments, copies=1)
            raw.append(score.p_value)
            named += score.p_value * NULL_COPIES <= THRESHOLD
    assert len(raw) >= 1000 and named == 0
    assert np.mean(np.asarray(raw) <= LOOSE_LEVEL) <= LOOSE_MAX_RATE


def test_a_registry_round_trips_and_refuses_the_wrong_key_or_reference(tmp_path: Path) -> None:
    path = tmp_path / "fingerprints.json"
    registry().save(path)
    assert Registry.load(path) == registry()
    assert "customer-000" in path.read_text() and SECRET.hex() not in path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(ConfigError, match="not the master key"):
        identify(leaked("customer-001"), mlp(), registry(), bytes(32))
    with pytest.raises(ConfigError, match="not the model this registry"):
        identify(leaked("customer-001"), mlp(seed=3), registry(), SECRET)
    with pytest.raises(ConfigError, match="already in the registry"):
        registry().with_copy("customer-001")
    with pytest.raises(ConfigError, match="copy id"):
        copy_secret(SECRET, "../etc")


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "cannot read the registry"),
    ('{"format": "other"}', "not a nitrovault fingerprint registry"),
    ('{"format": "nitrovault-fingerprint-registry", "version": 9}', "registry version 9"),
    ('{"format": "nitrovault-fingerprint-registry", "version": 1, "key_id": "k"}', "corrupt"),
])
def test_a_corrupt_registry_is_refused_with_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "reg.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        Registry.load(path)


def test_a_registry_with_duplicate_copies_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "reg.json"
    registry().save(path)
    text = path.read_text().replace("customer-001", "customer-000")
    path.write_text(text)
    with pytest.raises(ConfigError, match="duplicate"):
        Registry.load(path)


@cache
def digits(seed: int) -> Model:
    x, y, _, _ = digits_data()
    module = train_classifier(x, y, seed=seed)
    metadata = {"nitrovault.handler": "generic:mlp-classifier",
                "nitrovault.config": json.dumps({"in_features": 64, "hidden": [64], "classes": 10})}
    return Model.from_file_parts({k: v.detach().numpy().copy() for k, v in module.state_dict().items()},
                                 metadata)


def fine_tuned(model: Model, epochs: int) -> dict[str, np.ndarray]:
    """The thief's fine-tuning of a leaked copy on the training split (full-batch Adam, lr 1e-3)."""
    x, y, _, _ = digits_data()
    hidden = model.config["hidden"]
    assert isinstance(hidden, list)
    module = MLPClassifier(64, hidden, 10)
    module.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in model.tensors.items()})
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(module(torch.from_numpy(x))["logits"], torch.from_numpy(y).long()
                                          ).backward()  # type: ignore[no-untyped-call]
        opt.step()
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def test_a_fine_tuned_copy_of_a_trained_model_is_named_and_an_independently_trained_one_is_not() -> None:
    reference = digits(0)
    reg = Registry.new(SECRET, reference)
    for i in range(COPIES):
        reg = reg.with_copy(f"site-{i}")
    copy, _ = harden_copy(reference, SECRET, reg, "site-5")
    result = identify(fine_tuned(copy, epochs=20), reference, reg, SECRET)
    assert result.copy_id == "site-5" and result.p_value <= THRESHOLD
    result = identify(digits(1).tensors, reference, reg, SECRET)
    assert result.copy_id is None and result.p_value > THRESHOLD


def _canonicalised(copy: Model, base: Model) -> dict[str, np.ndarray]:
    """The thief holding a relative of the base: re-align the copy to it, drop the leftover (trap) units."""
    return align(copy.tensors, base)[0]


@pytest.mark.parametrize("value_strength", [0.0, 1.0])
def test_only_the_value_mark_survives_re_alignment_to_a_relative_of_the_base(value_strength: float) -> None:
    reference = digits(0)
    relative = Model(fine_tuned(reference, epochs=20), reference.architecture, reference.config)
    reg = Registry.new(SECRET, reference, value_strength=value_strength)
    for i in range(COPIES):
        reg = reg.with_copy(f"site-{i}")
    copy, _ = harden_copy(reference, SECRET, reg, "site-3")
    result = identify(_canonicalised(copy, relative), reference, reg, SECRET)
    if value_strength:
        best = next(s for s in result.scores if s.copy_id == "site-3")
        assert result.copy_id == "site-3" and best.values_p <= THRESHOLD
    else:
        assert result.copy_id is None  # the documented limit of a function-preserving fingerprint


def test_a_value_marked_registry_round_trips_and_its_copies_keep_the_top1(tmp_path: Path) -> None:
    reference = digits(0)
    reg = Registry.new(SECRET, reference, value_strength=1.0).with_copy("site-0")
    reg.save(tmp_path / "reg.json")
    assert Registry.load(tmp_path / "reg.json").value_strength == 1.0
    copy, _ = harden_copy(reference, SECRET, reg, "site-0")
    _, _, x, _ = digits_data()
    a, b = (load_handler(m.architecture, torch_tensors(m), m.file_metadata()).infer(
        {"x": torch.from_numpy(x)})["probabilities"].argmax(1) for m in (reference, copy))
    assert float((a == b).float().mean()) >= VALUE_MARK_MIN_AGREEMENT
    assert identify(reference.tensors, reference, reg, SECRET).copy_id is None
    with pytest.raises(ConfigError, match="strength"):
        Registry.new(SECRET, reference, value_strength=11)
