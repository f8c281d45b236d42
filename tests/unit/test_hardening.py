"""Output hardening policies: each changes outputs as documented and keeps the arg-max where it claims to."""

from __future__ import annotations

import numpy as np
import pytest

from nitrovault.errors import ConfigError
from nitrovault.protection import HardeningPolicy


def _probs(rng: np.random.Generator, n: int = 200, classes: int = 10) -> np.ndarray:
    logits = rng.normal(0, 3, size=(n, classes))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


CLASSIFIER_CONFIGS = [
    {"kind": "full"},
    {"kind": "top_k", "k": 3},
    {"kind": "top_k", "k": 1},
    {"kind": "rounded", "decimals": 1},
    {"kind": "rounded", "decimals": 0},
    {"kind": "label_only"},
    {"kind": "reverse_sigmoid", "beta": 0.7, "gamma": 0.4},
    {"kind": "reverse_sigmoid", "beta": 5.0, "gamma": 5.0},  # strong enough to displace the arg-max
]


@pytest.mark.parametrize("config", CLASSIFIER_CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_classifier_policies_keep_argmax_shape_and_sum(config: dict[str, object]) -> None:
    p = _probs(np.random.default_rng(0))
    p[0] = 0.1  # an exact tie: numpy's arg-max (first index) is the reference
    policy = HardeningPolicy.from_config(config)
    q = policy.apply(p)
    assert q.shape == p.shape
    assert np.all(q >= 0) and not np.isnan(q).any()
    assert np.array_equal(q.argmax(axis=1), p.argmax(axis=1))
    tolerance = 10 * 10.0 ** -int(config.get("decimals", 12)) if config["kind"] == "rounded" else 1e-9  # type: ignore[call-overload]
    assert np.allclose(q.sum(axis=1), 1.0, atol=tolerance)


def test_full_is_identity_and_label_only_is_one_hot() -> None:
    p = _probs(np.random.default_rng(1))
    assert np.array_equal(HardeningPolicy().apply(p), p)
    q = HardeningPolicy(kind="label_only").apply(p)
    assert set(np.unique(q)) == {0.0, 1.0} and np.all(q.sum(axis=1) == 1)


def test_top_k_keeps_exactly_k_classes() -> None:
    p = _probs(np.random.default_rng(2))
    q = HardeningPolicy(kind="top_k", k=3).apply(p)
    assert np.all((q > 0).sum(axis=1) == 3)
    kept = np.argsort(-p, axis=1)[:, :3]
    assert np.all(np.take_along_axis(q, kept, axis=1) > 0)
    # the kept probabilities keep their ratios
    ratio = np.take_along_axis(q, kept, axis=1) / np.take_along_axis(p, kept, axis=1)
    assert np.allclose(ratio, ratio[:, :1])


def test_rounded_has_the_stated_precision_and_breaks_rounding_ties_to_the_argmax() -> None:
    p = _probs(np.random.default_rng(3))
    q = HardeningPolicy(kind="rounded", decimals=2).apply(p)
    assert np.allclose(q * 100, np.round(q * 100))
    tie = np.array([[0.36, 0.44, 0.20]])  # rounds to 0.4 / 0.4 / 0.2 at one decimal
    r = HardeningPolicy(kind="rounded", decimals=1).apply(tie)
    assert r.argmax() == 1 and r[0, 1] > r[0, 0]


def test_reverse_sigmoid_perturbs_but_keeps_the_label() -> None:
    p = _probs(np.random.default_rng(4))
    q = HardeningPolicy(kind="reverse_sigmoid", beta=0.7, gamma=0.4).apply(p)
    assert np.abs(q - p).max() > 0.05  # it really changes the probabilities
    assert np.array_equal(q.argmax(axis=1), p.argmax(axis=1))


def test_reverse_sigmoid_matches_the_published_formula_when_argmax_survives() -> None:
    p = np.array([[0.7, 0.2, 0.1]])
    beta, gamma = 0.3, 0.5
    r = beta * (1 / (1 + np.exp(-gamma * np.log(p / (1 - p)))) - 0.5)
    expected = np.clip(p - r, 0, None)
    expected /= expected.sum()
    assert np.allclose(HardeningPolicy(kind="reverse_sigmoid", beta=beta, gamma=gamma).apply(p), expected)


def test_embedding_round_and_noise_preserve_dimension_and_normalisation() -> None:
    rng = np.random.default_rng(5)
    e = rng.normal(size=(50, 384))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    raw = rng.normal(size=(5, 8)) * 3  # not normalised: stays unnormalised
    for policy in (HardeningPolicy(kind="embedding_round", decimals=2),
                   HardeningPolicy(kind="embedding_noise", sigma=0.01)):
        out = policy.apply(e, rng=np.random.default_rng(0))
        assert out.shape == e.shape
        assert np.allclose(np.linalg.norm(out, axis=1), 1.0)
        cos = (out * e).sum(axis=1)
        assert cos.min() > 0.95
        assert not np.allclose(np.linalg.norm(policy.apply(raw, rng=np.random.default_rng(0)), axis=1), 1.0)
    # nearest-neighbour retrieval survives small noise
    noisy = HardeningPolicy(kind="embedding_noise", sigma=0.01).apply(e, rng=np.random.default_rng(1))
    assert np.array_equal((noisy @ e.T).argmax(axis=1), np.arange(len(e)))


def test_embedding_noise_is_fresh_per_call_without_rng() -> None:
    e = np.ones((1, 16)) / 4
    policy = HardeningPolicy(kind="embedding_noise", sigma=0.1)
    assert not np.allclose(policy.apply(e), policy.apply(e))
    seeded = [policy.apply(e, rng=np.random.default_rng(3)) for _ in range(2)]
    assert np.array_equal(*seeded)


@pytest.mark.parametrize(
    "config",
    [
        {"kind": "softmax"},
        {"kind": "top_k"},
        {"kind": "top_k", "k": 0},
        {"kind": "top_k", "k": 2.5},
        {"kind": "top_k", "k": True},
        {"kind": "top_k", "k": 3, "decimals": 1},
        {"kind": "rounded", "decimals": 9},
        {"kind": "reverse_sigmoid", "beta": 0.7},
        {"kind": "reverse_sigmoid", "beta": -1, "gamma": 1},
        {"kind": "embedding_noise", "sigma": 0.1, "seed": 3},
        {"kind": "label_only", "k": 1},
    ],
)
def test_bad_configs_are_refused(config: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        HardeningPolicy.from_config(config)


def test_config_round_trips() -> None:
    for config in CLASSIFIER_CONFIGS:
        assert HardeningPolicy.from_config(config).to_config() == config


def test_non_finite_inputs_are_refused() -> None:
    with pytest.raises(ValueError):
        HardeningPolicy(kind="top_k", k=2).apply(np.array([[np.nan, 0.5]]))


def test_forced_argmax_path_is_exercised() -> None:
    p = _probs(np.random.default_rng(0))
    beta, gamma = 5.0, 5.0
    clipped = np.clip(p, 1e-6, 1 - 1e-6)
    raw = np.clip(p - beta * (1 / (1 + np.exp(-gamma * np.log(clipped / (1 - clipped)))) - 0.5), 0, None)
    assert np.any(raw.argmax(axis=1) != p.argmax(axis=1))  # the plain formula would flip labels here
    q = HardeningPolicy(kind="reverse_sigmoid", beta=beta, gamma=gamma).apply(p)
    assert np.array_equal(q.argmax(axis=1), p.argmax(axis=1))
